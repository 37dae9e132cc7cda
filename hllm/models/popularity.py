"""Popularity: rank items by how often they were interacted with in training (the floor)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from hllm.data.text import PackedItems


class Popularity(nn.Module):
    """Scores = training interaction counts; every user gets the same ranking (minus their history)."""

    needs_text = False
    appended_tokens = 0

    def __init__(self, train_items: np.ndarray, num_items: int) -> None:
        super().__init__()
        counts = np.bincount(train_items, minlength=num_items).astype(np.float32)
        counts[0] = 0.0
        self.register_buffer("counts", torch.from_numpy(counts).unsqueeze(-1))  # (N, 1)
        self.last_stats: dict[str, float] = {}

    def encode_items(self, item_ids: Tensor, text: PackedItems | None) -> Tensor:
        return self.counts[item_ids]  # (N, 1)

    def encode_users(self, history: Tensor, item_table: Tensor) -> Tensor:
        return torch.ones(len(history), 1, device=item_table.device)  # (B, 1)
