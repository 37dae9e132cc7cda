"""Session fixtures: the shared real datasets (fail loudly when missing) and a ~50-user ml-100k."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from hllm.config import DataConfig
from hllm.data.dataset import SequenceData, prepare_dataset

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
        pytest.fail(
            f"shared datasets missing: expected {path}/ml-100k, amazon-scientific, amazon-office"
        )
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
