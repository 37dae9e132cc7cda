"""HLLM: Item LLM (text -> item embedding) + projection + User LLM (history -> next-item embedding).

Item embeddings are L2-normalised before the User LLM reads them, so training, ranking and the
cached item table all share one geometry. Optionally a learned ID row is added to the text
embedding (text+ID items), or replaces the Item LLM altogether (`hllm-id`, a diagnostic).
Dims: B sequences, L history, U batch items, N catalogue, D width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hllm.data.batches import TrainBatch
from hllm.data.text import PAD_ID, PackedItems
from hllm.models.adaptor import OutputStandardizer, build_adaptor
from hllm.models.item_encoder import ItemEncoder
from hllm.models.item_ids import ItemIdTable, drop_ids
from hllm.models.losses import LogitScale, catalogue_softmax, info_nce
from hllm.models.user_encoder import UserEncoder

COSINE_SAMPLE = 128
MEMORY_CHUNK = 256  # items per top-layer pass when the memory is refreshed


def mean_pairwise_cosine(embeddings: Tensor) -> float:
    """Mean cosine between distinct rows of a sample: near 1 means the item embeddings collapsed."""
    sample = F.normalize(embeddings[:COSINE_SAMPLE].detach().float(), dim=-1)
    n = len(sample)
    if n < 2:
        return float("nan")
    sims = sample @ sample.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


class HLLM(nn.Module):
    """Item LLM -> adaptor -> User LLM, trained with InfoNCE on a shared negative bank (or, when the
    item side is frozen, with a softmax over the whole catalogue).

    Three item sides: trained end to end from text; frozen, its outputs cached once (`item_cache`);
    or trained in its top layers only, over cached token states of the frozen layers below
    (`lower_states`). A catalogue softmax over outputs cached while the top layers train leaks:
    the model learns to tell the batch's fresh outputs from the stale rest. So the top-layer side
    uses the bank, which is encoded fresh (`in_batch_negatives` widens it for free), or a memory of
    every item's output refreshed every `memory_refresh` steps. Every row of that softmax, the
    targets' included, comes from the memory, and the fresh outputs feed only the User LLM's inputs
    (so the top layers learn through the histories), as MoCo takes keys from one slow encoder:
    with the batch's items fresh in the table and the rest from the memory, the User LLM learned to
    prefer fresh rows even when the two agreed to cosine 0.92-0.98 (BENCHMARKS.md). The drift is
    logged as `memory_cosine` (memory row vs fresh output).

    `item_ids` adds a learned ID row to every trained item's text embedding, each occurrence
    dropping it with probability `id_dropout` while training so that the text alone stays a good
    model; with no `item_encoder` the ID rows are the whole item side (`hllm-id`).

    `last_item_text` = beta > 0: every ranking score adds beta times the cosine between the Item
    LLM outputs (as the adaptor reads them) of the candidate and of the user's most recent item,
    the signal text-knn ranks by. Ranking only: training is unchanged, so the term is an ensemble
    of the trained model with that text signal (trained with the term in its softmax, the model was
    worse on validation: BENCHMARKS.md). Both sides carry it as extra columns: an item's vector is
    [e, sqrt(beta) t] and a user's [u, sqrt(beta) t_last], so ranking stays one dot product (faiss,
    serving and new items unchanged) and `user_inputs` strips it for the User LLM.
    `last_item_text_decay` = d > 0 replaces t_last by the sum of the history's t weighted d^age
    (age 0 = the most recent item): the items just before the last add to its term, each at d times
    the weight of the one after it.
    """

    def __init__(
        self,
        item_encoder: ItemEncoder | None,
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
        item_ids: ItemIdTable | None = None,
        id_dropout: float = 0.0,
        memory_refresh: int = 0,
        standardize: bool = False,
        last_item_text: float = 0.0,
        last_item_text_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if item_encoder is None and item_ids is None:
            raise ValueError("an HLLM needs an Item LLM, an item-ID table, or both")
        if last_item_text and item_encoder is None:
            raise ValueError("last_item_text needs an Item LLM")
        self.item_encoder = item_encoder
        self.user_encoder = user_encoder
        self.item_ids = item_ids
        self.id_dropout = id_dropout
        self.user_width = user_width
        self.last_item_text = last_item_text
        self.last_item_text_decay = last_item_text_decay
        # Frozen outputs standardised per dimension (a module only when asked: no state otherwise).
        self.standardizer = OutputStandardizer(item_width) if standardize else None
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
        # Negatives "memory": every item's Item LLM output (N, D_item), recomputed every
        # `memory_refresh` training steps (0 = no memory); `memory_age` counts steps since.
        self.register_buffer("memory", None, persistent=False)
        # (N,) bool: items no catalogue softmax may use as negatives (the protocol's new items).
        self.register_buffer("held_out_items", None, persistent=False)
        self.memory_refresh = memory_refresh
        self.memory_age = 0
        # Identity until `share_negatives` hands over the all-gathers of several processes.
        self.gather: Callable[[Tensor], Tensor] = lambda x: x
        self.gather_ids: Callable[[Tensor], Tensor] = lambda x: x
        self.last_stats: dict[str, float] = {}

    def share_negatives(
        self, gather: Callable[[Tensor], Tensor], gather_ids: Callable[[Tensor], Tensor]
    ) -> None:
        """Score against one negative bank shared by every process: `gather` collects the negative
        embeddings of all processes (with their gradient), `gather_ids` their item ids."""
        self.gather, self.gather_ids = gather, gather_ids

    @property
    def needs_text(self) -> bool:
        return self.item_encoder is not None and not (self.frozen_items or self.top_layers_only)

    @property
    def top_layers_only(self) -> bool:
        """The Item LLM trains only its top layers, over cached states of the ones below."""
        return self.item_encoder is not None and self.item_encoder.frozen_layers > 0

    @property
    def appended_tokens(self) -> int:
        return 0 if self.item_encoder is None else self.item_encoder.appended_tokens

    @property
    def num_items(self) -> int:
        """Rows of the catalogue a softmax scores (PAD included), from what the item side caches."""
        if self.item_encoder is None:
            return len(self.item_ids.trained)
        if self.top_layers_only:
            return len(self.lower_offsets) - 1
        return len(self.item_cache)

    def encode_items(self, item_ids: Tensor, text: PackedItems | None) -> Tensor:
        """Normalised item embeddings (N, D_user): the projected Item LLM outputs from text (or the
        caches), plus their ID rows where text+ID items have one; `hllm-id`: the ID rows alone.
        With `last_item_text`, the text term's columns follow (N, D_user + D_item)."""
        outputs = self._standardized(self._item_outputs(item_ids, text).float())
        embeddings = self._combine(*self._parts_of(outputs, item_ids))
        if not self.last_item_text:
            return embeddings
        return torch.cat([embeddings, self._text_term(outputs)], dim=-1)

    def user_inputs(self, item_table: Tensor) -> Tensor:
        """The part of `encode_items`' rows (..., D) the User LLM reads (..., D_user)."""
        return item_table[..., : self.user_width]

    def _item_parts(self, item_ids: Tensor, text: PackedItems | None) -> tuple[Tensor, Tensor | None]:
        """The projected item side (N, D_user) and the ID rows to add to it (N, D_user; None: none)."""
        return self._parts_of(self._standardized(self._item_outputs(item_ids, text).float()), item_ids)

    def _parts_of(self, outputs: Tensor, item_ids: Tensor) -> tuple[Tensor, Tensor | None]:
        adds_ids = self.item_ids is not None and self.item_encoder is not None
        return self.projection(outputs), self.item_ids(item_ids) if adds_ids else None

    def _text_term(self, outputs: Tensor) -> Tensor:
        """sqrt(beta) times the unit (standardised) Item LLM outputs (N, D_item): a dot product of
        two such rows is `last_item_text` times their cosine."""
        return self.last_item_text**0.5 * F.normalize(outputs, dim=-1)

    def _standardized(self, outputs: Tensor) -> Tensor:
        return outputs if self.standardizer is None else self.standardizer(outputs)

    @staticmethod
    def _combine(base: Tensor, ids: Tensor | None) -> Tensor:
        """Unit item embeddings. Text+ID: the unit text embedding plus the ID row, renormalised, so
        the two parts have known scales and an ID row (zero at the start) moves an item only as far
        as training pushes it; a zero row (no ID, or dropped) leaves the text embedding as it is."""
        if ids is None:
            return F.normalize(base, dim=-1)
        return F.normalize(F.normalize(base, dim=-1) + ids, dim=-1)

    def _item_outputs(self, item_ids: Tensor, text: PackedItems | None) -> Tensor:
        """Item LLM outputs (N, D_item): from text, the top layers over cached states, or the cache;
        `hllm-id`: the ID rows."""
        if self.item_encoder is None:
            return self.item_ids(item_ids)
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
        """Store the frozen Item LLM outputs for every item id (row 0 = PAD); fit the standardiser
        on every row but PAD and the protocol's new items, unless it already holds statistics
        (loaded with the weights)."""
        self.item_cache = raw_table.detach()
        if self.standardizer is not None and not self.standardizer.fitted:
            self.standardizer.fit(raw_table, self.held_out_items)

    @torch.no_grad()
    def cache_lower_states(self, states: Tensor, offsets: Tensor) -> None:
        """Store every item's token states below the trained top layers, end to end (T_all, D_item),
        and where each item starts in them (N + 1,)."""
        self.lower_states, self.lower_offsets = states, offsets

    def encode_users(self, history: Tensor, item_table: Tensor) -> Tensor:
        """Normalised prediction of the next item for left-padded histories (B, L) -> (B, D), D
        the width of `item_table` (N, D) from `encode_items`: with `last_item_text`, the user's
        side of the text term (`_recent_text`) follows the User LLM's prediction."""
        mask = history != PAD_ID
        inputs = self.user_inputs(item_table)
        states = self.user_encoder.last_state(inputs[history] * mask.unsqueeze(-1), mask)
        users = F.normalize(states.float(), dim=-1)
        if not self.last_item_text:
            return users
        return torch.cat([users, self._recent_text(history, item_table)], dim=-1)

    def _recent_text(self, history: Tensor, item_table: Tensor) -> Tensor:
        """The user's side of the text term (B, D_item): the most recent item's term columns, or
        with `last_item_text_decay` = d their sum over the history weighted d^age."""
        terms = item_table[:, self.user_width :]
        if not self.last_item_text_decay:
            return terms[history[:, -1]].float()
        age = torch.arange(history.shape[1] - 1, -1, -1, device=history.device)  # (L,) latest last
        weights = self.last_item_text_decay**age * (history != PAD_ID)  # (B, L)
        return torch.einsum("bl,bld->bd", weights, terms[history].float())

    def training_loss(self, batch: TrainBatch) -> Tensor:
        self.last_stats = {}
        if self.memory_refresh and self.training:
            self._refresh_memory()
        base, ids = self._item_parts(batch.batch_items, batch.text)  # (U, D), (U, D) | None
        embeddings = self._combine(base, ids)  # (U, D) every ID row kept

        def occurrences(index: Tensor) -> Tensor:
            """(..., D) embeddings of the batch items at `index` (...), one ID dropout draw each."""
            if ids is None:
                return embeddings[index]
            return self._combine(base[index], drop_ids(ids[index], self.id_dropout, self.training))

        present = (batch.items != 0).unsqueeze(-1)
        sequence = occurrences(batch.item_index) * present  # (B, L+1, D)
        outputs = self.user_encoder(sequence[:, :-1], batch.mask)  # (B, L, D)
        user = outputs[batch.mask]  # (n, D) only real positions
        target = sequence[:, 1:][batch.mask]  # (n, D)
        scale = self.logit_scale()
        if self.catalogue_negatives:
            table = self._catalogue(batch.batch_items, base)  # (N, D)
            # Text+ID: the targets' own ID dropout draws; from a memory, its rows like every other.
            positives = None if ids is None or self.memory is not None else target
            out = catalogue_softmax(
                user,
                table,
                batch.items[:, 1:][batch.mask],
                scale,
                positives=positives,
                excluded=self.held_out_items,
            )
        else:
            # Each bank item occurs once in the bank: one fresh draw per row is one per occurrence.
            bank = embeddings if ids is None else occurrences(torch.arange(len(base), device=base.device))
            negatives, bank_ids, gather = self._negative_bank(batch, bank)
            out = info_nce(
                user,
                target,
                negatives,
                scale,
                threshold=self.nce_threshold,
                gather=gather,
                excluded=self._own_items(batch, bank_ids),
            )
        self.last_stats |= {
            "accuracy": out.accuracy,
            "temperature": self.logit_scale.temperature,
            "item_cosine": mean_pairwise_cosine(embeddings),
            "negatives_kept": out.negatives_kept,
        }
        return out.loss

    def _catalogue(self, batch_items: Tensor, fresh: Tensor) -> Tensor:
        """Every item's embedding (N, D) for a catalogue softmax: from the frozen cache or the ID
        table, or all from the memory (the batch's items (U,) too: their `fresh` projected outputs
        (U, D) only measure the drift); text+ID rows each with their own ID dropout draw."""
        every = torch.arange(self.num_items, device=fresh.device)
        if self.memory is None:
            rows, ids = self._item_parts(every, None)
        else:
            rows = self.projection(self.memory.float())  # (N, D)
            with torch.no_grad():
                drift = F.cosine_similarity(rows[batch_items], fresh, dim=-1).mean()
            self.last_stats["memory_cosine"] = float(drift)
            ids = None if self.item_ids is None else self.item_ids(every)
        if ids is not None:
            ids = drop_ids(ids, self.id_dropout, self.training)
        return self._combine(rows, ids)

    @torch.no_grad()
    def _refresh_memory(self) -> None:
        """Recompute every item's output with the current top layers when the memory is
        `memory_refresh` steps old (or missing: the first step, or after a resume)."""
        if self.memory is not None and self.memory_age < self.memory_refresh:
            self.memory_age += 1
            return
        training = self.item_encoder.training
        self.item_encoder.eval()
        every = torch.arange(self.num_items, device=self.lower_offsets.device)
        self.memory = torch.cat([self._item_outputs(ids, None) for ids in every.split(MEMORY_CHUNK)])
        self.item_encoder.train(training)
        self.memory_age = 1

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
