"""Build the model a config describes (the one place that reads `ModelConfig`), with LoRA
wrapping and the caches of a frozen item side."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn

from hllm.config import RunConfig
from hllm.data.batches import training_items
from hllm.data.dataset import SequenceData
from hllm.data.text import ItemTokens, pack_items, tokenize_items
from hllm.errors import UserError
from hllm.models.backbone import load_backbone, set_dropout
from hllm.models.hllm import HLLM
from hllm.models.hstu import build_hstu
from hllm.models.id_recommender import IdRecommender
from hllm.models.item_encoder import ItemEncoder
from hllm.models.popularity import Popularity
from hllm.models.sasrec import build_sasrec
from hllm.models.user_encoder import UserEncoder

DENSE_MEAN_HISTORY = 20  # interactions per user from which data counts as dense (MovieLens, not Amazon)
FULL_SOFTMAX_MAX_ITEMS = 200_000  # past this, (positions x catalogue) logits cost too much memory


def add_lora(module: nn.Module, rank: int, alpha: int) -> None:
    """Inject LoRA adapters into every linear layer of `module`; only the adapters stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear"), module)
    for name, param in module.named_parameters():
        param.requires_grad = "lora_" in name


def build_model(config: RunConfig, data: SequenceData) -> tuple[nn.Module, ItemTokens | None]:
    """The model `config.model` describes, plus the catalogue's item tokens when it reads text."""
    match config.model.kind:
        case "popularity":
            return Popularity(training_items(data), data.num_items), None
        case "hllm":
            return _build_hllm(config, data)
        case "sasrec" | "hstu":
            return _build_id_model(config, data), None


def _build_id_model(config: RunConfig, data: SequenceData) -> IdRecommender:
    """SASRec or HSTU; unset knobs follow the data: Kang & McAuley's dropout of 0.2 on dense data
    (MovieLens) and 0.5 on sparse data (Amazon); a full softmax while the catalogue is small enough."""
    id_cfg = config.model.id
    dense = len(data.items) / max(data.num_users, 1) >= DENSE_MEAN_HISTORY
    dropout = id_cfg.dropout if id_cfg.dropout is not None else (0.2 if dense else 0.5)
    loss = id_cfg.loss
    if loss == "auto":
        loss = "full" if data.num_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled"
    build = build_sasrec if config.model.kind == "sasrec" else partial(build_hstu, time_bias=id_cfg.time_bias)
    torch.manual_seed(config.train.seed)
    return build(
        data.num_items,
        config.data.max_history,
        width=id_cfg.hidden_size,
        layers=id_cfg.layers,
        heads=id_cfg.heads,
        dropout=dropout,
        attention_dropout=id_cfg.attention_dropout if id_cfg.attention_dropout is not None else dropout,
        loss=loss,
        temperature=config.model.temperature,
        nce_threshold=config.model.nce_threshold,
    )


def _build_hllm(config: RunConfig, data: SequenceData) -> tuple[HLLM, ItemTokens]:
    item_cfg, user_cfg = config.model.item, config.model.user
    torch.manual_seed(config.train.seed)
    item_backbone = load_backbone(item_cfg.backbone, pretrained=item_cfg.pretrained)
    user_backbone = load_backbone(user_cfg.backbone, pretrained=user_cfg.pretrained)
    if item_backbone.tokenizer is None:
        raise UserError(
            f"{item_cfg.backbone!r} has no tokenizer to read item text", where="model.item.backbone"
        )
    if item_cfg.dropout is not None:
        set_dropout(item_backbone.model, item_cfg.dropout)
    item_encoder = ItemEncoder(item_backbone, pooling=item_cfg.pooling, train_layers=item_cfg.train_layers)
    frozen = item_cfg.mode == "frozen"
    if frozen:
        item_encoder.requires_grad_(False)
    elif item_cfg.mode == "lora":
        add_lora(item_backbone.model, item_cfg.lora_rank, item_cfg.lora_alpha)
    if config.train.gradient_checkpointing:
        item_encoder.set_gradient_checkpointing(True)
    model = HLLM(
        item_encoder,
        UserEncoder(user_backbone, dropout=user_cfg.dropout),
        item_width=item_backbone.hidden_size,
        user_width=user_backbone.hidden_size,
        temperature=config.model.temperature,
        nce_threshold=config.model.nce_threshold,
        frozen_items=frozen,
        catalogue_negatives=config.train.negatives == "catalogue",
        in_batch_negatives=config.train.in_batch_negatives,
        exclude_own_items=config.train.exclude_own_items,
        adaptor=_adaptor(
            config.model.adaptor,
            frozen or item_cfg.train_layers > 0,
            item_backbone.hidden_size,
            user_backbone.hidden_size,
        ),
    )
    tokens = tokenize_items(list(data.item_text), item_backbone.tokenizer, config.data.max_text_tokens)
    return model, tokens


def _adaptor(kind: str, mostly_frozen: bool, item_width: int, user_width: int) -> str:
    if kind != "auto":
        return kind
    if mostly_frozen:
        return "mlp"
    return "none" if item_width == user_width else "linear"


@torch.no_grad()
def cache_frozen_items(
    model: nn.Module, tokens: ItemTokens, *, batch_size: int, device: torch.device | str
) -> None:
    """Run the frozen part of the Item LLM once over the catalogue and keep what it computes: the
    items' outputs when it is all frozen; with only its top layers trained, the token states below."""
    top_only = getattr(model, "top_layers_only", False)
    if not (getattr(model, "frozen_items", False) or top_only):
        return
    training = model.item_encoder.training
    model.item_encoder.eval()
    encode = model.item_encoder.lower_states if top_only else model.item_encoder
    rows = []
    for first in range(0, len(tokens), batch_size):
        ids = np.arange(first, min(first + batch_size, len(tokens)))
        rows.append(encode(pack_items(tokens, ids, slots=model.item_slots).to(device)))
    if top_only:
        lengths = torch.from_numpy(np.diff(tokens.offsets)).to(device) + model.item_slots
        model.cache_lower_states(torch.cat(rows), torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]))
    else:
        model.cache_items(torch.cat(rows))
    model.item_encoder.train(training)
