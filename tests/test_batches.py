import numpy as np
import torch

from hllm.data.batches import TrainBatches, eval_batches, left_pad, training_items, training_windows
from hllm.data.text import ItemTokens


def sequences(data_cls, seqs: list[list[int]], num_items: int):
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    return data_cls(
        name="toy",
        user_ids=np.array([f"u{i}" for i in range(len(seqs))], dtype=object),
        item_ids=np.array(["[PAD]"] + [f"i{i}" for i in range(1, num_items)], dtype=object),
        offsets=offsets,
        items=np.concatenate([np.array(s, dtype=np.int64) for s in seqs]),
        item_text=np.array([""] + [f"item {i}" for i in range(1, num_items)], dtype=object),
        item_titles=np.array([""] + [f"item {i}" for i in range(1, num_items)], dtype=object),
        stats={},
        fingerprint="toy",
    )


def toy(seqs, num_items=20):
    from hllm.data.dataset import SequenceData

    return sequences(SequenceData, seqs, num_items)


def test_windows_cover_every_training_transition_once():
    seq = list(range(1, 13))  # 12 items: 10 for training, then valid, test
    data = toy([seq, [1, 2, 3]])
    windows = training_windows(data, max_history=4)
    transitions = []
    for user, start, end in windows:
        part = data.items[start:end]
        transitions += list(zip(part[:-1], part[1:]))
    assert sorted(transitions) == [(i, i + 1) for i in range(1, 10)]
    assert all(end - start <= 5 for _, start, end in windows)
    assert not any(user == 1 for user, _, _ in windows)  # one training item: nothing to learn


def test_batch_indexes_items_and_shares_negatives():
    data = toy([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [2, 4, 6, 8, 10, 12]], num_items=16)
    lengths = np.full(16, 2)
    item_tokens = ItemTokens(np.arange(32, dtype=np.int32), np.concatenate([[0], np.cumsum(lengths)]))
    dataset = TrainBatches(
        data, max_history=3, batch_size=3, num_negatives=4, seed=0, item_tokens=item_tokens, appended_tokens=1
    )
    batch = dataset[0]
    present = batch.items != 0
    assert torch.equal(batch.batch_items[batch.item_index][present], batch.items[present])
    assert torch.equal(batch.batch_items[batch.negative_index], batch.negatives)
    negatives = batch.negatives.tolist()
    assert len(set(negatives)) == 4 and 0 not in negatives
    assert torch.equal(batch.mask, batch.items[:, :-1] != 0)
    assert batch.text.num_items == len(batch.batch_items)
    assert int(batch.text.lengths.sum()) == 3 * len(batch.batch_items)  # 2 tokens + 1 [ITEM] token


def test_batches_are_reproducible_per_epoch_and_differ_across_epochs():
    data = toy([list(range(1, 15)), list(range(3, 18)), list(range(2, 10))], num_items=20)
    dataset = TrainBatches(data, max_history=4, batch_size=2, num_negatives=3, seed=7)
    first = [dataset[i].negatives for i in range(len(dataset))]
    again = [dataset[i].negatives for i in range(len(dataset))]
    dataset.set_epoch(1)
    other = [dataset[i].negatives for i in range(len(dataset))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_eval_batches_hold_out_last_items():
    data = toy([[1, 2, 3, 4], [5, 6, 7]])
    valid = next(eval_batches(data, "valid", batch_size=8, max_history=2))
    test = next(eval_batches(data, "test", batch_size=8, max_history=2))
    assert valid.users.tolist() == test.users.tolist() == [1, 0]  # shortest history first
    assert valid.targets.tolist() == [6, 3]
    assert test.targets.tolist() == [7, 4]
    assert valid.history.tolist() == [[0, 5], [1, 2]]
    assert test.seen.tolist() == [[0, 5, 6], [1, 2, 3]]
    assert sorted(training_items(data).tolist()) == [1, 2, 5]


def test_left_pad_is_as_wide_as_the_longest_row_up_to_the_cap():
    rows = [np.array([1, 2, 3]), np.array([4])]
    np.testing.assert_array_equal(left_pad(rows, 50), [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(left_pad(rows, 2), [[2, 3], [0, 4]])  # the most recent items kept
