"""SequenceData: contiguous ids (0 = PAD), chronological user sequences, and the protocol's split.

`prepare_dataset` reads the files (formats.py), filters and renumbers with numpy, and caches it; the
split (splits.py) is drawn afresh on every load, so the cache holds only what every protocol shares.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from hllm.config import DataConfig
from hllm.data.formats import Source, locate, read_source
from hllm.data.splits import Holdout, make_holdout
from hllm.data.text import PAD_ID, build_item_text, text_length_stats
from hllm.errors import UserError
from hllm.files import hash_inputs, hash_json, publish_folder, write_json

CACHE_VERSION = 2  # 2: timestamps kept
MIN_INTERACTIONS = 3  # one training item, the validation target and the test target
PAD_TOKEN = "[PAD]"
TITLE_FIELDS = ("title", "movie_title", "name")
Split = Literal["train", "valid", "test"]
CACHE_SETTINGS = (  # the DataConfig fields that shape the processed data (max_history does not)
    "user_column item_column time_column text_fields prompt field_separator duplicates kcore missing_text"
).split()
ITEM_ARRAYS = ("item_ids", "item_text", "item_titles")


@dataclass
class SequenceData:
    """Every user's chronological item sequence plus the item texts, with internal ids (0 = PAD)."""

    name: str
    user_ids: np.ndarray  # (U,) object: raw id of internal user u
    item_ids: np.ndarray  # (N,) object: raw id of internal item i; item_ids[0] == "[PAD]"
    offsets: np.ndarray  # (U+1,) int64: user u's sequence is items[offsets[u]:offsets[u+1]]
    items: np.ndarray  # (nnz,) int64 internal item ids 1..N-1, oldest first per user
    item_text: np.ndarray  # (N,) object: rendered item text; "" for PAD
    item_titles: np.ndarray  # (N,) object: short display title; "" for PAD
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""
    timestamps: np.ndarray | None = None  # (nnz,) float64 times of `items`; None without time column
    holdout: Holdout | None = None  # the protocol's split; None = leave-one-out

    def __post_init__(self) -> None:
        if self.holdout is None:
            self.holdout = make_holdout(self.offsets, self.items, self.timestamps)

    def require_item_text(self) -> None:
        """For models that read item text: refuse data prepared without any (ID models need none)."""
        if self.stats.get("text_fields") != []:  # [] = prepared without a text field
            return
        if self.stats.get("item_path") is None:
            raise UserError(
                "no item table, so no item text to read; give one with data.item_path "
                "(ID models such as model.kind=sasrec need none)",
                where=self.stats.get("path", self.name),
            )
        message = "the item table has no text columns; name the ones to read with data.text_fields"
        raise UserError(message, where=self.stats["item_path"])

    @property
    def num_items(self) -> int:
        """Item ids, PAD included."""
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def target_positions(self, split: Split) -> np.ndarray:
        """(U,) position in `items` of each user's target in `split`; -1 where the user has none.
        train's target is the user's last trained interaction."""
        return self.holdout.targets[split]

    def history_and_target(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """(U,) target positions and (U,) target items of `split` (-1 and PAD where there is none).

        User u's history is `history(u, split)`, which ends just before `positions[u]`.
        """
        positions = self.target_positions(split)
        return positions, np.where(positions >= 0, self.items[positions], PAD_ID)

    def history(self, user: int, split: Split) -> np.ndarray:
        """User `user`'s items before the target of `split`, oldest first (only trained ones for
        train); empty when the user has no target in `split`."""
        end = int(self.target_positions(split)[user])
        if end < 0:
            return self.items[:0]
        start = self.offsets[user]
        if split == "train":
            return self.items[start:end][self.holdout.trained[start:end]]
        return self.items[start:end]

    @cached_property
    def _user_lookup(self) -> dict[str, int]:
        return {raw: index for index, raw in enumerate(self.user_ids)}

    @cached_property
    def _item_lookup(self) -> dict[str, int]:
        return {raw: index for index, raw in enumerate(self.item_ids) if index != PAD_ID}

    def user_index(self, raw_id: str) -> int:
        if (index := self._user_lookup.get(str(raw_id))) is None:
            raise UserError(f"unknown user id {str(raw_id)!r}", where=self.name)
        return index

    def item_index(self, raw_id: str) -> int:
        if (index := self._item_lookup.get(str(raw_id))) is None:
            raise UserError(f"unknown item id {str(raw_id)!r}", where=self.name)
        return index

    def save(self, folder: str | Path) -> None:
        """Write to a temporary folder beside `folder`, then swap it in (never half-written)."""
        publish_folder(self._write, Path(folder), replace=True)

    def _write(self, folder: Path) -> None:
        times = {} if self.timestamps is None else {"timestamps": self.timestamps}
        np.savez(folder / "sequences.npz", offsets=self.offsets, items=self.items, **times)
        pd.DataFrame({"user_ids": self.user_ids}).to_parquet(folder / "users.parquet")
        items = pd.DataFrame({name: getattr(self, name) for name in ITEM_ARRAYS})
        items.to_parquet(folder / "items.parquet")
        meta = {"version": CACHE_VERSION, "name": self.name, "fingerprint": self.fingerprint}
        write_json(folder / "meta.json", {**meta, "stats": self.stats})

    @classmethod
    def load(cls, folder: str | Path) -> SequenceData:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            with np.load(folder / "sequences.npz") as arrays:
                offsets, items = arrays["offsets"], arrays["items"]
                timestamps = arrays["timestamps"] if "timestamps" in arrays.files else None
            tables = [pd.read_parquet(folder / f"{name}.parquet") for name in ("users", "items")]
        except (OSError, ValueError, KeyError) as err:
            message = f"damaged dataset folder ({err}); delete it"
            raise UserError(message, where=str(folder)) from None
        arrays = {name: column.to_numpy(dtype=object) for t in tables for name, column in t.items()}
        return cls(
            meta["name"],
            offsets=offsets,
            items=items,
            stats=meta["stats"],
            fingerprint=meta["fingerprint"],
            timestamps=timestamps,
            **arrays,
        )


def prepare_dataset(config: DataConfig, *, tokenizer=None) -> SequenceData:
    """Read, filter and renumber `config.path`, or load the copy cached from the same inputs.

    With a `tokenizer`, `stats["text_tokens"]` reports the item texts' token lengths.
    """
    source = locate(config)
    settings = {key: getattr(config, key) for key in CACHE_SETTINGS}
    settings |= {"format": source.format, "name": source.name, "version": CACHE_VERSION}
    fingerprint = hash_inputs(source.files, settings)
    safe_name = re.sub(r"[^\w.-]+", "_", source.name)
    folder = Path(config.cache_dir) / f"{safe_name}-{fingerprint}"
    if folder.is_dir():
        data = SequenceData.load(folder)
    else:
        interactions, items = read_source(source, config)
        data = build_sequence_data(interactions, items, config, source)
        data.fingerprint = data.stats["fingerprint"] = fingerprint
        publish_folder(data._write, folder, replace=False)
    data.stats["cache"] = str(folder)
    data.holdout = make_holdout(
        data.offsets,
        data.items,
        data.timestamps,
        split=config.split,
        cut=config.temporal_cut,
        cold_items=config.cold_items,
        cold_seed=config.cold_seed,
    )
    if protocol := _protocol_settings(config):  # the protocol cards' dataset hash tells the splits apart
        data.fingerprint = hash_json({"data": data.fingerprint, **protocol})
    if tokenizer is not None:
        texts = list(data.item_text[1:])
        data.stats["text_tokens"] = text_length_stats(texts, tokenizer, config.max_text_tokens)
    return data


def _protocol_settings(config: DataConfig) -> dict:
    """The settings that make the split differ from plain leave-one-out (none for it)."""
    settings = {}
    if config.split == "temporal":
        settings |= {"split": config.split, "temporal_cut": config.temporal_cut}
    if config.cold_items > 0:
        settings |= {"cold_items": config.cold_items, "cold_seed": config.cold_seed}
    return settings


def build_sequence_data(
    interactions: pd.DataFrame, items: pd.DataFrame | None, config: DataConfig, source: Source
) -> SequenceData:
    """Filter the rows, then number users and items by first appearance in time (0 = PAD)."""
    user_codes, user_raw = pd.factorize(interactions["user"])
    item_codes, item_raw = pd.factorize(interactions["item"])
    rows, counts = _filter_rows(
        interactions, items, config, source, user_codes=user_codes, item_codes=item_codes
    )
    users, user_order = pd.factorize(user_codes[rows])
    item_index, item_order = pd.factorize(item_codes[rows])
    offsets = np.zeros(len(user_order) + 1, dtype=np.int64)
    np.cumsum(np.bincount(users), out=offsets[1:])
    by_user = np.argsort(users, kind="stable")  # keeps each user's rows in time order
    item_ids = np.concatenate([[PAD_TOKEN], np.asarray(item_raw[item_order], dtype=object)])
    fields = _text_fields(items, config.text_fields) if items is not None else []
    text, titles = _item_texts(item_ids, items, fields, config)
    user_ids = np.asarray(user_raw[user_order], dtype=object)
    sequences = (item_index[by_user] + 1).astype(np.int64)
    data = SequenceData(source.name, user_ids, item_ids, offsets, sequences, text, titles)
    if "time" in interactions:
        data.timestamps = interactions["time"].to_numpy(dtype=np.float64)[rows][by_user]
    data.stats = _stats(data, source, has_time="time" in interactions, text_fields=fields) | {
        "raw_interactions": len(interactions),
        "dropped_users": len(user_raw) - data.num_users,
        "dropped_items": len(item_raw) - (data.num_items - 1),
        **counts,
        "duplicate_item_rows": int(items["item"].duplicated().sum()) if items is not None else 0,
    }
    return data


def _filter_rows(
    interactions: pd.DataFrame,
    items: pd.DataFrame | None,
    config: DataConfig,
    source: Source,
    *,
    user_codes: np.ndarray,
    item_codes: np.ndarray,
) -> tuple[np.ndarray, dict[str, int]]:
    """Row numbers kept, in time order: missing text, stable sort, duplicates, iterative k-core."""
    rows = np.arange(len(interactions))
    if items is not None:
        rows = _apply_missing_text(interactions, items, config.missing_text, source)
    missing = len(interactions) - len(rows)
    if "time" in interactions:  # stable: equal timestamps keep their file order
        rows = rows[np.argsort(interactions["time"].to_numpy()[rows], kind="stable")]
    if config.duplicates != "keep":
        pair = user_codes[rows].astype(np.int64) * (item_codes.max() + 1) + item_codes[rows]
        rows = rows[~pd.Series(pair).duplicated(keep=config.duplicates).to_numpy()]
    deduped = len(rows)
    min_user, min_item = max(config.kcore, MIN_INTERACTIONS), max(config.kcore, 1)
    rows = rows[_kcore(user_codes[rows], item_codes[rows], min_user, min_item)]
    if len(rows) == 0:
        raise UserError(
            f"no interactions left after filtering: {len(interactions)} read, {missing} without "
            f"item text, {len(interactions) - missing - deduped} duplicates, and no user keeps "
            f"{min_user}+ interactions on items with {min_item}+ (data.kcore={config.kcore})",
            where=str(source.interactions),
        )
    return rows, {
        "dropped_interactions_missing_text": missing,
        "duplicates_removed": len(interactions) - missing - deduped,
        "dropped_interactions_filter": deduped - len(rows),
        "min_user_interactions": min_user,
    }


def _apply_missing_text(
    interactions: pd.DataFrame, items: pd.DataFrame, policy: str, source: Source
) -> np.ndarray:
    """Rows (file order) kept under data.missing_text; `error` names the first item without text."""
    has_row = interactions["item"].isin(items["item"]).to_numpy()
    if policy == "keep" or has_row.all():
        return np.arange(len(interactions))
    if policy == "error":
        row = int(np.argmin(has_row))
        item = interactions["item"].iloc[row]
        message = f"item {item!r} (row {row + 1} of {source.interactions}) has no row in the item "
        raise UserError(message + "table; set data.missing_text=drop or keep", str(source.items))
    return np.flatnonzero(has_row)


def _kcore(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Mask of the rows left after dropping users and items below their minimum, until stable."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_count = np.bincount(users[keep], minlength=users.max(initial=0) + 1)
        item_count = np.bincount(items[keep], minlength=items.max(initial=0) + 1)
        survivors = keep & (user_count[users] >= min_user) & (item_count[items] >= min_item)
        if survivors.sum() == keep.sum():
            return keep
        keep = survivors


def _text_fields(items: pd.DataFrame, requested: list[str]) -> list[str]:
    available = [name for name in items.columns if name != "item"]
    if unknown := [name for name in requested if name not in available]:
        message = f"unknown item field(s) {', '.join(map(repr, unknown))}; available: "
        raise UserError(message + ", ".join(available), where="data.text_fields")
    return list(requested) or available


def _item_texts(
    item_ids: np.ndarray, items: pd.DataFrame | None, fields: list[str], config: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) rendered texts and (N,) display titles aligned with `item_ids`; PAD gets ""."""
    texts = np.full(len(item_ids), "", dtype=object)
    titles = np.array(item_ids, dtype=object)  # the raw id where there is no title
    titles[PAD_ID] = ""
    if items is None:
        return texts, titles
    table = items.drop_duplicates("item", keep="last").set_index("item")  # as the reference: last
    found = table.index.get_indexer(item_ids[1:]) >= 0
    table = table.reindex(item_ids[1:]).reset_index(drop=True)
    rendered = build_item_text(table, fields, config.prompt, config.field_separator).to_numpy()
    texts[1:] = np.where(found, rendered, "")  # no row in the item table: empty, as the reference
    title_field = next((name for name in TITLE_FIELDS if name in table.columns), None)
    if title_field := title_field or (fields[0] if fields else None):
        chosen = table[title_field].astype("string").str.strip()
        usable = (chosen.notna() & (chosen != "")).to_numpy()
        titles[1:] = np.where(usable, chosen.fillna("").to_numpy(dtype=object), titles[1:])
    return texts, titles


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    p50, p90 = (round(float(p), 3) for p in np.percentile(values, [50, 90]))
    mean = round(float(values.mean()), 3)
    return {
        "min": int(values.min()),
        "p50": p50,
        "p90": p90,
        "max": int(values.max()),
        "mean": mean,
    }


def _stats(data: SequenceData, source: Source, *, has_time: bool, text_fields: list[str]) -> dict:
    words = pd.Series(data.item_text[1:], dtype="string").str.split().str.len()
    users, items, count = data.num_users, data.num_items - 1, len(data.items)
    return {
        "dataset": data.name,
        "format": source.format,
        "path": str(source.interactions),
        "item_path": str(source.items) if source.items else None,
        "users": users,
        "items": items,
        "interactions": count,
        "density": count / (users * items),
        "has_time": has_time,
        "text_fields": text_fields,
        "seq_len": _percentiles(np.diff(data.offsets)),
        "text_words": _percentiles(words.to_numpy(dtype=np.int64)),
    }
