"""User-item matching heads: (user, item) tower outputs -> one logit per pair.

`linear`: an MLP on the concatenation. `mixer`: an MLP-Mixer over the two tokens [user, item]
(token mixing across the pair, then channel mixing), as in the paper; no einops needed.
Dims: n pairs, C tower width.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

MIXER_TOKEN_HIDDEN = 8  # the reference's token-mixing width for its two tokens
MIXER_CHANNEL_FACTOR = 3  # the reference's channel-mixing expansion


class ConcatHead(nn.Module):
    """Linear(2C -> C), ReLU, Linear(C -> 1) on [user ; item]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        return self.mlp(torch.cat([users, items], dim=-1)).squeeze(-1)  # (n,)


class MixerBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(
            nn.Linear(2, MIXER_TOKEN_HIDDEN), nn.GELU(), nn.Linear(MIXER_TOKEN_HIDDEN, 2)
        )
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(
            nn.Linear(dim, MIXER_CHANNEL_FACTOR * dim), nn.GELU(), nn.Linear(MIXER_CHANNEL_FACTOR * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:  # (n, 2, C)
        x = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.channel_norm(x))


class MixerHead(nn.Module):
    """MLP-Mixer blocks over the 2 tokens, final LayerNorm, mean over the tokens, Linear(C -> 1)."""

    def __init__(self, dim: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(MixerBlock(dim) for _ in range(blocks)))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        x = self.blocks(torch.stack([users, items], dim=1))  # (n, 2, C)
        return self.out(self.norm(x).mean(1)).squeeze(-1)  # (n,)


class Matcher(nn.Module):
    """User tower (from the creative-space user vector), item tower (from the HLLM item
    embedding) and a head: `forward(users, items)` gives matching logits for aligned pairs."""

    def __init__(
        self, user_width: int, item_width: int, *, dim: int, head: Literal["linear", "mixer"], blocks: int = 2
    ) -> None:
        super().__init__()
        self.user_tower = nn.Linear(user_width, dim, bias=False)
        self.item_tower = nn.Linear(item_width, dim, bias=False)
        self.head = ConcatHead(dim) if head == "linear" else MixerHead(dim, blocks)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        return self.head(self.user_tower(users.float()), self.item_tower(items.float()))

    @torch.no_grad()
    def score_all(self, users: Tensor, items: Tensor, *, pairs_per_pass: int = 1 << 16) -> Tensor:
        """Matching probability of every (user, item) pair: (U, Du), (M, Di) -> (U, M), a block of
        items at a time so memory stays bounded for any catalogue."""
        left, right = self.user_tower(users.float()), self.item_tower(items.float())  # (U, C), (M, C)
        step = max(1, pairs_per_pass // max(len(left), 1))
        blocks = []
        for start in range(0, len(right), step):
            part = right[start : start + step]  # (m, C)
            paired_users = left.unsqueeze(1).expand(-1, len(part), -1).reshape(-1, left.shape[-1])
            paired_items = part.unsqueeze(0).expand(len(left), -1, -1).reshape(-1, part.shape[-1])
            blocks.append(self.head(paired_users, paired_items).reshape(len(left), len(part)))
        return torch.cat(blocks, dim=1).sigmoid() if blocks else left.new_zeros(len(left), 0)
