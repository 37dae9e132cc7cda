"""HLLM's item sides beyond text: text+ID items (ID dropout per occurrence, text alone without a
trained row), the hllm-id diagnostic, the catalogue softmax over a refreshed memory, frozen
outputs standardised per dimension, and the last-item text term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hllm.config import load_config
from hllm.data.dataset import prepare_dataset
from hllm.data.text import pack_items
from hllm.errors import UserError
from hllm.evaluate import item_table
from hllm.models.build import build_model, cache_frozen_items
from hllm.models.item_ids import ItemIdTable, drop_ids
from hllm.runs import load_run
from hllm.serving.export import encode_histories, encode_texts, export_run, load_artifact
from hllm.train import fit, make_batches, param_groups
from tests.support import tiny_overrides

TEXT_AND_ID = {"model__item__id_embedding": "true"}
LAST_ITEM_TEXT = {
    "model__item__mode": "frozen",
    "model__item__standardize": "true",
    "model__last_item_text": 0.3,
}


def built(cycle_data, tmp_path, **extra):
    """A tiny model of `extra`'s config, its caches filled, and its training batches."""
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, **extra))
    data = prepare_dataset(config.data)
    model, item_tokens = build_model(config, data)
    cache_frozen_items(model, item_tokens, batch_size=64, device="cpu")
    return model, item_tokens, make_batches(config, data, model, item_tokens), data


def test_id_table_has_rows_only_for_trained_ids():
    trained = torch.tensor([False, True, False, True])
    table = ItemIdTable(trained, 3, init_std=1.0)
    rows = table(torch.tensor([0, 1, 2, 3, 4, 99]))  # PAD, trained, untrained, trained, beyond
    assert rows[[1, 3]].abs().sum() > 0
    assert rows[[0, 2, 4, 5]].abs().sum() == 0
    assert ItemIdTable(trained, 3, init_std=0.0).embedding.weight.abs().sum() == 0


def test_id_dropout_draws_once_per_occurrence():
    """Every occurrence of the same item draws its own mask: about `rate` of them are dropped, and
    one catalogue row is both kept and dropped within a batch."""
    torch.manual_seed(0)
    rows = torch.ones(64, 20, 4)  # 1280 occurrences of one item
    dropped = drop_ids(rows, 0.3, training=True)[..., 0] == 0  # (64, 20)
    assert 0.26 < dropped.float().mean() < 0.34  # binomial sd 0.013
    assert (dropped == dropped[..., :1]).all(-1).float().mean() < 0.01  # rows are not all-or-nothing
    assert torch.equal(drop_ids(rows, 0.3, training=False), rows)


def test_training_sees_each_occurrence_with_or_without_its_id(cycle_data, tmp_path):
    """The User LLM reads each real history occurrence as either the text-only or the text+ID
    embedding of its item, about half each at id_dropout=0.5, both for the same item."""
    model, _, batches, _ = built(cycle_data, tmp_path, model__item__id_dropout=0.5, **TEXT_AND_ID)
    torch.nn.init.normal_(model.item_ids.embedding.weight)  # a trained-looking table
    batch = batches[0]
    seen = {}
    model.user_encoder.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    torch.manual_seed(0)
    model.train().training_loss(batch)
    base, ids = model._item_parts(batch.batch_items, batch.text)
    text_only = model._combine(base, None)[batch.item_index[:, :-1]]  # (B, L, D)
    with_id = model._combine(base, ids)[batch.item_index[:, :-1]]
    real = batch.mask
    is_text = torch.isclose(seen["x"], text_only, atol=1e-6).all(-1)[real]
    is_id = torch.isclose(seen["x"], with_id, atol=1e-6).all(-1)[real]
    assert (is_text ^ is_id).all()
    assert 0.3 < is_text.float().mean() < 0.7
    items = batch.items[:, :-1][real]
    assert any(is_text[items == i].any() and is_id[items == i].any() for i in items.unique())


