"""HLLM: Item LLM (text -> item embedding) + projection + User LLM (history -> next-item embedding).

Item embeddings are L2-normalised before the User LLM reads them, so training, ranking and the
cached item table all share one geometry. Dims: B sequences, L history, U batch items, N catalogue, D width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hllm.data.batches import TrainBatch
from hllm.data.text import PackedItems
from hllm.errors import UserError
from hllm.models.item_encoder import ItemEncoder
from hllm.models.losses import LogitScale, catalogue_softmax, info_nce
from hllm.models.user_encoder import UserEncoder

COSINE_SAMPLE = 128


def mean_pairwise_cosine(embeddings: Tensor) -> float:
    """Mean cosine between distinct rows of a sample: near 1 means the item embeddings collapsed."""
    sample = F.normalize(embeddings[:COSINE_SAMPLE].detach().float(), dim=-1)
    n = len(sample)
    if n < 2:
        return float("nan")
    sims = sample @ sample.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


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


def build_adaptor(kind: str, item_width: int, user_width: int) -> nn.Module:
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
    raise UserError(f"unknown adaptor {kind!r}; use none, linear or mlp", where="model.adaptor")


class HLLM(nn.Module):
    """Item LLM -> adaptor -> User LLM, trained with InfoNCE on a shared negative bank, or with a
    softmax over the whole catalogue when the Item LLM is frozen or trains only its top layers.

    Three item sides: trained end to end from text; frozen, its outputs cached once (`item_cache`);
    or trained in its top layers only, over cached token states of the frozen layers below
    (`lower_states`). In the last, `item_cache` holds each item's output as of the last time it was
    encoded: a catalogue-wide negative table, fresh for the batch's items and stale for the rest.
    """

    def __init__(
        self,
        item_encoder: ItemEncoder,
        user_encoder: UserEncoder,
        *,
        item_width: int,
        user_width: int,
        temperature: float = 0.07,
        nce_threshold: float = 0.99,
        frozen_items: bool = False,
        catalogue_negatives: bool = False,
        exclude_own_items: bool = True,
        adaptor: Literal["none", "linear", "mlp"] = "linear",
    ) -> None:
        super().__init__()
        self.item_encoder = item_encoder
        self.user_encoder = user_encoder
        self.projection = build_adaptor(adaptor, item_width, user_width)
        self.logit_scale = LogitScale(temperature)
        self.nce_threshold = nce_threshold
        self.frozen_items = frozen_items
        self.catalogue_negatives = catalogue_negatives
        self.exclude_own_items = exclude_own_items
        # Frozen mode: Item LLM outputs computed once for the whole catalogue (N, D_item).
        self.register_buffer("item_cache", None, persistent=False)
        # Top-layer mode: every item's token states below the trained layers, end to end (T_all,
        # D_item), and where each item starts in them (N + 1,).
        self.register_buffer("lower_states", None, persistent=False)
        self.register_buffer("lower_offsets", None, persistent=False)
        # Set by the training loop to Fabric's all_gather when several processes train: negative
        # embeddings (with gradient) and their ids, so every rank scores against one shared bank.
        self.gather: Callable[[Tensor], Tensor] = lambda x: x
        self.gather_ids: Callable[[Tensor], Tensor] = lambda x: x
        self.last_stats: dict[str, float] = {}

    @property
    def needs_text(self) -> bool:
        return not (self.frozen_items or self.top_layers_only)

    @property
    def top_layers_only(self) -> bool:
        """The Item LLM trains only its top layers, over cached states of the ones below."""
        return self.item_encoder.frozen_layers > 0

    @property
    def item_slots(self) -> int:
        return self.item_encoder.slots

    def encode_items(self, item_ids: Tensor, text: PackedItems | None) -> Tensor:
        """Normalised, projected item embeddings (N, D_user) from text (or the caches)."""
        return self._project(self._item_outputs(item_ids, text))

    def _project(self, raw: Tensor) -> Tensor:
        return F.normalize(self.projection(raw.float()), dim=-1)

    def _item_outputs(self, item_ids: Tensor, text: PackedItems | None) -> Tensor:
        """Item LLM outputs (N, D_item): from text, the top layers over cached states, or the cache."""
        if text is not None:
            return self.item_encoder(text)
        if self.item_cache is None:
            raise RuntimeError("item side without text: call cache_items() before training")
        if not self.top_layers_only:
            return self.item_cache[item_ids]
        starts = self.lower_offsets[item_ids]  # (N,)
        lengths = self.lower_offsets[item_ids + 1] - starts  # (N,)
        first = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)  # (T,)
        inside = torch.arange(len(first), device=first.device) - first  # (T,) position in its item
        tokens = torch.repeat_interleave(starts, lengths) + inside  # (T,) rows of lower_states
        return self.item_encoder.forward_top(self.lower_states[tokens], lengths, inside)

    @torch.no_grad()
    def cache_items(self, raw_table: Tensor, lower: tuple[Tensor, Tensor] | None = None) -> None:
        """Store the Item LLM outputs for every item id (row 0 = PAD) and, when only the top layers
        train, the token states below them with each item's start offset (N + 1,)."""
        self.item_cache = raw_table.detach()
        if lower is not None:
            self.lower_states, self.lower_offsets = lower

    def _catalogue_outputs(self, item_ids: Tensor, raw: Tensor) -> Tensor:
        """Item LLM outputs of the whole catalogue (N_all, D_item) for the catalogue softmax.

        Top-layer mode: the batch's items are fresh (with gradient) and written back to the cache;
        the other items are as they were when last encoded.
        """
        if not self.top_layers_only:
            return self.item_cache
        with torch.no_grad():
            self.item_cache[item_ids] = raw.detach().to(self.item_cache.dtype)
        return self.item_cache.index_put((item_ids,), raw.to(self.item_cache.dtype))

    def encode_users(self, history: Tensor, item_table: Tensor) -> Tensor:
        """Normalised prediction of the next item for left-padded histories (B, L) -> (B, D)."""
        mask = history != 0
        states = self.user_encoder.last_state(item_table[history] * mask.unsqueeze(-1), mask)
        return F.normalize(states.float(), dim=-1)

    def training_loss(self, batch: TrainBatch) -> Tensor:
        raw = self._item_outputs(batch.batch_items, batch.text)  # (U, D_item)
        embeddings = self._project(raw)  # (U, D)
        present = (batch.items != 0).unsqueeze(-1)
        sequence = embeddings[batch.item_index] * present  # (B, L+1, D)
        outputs = self.user_encoder(sequence[:, :-1], batch.mask)  # (B, L, D)
        user = outputs[batch.mask]  # (n, D) only real positions
        target = sequence[:, 1:][batch.mask]  # (n, D)
        scale = self.logit_scale()
        if self.catalogue_negatives:
            table = self._project(self._catalogue_outputs(batch.batch_items, raw))  # (N_all, D)
            out = catalogue_softmax(user, table, batch.items[:, 1:][batch.mask], scale)
        else:
            negatives = embeddings[batch.negative_index]  # (K, D)
            out = info_nce(
                user,
                target,
                negatives,
                scale,
                threshold=self.nce_threshold,
                gather=self.gather,
                excluded=self._own_items(batch),
            )
        self.last_stats = {
            "accuracy": out.accuracy,
            "temperature": self.logit_scale.temperature,
            "item_cosine": mean_pairwise_cosine(embeddings),
            "negatives_kept": out.negatives_kept,
        }
        return out.loss

    def _own_items(self, batch: TrainBatch) -> Tensor | None:
        """(n, K') True where a bank negative is an item of the row's own window."""
        if not self.exclude_own_items:
            return None
        bank_ids = self.gather_ids(batch.negatives)  # (K',)
        own = (batch.items.unsqueeze(-1) == bank_ids).any(1)  # (B, K')
        return own.unsqueeze(1).expand(-1, batch.mask.shape[1], -1)[batch.mask]  # (n, K')
