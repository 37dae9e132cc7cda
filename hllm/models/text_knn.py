"""Text kNN: a baseline that reads item text but is not HLLM, and trains nothing.

An item is the frozen Item LLM's pooled embedding of its text; a user is the mean of their last
`recent` history items; the score is the cosine between the two. It says how far plain text
similarity goes, new items included, so that HLLM's User LLM is credited only with what it adds.

Dims: B users, L history, R recent items, N catalogue (row 0 = PAD), D width.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hllm.data.text import PAD_ID, PackedItems
from hllm.models.adaptor import OutputStandardizer
from hllm.models.item_encoder import ItemEncoder

# A user is the mean of this many latest items. Chosen on validation (amazon-scientific, new items,
# MiniLM mean pooling), Recall@10 with the last 1 / 3 / 5 / 10 / 50 items: .112 / .088 / .078 / .075 / .075.
RECENT_ITEMS = 1


class TextKnn(nn.Module):
    """Cosine between the unit text embedding of each item and the mean of the user's recent items.

    Its Item LLM is frozen, so `hllm.models.build.cache_frozen_items` can run it once over the
    catalogue (and keep the outputs on disk) as for a frozen HLLM; with a `standardizer`, the
    outputs are standardised per dimension first (fitted on the catalogue less the protocol's new
    items), which a decoder's nearly parallel hidden states need before a cosine means much."""

    frozen_items = True
    top_layers_only = False

    def __init__(
        self,
        item_encoder: ItemEncoder,
        *,
        recent: int = RECENT_ITEMS,
        standardizer: OutputStandardizer | None = None,
    ) -> None:
        super().__init__()
        self.item_encoder = item_encoder.requires_grad_(False).eval()
        self.recent = recent
        self.standardizer = standardizer
        self.item_cache: Tensor | None = None
        self.held_out_items: Tensor | None = None  # set by build_model under the new-items protocol
        self.last_stats: dict[str, float] = {}

    @property
    def needs_text(self) -> bool:
        return self.item_cache is None

    @property
    def appended_tokens(self) -> int:
        return self.item_encoder.appended_tokens

    def cache_items(self, raw_table: Tensor) -> None:
        """Keep the Item LLM's outputs for every item id (N, D_item; row 0 = PAD); fit the
        standardiser on them unless it already holds statistics."""
        self.item_cache = raw_table.detach()
        if self.standardizer is not None and not self.standardizer.fitted:
            self.standardizer.fit(raw_table, self.held_out_items)

    def encode_items(self, item_ids: Tensor, text: PackedItems | None) -> Tensor:
        outputs = self.item_encoder(text) if self.item_cache is None else self.item_cache[item_ids]
        if self.standardizer is not None:
            outputs = self.standardizer(outputs)
        return F.normalize(outputs.float(), dim=-1)  # (N, D)

    def encode_users(self, history: Tensor, item_table: Tensor) -> Tensor:
        recent = history[:, -self.recent :]  # (B, R): histories are left-padded, the latest last
        rows = item_table[recent] * (recent != PAD_ID).unsqueeze(-1)  # (B, R, D), PAD rows zeroed
        return F.normalize(rows.sum(1), dim=-1)  # (B, D): the mean's direction
