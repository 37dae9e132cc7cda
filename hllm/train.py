"""The one training setup for every model (HLLM, SASRec, HSTU, CreativeLLM): Fabric, data and model
built under rank_zero_first, AdamW + cosine warm-up, clipping, accumulation, atomic checkpoints,
exact resume, validation with early stopping, teardown. A kind of run brings only its `Job`: `fit`
here for the recommenders, `fit_creator` in creator/model/training.py.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.torch_version import TorchVersion

from hllm.checkpoints import checkpoint_fields, load_weights, read_checkpoint, resume_state, save_checkpoint
from hllm.config import RunConfig, absolute_paths, config_to_dict, dump_config
from hllm.data.batches import TrainBatches
from hllm.data.dataset import prepare_dataset
from hllm.epoch import Batches, GuardRails, TrainState, reached_max_steps, train_epoch
from hllm.errors import UserError
from hllm.evaluate import evaluate_split, protocol_card
from hllm.files import write_json, write_text
from hllm.last_item_text import choose_last_item_text, chosen_config
from hllm.models.build import build_model, cache_frozen_items
from hllm.runs import checkpoint_path, config_hash, run_folder
from hllm.training_log import make_logger

NO_DECAY = ("bias", "norm", "embed", "item_token", "logit_scale")
ITEM_LLM = "item_encoder."  # parameter-name prefix of the Item LLM
Gather = Callable[[Tensor], Tensor]


class Trainable(Protocol):
    """What the loop asks of a model: a loss per batch and the scalars it wants logged beside it.

    `share_negatives` hands the model the all-gathers that build one negative bank over every
    process (embeddings with their gradient, then their ids); until called, a model keeps the
    identity, so its losses never import Fabric. A model whose negatives stay per process ignores it.
    """

    last_stats: dict[str, float]

    def training_loss(self, batch: Any) -> Tensor: ...

    def share_negatives(self, gather: Gather, gather_ids: Gather) -> None: ...


@dataclass
class Job:
    """What one kind of run brings to `run_training`, built by its `prepare(fabric)`.

    `validate(model)` returns the epoch's validation metrics, {} when there is nothing to validate
    on; `metric` names the one that selects checkpoints and drives early stopping (see
    `record_validation`). `finish(model, state, seconds)` returns what metrics.json holds.
    """

    model: nn.Module  # a Trainable
    batches: Batches
    files: dict[str, str]  # written into the run folder by rank 0 before training: config.yaml, ...
    validate: Callable[[nn.Module], dict]
    finish: Callable[[nn.Module, TrainState, float], dict]
    metric: str
    maximise: bool = True
    ready: Callable[[nn.Module], None] = lambda model: None  # caches, once the model is on its device
    rates: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> its learning rate


def param_groups(model: nn.Module, weight_decay: float, rates: dict[str, float] | None = None) -> list[dict]:
    """No weight decay on norms, biases, embeddings and the temperature (the reference decayed all);
    a parameter inside a module path of `rates` (at any depth) trains at its learning rate: the Item
    LLM at `train.item_lr`, the Creative LLM at `creator.train.lm_lr`."""
    rates = rates or {}
    groups: dict[tuple[bool, str], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            skip = param.ndim < 2 or any(key in name.lower() for key in NO_DECAY)
            prefix = next((p for p in rates if name.startswith(p) or f".{p}" in name), "")
            groups.setdefault((skip, prefix), []).append(param)
    return [
        {"params": params, "weight_decay": 0.0 if skip else weight_decay}
        | ({"lr": rates[prefix]} if prefix else {})
        for (skip, prefix), params in sorted(groups.items())
    ]


def make_optimizer(
    model: nn.Module, config: RunConfig, rates: dict[str, float] | None = None
) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused into one kernel per step where torch has it (CPU from 2.4):
    5% of a MiniLM fine-tuning step on 2 CPU cores, measured by `hllm bench speed`'s profile."""
    fused = TorchVersion(torch.__version__) >= "2.4"
    item = {ITEM_LLM: config.train.item_lr} if config.train.item_lr is not None else {}
    groups = param_groups(model, config.train.weight_decay, item | (rates or {}))
    return torch.optim.AdamW(groups, lr=config.train.lr, fused=fused)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total: int, warmup: float) -> LambdaLR:
    warm = int(total * warmup)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def training_schedule(optimizer: torch.optim.Optimizer, config: RunConfig, num_batches: int) -> LambdaLR:
    """Cosine with warm-up over every optimizer step the run will take (train.max_steps caps it)."""
    total = math.ceil(num_batches / config.train.accumulate) * config.train.epochs
    if config.train.max_steps > 0:
        total = min(total, config.train.max_steps)
    return cosine_with_warmup(optimizer, total, config.train.warmup)


