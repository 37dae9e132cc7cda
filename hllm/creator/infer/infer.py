"""`hllm creator infer`: the serving path at scale, every step resumable in OUT.

1. embed:    every user's HLLM user vector (what the Creator's projector and selector read), in shards
             `embeddings/part-NNNNN.parquet`; shard s belongs to rank s mod world_size, so the step
             runs as several processes (torchrun / Fabric) or through `UserEmbedder` on Ray Data;
2. cluster:  faiss k-means over them, each user assigned to its nearest centroid in L2
             -> `centroids.npy`, `assignments.parquet` (user_id, cluster); the projector is linear,
             so a centroid's projection is the mean of its users' projections;
3. prune:    the cls head's matching probability of every (centroid, item) pair; the top-N
             clusters per item above the threshold are kept;
4. generate: one title per kept pair (greedy, batched, parts in `titles/`; with a fact selector,
             the facts it chooses for the normalised centroid), checked by the
             hallucination filter -> `titles.parquet` (cluster, item_id, title, score, kept, reasons).

`lookup_title` serves a (user, item): the cluster's title when it passed the filter, else the original.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from hllm.creator.data.stages import PartStore, claim_folder
from hllm.creator.infer.clusters import assign_clusters, fit_kmeans, top_clusters
from hllm.creator.infer.generation import ItemFacts, embed_histories, generate_titles
from hllm.creator.model.training import CreatorRun, load_creator
from hllm.errors import UserError
from hllm.files import atomic_write
from hllm.serving.creator_titles import CreatorTitles
from hllm.train import launch_fabric

PAIR_KEY = ["cluster", "item_id"]


def embed_users(run: CreatorRun, user_ids: list[str]) -> np.ndarray:
    """User vectors (U, Du) float32 of dataset users (their whole sequences are the history)."""
    data = run.hllm.data
    histories = [data.sequence(data.user_index(user)) for user in user_ids]
    users = embed_histories(
        run.model, histories, run.hllm.config.data.max_history, batch_size=run.config.creator.infer.batch_size
    )
    return users.float().cpu().numpy()


class UserEmbedder:
    """A Ray Data `map_batches` class: a pandas batch with `user_id` -> `user_id`, `embedding`.

    ray.data.from_pandas(users).map_batches(UserEmbedder, fn_constructor_args=(RUN,),
        batch_format="pandas", batch_size=4096, concurrency=8).write_parquet(OUT)
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run = load_creator(run_dir)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        users = batch["user_id"].astype(str).tolist()
        return pd.DataFrame({"user_id": users, "embedding": list(embed_users(self.run, users))})


def embed_shards(run: CreatorRun, out: Path, *, rank: int = 0, world_size: int = 1) -> int:
    """Write this rank's missing embedding shards; return how many it wrote."""
    users = [str(user) for user in run.hllm.data.user_ids]
    size = run.config.creator.infer.shard_users
    written = 0
    for shard in range(rank, math.ceil(len(users) / size), world_size):
        path = out / "embeddings" / f"part-{shard:05d}.parquet"
        if path.exists():
            continue
        chosen = users[shard * size : (shard + 1) * size]
        table = pd.DataFrame({"user_id": chosen, "embedding": list(embed_users(run, chosen))})
        atomic_write(path, lambda tmp, table=table: table.to_parquet(tmp, index=False))
        written += 1
    return written


def read_embeddings(out: Path, expected: int) -> tuple[np.ndarray, np.ndarray]:
    """(U,) user ids and (U, Du) embeddings from every shard; missing shards are an error."""
    parts = sorted((out / "embeddings").glob("part-*.parquet"))
    table = pd.concat([pd.read_parquet(part) for part in parts], ignore_index=True) if parts else None
    if table is None or len(table) != expected:
        found = 0 if table is None else len(table)
        raise UserError(
            f"embeddings of {found} of {expected} users: run the embed step on every rank", str(out)
        )
    return table["user_id"].to_numpy(dtype=object), np.stack(table["embedding"].to_numpy()).astype(np.float32)


