"""UserEncoder: the User LLM reads a history of item embeddings and predicts the next one.

Dims: B histories, L history length, D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel, apply_rotary_pos_emb

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
        # Llama layers (our small-llama and SmolLM2 presets) take the final-layer shortcut below.
        self.last_position_only = type(self.model) is LlamaModel and all(
            type(x) is LlamaDecoderLayer for x in self.model.layers
        )

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
        mask = mask.bool()
        if self.last_position_only and not self.training and mask[:, -1].all():
            return self._final_layer_at_last_position(embeddings, mask)
        hidden = self(embeddings, mask)  # (B, L, D)
        positions = torch.arange(mask.shape[-1], device=mask.device)
        last = torch.where(mask, positions, -1).amax(-1).clamp(min=0)  # (B,)
        return hidden[torch.arange(len(hidden), device=hidden.device), last]

    def _final_layer_at_last_position(self, embeddings: Tensor, mask: Tensor) -> Tensor:
        """`last_state` for histories that end at the last column (left-padded), in inference.

        Only the last position's output is read, so the final layer computes its query, attention
        output and MLP at that position alone; its keys and values still cover the whole history.
        In a 2-layer User LLM that is about 45% of the pass (serving, evaluation, batch scoring).
        """
        model = self.model
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L) as in forward
        causal = create_causal_mask(
            config=model.config, inputs_embeds=embeddings, attention_mask=mask.long(), cache=None,
            position_ids=position_ids,
        )  # fmt: skip
        cos, sin = model.rotary_emb(embeddings, position_ids=position_ids)  # (B, L, head_dim) each
        hidden = embeddings
        *early, final = model.layers
        for layer in early:
            hidden = layer(
                hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=position_ids
            )
        attention = final.self_attn
        normed = final.input_layernorm(hidden)  # (B, L, D)

        def heads(x: Tensor) -> Tensor:  # (B, T, H * head_dim) -> (B, H, T, head_dim)
            return x.view(*x.shape[:2], -1, attention.head_dim).transpose(1, 2)

        query, _ = apply_rotary_pos_emb(
            *[heads(attention.q_proj(normed[:, -1:]))] * 2, cos[:, -1:], sin[:, -1:]
        )
        key, _ = apply_rotary_pos_emb(*[heads(attention.k_proj(normed))] * 2, cos, sin)
        attended = F.scaled_dot_product_attention(
            query,
            key,
            heads(attention.v_proj(normed)),
            attn_mask=mask[:, None, None, :],
            scale=attention.scaling,
            enable_gqa=attention.num_key_value_groups > 1,
        )  # (B, H, 1, head_dim)
        last = hidden[:, -1] + attention.o_proj(attended.flatten(1))  # (B, D)
        last = last + final.mlp(final.post_attention_layernorm(last))
        return model.norm(last)
