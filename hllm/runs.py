"""Run folders: where a run keeps its config, checkpoints and metrics, and loading a trained run back.

A run folder holds `config.yaml`, `checkpoints/{last,best}.ckpt`, `logs/` and `metrics.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hllm.config import RunConfig, config_to_dict, load_config
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


def read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise UserError("no checkpoint here; train first (hllm train CONFIG)", where=str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise UserError(
            f"checkpoint is damaged or not a checkpoint ({type(err).__name__})", where=str(path)
        ) from None


def load_run(folder: str | Path, *, checkpoint: str = "best") -> Run:
    """Rebuild a trained run's model from its folder and load the chosen checkpoint's weights."""
    folder = Path(folder)
    if not (folder / "config.yaml").is_file():
        raise UserError("not a run folder (no config.yaml)", where=str(folder))
    config = load_config(folder / "config.yaml")
    data = prepare_dataset(config.data)
    model, tokens = build_model(config, data)
    if config.model.kind != "popularity":
        path = checkpoint_path(folder, checkpoint)
        state = read_checkpoint(path)
        if "model" not in state:
            raise UserError("checkpoint has no model weights", where=str(path))
        model.load_state_dict(state["model"])
        cache_frozen_items(model, tokens, batch_size=config.eval.item_batch_size, device="cpu")
    model.eval()
    return Run(folder, config, data, model, tokens)
