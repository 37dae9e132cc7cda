"""Session fixtures: the shared real datasets (fail loudly when missing) and a ~50-user ml-100k."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
import uvicorn

from hllm.bench.serve import free_port
from hllm.config import DataConfig, load_config
from hllm.data.dataset import SequenceData, prepare_dataset
from hllm.serving.export import export_run
from hllm.train import fit

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


CYCLE_ITEMS = 12
CYCLE_USERS = 36


@pytest.fixture(scope="session")
def cycle_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deterministic pattern: every user walks a cycle of 12 items, so item i is always followed
    by item i+1; a model that learns it ranks the next item first (Recall@1 = 1)."""
    folder = tmp_path_factory.mktemp("cycle")
    rows = [
        (f"u{user}", f"i{(user + step) % CYCLE_ITEMS}", step)
        for user in range(CYCLE_USERS)
        for step in range(6)
    ]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(folder / "cycle.csv", index=False)
    names = [
        "red lamp",
        "blue pen",
        "green ink",
        "black tape",
        "white desk",
        "gold box",
        "paper kit",
        "glass set",
        "water bag",
        "mini cable",
        "dark chair",
        "pro light",
    ]
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(CYCLE_ITEMS)], "title": names})
    items.to_csv(folder / "cycle_items.csv", index=False)
    return folder


def tiny_overrides(data_folder: Path, out_dir: Path, **extra: object) -> list[str]:
    """Config overrides for a fast CPU run on tiny random models over the cycle data."""
    values = {
        "name": "tiny",
        "out_dir": out_dir,
        "data.path": data_folder / "cycle.csv",
        "data.item_path": data_folder / "cycle_items.csv",
        "data.cache_dir": out_dir / "cache",
        "data.prompt": "''",
        "data.max_history": 5,
        "model.item.backbone": "tiny-bert",
        "model.item.pooling": "mean",
        "model.user.backbone": "tiny-llama",
        "train.batch_size": 8,
        "train.num_negatives": 8,
        "train.lr": 3e-3,
        "train.warmup": 0.0,
        "train.log_every": 1,
        "train.accelerator": "cpu",
        "eval.metric": "recall@1",
        "eval.ks": "[1,5]",
    }
    values.update({key.replace("__", "."): value for key, value in extra.items()})
    return [f"{key}={value}" for key, value in values.items()]


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


def copy_artifact(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@contextlib.contextmanager
def serving_app(app, *, health: str = "/health") -> Iterator[str]:
    """uvicorn on 127.0.0.1, a free port, in a background thread; yields the URL once `health` answers."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}{health}", timeout=1).status_code == 200:
                    break
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "the server did not stop"
