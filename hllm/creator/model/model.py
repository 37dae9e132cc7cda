"""CreativeLLM: an HLLM user embedding, projected into a causal LM's input space, written into the
[USER] position of the prompt; the LM writes the title for that user.

Losses (each weighted, 0 = off): creative (the target title), recon (the interest profile from the
same projected user vector), align (InfoNCE between the user embedding and the LM's encoding of the profile),
cls (user-item matching; scores (cluster, item) pairs at inference), contrast (the row's user must raise
its own title's likelihood more than another user's title for the same item, over the no-user reference).
Dims: B rows, L history, T tokens, Du User LLM width, H creative width, K negatives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hllm.creator.data.grounded import Fact, PhraseEncoder
from hllm.creator.model.heads import Matcher
from hllm.creator.model.layout import Padded, PromptLayout, Sequence, angle_text, pad
from hllm.creator.model.losses import (
    IGNORE,
    align_loss,
    contrast_loss,
    matching_loss,
    mean_token_loss,
    sequence_log_likelihood,
    target_token_loss,
)
from hllm.creator.model.selector import FactSelector
from hllm.data.text import ItemTokens, pack_items
from hllm.models.hllm import HLLM
from hllm.models.losses import LogitScale

UserEmbedding = Literal["last", "query"]


@dataclass(frozen=True)
class LossWeights:
    creative: float = 1.0
    recon: float = 0.0
    align: float = 0.0
    cls: float = 0.0
    contrast: float = 0.0


@dataclass
class CreatorBatch:
    """One training batch: histories, the three padded sequences, and the cls candidates."""

    history: Tensor  # (B, L) internal item ids, left-padded with 0
    creative: Padded  # prompt + target title
    contrast: Padded  # prompt + another user's title for the same item (labels IGNORE: none)
    recon: Padded  # [USER] cue + profile
    profile: Padded  # profile + [END]; labels unused
    items: Tensor  # (B,) each row's item (the cls positive)
    negatives: Tensor  # (B, K) cls negative item ids
    valid: Tensor  # (B, K) bool: which negatives count

    @property
    def mask(self) -> Tensor:
        """(B,) the rows, which the training loop counts for its throughput."""
        return torch.ones(len(self.items), dtype=torch.bool)

    def to(self, device: torch.device | str) -> CreatorBatch:
        return CreatorBatch(
            self.history.to(device),
            self.creative.to(device),
            self.contrast.to(device),
            self.recon.to(device),
            self.profile.to(device),
            self.items.to(device),
            self.negatives.to(device),
            self.valid.to(device),
        )


class CreativeLLM(nn.Module):
    """HLLM (frozen unless `train_hllm`) + projector + causal LM + the auxiliary heads.

    Args:
        hllm: a trained HLLM; its User LLM gives the user embedding.
        lm: a causal LM with its LM head (full or with LoRA adapters).
        layout: the prompt layout over the LM's tokenizer.
        item_tokens: the catalogue's HLLM item tokens, needed only when the HLLM is trained and
            reads text (otherwise item embeddings are computed once, in `item_table`).
        fact_encoder: the grounded teacher's phrase encoder; given, the model has a fact selector
            (`selector.py`) that ranks an item's facts with it.
    """

    def __init__(
        self,
        hllm: HLLM,
        lm: nn.Module,
        layout: PromptLayout,
        *,
        user_width: int,
        weights: LossWeights,
        user_embedding: UserEmbedding = "last",
        train_hllm: bool = False,
        item_tokens: ItemTokens | None = None,
        cls_dim: int = 256,
        cls_head: Literal["linear", "mixer"] = "mixer",
        cls_blocks: int = 2,
        align_temperature: float = 0.05,
        nce_threshold: float = 0.99,
        fact_encoder: PhraseEncoder | None = None,
    ) -> None:
        super().__init__()
        self.hllm, self.lm, self.layout = hllm, lm, layout
        self.weights, self.user_embedding, self.train_hllm = weights, user_embedding, train_hllm
        self.item_tokens, self.nce_threshold = item_tokens, nce_threshold
        if not train_hllm:
            hllm.requires_grad_(False)
        width = lm.get_input_embeddings().embedding_dim
        self.projector = nn.Linear(user_width, width, bias=False)
        # A unit-norm user vector then lands with the norm of an average token embedding.
        token_norm = lm.get_input_embeddings().weight.detach().float().norm(dim=-1).mean()
        nn.init.normal_(self.projector.weight, std=float(token_norm) / width**0.5)
        self.query = nn.Parameter(torch.randn(user_width) * 0.02) if user_embedding == "query" else None
        self.align_projector = nn.Linear(user_width, width, bias=False)
        self.end_token = nn.Parameter(torch.randn(width) * 0.02)
        self.align_scale = LogitScale(align_temperature)
        self.matcher = Matcher(width, user_width, dim=cls_dim, head=cls_head, blocks=cls_blocks)
        self.fact_encoder = fact_encoder
        self.selector = FactSelector(user_width, fact_encoder.width) if fact_encoder else None
        # Frozen HLLM: every item's normalised embedding, computed once (N, Du).
        self.register_buffer("item_table", None, persistent=False)
        self.last_stats: dict[str, float] = {}

    def share_negatives(
        self, gather: Callable[[Tensor], Tensor], gather_ids: Callable[[Tensor], Tensor]
    ) -> None:
        """Part of the training loop's `Trainable`: the cls negatives of a row are the batch's
        other items and random catalogue items, scored on this process, so there is no shared
        bank to gather into."""

    def train(self, mode: bool = True) -> CreativeLLM:
        super().train(mode)
        if not self.train_hllm:
            self.hllm.eval()  # a frozen HLLM never runs dropout
        return self

    @torch.no_grad()
    def cache_item_table(self, *, batch_size: int = 256) -> None:
        """Frozen HLLM: encode the whole catalogue once (row 0 = PAD)."""
        if self.train_hllm:
            return
        device = self.projector.weight.device
        count = len(self.hllm.item_cache) if self.hllm.item_cache is not None else len(self.item_tokens)
        rows = [
            self._encode_items(torch.arange(first, min(first + batch_size, count), device=device))
            for first in range(0, count, batch_size)
        ]
        self.item_table = torch.cat(rows)

    def _encode_items(self, ids: Tensor) -> Tensor:
        text = None
        if self.hllm.needs_text:
            text = pack_items(
                self.item_tokens, ids.cpu().numpy(), appended_tokens=self.hllm.appended_tokens
            ).to(ids.device)
        return self.hllm.user_inputs(self.hllm.encode_items(ids, text))  # no last-item text term

    def item_vectors(self, ids: Tensor) -> Tensor:
        """Normalised HLLM item embeddings of any id tensor (..., ) -> (..., Du)."""
        if self.item_table is not None:
            return self.item_table[ids]
        unique, inverse = torch.unique(ids, return_inverse=True)
        return self._encode_items(unique)[inverse]

    def user_vectors(self, history: Tensor) -> Tensor:
        """Normalised user embeddings (B, Du) of left-padded histories (B, L)."""
        mask = history != 0
        items = self.item_vectors(history) * mask.unsqueeze(-1)  # (B, L, Du)
        encoder = self.hllm.user_encoder
        if self.query is None:
            hidden = encoder.last_state(items, mask)
        else:
            query = self.query.to(items.dtype).expand(len(items), 1, -1)
            with_query = torch.cat([items, query], dim=1)  # (B, L+1, Du)
            hidden = encoder(with_query, F.pad(mask, (0, 1), value=True))[:, -1]
        return F.normalize(hidden.float(), dim=-1)

    def angles(self, users: Tensor | None, items: list[tuple[str, list[Fact]]]) -> list[str] | None:
        """Each row's [ANGLE] text: the selector's facts for (B, Du) user vectors (None: no user) and
        each row's (original title, candidate facts); None when the model has no selector."""
        if self.selector is None:
            return None
        return [angle_text(facts) for facts in self.selector.choose(users, items, self.fact_encoder)]

    def embed(self, padded: Padded, projected: Tensor | None) -> Tensor:
        """Token embeddings (B, T, H) with each row's [USER] position overwritten by `projected` (B, H)."""
        embeddings = self.lm.get_input_embeddings()(padded.ids)
        if projected is None:
            return embeddings
        rows = (padded.user_position >= 0).nonzero().squeeze(-1)
        return embeddings.index_put((rows, padded.user_position[rows]), projected[rows].to(embeddings.dtype))

    def hidden_states(self, padded: Padded, embeddings: Tensor) -> Tensor:
        """The LM's last hidden states (B, T, H); positions count real tokens only."""
        positions = (padded.mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.lm.base_model(
            inputs_embeds=embeddings,
            attention_mask=padded.mask.long(),
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state

    def encode_profiles(self, padded: Padded) -> Tensor:
        """The LM's normalised hidden state at each right-padded profile's [END] token (B, H)."""
        end = padded.mask.sum(-1) - 1  # (B,)
        rows = torch.arange(len(end), device=end.device)
        embeddings = self.lm.get_input_embeddings()(padded.ids)
        embeddings = embeddings.index_put(
            (rows, end), self.end_token.to(embeddings.dtype).expand(len(end), -1)
        )
        hidden = self.hidden_states(padded, embeddings)[rows, end]
        return F.normalize(hidden.float(), dim=-1)

    def training_loss(self, batch: CreatorBatch) -> Tensor:
        users = self.user_vectors(batch.history)  # (B, Du)
        projected = self.projector(users)  # (B, H)
        head = self.lm.get_output_embeddings()
        losses: dict[str, Tensor] = {}
        contrasted = (batch.contrast.labels != IGNORE).any(-1)  # (B,) rows with another user's title
        contrast = bool(self.weights.contrast and contrasted.any())
        if (self.weights.creative or contrast) and (batch.creative.labels != IGNORE).any():  # a kept row
            own = self.hidden_states(batch.creative, self.embed(batch.creative, projected))
            own_total = sequence_log_likelihood(own, batch.creative.labels, head)  # (B,) one LM head pass
            losses["creative"] = mean_token_loss(own_total, batch.creative.labels)
            if contrast:
                other = self.hidden_states(batch.contrast, self.embed(batch.contrast, projected))
                other_total = sequence_log_likelihood(other, batch.contrast.labels, head)
                gains = [
                    total - self._without_user(padded, head)
                    for total, padded in ((own_total, batch.creative), (other_total, batch.contrast))
                ]
                losses["contrast"] = contrast_loss(*(gain[contrasted] for gain in gains))
        if self.weights.recon:
            hidden = self.hidden_states(batch.recon, self.embed(batch.recon, projected))
            losses["recon"] = target_token_loss(hidden, batch.recon.labels, head)
        if self.weights.align:
            profiles = self.encode_profiles(batch.profile)
            aligned = self.align_projector(users)
            losses["align"] = align_loss(aligned, profiles, self.align_scale(), threshold=self.nce_threshold)
        if self.weights.cls:
            tower = self.matcher.item_tower
            losses["cls"] = matching_loss(
                self.matcher.head,
                self.matcher.user_tower(projected),
                tower(self.item_vectors(batch.items)),
                tower(self.item_vectors(batch.negatives)),
                batch.valid,
            )
        total = sum(getattr(self.weights, name) * value for name, value in losses.items())
        self.last_stats = {f"{name}_loss": value.item() for name, value in losses.items()}
        return total

    @torch.no_grad()
    def _without_user(self, padded: Padded, head: nn.Module) -> Tensor:
        """The reference of the contrast loss: each row's title log-likelihood (B,) with no user."""
        return sequence_log_likelihood(
            self.hidden_states(padded, self.embed(padded, None)), padded.labels, head
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: list[Sequence],
        projected: Tensor | None,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        n: int = 1,
    ) -> list[list[str]]:
        """`n` titles per prompt (greedy at temperature 0): the first line of each answer."""
        padded = pad(prompts, self.layout.placeholder, side="left").to(self.projector.weight.device)
        tokenizer = self.layout.tokenizer
        sampling = {"temperature": temperature, "top_p": 0.95} if temperature > 0 else {}
        output = self.lm.generate(
            inputs_embeds=self.embed(padded, projected),
            attention_mask=padded.mask.long(),
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            do_sample=temperature > 0,
            pad_token_id=self.layout.placeholder,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        texts = [_first_line(text) for text in tokenizer.batch_decode(output, skip_special_tokens=True)]
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def pad_histories(histories: list[np.ndarray], length: int) -> Tensor:
    """The last `length` items of each history, left-padded with 0 -> (B, length)."""
    rows = torch.zeros((len(histories), length), dtype=torch.long)
    for row, history in enumerate(histories):
        recent = history[-length:]
        if len(recent):
            rows[row, length - len(recent) :] = torch.as_tensor(recent, dtype=torch.long)
    return rows
