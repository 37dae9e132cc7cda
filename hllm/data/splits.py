"""Evaluation protocols: which interactions a model trains on and which are scored.

Every protocol is a `Holdout` over the full chronological sequences, which stay whole: validation and
test histories are everything the user did before the target, new items included, and every model
ranks the whole catalogue. Only the training sequences shrink.

- leave-one-out: each user's second-to-last item is the validation target, the last the test target;
  training is everything before them.
- new items (`cold_items` = F > 0, combinable with either split): a seeded uniform draw of
  round(F x catalogue) items whose every interaction is removed from the training sequences (as input
  and as target; the sequences close up around them); their interactions stay in validation and test
  histories, and they can be targets.
- temporal: a global time cut at the `cut` quantile of all interaction times; training is every
  interaction strictly before it. A user's validation target is their first interaction at or after the
  cut and the test target the next one, each scored only when something precedes it. Items first seen
  after the cut are new by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from hllm.errors import UserError

SplitKind = Literal["leave-one-out", "temporal"]


@dataclass(frozen=True)
class Holdout:
    """The training part and the validation/test targets of one protocol."""

    trained: np.ndarray  # (nnz,) bool: the interaction is in the training sequences
    targets: dict[str, np.ndarray]  # train/valid/test -> (U,) position of the user's target; -1 = none
    held_out: np.ndarray  # sorted item ids no training interaction may contain (new items)
    description: dict  # what the protocol card says about the split

    @property
    def train_positions(self) -> np.ndarray:
        """(T,) positions of the trained interactions, user by user, oldest first."""
        return np.flatnonzero(self.trained)

    def train_offsets(self, offsets: np.ndarray) -> np.ndarray:
        """(U+1,) user u's training sequence is `train_positions[out[u]:out[u+1]]`."""
        user_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        counts = np.bincount(user_of[self.trained], minlength=len(offsets) - 1)
        return np.concatenate([[0], np.cumsum(counts)])


def make_holdout(
    offsets: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray | None,
    *,
    split: SplitKind = "leave-one-out",
    cut: float = 0.9,
    cold_items: float = 0.0,
    cold_seed: int = 0,
) -> Holdout:
    """The protocol these settings describe (see the module docstring); `items` hold ids 1..N-1."""
    if split == "temporal":
        trained, targets, description = _temporal(offsets, timestamps, cut)
        held_out = np.setdiff1d(np.unique(items), items[trained])  # first seen after the cut
    else:
        trained, targets, description = _leave_one_out(offsets)
        held_out = np.zeros(0, dtype=np.int64)
    if cold_items > 0:
        catalogue = np.unique(items)
        rng = np.random.default_rng(cold_seed)
        chosen = np.sort(rng.choice(catalogue, size=round(cold_items * len(catalogue)), replace=False))
        trained = trained & ~np.isin(items, chosen)
        held_out = np.union1d(held_out, chosen)
        description["new_items"] = (
            f"{len(chosen)} items ({cold_items:g} of the catalogue, uniform draw with data.cold_seed="
            f"{cold_seed}) never trained on, as input or target: their interactions are removed from "
            "the training sequences and kept in validation/test histories and targets"
        )
    description |= {"held_out_items": len(held_out), "trained_interactions": int(trained.sum())}
    targets["train"] = _first_or_last(offsets, np.flatnonzero(trained), last=True)
    return Holdout(trained, targets, held_out, description)


def _first_or_last(offsets: np.ndarray, positions: np.ndarray, *, last: bool) -> np.ndarray:
    """(U,) each user's first (or last) position among `positions` (sorted), -1 where none."""
    users = np.searchsorted(offsets, positions, side="right") - 1
    starts = np.searchsorted(users, np.arange(len(offsets) - 1), side="right" if last else "left")
    found = np.full(len(offsets) - 1, -1, dtype=np.int64)
    index = starts - 1 if last else starts
    has = np.bincount(users, minlength=len(offsets) - 1) > 0
    found[has] = positions[index[has]]
    return found


def _leave_one_out(offsets: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    user_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    trained = np.arange(offsets[-1]) < offsets[1:][user_of] - 2
    targets = {"valid": offsets[1:] - 2, "test": offsets[1:] - 1}
    description = {"split": "leave-one-out: validation = each user's second-to-last item, test = the last"}
    return trained, targets, description


def _temporal(
    offsets: np.ndarray, timestamps: np.ndarray | None, cut: float
) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    if timestamps is None:
        raise UserError("split=temporal needs interaction timestamps; this data has none", where="data.split")
    cut_time = float(np.quantile(timestamps, cut, method="lower"))
    trained = timestamps < cut_time
    first_after = _first_or_last(offsets, np.flatnonzero(~trained), last=False)
    valid = np.where(first_after > offsets[:-1], first_after, -1)
    second = first_after + 1
    test = np.where((first_after >= 0) & (second < offsets[1:]), second, -1)
    description = {
        "split": (
            f"temporal: global cut at the {cut:g} quantile of interaction times (t = {cut_time:.0f}); "
            "training = every interaction before t; validation = each user's first interaction at or "
            "after t, test = the next one, each scored when the user has an earlier interaction"
        ),
        "cut_time": cut_time,
    }
    return trained, {"valid": valid, "test": test}, description
