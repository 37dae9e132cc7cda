"""Build the model a config describes (the one place that reads `ModelConfig`), with LoRA
wrapping and the caches of a frozen item side."""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from hllm.config import RunConfig
from hllm.data.batches import training_items
from hllm.data.dataset import SequenceData
from hllm.data.text import PAD_ID, ItemTokens, pack_items, tokenize_items
from hllm.errors import UserError
from hllm.files import atomic_write
from hllm.models.adaptor import OutputStandardizer
from hllm.models.backbone import load_backbone, set_dropout
from hllm.models.hllm import HLLM
from hllm.models.hstu import build_hstu
from hllm.models.id_recommender import IdRecommender
from hllm.models.item_encoder import ItemEncoder
from hllm.models.item_ids import ItemIdTable
from hllm.models.popularity import Popularity
from hllm.models.sasrec import build_sasrec
from hllm.models.text_knn import TextKnn
from hllm.models.user_encoder import UserEncoder

DENSE_MEAN_HISTORY = 20  # interactions per user from which data counts as dense (MovieLens, not Amazon)
FULL_SOFTMAX_MAX_ITEMS = 200_000  # past this, (positions x catalogue) logits cost too much memory
OUTPUTS_VERSION = 1  # of the on-disk frozen item outputs; bump when what they hold changes
ID_INIT_STD = 0.02  # hllm-id's item rows, as the ID baselines' (text+ID rows start at zero)


def add_lora(module: nn.Module, rank: int, alpha: int) -> None:
    """Inject LoRA adapters into every linear layer of `module`; only the adapters stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear"), module)
    for name, param in module.named_parameters():
        param.requires_grad = "lora_" in name


def build_model(config: RunConfig, data: SequenceData) -> tuple[nn.Module, ItemTokens | None]:
    """The model `config.model` describes, plus the catalogue's item tokens when it reads text.
    A trainable model learns nothing of the protocol's new items, not even as negatives."""
    model, item_tokens = _build(config, data)
    if hasattr(model, "held_out_items") and len(data.holdout.held_out):
        held_out = torch.zeros(data.num_items, dtype=torch.bool)
        held_out[torch.from_numpy(data.holdout.held_out)] = True
        model.held_out_items = held_out
    return model, item_tokens


def _build(config: RunConfig, data: SequenceData) -> tuple[nn.Module, ItemTokens | None]:
    match config.model.kind:
        case "popularity":
            return Popularity(training_items(data), data.num_items), None
        case "hllm":
            return _build_hllm(config, data)
        case "hllm-id":
            return _build_hllm_id(config, data), None
        case "sasrec" | "hstu":
            return _build_id_model(config, data), None
        case "text-knn":
            if config.model.item.pooling == "token":
                message = "text-knn needs pooled text (mean or cls); token pooling's [ITEM] is untrained"
                raise UserError(message, where="model.item.pooling")
            backbone = load_backbone(config.model.item.backbone, pretrained=config.model.item.pretrained)
            item_tokens = tokenize_items(
                list(data.item_text), backbone.tokenizer, config.data.max_text_tokens
            )
            standardizer = OutputStandardizer(backbone.hidden_size) if config.model.item.standardize else None
            encoder = ItemEncoder(backbone, pooling=config.model.item.pooling)
            return TextKnn(encoder, standardizer=standardizer), item_tokens


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
    data.require_item_text()
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
    user_width = user_backbone.hidden_size
    item_ids = None
    if item_cfg.id_embedding:  # zero at the start: the text+ID model starts as the text-only one
        item_ids = ItemIdTable(_trained_ids(data), user_width, init_std=0.0)
    model = HLLM(
        item_encoder,
        UserEncoder(user_backbone, dropout=user_cfg.dropout),
        item_width=item_backbone.hidden_size,
        user_width=user_width,
        frozen_items=frozen,
        adaptor=_adaptor(
            config.model.adaptor, frozen or item_cfg.train_layers > 0, item_backbone.hidden_size, user_width
        ),
        item_ids=item_ids,
        id_dropout=item_cfg.id_dropout,
        memory_refresh=config.train.memory_refresh if config.train.negatives == "memory" else 0,
        standardize=item_cfg.standardize,
        last_item_text=config.model.last_item_text,
        last_item_text_decay=config.model.last_item_text_decay,
        **_recipe(config),
    )
    item_tokens = tokenize_items(list(data.item_text), item_backbone.tokenizer, config.data.max_text_tokens)
    return model, item_tokens


