"""Each input format read from hand-written fixtures; format detection; reader-level bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from hllm.config import DataConfig
from hllm.data.formats import locate, read_source
from hllm.errors import UserError

TINY_USERS = ["u1", "u2", "u1", "u1", "u2", "u2", "u3", "u1"]
TINY_ITEMS = ["a", "b", "b", "c", "a", "c", "a", "d"]
TINY_TIMES = [30, 10, 10, 10, 20, 20, 5, 40]


def read(path: Path, **settings) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    config = DataConfig(path=str(path), **settings)
    source = locate(config)
    interactions, items = read_source(source, config)
    return interactions, items, source.format


def assert_tiny(interactions: pd.DataFrame) -> None:
    assert list(interactions.columns) == ["user", "item", "time"]
    assert interactions["user"].tolist() == TINY_USERS  # file order, untouched
    assert interactions["item"].tolist() == TINY_ITEMS
    assert interactions["time"].tolist() == TINY_TIMES
    assert interactions["time"].dtype == "int64"
    assert pd.api.types.is_string_dtype(interactions["user"])


def test_csv_with_item_table(fixtures):
    interactions, items, fmt = read(fixtures / "tiny.csv", item_path=str(fixtures / "tiny_items.csv"))
    assert fmt == "csv"
    assert_tiny(interactions)
    assert list(items.columns) == ["item", "title", "description"]
    assert items["item"].tolist() == ["a", "b", "c", "d"]
    assert items["description"].iloc[0] == "A red fruit, crisp"  # quoted comma kept


def test_tsv_separator_is_sniffed(fixtures):
    interactions, items, fmt = read(fixtures / "tiny.tsv")
    assert fmt == "csv" and items is None
    assert_tiny(interactions)


def test_parquet_ids_become_strings(fixtures, tmp_path):
    table = pd.read_csv(fixtures / "tiny.csv")
    table["user_id"] = table["user_id"].str[1:].astype(int)  # integer user ids in the file
    table.to_parquet(tmp_path / "tiny.parquet")
    interactions, items, fmt = read(tmp_path / "tiny.parquet")
    assert fmt == "parquet" and items is None
    assert interactions["user"].tolist() == [u[1:] for u in TINY_USERS]
    assert interactions["time"].tolist() == TINY_TIMES


@pytest.mark.parametrize("target", ["recbole", "recbole/tiny.inter"])
def test_recbole_folder_or_file(fixtures, target):
    interactions, items, fmt = read(fixtures / target)
    assert fmt == "recbole"
    assert_tiny(interactions)
    # typed headers lose their `:type`; the float column is not text
    assert list(items.columns) == ["item", "movie_title", "genre"]
    assert items["movie_title"].tolist() == ["Apple", "Banana", "Citrus", "Date"]


def test_lcrec_lists_are_the_chronology(fixtures):
    interactions, items, fmt = read(fixtures / "lcrec")
    assert fmt == "lcrec"
    assert list(interactions.columns) == ["user", "item"]  # no timestamps in this format
    assert interactions["user"].tolist() == ["0"] * 3 + ["1"] * 4
    assert interactions["item"].tolist() == ["2", "0", "1", "1", "3", "0", "2"]
    assert list(items.columns) == ["item", "title", "description", "brand", "categories"]
    assert items["categories"].iloc[1] == "Office, Staplers"  # a list value is joined
    assert pd.isna(items["brand"].iloc[2])


def test_hllm_layout_reads_columns_by_position(fixtures):
    interactions, items, fmt = read(fixtures / "hllm" / "dataset")
    assert fmt == "hllm"  # detected from information/<same name> one level up
    assert interactions["item"].tolist() == ["a", "b", "b", "c", "a", "c"]
    assert interactions["user"].tolist() == ["u1", "u2", "u1", "u1", "u2", "u2"]
    assert interactions["time"].tolist() == [30, 10, 10, 10, 20, 20]
    assert list(items.columns) == ["item", "title", "tag", "description", "views"]


def test_hllm_without_information_file_is_an_error(fixtures, tmp_path):
    shutil.copy(fixtures / "hllm" / "dataset" / "tiny.csv", tmp_path / "tiny.csv")
    with pytest.raises(UserError, match="information/tiny.csv") as err:
        read(tmp_path / "tiny.csv", format="hllm")
    assert err.value.where == str(tmp_path / "tiny.csv")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("x.inter", "recbole"),
        ("x.inter.json", "lcrec"),
        ("x.json", "lcrec"),
        ("x.parquet", "parquet"),
        ("x.csv", "csv"),
        ("x.tsv", "csv"),
        ("x.txt", "csv"),
    ],
)
def test_format_detected_from_the_file_name(tmp_path, name, expected):
    (tmp_path / name).write_text("whatever\n")
    assert locate(DataConfig(path=str(tmp_path / name))).format == expected


def test_unknown_extension_lists_the_formats(tmp_path):
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    with pytest.raises(UserError, match="csv, parquet, recbole, lcrec, hllm"):
        locate(DataConfig(path=str(tmp_path / "data.xlsx")))


def test_ambiguous_folder_lists_the_candidates(tmp_path):
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text("user_id,item_id\n")
    with pytest.raises(UserError, match="a.csv, b.csv") as err:
        locate(DataConfig(path=str(tmp_path)))
    assert err.value.where == str(tmp_path)


def test_folder_without_a_dataset(tmp_path):
    with pytest.raises(UserError, match="no dataset file"):
        locate(DataConfig(path=str(tmp_path)))


def test_default_time_column_is_optional_a_named_one_is_not(fixtures, tmp_path):
    path = tmp_path / "no_time.csv"
    path.write_text("user_id,item_id\nu1,a\nu1,b\n")
    interactions, _, _ = read(path)
    assert list(interactions.columns) == ["user", "item"]
    with pytest.raises(UserError, match="no column 'ts'") as err:
        read(path, time_column="ts")
    assert err.value.where == f"{path}:column ts"


def test_misnamed_column_names_it_and_lists_the_present_ones(fixtures):
    path = fixtures / "bad" / "misnamed_column.csv"
    with pytest.raises(UserError, match=r"columns present: user, item_id, timestamp") as err:
        read(path)
    assert err.value.where == f"{path}:column user_id"


def test_non_numeric_timestamp_names_the_row(fixtures):
    path = fixtures / "bad" / "bad_timestamp.csv"
    with pytest.raises(UserError, match="'yesterday' is not a number") as err:
        read(path)
    assert err.value.where == f"{path}:row 3"


def test_malformed_json_names_the_line(fixtures):
    path = fixtures / "bad" / "malformed.inter.json"
    with pytest.raises(UserError, match="not valid JSON") as err:
        read(path)
    assert err.value.where == f"{path}:line 3"


def test_non_utf8_bytes_name_the_line(fixtures):
    path = fixtures / "bad" / "not_utf8.csv"
    with pytest.raises(UserError, match="not UTF-8") as err:
        read(path)
    assert err.value.where == f"{path}:line 3"


def test_empty_and_ragged_files(fixtures):
    with pytest.raises(UserError, match="file is empty"):
        read(fixtures / "bad" / "empty.csv")
    with pytest.raises(UserError, match="Expected 3 columns, got 4"):
        read(fixtures / "bad" / "ragged.csv")


def test_header_only_file_has_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("user_id,item_id,timestamp\n")
    with pytest.raises(UserError, match="no rows after the header"):
        read(path)


def test_missing_id_names_the_row(tmp_path):
    path = tmp_path / "gap.csv"
    path.write_text("user_id,item_id,timestamp\nu1,a,1\nu1,,2\n")
    with pytest.raises(UserError, match="missing value in column 'item_id'") as err:
        read(path)
    assert err.value.where == f"{path}:row 2"


def test_lcrec_value_of_the_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "x.inter.json"
    path.write_text('{"0": [1, 2, 3], "1": 7}')
    with pytest.raises(UserError, match="expected a list") as err:
        read(path)
    assert err.value.where == f"{path}:key 1"
