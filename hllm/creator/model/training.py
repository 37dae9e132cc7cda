"""`hllm creator train`: build the CreativeLLM from a trained HLLM run, fit it with the project's one
training setup (`hllm.train.run_training`), select on held-out users' loss, and load it back.

A Creator run folder holds `config.yaml` (only the sections a Creator run reads), `split.json` (the
held-out users), `checkpoints/`, `logs/` and `metrics.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import yaml
from torch import Tensor

from hllm.config import RunConfig, absolute_paths, config_to_dict
from hllm.creator.data.grounded import PhraseEncoder
from hllm.creator.infer.generation import ItemFacts, embed_histories
from hllm.creator.model.dataset import (
    CreatorBatches,
    held_out_users,
    make_examples,
    read_rows,
    row_histories,
    trainable_rows,
)
from hllm.creator.model.layout import PromptLayout, angle_text
from hllm.creator.model.model import CreativeLLM, LossWeights
from hllm.epoch import TrainState
from hllm.errors import UserError
from hllm.models.backbone import load_backbone, load_causal_lm
from hllm.models.build import add_lora
from hllm.models.hllm import HLLM
from hllm.runs import Run, checkpoint_path, load_run, model_weights, run_config
from hllm.train import Job, run_training

CREATOR_SECTIONS = ("name", "out_dir", "train", "eval", "creator")
LM = "lm."  # parameter-name prefix of the Creative LLM (LoRA or all its weights)


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
    encoder = None
    if settings.fact_selector:
        if settings.train_hllm:
            raise UserError(
                "the fact selector reads a frozen HLLM: set train_hllm false", "creator.model.fact_selector"
            )
        encoder = PhraseEncoder(load_backbone(config.creator.data.encoder))
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
        weights=LossWeights(weights.creative, weights.recon, weights.align, weights.cls, weights.contrast),
        user_embedding=settings.user_embedding,
        train_hllm=settings.train_hllm,
        item_tokens=hllm.item_tokens,
        cls_dim=weights.cls_dim,
        cls_head=weights.cls_head,
        cls_blocks=weights.cls_blocks,
        align_temperature=weights.align_temperature,
        nce_threshold=weights.nce_threshold,
        fact_encoder=encoder,
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
    """Train the Creative LLM on the training users' rows (creative loss on the kept ones) with the
    project's one training setup, select on the held-out users' loss; return the metrics written.

    `hllm` may pass an already loaded HLLM run (the demo does, to encode the catalogue once)."""
    config = absolute_paths(config)

    def prepare(fabric: L.Fabric) -> Job:
        rows = read_rows(config.creator.train.rows)
        run = hllm or load_hllm(config)
        held_out = held_out_users(rows, config.creator.train.holdout, config.creator.train.seed)
        model = build_creator(config, run)
        if config.creator.model.init_from:
            start_from(model, config, Path(config.creator.model.init_from), held_out)
        lm_lr = config.creator.train.lm_lr
        if lm_lr == 0:
            model.lm.requires_grad_(False)
        usable = trainable_rows(rows)
        training, validating = (
            usable[~usable["user_id"].isin(held_out)],
            usable[usable["user_id"].isin(held_out)],
        )
        if not training["kept"].any():
            raise UserError(
                "no kept row belongs to a training user: build more rows", config.creator.train.rows
            )
        selector = (
            fit_fact_selector(model, run, config, training, validating) if model.selector is not None else {}
        )
        valid = _batches(config, run, model, validating)

        def finish(model: CreativeLLM, state: TrainState, seconds: float) -> dict:
            return {
                "seconds": round(seconds, 1),
                "steps": state.step,
                "epochs": state.epoch,
                "best_epoch": state.best_epoch,
                "train_rows": len(training),
                "held_out_users": len(held_out),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "valid_history": state.valid_history,
                **({"fact_selector": selector} if selector else {}),
            }

        return Job(
            model,
            _batches(
                config,
                run,
                model,
                training,
                shuffle=True,
                rank=fabric.global_rank,
                world_size=fabric.world_size,
            ),
            files={
                "config.yaml": creator_config_yaml(config),
                "split.json": json.dumps({"held_out_users": held_out}, indent=2) + "\n",
            },
            validate=lambda model: validation_loss(model, valid, fabric.device),
            finish=finish,
            metric="loss",
            maximise=False,
            ready=lambda model: model.cache_item_table(batch_size=config.eval.item_batch_size),
            rates={LM: lm_lr} if lm_lr else {},
        )

    return run_training(config, prepare, resume=resume)


def fit_fact_selector(
    model: CreativeLLM, hllm: Run, config: RunConfig, training: pd.DataFrame, validating: pd.DataFrame
) -> dict:
    """Fit the selector's interest map on the training users' rows; return how often its choice of
    facts is the teacher's, on those rows and on the held-out users' rows."""
    if "facts" not in training.columns:
        raise UserError(
            "the fact selector learns to choose as the grounded teacher does: build the rows with "
            "`--backend grounded` (they have no facts column)",
            where=config.creator.train.rows,
        )
    catalogue = ItemFacts.read(hllm.config.data, config.creator.data.fact_chars)
    model.cache_item_table(batch_size=config.eval.item_batch_size)

    def users_of(rows: pd.DataFrame) -> Tensor:
        histories = row_histories(hllm, rows)
        return embed_histories(
            model, histories, hllm.config.data.max_history, batch_size=config.eval.batch_size
        )

    def agreement(rows: pd.DataFrame, users: Tensor | None) -> float:
        angles = model.angles(users, [catalogue.candidates(item) for item in rows["item_id"]])
        teacher = [angle_text(list(facts)) for facts in rows["facts"]]
        return round(float(np.mean([a == b for a, b in zip(angles, teacher, strict=True)])), 4)

    users = users_of(training)
    means = catalogue.grounded.history_means(list(training["history_item_ids"]), model.fact_encoder)
    model.selector.fit(users, torch.from_numpy(means))
    report = {"train_agreement": agreement(training, users)}
    if len(validating):
        report["held_out_agreement"] = agreement(validating, users_of(validating))
        report["held_out_agreement_no_user"] = agreement(validating, None)
    return report


def creator_config_yaml(config: RunConfig) -> str:
    """config.yaml of a Creator run: only the sections it reads (the HLLM run keeps its own data
    and model); loading it back fills the others with their defaults."""
    values = config_to_dict(config)
    return yaml.safe_dump({key: values[key] for key in CREATOR_SECTIONS}, sort_keys=False, allow_unicode=True)


def _batches(
    config: RunConfig,
    hllm: Run,
    model: CreativeLLM,
    rows: pd.DataFrame,
    *,
    shuffle: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> CreatorBatches:
    """Training batches: shuffled, this process's share; validation: every row on every process,
    so all ranks select and stop early on the same loss."""
    return CreatorBatches(
        make_examples(rows, hllm.data, model.layout, angled=model.selector is not None),
        batch_size=config.train.batch_size,
        max_history=hllm.config.data.max_history,
        num_items=hllm.data.num_items,
        pad_id=model.layout.placeholder,
        catalogue_negatives=config.creator.loss.cls_catalogue_negatives,
        seed=config.train.seed,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
    )


@torch.no_grad()
def validation_loss(model: CreativeLLM, batches: CreatorBatches, device: torch.device | str) -> dict:
    """Mean weighted loss (and each part) over the held-out users' rows; {} when there are none."""
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


