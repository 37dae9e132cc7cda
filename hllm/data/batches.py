"""Training windows, shared negatives and collation into `TrainBatch` / `EvalBatch`.

Dims: B sequences, L history length, K negatives, U distinct items of a batch, H full-history length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from hllm.data.dataset import SequenceData
from hllm.data.text import PAD_ID, ItemTokens, PackedItems, pack_items


def _move(obj, device):
    values = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        values[f.name] = value.to(device) if value is not None else None
    return type(obj)(**values)


@dataclass
class TrainBatch:
    """B windows of L+1 consecutive items (left-padded with PAD); position j predicts item j+1."""

    items: Tensor  # (B, L+1) item ids; L+1 = the longest window of the batch, at most max_history + 1
    mask: Tensor  # (B, L) bool: input j is a real item (so is its target j+1)
    negatives: Tensor  # (K,) item ids shared by every position of the batch
    batch_items: Tensor  # (U,) distinct real item ids of `items` and `negatives`, sorted
    item_index: Tensor  # (B, L+1) index of each item in batch_items (0 where PAD)
    negative_index: Tensor  # (K,) index of each negative in batch_items
    text: PackedItems | None  # tokens of batch_items packed in one row, when the model reads text
    times: Tensor | None = None  # (B, L+1) float64 seconds of `items` (0 where PAD); None without times

    def to(self, device: torch.device | str) -> TrainBatch:
        return _move(self, device)


@dataclass
class EvalBatch:
    """B users to score: their most recent history, the target, and every item they have seen."""

    users: Tensor  # (B,) internal user index
    history: Tensor  # (B, L) left-padded most recent history
    targets: Tensor  # (B,) item id to find
    seen: Tensor  # (B, H) the whole history (PAD-padded), masked from the ranking
    times: Tensor | None = None  # (B, L) float64 seconds of `history` (0 where PAD); None without times

    def to(self, device: torch.device | str) -> EvalBatch:
        return _move(self, device)


def left_pad(rows: list[np.ndarray], max_width: int, *, dtype: type = np.int64) -> np.ndarray:
    """Stack the last `max_width` items of each row, right-aligned, PAD on the left; the width is the
    longest row's (at most `max_width`), so short-history data (Amazon) does not pay for padding."""
    width = min(max_width, max((len(row) for row in rows), default=0))
    out = np.full((len(rows), width), PAD_ID, dtype=dtype)
    for i, row in enumerate(rows):
        row = row[-width:]
        if len(row):
            out[i, width - len(row) :] = row
    return out


