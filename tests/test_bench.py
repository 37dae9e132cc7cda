"""`hllm bench`: the recipes of configs/bench/ (equal budgets), `--quick` end to end (records, resume
record by record, tuning on validation, report and plots), and the report's choice of the best model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hllm.bench import recipes
from hllm.bench.report import best_lines, write_report
from hllm.cli import app
from hllm.config import load_config
from hllm.errors import UserError
from hllm.files import hash_json

KEYS = {"dataset", "model", "seed", "valid", "test", "train_seconds", "params", "config", "protocol"}


@pytest.mark.parametrize("model", recipes.model_names())
def test_every_recipe_loads_and_opens_with_its_command(model):
    path = recipes.recipe_path(model)
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert path.read_text().startswith("# ") and f"--models {model}" in header
    raw = load_config(path)
    assert raw.eval.metric == "ndcg@10"
    for key in ("path:", "text_fields:", "seed:", "name:", "out_dir:"):
        assert key not in path.read_text(), f"{path}: {key} belongs to the harness (datasets.yaml, --seeds)"


def test_every_model_family_gets_the_same_budget_and_grid_size():
    grids = recipes.grids()
    assert set(grids) == {"id", "hllm"}
    assert len({len(grid.settings) for grid in grids.values()}) == 1
    budgets = set()
    for grid in grids.values():
        for model in grid.recipes:
            for setting in grid.settings:  # every setting is a valid override of every recipe it tunes
                config = load_config(recipes.recipe_path(model), setting)
                budgets.add((config.train.epochs, config.train.patience))
    assert budgets == {(40, 5)}


def test_the_hllm_grid_covers_width_learning_rate_dropout_history_and_negatives():
    settings = [item for setting in recipes.grids()["hllm"].settings for item in setting]
    widths = {
        load_config(recipes.recipe_path("hllm-minilm-frozen"), [s]).model.user.backbone for s in settings
    }
    assert {"small-llama-64", "small-llama-128", "small-llama"} <= widths  # 64 to 384
    touched = {item.split("=")[0] for item in settings}
    assert {"train.lr", "model.user.dropout", "data.max_history", "train.negatives"} <= touched


def test_a_grid_with_an_unknown_key_or_a_model_in_two_grids_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "RECIPES", tmp_path)
    (tmp_path / "grids").mkdir()
    grid = tmp_path / "grids" / "a.yaml"
    grid.write_text("recipes: [x]\nsettings: [[]]\nsetings: [[]]\n")
    recipes.grids.cache_clear()
    with pytest.raises(UserError, match="setings"):
        recipes.grids()
    grid.write_text("recipes: [x]\nsettings: [[]]\n")
    (tmp_path / "grids" / "b.yaml").write_text("recipes: [x, y]\nsettings: [[]]\n")
    recipes.grids.cache_clear()
    with pytest.raises(UserError, match="more than one grid: x"):
        recipes.grids()
    recipes.grids.cache_clear()


def test_quick_bench_writes_records_resumes_and_reports(tmp_path, monkeypatch):
    model = "hllm-minilm-frozen-no-dropout"  # untuned: one run per seed
    args = ["bench", "--quick", "--models", f"popularity,{model}", "--seeds", "2", "--out", str(tmp_path)]
    monkeypatch.chdir(tmp_path)
    args += ["--set", "data.cache_dir=cache"]  # relative, as the default is
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "results.json").read_text())
    # Popularity trains nothing, so a second seed would repeat the first: it runs once.
    assert [(r["model"], r["seed"]) for r in records] == [("popularity", 0), (model, 0), (model, 1)]
    assert all(KEYS <= set(r) and "recall@10" in r["test"] for r in records)
    assert records[1]["params"] > 0 and records[1]["protocol"]["items_ranked"] == 1682
    assert records[1]["config"]["model"]["user"]["dropout"] == 0.0  # from its recipe file
    # Checkable: each card's hash is the hash of the config stored beside it, paths made absolute.
    assert all(hash_json(r["config"]) == r["protocol"]["config_hash"] for r in records)
    assert records[1]["config"]["data"]["cache_dir"] == str(tmp_path / "cache")

    # Lose the last record (as if interrupted): a rerun recomputes only that one.
    (tmp_path / "results.json").write_text(json.dumps(records[:2]))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "results.json").read_text())
    assert again[:2] == records[:2] and len(again) == 3
    assert again[2]["test"] == records[2]["test"]  # same seed, same numbers

    report = (tmp_path / "report.md").read_text()
    assert "| popularity | 1 |" in report and model in report
    assert (tmp_path / "ml-100k-metrics.png").stat().st_size > 1000


def test_unknown_bench_model_is_a_user_error_before_anything_runs(tmp_path):
    args = ["bench", "--quick", "--models", "popularity,nope", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError) and "unknown model 'nope'" in str(result.exception)
    assert not (tmp_path / "results.json").exists()


def test_baselines_are_tuned_on_validation_and_the_best_setting_is_used_for_every_seed(tmp_path):
    grid = recipes.grid_of("sasrec-ce")[:3]  # the mechanism, on fewer trials than the real grid
    args = ["bench", "--quick", "--models", "sasrec-ce", "--seeds", "2", "--grid-size", "3"]
    args += ["--out", str(tmp_path)]
    args += ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    trials = json.loads((tmp_path / "tuning.json").read_text())
    assert [t["overrides"] for t in trials] == grid
    best = max(trials, key=lambda t: t["valid"]["ndcg@10"])
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["model"], r["seed"]) for r in records] == [("sasrec-ce", 0), ("sasrec-ce", 1)]
    assert records[0]["test"] == best["test"]  # seed 0 is the chosen trial itself, not retrained
    assert records[1]["tuning"]["chosen"] == best["overrides"] == records[0]["tuning"]["chosen"]
    assert records[0]["tuning"]["grid_size"] == 3
    assert records[1]["config"]["name"].endswith(f"{best['tag']}-s1")
    assert len(records[1]["tuning"]["trials"]) == len(grid)

    report = (tmp_path / "report.md").read_text()
    assert f"the best of {len(grid)} settings on valid ndcg@10" in report
    assert report.count("| sasrec-ce | `") == len(grid)  # every trial, the losing ones too

    # A rerun trains nothing: every trial and record is already there.
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and json.loads((tmp_path / "tuning.json").read_text()) == trials


def _records(model: str, kind: str, valid: float, test: float, ids: bool = False) -> list[dict]:
    scores = {"recall@10": test, "ndcg@10": test}
    config = {"model": {"kind": kind, "item": {"id_embedding": ids}}}
    return [{"model": model, "valid": {"ndcg@10": valid}, "test": scores, "config": config}]


def test_the_best_model_of_a_family_is_chosen_on_validation_not_test():
    models = {
        "hllm-a": _records("hllm-a", "hllm", valid=0.10, test=0.30),  # best on test only
        "hllm-b": _records("hllm-b", "hllm", valid=0.12, test=0.20),
        "hllm-b-id": _records("hllm-b-id", "hllm", valid=0.13, test=0.26, ids=True),
        "sasrec-ce": _records("sasrec-ce", "sasrec", valid=0.11, test=0.25),
        "popularity": _records("popularity", "popularity", valid=0.50, test=0.50),
    }
    (line, _) = best_lines(models, "ndcg@10")
    assert "HLLM `hllm-b-id`" in line and "ID baseline `sasrec-ce`" in line
    assert "recall@10 +4%" in line  # 0.26 vs 0.25
    assert "text-only HLLM (no item-ID table), chosen the same way: `hllm-b`" in line
    assert "0.80x the baseline's recall@10" in line  # 0.20 vs 0.25


def test_report_tables_and_plots_recall_per_target_bucket(tmp_path):
    """Buckets with users get a column (with their user count) and a bar per model; empty ones none."""

    def record(model: str, seed: int, new: float, tail: float) -> dict:
        test = {metric: 0.1 for metric in ("recall@10", "ndcg@10", "recall@50", "ndcg@50", "mrr")}
        test |= {"new/users": 90, "new/recall@10": new, "tail/users": 300, "tail/recall@10": tail}
        test |= {"hist_1_3/users": 0}
        return {
            "dataset": "d",
            "model": model,
            "seed": seed,
            "valid": {"ndcg@10": 0.1},
            "test": test,
            "train_seconds": 1.0,
            "valid_history": [],
            "config": {"model": {"kind": "hllm"}},
        }

    older = record("older", 0, 0.0, 0.0)  # written before the evaluator had buckets
    older["test"] = {key: value for key, value in older["test"].items() if "/" not in key}
    records = [older, record("a", 0, 0.2, 0.1), record("a", 1, 0.4, 0.1), record("b", 0, 0.0, 0.3)]
    report = write_report(records, tmp_path).read_text()
    assert "| model | new (90) | tail (300) |" in report and "hist_1_3" not in report
    assert report.count("| older |") == 1  # its row of the main table, none among the buckets
    assert "| a | 0.3000 ± 0.1414 | 0.1000 ± 0.0000 |" in report
    assert "| b | 0.0000 | 0.3000 |" in report
    assert (tmp_path / "d-buckets.png").stat().st_size > 0 and "![buckets](d-buckets.png)" in report
