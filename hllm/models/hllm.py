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
    """Item LLM -> adaptor -> User LLM, trained with InfoNCE on a shared negative bank (or, when the
    item side is frozen, with a softmax over the whole catalogue).

    Three item sides: trained end to end from text; frozen, its outputs cached once (`item_cache`);
    or trained in its top layers only, over cached token states of the frozen layers below
    (`lower_states`). A catalogue softmax over outputs cached while the top layers train leaks:
    the model learns to tell the batch's fresh outputs from the stale rest. So the top-layer side
    uses the bank, which is encoded fresh; `in_batch_negatives` widens it for free.
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
        in_batch_negatives: bool = False,
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
        self.in_batch_negatives = in_batch_negatives
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
        return F.normalize(self.projection(self._item_outputs(item_ids, text).float()), dim=-1)

    def _item_outputs(self, item_ids: Tensor, text: PackedItems | None) -> Tensor:
        """Item LLM outputs (N, D_item): from text, the top layers over cached states, or the cache."""
        if text is not None:
            return self.item_encoder(text)
        if not self.top_layers_only:
            if self.item_cache is None:
                raise RuntimeError("frozen item side: call cache_items() before training")
            return self.item_cache[item_ids]
        if self.lower_states is None:
            raise RuntimeError("top-layer item side: call cache_lower_states() before training")
        starts = self.lower_offsets[item_ids]  # (N,)
        lengths = self.lower_offsets[item_ids + 1] - starts  # (N,)
        first = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)  # (T,)
        inside = torch.arange(len(first), device=first.device) - first  # (T,) position in its item
        tokens = torch.repeat_interleave(starts, lengths) + inside  # (T,) rows of lower_states
        return self.item_encoder.forward_top(self.lower_states[tokens], lengths, inside)

    @torch.no_grad()
    def cache_items(self, raw_table: Tensor) -> None:
        """Store the frozen Item LLM outputs for every item id (row 0 = PAD)."""
        self.item_cache = raw_table.detach()

    @torch.no_grad()
    def cache_lower_states(self, states: Tensor, offsets: Tensor) -> None:
        """Store every item's token states below the trained top layers, end to end (T_all, D_item),
        and where each item starts in them (N + 1,)."""
        self.lower_states, self.lower_offsets = states, offsets

    def encode_users(self, history: Tensor, item_table: Tensor) -> Tensor:
        """Normalised prediction of the next item for left-padded histories (B, L) -> (B, D)."""
        mask = history != 0
        states = self.user_encoder.last_state(item_table[history] * mask.unsqueeze(-1), mask)
        return F.normalize(states.float(), dim=-1)

    def training_loss(self, batch: TrainBatch) -> Tensor:
        embeddings = self.encode_items(batch.batch_items, batch.text)  # (U, D)
        present = (batch.items != 0).unsqueeze(-1)
        sequence = embeddings[batch.item_index] * present  # (B, L+1, D)
        outputs = self.user_encoder(sequence[:, :-1], batch.mask)  # (B, L, D)
        user = outputs[batch.mask]  # (n, D) only real positions
        target = sequence[:, 1:][batch.mask]  # (n, D)
        scale = self.logit_scale()
        if self.catalogue_negatives:
            table = self.encode_items(torch.arange(len(self.item_cache), device=user.device), None)
            out = catalogue_softmax(user, table, batch.items[:, 1:][batch.mask], scale)
        else:
            negatives, bank_ids, gather = self._negative_bank(batch, embeddings)
            out = info_nce(
                user,
                target,
                negatives,
                scale,
                threshold=self.nce_threshold,
                gather=gather,
                excluded=self._own_items(batch, bank_ids),
            )
        self.last_stats = {
            "accuracy": out.accuracy,
            "temperature": self.logit_scale.temperature,
            "item_cosine": mean_pairwise_cosine(embeddings),
            "negatives_kept": out.negatives_kept,
        }
        return out.loss

    def _negative_bank(self, batch: TrainBatch, embeddings: Tensor) -> tuple[Tensor, Tensor, Callable]:
        """This process's negatives (M, D), the gathered bank's item ids (M',) and the gather that
        builds the bank: the sampled negatives, shared by every process; with `in_batch_negatives`
        also the batch's other items, already encoded, local to this process."""
        sampled, sampled_ids = embeddings[batch.negative_index], self.gather_ids(batch.negatives)
        if not self.in_batch_negatives:
            return sampled, sampled_ids, self.gather
        others = torch.ones(len(batch.batch_items), dtype=torch.bool, device=embeddings.device)
        others[batch.negative_index] = False  # already in the bank
        k = len(sampled)

        def gather(negatives: Tensor) -> Tensor:
            return torch.cat([self.gather(negatives[:k]), negatives[k:]])

        bank_ids = torch.cat([sampled_ids, batch.batch_items[others]])
        return torch.cat([sampled, embeddings[others]]), bank_ids, gather

    def _own_items(self, batch: TrainBatch, bank_ids: Tensor) -> Tensor | None:
        """(n, M') True where a bank negative is an item of the row's own window."""
        if not self.exclude_own_items:
            return None
        own = (batch.items.unsqueeze(-1) == bank_ids).any(1)  # (B, K')
        return own.unsqueeze(1).expand(-1, batch.mask.shape[1], -1)[batch.mask]  # (n, K')
