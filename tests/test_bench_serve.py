"""`hllm bench serve`: two artifacts side by side, two variants each, through real servers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hllm.bench.serve import bench_serve, overlap_at_10
from hllm.errors import UserError
from tests.support import copy_artifact

ITEMS = 40  # the tiny catalogue padded with synthetic items


@pytest.mark.process
def test_two_artifacts_and_two_variants_in_one_run(tiny_artifact, tmp_path):
    other = copy_artifact(tiny_artifact, tmp_path / "other")
    report = tmp_path / "BENCH.md"
    variants = [[], ["serve.precision=int8"]]
    records = bench_serve(
        [tiny_artifact, other],
        tmp_path / "out",
        sizes=[ITEMS],
        kinds=["exact"],
        clients=[2],
        seconds=0.5,
        report=report,
        variants=variants,
        agreement=20,
    )
    assert sorted((r["artifact"], r["variant"]) for r in records) == [
        ("other", ""),
        ("other", "serve.precision=int8"),
        ("tiny", ""),
        ("tiny", "serve.precision=int8"),
    ]
    for row in records:
        assert row["errors"] == 0 and row["requests"] > 0 and row["items"] == ITEMS
        assert row["recall@10"] == 1.0 and row["saved_index_read"] is False  # exact search, never saved
        assert 0.0 <= row["overlap@10"] <= 1.0
        if row["variant"] == "":
            assert row["overlap@10"] == 1.0  # the first variant is the reference
        else:
            assert row["precision"] == "int8"
    embeddings = np.load(tmp_path / "out" / f"catalogue-{ITEMS}-other" / "embeddings.npy")
    assert len(embeddings) == ITEMS + 1  # row 0 is padding
    assert json.loads((tmp_path / "out" / "serve.json").read_text()) == json.loads(json.dumps(records))
    table = report.read_text()
    assert "| other | exact" in table and "| tiny | exact" in table and "overlap@10" in table


def test_artifacts_with_the_same_folder_name_are_refused(tiny_artifact, tmp_path):
    twin = copy_artifact(tiny_artifact, tmp_path / "twin" / tiny_artifact.name)
    with pytest.raises(UserError, match="distinct folder names"):
        bench_serve([tiny_artifact, twin], tmp_path, sizes=[ITEMS], kinds=["exact"], clients=[1], seconds=0.1)


def test_overlap_at_10_by_hand():
    first = [["a", "b", "c", "d"], ["x", "y"]]
    other = [["a", "b", "e", "f"], ["y", "x"]]
    assert overlap_at_10(first, other) == pytest.approx((0.5 + 1.0) / 2)
