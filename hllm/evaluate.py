"""Full-ranking evaluation shared by every model: item-embedding table once, users in chunks,
history masked, Recall/NDCG/MRR overall and per bucket of users (new or trained target, target
popularity, history length), and a protocol card so numbers are compared like with like.

Dims: B users per chunk, N catalogue items (row 0 = PAD), D width.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from hllm.config import RunConfig
from hllm.data.batches import eval_batches
from hllm.data.dataset import SequenceData
from hllm.data.text import ItemTokens, PackedItems, pack_items
from hllm.errors import UserError
from hllm.metrics import mask_history, summarize, summarize_buckets, target_ranks

Split = Literal["valid", "test"]
HEAD_SHARE = TAIL_SHARE = 0.2  # head / tail: the most / least trained items making 20% of training
HISTORY_BUCKETS = {"hist_1_3": (1, 3), "hist_4_7": (4, 7), "hist_8_plus": (8, np.inf)}  # items before target


class Recommender(Protocol):
    needs_text: bool
    appended_tokens: int

    def encode_items(self, item_ids: Tensor, text: PackedItems | None) -> Tensor: ...

    def encode_users(self, history: Tensor, item_table: Tensor) -> Tensor: ...


@torch.no_grad()
def item_table(
    model: Recommender,
    num_items: int,
    item_tokens: ItemTokens | None,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Encode every item once, PAD included (row 0), in chunks of `batch_size` -> (N, D)."""
    rows = []
    for first in range(0, num_items, batch_size):
        ids = np.arange(first, min(first + batch_size, num_items))
        text = None
        if model.needs_text:
            text = pack_items(item_tokens, ids, appended_tokens=model.appended_tokens).to(device)
        rows.append(model.encode_items(torch.from_numpy(ids).to(device), text))
    return torch.cat(rows)


@torch.no_grad()
def rank_users(
    model: Recommender,
    data: SequenceData,
    table: Tensor,
    split: Split,
    *,
    batch_size: int,
    max_history: int,
) -> Tensor:
    """1-based rank of every user's target among all items, history items masked -> (U,) in user
    order; 0 for a user without a target in `split`."""
    ranks = torch.zeros(data.num_users, dtype=torch.long)
    for batch in eval_batches(data, split, batch_size=batch_size, max_history=max_history):
        batch = batch.to(table.device)
        # Only models that read time (HSTU's time bias) get the history's timestamps.
        reads_time = batch.times is not None and getattr(model, "reads_time", False)
        users = model.encode_users(batch.history, table, **({"times": batch.times} if reads_time else {}))
        scores = users.float() @ table.float().T  # (B, N)
        mask_history(scores, batch.seen, batch.targets)
        try:
            ranks[batch.users.cpu()] = target_ranks(scores, batch.targets).cpu()
        except ValueError as err:
            raise UserError(
                f"{err}; the model produced non-finite scores (diverged or a fully masked "
                "attention row); check the learning rate and precision",
                where=f"{split} users {int(batch.users[0])}..{int(batch.users[-1])}",
            ) from None
    return ranks


def evaluate(
    model: Recommender,
    data: SequenceData,
    split: Split,
    *,
    item_tokens: ItemTokens | None,
    ks: list[int],
    batch_size: int = 256,
    item_batch_size: int = 256,
    max_history: int = 50,
    device: torch.device | str = "cpu",
    table: Tensor | None = None,
) -> dict[str, float]:
    """Metrics of `split` over every user with a target there, overall and per bucket (see
    `target_buckets`); pass `table` to reuse an item-embedding table."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        if table is None:
            table = item_table(model, data.num_items, item_tokens, batch_size=item_batch_size, device=device)
        ranks = rank_users(model, data, table, split, batch_size=batch_size, max_history=max_history)
    finally:
        if was_training:
            model.train()
    scored = ranks > 0
    if not scored.any():
        raise UserError(f"no user has a {split} target under this protocol", where="data.split")
    buckets = {name: torch.from_numpy(members) for name, members in target_buckets(data, split).items()}
    return summarize(ranks[scored], ks) | summarize_buckets(ranks, buckets, ks)


def training_counts(data: SequenceData) -> np.ndarray:
    """(N,) how many training interactions each item has under the data's protocol."""
    return np.bincount(data.items[data.holdout.trained], minlength=data.num_items)


