"""SASRec and HSTU share IdRecommender: padding invariance, no NaN on padded rows, every loss learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hllm.config import DataConfig, load_config
from hllm.data.batches import TrainBatch, TrainBatches, eval_batches
from hllm.data.dataset import prepare_dataset
from hllm.models.hstu import build_hstu
from hllm.models.id_recommender import sample_negatives
from hllm.models.sasrec import build_sasrec
from hllm.train import fit
from tests.support import tiny_overrides

BUILDERS = {"sasrec": build_sasrec, "hstu": build_hstu}


@pytest.fixture(scope="module")
def cycle_sequences(cycle_data, tmp_path_factory):
    config = DataConfig(
        path=str(cycle_data / "cycle.csv"),
        item_path=str(cycle_data / "cycle_items.csv"),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        max_history=5,
    )
    return prepare_dataset(config)


def _batch(items: list[list[int]], negatives: list[int]) -> TrainBatch:
    """A hand-made batch; IdRecommender reads only items, mask and negatives."""
    ids = torch.tensor(items)
    return TrainBatch(
        items=ids,
        mask=ids[:, :-1] != 0,
        negatives=torch.tensor(negatives),
        batch_items=torch.unique(ids[ids != 0]),
        item_index=torch.zeros_like(ids),
        negative_index=torch.zeros(len(negatives), dtype=torch.long),
        text=None,
    )


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("loss", ["bce", "sampled", "full"])
def test_padding_amount_and_side_do_not_change_the_user_embedding(kind, loss):
    torch.manual_seed(0)
    model = BUILDERS[kind](20, 8, width=16, heads=2, loss=loss).eval()
    table = model.encode_items(torch.arange(20))
    left5 = torch.tensor([[0, 0, 3, 4, 5]])
    left8 = torch.tensor([[0, 0, 0, 0, 0, 3, 4, 5]])
    right8 = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0]])
    expected = model.encode_users(left5, table)
    torch.testing.assert_close(model.encode_users(left8, table), expected)
    torch.testing.assert_close(model.encode_users(right8, table), expected)
    assert not torch.allclose(model.encode_users(torch.tensor([[0, 0, 3, 5, 4]]), table), expected)


@pytest.mark.parametrize("kind", BUILDERS)
def test_short_and_empty_histories_give_no_nan_in_train_and_eval(kind):
    torch.manual_seed(0)
    model = BUILDERS[kind](12, 6, width=16, heads=2, attention_dropout=0.5)
    histories = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 7], [1, 2, 3, 4, 5, 6]])
    batch = _batch([[0, 0, 0, 0, 0, 0, 4], [0, 0, 0, 0, 0, 2, 3], [0, 0, 0, 1, 2, 3, 4]], [5, 6])
    for training in (True, False):
        model.train(training)
        users = model.encode_users(histories, model.encode_items(torch.arange(12)))
        assert torch.isfinite(users).all()
    model.train()
    loss = model.training_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("loss", ["bce", "sampled", "full"])
def test_each_loss_lowers_the_training_loss_on_the_cycle(kind, loss, cycle_sequences):
    torch.manual_seed(0)
    model = BUILDERS[kind](cycle_sequences.num_items, 5, width=16, loss=loss, dropout=0.0)
    batches = TrainBatches(cycle_sequences, max_history=5, batch_size=8, num_negatives=6, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for epoch in range(8):
        batches.set_epoch(epoch)
        for index in range(len(batches)):
            loss_value = model.training_loss(batches[index])
            optimizer.zero_grad()
            loss_value.backward()
            optimizer.step()
            losses.append(loss_value.item())
    # bce (one noisy negative, dot products from a 0.02-std init) falls the slowest: ~0.6-0.75 here
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    assert model.last_stats["accuracy"] > 0.5


def test_sampled_negatives_are_uniform_and_never_pad_or_the_target():
    torch.manual_seed(0)
    targets = torch.full((20_000,), 3)
    drawn = sample_negatives(targets, 6)  # real items 1..5, target 3 excluded
    counts = torch.bincount(drawn, minlength=6)
    assert counts[0] == 0 and counts[3] == 0
    assert torch.allclose(counts[[1, 2, 4, 5]].float() / len(drawn), torch.full((4,), 0.25), atol=0.02)


def test_sampled_negatives_skip_the_new_items():
    torch.manual_seed(0)
    targets = torch.tensor([1, 4, 6] * 7_000)
    new = torch.zeros(8, dtype=torch.bool)
    new[[2, 5]] = True  # the protocol's new items: never a negative
    drawn = sample_negatives(targets, 8, excluded=new)
    assert not (drawn == targets).any()
    counts = torch.bincount(drawn, minlength=8)
    assert counts[[0, 2, 5]].sum() == 0
    # allowed: 1, 3, 4, 6, 7; each target leaves the other four, each drawn in 1/4 of its rows
    expected = torch.tensor([2, 3, 2, 2, 3]) / 12  # items 3 and 7 are never a target here
    assert torch.allclose(counts[[1, 3, 4, 6, 7]].float() / len(drawn), expected, atol=0.01)


def test_timestamps_reach_train_and_eval_batches_and_survive_the_cache(cycle_sequences, cycle_data):
    # cycle users interact at times 0..5, one item per step: the training part is times 0..3
    batch = TrainBatches(cycle_sequences, max_history=5, batch_size=8, num_negatives=2, seed=0)[0]
    real = batch.items != 0
    assert batch.times.dtype == torch.float64 and (batch.times[~real] == 0).all()
    assert ((batch.times.diff(dim=1) == 1) | ~real[:, :-1]).all()  # consecutive steps along each row
    test = next(eval_batches(cycle_sequences, "test", batch_size=4, max_history=5))
    assert test.times.tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0]] * 4
    cached = prepare_dataset(
        DataConfig(
            path=str(cycle_data / "cycle.csv"),
            item_path=str(cycle_data / "cycle_items.csv"),
            cache_dir=cycle_sequences.stats["cache"].rsplit("/", 1)[0],
        )
    )
    np.testing.assert_array_equal(cached.timestamps, cycle_sequences.timestamps)


@pytest.mark.parametrize("kind", BUILDERS)
def test_learns_the_cycle_to_recall_at_1_through_the_one_loop(kind, cycle_data, tmp_path):
    overrides = tiny_overrides(
        cycle_data,
        tmp_path,
        model__kind=kind,
        model__id__hidden_size=16,
        model__id__dropout=0.0,
        model__id__loss="full",
        train__lr=1e-2,
        train__epochs=12,
        train__patience=12,
    )
    result = fit(load_config(None, overrides))
    assert result["test"]["recall@1"] == 1.0
    assert result["valid"]["recall@1"] == 1.0