def last_checkpoint(folder: Path, *, resume: bool) -> Path:
    """The run's last.ckpt, which `run_epochs` writes; a fresh run (no `resume`) may not start
    over one."""
    last = checkpoint_path(folder, "last")
    if not resume and last.exists():
        raise UserError(
            "run folder already has checkpoints; pass --resume or another name=", where=str(folder)
        )
    return last


def use_deterministic_kernels(enabled: bool) -> None:
    """With `enabled`, one seed trains the same weights on one machine and thread count. Without,
    torch's CPU threads accumulate the gradient of an indexed table (`table[index]`, whose backward
    is index_put with accumulate) in whatever order they finish, and runs drift apart from the
    first step. An op with no deterministic kernel warns (naming itself) rather than stopping a
    run; cuBLAS needs a fixed workspace, read when its first handle is made."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)


def launch_fabric(where: str, **settings: Any) -> L.Fabric:
    """`L.Fabric(**settings)`, launched; Fabric's own errors (a missing accelerator, an unknown
    strategy) become one line naming the config keys `where`."""
    try:
        fabric = L.Fabric(**settings)
    except (ValueError, ImportError, RuntimeError) as err:  # Fabric's own wording names the fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(first, where=where) from None
    fabric.launch()
    return fabric


def make_fabric(config: RunConfig, folder: Path) -> L.Fabric:
    """The training run's Fabric, logging to `folder` as train.logger says; a resumed run (one with
    a last.ckpt, see `last_checkpoint`) continues the log from that checkpoint's step."""
    return launch_fabric(
        "train.accelerator/devices/num_nodes/strategy/precision",
        accelerator=config.train.accelerator,
        devices=config.train.devices,
        num_nodes=config.train.num_nodes,
        strategy=config.train.strategy,
        precision=config.train.precision,
        loggers=[make_logger(config.train.logger, folder, checkpoint_path(folder, "last"))],
    )


def run_training(config: RunConfig, prepare: Callable[[L.Fabric], Job], *, resume: bool = False) -> dict:
    """Train the model `prepare` builds, select on its validation, write metrics.json with what
    the job's `finish` returns, and return that."""
    folder = run_folder(config)
    last = last_checkpoint(folder, resume=resume)
    fabric = make_fabric(config, folder)
    fabric.seed_everything(config.train.seed)
    use_deterministic_kernels(config.train.deterministic)
    with fabric.rank_zero_first():  # rank 0 fills the data and weights caches; the others read them
        job = prepare(fabric)
    if fabric.global_rank == 0:
        for name, text in job.files.items():
            write_text(folder / name, text)
    share_negatives(job.model, fabric)
    optimizer = make_optimizer(job.model, config, job.rates)
    scheduler = training_schedule(optimizer, config, len(job.batches))
    model, optimizer = fabric.setup(job.model, optimizer)
    # Route training_loss through the wrapper's forward so DDP/FSDP hooks (gradient sync) run.
    model.mark_forward_method("training_loss")
    job.ready(model.module)
    state = resume_state(fabric, last, model, optimizer, scheduler)
    started = time.perf_counter()
    run_epochs(fabric, model, optimizer, scheduler, job, config=config, state=state)
    result = job.finish(model.module, state, time.perf_counter() - started)
    if fabric.global_rank == 0:
        write_json(folder / "metrics.json", result)
    fabric.logger.finalize("success")
    if fabric.world_size > 1:
        # Leave together: a rank exiting while gloo's threads still run aborts ("terminate called").
        fabric.barrier()
        torch.distributed.destroy_process_group()
    return result


def share_negatives(model: Trainable, fabric: L.Fabric) -> None:
    """With several processes, every rank scores its positions against the negatives of all ranks:
    embeddings are all-gathered with their gradient, ids without."""
    if fabric.world_size > 1:
        model.share_negatives(
            lambda x: fabric.all_gather(x, sync_grads=True).reshape(-1, x.shape[-1]),
            lambda x: fabric.all_gather(x).reshape(-1),
        )


def run_epochs(
    fabric: L.Fabric, model, optimizer, scheduler, job: Job, *, config: RunConfig, state: TrainState
) -> None:
    """Epochs from `state` until train.epochs, train.max_steps or early stopping (train.patience
    epochs in a row that `record_validation` did not call improved); last.ckpt after each epoch,
    best.ckpt on gains. A checkpoint holds what `resume_state` reloads, plus the config."""
    folder = run_folder(config)
    last, best = checkpoint_path(folder, "last"), checkpoint_path(folder, "best")
    keep, fields = checkpoint_fields(model.module)

    def snapshot(path: Path) -> None:
        save_checkpoint(
            fabric,
            path,
            {
                "model": model,
                "optimizer": optimizer,
                "scheduler": scheduler.state_dict(),
                "train_state": asdict(state),
                "rng": torch.get_rng_state(),
                "config": config_to_dict(config),
            }
            | fields,
            keep=keep,
        )

    guard = GuardRails(fabric)
    batches = job.batches
    while state.epoch < config.train.epochs and not reached_max_steps(config, state):
        batches.set_epoch(state.epoch)
        train_epoch(
            fabric,
            model,
            optimizer,
            scheduler,
            batches,
            config=config,
            state=state,
            save_last=lambda: snapshot(last),
            guard=guard,
        )
        if state.batch < len(batches):  # stopped by max_steps inside the epoch
            snapshot(last)
            break
        metrics = job.validate(model.module)
        state.epoch, state.batch = state.epoch + 1, 0
        improved = record_validation(fabric, state, metrics, job.metric, maximise=job.maximise)
        snapshot(last)
        if improved:
            snapshot(best)
        if state.bad_epochs >= config.train.patience:
            fabric.print(f"early stopping: no gain in valid {job.metric} for {state.bad_epochs} epochs")
            break
    if not best.exists():  # no full epoch yet: the current weights are the best we have
        snapshot(best)


