"""IdRecommender: an item-id embedding table, learned positions and a causal sequence encoder
(SASRec or HSTU blocks), trained with BCE, sampled softmax or full softmax.

Dims: B sequences, L history, N catalogue (row 0 = PAD), K negatives, n valid positions, D width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hllm.data.batches import TrainBatch
from hllm.data.text import PAD_ID, PackedItems
from hllm.models.losses import LogitScale, NceOutput, binary_cross_entropy, catalogue_softmax, info_nce

IdLoss = Literal["bce", "sampled", "full"]
INIT_STD = 0.02


def positions_from_end(mask: Tensor) -> Tensor:
    """(B, L) -> (B, L) real items after each position: 0 for the most recent. Counting from the end makes
    the output independent of how much padding there is and on which side."""
    after = mask.flip(-1).long().cumsum(-1).flip(-1)  # (B, L) real items at or after the position
    return (after - 1).clamp(min=0)


def attention_mask(mask: Tensor) -> Tensor:
    """(B, L) real positions -> (B, L, L) bool: query i may read key j <= i when j is real. Every position
    also reads itself, so a padding query's row is never empty (an all-masked softmax row is NaN)."""
    length = mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()  # (L, L)
    itself = torch.eye(length, dtype=torch.bool, device=mask.device)  # (L, L)
    return (causal & mask[:, None, :]) | itself  # (B, L, L)


def last_real(states: Tensor, mask: Tensor) -> Tensor:
    """(B, L, D) -> (B, D) the state of each row's most recent real position (the last one when empty)."""
    length = mask.shape[-1]
    index = length - 1 - mask.flip(-1).long().argmax(-1)  # (B,) argmax finds the last True
    index = torch.where(mask.any(-1), index, length - 1)
    return states[torch.arange(len(states), device=states.device), index]


