"""Serving artifact: a trained run -> one self-contained folder (weights, item table, ids, texts, manifest;
optionally the Creator titles of an `hllm creator infer` folder, under `creator/`).

`load_artifact` checks every file against the manifest's hashes before it builds anything.
Dims: N catalogue rows (row 0 = PAD), D embedding width, L history length.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from hllm import __version__
from hllm.config import RunConfig, dump_config, load_config
from hllm.data.dataset import SequenceData
from hllm.data.text import build_item_text, pack_items, tokenize_items
from hllm.errors import UserError
from hllm.evaluate import item_table
from hllm.files import hash_file, publish_folder, write_json
from hllm.models.backbone import load_backbone
from hllm.models.build import build_model
from hllm.runs import config_hash, load_run
from hllm.serving.creator_titles import CREATOR_FILES, CreatorTitles

FORMAT = 1
SAMPLE_USERS = 1000  # held-out histories kept for index recall checks and load tests
WEIGHT_PARTS = {"item_llm/model.safetensors": "item_encoder.", "user_llm/model.safetensors": "user_encoder."}
HEAD_WEIGHTS = "head.safetensors"  # the adaptor (projection) and the temperature
# Text+ID items' ID rows are already in embeddings.npy; the served model encodes new items, which
# have no ID row, from their text alone, so it is built and stored without the ID table.
ID_ROWS = "item_ids."
LIBRARIES = ("torch", "transformers", "safetensors", "numpy", "faiss-cpu", "fastapi")
CREATOR = "creator"  # the folder of the Creator titles inside an artifact


@dataclass
class Artifact:
    """A loaded artifact: the model in eval mode plus the catalogue it was exported with."""

    folder: Path
    config: RunConfig
    manifest: dict
    model: torch.nn.Module
    tokenizer: Any
    item_ids: list[str]
    titles: list[str]
    texts: list[str]
    embeddings: np.ndarray  # (N, D) float32, L2-normalised; row 0 = PAD
    histories: list[list[str]] = field(default_factory=list)
    users: list[str] = field(default_factory=list)  # raw user id of each sample history
    creator: CreatorTitles | None = None  # users' Creator titles, when exported with them

    @property
    def text_fields(self) -> list[str]:
        return self.manifest["model"]["text_fields"]


def export_run(
    run_dir: str | Path, out_dir: str | Path, *, checkpoint: str = "best", creator: str | Path | None = None
) -> Path:
    """Write the serving artifact of a trained HLLM run to `out_dir` (a new folder), with the Creator
    titles of the infer folder `creator` when given."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserError("already exists; choose a new folder or delete it", where=str(out_dir))
    if creator is not None:
        CreatorTitles.read(creator)  # refuse a missing or damaged infer folder before the long part
    run = load_run(run_dir, checkpoint=checkpoint)
    if run.config.model.kind != "hllm":
        raise UserError(
            f"only hllm runs can be served, not {run.config.model.kind!r} (no Item LLM encodes new items)",
            where="model.kind",
        )
    table = item_table(
        run.model, run.data.num_items, run.item_tokens, batch_size=run.config.eval.item_batch_size
    )
    tokenizer = load_backbone(run.config.model.item.backbone, pretrained=False).tokenizer

    def write(folder: Path) -> None:
        (folder / "config.yaml").write_text(dump_config(run.config), encoding="utf-8")
        for part, module in (("item_llm", run.model.item_encoder), ("user_llm", run.model.user_encoder)):
            module.model.config.save_pretrained(folder / part)
        tokenizer.save_pretrained(folder / "item_llm")
        _write_weights(folder, run.model.state_dict())
        write_catalogue(
            folder,
            list(run.data.item_ids),
            list(run.data.item_titles),
            list(run.data.item_text),
            table.float().numpy(),
        )
        users, histories = _sample_histories(run.data, run.config)
        write_json(folder / "histories.json", histories)
        write_json(folder / "users.json", users)
        if creator is not None:
            (folder / CREATOR).mkdir()
            for name in CREATOR_FILES:
                shutil.copyfile(Path(creator) / name, folder / CREATOR / name)
        write_manifest(folder, _describe(run, checkpoint, table.shape[1]))
        folder.chmod(0o755)  # a temporary folder is private; an artifact is meant to be shared

    publish_folder(write, out_dir, replace=False)
    return out_dir


