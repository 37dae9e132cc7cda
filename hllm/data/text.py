"""Item text: the prompt + `key: value` template, tokenisation once per item, packing items into one row.

Dims: N items, T packed item_tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

PAD_ID = 0


def build_item_text(items: pd.DataFrame, fields: Sequence[str], prompt: str, separator: str) -> pd.Series:
    """`prompt` + `key: value` for each field in order, joined by `separator`; empty fields skipped.

    Vectorised over rows. A row with no usable field gets the prompt alone.
    """
    text = pd.Series(pd.NA, index=items.index, dtype="string")
    for name in fields:
        values = items[name].astype("string").str.strip()
        usable = values.notna() & (values != "") & (values.str.lower() != "nan")
        part = (name + ": " + values).where(usable)
        both = text.notna() & part.notna()
        text = text.where(~both, text + separator + part).fillna(part)
    return (prompt + text.fillna("")).str.rstrip().astype(object)


@dataclass
class ItemTokens:
    """Token ids of every item, tokenised once: item i owns `ids[offsets[i]:offsets[i+1]]`."""

    ids: np.ndarray  # (sum of lengths,) int32
    offsets: np.ndarray  # (N + 1,) int64

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def tokenize_items(texts: Sequence[str], tokenizer, max_tokens: int, batch_size: int = 4096) -> ItemTokens:
    """Tokenise each text once (special tokens included), keep the first `max_tokens` ids.

    An empty text still gets one token so every item has a position to read an embedding from.
    """
    fallback = next(
        t
        for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, 0)
        if t is not None
    )
    chunks: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        encoded = tokenizer(batch, truncation=True, max_length=max_tokens)["input_ids"]
        chunks += [ids if ids else [fallback] for ids in encoded]
    lengths = np.fromiter((len(ids) for ids in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for ids in chunks for t in ids), dtype=np.int32, count=int(offsets[-1]))
    return ItemTokens(flat, offsets)


def text_length_stats(texts: Sequence[str], tokenizer, max_tokens: int) -> dict[str, float]:
    """Untruncated token-length percentiles and the share of items the cap truncates."""
    lengths = np.array([len(ids) for ids in tokenizer(list(texts))["input_ids"]], dtype=np.int64)
    if lengths.size == 0:
        return {}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {
        "tokens_mean": float(lengths.mean()),
        "tokens_p50": float(p50),
        "tokens_p90": float(p90),
        "tokens_p99": float(p99),
        "tokens_max": int(lengths.max()),
        "truncated_share": float((lengths > max_tokens).mean()),
    }


@dataclass
class PackedItems:
    """Several items' tokens concatenated into one row, with per-item positions restarting at 0."""

    input_ids: Tensor  # (T,) int64
    position_ids: Tensor  # (T,) int64
    lengths: Tensor  # (N,) int64, tokens per item including appended tokens

    def to(self, device: torch.device | str) -> PackedItems:
        return PackedItems(self.input_ids.to(device), self.position_ids.to(device), self.lengths.to(device))

    @property
    def num_items(self) -> int:
        return len(self.lengths)


def pack_items(
    item_tokens: ItemTokens, item_ids: np.ndarray | Tensor, appended_tokens: int = 0
) -> PackedItems:
    """Gather the tokens of `item_ids` into one row; append `appended_tokens` placeholder ids (PAD_ID)
    to each.

    The model overwrites the placeholders' input embeddings with its learned [ITEM] vector.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    starts = item_tokens.offsets[item_ids]
    text_lengths = item_tokens.offsets[item_ids + 1] - starts
    lengths = text_lengths + appended_tokens
    total = int(lengths.sum())
    item_of_token = np.repeat(np.arange(len(item_ids)), lengths)
    first_token = np.zeros(len(item_ids), dtype=np.int64)
    np.cumsum(lengths[:-1], out=first_token[1:])
    positions = np.arange(total, dtype=np.int64) - first_token[item_of_token]
    is_text = positions < text_lengths[item_of_token]
    input_ids = np.full(total, PAD_ID, dtype=np.int64)
    input_ids[is_text] = item_tokens.ids[starts[item_of_token[is_text]] + positions[is_text]]
    return PackedItems(torch.from_numpy(input_ids), torch.from_numpy(positions), torch.from_numpy(lengths))
