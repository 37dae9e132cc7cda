"""One Fabric training loop for every model exposing `training_loss(batch) -> Tensor`:
AdamW + cosine warm-up, clipping, accumulation, atomic checkpoints, exact resume, early stopping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers import CSVLogger
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.torch_version import TorchVersion
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hllm.config import RunConfig, config_to_dict, dump_config
from hllm.data.batches import TrainBatches
from hllm.data.dataset import prepare_dataset
from hllm.errors import UserError
from hllm.evaluate import evaluate_split, protocol_card
from hllm.files import write_json, write_text
from hllm.models.build import build_model, cache_frozen_items
from hllm.runs import checkpoint_path, config_hash, read_checkpoint, run_folder

NO_DECAY = ("bias", "norm", "embed", "item_token", "logit_scale")
ITEM_LLM = "item_encoder."  # parameter-name prefix of the Item LLM
COLLAPSE_COSINE = 0.95
LOSS_WINDOW = 20  # steps averaged by the stalled-loss guard


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so `--resume` continues exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    valid_history: list[dict] = field(default_factory=list)


def param_groups(model: nn.Module, weight_decay: float, item_lr: float | None = None) -> list[dict]:
    """No weight decay on norms, biases, embeddings and the temperature (the reference decayed all);
    the Item LLM's weights at `item_lr` when one is given."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            skip = param.ndim < 2 or any(key in name.lower() for key in NO_DECAY)
            is_item = item_lr is not None and ITEM_LLM in name
            groups.setdefault((skip, is_item), []).append(param)
    return [
        {"params": params, "weight_decay": 0.0 if skip else weight_decay, "lr": item_lr}
        if is_item
        else {"params": params, "weight_decay": 0.0 if skip else weight_decay}
        for (skip, is_item), params in sorted(groups.items())
    ]


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused into one kernel per step where torch has it (CPU from 2.4):
    5% of a MiniLM fine-tuning step on 2 CPU cores, measured by `hllm bench speed`'s profile."""
    fused = TorchVersion(torch.__version__) >= "2.4"
    groups = param_groups(model, config.train.weight_decay, config.train.item_lr)
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


def resume_state(fabric: L.Fabric, path: Path, model, optimizer, scheduler) -> TrainState:
    """Where training stands: the start when `path` (see `last_checkpoint`) does not exist, else
    the model, optimizer, scheduler and RNG loaded from that `run_epochs` checkpoint."""
    if not path.exists():
        return TrainState()
    extra = fabric.load(path, {"model": model, "optimizer": optimizer})
    scheduler.load_state_dict(extra["scheduler"])
    state = TrainState(**extra["train_state"])
    torch.set_rng_state(extra["rng"])
    fabric.print(f"resumed from {path} at epoch {state.epoch}, step {state.step}")
    return state


def save_checkpoint(fabric: L.Fabric, path: Path, state: dict) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    fabric.save(tmp, state)
    fabric.barrier()
    if fabric.global_rank == 0:
        tmp.replace(path)
    fabric.barrier()  # no rank reads the path before it is renamed


def make_fabric(config: RunConfig, folder: Path) -> L.Fabric:
    loggers = [CSVLogger(folder, name="logs", version="")]
    if config.train.tensorboard:
        from lightning.fabric.loggers import TensorBoardLogger

        try:
            loggers.append(TensorBoardLogger(folder, name="tensorboard", version=""))
        except ModuleNotFoundError:
            raise UserError(
                "TensorBoard logs need `pip install tensorboard`", where="train.tensorboard"
            ) from None
    try:
        fabric = L.Fabric(
            accelerator=config.train.accelerator,
            devices=config.train.devices,
            num_nodes=config.train.num_nodes,
            strategy=config.train.strategy,
            precision=config.train.precision,
            loggers=loggers,
        )
    except (ValueError, ImportError, RuntimeError) as err:  # Fabric's own wording names the fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(first, where="train.accelerator/devices/num_nodes/strategy/precision") from None
    fabric.launch()
    return fabric


def fit(config: RunConfig, *, resume: bool = False) -> dict:
    """Train, select on validation, test the best checkpoint once; return the metrics written."""
    folder = run_folder(config)
    last = last_checkpoint(folder, resume=resume)
    fabric = make_fabric(config, folder)
    fabric.seed_everything(config.train.seed)
    with fabric.rank_zero_first():  # rank 0 fills the data and weights caches; the others read them
        data = prepare_dataset(config.data)
        model, tokens = build_model(config, data)
    if fabric.global_rank == 0:
        write_text(folder / "config.yaml", dump_config(config))
    share_negatives(model, fabric)
    optimizer = make_optimizer(model, config)
    batches = make_batches(config, data, model, tokens, rank=fabric.global_rank, world_size=fabric.world_size)
    scheduler = training_schedule(optimizer, config, len(batches))
    model, optimizer = fabric.setup(model, optimizer)
    # Route training_loss through the wrapper's forward so DDP/FSDP hooks (gradient sync) run.
    model.mark_forward_method("training_loss")
    cache_frozen_items(model.module, tokens, batch_size=config.eval.item_batch_size, device=fabric.device)
    state = resume_state(fabric, last, model, optimizer, scheduler)

    def validate() -> dict:
        return evaluate_split(config, model.module, data, tokens, "valid", device=fabric.device)

    started = time.perf_counter()
    run_epochs(
        fabric,
        model,
        optimizer,
        scheduler,
        batches,
        config=config,
        state=state,
        validate=validate,
        record=lambda metrics: record_validation(fabric, config, state, metrics),
    )
    result = finish(fabric, config, folder, model, data, tokens, state, time.perf_counter() - started)
    if fabric.world_size > 1:
        # Leave together: a rank exiting while gloo's threads still run aborts ("terminate called").
        fabric.barrier()
        torch.distributed.destroy_process_group()
    return result


