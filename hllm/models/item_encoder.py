"""ItemEncoder: the Item LLM turns packed item tokens into one embedding per item.

Dims: N items, T packed tokens, R rows, W row width, D width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from hllm.data.text import PackedItems
from hllm.errors import UserError
from hllm.models.backbone import Backbone

Pooling = Literal["token", "cls", "mean"]
Layout = Literal["packed", "padded"]
# Without flash attention a packed row pays attention over its whole width W whatever the mask, so
# rows are as wide as the batch's longest item (0 = no wider): attention per token then costs no
# more than in a padded batch, and first-fit packing still removes most padding. Measured on 2 CPU
# cores (MiniLM, 32 random amazon-scientific items, cap 512): rows of 512 -> 4.7k real tokens/s,
# rows of 1024 -> 3.7k, padded to the longest -> 2.1k. `hllm bench speed` has the full figures.
MAX_TOKENS_PER_ROW = 0


@dataclass
class RowLayout:
    """Where each packed token sits in a (R, W) batch of rows."""

    item: Tensor  # (T,) item of each token
    row: Tensor  # (T,)
    column: Tensor  # (T,)
    shape: tuple[int, int]  # (R, W)

    def scatter(self, values: Tensor, fill: float) -> Tensor:
        """Per-token values (T, ...) -> (R, W, ...), `fill` where a row has no token."""
        batch = values.new_full((*self.shape, *values.shape[1:]), fill)
        return batch.index_put((self.row, self.column), values)


def row_layout(lengths: Tensor, max_tokens: int) -> RowLayout:
    """Pack whole items into rows of at most max(`max_tokens`, longest item) tokens, first fit
    decreasing: the longest items are placed first, each in the first row with room, so rows
    are left with little unused tail."""
    sizes = lengths.tolist()
    limit = max([max_tokens, *sizes])
    free: list[int] = []  # room left in each row
    row_of, column_of = [0] * len(sizes), [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size = sizes[index]
        row = next((r for r, room in enumerate(free) if room >= size), len(free))
        if row == len(free):
            free.append(limit)
        row_of[index], column_of[index] = row, limit - free[row]
        free[row] -= size
    width = limit - min(free, default=limit) if sizes else 0
    return _layout(lengths, row_of, column_of, (len(free), width))


def padded_layout(lengths: Tensor, width: int = 0) -> RowLayout:
    """One item per row, rows padded to max(`width`, longest item): the usual padded batch."""
    sizes = lengths.tolist()
    return _layout(lengths, list(range(len(sizes))), [0] * len(sizes), (len(sizes), max([width, *sizes])))


def _layout(lengths: Tensor, row_of: list[int], column_of: list[int], shape: tuple[int, int]) -> RowLayout:
    """Per-token placement from each item's row and first column."""
    device = lengths.device
    item = torch.repeat_interleave(torch.arange(len(row_of), device=device), lengths)  # (T,)
    first = (lengths.cumsum(0) - lengths)[item]  # (T,) packed index of the item's first token
    inside = torch.arange(len(item), device=device) - first  # (T,) index inside the item
    column = torch.tensor(column_of, dtype=torch.long, device=device)[item] + inside
    row = torch.tensor(row_of, dtype=torch.long, device=device)[item]
    return RowLayout(item, row, column, shape)