def record_validation(
    fabric: L.Fabric, state: TrainState, metrics: dict, metric: str, *, maximise: bool = True
) -> bool:
    """Log the epoch's validation metrics and update the early-stopping state; True if improved.

    Improved means strictly better than the best so far: a tie is no gain, so the earlier (shorter
    trained) checkpoint stays the best and the epoch counts towards train.patience. With `maximise`
    False (a loss), lower is better. Without validation data (`metrics` is {}) there is nothing to
    select on: the latest weights count as the best and early stopping never triggers.
    """
    state.valid_history.append({"epoch": state.epoch, **metrics})
    if not metrics:
        state.best_epoch, state.bad_epochs = state.epoch, 0
        fabric.print(f"epoch {state.epoch}: nothing to validate on; keeping the latest weights")
        return True
    if metric not in metrics:
        raise UserError(f"validation reports no {metric!r}, only {', '.join(metrics)}", where="eval.metric")
    fabric.log_dict({f"valid/{k}": v for k, v in metrics.items()}, step=state.step)
    score = metrics[metric] if maximise else -metrics[metric]
    improved = score > state.best
    if improved:
        state.best, state.best_epoch, state.bad_epochs = score, state.epoch, 0
    else:
        state.bad_epochs += 1
    fabric.print(
        f"epoch {state.epoch}: valid {metric} = {metrics[metric]:.4f}{' (best)' if improved else ''}"
    )
    return improved


def fit(config: RunConfig, *, resume: bool = False) -> dict:
    """Train a recommender, select on validation, test the best checkpoint once; return the
    metrics written."""
    config = absolute_paths(config)  # config.yaml then works from any directory

    def prepare(fabric: L.Fabric) -> Job:
        data = prepare_dataset(config.data)
        model, item_tokens = build_model(config, data)
        batches = make_batches(
            config, data, model, item_tokens, rank=fabric.global_rank, world_size=fabric.world_size
        )

        def finish(model: nn.Module, state: TrainState, seconds: float) -> dict:
            """Reload the best checkpoint, choose the last-item text weight if asked, score valid
            and test once."""
            best = checkpoint_path(run_folder(config), "best")
            load_weights(model, read_checkpoint(best), str(best))
            summary = train_summary(model, state, seconds)
            if config.model.last_item_text_choices:
                summary["last_item_text"] = choose_last_item_text(
                    model, config, lambda: evaluate(model, "valid")
                )
                if fabric.global_rank == 0:
                    write_text(run_folder(config) / "config.yaml", dump_config(chosen_config(config, model)))
            result = {split: evaluate(model, split) for split in ("valid", "test")}
            card = protocol_card(data, "test", model=config.model.kind, config_hash=config_hash(config))
            return result | {"protocol": card, "train": summary}

        def evaluate(model: nn.Module, split: str) -> dict:
            return evaluate_split(config, model, data, item_tokens, split, device=fabric.device)

        return Job(
            model,
            batches,
            files={"config.yaml": dump_config(config)},
            validate=lambda model: evaluate(model, "valid"),
            finish=finish,
            metric=config.eval.metric,
            ready=lambda model: cache_frozen_items(
                model,
                item_tokens,
                batch_size=config.eval.item_batch_size,
                device=fabric.device,
                store=Path(config.data.cache_dir),
            ),
        )

    return run_training(config, prepare, resume=resume)


def train_summary(model: nn.Module, state: TrainState, seconds: float) -> dict:
    return {
        "seconds": round(seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": state.step,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "valid_history": state.valid_history,
    }


def make_batches(
    config: RunConfig, data, model, item_tokens, *, rank: int = 0, world_size: int = 1
) -> TrainBatches:
    """This process's share of the training batches, with text only when the model reads it."""
    return TrainBatches(
        data,
        max_history=config.data.max_history,
        batch_size=config.train.batch_size,
        num_negatives=0 if config.train.negatives == "catalogue" else config.train.num_negatives,
        seed=config.train.seed,
        item_tokens=item_tokens if model.needs_text else None,
        appended_tokens=model.appended_tokens,
        rank=rank,
        world_size=world_size,
    )
