"""HSTU (Zhai et al. 2024): pointwise SiLU attention with relative position and time biases, gated by U.

Unlike the HLLM reference (spec 4.2), the relative bias and attention dropout are used.
Dims: B sequences, L history, D width, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hllm.models.id_recommender import INIT_STD, IdLoss, IdRecommender

TIME_BUCKETS = 128
LOG_BUCKET_WIDTH = 0.301  # generative-recommenders' bucket: floor(ln(seconds) / 0.301)
NORM_EPS = 1e-6


class RelativeBias(nn.Module):
    """Attention bias from how far back a key is: one learned weight per distance in real items
    (as generative-recommenders' RelativePositionalBias) plus, with timestamps, one per log bucket of
    the time gap between query and key."""

    def __init__(self, max_length: int, *, time_buckets: int = TIME_BUCKETS) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.randn(max_length) * INIT_STD)
        self.time = nn.Parameter(torch.randn(time_buckets + 1) * INIT_STD)

    def forward(self, positions: Tensor, times: Tensor | None) -> Tensor:
        """positions (B, L) counted from the end, times (B, L) seconds or None -> (B, L, L)."""
        distance = positions[:, None, :] - positions[:, :, None]  # (B, L, L) key minus query: >= 0 causally
        bias = self.position[distance.clamp(0, len(self.position) - 1)]
        if times is None:
            return bias
        # The query's own time, not the next item's (generative-recommenders uses the target's
        # timestamp): at evaluation the target's time is unknown, so training must not see it.
        gap = (times[:, :, None] - times[:, None, :]).abs().clamp(min=1).double()  # (B, L, L)
        bucket = (gap.log() / LOG_BUCKET_WIDTH).long().clamp(0, len(self.time) - 1)
        return bias + self.time[bucket]


class HstuBlock(nn.Module):
    """x + O(dropout(U * norm(A V))), A = SiLU(Q K^T + bias) / max_length, masked causally."""

    def __init__(
        self, width: int, heads: int, max_length: int, *, dropout: float, attention_dropout: float
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.uvqk = nn.Linear(width, 4 * width, bias=False)
        nn.init.normal_(self.uvqk.weight, std=INIT_STD)
        self.out = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.out.weight)
        self.bias = RelativeBias(max_length)
        self.heads = heads
        self.max_length = max_length
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor, positions: Tensor, times: Tensor | None) -> Tensor:
        batch, length, width = x.shape
        h = F.layer_norm(x, (width,), eps=NORM_EPS)  # non-affine, as the paper's implementation
        u, v, q, k = F.silu(self.uvqk(h)).chunk(4, dim=-1)  # (B, L, D) each
        v, q, k = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (v, q, k))  # (B, H, L, D/H)
        scores = q @ k.transpose(-1, -2) + self.bias(positions, times).unsqueeze(1)  # (B, H, L, L)
        # Pointwise, no softmax: a fully masked row is simply zero. Dividing by the fixed maximum
        # length (the padded length in the paper's code) keeps the output independent of padding.
        weights = F.silu(scores) / self.max_length * allowed.unsqueeze(1)
        attended = (self.attention_dropout(weights) @ v).transpose(1, 2).reshape(batch, length, width)
        y = u * F.layer_norm(attended, (width,), eps=NORM_EPS)  # (B, L, D)
        return x + self.out(self.dropout(y))


class Hstu(nn.Module):
    """A stack of HSTU blocks, each with its own relative bias (as in generative-recommenders)."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        max_length: int,
        *,
        dropout: float,
        attention_dropout: float,
        time_bias: bool = True,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            HstuBlock(width, heads, max_length, dropout=dropout, attention_dropout=attention_dropout)
            for _ in range(layers)
        )
        self.use_time = time_bias

    def forward(self, x: Tensor, allowed: Tensor, positions: Tensor, times: Tensor | None) -> Tensor:
        times = times if self.use_time else None
        for block in self.blocks:
            x = block(x, allowed, positions, times)
        return x  # (B, L, D)


def build_hstu(
    num_items: int,
    max_length: int,
    *,
    width: int = 64,
    layers: int = 2,
    heads: int = 1,
    dropout: float = 0.2,
    attention_dropout: float = 0.2,
    loss: IdLoss = "full",
    temperature: float = 0.07,
    nce_threshold: float = 0.99,
    time_bias: bool = True,
) -> IdRecommender:
    """HSTU with the shared item table; `time_bias` False ignores timestamps (an ablation)."""
    encoder = Hstu(
        width,
        layers,
        heads,
        max_length,
        dropout=dropout,
        attention_dropout=attention_dropout,
        time_bias=time_bias,
    )
    return IdRecommender(
        encoder,
        num_items,
        width,
        max_length,
        loss=loss,
        dropout=dropout,
        temperature=temperature,
        nce_threshold=nce_threshold,
    )
