"""The Fabric loop on tiny random models: learning, exact resume, checkpoints, guard rails."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from hllm import train as train_module
from hllm.config import load_config
from hllm.data.dataset import prepare_dataset
from hllm.evaluate import evaluate
from hllm.models.popularity import Popularity
from hllm.data.batches import training_items
from hllm.runs import load_run
from hllm.train import fit
from tests.conftest import tiny_overrides


def test_overfits_a_deterministic_pattern_to_recall_at_1(cycle_data, tmp_path):
    config = load_config(
        None, tiny_overrides(cycle_data, tmp_path, train__epochs=40, train__patience=40)
    )
    result = fit(config)
    assert result["test"]["recall@1"] == 1.0
    assert result["valid"]["recall@1"] == 1.0
    saved = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert saved["test"] == result["test"]
    assert saved["protocol"]["items_ranked"] == 12


def test_two_epochs_equal_one_epoch_then_resume(cycle_data, tmp_path, monkeypatch):
    straight = load_config(
        None, tiny_overrides(cycle_data, tmp_path, name="straight", train__epochs=2)
    )
    fit(straight)

    interrupted = load_config(
        None, tiny_overrides(cycle_data, tmp_path, name="resumed", train__epochs=2)
    )
    real_save = train_module.save_checkpoint

    def save_then_die(fabric, path, state):
        real_save(fabric, path, state)
        if path.name == "last.ckpt":
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    fit(interrupted, resume=True)

    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["train_state"]["step"] == b["train_state"]["step"] > 0
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_checkpoint_round_trip_gives_the_same_metrics(cycle_data, tmp_path):
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, train__epochs=2))
    result = fit(config)
    run = load_run(tmp_path / "tiny")
    again = evaluate(
        run.model,
        run.data,
        "test",
        item_tokens=run.item_tokens,
        ks=[1, 5],
        max_history=config.data.max_history,
    )
    assert again == result["test"]


def test_learns_ml100k_beyond_popularity(ml100k_small, tmp_path):
    """30 steps on ~50 real users lower the loss and beat popularity on Recall@10 (validation)."""
    data_path = ml100k_small.stats["path"]
    config = load_config(
        None,
        [
            f"data.path={data_path}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.prompt=''",
            "data.max_history=20",
            "model.item.backbone=tiny-bert",
            "model.user.backbone=tiny-llama",
            "train.num_negatives=256",
            "train.max_steps=30",
            "train.epochs=30",
            "train.batch_size=16",
            "train.lr=3e-3",
            "train.log_every=1",
            f"out_dir={tmp_path}",
            "name=ml",
            "train.accelerator=cpu",
            "eval.metric=recall@10",
        ],
    )
    result = fit(config)
    with open(tmp_path / "ml" / "logs" / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    data = prepare_dataset(config.data)
    popularity = evaluate(
        Popularity(training_items(data), data.num_items),
        data,
        "valid",
        item_tokens=None,
        ks=[10],
        max_history=20,
    )
    assert result["valid"]["recall@10"] > popularity["recall@10"]
