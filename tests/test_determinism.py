"""Same seed, same weights: two runs of one config, on two threads, end bit for bit equal."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch

from hllm.checkpoints import read_checkpoint
from hllm.config import load_config
from hllm.runs import checkpoint_path
from hllm.train import fit
from tests.support import CYCLE_ITEMS, CYCLE_TITLES, tiny_overrides

THREADS = 2  # torch's CPU kernels split work across threads only when there are several
USERS, STEPS, HISTORY = 64, 36, 31


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_long_cycles(folder: Path) -> Path:
    """Users walking the 12-item cycle for 36 steps: long histories over a tiny catalogue."""
    rows = [
        (f"u{user}", f"i{(user + step) % CYCLE_ITEMS}", step)
        for user in range(USERS)
        for step in range(STEPS)
    ]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(folder / "cycle.csv", index=False)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(CYCLE_ITEMS)], "title": CYCLE_TITLES})
    items.to_csv(folder / "cycle_items.csv", index=False)
    return folder


def test_two_runs_with_one_seed_train_the_same_weights(tmp_path):
    """The demo's HLLM path (frozen item side, MLP adaptor, catalogue softmax). The gradient of a
    step's item-embedding lookup (64 x 32 positions x 64 wide) is large enough for two threads
    to accumulate it, and each of the 12 items is read ~170 times: unless train.deterministic
    holds, the threads add in whatever order they finish and the weights part from the first step."""
    data = write_long_cycles(tmp_path)
    extra = {
        "data__max_history": HISTORY,
        "model__item__mode": "frozen",
        "model__user__backbone": "small-llama-64",
        "train__negatives": "catalogue",
        "train__batch_size": USERS,
        "train__epochs": 1,
        "train__deterministic": "true",
    }
    weights = []
    with torch_threads(THREADS):
        for name in ("first", "second"):
            config = load_config(None, tiny_overrides(data, tmp_path, name=name, **extra))
            assert fit(config)["train"]["steps"] == 2
            weights.append(read_checkpoint(checkpoint_path(tmp_path / name, "last"))["model"])
    first, second = weights
    assert first.keys() == second.keys()
    assert [key for key in first if not torch.equal(first[key], second[key])] == []
