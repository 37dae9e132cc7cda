"""Checkpoints: written atomically, resumed exactly, read back into a model.

A frozen Item LLM is left out of them: its weights are the pretrained ones the run's config names,
rebuilt with the model, so a checkpoint keeps their fingerprint instead and every loader checks it.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn

from hllm.epoch import TrainState
from hllm.errors import UserError
from hllm.models.build import hash_weights
from hllm.models.hllm import HLLM

# A checkpoint's key for the fingerprint of an Item LLM it leaves out (see `frozen_item_llm`).
FROZEN_ITEM_LLM = "frozen_item_llm"


def read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise UserError("no checkpoint here; train first (hllm train CONFIG)", where=str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise UserError(
            f"checkpoint is damaged or not a checkpoint ({type(err).__name__})", where=str(path)
        ) from None


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
    if wrong := unexpected + [name for name in missing if not name.startswith(prefix)]:
        raise UserError(f"checkpoint does not fit the model: {', '.join(wrong[:3])}", where=where)


def resume_state(fabric: L.Fabric, path: Path, model, optimizer, scheduler) -> TrainState:
    """Where training stands: the start when `path` (see `last_checkpoint`) does not exist, else
    the model, optimizer, scheduler and RNG loaded from that `run_epochs` checkpoint."""
    if not path.exists():
        return TrainState()
    # A checkpoint without the frozen Item LLM (checked by its fingerprint) loads the rest only.
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    complete = not check_frozen_item_llm(model.module, saved, str(path))
    extra = fabric.load(path, {"model": model, "optimizer": optimizer}, strict=complete)
    scheduler.load_state_dict(extra["scheduler"])
    state = TrainState(**extra["train_state"])
    torch.set_rng_state(extra["rng"])
    fabric.print(f"resumed from {path} at epoch {state.epoch}, step {state.step}")
    return state


def save_checkpoint(fabric: L.Fabric, path: Path, state: dict, keep: dict | None = None) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written checkpoint.
    `keep`: Fabric's filter of what to save of each object (see `checkpoint_fields`)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fabric.save(tmp, state, filter=keep)
    fabric.barrier()
    if fabric.global_rank == 0:
        tmp.replace(path)
    fabric.barrier()  # no rank reads the path before it is renamed