def start_from(model: CreativeLLM, config: RunConfig, folder: Path, held_out: list[str]) -> None:
    """A second stage: the best weights of the run in `folder`, which must have held out the same
    users (otherwise this run's held-out users could be ones the first stage trained on)."""
    if set(read_held_out(folder)) != set(held_out):
        raise UserError(
            "the first stage held out other users: use the same creator.train.rows, holdout and seed",
            where="creator.model.init_from",
        )
    load_weights(model, config, folder, "best")


def load_weights(model: CreativeLLM, config: RunConfig, folder: Path, checkpoint: str) -> None:
    """A Creator run's checkpoint into `model`; a projector for another User LLM width is a one-line
    error."""
    weights = model_weights(folder, checkpoint)
    expected = tuple(model.projector.weight.shape)
    found = tuple(weights.get("projector.weight", torch.empty(0)).shape)
    if found != expected:
        raise UserError(
            f"the projector takes a User LLM of width {found[-1] if found else '?'}, but "
            f"{config.creator.model.hllm_run} has width {expected[1]}",
            where=str(checkpoint_path(folder, checkpoint)),
        )
    model.load_state_dict(weights)


def load_creator(folder: str | Path, *, checkpoint: str = "best", hllm: Run | None = None) -> CreatorRun:
    """Rebuild a trained Creator run (its HLLM run included) and load the chosen checkpoint."""
    folder = Path(folder)
    config = run_config(folder)
    hllm = hllm or load_hllm(config)
    model = build_creator(config, hllm)
    load_weights(model, config, folder, checkpoint)
    model.cache_item_table(batch_size=config.eval.item_batch_size)
    held_out = read_held_out(folder)
    return CreatorRun(folder, config, hllm, model.eval(), read_rows(config.creator.train.rows), held_out)


def read_held_out(folder: Path) -> list[str]:
    """The users a Creator run held out (its split.json); a folder without one is a one-line error."""
    split = folder / "split.json"
    if not split.is_file():
        raise UserError("no split.json: not a Creator run folder", where=str(folder))
    return json.loads(split.read_text(encoding="utf-8"))["held_out_users"]
