"""One training epoch: batches built ahead, forward/backward with accumulation and clipping, the
optimizer step, logging, and the guard rails that warn when training silently fails. `TrainState`
is where training stands; `hllm.train` runs the epochs, validates and checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hllm.config import RunConfig
from hllm.errors import UserError

COLLAPSE_COSINE = 0.95
LOSS_WINDOW = 20  # steps averaged by the stalled-loss guard


class Batches(Protocol):
    """An epoch of whole batches; batch `index` depends only on (seed, epoch, index), so a resumed
    epoch and any number of loader workers see the same batches."""

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so `--resume` continues exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps
    best: float = -math.inf  # best validation score, signed so that higher is better
    best_epoch: int = -1
    bad_epochs: int = 0
    valid_history: list[dict] = field(default_factory=list)


def reached_max_steps(config: RunConfig, state: TrainState) -> bool:
    return 0 < config.train.max_steps <= state.step


def batch_loader(batches: Batches, *, start: int, workers: int) -> DataLoader:
    """Batches `start`.. of the epoch; with `workers`, built ahead in other processes so the model
    never waits for them (each batch depends only on seed, epoch and number, so order and
    content do not change with the worker count)."""
    return DataLoader(
        batches,  # type: ignore[arg-type]  # map-style: __len__ and __getitem__
        batch_size=None,  # items are whole batches already
        sampler=range(start, len(batches)),
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )


def train_epoch(
    fabric: L.Fabric,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batches: Batches,
    *,
    config: RunConfig,
    state: TrainState,
    save_last: Callable[[], None],
    guard: GuardRails,
) -> None:
    """Run the rest of the current epoch (from `state.batch`), one optimizer step per `accumulate`;
    `save_last` writes last.ckpt every train.checkpoint_every steps."""
    accumulate = config.train.accumulate
    bar = tqdm(
        range(state.batch, len(batches)),
        desc=f"epoch {state.epoch + 1}",
        disable=fabric.global_rank != 0,
        dynamic_ncols=True,
        leave=False,
    )
    window_start, window_items, waited = time.perf_counter(), 0, 0.0
    model.train()
    loader = iter(batch_loader(batches, start=state.batch, workers=config.train.num_workers))
    for index in bar:
        asked = time.perf_counter()
        batch = next(loader).to(fabric.device)
        waited += time.perf_counter() - asked
        stepping = (index + 1) % accumulate == 0 or index + 1 == len(batches)
        with fabric.no_backward_sync(model, enabled=not stepping):
            # On one device Fabric calls training_loss directly, outside the precision context its
            # forward applies: without fabric.autocast, bf16-mixed would silently train in fp32.
            with fabric.autocast():
                loss = model.training_loss(batch)
            if not torch.isfinite(loss):
                raise UserError(
                    f"loss is {loss.item()} at step {state.step}; lower train.lr or use precision 32-true",
                    where=f"epoch {state.epoch + 1}",
                )
            fabric.backward(loss / accumulate)
        window_items += int(batch.mask.sum())
        state.batch = index + 1
        if not stepping:
            continue
        if config.train.grad_clip > 0:
            fabric.clip_gradients(model, optimizer, max_norm=config.train.grad_clip, error_if_nonfinite=False)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        stats = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], **model.module.last_stats}
        guard.check(stats)
        if state.step % config.train.log_every == 0:
            seconds = max(time.perf_counter() - window_start, 1e-9)
            stats["items_per_s"] = window_items / seconds
            stats["data_wait"] = waited / seconds  # share of the time spent waiting for batches
            fabric.log_dict({f"train/{k}": v for k, v in stats.items()}, step=state.step)
            window_start, window_items, waited = time.perf_counter(), 0, 0.0
            bar.set_postfix(
                loss=f"{stats['loss']:.3f}",
                lr=f"{stats['lr']:.1e}",
                items_s=f"{stats['items_per_s']:.0f}",
                acc=f"{stats.get('accuracy', 0):.2f}",
            )
        if config.train.checkpoint_every and state.step % config.train.checkpoint_every == 0:
            save_last()
        if reached_max_steps(config, state):
            break
    bar.close()
    guard.end_epoch()


class GuardRails:
    """Loud warnings the reference lacked: collapsed item embeddings and a loss that stopped moving."""

    def __init__(self, fabric: L.Fabric) -> None:
        self.fabric = fabric
        self.losses: list[float] = []
        self.warned_collapse = False
        self.start_cosine = 0.0

    def check(self, stats: dict) -> None:
        self.losses.append(stats["loss"])
        cosine = stats.get("item_cosine", 0.0)
        if len(self.losses) == 1:
            self.start_cosine = cosine
            if cosine > COLLAPSE_COSINE:  # before any update: how the item side starts, not training
                self.fabric.print(
                    f"note: item embeddings start nearly parallel (mean pairwise cosine {cosine:.3f}"
                    f" > {COLLAPSE_COSINE}): the Item LLM's outputs share one dominant direction,"
                    " which training must spread (watch item_cosine in the log)"
                )
            return
        if cosine > max(COLLAPSE_COSINE, self.start_cosine) and not self.warned_collapse:
            self.warned_collapse = True
            self.fabric.print(
                f"WARNING: item embeddings are collapsing (mean pairwise cosine "
                f"{cosine:.3f} > {COLLAPSE_COSINE}); lower train.lr or check the text"
            )

    def end_epoch(self) -> None:
        """Warn when the loss of the last steps is no lower than at the start of the run: a
        silent failure to learn (e.g. the loss stuck at log(1 + negatives))."""
        if len(self.losses) >= 2 * LOSS_WINDOW:
            start = sum(self.losses[:LOSS_WINDOW]) / LOSS_WINDOW
            now = sum(self.losses[-LOSS_WINDOW:]) / LOSS_WINDOW
            if now > 0.99 * start:
                self.fabric.print(
                    f"WARNING: the loss has not moved since the start ({start:.4f} "
                    f"-> {now:.4f}); check train.lr, the data and the item text"
                )
