"""scripts/gpu-check.sh rehearsed on the CPU with tiny random models (HLLM_GPU_CHECK_TINY=1) over a
150-user slice of amazon-scientific: it runs end to end and reports what the GPU run will report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
USERS = 150


@pytest.fixture
def scientific_slice(shared_data: Path, tmp_path: Path) -> Path:
    """The first USERS users of amazon-scientific and their items, in its own LC-Rec format."""
    source = shared_data / "amazon-scientific"
    inter = json.loads((source / "Scientific.inter.json").read_text())
    users = {user: inter[user] for user in list(inter)[:USERS]}
    wanted = {str(item) for items in users.values() for item in items}
    items = {
        k: v for k, v in json.loads((source / "Scientific.item.json").read_text()).items() if k in wanted
    }
    folder = tmp_path / "scientific-slice"
    folder.mkdir()
    (folder / "Scientific.inter.json").write_text(json.dumps(users))
    (folder / "Scientific.item.json").write_text(json.dumps(items))
    return folder


@pytest.mark.process  # two Python processes, about 30 s on 2 cores
def test_tiny_rehearsal_reports_parity_validation_and_tokens_per_second(scientific_slice, tmp_path):
    out = tmp_path / "check"
    env = os.environ | {
        "HLLM_GPU_CHECK_TINY": "1",
        "HLLM_GPU_CHECK_DATA": str(scientific_slice),
        "HLLM_GPU_CHECK_OUT": str(out),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", "scripts/gpu-check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cosine = re.search(r"packed vs padded cosine min ([\d.]+)", done.stdout)
    assert cosine and float(cosine[1]) > 0.999
    summary = json.loads((out / "gpu-check.json").read_text())
    assert 0 <= summary["valid"]["ndcg@10"] <= 1 and summary["steps"] == 3
    assert summary["item_tokens_per_s"] > 0
