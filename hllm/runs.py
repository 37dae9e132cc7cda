"""Run folders: where a run keeps its config, checkpoints and metrics, and loading a trained run back.

A run folder holds `config.yaml`, `checkpoints/{last,best}.ckpt`, `logs/` and `metrics.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hllm.checkpoints import load_weights, read_checkpoint
from hllm.config import RunConfig, check_data_moved, config_to_dict, load_config
from hllm.data.dataset import SequenceData, prepare_dataset
from hllm.data.text import ItemTokens
from hllm.errors import UserError
from hllm.files import hash_json
from hllm.models.build import build_model, cache_frozen_items


def run_folder(config: RunConfig) -> Path:
    return Path(config.out_dir) / config.name


def checkpoint_path(folder: Path, name: str) -> Path:
    """Where a run folder keeps checkpoint `name` (last, best)."""
    return folder / "checkpoints" / f"{name}.ckpt"


def config_hash(config: RunConfig) -> str:
    return hash_json(config_to_dict(config))


@dataclass
class Run:
    folder: Path
    config: RunConfig
    data: SequenceData
    model: nn.Module
    item_tokens: ItemTokens | None


def run_config(folder: Path) -> RunConfig:
    """The config a run folder (a recommender's or a Creator's) was trained with."""
    if not (folder / "config.yaml").is_file():
        raise UserError("not a run folder (no config.yaml)", where=str(folder))
    return load_config(folder / "config.yaml")


def model_weights(folder: Path, checkpoint: str) -> dict[str, torch.Tensor]:
    """The model weights of a run folder's checkpoint `checkpoint` (last, best)."""
    path = checkpoint_path(folder, checkpoint)
    weights = read_checkpoint(path).get("model")
    if weights is None:
        raise UserError("checkpoint has no model weights", where=str(path))
    return weights


def load_run(folder: str | Path, *, checkpoint: str = "best") -> Run:
    """Rebuild a trained run's model from its folder and load the chosen checkpoint's weights
    (`hllm.creator.model.training.load_creator` does the same for a Creator run)."""
    folder = Path(folder)
    config = run_config(folder)
    check_data_moved(config, folder / "config.yaml")
    data = prepare_dataset(config.data)
    model, item_tokens = build_model(config, data)
    if config.model.kind != "popularity":
        path = checkpoint_path(folder, checkpoint)
        load_weights(model, read_checkpoint(path), str(path))
        cache_frozen_items(
            model,
            item_tokens,
            batch_size=config.eval.item_batch_size,
            device="cpu",
            store=Path(config.data.cache_dir),
        )
    model.eval()
    return Run(folder, config, data, model, item_tokens)
