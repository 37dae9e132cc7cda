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
            last position (see `appended_tokens`); `cls` the item's first token; `mean` the mean over
            its tokens.
        max_tokens_per_row: without flash attention, the pack is cut at item boundaries into rows
            of at most max(this, longest item) tokens, run as one batch.
        layout: `packed` (several items per row) or `padded` (one item per row, padded to the
            longest item or to `pad_width`): the usual batch, kept to measure what packing gains.
        train_layers: train only the top this many transformer layers (0 = all): the layers below
            are frozen, so `lower_states` computes their token states once and `forward_top` runs
            the top layers over them, the affordable way to fine-tune an Item LLM on a CPU.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        pooling: Pooling,
        max_tokens_per_row: int = MAX_TOKENS_PER_ROW,
        layout: Layout = "packed",
        pad_width: int = 0,
        train_layers: int = 0,
    ) -> None:
        super().__init__()
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
        depth = len(self._layers())
        if not 0 <= train_layers <= depth:
            raise UserError(
                f"{backbone.name!r} has {depth} layers; cannot train the top {train_layers}",
                where="model.item.train_layers",
            )
        # Layers below the trained top ones; 0 when every layer trains.
        self.frozen_layers = depth - train_layers if train_layers else 0
        if self.frozen_layers:
            self.requires_grad_(False)
            self._layers()[self.frozen_layers :].requires_grad_(True)
            if self.is_decoder:
                self.model.norm.requires_grad_(True)

    def _layers(self) -> nn.ModuleList:
        """The transformer layers: `encoder.layer` in BERT-family encoders, `layers` in LLaMA-family
        decoders (the two families `forward_top` knows how to call layer by layer)."""
        if hasattr(self.model, "encoder") and hasattr(self.model.encoder, "layer"):
            return self.model.encoder.layer
        if all(hasattr(self.model, name) for name in ("layers", "rotary_emb", "norm")):
            return self.model.layers
        raise UserError(
            f"{type(self.model).__name__} is neither a BERT-family encoder nor a LLaMA-family decoder; "
            "top-layer training (model.item.train_layers) supports only those",
            where="model.item.train_layers",
        )

    @property
    def appended_tokens(self) -> int:
        """Placeholder ids `pack_items` must append to each item (the [ITEM] token)."""
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
        if packed.num_items == 0:
            return self.model.get_input_embeddings().weight.new_zeros(0, self.hidden_size)
        layout, mask, inputs = self._rows(packed)
        hidden = self.model(**inputs, attention_mask=mask, use_cache=False).last_hidden_state
        return self._pool(hidden[layout.row, layout.column], layout.item, packed.lengths)

    @torch.no_grad()
    def lower_states(self, packed: PackedItems) -> Tensor:
        """Token states (T, D) entering the first trained layer (the whole model runs: simple, and
        it runs once per item)."""
        layout, mask, inputs = self._rows(packed)
        out = self.model(**inputs, attention_mask=mask, use_cache=False, output_hidden_states=True)
        return out.hidden_states[self.frozen_layers][layout.row, layout.column]

    def forward_top(self, states: Tensor, lengths: Tensor, position_ids: Tensor) -> Tensor:
        """Item embeddings (N, D) from `lower_states`' token states (T, D) of N items laid end to
        end (positions restarting at 0 per item): only the trained top layers run."""
        layout, mask = self._layout(lengths, states.dtype)
        hidden = layout.scatter(states, 0.0)  # (R, W, D)
        positions = layout.scatter(position_ids, 0)  # (R, W)
        layers = self._layers()[self.frozen_layers :]
        if self.is_decoder:
            rotary = self.model.rotary_emb(hidden, position_ids=positions)
            for layer in layers:
                hidden = layer(
                    hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions
                )
            hidden = self.model.norm(hidden)
        else:
            for layer in layers:
                hidden = layer(hidden, mask)
        return self._pool(hidden[layout.row, layout.column], layout.item, lengths)

    def _rows(self, packed: PackedItems) -> tuple[RowLayout, Tensor | None, dict[str, Tensor]]:
        """The packed items laid out in rows: layout, attention mask and the model's inputs."""
        embeddings = self.model.get_input_embeddings()(packed.input_ids)  # (T, D)
        if self.item_token is not None:
            is_item_token = torch.zeros_like(packed.input_ids, dtype=torch.bool)
            is_item_token[packed.lengths.cumsum(0) - 1] = True  # each item's [ITEM] token
            item_token_value = self.item_token.to(embeddings.dtype)
            embeddings = torch.where(is_item_token[:, None], item_token_value, embeddings)
        layout, mask = self._layout(packed.lengths, embeddings.dtype)
        inputs = {
            "inputs_embeds": layout.scatter(embeddings, 0.0),  # (R, W, D)
            "position_ids": layout.scatter(packed.position_ids, 0),  # (R, W)
        }
        return layout, mask, inputs

    def _layout(self, lengths: Tensor, dtype: torch.dtype) -> tuple[RowLayout, Tensor | None]:
        """Rows for items of `lengths`, and the mask that keeps attention inside each item.

        Flash attention: one row and no mask. With position_ids restarting at 0 and batch 1,
        transformers' flash path (`_is_packed_sequence` -> `prepare_fa_kwargs_from_position_ids`
        in modeling_flash_attention_utils) cuts the row into items and runs the varlen kernel,
        causal only in causal modules. Untested here (no GPU): correct by construction.
        """
        flash = self.model.config._attn_implementation.startswith("flash_attention")
        if self.layout == "padded":
            layout = padded_layout(lengths, self.pad_width)
        else:
            layout = row_layout(lengths, int(lengths.sum()) if flash else self.max_tokens_per_row)
        item_at = layout.scatter(layout.item, -1)  # (R, W) item of each position, -1 where empty
        if not flash:
            return layout, self._attention_mask(item_at, dtype)
        if self.layout == "padded":
            return layout, (item_at >= 0).long()  # (R, W) the usual padding mask
        return layout, None

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
        """Block-diagonal (causal for decoders) mask (R, 1, W, W) from the item of each position (R, W).

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