def popularity_thresholds(counts: np.ndarray) -> tuple[int, int]:
    """(head_min, tail_max): head = items trained at least head_min times, the most-trained items
    that together make HEAD_SHARE of training interactions (ties included); tail = items trained 1 to
    tail_max times, the least-trained making TAIL_SHARE; torso in between. Untrained items are in none."""
    ascending = np.sort(counts[counts > 0])
    if len(ascending) == 0:
        return 1, 0
    share = np.cumsum(ascending) / ascending.sum()
    tail_max = int(ascending[np.searchsorted(share, TAIL_SHARE)])
    share_from_top = np.cumsum(ascending[::-1]) / ascending.sum()
    head_min = int(ascending[::-1][np.searchsorted(share_from_top, HEAD_SHARE)])
    return head_min, min(tail_max, head_min - 1)


def target_buckets(data: SequenceData, split: Split) -> dict[str, np.ndarray]:
    """(U,) bool membership of each bucket, only users with a target in `split`: new / trained
    target, its popularity (head / torso / tail, trained targets only), and history length."""
    positions = data.target_positions(split)
    scored = positions >= 0
    counts = training_counts(data)
    head_min, tail_max = popularity_thresholds(counts)
    count = counts[np.where(scored, data.items[positions], 0)]
    history = positions - data.offsets[:-1]
    buckets = {
        "new": scored & (count == 0),
        "trained": scored & (count > 0),
        "head": scored & (count >= head_min),
        "torso": scored & (count > tail_max) & (count < head_min),
        "tail": scored & (count > 0) & (count <= tail_max),
    }
    for name, (low, high) in HISTORY_BUCKETS.items():
        buckets[name] = scored & (history >= low) & (history <= high)
    return buckets


def protocol_card(data: SequenceData, split: Split, *, model: str, config_hash: str) -> dict:
    """What a metric was measured on, stored beside it, so numbers are never compared blindly."""
    head_min, tail_max = popularity_thresholds(training_counts(data))
    return {
        "dataset": data.name,
        "dataset_hash": data.fingerprint,
        **data.holdout.description,
        "reported_split": split,
        "ranking": "full catalogue",
        "items_ranked": data.num_items - 1,
        "users": int((data.target_positions(split) >= 0).sum()),
        "history_masking": "all earlier items of the user, except the target itself",
        "buckets": {
            "new": "the target has no training interaction (trained: it has)",
            "popularity": (
                f"trained targets by training count: head >= {head_min} (the most-trained items making "
                f"{HEAD_SHARE:.0%} of training interactions), tail 1..{tail_max} (the least-trained "
                f"making {TAIL_SHARE:.0%}), torso between"
            ),
            "history": "hist_1_3, hist_4_7, hist_8_plus: the user's items before the target, all of them",
        },
        "popularity_thresholds": {"head_min": head_min, "tail_max": tail_max},
        "model": model,
        "config_hash": config_hash,
    }


@torch.no_grad()
def recommend_items(
    model: Recommender,
    table: Tensor,
    history: list[int],
    *,
    k: int,
    max_history: int,
    exclude_history: bool = True,
) -> tuple[list[int], list[float]]:
    """Top-k item ids and scores for one history (internal ids, oldest first)."""
    recent = torch.tensor(
        [[0] * max(0, max_history - len(history)) + history[-max_history:]], device=table.device
    )
    scores = (model.encode_users(recent, table).float() @ table.float().T)[0]  # (N,)
    scores[0] = -torch.inf
    if exclude_history and history:
        scores[torch.tensor(history, device=table.device)] = -torch.inf
    top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum())))
    return top.indices.tolist(), top.values.tolist()


def evaluate_split(config: RunConfig, model, data, item_tokens, split, *, device="cpu", table=None) -> dict:
    """`evaluate` with the run's evaluation settings."""
    return evaluate(
        model,
        data,
        split,
        item_tokens=item_tokens,
        ks=config.eval.ks,
        batch_size=config.eval.batch_size,
        item_batch_size=config.eval.item_batch_size,
        max_history=config.data.max_history,
        device=device,
        table=table,
    )
