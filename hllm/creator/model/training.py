"""`hllm creator train`: build the CreativeLLM from a trained HLLM run, fit it with the project's one
training loop (`hllm.train.run_epochs`), select on held-out users' loss, and load it back.

A Creator run folder holds `config.yaml`, `split.json` (the held-out users), `checkpoints/`,
`logs/` and `metrics.json`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from hllm.config import RunConfig, dump_config, load_config
from hllm.creator.model.dataset import CreatorBatches, held_out_users, make_examples, read_rows
from hllm.creator.model.layout import PromptLayout
from hllm.creator.model.model import CreativeLLM, LossWeights
from hllm.errors import UserError
from hllm.files import write_json, write_text
from hllm.models.backbone import load_causal_lm
from hllm.models.build import add_lora
from hllm.models.hllm import HLLM
from hllm.runs import Run, checkpoint_path, load_run, read_checkpoint, run_folder
from hllm.train import (
    TrainState,
    last_checkpoint,
    make_fabric,
    make_optimizer,
    resume_state,
    run_epochs,
    training_schedule,
)


def load_hllm(config: RunConfig) -> Run:
    """The HLLM run `creator.model.hllm_run` names; its model must be an HLLM (it has a User LLM)."""
    folder = config.creator.model.hllm_run
    if not folder:
        raise UserError(
            "set creator.model.hllm_run to a run folder of `hllm train`", "creator.model.hllm_run"
        )
    run = load_run(folder)
    if not isinstance(run.model, HLLM):
        raise UserError(
            f"the run is a {run.config.model.kind} model, which has no User LLM to embed users", where=folder
        )
    return run


def build_creator(config: RunConfig, hllm: Run) -> CreativeLLM:
    """The CreativeLLM `config.creator` describes, on top of a loaded HLLM run."""
    settings, weights = config.creator.model, config.creator.loss
    torch.manual_seed(config.train.seed)
    lm, tokenizer = load_causal_lm(settings.backbone)
    if settings.mode == "lora":
        add_lora(lm, settings.lora_rank, settings.lora_alpha)
    layout = PromptLayout(
        tokenizer,
        max_fact_tokens=settings.max_fact_tokens,
        max_title_tokens=settings.max_title_tokens,
        max_profile_tokens=settings.max_profile_tokens,
    )
    model = CreativeLLM(
        hllm.model,
        lm,
        layout,
        user_width=hllm.model.user_encoder.model.config.hidden_size,
        weights=LossWeights(weights.creative, weights.recon, weights.align, weights.cls),
        user_embedding=settings.user_embedding,
        train_hllm=settings.train_hllm,
        item_tokens=hllm.item_tokens,
        cls_dim=weights.cls_dim,
        cls_head=weights.cls_head,
        cls_blocks=weights.cls_blocks,
        align_temperature=weights.align_temperature,
        nce_threshold=weights.nce_threshold,
    )
    return model.train()


@dataclass
class CreatorRun:
    folder: Path
    config: RunConfig
    hllm: Run
    model: CreativeLLM
    rows: pd.DataFrame  # every row of the training data, kept or not
    held_out: list[str]  # user ids never trained on


def fit_creator(config: RunConfig, *, resume: bool = False, hllm: Run | None = None) -> dict:
    """Train the Creative LLM on the kept rows of the training users; return the metrics written.

    `hllm` may pass an already loaded HLLM run (the demo does, to encode the catalogue once)."""
    folder = run_folder(config)
    last = last_checkpoint(folder, resume=resume)
    config = _absolute_paths(config)
    rows = read_rows(config.creator.train.rows)
    hllm = hllm or load_hllm(config)
    held_out = held_out_users(rows, config.creator.train.holdout, config.creator.train.seed)
    fabric = make_fabric(config, folder)
    fabric.seed_everything(config.train.seed)
    model = build_creator(config, hllm)
    kept = rows[rows["kept"]]
    training, validating = kept[~kept["user_id"].isin(held_out)], kept[kept["user_id"].isin(held_out)]
    if training.empty:
        raise UserError("no kept row belongs to a training user: build more rows", config.creator.train.rows)
    batches = _batches(config, hllm, model, training, shuffle=True)
    valid = _batches(config, hllm, model, validating)
    if fabric.global_rank == 0:
        write_text(folder / "config.yaml", dump_config(config))
        write_json(folder / "split.json", {"held_out_users": held_out})
    optimizer = make_optimizer(model, config)
    scheduler = training_schedule(optimizer, config, len(batches))
    model, optimizer = fabric.setup(model, optimizer)
    model.mark_forward_method("training_loss")
    model.module.cache_item_table(batch_size=config.eval.item_batch_size)
    state = resume_state(fabric, last, model, optimizer, scheduler)
    started = time.perf_counter()
    run_epochs(
        fabric,
        model,
        optimizer,
        scheduler,
        batches,
        config=config,
        state=state,
        validate=lambda: validation_loss(model.module, valid, fabric.device),
        record=lambda metrics: _record(fabric, state, metrics),
    )
    result = {
        "seconds": round(time.perf_counter() - started, 1),
        "steps": state.step,
        "epochs": state.epoch,
        "train_rows": len(training),
        "held_out_users": len(held_out),
        "trainable_params": sum(p.numel() for p in model.module.parameters() if p.requires_grad),
        "valid_history": state.valid_history,
    }
    if fabric.global_rank == 0:
        write_json(folder / "metrics.json", result)
    return result


def _absolute_paths(config: RunConfig) -> RunConfig:
    """A copy whose HLLM run and rows paths are absolute, so the run folder works from anywhere."""
    config = copy.deepcopy(config)
    for settings, key in ((config.creator.model, "hllm_run"), (config.creator.train, "rows")):
        if getattr(settings, key):
            setattr(settings, key, str(Path(getattr(settings, key)).resolve()))
    return config


def _batches(
    config: RunConfig, hllm: Run, model: CreativeLLM, rows: pd.DataFrame, *, shuffle: bool = False
) -> CreatorBatches:
    return CreatorBatches(
        make_examples(rows, hllm.data, model.layout),
        batch_size=config.train.batch_size,
        max_history=hllm.config.data.max_history,
        num_items=hllm.data.num_items,
        pad_id=model.layout.placeholder,
        catalogue_negatives=config.creator.loss.cls_catalogue_negatives,
        seed=config.train.seed,
        shuffle=shuffle,
    )


@torch.no_grad()
def validation_loss(model: CreativeLLM, batches: CreatorBatches, device: torch.device | str) -> dict:
    """Mean weighted loss (and each part) over the held-out users' kept rows; {} when there are none."""
    if len(batches) == 0:
        return {}
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    batches.set_epoch(0)
    for index in range(len(batches)):
        loss = model.training_loss(batches[index].to(device))
        for name, value in {"loss": loss.item(), **model.last_stats}.items():
            totals[name] = totals.get(name, 0.0) + value / len(batches)
    model.train(was_training)
    return totals


