"""Learned item-ID rows: the whole item side of `hllm-id`, or what text+ID items add to their text.

Only items trained on get a row; PAD, ids beyond the table and items never trained on read zeros,
so they fall back to their text alone. Dims: N catalogue (row 0 = PAD), D width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ItemIdTable(nn.Module):
    """An embedding row per trained item id; zeros for every other id.

    Args:
        trained: (N,) bool, True for the ids that have a row (the items of the training split);
            its length is the table's. Stored with the weights, so a loaded model knows it.
        width: the rows' width.
        init_std: normal initialisation of the rows; 0 starts them at zero, so a text+ID model
            starts as its text-only model and the ID part grows only where training pushes it.
    """

    def __init__(self, trained: Tensor, width: int, *, init_std: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(len(trained), width)  # 'embed' in its name: no weight decay
        if init_std:
            nn.init.normal_(self.embedding.weight, std=init_std)
        else:  # without drawing: a text+ID model's other weights start as its text-only twin's
            nn.init.zeros_(self.embedding.weight)
        self.register_buffer("trained", trained.bool().clone())

    def forward(self, item_ids: Tensor) -> Tensor:
        """Rows (..., D) of `item_ids` (...); zeros where an id has no trained row."""
        inside = (item_ids >= 0) & (item_ids < len(self.trained))
        safe = torch.where(inside, item_ids, 0)
        known = inside & self.trained[safe]
        return self.embedding(safe) * known.unsqueeze(-1)


def drop_ids(ids: Tensor, rate: float, training: bool) -> Tensor:
    """ID dropout: zero each row of `ids` (..., D) with probability `rate` while training, one draw
    per row, i.e. per item occurrence. No rescaling: a dropped occurrence is scored on its text alone,
    exactly as an item without an ID row is at inference."""
    if not training or rate == 0:
        return ids
    keep = torch.rand(ids.shape[:-1], device=ids.device) >= rate  # (...)
    return ids * keep.unsqueeze(-1)
