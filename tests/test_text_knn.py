"""text-knn: built from the config, untrained, cosine of unit text embeddings with the recent items."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hllm.config import load_config
from hllm.data.dataset import prepare_dataset
from hllm.errors import UserError
from hllm.evaluate import evaluate, item_table
from hllm.models.backbone import load_backbone
from hllm.models.build import build_model, cache_frozen_items
from hllm.models.item_encoder import ItemEncoder
from hllm.models.text_knn import TextKnn
from tests.support import tiny_overrides


def test_user_is_the_mean_direction_of_the_recent_items():
    model = TextKnn(ItemEncoder(load_backbone("tiny-bert"), pooling="mean"), recent=2)
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # row 0 = PAD
    users = model.encode_users(torch.tensor([[1, 2, 3], [0, 0, 2]]), table)
    # user 0: items 2 and 3 (item 1 is older than the last 2); user 1: item 2 alone, PAD ignored
    assert torch.allclose(users, F.normalize(torch.tensor([[-1.0, 1.0], [0.0, 1.0]]), dim=-1))


def test_text_knn_builds_untrained_and_is_scored_by_the_evaluator(cycle_data, tmp_path):
    config = load_config(None, [*tiny_overrides(cycle_data, tmp_path), "model.kind=text-knn"])
    data = prepare_dataset(config.data)
    model, item_tokens = build_model(config, data)
    assert isinstance(model, TextKnn) and not any(p.requires_grad for p in model.parameters())
    table = item_table(model, data.num_items, item_tokens, batch_size=8)
    assert torch.allclose(table[1:].norm(dim=-1), torch.ones(data.num_items - 1), atol=1e-5)
    metrics = evaluate(model, data, "test", item_tokens=item_tokens, ks=[1, 5], table=table)
    # By hand: each user's last history item's cosine to every item, history masked, target's rank.
    hits = []
    for user, target in enumerate(data.history_and_target("test")[1]):
        history = torch.from_numpy(data.history(user, "test"))
        scores = table @ table[history[-1]]
        scores[0] = scores[history] = float("-inf")
        hits.append(int((scores > scores[target]).sum()) < 5)
    assert metrics["users"] == data.num_users
    assert metrics["recall@5"] == pytest.approx(sum(hits) / len(hits))


def test_text_knn_refuses_token_pooling(cycle_data, tmp_path):
    overrides = [*tiny_overrides(cycle_data, tmp_path), "model.kind=text-knn", "model.item.pooling=token"]
    config = load_config(None, overrides)
    with pytest.raises(UserError) as err:
        build_model(config, prepare_dataset(config.data))
    assert err.value.where == "model.item.pooling"


def test_text_knn_encodes_the_catalogue_once_and_standardises_without_the_new_items(cycle_data, tmp_path):
    """Cached (and kept in the store), text-knn scores as from text; standardised, its outputs are
    centred and scaled with statistics of every item but PAD and the protocol's new items."""
    overrides = [*tiny_overrides(cycle_data, tmp_path), "model.kind=text-knn"]
    store = tmp_path / "store"
    config = load_config(None, overrides)
    data = prepare_dataset(config.data)
    model, tokens = build_model(config, data)
    from_text = item_table(model, data.num_items, tokens, batch_size=8)
    cache_frozen_items(model, tokens, batch_size=8, device="cpu", store=store)
    assert not model.needs_text and len(list(store.rglob("*.pt"))) == 1
    torch.testing.assert_close(item_table(model, data.num_items, tokens, batch_size=8), from_text)

    config = load_config(None, [*overrides, "model.item.standardize=true", "data.cold_items=0.25"])
    data = prepare_dataset(config.data)
    model, tokens = build_model(config, data)
    cache_frozen_items(model, tokens, batch_size=8, device="cpu", store=store)
    assert len(list(store.rglob("*.pt"))) == 1  # the same encoder and tokens: read back, not re-run
    seen = torch.ones(data.num_items, dtype=torch.bool)
    seen[0] = False
    seen[torch.from_numpy(data.holdout.held_out)] = False
    assert 0 < seen.sum() < data.num_items - 1
    raw = model.item_cache[seen]
    expected = F.normalize((model.item_cache - raw.mean(0)) / raw.std(0), dim=-1)
    torch.testing.assert_close(item_table(model, data.num_items, None, batch_size=8), expected)
