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
from hllm.models.build import build_model
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
