"""Between a frozen Item LLM's outputs and the User LLM: per-dimension standardisation (shared with
text-knn) and the map to the User LLM's width. Dims: N catalogue rows (row 0 = PAD), D width."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from hllm.errors import UserError


class MlpAdaptor(nn.Module):
    """Linear map plus a residual MLP: gives a frozen Item LLM's features room to move."""

    def __init__(self, item_width: int, user_width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(item_width, user_width, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(item_width, 2 * user_width), nn.GELU(), nn.Linear(2 * user_width, user_width)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + self.mlp(x)


class OutputStandardizer(nn.Module):
    """(x - mean) / std per dimension, with the statistics of a frozen Item LLM's catalogue outputs:
    fitted once (`fit`), then saved and loaded with the weights like any buffer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.zeros(width))  # zero: not fitted yet

    @property
    def fitted(self) -> bool:
        return bool(self.std.any())

    @torch.no_grad()
    def fit(self, raw_table: Tensor, held_out: Tensor | None) -> None:
        """Statistics of the catalogue's outputs `raw_table` (N, D_item; row 0 = PAD) over the rows
        a model may see: every item but PAD and the `held_out` (N,) bool new items."""
        visible = torch.ones(len(raw_table), dtype=torch.bool, device=raw_table.device)
        visible[0] = False
        if held_out is not None:
            visible &= ~held_out.to(raw_table.device)
        outputs = raw_table[visible].float()
        self.mean.copy_(outputs.mean(0))
        self.std.copy_(outputs.std(0).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        if not self.fitted:
            raise RuntimeError("standardised item outputs: fit the statistics before encoding items")
        return (x.float() - self.mean) / self.std


def build_adaptor(kind: Literal["none", "linear", "mlp"], item_width: int, user_width: int) -> nn.Module:
    """Map Item LLM outputs to the User LLM's width (the reference required equal widths)."""
    match kind:
        case "none":
            if item_width != user_width:
                raise UserError(
                    f"item width {item_width} != user width {user_width}: an adaptor is needed",
                    where="model.adaptor",
                )
            return nn.Identity()
        case "linear":
            return nn.Linear(item_width, user_width, bias=False)
        case "mlp":
            return MlpAdaptor(item_width, user_width)
