"""Session fixtures: the shared real datasets (fail loudly when missing), a ~50-user ml-100k, the cycle
data and a tiny trained run with its artifact. Helpers the tests share live in tests/support.py."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from hllm.config import DataConfig, load_config
from hllm.data.dataset import SequenceData, prepare_dataset
from hllm.serving.export import export_run
from hllm.train import fit
from tests.support import tiny_overrides, write_cycle_data

FIXTURES = Path(__file__).parent / "fixtures"
SMALL_USERS = 50


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the repository; its absence is a failure, never a skip."""
    path = Path(__file__).parents[1].parent / "shared" / "data"
    if not (path / "ml-100k" / "ml-100k.inter").is_file():
        pytest.fail(f"shared datasets missing: expected {path}/ml-100k, amazon-scientific, amazon-office")
    return path


@pytest.fixture(scope="session")
def ml100k_small(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> SequenceData:
    """Users 1..50 of ml-100k as RecBole files, prepared into a temporary cache."""
    source = shared_data / "ml-100k"
    folder = tmp_path_factory.mktemp("ml-100k-small")
    inter = pd.read_csv(source / "ml-100k.inter", sep="\t", dtype=str)
    wanted = inter["user_id:token"].astype(int) <= SMALL_USERS
    inter[wanted].to_csv(folder / "ml-100k-small.inter", sep="\t", index=False)
    (folder / "ml-100k-small.item").write_bytes((source / "ml-100k.item").read_bytes())
    config = DataConfig(path=str(folder), cache_dir=str(tmp_path_factory.mktemp("cache")))
    return prepare_dataset(config)


@pytest.fixture(scope="session")
def cycle_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cycle dataset (tests/support.py): cycle.csv and cycle_items.csv."""
    return write_cycle_data(tmp_path_factory.mktemp("cycle"))


@pytest.fixture(scope="session")
def tiny_run(cycle_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4-step run of the tiny config (tiny BERT items, tiny Llama user) on the cycle data."""
    out = tmp_path_factory.mktemp("serve-runs")
    fit(load_config(None, [*tiny_overrides(cycle_data, out), "train.max_steps=4", "train.epochs=1"]))
    return out / "tiny"


@pytest.fixture(scope="session")
def tiny_artifact(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's artifact; tests that change an artifact copy it first."""
    return export_run(tiny_run, tmp_path_factory.mktemp("artifacts") / "tiny")
