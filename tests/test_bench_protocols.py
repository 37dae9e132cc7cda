"""`hllm bench --protocol`: new-items and temporal records in their own folders, with bucket metrics."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from hllm.cli import app


def test_new_items_bench_scores_untrained_baselines_per_bucket(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folder is benchmarks/new-items under the working directory
    args = ["bench", "--quick", "--protocol", "new-items", "--models", "popularity,text-knn", "--seeds", "1"]
    result = CliRunner().invoke(app, [*args, "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "benchmarks" / "new-items" / "results.json").read_text())
    assert [r["model"] for r in records] == ["popularity", "text-knn"]
    for record in records:
        assert record["protocol"]["held_out_items"] == 168  # 10% of ml-100k's 1,682 items
        assert record["test"]["new/users"] > 0 and "tail/recall@10" in record["test"]
    assert records[0]["test"]["new/recall@10"] == 0.0  # popularity cannot rank an untrained item


def test_temporal_bench_writes_its_own_folder(tmp_path):
    out = tmp_path / "temporal"
    args = ["bench", "--quick", "--protocol", "temporal", "--models", "popularity", "--seeds", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--set", f"data.cache_dir={tmp_path / 'c'}"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads((out / "results.json").read_text())
    assert record["protocol"]["split"].startswith("temporal") and record["test"]["users"] < 943
