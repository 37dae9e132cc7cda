"""`hllm bench --quick` end to end: records, resume record by record, report and plots."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from hllm.bench.run import TUNING_GRID
from hllm.cli import app

KEYS = {"dataset", "model", "seed", "valid", "test", "train_seconds", "params", "config", "protocol"}


def test_quick_bench_writes_records_resumes_and_reports(tmp_path):
    args = [
        "bench",
        "--quick",
        "--seeds",
        "2",
        "--out",
        str(tmp_path),
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["model"], r["seed"]) for r in records] == [
        ("popularity", 0),
        ("popularity", 1),
        ("hllm-minilm-frozen", 0),
        ("hllm-minilm-frozen", 1),
    ]
    assert all(KEYS <= set(r) and "recall@10" in r["test"] for r in records)
    assert records[2]["params"] > 0 and records[2]["protocol"]["items_ranked"] == 1682

    # Lose the last record (as if interrupted): a rerun recomputes only that one.
    (tmp_path / "results.json").write_text(json.dumps(records[:3]))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "results.json").read_text())
    assert again[:3] == records[:3] and len(again) == 4
    assert again[3]["test"] == records[3]["test"]  # same seed, same numbers

    report = (tmp_path / "report.md").read_text()
    assert "| popularity | 2 |" in report and "hllm-minilm-frozen" in report
    assert (tmp_path / "ml-100k-metrics.png").stat().st_size > 1000


def test_unknown_bench_model_is_a_user_error(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--quick", "--models", "nope", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown model 'nope'" in str(result.exception)


def test_baselines_are_tuned_on_validation_and_the_best_setting_is_used_for_every_seed(tmp_path):
    args = ["bench", "--quick", "--models", "sasrec-ce", "--seeds", "2", "--out", str(tmp_path)]
    args += ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    trials = json.loads((tmp_path / "tuning.json").read_text())
    assert [t["overrides"] for t in trials] == TUNING_GRID
    best = max(trials, key=lambda t: t["valid"]["ndcg@10"])
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["model"], r["seed"]) for r in records] == [("sasrec-ce", 0), ("sasrec-ce", 1)]
    assert records[0]["test"] == best["test"]  # seed 0 is the chosen trial itself, not retrained
    assert records[1]["tuning"]["chosen"] == best["overrides"] == records[0]["tuning"]["chosen"]
    assert records[1]["config"]["name"].endswith(f"{best['tag']}-s1")
    assert len(records[1]["tuning"]["trials"]) == len(TUNING_GRID)

    assert "sasrec-ce: valid ndcg@10 of `recipe`" in (tmp_path / "report.md").read_text()

    # A rerun trains nothing: every trial and record is already there.
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and json.loads((tmp_path / "tuning.json").read_text()) == trials