def training_windows(data: SequenceData, max_history: int) -> np.ndarray:
    """(W, 3) rows of (user, start, end): windows of at most L+1 items over each training sequence,
    as positions in the concatenated training sequences (`data.items[data.holdout.train_positions]`).

    Windows end at the last training item and step back by L, overlapping by one item, so every
    transition of the training sequence is trained exactly once (the reference dropped the earliest
    items and the transitions across window boundaries).
    """
    train_offsets = data.holdout.train_offsets(data.offsets)
    lengths = np.diff(train_offsets)
    users = np.flatnonzero(lengths >= 2)
    counts = -(-(lengths[users] - 1) // max_history)  # ceil((n - 1) / L) windows per user
    user_of_window = np.repeat(users, counts)
    first = np.zeros(len(users), dtype=np.int64)
    np.cumsum(counts[:-1], out=first[1:])
    back = np.arange(counts.sum()) - np.repeat(first, counts)  # 0 for the most recent window
    end = train_offsets[user_of_window] + lengths[user_of_window] - back * max_history
    start = np.maximum(end - max_history - 1, train_offsets[user_of_window])
    return np.stack([user_of_window, start, end], axis=1)


class TrainBatches(Dataset):
    """Map-style dataset of whole batches, so every batch's randomness depends only on
    (seed, epoch, batch number): resuming at an epoch boundary replays exactly, with any worker count.

    Each process (rank) reads batches rank, rank + world, ... of the same shuffled order. Only the
    protocol's training sequences are read, and negatives never include its held-out (new) items.
    """

    def __init__(
        self,
        data: SequenceData,
        *,
        max_history: int,
        batch_size: int,
        num_negatives: int,
        seed: int,
        item_tokens: ItemTokens | None = None,
        appended_tokens: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data = data
        positions = data.holdout.train_positions
        self.train_items = data.items[positions]
        self.train_times = None if data.timestamps is None else data.timestamps[positions]
        self.windows = training_windows(data, max_history)
        self.negative_pool = np.setdiff1d(np.arange(1, data.num_items), data.holdout.held_out)
        self.max_history = max_history
        self.batch_size = batch_size
        self.num_negatives = num_negatives
        self.seed = seed
        self.item_tokens = item_tokens
        self.appended_tokens = appended_tokens
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.windows) // self.batch_size // self.world_size or 1

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.windows))

    def __getitem__(self, index: int) -> TrainBatch:
        batch_number = index * self.world_size + self.rank
        chosen = self._order()[batch_number * self.batch_size : (batch_number + 1) * self.batch_size]
        spans = self.windows[chosen]
        items = left_pad([self.train_items[start:end] for _, start, end in spans], self.max_history + 1)
        rng = np.random.default_rng([self.seed, self.epoch, batch_number, 1])
        # K distinct negatives, uniform over the catalogue less the held-out items, never PAD. A
        # user's own items are masked per row in the loss, not here: excluding the union of a
        # batch's items would starve small catalogues and under-sample popular items.
        k = min(max(self.num_negatives, 0), len(self.negative_pool))
        negatives = np.sort(rng.choice(self.negative_pool, size=k, replace=False))
        times = None
        if self.train_times is not None:
            rows = [self.train_times[start:end] for _, start, end in spans]
            times = torch.from_numpy(left_pad(rows, self.max_history + 1, dtype=np.float64))
        return self.collate(items, negatives, times)

    def collate(self, items: np.ndarray, negatives: np.ndarray, times: Tensor | None = None) -> TrainBatch:
        """A batch of these windows (B, L+1) and negatives (K,) ids, with its items' text."""
        batch_items = np.union1d(items[items != PAD_ID], negatives)
        item_index = np.searchsorted(batch_items, items).clip(max=len(batch_items) - 1)
        item_index[items == PAD_ID] = 0
        text = None
        if self.item_tokens is not None:
            text = pack_items(self.item_tokens, batch_items, appended_tokens=self.appended_tokens)
        return TrainBatch(
            items=torch.from_numpy(items),
            mask=torch.from_numpy(items[:, :-1] != PAD_ID),
            negatives=torch.from_numpy(negatives),
            batch_items=torch.from_numpy(batch_items),
            item_index=torch.from_numpy(item_index),
            negative_index=torch.from_numpy(np.searchsorted(batch_items, negatives)),
            text=text,
            times=times,
        )


def eval_batches(data: SequenceData, split: Literal["valid", "test"], *, batch_size: int, max_history: int):
    """Yield EvalBatch chunks over the users with a target in `split`: history = everything before it.

    Users come shortest history first, so each chunk holds like lengths and pads little.
    """
    target_pos = data.target_positions(split)
    scored = np.flatnonzero(target_pos >= 0)
    by_length = scored[np.argsort(target_pos[scored] - data.offsets[scored], kind="stable")]  # (U',)
    for first in range(0, len(by_length), batch_size):
        users = by_length[first : first + batch_size]
        seen = [data.items[data.offsets[u] : target_pos[u]] for u in users]
        width = max(len(s) for s in seen)
        times = None
        if data.timestamps is not None:
            rows = [data.timestamps[data.offsets[u] : target_pos[u]] for u in users]
            times = torch.from_numpy(left_pad(rows, max_history, dtype=np.float64))
        yield EvalBatch(
            users=torch.from_numpy(users),
            history=torch.from_numpy(left_pad(seen, max_history)),
            targets=torch.from_numpy(data.items[target_pos[users]]),
            seen=torch.from_numpy(left_pad(seen, width)),
            times=times,
        )


def training_items(data: SequenceData) -> np.ndarray:
    """Every item occurrence in the training sequences of the protocol's split."""
    return data.items[data.holdout.trained]
