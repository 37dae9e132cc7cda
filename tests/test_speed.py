"""`hllm bench speed`: padding arithmetic, MFU bookkeeping, and a quick run end to end on real text."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hllm.bench.speed import padding_ratio, quick_settings, speed_section, summarise
from hllm.cli import app
from hllm.data.text import ItemTokens


def test_padding_ratio_is_padded_over_real_tokens():
    lengths = np.array([0, 2, 5, 3, 1])  # item 0 is PAD
    item_tokens = ItemTokens(
        np.zeros(lengths.sum(), dtype=np.int32), np.concatenate([[0], np.cumsum(lengths)])
    )
    # batch [1, 2]: longest 5 -> 10 padded vs 7 real; batch [3, 4]: longest 3 -> 6 vs 4 real.
    assert padding_ratio(
        item_tokens, [np.array([1, 2]), np.array([3, 4])], appended_tokens=0
    ) == pytest.approx(16 / 11)
    # one [ITEM] token each: (6 * 2 + 4 * 2) / (9 + 6)
    assert padding_ratio(
        item_tokens, [np.array([1, 2]), np.array([3, 4])], appended_tokens=1
    ) == pytest.approx(20 / 15)


def test_mfu_uses_the_counted_flops_of_the_uncheckpointed_step():
    records = [
        {"kind": "peak", "dtype": "fp32", "flops_per_s": 100.0},
        {"kind": "train", "backbone": "b", "mode": "finetune", "checkpointing": False, "step_s": 2.0,
         "flops_per_step": 120.0, "sequences_per_s": 4.0, "peak_rss_mb": 10.0, "data_s": 0.0},
        {"kind": "train", "backbone": "b", "mode": "finetune", "checkpointing": True, "step_s": 3.0,
         "sequences_per_s": 2.7, "peak_rss_mb": 6.0, "data_s": 0.0},
    ]  # fmt: skip
    settings = quick_settings("unused")
    summary = summarise(records, type(settings)(**{**settings.__dict__, "backbones": ("b",)}), "cmd")
    assert summary["train_step"]["finetune"]["mfu"] == pytest.approx(120 / 2 / 100)
    assert summary["train_step"]["finetune"]["checkpointing"]["mfu"] == pytest.approx(120 / 3 / 100)
    assert "| b | finetune | yes |" in speed_section(summary)


def test_quick_speed_bench_writes_speed_json_and_the_report(shared_data, tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\n## Serving\n\nkept as it is\n")
    # ml-100k's short item texts: amazon-scientific's take ~15 s to tokenise, once per process.
    args = ["bench", "speed", "--quick", "--dataset", str(shared_data / "ml-100k")]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path), "--report", str(report)])
    assert result.exit_code == 0, result.output
    speed = json.loads((tmp_path / "speed.json").read_text())
    encoding = speed["item_encoding"]
    assert {"packed_tokens_per_s", "padded_longest_tokens_per_s", "padding_ratio"} <= set(encoding)
    assert encoding["padding_ratio"] >= 1 and encoding["packed_tokens_per_s"] > 0
    for mode in ("finetune", "frozen"):
        assert 0 < speed["train_step"][mode]["mfu"] < 1, mode
        assert speed["train_step"][mode]["peak_rss_mb"] > 100
    assert "checkpointing" in speed["train_step"]["finetune"]
    kinds = {r["kind"] for r in speed["records"]}
    assert kinds == {"peak", "encode", "train", "eval"}
    text = report.read_text()
    assert "kept as it is" in text and "## Speed" in text and "| tiny-bert | fp32 | 32 |" in text

    # A rerun measures nothing new: every record is kept as it was.
    again = CliRunner().invoke(app, [*args, "--out", str(tmp_path), "--report", str(report)])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "speed.json").read_text())["records"] == speed["records"]
