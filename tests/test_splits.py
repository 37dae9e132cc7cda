"""Protocols: new items never reach training, temporal cut, and the evaluation buckets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hllm.config import DataConfig, load_config
from hllm.data.batches import TrainBatches, eval_batches, training_items
from hllm.data.dataset import SequenceData, prepare_dataset
from hllm.errors import UserError
from hllm.evaluate import evaluate, popularity_thresholds, protocol_card, target_buckets
from hllm.models.build import build_model
from hllm.models.popularity import Popularity


@pytest.fixture
def random_csv(tmp_path) -> Path:
    """40 users x 12 interactions over 60 items, with timestamps."""
    rng = np.random.default_rng(0)
    rows = [
        f"u{user},i{item},{user * 100 + step}"
        for user in range(40)
        for step, item in enumerate(rng.choice(60, size=12, replace=False))
    ]
    path = tmp_path / "inter.csv"
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return path


def prepare(path: Path, tmp_path: Path, **settings) -> SequenceData:
    return prepare_dataset(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **settings))


def test_new_items_never_reach_a_training_batch(random_csv, tmp_path):
    data = prepare(random_csv, tmp_path, cold_items=0.2, cold_seed=3)
    new = data.holdout.held_out
    assert len(new) == round(0.2 * (data.num_items - 1))
    batches = TrainBatches(data, max_history=4, batch_size=4, num_negatives=30, seed=0)
    assert len(batches.windows) > 0
    for index in range(len(batches)):
        batch = batches[index]
        for ids in (batch.items, batch.negatives, batch.batch_items):
            assert not np.isin(ids.numpy(), new).any()
    assert not np.isin(training_items(data), new).any()
    # Evaluation still sees them: in histories and as targets, and every model ranks them.
    seen = np.concatenate(
        [b.seen.numpy().ravel() for b in eval_batches(data, "test", batch_size=8, max_history=4)]
    )
    targets = data.history_and_target("test")[1]
    assert np.isin(seen, new).any() and np.isin(targets, new).any()
    assert len(targets) == data.num_users  # leave-one-out targets: every user is scored
    card = protocol_card(data, "test", model="popularity", config_hash="x")
    assert card["held_out_items"] == len(new) and "data.cold_seed=3" in card["new_items"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.kind=sasrec", "model.id.loss=full"],
        ["model.kind=hllm-id", "model.user.backbone=tiny-llama", "train.negatives=catalogue"],
    ],
)
def test_catalogue_softmax_models_never_score_new_items_as_negatives(random_csv, tmp_path, overrides):
    data = prepare(random_csv, tmp_path, cold_items=0.2, cold_seed=3)
    config = load_config(None, overrides)
    model, _ = build_model(config, data)
    assert np.array_equal(np.flatnonzero(model.held_out_items.numpy()), data.holdout.held_out)
    plain, _ = build_model(config, prepare(random_csv, tmp_path))  # leave-one-out: nothing held out
    assert plain.held_out_items is None


def test_new_items_are_seeded(random_csv, tmp_path):
    first = prepare(random_csv, tmp_path, cold_items=0.2, cold_seed=3)
    again = prepare(random_csv, tmp_path, cold_items=0.2, cold_seed=3)  # from the cache
    other = prepare(random_csv, tmp_path, cold_items=0.2, cold_seed=4)
    plain = prepare(random_csv, tmp_path)
    assert first.holdout.held_out.tolist() == again.holdout.held_out.tolist()
    assert first.holdout.held_out.tolist() != other.holdout.held_out.tolist()
    assert len(plain.holdout.held_out) == 0
    assert len({first.fingerprint, other.fingerprint, plain.fingerprint}) == 3
    assert first.fingerprint == again.fingerprint


def test_temporal_split_hand_made(tmp_path):
    rows = {"u1": "a1 b2 c3 d8 e9", "u2": "a1 c4 f9", "u3": "b7 a8 c9"}
    lines = [f"{user},{event[0]},{event[1:]}" for user, events in rows.items() for event in events.split()]
    path = tmp_path / "inter.csv"
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(lines) + "\n")
    data = prepare(path, tmp_path, split="temporal", temporal_cut=0.5)  # times' lower median: 7
    item = {raw: data.item_index(raw) for raw in "abcdef"}
    u1, u2, u3 = (data.user_index(u) for u in ("u1", "u2", "u3"))
    assert sorted(training_items(data).tolist()) == sorted(item[x] for x in "abcac")
    _, valid = data.history_and_target("valid")
    _, test = data.history_and_target("test")
    assert [valid[u1], valid[u2], valid[u3]] == [item["d"], item["f"], 0]  # u3 has no history at b
    assert [test[u1], test[u2], test[u3]] == [item["e"], 0, item["a"]]  # u2 has one after-cut item
    assert data.history(u3, "test").tolist() == [item["b"]]
    assert sorted(data.holdout.held_out.tolist()) == sorted(item[x] for x in "def")  # new by construction
    assert data.holdout.description["cut_time"] == 7.0


def test_temporal_split_refuses_data_without_time(tmp_path):
    path = tmp_path / "inter.csv"
    path.write_text("user_id,item_id\nu1,a\nu1,b\nu1,c\n")
    with pytest.raises(UserError, match="needs interaction timestamps") as err:
        prepare(path, tmp_path, split="temporal", time_column=None)
    assert err.value.where == "data.split"


def toy(sequences: list[list[int]], num_items: int) -> SequenceData:
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])])
    names = np.array(["[PAD]"] + [f"i{i}" for i in range(1, num_items)], dtype=object)
    return SequenceData(
        "toy",
        np.array([f"u{u}" for u in range(len(sequences))], dtype=object),
        names,
        offsets,
        np.concatenate([np.array(s, dtype=np.int64) for s in sequences]),
        names.copy(),
        names.copy(),
    )


def test_popularity_thresholds_by_share_of_training_interactions():
    counts = np.array([0, 10, 5, 3, 1, 1, 0])  # 20 interactions
    # From the top, item 1 alone makes 50% >= 20%: head >= 10. From the bottom 1, 1, 3 reach 25%.
    assert popularity_thresholds(counts) == (10, 3)
    assert popularity_thresholds(np.array([0, 4, 4])) == (4, 3)  # no count is both head and tail


def test_buckets_hand_made():
    # Leave-one-out; training counts: item 1: 7, 2: 3, 3: 3, 4: 1 (14) -> head >= 7, tail 1..3.
    data = toy([[1, 1, 1, 1, 1, 1, 2, 2, 3, 4, 5], [2, 3, 5, 1], [3, 1, 4, 2, 6]], num_items=7)
    test = target_buckets(data, "test")  # targets 5 (new, 10 before), 1 (head, 3), 6 (new, 4)
    assert test["new"].tolist() == [True, False, True]
    assert test["trained"].tolist() == test["head"].tolist() == [False, True, False]
    assert not test["tail"].any() and not test["torso"].any()
    assert [test[h].tolist() for h in ("hist_1_3", "hist_4_7", "hist_8_plus")] == [
        [False, True, False],
        [False, False, True],
        [True, False, False],
    ]
    valid = target_buckets(data, "valid")  # targets 4 (tail, 9 before), 5 (new, 2), 2 (tail, 3)
    assert valid["tail"].tolist() == [True, False, True] and valid["new"].tolist() == [False, True, False]
    metrics = evaluate(
        Popularity(training_items(data), data.num_items), data, "test", item_tokens=None, ks=[1]
    )
    assert metrics["users"] == 3 and metrics["new/users"] == 2 and metrics["head/users"] == 1
    assert metrics["head/recall@1"] == 1.0  # item 1 is the most popular and u1's history lacks it
    # u0 has seen items 1-4, so 5 and 6 tie at 0 and 5 wins by index: a hit; u2's target 6 loses to 5.
    assert metrics["new/recall@1"] == 0.5 and metrics["tail/users"] == 0
