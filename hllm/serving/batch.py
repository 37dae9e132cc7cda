"""Batch recommendations: the top-k of every user (or of listed users) -> a folder of Parquet shards.

From a run folder (exact search over its item table) or an exported artifact (its faiss index, as
`serve.index` or `index=` says). Users in dataset order are cut into shards of `shard_users`; shard
s is written by process s mod world_size, each shard atomically, and an existing shard is skipped,
so a rerun resumes and an interrupted run loses nothing it wrote. Each row: user_id, item_ids (best
first), scores; items the user has interacted with are never recommended.

Ranks: shards need no communication between processes, so this module forms no process group; it
reads the RANK and WORLD_SIZE that torchrun sets (the one place outside train.py/evaluate.py that
knows about ranks, because batch scoring has no training loop to live in). Dims: B users, L history,
N catalogue rows (row 0 = PAD), D width, K searched depth.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from hllm.data.dataset import SequenceData, prepare_dataset
from hllm.errors import UserError
from hllm.files import atomic_write, hash_file, hash_json, write_json
from hllm.serving.export import load_artifact
from hllm.serving.index import build_index, open_index, search, settings_of

SETTINGS = "settings.json"
BATCH_USERS = 256  # users per model pass


@dataclass
class Source:
    """What scoring needs, from a run or an artifact."""

    model: torch.nn.Module
    table: torch.Tensor  # (N, D) item embeddings, row 0 = PAD
    index: faiss.Index  # label r = table row r + 1
    data: SequenceData
    rows: np.ndarray  # (data items,) table row of each dataset item; 0 = not in the catalogue
    item_ids: list[str]  # raw id of each table row
    max_history: int
    describe: dict  # what the output depends on, checked on resume


def open_source(path: Path, *, index: str | None = None, overrides: list[str] | None = None) -> Source:
    """A run folder or (with a manifest.json) an exported artifact, ready to score users; `overrides`
    (serve.* settings, such as the HNSW search width) apply to an artifact only."""
    if (path / "manifest.json").is_file():
        artifact = load_artifact(path, overrides)
        settings = settings_of(artifact.config.serve, index)
        data = prepare_dataset(artifact.config.data)
        lookup = {raw: row for row, raw in enumerate(artifact.item_ids) if row}
        return Source(
            artifact.model,
            torch.from_numpy(artifact.embeddings),
            open_index(artifact, settings),
            data,
            np.array([lookup.get(str(raw), 0) for raw in data.item_ids]),
            artifact.item_ids,
            artifact.config.data.max_history,
            {"artifact": artifact.manifest["files"]["embeddings.npy"]["sha256"], **settings},
        )
    if index not in (None, "exact"):
        raise UserError(
            "a run folder is searched exactly; export it for an approximate index", where="--index"
        )
    if overrides:
        raise UserError("serve.* settings apply to an exported artifact, not a run folder", where="--set")
    from hllm.evaluate import item_table  # loads a run: only for run folders
    from hllm.runs import checkpoint_path, load_run

    run = load_run(path)
    config = run.config
    table = item_table(run.model, run.data.num_items, run.item_tokens, batch_size=config.eval.item_batch_size)
    return Source(
        run.model,
        table.float(),
        build_index(table[1:].float().numpy(), "exact"),
        run.data,
        np.arange(run.data.num_items),
        [str(raw) for raw in run.data.item_ids],
        config.data.max_history,
        {"checkpoint": hash_file(checkpoint_path(path, "best")), "kind": "exact"},
    )


def select_users(data: SequenceData, users_file: Path | None) -> np.ndarray:
    """Dataset user indices: every user, or those listed one per line in `users_file`, in its order."""
    if users_file is None:
        return np.arange(data.num_users)
    lookup = {str(raw): u for u, raw in enumerate(data.user_ids)}
    lines = [line.strip() for line in users_file.read_text(encoding="utf-8").splitlines()]
    users = []
    for number, raw in enumerate(lines, 1):
        if raw and raw not in lookup:
            raise UserError(f"unknown user id {raw!r}", where=f"{users_file}:{number}")
        users += [lookup[raw]] if raw else []
    if not users:
        raise UserError("no user ids in the file (one per line)", where=str(users_file))
    return np.array(users)


@torch.inference_mode()
def score_users(source: Source, users: np.ndarray, k: int) -> pd.DataFrame:
    """Top-k (raw item ids, scores) of `users`, their own items excluded."""
    seen = [source.rows[source.data.sequence(u)] for u in users]
    seen = [rows[rows > 0] for rows in seen]
    longest = max(1, max(min(len(rows), source.max_history) for rows in seen))
    history = torch.zeros(len(users), longest, dtype=torch.long)  # (B, L) left-padded
    for b, rows in enumerate(seen):
        window = rows[-source.max_history :]
        history[b, longest - len(window) :] = torch.from_numpy(window)
    queries = source.model.encode_users(history, source.table).float().numpy()  # (B, D)
    depth = min(k + max(len(rows) for rows in seen), source.index.ntotal)
    scores, labels = search(source.index, queries, depth, kept=min(k, depth))  # (B, depth) each
    item_ids, item_scores = [], []
    for rows, found, score in zip(seen, labels + 1, scores):
        keep = (found > 0) & ~np.isin(found, rows)
        item_ids.append([source.item_ids[r] for r in found[keep][:k]])
        item_scores.append(score[keep][:k].astype(np.float32))
    raw_users = [str(source.data.user_ids[u]) for u in users]
    return pd.DataFrame({"user_id": raw_users, "item_ids": item_ids, "scores": item_scores})


def process_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def recommend_all(
    path: Path,
    out: Path,
    *,
    k: int = 10,
    users_file: Path | None = None,
    index: str | None = None,
    shard_users: int = 10_000,
    overrides: list[str] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict:
    """Write this process's missing shards of `out`; returns counts and users/s."""
    if k < 1 or shard_users < 1:
        raise UserError("k and --shard-users must be at least 1", where="recommend")
    if rank is None or world_size is None:
        rank, world_size = process_rank()
    source = open_source(Path(path), index=index, overrides=overrides)
    users = select_users(source.data, users_file)
    _check_settings(
        out, source.describe | {"k": k, "shard_users": shard_users, "users": hash_json(users.tolist())}
    )
    shards = [s for s in range(-(-len(users) // shard_users)) if s % world_size == rank]
    todo = [s for s in shards if not shard_path(out, s).is_file()]
    members = {s: users[s * shard_users : (s + 1) * shard_users] for s in todo}
    start = time.perf_counter()
    with tqdm(total=sum(map(len, members.values())), unit="user", desc=f"rank {rank}") as bar:
        for shard, shard_members in members.items():
            # Model passes over users of similar history length: padding to the longest of a batch
            # of mixed lengths multiplied the work by ~7 on amazon-scientific (mean 7, window 50).
            lengths = [min(len(source.data.sequence(u)), source.max_history) for u in shard_members]
            order = np.argsort(lengths, kind="stable")
            parts = []
            for first in range(0, len(order), BATCH_USERS):
                parts.append(score_users(source, shard_members[order[first : first + BATCH_USERS]], k))
                bar.update(len(parts[-1]))
            frame = pd.concat(parts, ignore_index=True).iloc[np.argsort(order)].reset_index(drop=True)
            atomic_write(shard_path(out, shard), lambda tmp, frame=frame: frame.to_parquet(tmp, index=False))
    done, seconds = sum(map(len, members.values())), time.perf_counter() - start
    return {
        "users": len(users),
        "shards": len(shards),
        "written": len(todo),
        "skipped": len(shards) - len(todo),
        "users_per_s": round(done / seconds, 1) if done else None,
    }


def shard_path(out: Path, shard: int) -> Path:
    return out / f"part-{shard:05d}.parquet"


def _check_settings(out: Path, settings: dict) -> None:
    """Shards made with other settings are never mixed in: refuse such a folder."""
    path = out / SETTINGS
    if path.is_file():
        if json.loads(path.read_text(encoding="utf-8")) != settings:
            raise UserError("holds recommendations made with other settings; use a new --out", where=str(out))
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)