class ItemEncoder(nn.Module):
    """Item LLM over packed items: positions restart per item, attention never crosses items.

    Args:
        backbone: any base model; decoders attend causally inside an item, encoders bidirectionally.
        pooling: `token` reads the hidden state at a learned [ITEM] embedding placed in each item's
            last slot (see `slots`); `cls` the item's first token; `mean` the mean over its tokens.
        max_tokens_per_row: without flash attention, the pack is cut at item boundaries into rows
            of at most max(this, longest item) tokens, run as one batch.
        layout: `packed` (several items per row) or `padded` (one item per row, padded to the
            longest item or to `pad_width`): the usual batch, kept to measure what packing gains.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        pooling: Pooling,
        max_tokens_per_row: int = MAX_TOKENS_PER_ROW,
        layout: Layout = "packed",
        pad_width: int = 0,
    ) -> None:
        super().__init__()
        if pooling not in ("token", "cls", "mean"):
            raise UserError(f"unknown pooling {pooling!r}: expected token, cls or mean")
        if pooling == "cls" and backbone.is_decoder:
            raise UserError(
                f"pooling 'cls' needs a bidirectional encoder, but {backbone.name!r} is a causal "
                "decoder whose first token sees only itself; use 'token' or 'mean'"
            )
        self.model = backbone.model
        self.is_decoder = backbone.is_decoder
        self.hidden_size = backbone.hidden_size
        self.pooling = pooling
        self.max_tokens_per_row = max_tokens_per_row
        self.layout = layout
        self.pad_width = pad_width
        self.item_token = None
        if pooling == "token":
            self.item_token = nn.Parameter(torch.empty(backbone.hidden_size))  # (D,)
            nn.init.normal_(self.item_token, std=0.02)

    @property
    def slots(self) -> int:
        """Placeholder ids `pack_items` must append to each item (the [ITEM] slot)."""
        return 1 if self.pooling == "token" else 0

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each layer in backward (non-reentrant) to trade compute for activations.

        transformers 5 names it activation checkpointing (`gradient_checkpointing_*` is deprecated).
        """
        if enabled:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.model.activation_checkpointing_disable()

    def forward(self, packed: PackedItems) -> Tensor:
        """Embeddings (N, D) of the packed items, in order."""
        lengths = packed.lengths  # (N,)
        embeddings = self.model.get_input_embeddings()(packed.input_ids)  # (T, D)
        if packed.num_items == 0:
            return embeddings.new_zeros(0, self.hidden_size)
        if self.item_token is not None:
            is_slot = torch.zeros_like(packed.input_ids, dtype=torch.bool)
            is_slot[lengths.cumsum(0) - 1] = True  # each item's last slot
            slot_value = self.item_token.to(embeddings.dtype)
            embeddings = torch.where(is_slot[:, None], slot_value, embeddings)
        # Flash attention: one row and no mask. With position_ids restarting at 0 and batch 1,
        # transformers' flash path (`_is_packed_sequence` -> `prepare_fa_kwargs_from_position_ids`
        # in modeling_flash_attention_utils) cuts the row into items and runs the varlen kernel,
        # causal only in causal modules. Untested here (no GPU): correct by construction.
        flash = self.model.config._attn_implementation.startswith("flash_attention")
        if self.layout == "padded":
            layout = padded_layout(lengths, self.pad_width)
        else:
            layout = row_layout(lengths, len(packed.input_ids) if flash else self.max_tokens_per_row)
        item_at = layout.scatter(layout.item, -1)  # (R, W) item of each slot, -1 where empty
        if not flash:
            mask = self._attention_mask(item_at, embeddings.dtype)
        elif self.layout == "padded":
            mask = (item_at >= 0).long()  # (R, W) the usual padding mask
        else:
            mask = None
        hidden = self.model(
            inputs_embeds=layout.scatter(embeddings, 0.0),  # (R, W, D)
            position_ids=layout.scatter(packed.position_ids, 0),  # (R, W)
            attention_mask=mask,
            use_cache=False,
        ).last_hidden_state[layout.row, layout.column]  # (T, D)
        return self._pool(hidden, layout.item, lengths)

    def _pool(self, hidden: Tensor, item: Tensor, lengths: Tensor) -> Tensor:
        """Token states (T, D), item of each token (T,), item lengths (N,) -> (N, D)."""
        ends = lengths.cumsum(0)  # (N,) one past each item's last token
        match self.pooling:
            case "token":
                return hidden[ends - 1]
            case "cls":
                return hidden[ends - lengths]
            case "mean":
                sums = hidden.new_zeros(len(lengths), self.hidden_size, dtype=torch.float32)
                sums.index_add_(0, item, hidden.float())  # (N, D)
                return (sums / lengths[:, None]).to(hidden.dtype)

    def _attention_mask(self, item_at: Tensor, dtype: torch.dtype) -> Tensor:
        """Block-diagonal (causal for decoders) mask (R, 1, W, W) from the item of each slot (R, W).

        transformers hands a 4-D `attention_mask` to the attention kernel untouched (the mask
        builders return it as is: `masking_utils._preprocess_mask_arguments`); SDPA reads True as
        "may attend". Dense, it costs R * W^2 bytes, about T * W. A row's unused tail (item -1)
        attends to itself only, so no query is left without keys.
        """
        allowed = item_at[:, :, None] == item_at[:, None, :]  # (R, W, W)
        if self.is_decoder:
            allowed = allowed.tril()
        if self.model.config._attn_implementation == "sdpa":
            return allowed[:, None]
        # Eager-style kernels add the mask to the attention scores.
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