def _record(fabric, state: TrainState, metrics: dict) -> bool:
    """Keep the epoch's held-out loss; without held-out rows every epoch counts as the best."""
    state.valid_history.append({"epoch": state.epoch, **metrics})
    value = -metrics["loss"] if metrics else math.inf
    improved = value >= state.best
    if improved:
        state.best, state.best_epoch = value, state.epoch
    if metrics:
        fabric.print(
            f"epoch {state.epoch}: held-out loss {metrics['loss']:.4f}{' (best)' if improved else ''}"
        )
    return improved


def load_creator(folder: str | Path, *, checkpoint: str = "best", hllm: Run | None = None) -> CreatorRun:
    """Rebuild a trained Creator run (its HLLM run included) and load the chosen checkpoint."""
    folder = Path(folder)
    if not (folder / "config.yaml").is_file():
        raise UserError("not a Creator run folder (no config.yaml)", where=str(folder))
    config = load_config(folder / "config.yaml")
    hllm = hllm or load_hllm(config)
    model = build_creator(config, hllm)
    path = checkpoint_path(folder, checkpoint)
    weights = read_checkpoint(path).get("model")
    if weights is None:
        raise UserError("checkpoint has no model weights", where=str(path))
    expected = tuple(model.projector.weight.shape)
    found = tuple(weights.get("projector.weight", torch.empty(0)).shape)
    if found != expected:
        raise UserError(
            f"the projector takes a User LLM of width {found[-1] if found else '?'}, but "
            f"{config.creator.model.hllm_run} has width {expected[1]}",
            where=str(path),
        )
    model.load_state_dict(weights)
    model.cache_item_table(batch_size=config.eval.item_batch_size)
    split = folder / "split.json"
    if not split.is_file():
        raise UserError("no split.json: not a Creator run folder", where=str(folder))
    held_out = json.loads(split.read_text(encoding="utf-8"))["held_out_users"]
    return CreatorRun(folder, config, hllm, model.eval(), read_rows(config.creator.train.rows), held_out)
