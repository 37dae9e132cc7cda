"""Input files -> (interactions, items): str `user`, `item` (+ numeric `time`) in file order, and an
item table (str `item` + text columns) or None. Formats, and where their files are found:

- csv / parquet: columns named by data.user_column / item_column / time_column; the item table
  (CSV/TSV/Parquet: data.item_column + text columns) only from data.item_path.
- recbole: `X.inter` (+ `X.item` beside it), tab-separated, typed headers `name:type`; the item
  file's float columns are not text.
- lcrec: `X.inter.json` {user: [item, ...] oldest first} (+ `X.item.json` {item: {field: value}}).
- hllm: the reference layout: a CSV read by position as item_id, user_id, timestamp; its item CSV
  is data.item_path, else `information/<same file name>` beside the file or one level up.

A folder holding one dataset stands for its file. The time column may be absent only under its
default name (`timestamp`); one named on purpose must exist.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hllm.config import DataConfig
from hllm.errors import UserError

FORMATS = ("csv", "parquet", "recbole", "lcrec", "hllm")
SUFFIXES = {  # longest first, so `.inter.json` wins over `.json`
    ".inter.json": "lcrec", ".json": "lcrec", ".inter": "recbole", ".parquet": "parquet",
    ".csv": "csv", ".tsv": "csv", ".txt": "csv",
}  # fmt: skip
HLLM_COLUMNS = ["item_id", "user_id", "timestamp"]
RECBOLE_TEXT_TYPES = ("token", "token_seq")
DEFAULT_TIME_COLUMN = DataConfig.time_column


@dataclass(frozen=True)
class Source:
    """Where a dataset's files are, found without reading them (so a cache can be checked first)."""

    format: str
    interactions: Path
    items: Path | None
    name: str

    @property
    def files(self) -> list[Path]:
        return [self.interactions] + ([self.items] if self.items else [])


def locate(config: DataConfig) -> Source:
    """Resolve the format and the interaction and item files of `config.path`."""
    path = Path(config.path)
    if not path.exists():
        raise UserError("no such file or directory", where=str(path))
    item_path = Path(config.item_path) if config.item_path else None
    if item_path is not None and not item_path.is_file():
        raise UserError("item table not found (data.item_path)", where=str(item_path))
    chosen = None if config.format == "auto" else config.format
    inter = _find_in_folder(path, chosen, item_path) if path.is_dir() else path
    fmt = chosen or _format_of_file(inter)
    items = item_path or _item_file_beside(inter, fmt)
    name = config.name or (path.name if path.is_dir() else _split_suffix(inter)[0])
    return Source(fmt, inter, items, name)