def run_epochs(
    fabric: L.Fabric,
    model,
    optimizer,
    scheduler,
    batches,
    *,
    config: RunConfig,
    state: TrainState,
    validate: Callable[[], dict],
    record: Callable[[dict], bool],
) -> None:
    """Epochs from `state` until train.epochs, train.max_steps or early stopping (train.patience
    epochs that `record` did not call improved); last.ckpt after each epoch, best.ckpt on gains.
    A checkpoint holds what `resume_state` reloads, plus the config."""
    folder = run_folder(config)
    last, best = checkpoint_path(folder, "last"), checkpoint_path(folder, "best")

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
            },
        )

    guard = GuardRails(fabric)
    while state.epoch < config.train.epochs and not _done(config, state):
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
        metrics = validate()
        state.epoch, state.batch = state.epoch + 1, 0
        improved = record(metrics)
        snapshot(last)
        if improved:
            snapshot(best)
        if state.bad_epochs >= config.train.patience:
            fabric.print(f"early stopping: no gain in {config.eval.metric} for {state.bad_epochs} epochs")
            break
    if not best.exists():  # no full epoch yet: the current weights are the best we have
        snapshot(best)


def make_batches(
    config: RunConfig, data, model, tokens, *, rank: int = 0, world_size: int = 1
) -> TrainBatches:
    """This process's share of the training batches, with text only when the model reads it."""
    return TrainBatches(
        data,
        max_history=config.data.max_history,
        batch_size=config.train.batch_size,
        num_negatives=0 if config.train.negatives == "catalogue" else config.train.num_negatives,
        seed=config.train.seed,
        item_tokens=tokens if model.needs_text else None,
        slots=model.item_slots,
        rank=rank,
        world_size=world_size,
    )


def batch_loader(batches: TrainBatches, *, start: int, workers: int) -> DataLoader:
    """Batches `start`.. of the epoch; with `workers`, built ahead in other processes so the model
    never waits for them (each batch depends only on seed, epoch and number, so order and
    content do not change with the worker count)."""
    return DataLoader(
        batches,
        batch_size=None,  # items are whole batches already
        sampler=range(start, len(batches)),
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )


def share_negatives(model: nn.Module, fabric: L.Fabric) -> None:
    """With several processes, every rank scores its positions against the negatives of all ranks:
    embeddings are all-gathered with their gradient, ids without."""
    if fabric.world_size > 1:
        model.gather = lambda x: fabric.all_gather(x, sync_grads=True).reshape(-1, x.shape[-1])
        model.gather_ids = lambda x: fabric.all_gather(x).reshape(-1)


def _done(config: RunConfig, state: TrainState) -> bool:
    return 0 < config.train.max_steps <= state.step


def train_epoch(fabric, model, optimizer, scheduler, batches, *, config, state, save_last, guard) -> None:
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
        if _done(config, state):
            break
    bar.close()
    guard.end_epoch()


class GuardRails:
    """Loud warnings the reference lacked: collapsed item embeddings and a loss that stopped moving."""

    def __init__(self, fabric: L.Fabric) -> None:
        self.fabric = fabric
        self.losses: list[float] = []
        self.warned_collapse = False

    def check(self, stats: dict) -> None:
        self.losses.append(stats["loss"])
        cosine = stats.get("item_cosine", 0.0)
        if cosine > COLLAPSE_COSINE and not self.warned_collapse:
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


def record_validation(fabric: L.Fabric, config: RunConfig, state: TrainState, metrics: dict) -> bool:
    """Log the epoch's validation metrics and update the early-stopping state; True if improved."""
    value = metrics[config.eval.metric]
    state.valid_history.append({"epoch": state.epoch, **metrics})
    fabric.log_dict({f"valid/{k}": v for k, v in metrics.items()}, step=state.step)
    improved = value > state.best
    if improved:
        state.best, state.best_epoch, state.bad_epochs = value, state.epoch, 0
    else:
        state.bad_epochs += 1
    fabric.print(
        f"epoch {state.epoch}: valid {config.eval.metric} = {value:.4f}"
        f"{' (best)' if improved else ''}  recall@10 = {metrics.get('recall@10', 0):.4f}"
    )
    return improved


def finish(fabric, config, folder, model, data, tokens, state, seconds) -> dict:
    """Reload the best checkpoint, score valid and test once, write metrics.json."""
    model.module.load_state_dict(read_checkpoint(checkpoint_path(folder, "best"))["model"])
    result = {
        split: evaluate_split(config, model.module, data, tokens, split, device=fabric.device)
        for split in ("valid", "test")
    }
    result["protocol"] = protocol_card(data, "test", model=config.model.kind, config_hash=config_hash(config))
    result["train"] = {
        "seconds": round(seconds, 1),
        "params": sum(p.numel() for p in model.module.parameters()),
        "trainable_params": sum(p.numel() for p in model.module.parameters() if p.requires_grad),
        "steps": state.step,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "valid_history": state.valid_history,
    }
    if fabric.global_rank == 0:
        write_json(folder / "metrics.json", result)
    fabric.logger.finalize("success")
    return result