class IdRecommender(nn.Module):
    """Item ids -> embeddings (+ learned positions) -> causal encoder -> next-item prediction.

    `encoder(x (B, L, D), allowed (B, L, L), positions (B, L), times (B, L) | None) -> (B, L, D)` is
    SasRec or Hstu. The same table embeds inputs and scores outputs. `bce` scores with dot products
    (Kang & McAuley); `sampled` and `full` with cosines times a learnable scale, so the item table is
    L2-normalised.
    """

    needs_text = False
    appended_tokens = 0

    def __init__(
        self,
        encoder: nn.Module,
        num_items: int,
        width: int,
        max_length: int,
        *,
        loss: IdLoss = "full",
        dropout: float = 0.2,
        temperature: float = 0.07,
        nce_threshold: float = 0.99,
    ) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding(num_items, width, padding_idx=PAD_ID)
        self.position_embedding = nn.Embedding(max_length, width)
        for table in (self.item_embedding, self.position_embedding):
            nn.init.normal_(table.weight, std=INIT_STD)
        with torch.no_grad():
            self.item_embedding.weight[PAD_ID].zero_()
        self.dropout = nn.Dropout(dropout)
        # (N,) bool: items no loss draws as negatives, full softmax or bce (the protocol's new items).
        self.register_buffer("held_out_items", None, persistent=False)
        self.encoder = encoder
        self.max_length = max_length
        self.loss = loss
        # A buffer under bce (dot products): an unused parameter would stall DDP's gradient sync.
        self.logit_scale = LogitScale(temperature, learnable=loss != "bce")
        self.nce_threshold = nce_threshold
        # Identity until `share_negatives` hands over the all-gathers of several processes.
        self.gather: Callable[[Tensor], Tensor] = lambda x: x
        self.last_stats: dict[str, float] = {}

    def share_negatives(
        self, gather: Callable[[Tensor], Tensor], gather_ids: Callable[[Tensor], Tensor]
    ) -> None:
        """Score against one negative bank shared by every process: `gather` collects the negative
        embeddings of all processes (with their gradient); no negative is masked by id here, so
        `gather_ids` is not needed."""
        self.gather = gather

    @property
    def reads_time(self) -> bool:
        """Whether the encoder uses timestamps (HSTU's time bias); the evaluator then passes them."""
        return bool(getattr(self.encoder, "use_time", False))

    def _geometry(self, x: Tensor) -> Tensor:
        return x if self.loss == "bce" else F.normalize(x.float(), dim=-1)

    def encode_items(self, item_ids: Tensor, text: PackedItems | None = None) -> Tensor:
        """Item-table rows (N, D), L2-normalised for the cosine losses."""
        return self._geometry(self.item_embedding(item_ids))

    def encode_users(self, history: Tensor, item_table: Tensor, times: Tensor | None = None) -> Tensor:
        """Next-item prediction (B, D) for (B, L) padded histories (either side); `item_table` is
        unused: the encoder reads its own raw embeddings."""
        history = history[:, -self.max_length :]
        times = times[:, -self.max_length :] if times is not None else None
        mask = history != PAD_ID  # (B, L)
        return self._geometry(last_real(self.encode_sequence(history, mask, times), mask))

    def encode_sequence(self, items: Tensor, mask: Tensor, times: Tensor | None = None) -> Tensor:
        """(B, L) ids -> (B, L, D) states; state j predicts the item after position j."""
        positions = positions_from_end(mask)  # (B, L)
        x = self.item_embedding(items) * math.sqrt(self.item_embedding.embedding_dim)  # (B, L, D)
        x = self.dropout(x + self.position_embedding(positions)) * mask.unsqueeze(-1)
        return self.encoder(x, attention_mask(mask), positions, times)  # (B, L, D)

    def training_loss(self, batch: TrainBatch) -> Tensor:
        times = batch.times[:, :-1] if batch.times is not None else None  # (B, L)
        states = self.encode_sequence(batch.items[:, :-1], batch.mask, times)  # (B, L, D)
        user = states[batch.mask]  # (n, D)
        targets = batch.items[:, 1:][batch.mask]  # (n,)
        out = self._loss(user, targets, batch.negatives)
        self.last_stats = {"accuracy": out.accuracy, "negatives_kept": out.negatives_kept}
        if self.loss != "bce":
            self.last_stats["temperature"] = self.logit_scale.temperature
        return out.loss

    def _loss(self, user: Tensor, targets: Tensor, negatives: Tensor) -> NceOutput:
        embed = self.item_embedding
        match self.loss:
            case "bce":
                return binary_cross_entropy(
                    user,
                    embed(targets),
                    embed(sample_negatives(targets, len(embed.weight), excluded=self.held_out_items)),
                )
            case "sampled":
                return info_nce(
                    user,
                    embed(targets),
                    embed(negatives),
                    self.logit_scale(),
                    threshold=self.nce_threshold,
                    gather=self.gather,
                )
            case "full":
                return catalogue_softmax(
                    user,
                    embed.weight,
                    targets,
                    self.logit_scale(),
                    pad_id=PAD_ID,
                    excluded=self.held_out_items,
                )


def sample_negatives(targets: Tensor, num_items: int, *, excluded: Tensor | None = None) -> Tensor:
    """(n,) one id per target, uniform over the real items other than the target (never PAD) and
    other than `excluded` ((N,) bool: the protocol's new items, which training never sees)."""
    allowed = torch.ones(num_items, dtype=torch.bool, device=targets.device)
    allowed[PAD_ID] = False
    if excluded is not None:
        allowed &= ~excluded.to(targets.device)
    pool = allowed.nonzero().squeeze(-1)  # (P,) sorted ids; every target is among them
    drawn = torch.randint(0, len(pool) - 1, targets.shape, device=targets.device)  # (n,) in 0..P-2
    skip = (drawn >= torch.searchsorted(pool, targets)).long()  # step over the target's own index
    return pool[drawn + skip]