def test_items_without_a_trained_row_are_encoded_from_text_alone(cycle_data, tmp_path):
    model, item_tokens, _, data = built(cycle_data, tmp_path, **TEXT_AND_ID)
    torch.nn.init.normal_(model.item_ids.embedding.weight)
    model.item_ids.trained[3] = False  # as an item never trained on (new-item protocol)
    ids = torch.tensor([0, 2, 3, data.num_items, data.num_items + 5])  # PAD, trained, untrained, beyond
    text = pack_items(item_tokens, np.array([0, 2, 3, 1, 4]), appended_tokens=model.appended_tokens)
    model.eval()
    with torch.no_grad():
        encoded = model.encode_items(ids, text)
        text_only = model._combine(model._item_parts(ids, text)[0], None)
    torch.testing.assert_close(encoded[[0, 2, 3, 4]], text_only[[0, 2, 3, 4]])  # up to rounding
    assert not torch.allclose(encoded[1], text_only[1], atol=1e-3)


def test_id_rows_start_at_zero_without_weight_decay(cycle_data, tmp_path):
    """A text+ID model starts as its text-only twin, and AdamW never shrinks its ID rows."""
    model, tokens, _, _ = built(cycle_data, tmp_path, **TEXT_AND_ID)
    text_only, _, _, _ = built(cycle_data, tmp_path)
    ids = torch.arange(1, 6)
    text = pack_items(tokens, ids.numpy(), appended_tokens=model.appended_tokens)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_items(ids, text), text_only.encode_items(ids, text))
    decayed = {id(p) for group in param_groups(model, 0.1) if group["weight_decay"] for p in group["params"]}
    assert id(model.item_ids.embedding.weight) not in decayed


def test_text_and_id_learns_and_exports_the_evaluators_table(cycle_data, tmp_path):
    """Training lowers the loss; the artifact's table is the evaluator's; an item added by text
    (POST /items) gets the text path alone, not its catalogue twin's ID row."""
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, train__epochs=6, **TEXT_AND_ID))
    result = fit(config)
    losses = [row["train/loss"] for row in _log_rows(tmp_path / "tiny")]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert result["train"]["epochs"] == 6
    run = load_run(tmp_path / "tiny")
    assert run.model.item_ids.embedding.weight.abs().sum() > 0  # the ID rows moved
    table = item_table(run.model, run.data.num_items, run.item_tokens, batch_size=64)
    artifact = load_artifact(export_run(tmp_path / "tiny", tmp_path / "artifact"))
    np.testing.assert_allclose(artifact.embeddings, table.numpy(), atol=1e-6)
    ids = torch.arange(1, 4)
    with torch.no_grad():
        base, _ = run.model._item_parts(
            ids, pack_items(run.item_tokens, ids.numpy(), appended_tokens=run.model.appended_tokens)
        )
        text_only = run.model._combine(base, None).numpy()
    added = encode_texts(artifact, [artifact.texts[i] for i in ids])
    np.testing.assert_allclose(added, text_only, atol=1e-5)
    assert not np.allclose(added, artifact.embeddings[1:4], atol=1e-3)