def _write_weights(folder: Path, state: dict[str, torch.Tensor]) -> None:
    state = {
        name: tensor.detach().contiguous().clone()
        for name, tensor in state.items()
        if not name.startswith(ID_ROWS)
    }
    rest = dict(state)
    for path, prefix in WEIGHT_PARTS.items():
        save_file({k: rest.pop(k) for k in state if k.startswith(prefix)}, str(folder / path))
    save_file(rest, str(folder / HEAD_WEIGHTS))


def write_catalogue(folder: Path, item_ids: list, titles: list, texts: list, embeddings: np.ndarray) -> None:
    """Items (row 0 = PAD) and their (N, D) embeddings; the manifest must be rewritten afterwards."""
    frame = pd.DataFrame({"id": item_ids, "title": titles, "text": texts}).astype(str)
    frame.to_parquet(folder / "items.parquet", index=False)
    np.save(folder / "embeddings.npy", np.ascontiguousarray(embeddings, dtype=np.float32))


def _sample_histories(data: SequenceData, config: RunConfig) -> tuple[list[str], list[list[str]]]:
    """Up to SAMPLE_USERS users and their test-split histories (raw ids): queries no index was built from."""
    users = np.random.default_rng(config.train.seed).permutation(data.num_users)[:SAMPLE_USERS]
    histories = [
        [str(data.item_ids[i]) for i in data.history(u, "test")[-config.data.max_history :]] for u in users
    ]
    return [str(data.user_ids[u]) for u in users], histories


def _describe(run, checkpoint: str, width: int) -> dict:
    model = run.config.model
    return {
        "run": {
            "folder": str(Path(run.folder).resolve()),
            "checkpoint": checkpoint,
            "config_hash": config_hash(run.config),
        },
        "dataset": {"name": run.data.name, "hash": run.data.fingerprint},
        "model": {
            "item_backbone": model.item.backbone,
            "user_backbone": model.user.backbone,
            "item_mode": model.item.mode,
            "dim": width,
            "max_history": run.config.data.max_history,
            "text_fields": list(run.data.stats.get("text_fields", [])),
        },
    }


def write_manifest(folder: Path, description: dict) -> None:
    """manifest.json: format, library versions, and sha256 + size of every file in `folder`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "format": FORMAT,
        "hllm": __version__,
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in LIBRARIES}},
        **description,
        "items": len(pd.read_parquet(folder / "items.parquet", columns=["id"])) - 1,
        "files": {
            p.relative_to(folder).as_posix(): {"sha256": hash_file(p), "bytes": p.stat().st_size}
            for p in files
        },
    }
    write_json(folder / "manifest.json", manifest)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def read_manifest(folder: str | Path, *, verify: bool = True) -> dict:
    """The manifest, after checking the format and (with `verify`) every file's size and sha256."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise UserError(
            "not an hllm artifact (no manifest.json); make one with hllm export", where=str(folder)
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError("damaged manifest.json; export the run again", where=str(path)) from None
    if manifest.get("format") != FORMAT:
        raise UserError(
            f"artifact format {manifest.get('format')!r}, this hllm reads format {FORMAT}; export again",
            where=str(path),
        )
    for name, expected in files.items():
        file = Path(folder) / name
        if not file.is_file():
            raise UserError("file listed in the manifest is missing; export again", where=str(file))
        if file.stat().st_size != expected["bytes"] or (verify and hash_file(file) != expected["sha256"]):
            raise UserError(
                "file does not match the manifest (damaged or replaced); export again", where=str(file)
            )
    return manifest


