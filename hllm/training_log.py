"""The training log of a run folder (`logs/metrics.csv` or TensorBoard event files), which a
resumed run continues from the step of the checkpoint it resumes from.

Rows logged after that checkpoint and before a crash are dropped: the resumed run trains and
logs those steps again, so each step appears once.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.loggers import CSVLogger, Logger
from lightning.fabric.loggers.logger import rank_zero_experiment

from hllm.errors import UserError


def make_logger(kind: str, folder: Path, checkpoint: Path) -> Logger:
    """`folder`/logs/metrics.csv, or TensorBoard event files in `folder`/tensorboard; both continue
    from the step of `checkpoint` (the run's last.ckpt) when it exists, else start over."""
    step = checkpoint_step(checkpoint)
    if kind == "csv":
        return ContinuedCSVLogger(folder, keep_until=step)
    from lightning.fabric.loggers import TensorBoardLogger

    try:  # TensorBoard hides the earlier events from purge_step on; it never deletes files
        return TensorBoardLogger(folder, name="tensorboard", version="", purge_step=step + 1)
    except ModuleNotFoundError:
        raise UserError("TensorBoard logs need `pip install tensorboard`", where="train.logger") from None


def checkpoint_step(path: Path) -> int:
    """The optimizer step a run resumes from at `path`, 0 without one. Memory-mapped: the weights
    are not read."""
    if not path.is_file():
        return 0
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)["train_state"]["step"]


class ContinuedCSVLogger(CSVLogger):
    """Lightning's CSVLogger, keeping the rows of an existing metrics.csv up to step `keep_until`.

    Lightning's writer deletes an existing metrics.csv when it starts and has no option to keep it
    (lightning 2.6); this logger reads the rows first and hands them back to the writer. Each row
    is written as it is logged (Lightning's default: every 100 steps), so a crash loses none.
    """

    def __init__(self, folder: Path, *, keep_until: int) -> None:
        super().__init__(folder, name="logs", version="", flush_logs_every_n_steps=1)
        self.keep_until = keep_until

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            path = Path(self.log_dir) / "metrics.csv"
            earlier = logged_rows(path, until=self.keep_until)
            path.unlink(missing_ok=True)  # ours to rewrite: spares Lightning's "will be deleted" warning
            writer = super().experiment
            for step, values in earlier:
                writer.log_metrics(values, step)
            writer.save()
        return self._experiment


def logged_rows(path: Path, *, until: int) -> list[tuple[int, dict[str, str]]]:
    """(step, the row's values as written) of each row of metrics.csv `path` up to step `until`;
    [] when there is no file. A row cut short by a crash keeps the values it has."""
    if not path.is_file():
        return []
    kept = []
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            step = row.pop("step", None) or ""
            if step.isdigit() and int(step) <= until:
                kept.append((int(step), {key: value for key, value in row.items() if key and value}))
    return kept