def cluster_users(run: CreatorRun, out: Path) -> np.ndarray:
    """Centroids (C, Du), fitted once and kept in OUT; the assignments are written beside them."""
    settings = run.config.creator.infer
    users, embeddings = read_embeddings(out, run.hllm.data.num_users)
    path = out / "centroids.npy"
    if not path.exists():
        centroids = fit_kmeans(
            embeddings,
            settings.clusters,
            iterations=settings.kmeans_iterations,
            restarts=settings.kmeans_restarts,
            seed=run.config.train.seed,
        )
        atomic_write(path, lambda tmp: _save_array(tmp, centroids))
    centroids = np.load(path)
    table = pd.DataFrame({"user_id": users, "cluster": assign_clusters(embeddings, centroids)})
    atomic_write(out / "assignments.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    return centroids


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as file:  # np.save(path) would append ".npy" to the temporary name
        np.save(file, array)


def chosen_items(run: CreatorRun, items: list[str] | None) -> list[str]:
    """The items to title: those given (each checked), else the whole catalogue."""
    data = run.hllm.data
    if not items:
        return [str(item) for item in data.item_ids[1:]]
    for item in items:
        data.item_index(item)
    return list(dict.fromkeys(str(item) for item in items))


def score_pairs(run: CreatorRun, centroids: np.ndarray, items: list[str]) -> pd.DataFrame:
    """The kept (cluster, item) pairs with their matching probability."""
    settings, model = run.config.creator.infer, run.model
    ids = torch.tensor(
        [run.hllm.data.item_index(item) for item in items], device=model.projector.weight.device
    )
    with torch.no_grad():
        projected = model.projector(torch.from_numpy(centroids).to(ids.device))
    scores = model.matcher.score_all(projected, model.item_vectors(ids))
    clusters, columns, kept = top_clusters(scores.cpu().numpy(), settings.top_n, settings.threshold)
    return pd.DataFrame(
        {
            "cluster": clusters.astype(np.int64),
            "item_id": np.asarray(items, dtype=object)[columns],
            "score": kept,
        }
    )


def write_titles(
    run: CreatorRun, out: Path, centroids: np.ndarray, pairs: pd.DataFrame, catalogue: ItemFacts
) -> int:
    """Generate the missing titles, one part per batch; return how many were generated."""
    settings = run.config.creator.infer
    store = PartStore(out / "titles", PAIR_KEY)
    done = store.done()
    todo = pairs[[key not in done for key in pairs[PAIR_KEY].itertuples(index=False, name=None)]]
    users = torch.from_numpy(centroids).to(run.model.projector.weight.device)
    with torch.no_grad():
        projected = run.model.projector(users)
    for start in range(0, len(todo), settings.generate_batch):
        chunk = todo.iloc[start : start + settings.generate_batch]
        clusters = torch.tensor(chunk["cluster"].to_numpy())
        angles = run.model.angles(
            F.normalize(users[clusters], dim=-1), [catalogue.candidates(item) for item in chunk["item_id"]]
        )
        titles = generate_titles(
            run.model,
            [catalogue.facts(item) for item in chunk["item_id"]],
            projected[clusters],
            batch_size=settings.generate_batch,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            angles=angles,
        )
        store.append(chunk[PAIR_KEY].assign(title=[title[0] for title in titles]))
    return len(todo)


def infer(run: CreatorRun, out: str | Path, *, items: list[str] | None = None) -> dict:
    """Steps 2-4 (the embeddings must be written); returns the report."""
    started, out = time.perf_counter(), Path(out)
    settings = run.config.creator.infer
    items = chosen_items(run, items or settings.items)
    catalogue = ItemFacts.read(run.hllm.config.data, run.config.creator.data.fact_chars)
    centroids = cluster_users(run, out)
    pairs = score_pairs(run, centroids, items)
    generated = write_titles(run, out, centroids, pairs, catalogue)
    written = PartStore(out / "titles", PAIR_KEY).read()
    if written.empty:
        written = pd.DataFrame({"cluster": pd.Series(dtype="int64"), "item_id": [], "title": []})
    titles = pairs.merge(written, on=PAIR_KEY, how="left")
    verdicts = [
        catalogue.check(item, title) for item, title in zip(titles["item_id"], titles["title"], strict=True)
    ]
    titles["kept"] = [verdict.kept for verdict in verdicts]
    titles["reasons"] = [list(verdict.reasons) for verdict in verdicts]
    atomic_write(out / "titles.parquet", lambda tmp: titles.to_parquet(tmp, index=False))
    originals = pd.DataFrame(
        {"item_id": items, "original_title": [catalogue.facts(item)[0] for item in items]}
    )
    atomic_write(out / "items.parquet", lambda tmp: originals.to_parquet(tmp, index=False))
    return {
        "users": run.hllm.data.num_users,
        "clusters": len(centroids),
        "items": len(items),
        "pairs_scored": len(centroids) * len(items),
        "pairs_kept": len(pairs),
        "titles_generated": generated,
        "titles_passing_filter": int(titles["kept"].sum()),
        "seconds": round(time.perf_counter() - started, 1),
    }


def start_infer(run_dir: str | Path, out: str | Path, *, items: list[str] | None = None) -> dict:
    """The whole `infer` command: claim OUT, embed on every process, then cluster, prune and
    generate on rank 0 (other ranks return {})."""
    out = Path(out)
    run = load_creator(run_dir)
    settings = run.config.creator.infer
    fabric = launch_fabric(
        "train.accelerator/creator.infer.devices",
        accelerator=run.config.train.accelerator,
        devices=settings.devices,
        strategy="ddp" if settings.devices > 1 else "auto",
    )
    run.model.to(fabric.device)
    identity = {
        "run": str(Path(run_dir).resolve()),
        **{key: getattr(settings, key) for key in ("clusters", "top_n", "threshold", "max_new_tokens")},
        "temperature": settings.temperature,
        "items": sorted(items or settings.items),
        "shard_users": settings.shard_users,
        "embeddings": "user-vectors",  # the HLLM user space (earlier folders held projected vectors)
    }
    if fabric.global_rank == 0:
        claim_folder(out, identity)
    fabric.barrier()
    embed_shards(run, out, rank=fabric.global_rank, world_size=fabric.world_size)
    fabric.barrier()
    return infer(run, out, items=items) if fabric.global_rank == 0 else {}


def lookup_title(out: str | Path, user_id: str, item_id: str) -> tuple[str, str]:
    """(title, where it came from) for a user and an item of an infer folder: see `CreatorTitles`."""
    return CreatorTitles.read(out).title(user_id, item_id)