def load_artifact(folder: str | Path, overrides: list[str] | None = None, *, verify: bool = True) -> Artifact:
    """Check an artifact against its manifest, then rebuild its model; `overrides` may set serve.* only."""
    folder = Path(folder)
    manifest = read_manifest(folder, verify=verify)
    if bad := [o for o in overrides or [] if not o.startswith("serve.")]:
        raise UserError(
            "an artifact's model and data are fixed; only serve.* can be overridden", where=bad[0]
        )
    config = load_config(folder / "config.yaml", overrides)
    model = _load_model(folder, config, manifest)
    items = pd.read_parquet(folder / "items.parquet")
    embeddings = np.load(folder / "embeddings.npy")
    if embeddings.shape != (len(items), manifest["model"]["dim"]):
        raise UserError(f"embeddings {embeddings.shape} do not fit {len(items)} items", where=str(folder))
    histories = json.loads((folder / "histories.json").read_text(encoding="utf-8"))
    users_file = folder / "users.json"  # artifacts exported before it existed number their samples
    users = (
        json.loads(users_file.read_text(encoding="utf-8"))
        if users_file.is_file()
        else [f"sample-{i}" for i in range(len(histories))]
    )
    tokenizer = AutoTokenizer.from_pretrained(folder / "item_llm")
    columns = [items[name].astype(str).tolist() for name in ("id", "title", "text")]
    creator = CreatorTitles.read(folder / CREATOR) if (folder / CREATOR).is_dir() else None
    return Artifact(
        folder, config, manifest, model, tokenizer, *columns, embeddings, histories, users, creator
    )


def _load_model(folder: Path, config: RunConfig, manifest: dict) -> torch.nn.Module:
    """The exported architecture from the artifact's own backbone configs, then its weights (strict)."""
    item = replace(config.model.item, backbone=str(folder / "item_llm"), pretrained=False, id_embedding=False)
    user = replace(config.model.user, backbone=str(folder / "user_llm"), pretrained=False)
    local = replace(config, model=replace(config.model, item=item, user=user))
    # build_model tokenises the catalogue it is given; serving needs no catalogue tokens, so give it
    # a catalogue of the PAD row only.
    pad_only = np.array(["[PAD]"], dtype=object)
    stub = SequenceData(
        "artifact",
        np.array([], dtype=object),
        pad_only,
        np.zeros(1, np.int64),
        np.zeros(0, np.int64),
        np.array([""], dtype=object),
        np.array([""], dtype=object),
    )
    model, _ = build_model(local, stub)
    state = {}
    for path in [*WEIGHT_PARTS, HEAD_WEIGHTS]:
        state |= load_file(str(folder / path))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        made_with = manifest.get("versions", {}).get("transformers")
        message = f"weights do not fit the model (exported with transformers {made_with}, "
        raise UserError(message + f"this is {_version('transformers')}): {str(err)[:200]}", where=str(folder))
    return model.eval()


@torch.inference_mode()
def encode_texts(artifact: Artifact, texts: list[str]) -> np.ndarray:
    """Item LLM embeddings (n, D) of rendered item texts: how a cold-start item enters the catalogue."""
    item_tokens = tokenize_items(texts, artifact.tokenizer, artifact.config.data.max_text_tokens)
    packed = pack_items(item_tokens, np.arange(len(texts)), appended_tokens=artifact.model.appended_tokens)
    return artifact.model.encode_items(torch.arange(len(texts)), packed).float().numpy()


@torch.inference_mode()
def encode_histories(artifact: Artifact, histories: list[np.ndarray]) -> np.ndarray:
    """User LLM predictions (B, D) for histories given as their item embeddings [(L_b, D)], oldest first.

    The rows go into one small table (row 0 = PAD) and the histories index it, left-padded: the
    model reads the same embeddings as from the whole catalogue's table, without building it.
    """
    width = artifact.embeddings.shape[1]
    table = torch.from_numpy(np.concatenate([np.zeros((1, width), np.float32), *histories]))  # (1 + sum L, D)
    longest = max(len(rows) for rows in histories)
    index = torch.zeros(len(histories), longest, dtype=torch.long)  # (B, L)
    first = 1
    for b, rows in enumerate(histories):
        index[b, longest - len(rows) :] = torch.arange(first, first + len(rows))
        first += len(rows)
    return artifact.model.encode_users(index, table).float().numpy()


def render_text(artifact: Artifact, fields: dict[str, str]) -> str:
    """The item text the model was trained on (prompt + `key: value` of the artifact's fields)."""
    data = artifact.config.data
    names = artifact.text_fields or list(fields)
    row = pd.DataFrame([{name: fields.get(name) for name in names}])
    return str(build_item_text(row, names, data.prompt, data.field_separator).iloc[0])