def test_standardised_frozen_outputs_train_save_and_serve(cycle_data, tmp_path):
    """The statistics come from every item but PAD and the new ones, make those rows mean 0 / std 1,
    travel with the weights and into the served artifact, whose table is the evaluator's and whose
    text path equals the cache path."""
    frozen = {"model__item__mode": "frozen", "model__item__standardize": "true", "train__epochs": 3}
    model, _, _, data = built(cycle_data, tmp_path, **frozen)
    rows = model.standardizer(model.item_cache[1:])
    torch.testing.assert_close(rows.mean(0), torch.zeros(rows.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.std(0), torch.ones(rows.shape[1]), atol=1e-4, rtol=0)

    held_out = torch.zeros(data.num_items, dtype=torch.bool)
    held_out[1] = True
    model.standardizer.std.zero_()
    model.held_out_items = held_out
    model.cache_items(model.item_cache)
    torch.testing.assert_close(model.standardizer.mean, model.item_cache[2:].mean(0))

    fit(load_config(None, tiny_overrides(cycle_data, tmp_path, **frozen)))
    run = load_run(tmp_path / "tiny")
    saved = torch.load(tmp_path / "tiny" / "checkpoints" / "best.ckpt", weights_only=False)["model"]
    torch.testing.assert_close(run.model.standardizer.std, saved["standardizer.std"], atol=0, rtol=0)
    table = item_table(run.model, run.data.num_items, run.item_tokens, batch_size=64)
    artifact = load_artifact(export_run(tmp_path / "tiny", tmp_path / "artifact"))
    np.testing.assert_allclose(artifact.embeddings, table.numpy(), atol=1e-6)
    added = encode_texts(artifact, [artifact.texts[i] for i in range(1, 4)])
    np.testing.assert_allclose(added, table[1:4].numpy(), atol=1e-5)


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_last_item_text_adds_the_weighted_text_cosine_to_every_score(cycle_data, tmp_path, decay):
    """A ranking score is the HLLM's own u . e plus beta times the cosine between the standardised
    Item LLM outputs of the candidate and of the user's most recent item, or with a decay d the sum
    over the history weighted d^age (age 0 = the most recent item, PAD left out); the User LLM
    reads the same inputs as without the term."""
    model, tokens, _, data = built(cycle_data, tmp_path, **LAST_ITEM_TEXT, model__last_item_text_decay=decay)
    model.eval()
    history = torch.tensor([[0, 2, 5], [3, 1, 4]])
    with torch.no_grad():
        table = item_table(model, data.num_items, tokens, batch_size=64)
        scores = model.encode_users(history, table) @ table.T
        model.last_item_text = 0.0
        plain_table = item_table(model, data.num_items, tokens, batch_size=64)
        plain = model.encode_users(history, plain_table) @ plain_table.T
        text = F.normalize(model.standardizer(model.item_cache), dim=-1)
    assert table.shape[1] == plain_table.shape[1] + text.shape[1]
    recent = text[history[:, -1]] + decay * text[history[:, -2]] + decay**2 * text[history[:, -3]]
    recent[0] -= decay**2 * text[0]  # the first history's oldest slot is PAD
    torch.testing.assert_close(scores, plain + 0.3 * recent @ text.T)


def test_last_item_text_ranks_but_does_not_train_and_serves_as_evaluated(cycle_data, tmp_path):
    """The term is for ranking only: the training loss is the plain model's. Its weight is chosen
    among choices on validation after training and kept in the run's config.yaml; the exported
    artifact ranks as the evaluator does: its table, an item added from its text, and a history."""
    model, _, batches, _ = built(cycle_data, tmp_path, **LAST_ITEM_TEXT)
    plain, _, _, _ = built(cycle_data, tmp_path, **{**LAST_ITEM_TEXT, "model__last_item_text": 0.0})
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.training_loss(batches[0]), plain.training_loss(batches[0]))

    choices = {
        "model__last_item_text_choices": "[0.3,5.0]",
        "model__last_item_text_decay_choices": "[0.0,0.9]",
        "train__epochs": 2,
    }
    result = fit(load_config(None, tiny_overrides(cycle_data, tmp_path, **LAST_ITEM_TEXT, **choices)))
    sweep = result["train"]["last_item_text"]
    figures = sweep["valid recall@1"]
    assert set(figures) == {"0.3", "5.0"} and figures[str(sweep["chosen"])] == max(figures.values())
    decays = sweep["decay"]["valid recall@1"]
    assert set(decays) == {"0.0", "0.9"} and decays[str(sweep["decay"]["chosen"])] == max(decays.values())
    assert decays["0.0"] == figures[str(sweep["chosen"])]  # the decay sweep starts where the weight's ends
    assert result["valid"]["recall@1"] == max(decays.values())
    run = load_run(tmp_path / "tiny")
    assert run.model.last_item_text == sweep["chosen"] and not run.config.model.last_item_text_choices
    assert run.model.last_item_text_decay == sweep["decay"]["chosen"]
    assert not run.config.model.last_item_text_decay_choices
    table = item_table(run.model, run.data.num_items, run.item_tokens, batch_size=64)
    artifact = load_artifact(export_run(tmp_path / "tiny", tmp_path / "artifact"))
    np.testing.assert_allclose(artifact.embeddings, table.numpy(), atol=1e-6)
    added = encode_texts(artifact, [artifact.texts[i] for i in range(1, 4)])
    np.testing.assert_allclose(added, table[1:4].numpy(), atol=1e-5)
    with torch.no_grad():
        user = run.model.encode_users(torch.tensor([[2, 3]]), table)
    served = encode_histories(artifact, [artifact.embeddings[[2, 3]]])
    np.testing.assert_allclose(served, user.numpy(), atol=1e-5)
    run.model.last_item_text_decay = artifact.model.last_item_text_decay = 0.5  # whichever was chosen
    with torch.no_grad():
        user = run.model.encode_users(torch.tensor([[0, 2, 3, 1], [4, 2, 3, 1]]), table)
    served = encode_histories(artifact, [artifact.embeddings[[2, 3, 1]], artifact.embeddings[[4, 2, 3, 1]]])
    np.testing.assert_allclose(served, user.numpy(), atol=1e-5)


