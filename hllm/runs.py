"""Run folders: where a run keeps its config, checkpoints and metrics, and loading a trained run back.

A run folder holds `config.yaml`, `checkpoints/{last,best}.ckpt`, `logs/` and `metrics.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hllm.config import RunConfig, check_data_moved, config_to_dict, load_config
from hllm.data.dataset import SequenceData, prepare_dataset
from hllm.data.text import ItemTokens
from hllm.errors import UserError
from hllm.files import hash_json
from hllm.models.build import build_model, cache_frozen_items, hash_weights
from hllm.models.hllm import HLLM


def run_folder(config: RunConfig) -> Path:
    return Path(config.out_dir) / config.name


# A checkpoint's key for the fingerprint of an Item LLM it leaves out (see `frozen_item_llm`).
FROZEN_ITEM_LLM = "frozen_item_llm"


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


def frozen_item_llm(model: nn.Module) -> str | None:
    """The state-dict prefix of an HLLM's Item LLM when it is frozen whole, else None.

    Its weights are the pretrained ones the run's config names, rebuilt with the model, so a
    checkpoint leaves them out (SmolLM2-135M: 540 MB in each of a run's two checkpoints) and keeps
    their fingerprint (`hash_weights`) instead, checked when the weights are loaded back."""
    return "item_encoder." if isinstance(model, HLLM) and model.frozen_items else None


def checkpoint_fields(model: nn.Module) -> tuple[dict | None, dict]:
    """What `fabric.save` needs to leave a frozen Item LLM out of a checkpoint of `model`: its
    filter (None: save everything) and the fields to add (the fingerprint)."""
    prefix = frozen_item_llm(model)
    if prefix is None:
        return None, {}
    return {"model": lambda name, _: not name.startswith(prefix)}, {
        FROZEN_ITEM_LLM: hash_weights(model.item_encoder)
    }


def check_frozen_item_llm(model: nn.Module, checkpoint: dict, where: str) -> bool:
    """True when `checkpoint` left `model`'s frozen Item LLM out, after checking that the one the
    model was rebuilt with is the one it was trained with; False when the checkpoint has it all."""
    saved = checkpoint.get(FROZEN_ITEM_LLM)
    if saved is None:
        return False
    if frozen_item_llm(model) is None or saved != hash_weights(model.item_encoder):
        raise UserError(
            "the frozen Item LLM this run was trained with is not the one model.item.backbone "
            "loads now (its weights differ); point the config at the original weights",
            where=where,
        )
    return True


def load_weights(model: nn.Module, checkpoint: dict, where: str) -> None:
    """A checkpoint's model weights into `model`: every key, except a frozen Item LLM that the
    checkpoint left out (see `frozen_item_llm`) and whose fingerprint matches."""
    weights = checkpoint.get("model")
    if weights is None:
        raise UserError("checkpoint has no model weights", where=where)
    if not check_frozen_item_llm(model, checkpoint, where):
        model.load_state_dict(weights)
        return
    prefix = frozen_item_llm(model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not name.startswith(prefix) for name in missing):
        wrong = unexpected or [name for name in missing if not name.startswith(prefix)]
        raise UserError(f"checkpoint does not fit the model: {', '.join(wrong[:3])}", where=where)


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
