"""SASRec (Kang & McAuley 2018): causal softmax self-attention blocks over item embeddings.

`SasRec` is the encoder; `IdRecommender` adds the shared item table, positions and losses.
Dims: B sequences, L history, D width, H heads.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hllm.models.id_recommender import IdLoss, IdRecommender


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, *, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = (
            t.view(batch, length, self.heads, -1).transpose(1, 2)  # (B, H, L, D/H)
            for t in self.qkv(x).split(width, dim=-1)
        )
        p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1), dropout_p=p)
        return self.dropout(self.out(y.transpose(1, 2).reshape(batch, length, width)))  # (B, L, D)


class Block(nn.Module):
    """Pre-LN block (as the original TensorFlow SASRec and nanoGPT): trains without a warm-up."""

    def __init__(self, width: int, heads: int, *, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(
            width, heads, dropout=dropout, attention_dropout=attention_dropout
        )
        self.mlp_norm = nn.LayerNorm(width)
        # SASRec's point-wise feed-forward: width -> width, as in the paper (inner size = width).
        self.mlp = nn.Sequential(
            nn.Linear(width, width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), allowed)
        return x + self.mlp(self.mlp_norm(x))  # (B, L, D)


class SasRec(nn.Module):
    """A stack of causal blocks and a final LayerNorm; positions are added by IdRecommender."""

    def __init__(
        self, width: int, layers: int, heads: int, *, dropout: float, attention_dropout: float
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(width, heads, dropout=dropout, attention_dropout=attention_dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, allowed: Tensor, positions: Tensor, times: Tensor | None) -> Tensor:
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)  # (B, L, D)


def build_sasrec(
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
) -> IdRecommender:
    """SASRec with the shared item table; `loss` bce is the original, full the strongest."""
    encoder = SasRec(width, layers, heads, dropout=dropout, attention_dropout=attention_dropout)
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
