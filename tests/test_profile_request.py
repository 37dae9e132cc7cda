"""scripts/profile_request.py: every phase of a request is timed on a padded tiny artifact."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hllm.bench.serve import scale_artifact

ROOT = Path(__file__).parents[1]


@pytest.mark.process
def test_every_phase_gets_a_median_time(tiny_artifact, tmp_path):
    catalogue = scale_artifact(tiny_artifact, tmp_path / "catalogue", 64)  # PQ trains on 16+ items
    command = [sys.executable, str(ROOT / "scripts" / "profile_request.py"), str(catalogue)]
    done = subprocess.run(
        [*command, "serve.pq_codes=4", "--repeats", "2"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rows = dict(re.findall(r"^\| (.+?) \| ([0-9.]+) \|$", done.stdout, flags=re.M))
    assert "64 items" in done.stdout
    phases = ["parse + validate", "resolve ids", "User LLM fp32", "User LLM int8", "hnsw search", "pq search"]
    for phase in phases:
        assert [name for name in rows if name.startswith(phase)], f"no {phase} row in {done.stdout}"
    assert all(float(ms) > 0 for ms in rows.values())
    assert "pq search codes=4 rerank=50" in done.stdout