def read_source(source: Source, config: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read the interactions (file order) and the item table of a located dataset."""
    path, roles = source.interactions, (config.user_column, config.item_column, config.time_column)
    match source.format:
        case "csv":
            inter = _interactions(read_csv(path, numeric=config.time_column), path, *roles)
        case "parquet":
            inter = _interactions(read_parquet(path), path, *roles)
        case "recbole":
            inter = _interactions(_recbole_table(path, numeric=config.time_column)[0], path, *roles)
        case "lcrec":
            inter = read_lcrec_inter(path)
        case "hllm":
            inter = read_hllm_inter(path)
    if source.items is None:
        return inter, None
    if source.format == "recbole":
        return inter, read_recbole_items(source.items, config.item_column)
    if source.format == "lcrec":
        return inter, read_lcrec_items(source.items)
    return inter, read_item_table(source.items, config.item_column)


def _split_suffix(path: Path) -> tuple[str, str | None]:
    """(name without its dataset suffix, the format that suffix implies or None)."""
    for suffix, fmt in SUFFIXES.items():
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)], fmt
    return path.name, None


def _format_of_file(path: Path) -> str:
    fmt = _split_suffix(path)[1]
    if fmt is None:
        raise UserError(
            f"cannot tell the format from the file name; set data.format to one of "
            f"{', '.join(FORMATS)} (or name it {', '.join(SUFFIXES)})",
            where=str(path),
        )
    return "hllm" if fmt == "csv" and _information_file(path) else fmt


def _find_in_folder(folder: Path, fmt: str | None, item_path: Path | None) -> Path:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in files if item_path is None or p.resolve() != item_path.resolve()]
    kinds = {p: _split_suffix(p)[1] for p in files}
    if fmt is not None:
        found = [p for p in files if kinds[p] == ("csv" if fmt == "hllm" else fmt)]
    else:  # `.inter` / `.inter.json` name a dataset outright; loose tables count only without one
        found = [p for p in files if p.name.lower().endswith((".inter", ".inter.json"))]
        found = found or [p for p in files if kinds[p] in ("csv", "parquet")]
    if len(found) == 1:
        return found[0]
    if not found:
        wanted = f"a {fmt} dataset" if fmt else "X.inter, X.inter.json or one .csv/.tsv/.parquet"
        raise UserError(f"no dataset file here; expected {wanted}", where=str(folder))
    raise UserError(
        f"several candidate dataset files ({', '.join(p.name for p in found)}); pass the file "
        f"itself as the path (formats: {', '.join(FORMATS)})",
        where=str(folder),
    )


def _information_file(inter: Path) -> Path | None:
    for folder in (inter.parent, inter.parent.parent):
        if (candidate := folder / "information" / inter.name).is_file():
            return candidate
    return None


def _item_file_beside(inter: Path, fmt: str) -> Path | None:
    if fmt in ("recbole", "lcrec"):
        suffix = ".item" if fmt == "recbole" else ".item.json"
        candidate = inter.with_name(_split_suffix(inter)[0] + suffix)
        return candidate if candidate.is_file() else None
    if fmt != "hllm":
        return None
    if (found := _information_file(inter)) is None:
        raise UserError(
            f"no item-information CSV: looked for information/{inter.name} beside the file and "
            "one level up; set data.item_path",
            where=str(inter),
        )
    return found


# ---- delimited text and Parquet tables ----


def _utf8_error(path: Path, data: bytes) -> UserError | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return UserError("not UTF-8 text", where=f"{path}:line {line}")
    return None


def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        raw = f.readline()
    if not raw.strip():
        raise UserError("file is empty (expected a header line)", where=str(path))
    if error := _utf8_error(path, raw):
        raise error
    return raw.decode("utf-8-sig").rstrip("\r\n")


def read_csv(path: Path, *, sep: str | None = None, numeric: str | None = None) -> pd.DataFrame:
    """Columns as str but `numeric` (left to inference); tab-separated if the header has a tab."""
    header = _first_line(path)
    sep = sep or ("\t" if "\t" in header else ",")
    dtype = {name: "str" for name in next(csv.reader([header], delimiter=sep)) if name != numeric}
    try:  # the pyarrow engine is ~6x faster than C here and rejects ragged rows instead of guessing
        table = pd.read_csv(path, sep=sep, dtype=dtype, engine="pyarrow", keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        if error := _utf8_error(path, path.read_bytes()):  # pyarrow does not say where
            raise error from None
        raise UserError(f"cannot parse: {str(err).splitlines()[0]}", where=str(path)) from None
    if table.empty:
        raise UserError("no rows after the header", where=str(path))
    return table


def read_parquet(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        message = f"not a readable Parquet file: {str(err).splitlines()[0]}"
        raise UserError(message, where=str(path)) from None
    if table.empty:
        raise UserError("no rows", where=str(path))
    return table


def _require(table: pd.DataFrame, column: str, path: Path, key: str) -> None:
    if column not in table.columns:
        present = ", ".join(map(str, table.columns))
        message = f"no column {column!r} (columns present: {present}); set {key}"
        raise UserError(message, where=f"{path}:column {column}")


def _ids(values: pd.Series, path: Path, column: str) -> pd.Series:
    ids = values.astype("str")
    missing = (values.isna() | (ids.str.strip() == "")).to_numpy()
    if missing.any():
        row = int(np.argmax(missing)) + 1
        raise UserError(f"missing value in column {column!r}", where=f"{path}:row {row}")
    return ids.reset_index(drop=True)


def _times(values: pd.Series, path: Path, column: str) -> pd.Series:
    """Numeric timestamps as int64 (float64 when some have fractions); datetimes become seconds."""
    if pd.api.types.is_datetime64_any_dtype(values):
        values = values.astype("datetime64[s]").astype("int64")
    numeric = pd.api.types.is_numeric_dtype(values)
    numbers = values if numeric else pd.to_numeric(values, errors="coerce")
    if (bad := numbers.isna().to_numpy()).any():
        row = int(np.argmax(bad))
        message = f"column {column!r}: {values.iloc[row]!r} is not a number"
        raise UserError(message, where=f"{path}:row {row + 1}")
    if pd.api.types.is_integer_dtype(numbers):
        return numbers.astype("int64").reset_index(drop=True)
    floats = numbers.to_numpy(dtype="float64")
    return pd.Series(floats.astype("int64") if (floats == np.floor(floats)).all() else floats)


def _interactions(table: pd.DataFrame, path: Path, user: str, item: str, time: str | None) -> pd.DataFrame:
    """Pick the role columns out of `table` and check them."""
    _require(table, user, path, "data.user_column")
    _require(table, item, path, "data.item_column")
    out = pd.DataFrame({"user": _ids(table[user], path, user), "item": _ids(table[item], path, item)})
    if time is not None and (time in table.columns or time != DEFAULT_TIME_COLUMN):
        _require(table, time, path, "data.time_column")
        out["time"] = _times(table[time], path, time)
    return out


def _item_frame(table: pd.DataFrame, ids: pd.Series, text: list[str]) -> pd.DataFrame:
    """`item` (str) plus the `text` columns as strings; list values are joined by ', '."""
    out = {"item": ids.reset_index(drop=True)}
    for name in text:
        values = table[name].reset_index(drop=True)
        if values.dtype == object:  # JSON fields may hold lists (tags, category paths)
            values = values.map(lambda v: ", ".join(map(str, v)) if isinstance(v, list) else v)
        out[str(name)] = values.astype("string")
    return pd.DataFrame(out)


def read_item_table(path: Path, item_column: str) -> pd.DataFrame:
    """CSV/TSV/Parquet item table: `item_column` becomes `item`; every other column is text."""
    table = read_parquet(path) if path.name.lower().endswith(".parquet") else read_csv(path)
    _require(table, item_column, path, "data.item_column")
    text = [name for name in table.columns if name != item_column]
    return _item_frame(table, _ids(table[item_column], path, item_column), text)


def read_hllm_inter(path: Path) -> pd.DataFrame:
    """The reference layout: a header row, then columns item_id, user_id, timestamp by position."""
    table = read_csv(path)
    if table.shape[1] < 3:
        found = ", ".join(map(str, table.columns))
        expected = ", ".join(HLLM_COLUMNS)
        message = f"expected 3 columns, read by position as {expected}; found {found}"
        raise UserError(message, where=str(path))
    table = table.iloc[:, :3].set_axis(HLLM_COLUMNS, axis=1)
    return _interactions(table, path, "user_id", "item_id", "timestamp")


# ---- RecBole atomic files ----


def _recbole_table(path: Path, numeric: str | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """A RecBole atomic file with bare column names, and each column's declared type."""
    typed = next(csv.reader([_first_line(path)], delimiter="\t"))
    types = dict(name.rsplit(":", 1) if ":" in name else (name, "token") for name in typed)
    numeric_typed = next((name for name in typed if name.split(":")[0] == numeric), None)
    table = read_csv(path, sep="\t", numeric=numeric_typed)
    return table.set_axis(list(types), axis=1), types


def read_recbole_items(path: Path, item_column: str) -> pd.DataFrame:
    """`X.item`: token and token_seq columns are text; float columns are not."""
    table, types = _recbole_table(path)
    _require(table, item_column, path, "data.item_column")
    text = [name for name, kind in types.items() if kind in RECBOLE_TEXT_TYPES]
    text = [name for name in text if name != item_column]
    return _item_frame(table, _ids(table[item_column], path, item_column), text)


# ---- LC-Rec JSON ----


def _read_json(path: Path, value_type: type, what: str) -> dict:
    """A non-empty JSON object whose every value is a `value_type`."""
    data = path.read_bytes()
    if error := _utf8_error(path, data):
        raise error
    try:
        loaded = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as err:
        message = f"not valid JSON: {err.msg} (column {err.colno})"
        raise UserError(message, where=f"{path}:line {err.lineno}") from None
    if not isinstance(loaded, dict) or not loaded:
        raise UserError("expected a non-empty JSON object at the top", where=str(path))
    bad = next((key for key, value in loaded.items() if not isinstance(value, value_type)), None)
    if bad is not None:
        raise UserError(f"expected {what}", where=f"{path}:key {bad}")
    return loaded


def read_lcrec_inter(path: Path) -> pd.DataFrame:
    """`{"user": [item, ...]}`, each list oldest first; without timestamps file order is time."""
    loaded = _read_json(path, list, "a list of item ids for this user")
    items = list(itertools.chain.from_iterable(loaded.values()))
    if (odd := next((v for v in items if not isinstance(v, (str, int))), None)) is not None:
        raise UserError(f"item ids must be strings or integers, found {odd!r}", where=str(path))
    users = np.repeat(np.array(list(loaded), dtype=object), [len(v) for v in loaded.values()])
    return pd.DataFrame({"user": pd.array(users, dtype="str"), "item": pd.array(items, dtype="str")})


def read_lcrec_items(path: Path) -> pd.DataFrame:
    """`{"item": {"title": ..., "description": ..., ...}}`; every field is text."""
    loaded = _read_json(path, dict, "an object of item fields")
    table = pd.DataFrame.from_dict(loaded, orient="index")
    return _item_frame(table, pd.Series(list(loaded), dtype="str"), list(table.columns))
