"""Every command end to end on a tiny config, through the real entry point; bad input exits 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.support import CYCLE_ITEMS, assert_one_line_error, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def run_dir(cycle_data, tmp_path_factory) -> Path:
    """`hllm train` for 4 steps, then `--resume` to 6: the run folder of a short real run."""
    out = tmp_path_factory.mktemp("runs")
    config = out / "tiny.yaml"
    config.write_text("train:\n  epochs: 3\n")
    overrides = tiny_overrides(cycle_data, out)
    code, _, err = run_cli("train", config, *overrides, "train.max_steps=4")
    assert code == 0, err
    checkpoint = torch.load(out / "tiny" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["train_state"]["step"] == 4
    code, _, err = run_cli("train", config, *overrides, "train.max_steps=6", "--resume")
    assert code == 0, err
    return out / "tiny"


def test_train_writes_the_run_folder_and_resumes(run_dir):
    for name in (
        "config.yaml",
        "metrics.json",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
        "logs/metrics.csv",
    ):
        assert (run_dir / name).is_file(), name
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["train_state"]["step"] == 6
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 6
    assert metrics["protocol"]["items_ranked"] == 12 and "dataset_hash" in metrics["protocol"]


def test_evaluate_json_matches_the_training_metrics(run_dir):
    code, out, err = run_cli("evaluate", run_dir, "--json")
    assert code == 0, err
    result = json.loads(out)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert set(result) == {"valid", "test"}
    assert result["test"] == saved["test"]
    assert {"recall@1", "ndcg@5", "mrr"} <= set(result["valid"])


def test_recommend_prints_titles_for_a_user_and_a_history(run_dir):
    code, out, err = run_cli("recommend", run_dir, "--user", "u3", "-k", "3")
    assert code == 0, err
    assert "top 3 for user u3" in out and out.count("\n") > 5
    code, out, err = run_cli("recommend", run_dir, "--items", "i1,i2", "-k", "2")
    assert code == 0, err
    assert "top 2" in out


def test_config_show_prints_the_resolved_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 0.5\n")
    code, out, _ = run_cli("config", "show", config, "data.max_history=7")
    assert code == 0
    assert "lr: 0.5" in out and "max_history: 7" in out


def test_unknown_config_key_names_the_closest(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  learning_rate: 0.5\n")
    code, _, err = run_cli("config", "show", config)
    assert_one_line_error(code, err, "train.learning_rate", "c.yaml")
    code, _, err = run_cli("config", "show", config.with_name("none.yaml"))
    assert_one_line_error(code, err, "none.yaml", "not found")
    config.write_text("model:\n  item:\n    mode: frozn\n")
    code, _, err = run_cli("config", "show", config)
    assert_one_line_error(code, err, "model.item.mode", "finetune")


def test_recommend_unknown_user_and_item(run_dir):
    code, _, err = run_cli("recommend", run_dir, "--user", "nobody")
    assert_one_line_error(code, err, "unknown user id 'nobody'")
    code, _, err = run_cli("recommend", run_dir, "--items", "i1,nothing")
    assert_one_line_error(code, err, "unknown item id 'nothing'")


def test_run_folder_without_or_with_a_damaged_checkpoint(run_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    code, _, err = run_cli("evaluate", copy)
    assert_one_line_error(code, err, "best.ckpt", "no checkpoint")
    (copy / "checkpoints").mkdir()
    (copy / "checkpoints" / "best.ckpt").write_bytes(b"not a checkpoint at all")
    code, _, err = run_cli("evaluate", copy)
    assert_one_line_error(code, err, "best.ckpt", "damaged")
    code, _, err = run_cli("evaluate", tmp_path)
    assert_one_line_error(code, err, "not a run folder")


def test_bad_model_settings_exit_2(cycle_data, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    base = tiny_overrides(cycle_data, tmp_path)
    code, _, err = run_cli("train", config, *base, "model.item.backbone=no-such-model")
    assert_one_line_error(code, err, "no-such-model")
    code, _, err = run_cli("train", config, *base, "name=b", "model.user.backbone=tiny-bert")
    assert_one_line_error(code, err, "User LLM", "decoder")
    code, _, err = run_cli("train", config, *base, "name=c", "train.negatives=catalogue")
    assert_one_line_error(code, err, "train.negatives", "frozen")
    code, _, err = run_cli("train", config, *base, "name=d", "model.user.dropout=1.5")
    assert_one_line_error(code, err, "model.user.dropout", "[0, 1)")
    code, _, err = run_cli("train", config, *base, "name=e", "train.log_every=0")  # once a ZeroDivisionError
    assert_one_line_error(code, err, "train.log_every", "at least 1")
    assert not (tmp_path / "e").exists()


def test_option_values_are_checked_against_the_config_choices(tmp_path):
    code, _, err = run_cli("index", tmp_path, "--kind", "annoy")
    assert_one_line_error(code, err, "--kind", "'annoy'", "exact, hnsw, hnsw-sq8, ivf")
    code, _, err = run_cli("bench", "speed", "--modes", "finetune,bogus", "--out", tmp_path)
    assert_one_line_error(code, err, "--modes", "'bogus'", "finetune, lora, frozen")
    code, _, err = run_cli("bench", "serve", tmp_path, "--clients", "1,x", "--out", tmp_path)
    assert_one_line_error(code, err, "--clients", "whole numbers")


def test_a_run_trained_with_relative_paths_works_from_any_directory(cycle_data, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(cycle_data, project / "data")
    (project / "c.yaml").write_text("{}\n")
    monkeypatch.chdir(project)
    overrides = tiny_overrides(Path("data"), Path("runs"), train__max_steps=2, train__epochs=1)
    code, _, err = run_cli("train", "c.yaml", *overrides)
    assert code == 0, err
    run = (project / "runs" / "tiny").resolve()
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("evaluate", run, "--json")
    assert code == 0, err
    assert json.loads(out)["test"] == json.loads((run / "metrics.json").read_text())["test"]
    code, out, err = run_cli("recommend", run, "--user", "u1", "-k", "2")
    assert code == 0 and "top 2 for user u1" in out, err
    code, _, err = run_cli("export", run, tmp_path / "artifact")
    assert code == 0 and (tmp_path / "artifact" / "manifest.json").is_file(), err
    (project / "data").rename(project / "moved")
    code, _, err = run_cli("evaluate", run)
    expected = [str(run / "config.yaml"), f"data.path {project.resolve() / 'data' / 'cycle.csv'}"]
    assert_one_line_error(code, err, *expected, "set data.path")


def test_an_hllm_needs_item_text_an_id_model_does_not(cycle_data, tmp_path):
    (tmp_path / "bare").mkdir()
    shutil.copy(cycle_data / "cycle.csv", tmp_path / "bare" / "cycle.csv")  # no item table beside it
    (tmp_path / "ids.csv").write_text("item_id\n" + "".join(f"i{i}\n" for i in range(CYCLE_ITEMS)))
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    bare = tiny_overrides(
        cycle_data, tmp_path, data__path=tmp_path / "bare" / "cycle.csv", data__item_path="null"
    )
    code, _, err = run_cli("train", config, *bare)
    assert_one_line_error(code, err, "cycle.csv", "no item table", "data.item_path")
    code, _, err = run_cli("train", config, *bare, f"data.item_path={tmp_path / 'ids.csv'}")
    assert_one_line_error(code, err, "ids.csv", "no text columns", "data.text_fields")
    code, _, err = run_cli("train", config, *bare, "model.kind=sasrec", "train.max_steps=2", "train.epochs=1")
    assert code == 0, err
    assert json.loads((tmp_path / "tiny" / "metrics.json").read_text())["train"]["steps"] == 2


UNUSABLE_STRATEGIES = [
    ("fsdp", "FSDP is only available on GPU"),
    ("bogus", "invalid strategy name"),
    ("deepspeed", "deepspeed"),
]


@pytest.mark.parametrize(("strategy", "expected"), UNUSABLE_STRATEGIES)
def test_unusable_strategy_exits_2(cycle_data, tmp_path, strategy, expected):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    base = tiny_overrides(cycle_data, tmp_path)
    code, _, err = run_cli("train", config, *base, f"train.strategy={strategy}")
    assert_one_line_error(code, err, expected, "train.accelerator/devices/num_nodes/strategy/precision")
