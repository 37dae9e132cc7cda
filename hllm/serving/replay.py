"""Online equals offline: replay a protocol's test users through the HTTP API and score what it serves.

The artifact of a run trained under the new-item protocol is copied without its new items; each is
then added through `POST /items` from its fields, as a deployed system would see it launch, and
every test user's history goes through `POST /recommend`. The served lists, scored as the evaluator
scores offline ranks, must give the offline Recall and NDCG (exact index, fp32).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from hllm.config import DataConfig
from hllm.data.dataset import SequenceData
from hllm.data.formats import locate, read_source
from hllm.errors import UserError
from hllm.metrics import ndcg_at_k, recall_at_k, target_ranks
from hllm.serving.export import read_manifest, write_catalogue, write_manifest

MANIFEST_OWN = ("format", "hllm", "versions", "items", "files")  # write_manifest fills these in


class Client(Protocol):  # an httpx.Client on a server's URL, or FastAPI's TestClient
    def post(self, url: str, *, json: dict): ...


def drop_items(artifact: Path, out: Path, item_ids: set[str]) -> Path:
    """A copy of `artifact` at `out` whose catalogue lacks `item_ids` (its manifest rewritten)."""
    if out.exists():
        raise UserError("already exists; choose a new folder or delete it", where=str(out))
    manifest = read_manifest(artifact)
    shutil.copytree(artifact, out)
    items = pd.read_parquet(out / "items.parquet")
    keep = ~items["id"].astype(str).isin(item_ids).to_numpy()
    embeddings = np.load(out / "embeddings.npy")[keep]
    kept = items[keep]
    write_catalogue(out, *(kept[name].tolist() for name in ("id", "title", "text")), embeddings)
    write_manifest(out, {key: value for key, value in manifest.items() if key not in MANIFEST_OWN})
    return out


def item_fields(config: DataConfig, item_ids: list[str], fields: list[str]) -> list[dict[str, str]]:
    """Each item's non-empty text fields from the item table, as `POST /items` takes them."""
    _, table = read_source(locate(config), config)
    if table is None:
        raise UserError("the data has no item table, so new items have no text to add", where="data.path")
    rows = table.drop_duplicates("item", keep="last").set_index("item").reindex(item_ids)
    out = []
    for _, row in rows[fields].astype("string").iterrows():
        out.append({name: str(value).strip() for name, value in row.items() if _usable(value)})
    return out


def _usable(value) -> bool:
    return not pd.isna(value) and str(value).strip() not in ("", "nan")


def add_items(client: Client, item_ids: list[str], fields: list[dict[str, str]]) -> None:
    for item_id, values in zip(item_ids, fields):
        response = client.post("/items", json={"id": item_id, "fields": values})
        if response.status_code != 201:
            raise UserError(f"POST /items answered {response.status_code}: {response.text}", where=item_id)


def served_rank(served: list[dict], data: SequenceData, target: int, depth: int) -> int:
    """The target's rank in a served list by the evaluator's own rule (`metrics.target_ranks`:
    items scoring higher, then tied items of lower catalogue index). Items of identical text score
    exactly alike, and the server orders such ties its own way (an added item comes last in its
    catalogue). Past `depth`, a miss."""
    scores = torch.full((1, data.num_items), float("-inf"), dtype=torch.float64)  # unserved: never before
    for item in served:
        scores[0, data.item_index(item["id"])] = item["score"]
    if torch.isneginf(scores[0, target]):
        return depth + 1
    return int(target_ranks(scores, torch.tensor([target]))[0])


def replay_users(
    client: Client, data: SequenceData, ks: list[int], *, split: str = "test"
) -> dict[str, float]:
    """Recall and NDCG at `ks` of the lists served for every user's `split` history (whole history
    sent, the server cuts it to the model's length and excludes all of it, as the evaluator masks)."""
    positions, targets = data.history_and_target(split)
    depth = max(ks)
    ranks = []
    for user in np.flatnonzero(positions >= 0):
        history = [str(data.item_ids[i]) for i in data.history(int(user), split)]
        response = client.post("/recommend", json={"history": history, "k": depth})
        if response.status_code != 200:
            raise UserError(
                f"POST /recommend answered {response.status_code}: {response.text}", where="replay"
            )
        ranks.append(served_rank(response.json()["items"], data, int(targets[user]), depth))
    ranks = torch.tensor(ranks)
    summary = {f"recall@{k}": recall_at_k(ranks, k).mean().item() for k in ks}
    return summary | {f"ndcg@{k}": ndcg_at_k(ranks, k).mean().item() for k in ks} | {"users": len(ranks)}
