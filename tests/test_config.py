"""The config layer: each range rule names its full dotted key, Literal choices, paths a run keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from hllm.config import (
    ItemConfig,
    absolute_paths,
    check_data_moved,
    load_config,
)
from hllm.config_fields import choices
from hllm.errors import UserError
from hllm.serve_config import ServeConfig

REPO = Path(__file__).parents[1]

OUT_OF_RANGE = {  # override: (the key the error names, the rule it states)
    "train.log_every=0": ("train.log_every", "at least 1, got 0"),
    "train.lr=0": ("train.lr", "above 0"),
    "train.warmup=1.5": ("train.warmup", "in [0.0, 1.0]"),
    "data.max_history=0": ("data.max_history", "at least 1"),
    "data.kcore=-1": ("data.kcore", "at least 0"),
    "model.user.dropout=1.5": ("model.user.dropout", "in [0, 1)"),
    "model.item.dropout=1": ("model.item.dropout", "in [0, 1)"),
    "model.temperature=5": ("model.temperature", "in [0.01, 1.0]"),
    "eval.ks=[5,0]": ("eval.ks", "at least 1, got [5, 0]"),
    "serve.port=70000": ("serve.port", "in [1, 65535]"),
    "creator.judge.attempts=0": ("creator.judge.attempts", "at least 1"),  # LLMConfig, second use
    "creator.infer.threshold=2": ("creator.infer.threshold", "in [0.0, 1.0]"),
}


@pytest.mark.parametrize("override", list(OUT_OF_RANGE))
def test_an_out_of_range_value_names_its_dotted_key(override):
    key, rule = OUT_OF_RANGE[override]
    with pytest.raises(UserError) as raised:
        load_config(None, [override])
    assert raised.value.where == key
    assert rule in str(raised.value)


def test_every_shipped_config_and_unset_optionals_pass():
    shipped = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "bench").glob("*.yaml"))
    recipes = [path for path in shipped if path.name != "datasets.yaml"]  # datasets.yaml is no run config
    assert len(recipes) > 10
    for path in recipes:
        load_config(path)
    config = load_config(None, ["model.item.dropout=null", "train.item_lr=null", "train.max_steps=-1"])
    assert config.model.item.dropout is None and config.train.max_steps == -1


def test_the_undeclared_padding_knob_is_an_unknown_key():
    with pytest.raises(UserError, match="unknown config key 'model.user.padding'"):
        load_config(None, ["model.user.padding=left"])


def test_choices_are_the_literal_values_of_a_field():
    assert choices(ServeConfig, "index") == ("exact", "hnsw", "hnsw-sq8", "ivf", "pq")
    assert choices(ItemConfig, "mode") == ("finetune", "lora", "frozen")
    with pytest.raises(UserError, match="model.item.mode"):
        load_config(None, ["model.item.mode=frozn"])


def test_absolute_paths_makes_inputs_independent_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = absolute_paths(load_config(None, ["data.path=data/x.csv", "data.cache_dir=cache"]))
    assert config.data.path == str(tmp_path / "data" / "x.csv")
    assert config.data.cache_dir == str(tmp_path / "cache")
    assert config.data.item_path is None and config.creator.train.rows == ""  # unset stays unset


def test_a_run_whose_data_moved_says_which_key_to_fix(tmp_path):
    config = load_config(None, [f"data.path={tmp_path / 'gone.csv'}"])
    with pytest.raises(UserError) as raised:
        check_data_moved(config, tmp_path / "config.yaml")
    assert str(raised.value).startswith(f"{tmp_path / 'config.yaml'}: the run's data.path {tmp_path}")
    assert "set data.path" in str(raised.value)
    check_data_moved(load_config(None, [f"data.path={tmp_path}"]), tmp_path / "config.yaml")
