"""Training losses: InfoNCE over a shared negative bank (spec 3.4), catalogue softmax, LogitScale.

Cosine logits times a learnable scale, all in fp32. Dims: n rows (valid positions), M negatives,
N items, D width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_LOG_SCALE = math.log(100.0)  # scale = exp(log_scale) stays in [1, 100], as in the reference
TOP_KS = (1, 5, 10, 50)
# F.normalize divides by max(norm, eps): a zero vector becomes zero (cosine 0) instead of NaN,
# which the reference (no epsilon) would produce.
NORM_EPS = 1e-12


class LogitScale(nn.Module):
    """The inverse temperature: exp(log_scale), log_scale initialised to ln(1/temperature)."""

    def __init__(self, temperature: float = 0.07, *, learnable: bool = True) -> None:
        super().__init__()
        if not 0.01 <= temperature <= 1.0:
            raise ValueError(f"temperature must be in [0.01, 1] (scale in [1, 100]), got {temperature}")
        value = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    def forward(self) -> Tensor:
        """Clamp log_scale in place to [0, ln 100] (no gradient), then return the scale."""
        with torch.no_grad():
            self.log_scale.clamp_(0.0, MAX_LOG_SCALE)
        return self.log_scale.exp()

    @property
    def temperature(self) -> float:
        """Current temperature 1/scale, for logging."""
        return math.exp(-self.log_scale.detach().clamp(0.0, MAX_LOG_SCALE).item())


@dataclass
class NceOutput:
    """A loss and its training statistics (statistics computed without gradient)."""

    loss: Tensor  # scalar, fp32
    accuracy: float  # fraction of rows whose positive has the top logit
    top_k_accuracy: dict[int, float]  # k -> fraction of rows whose positive is in the top k
    negatives_kept: float  # mean number of negatives per row that survive masking


def _identity(bank: Tensor) -> Tensor:
    return bank


def _normalize(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1, eps=NORM_EPS)


def info_nce(
    user: Tensor,
    target: Tensor,
    negatives: Tensor,
    scale: Tensor,
    *,
    threshold: float = 0.99,
    gather: Callable[[Tensor], Tensor] = _identity,
    excluded: Tensor | None = None,
) -> NceOutput:
    """InfoNCE of each user row against its target and one bank of negatives shared by all rows.

    Args:
        user: (n, D) predicted embeddings of the valid positions.
        target: (n, D) embeddings of the next items.
        negatives: (M, D) this process's negatives.
        scale: scalar inverse temperature (from LogitScale).
        threshold: a negative whose cosine with the row's target exceeds this is a false negative
            (the same item or a near-duplicate) and is masked for that row.
        gather: builds the shared bank from the normalised negatives, (M, D) -> (M', D); in
            training, all_gather with gradient across ranks, flattened.
        excluded: (n, M') bool, negatives to drop for a row besides the duplicates (e.g. items
            the row's user has interacted with); it indexes the gathered bank.
    """
    user, target = _normalize(user), _normalize(target)  # (n, D)
    bank = gather(_normalize(negatives))  # (M', D)
    positive = (user * target).sum(-1, keepdim=True)  # (n, 1)
    duplicate = target @ bank.T > threshold  # (n, M')
    if excluded is not None:
        duplicate = duplicate | excluded
    logits = torch.cat([positive, user @ bank.T], dim=1) * scale.float()  # (n, 1 + M')
    # Mask after scaling: -inf * scale would give a NaN gradient for the scale. The positive
    # (column 0) is never masked, so every row keeps a finite logsumexp.
    logits = logits.masked_fill(F.pad(duplicate, (1, 0)), float("-inf"))
    labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return _output(F.cross_entropy(logits, labels), logits, labels)


def catalogue_softmax(
    user: Tensor,
    item_table: Tensor,
    targets: Tensor,
    scale: Tensor,
    *,
    pad_id: int = 0,
    positives: Tensor | None = None,
    excluded: Tensor | None = None,
) -> NceOutput:
    """Cross entropy over every item of the catalogue ("full softmax"), the PAD item excluded.

    Args:
        user: (n, D) predicted embeddings of the valid positions.
        item_table: (N, D) embeddings of every item id, PAD included.
        targets: (n,) int64 item ids of the next items, never `pad_id`.
        scale: scalar inverse temperature (from LogitScale).
        pad_id: the row of `item_table` that is padding, never a candidate.
        positives: (n, D) each row's own target embedding, scored in place of its table row (the
            two differ when each occurrence of an item draws its own ID dropout).
        excluded: (N,) bool, items that are never candidates either: the protocol's new items,
            which a deployed model could not have seen while training (no target is one).
    """
    if (targets == pad_id).any():
        raise ValueError(f"catalogue_softmax: a target is the padding id {pad_id}")
    user = _normalize(user)  # (n, D)
    logits = user @ _normalize(item_table).T  # (n, N)
    if positives is not None:
        own = (user * _normalize(positives)).sum(-1, keepdim=True)  # (n, 1)
        logits = logits.scatter(1, targets[:, None], own)
    logits = logits * scale.float()
    logits[:, pad_id] = float("-inf")  # after scaling, so the scale's gradient stays finite
    if excluded is not None:
        logits = logits.masked_fill(excluded, float("-inf"))
    return _output(F.cross_entropy(logits, targets), logits, targets)


@torch.no_grad()
def _output(loss: Tensor, logits: Tensor, labels: Tensor) -> NceOutput:
    """Statistics of `logits` (n, C) whose positive column is `labels` (n,)."""
    positive = logits.gather(1, labels[:, None])  # (n, 1)
    # Ties count in the positive's favour; in info_nce the positive is column 0, so this is the
    # rank a stable sort would give.
    ranks = 1 + (logits > positive).sum(1)  # (n,)
    ks = [k for k in TOP_KS if k <= logits.shape[1]]
    stats = [(ranks <= k).float().mean() for k in ks]
    stats.append((torch.isfinite(logits).sum(1) - 1).float().mean())
    *hits, kept = torch.stack(stats).tolist()  # one device sync for all statistics
    return NceOutput(loss=loss, accuracy=hits[0], top_k_accuracy=dict(zip(ks, hits)), negatives_kept=kept)


def binary_cross_entropy(user: Tensor, target: Tensor, negative: Tensor) -> NceOutput:
    """SASRec's original loss: each row's next item against one sampled negative, dot-product logits.

    Args:
        user: (n, D) predicted embeddings of the valid positions.
        target: (n, D) embeddings of the next items.
        negative: (n, D) embeddings of one sampled negative per row.
    """
    positive = (user.float() * target.float()).sum(-1)  # (n,)
    sampled = (user.float() * negative.float()).sum(-1)  # (n,)
    # -log sigmoid(p) - log(1 - sigmoid(q)) = softplus(-p) + softplus(q), stable for any logit
    loss = (F.softplus(-positive) + F.softplus(sampled)).mean()
    logits = torch.stack([positive, sampled], dim=1)  # (n, 2)
    return _output(loss, logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
