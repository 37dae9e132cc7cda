"""Full-ranking metrics from the target's rank: Recall@K, NDCG@K, MRR (one positive per user).

Pure tensor functions; per-user values are float64 so callers can sum them over chunks and ranks.
Dims: B users, N items, H history length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def target_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """1-based rank of each user's target among all items, ties broken by item index.

    rank = 1 + #(score > target score) + #(score == target score and index < target index),
    the position a stable descending sort would give: deterministic, and a tie never helps the
    target more than its index does. Masked items may score -inf.

    Args:
        scores: (B, N) item scores.
        targets: (B,) int64 item index of each user's target.

    Raises:
        ValueError: a score is NaN or +inf, or a target scores -inf (masked). Counting items that
            score higher would turn a NaN target into a perfect hit.
    """
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    # max propagates NaN, so one reduction finds both NaN and +inf.
    if not bool(scores.max() < float("inf")):
        raise ValueError("a NaN or +inf score is an error, never a rank")
    if torch.isneginf(target_scores).any():
        raise ValueError("a target scores -inf (masked), so it has no rank")
    index = torch.arange(scores.shape[1], device=scores.device)  # (N,)
    higher = (scores > target_scores).sum(1)  # (B,)
    tied_before = ((scores == target_scores) & (index < targets[:, None])).sum(1)  # (B,)
    return 1 + higher + tied_before


def recall_at_k(ranks: Tensor, k: int) -> Tensor:
    """Per user: 1 if the target is in the top k, else 0. (B,) float64."""
    return (ranks <= k).double()


def ndcg_at_k(ranks: Tensor, k: int) -> Tensor:
    """Per user: 1/log2(rank + 1) if rank <= k, else 0 (the ideal DCG of one positive is 1)."""
    gain = 1.0 / torch.log2(ranks.double() + 1.0)  # (B,)
    return torch.where(ranks <= k, gain, torch.zeros_like(gain))


def mrr(ranks: Tensor) -> Tensor:
    """Per user: 1/rank over the full ranking, no cut-off. (B,) float64."""
    return 1.0 / ranks.double()


def summarize(ranks_all: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Means over users of recall@k and ndcg@k for each k, and mrr; `users` is the count."""
    if ranks_all.numel() == 0:
        raise ValueError("no users to summarize")
    summary: dict[str, float] = {}
    for k in ks:
        summary[f"recall@{k}"] = recall_at_k(ranks_all, k).mean().item()
    for k in ks:
        summary[f"ndcg@{k}"] = ndcg_at_k(ranks_all, k).mean().item()
    summary["mrr"] = mrr(ranks_all).mean().item()
    summary["users"] = ranks_all.numel()
    return summary


def summarize_buckets(ranks: Tensor, buckets: dict[str, Tensor], ks: Sequence[int]) -> dict[str, float]:
    """`summarize` within each bucket, as flat `bucket/metric` keys (`new/recall@10`, `new/users`).

    Args:
        ranks: (B,) 1-based target ranks.
        buckets: name -> (B,) bool membership; an empty bucket reports only `name/users` = 0.
    """
    out: dict[str, float] = {}
    for name, members in buckets.items():
        chosen = ranks[members]
        summary = summarize(chosen, ks) if chosen.numel() else {"users": 0}
        out |= {f"{name}/{key}": value for key, value in summary.items()}
    return out


def mask_history(scores: Tensor, history: Tensor, targets: Tensor, *, pad_id: int = 0) -> Tensor:
    """In place, set the scores of PAD and of every history item to -inf, except the target.

    The reference also masked a target that repeats a history item and so counted it a miss
    (spec 6.3 [quirk]); here the target always keeps its score.

    Args:
        scores: (B, N) item scores, modified in place and returned.
        history: (B, H) int64 item ids of each user's history, padded with `pad_id`.
        targets: (B,) int64 item id of each user's target, never `pad_id`.
    """
    if (targets == pad_id).any():
        raise ValueError(f"mask_history: a target is the padding id {pad_id}")
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    scores[:, pad_id] = float("-inf")
    scores.scatter_(1, history, float("-inf"))
    scores.scatter_(1, targets[:, None], target_scores)
    return scores