def _log_rows(run_dir) -> list[dict]:
    import csv

    with open(run_dir / "logs" / "metrics.csv") as f:
        return [
            {k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f) if row.get("train/loss")
        ]


@pytest.mark.parametrize("negatives", ["sampled", "catalogue"])
def test_hllm_id_learns_the_pattern_without_text(cycle_data, tmp_path, negatives):
    """HLLM's User LLM over an ID table: no text is read, and the deterministic cycle is learnt."""
    extra = {"model__kind": "hllm-id", "train__negatives": negatives, "train__epochs": 6}
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, **extra))
    data = prepare_dataset(config.data)
    model, item_tokens = build_model(config, data)
    assert item_tokens is None and not model.needs_text and model.item_encoder is None
    assert fit(config)["test"]["recall@1"] == 1.0
    with pytest.raises(UserError, match="hllm-id"):
        export_run(tmp_path / "tiny", tmp_path / "artifact")


def test_memory_holds_every_softmax_row_and_refreshes_on_schedule(cycle_data, tmp_path):
    """negatives=memory: every row of the softmax table, the batch's items too, comes from the
    memory, which is recomputed every memory_refresh steps; the top layer still learns (through the
    histories' fresh outputs); the drift is logged."""
    extra = {"model__item__train_layers": 1, "train__negatives": "memory", "train__memory_refresh": 3}
    model, _, batches, _ = built(cycle_data, tmp_path, **extra)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    memories, drift = [], []
    top = [p for p in model.item_encoder.parameters() if p.requires_grad]
    for step in range(4):
        optimizer.zero_grad()
        model.training_loss(batches[step % len(batches)]).backward()
        assert top and all(p.grad is not None for p in top) and any(p.grad.abs().sum() > 0 for p in top)
        optimizer.step()
        memories.append(model.memory.clone())
        drift.append(model.last_stats["memory_cosine"])
    assert torch.equal(memories[0], memories[2]) and not torch.equal(memories[2], memories[3])
    assert drift[0] == pytest.approx(1.0) and drift[2] < 1 - 1e-5 and drift[3] == pytest.approx(1.0)
    batch = batches[0]
    with torch.no_grad():
        fresh, _ = model._item_parts(batch.batch_items, None)
        table = model._catalogue(batch.batch_items, fresh)
        from_memory = model._combine(model.projection(model.memory), None)
    torch.testing.assert_close(table, from_memory)
    assert not torch.allclose(table[batch.batch_items], model._combine(fresh, None))  # stale rows


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.negatives=memory"], "train_layers"),
        (["train.negatives=memory", "model.item.train_layers=1", "model.kind=hllm-id"], "model.kind=hllm"),
        (["train.negatives=catalogue"], "frozen"),
        (["model.item.standardize=true", "train.negatives=sampled"], "mode=frozen"),
        (["model.last_item_text=0.2", "model.kind=hllm-id", "train.negatives=catalogue"], "last-item text"),
    ],
)
def test_negatives_that_need_a_cached_item_side_are_refused(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(None, overrides)
    assert load_config(None, ["model.kind=hllm-id", "train.negatives=catalogue"]).model.kind == "hllm-id"


def test_param_groups_give_each_module_path_its_own_learning_rate():
    """A prefix matches a module path at any depth ("item_encoder." inside "hllm."), never a name
    that merely contains it ("hllm." is not "lm."); norms and biases are not decayed."""
    model = nn.ModuleDict(
        {
            "lm": nn.Linear(2, 2),
            "hllm": nn.ModuleDict({"item_encoder": nn.Linear(2, 2), "head": nn.Linear(2, 2)}),
        }
    )
    names = {id(param): name for name, param in model.named_parameters()}
    groups = param_groups(model, 0.1, {"lm.": 1e-4, "item_encoder.": 1e-5})
    found = {
        names[id(param)]: (group.get("lr"), group["weight_decay"])
        for group in groups
        for param in group["params"]
    }
    assert found == {
        "lm.weight": (1e-4, 0.1),
        "lm.bias": (1e-4, 0.0),
        "hllm.item_encoder.weight": (1e-5, 0.1),
        "hllm.item_encoder.bias": (1e-5, 0.0),
        "hllm.head.weight": (None, 0.1),
        "hllm.head.bias": (None, 0.0),
    }
