"""UserEncoder: the User LLM reads a history of item embeddings and predicts the next one.

Dims: B histories, L history length, D width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hllm.errors import UserError
from hllm.models.backbone import Backbone, set_dropout


class UserEncoder(nn.Module):
    """A causal decoder over item embeddings (`inputs_embeds`); output j predicts item j + 1.

    `dropout` applies to the input item embeddings and the attention weights while training.
    """

    def __init__(self, backbone: Backbone, dropout: float = 0.0) -> None:
        super().__init__()
        if not backbone.is_decoder:
            raise UserError(
                f"the User LLM must be a causal decoder, but {backbone.name!r} is a bidirectional "
                "encoder (it would see the items it must predict)"
            )
        self.model = backbone.model
        # Only inputs_embeds are read: the token table would get no gradient, so freeze it to keep
        # it out of the optimiser and of DDP's unused-parameter check.
        self.model.get_input_embeddings().requires_grad_(False)
        set_dropout(self.model, dropout)  # attention weights
        self.input_dropout = nn.Dropout(dropout)

    def forward(self, embeddings: Tensor, mask: Tensor) -> Tensor:
        """Last hidden state (B, L, D), after the final norm, for histories padded on either side.

        Args:
            embeddings: (B, L, D) item embeddings; padded positions may hold anything finite.
            mask: (B, L) bool, True at real items.
        """
        mask = mask.bool()
        # Positions count real items only, so left and right padding give the same outputs.
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        hidden = self.model(
            inputs_embeds=self.input_dropout(embeddings),
            attention_mask=mask.long(),
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, L, D)
        # A padded query may have no key to attend to (left padding + causal + key padding);
        # its output is meaningless, so make it an exact zero rather than whatever the kernel gives.
        return torch.where(mask[..., None], hidden, hidden.new_zeros(()))

    def last_state(self, embeddings: Tensor, mask: Tensor) -> Tensor:
        """Output at each row's last real position (B, D): the prediction of the next item."""
        hidden = self(embeddings, mask)  # (B, L, D)
        positions = torch.arange(mask.shape[-1], device=mask.device)
        last = torch.where(mask.bool(), positions, -1).amax(-1).clamp(min=0)  # (B,)
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
