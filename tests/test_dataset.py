"""SequenceData: stable chronology, duplicates, k-core, short users, split, texts, cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hllm.data.dataset as dataset_module
from hllm.config import DataConfig
from hllm.data.dataset import SequenceData, prepare_dataset
from hllm.errors import UserError


@pytest.fixture
def prepare(tmp_path):
    """prepare_dataset with a fresh cache under tmp_path."""

    def run(path: Path, *, tokenizer=None, **settings) -> SequenceData:
        settings.setdefault("cache_dir", str(tmp_path / "cache"))
        return prepare_dataset(DataConfig(path=str(path), **settings), tokenizer=tokenizer)

    return run


def write_csv(folder: Path, text: str, name: str = "inter.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def raw_sequences(data: SequenceData) -> dict[str, list[str]]:
    return {data.user_ids[u]: data.item_ids[data.sequence(u)].tolist() for u in range(data.num_users)}


def test_stable_sort_keeps_file_order_for_equal_times(prepare, fixtures):
    data = prepare(fixtures / "tiny.csv")
    # u1 has b, c at t=10 (file order b then c); u2 has a, c at t=20 (file order a then c)
    assert raw_sequences(data) == {"u2": ["b", "a", "c"], "u1": ["b", "c", "a", "d"]}
    assert data.user_ids.tolist() == ["u2", "u1"]  # order of first appearance in time
    assert data.item_ids.tolist() == ["[PAD]", "b", "c", "a", "d"]
    assert data.offsets.tolist() == [0, 3, 7]
    assert data.items.tolist() == [1, 3, 2, 1, 2, 3, 4]
    assert data.items.dtype == np.int64 and data.offsets.dtype == np.int64


def test_stable_sort_on_many_ties(prepare, tmp_path):
    # large enough that an unstable sort (numpy's or pandas' default quicksort) reorders the ties
    times = np.random.default_rng(0).integers(0, 3, 300)
    lines = [f"u1,i{row},{t}" for row, t in enumerate(times)]
    data = prepare(write_csv(tmp_path, "user_id,item_id,timestamp\n" + "\n".join(lines) + "\n"))
    expected = [f"i{row}" for t in range(3) for row in np.flatnonzero(times == t)]
    assert raw_sequences(data) == {"u1": expected}


def test_without_time_file_order_is_the_chronology(prepare, tmp_path):
    path = write_csv(tmp_path, "user_id,item_id\nu1,c\nu1,a\nu1,b\n")
    data = prepare(path)
    assert raw_sequences(data) == {"u1": ["c", "a", "b"]}
    assert data.stats["has_time"] is False


def test_short_users_are_dropped_and_counted(prepare, fixtures):
    data = prepare(fixtures / "tiny.csv")  # u3 has a single interaction
    assert "u3" not in data.user_ids
    assert data.stats["dropped_users"] == 1
    assert data.stats["dropped_interactions_filter"] == 1
    assert data.stats["interactions"] == 7 and data.stats["raw_interactions"] == 8


@pytest.mark.parametrize(
    ("policy", "expected", "removed"),
    [
        ("keep", ["a", "b", "a", "c"], 0),
        ("first", ["a", "b", "c"], 1),
        ("last", ["b", "a", "c"], 1),
    ],
)
def test_duplicates_policy(prepare, tmp_path, policy, expected, removed):
    # file order differs from time order, so "first" must mean earliest in time
    path = write_csv(tmp_path, "user_id,item_id,timestamp\nu1,a,3\nu1,b,2\nu1,a,1\nu1,c,4\n")
    data = prepare(path, duplicates=policy)
    assert raw_sequences(data) == {"u1": expected}
    assert data.stats["duplicates_removed"] == removed


def test_iterative_kcore_hand_checked(prepare, tmp_path):
    rows = {"u1": "abc", "u2": "abc", "u3": "abcd", "u4": "def", "u5": "abe"}
    lines = [f"{user},{item},{t}" for user, items in rows.items() for t, item in enumerate(items)]
    path = write_csv(tmp_path, "user_id,item_id,timestamp\n" + "\n".join(lines) + "\n")
    data = prepare(path, kcore=3)
    # round 1 drops items d, e, f (< 3 users); round 2 drops u5, left with only a, b (< 3 items).
    # A single pass (the reference's) would keep u5.
    assert raw_sequences(data) == {"u1": list("abc"), "u2": list("abc"), "u3": list("abc")}
    assert data.stats["dropped_users"] == 2 and data.stats["dropped_items"] == 3
    assert data.stats["interactions"] == 9


def test_dataset_left_empty_is_an_error_and_caches_nothing(prepare, fixtures, tmp_path):
    with pytest.raises(UserError, match="no interactions left") as err:
        prepare(fixtures / "tiny.csv", kcore=10)
    assert err.value.where == str(fixtures / "tiny.csv")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_leave_one_out_split(prepare, fixtures):
    data = prepare(fixtures / "tiny.csv")  # u2: b a c ; u1: b c a d
    b, c, a, d = (data.item_index(x) for x in "bcad")
    positions, targets = data.history_and_target("test")
    assert targets.tolist() == [c, d]
    assert data.items[data.offsets[1] : positions[1]].tolist() == [b, c, a]
    assert data.history_and_target("valid")[1].tolist() == [a, a]
    assert data.history_and_target("train")[1].tolist() == [b, c]  # last training item
    assert data.history(1, "valid").tolist() == [b, c]
    assert data.history(0, "train").tolist() == []


def test_item_text_and_titles(prepare, fixtures):
    data = prepare(fixtures / "tiny.csv", item_path=str(fixtures / "tiny_items.csv"), prompt="P: ")
    text = dict(zip(data.item_ids, data.item_text))
    assert text["a"] == "P: title: Apple; description: A red fruit, crisp"
    assert text["b"] == "P: title: Banana"  # empty description skipped
    assert data.item_text[0] == "" and data.item_titles[0] == ""
    titles = dict(zip(data.item_ids, data.item_titles))
    assert titles["a"] == "Apple" and titles["c"] == "c"  # no title: the raw id
    assert data.stats["text_fields"] == ["title", "description"]


def test_chosen_text_fields_and_unknown_field(prepare, fixtures):
    items = str(fixtures / "tiny_items.csv")
    data = prepare(fixtures / "tiny.csv", item_path=items, text_fields=["description"], prompt="")
    assert dict(zip(data.item_ids, data.item_text))["d"] == "description: Sweet"
    with pytest.raises(UserError, match="'colour'; available: title, description") as err:
        prepare(fixtures / "tiny.csv", item_path=items, text_fields=["colour"])
    assert err.value.where == "data.text_fields"


@pytest.mark.parametrize(("policy", "users", "dropped"), [("drop", 2, 1), ("keep", 2, 0)])
def test_missing_text_drop_or_keep(prepare, fixtures, policy, users, dropped):
    bad = fixtures / "bad"
    data = prepare(
        bad / "missing_text.csv", item_path=str(bad / "missing_text_items.csv"), missing_text=policy
    )
    assert data.stats["dropped_interactions_missing_text"] == dropped
    assert data.num_users == users
    assert ("z" in data.item_ids) is (policy == "keep")
    if policy == "keep":
        z = data.item_index("z")
        assert data.item_text[z] == "" and data.item_titles[z] == "z"


def test_missing_text_error_names_the_file_and_item(prepare, fixtures):
    bad = fixtures / "bad"
    with pytest.raises(UserError, match=r"item 'z' \(row 3 of .*missing_text.csv\)") as err:
        prepare(
            bad / "missing_text.csv",
            item_path=str(bad / "missing_text_items.csv"),
            missing_text="error",
        )
    assert err.value.where == str(bad / "missing_text_items.csv")


def test_id_lookups(prepare, fixtures):
    data = prepare(fixtures / "tiny.csv")
    assert data.user_index("u1") == 1 and data.item_index("d") == 4
    assert data.num_items == 5 and data.num_users == 2
    with pytest.raises(UserError, match="unknown user id 'u3'"):
        data.user_index("u3")
    with pytest.raises(UserError, match="unknown item id"):
        data.item_index("[PAD]")


def test_save_load_round_trip(prepare, fixtures, tmp_path):
    data = prepare(fixtures / "tiny.csv", item_path=str(fixtures / "tiny_items.csv"))
    data.save(tmp_path / "saved")
    data.save(tmp_path / "saved")  # replacing an existing copy works too
    loaded = SequenceData.load(tmp_path / "saved")
    for name in ("user_ids", "item_ids", "offsets", "items", "item_text", "item_titles"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(data, name))
    assert loaded.items.dtype == np.int64 and loaded.item_ids.dtype == object
    assert loaded.stats == data.stats and loaded.fingerprint == data.fingerprint
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cache_hit_does_not_read_the_files_again(prepare, fixtures, monkeypatch):
    first = prepare(fixtures / "tiny.csv")

    def fail(*args):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(dataset_module, "read_source", fail)
    second = prepare(fixtures / "tiny.csv")
    assert second.fingerprint == first.fingerprint
    assert second.stats["cache"] == first.stats["cache"]
    np.testing.assert_array_equal(second.items, first.items)


def test_cache_rebuilds_on_a_changed_setting_or_file(prepare, fixtures, tmp_path):
    path = tmp_path / "inter.csv"
    path.write_bytes((fixtures / "tiny.csv").read_bytes())
    base = prepare(path)
    assert prepare(path, duplicates="first").fingerprint != base.fingerprint
    assert prepare(path, max_history=7).fingerprint == base.fingerprint  # does not shape the data
    path.write_text(path.read_text() + "u2,d,50\n")
    changed = prepare(path)
    assert changed.fingerprint != base.fingerprint
    assert changed.stats["interactions"] == base.stats["interactions"] + 1
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_failed_write_leaves_no_cache_folder(prepare, fixtures, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dataset_module.np, "savez", crash)
    with pytest.raises(OSError):
        prepare(fixtures / "tiny.csv")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert prepare(fixtures / "tiny.csv").num_users == 2


def test_tokenizer_adds_token_length_stats(prepare, fixtures):
    class WordTokenizer:  # the one method text_length_stats calls
        def __call__(self, texts):
            return {"input_ids": [text.split() for text in texts]}

    settings = {"item_path": str(fixtures / "tiny_items.csv"), "prompt": "", "max_text_tokens": 3}
    assert "text_tokens" not in prepare(fixtures / "tiny.csv", **settings).stats
    data = prepare(fixtures / "tiny.csv", tokenizer=WordTokenizer(), **settings)
    # words: a 7, b 2, c 5, d 4 -> more than 3 for a, c, d
    assert data.stats["text_tokens"]["tokens_max"] == 7
    assert data.stats["text_tokens"]["truncated_share"] == pytest.approx(0.75)


def test_ml100k_small_is_chronological(ml100k_small, shared_data):
    assert 45 <= ml100k_small.num_users <= 50
    raw = pd.read_csv(shared_data / "ml-100k" / "ml-100k.inter", sep="\t", dtype=str)
    times = {(r[0], r[1]): int(r[3]) for r in raw.itertuples(index=False) if int(r[0]) <= 50}
    for user in range(0, ml100k_small.num_users, 7):
        raw_user = ml100k_small.user_ids[user]
        seq = ml100k_small.item_ids[ml100k_small.sequence(user)]
        stamps = [times[(raw_user, item)] for item in seq]
        assert stamps == sorted(stamps)
    assert ml100k_small.stats["items"] == ml100k_small.num_items - 1
    assert (ml100k_small.items >= 1).all() and (ml100k_small.items < ml100k_small.num_items).all()
