"""`hllm prepare` end to end: exact counts on the real datasets; bad input exits 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hllm.cli import app, main
from hllm.errors import UserError

REPO = Path(__file__).parents[1]
COUNTS = {  # users, items, interactions, as measured in ../shared/data/README.md
    "ml-100k": (943, 1682, 100000),
    "amazon-scientific": (8317, 4344, 58492),
    "amazon-office": (4905, 2420, 53258),
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_prepare_json_reports_exact_counts(shared_data, tmp_path, name):
    result = CliRunner().invoke(
        app, ["prepare", str(shared_data / name), "--json", f"data.cache_dir={tmp_path}"]
    )
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)  # exactly one JSON object
    assert (stats["users"], stats["items"], stats["interactions"]) == COUNTS[name]
    assert stats["dropped_users"] == stats["dropped_interactions_missing_text"] == 0


def test_prepare_prints_a_table(fixtures, tmp_path):
    result = CliRunner().invoke(app, ["prepare", str(fixtures / "tiny.csv"), f"data.cache_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert "dropped users" in result.stdout and "sequence length" in result.stdout
    assert "tiny (csv)" in result.stdout


def test_prepare_format_option_and_config_file(fixtures, tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text(f"data:\n  cache_dir: {tmp_path / 'cache'}\n  kcore: 2\n")
    result = CliRunner().invoke(
        app,
        [
            "prepare",
            str(fixtures / "recbole"),
            "--format",
            "recbole",
            "--config",
            str(config),
            "--json",
            "data.duplicates=first",
        ],
    )
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["format"] == "recbole" and stats["min_user_interactions"] == 3
    assert stats["items"] == 3  # k-core 2 drops d, which only u1 has


def test_prepare_error_reaches_the_caller_as_user_error(fixtures, tmp_path):
    result = CliRunner().invoke(
        app, ["prepare", str(fixtures / "bad" / "bad_timestamp.csv"), f"data.cache_dir={tmp_path}"]
    )
    assert isinstance(result.exception, UserError)
    assert result.exception.where.endswith("bad_timestamp.csv:row 3")


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hllm", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


@pytest.mark.process
def test_real_entry_point_success(shared_data, tmp_path):
    done = run_module("prepare", str(shared_data / "ml-100k"), "--json", f"data.cache_dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1
    stats = json.loads(done.stdout)
    assert (stats["users"], stats["items"], stats["interactions"]) == COUNTS["ml-100k"]


@pytest.mark.process
def test_real_entry_point_bad_input(fixtures, tmp_path):
    path = fixtures / "bad" / "malformed.inter.json"
    done = run_module("prepare", str(path), f"data.cache_dir={tmp_path / 'cache'}")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"error: {path}:line 3: not valid JSON")
    assert not (tmp_path / "cache").exists()


BAD = Path(__file__).parent / "fixtures" / "bad"
TINY = Path(__file__).parent / "fixtures" / "tiny.csv"
ITEMS = Path(__file__).parent / "fixtures" / "tiny_items.csv"
BAD_INPUT = {  # case: (arguments after `prepare`, text the one line must contain)
    "missing file": ([str(BAD / "nope.csv")], [f"{BAD / 'nope.csv'}: no such file"]),
    "missing directory": ([str(BAD / "nope")], [f"{BAD / 'nope'}: no such file or directory"]),
    "empty file": ([str(BAD / "empty.csv")], ["empty.csv", "empty"]),
    "misnamed column": (
        [str(BAD / "misnamed_column.csv")],
        ["misnamed_column.csv:column user_id", "columns present: user, item_id"],
    ),
    "non-numeric timestamp": (
        [str(BAD / "bad_timestamp.csv")],
        ["bad_timestamp.csv:row 3", "'yesterday' is not a number"],
    ),
    "malformed json": ([str(BAD / "malformed.inter.json")], ["malformed.inter.json:line 3"]),
    "non-utf8 bytes": ([str(BAD / "not_utf8.csv")], ["not_utf8.csv:line 3", "not UTF-8"]),
    "ragged row": ([str(BAD / "ragged.csv")], ["ragged.csv", "Expected 3 columns, got 4"]),
    "item without text": (
        [
            str(BAD / "missing_text.csv"),
            f"data.item_path={BAD}/missing_text_items.csv",
            "data.missing_text=error",
        ],
        ["missing_text_items.csv", "item 'z'"],
    ),
    "empty after filtering": ([str(TINY), "data.kcore=10"], ["tiny.csv", "no interactions left"]),
    "unknown text field": (
        [str(TINY), f"data.item_path={ITEMS}", "data.text_fields=[colour]"],
        ["data.text_fields", "available: title, description"],
    ),
    "unknown format": ([str(TINY), "--format", "excel"], ["data.format"]),
    "ambiguous folder": (
        [str(BAD / "ambiguous")],
        ["several candidate dataset files (clicks.csv, views.csv)"],
    ),
    "missing item table": (
        [str(TINY), f"data.item_path={BAD}/nope.csv"],
        ["nope.csv", "not found"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(case, tmp_path, monkeypatch, capsys):
    args, expected = BAD_INPUT[case]
    cache = tmp_path / "cache"
    monkeypatch.setattr(sys, "argv", ["hllm", "prepare", *args, f"data.cache_dir={cache}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for text in expected:
        assert text in err
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written


def test_missing_text_drop_is_counted(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "prepare",
            str(BAD / "missing_text.csv"),
            f"data.item_path={BAD}/missing_text_items.csv",
            "--json",
            f"data.cache_dir={tmp_path}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dropped_interactions_missing_text"] == 1


def test_tokenizer_option_reports_token_lengths(fixtures, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    args = [
        "prepare",
        str(fixtures / "tiny.csv"),
        f"data.item_path={fixtures / 'tiny_items.csv'}",
        "data.prompt=''",
        "data.max_text_tokens=3",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    result = CliRunner().invoke(app, [*args, "--json", "--tokenizer", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output
    tokens = json.loads(result.stdout)["text_tokens"]
    assert tokens["tokens_max"] == 7 and tokens["truncated_share"] == pytest.approx(0.75)  # words
    result = CliRunner().invoke(app, [*args, "--tokenizer", str(tmp_path / "missing")])
    assert isinstance(result.exception, UserError) and result.exception.where == "--tokenizer"


def test_tokenizer_option_accepts_an_item_llm_preset(fixtures, tmp_path):
    args = [
        "prepare",
        str(fixtures / "tiny.csv"),
        f"data.item_path={fixtures / 'tiny_items.csv'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--json",
        "--tokenizer",
        "tiny-bert",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text_tokens"]["tokens_max"] > 0