def _build_hllm_id(config: RunConfig, data: SequenceData) -> HLLM:
    """HLLM's User LLM and recipe over a learned item-ID table in the User LLM's width instead of
    the Item LLM: what the user side does without item text (model.kind=hllm-id)."""
    torch.manual_seed(config.train.seed)
    user_cfg = config.model.user
    user_backbone = load_backbone(user_cfg.backbone, pretrained=user_cfg.pretrained)
    width = user_backbone.hidden_size
    return HLLM(
        None,
        UserEncoder(user_backbone, dropout=user_cfg.dropout),
        item_width=width,
        user_width=width,
        adaptor=_adaptor(config.model.adaptor, False, width, width),
        item_ids=ItemIdTable(_trained_ids(data), width, init_std=ID_INIT_STD),
        **_recipe(config),
    )


def _recipe(config: RunConfig) -> dict:
    """The loss and negatives settings every HLLM shares."""
    return {
        "temperature": config.model.temperature,
        "nce_threshold": config.model.nce_threshold,
        "catalogue_negatives": config.train.negatives in ("catalogue", "memory"),
        "in_batch_negatives": config.train.in_batch_negatives,
        "exclude_own_items": config.train.exclude_own_items,
    }


def _trained_ids(data: SequenceData) -> torch.Tensor:
    """(N,) bool: the items of the training split, the ones an ID row can be learned for."""
    trained = torch.zeros(data.num_items, dtype=torch.bool)
    trained[torch.from_numpy(training_items(data))] = True
    trained[PAD_ID] = False
    return trained


def _adaptor(kind: str, mostly_frozen: bool, item_width: int, user_width: int) -> str:
    if kind != "auto":
        return kind
    if mostly_frozen:
        return "mlp"
    return "none" if item_width == user_width else "linear"


@torch.no_grad()
def cache_frozen_items(
    model: nn.Module,
    item_tokens: ItemTokens,
    *,
    batch_size: int,
    device: torch.device | str,
    store: Path | None = None,
) -> None:
    """Run the frozen part of an HLLM's (or text-knn's) Item LLM once over the catalogue and keep
    what it computes: the items' outputs when it is all frozen; with only its top layers trained,
    the token states below. Other models (and an HLLM that fine-tunes its whole Item LLM) have
    nothing to cache.

    With a `store` folder, an all-frozen side's outputs are also kept on disk under a key of
    everything they depend on (the Item LLM's weights, the tokens, the batching, the device), so
    the trials and seeds of a benchmark encode a catalogue once (SmolLM2: minutes per dataset)."""
    if not (isinstance(model, HLLM | TextKnn) and (model.frozen_items or model.top_layers_only)):
        return
    top_only = model.top_layers_only
    training = model.item_encoder.training
    model.item_encoder.eval()
    encode = model.item_encoder.lower_states if top_only else model.item_encoder

    def outputs() -> Tensor:
        rows = []
        for first in range(0, len(item_tokens), batch_size):
            ids = np.arange(first, min(first + batch_size, len(item_tokens)))
            packed = pack_items(item_tokens, ids, appended_tokens=model.appended_tokens)
            rows.append(encode(packed.to(device)))
        return torch.cat(rows)

    if top_only:
        lengths = torch.from_numpy(np.diff(item_tokens.offsets)).to(device) + model.appended_tokens
        model.cache_lower_states(outputs(), torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]))
    elif store is None:
        model.cache_items(outputs())
    else:
        key = _outputs_key(model.item_encoder, item_tokens, batch_size, device)
        path = Path(store) / "item-outputs" / f"{key}.pt"
        if path.exists():
            table = torch.load(path, map_location=device, weights_only=True)
        else:
            table = outputs()
            atomic_write(path, lambda tmp: torch.save(table.cpu(), tmp))
        model.cache_items(table)
    model.item_encoder.train(training)


def _outputs_key(encoder: nn.Module, item_tokens: ItemTokens, batch_size: int, device) -> str:
    """A digest of everything a frozen Item LLM's catalogue outputs depend on."""
    digest = hashlib.sha256()
    kind = torch.device(device).type
    settings = [OUTPUTS_VERSION, batch_size, kind, torch.is_autocast_enabled(kind), torch.__version__]
    digest.update(json.dumps(settings + [encoder.pooling, encoder.appended_tokens]).encode())
    hash_weights(encoder, digest)
    digest.update(item_tokens.ids.tobytes())
    digest.update(item_tokens.offsets.tobytes())
    return digest.hexdigest()[:24]


def hash_weights(module: nn.Module, digest: hashlib._Hash | None = None) -> str:
    """sha256 of every tensor of `module`'s state (name, dtype, shape and bytes), fed to `digest`
    (a new one if None); returns its hex digest."""
    digest = digest or hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
