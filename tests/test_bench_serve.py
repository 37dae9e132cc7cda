"""`hllm bench serve`: two artifacts side by side, two variants each (one with its own index), through
real servers."""

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
    pq_int8 = ["serve.index=pq", "serve.pq_codes=4", "serve.precision=int8"]
    only_other = ["other:", "serve.max_batch=4"]
    variants = [[], pq_int8, only_other]
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
        ("other", "other: serve.max_batch=4"),
        ("other", " ".join(pq_int8)),
        ("tiny", ""),
        ("tiny", " ".join(pq_int8)),
    ]
    for row in records:
        assert row["errors"] == 0 and row["requests"] > 0 and row["items"] == ITEMS
        assert row["recall@10"] == 1.0 and row["saved_index_read"] is False  # built by this run
        assert 0.0 <= row["overlap@10"] <= 1.0
        if row["variant"] == "":
            assert row["overlap@10"] == 1.0  # the first variant is the reference
            assert row["index"] == "exact" and row["precision"] == "fp32"
        elif row["variant"] == " ".join(only_other):  # the artifact's default index, its own batches
            assert row["artifact"] == "other" and row["index"] == "exact"
        else:  # its own index: 4 codes per item, 50 x 10 candidates re-ranked (all 40 items)
            assert row["index"] == "pq" and row["precision"] == "int8"
            assert row["settings"] == {"pq_codes": 4, "pq_rerank": 50}
    embeddings = np.load(tmp_path / "out" / f"catalogue-{ITEMS}-other" / "embeddings.npy")
    assert len(embeddings) == ITEMS + 1  # row 0 is padding
    assert json.loads((tmp_path / "out" / "serve.json").read_text()) == json.loads(json.dumps(records))
    table = report.read_text()
    assert "| other | exact" in table and "| tiny | pq codes=4 rerank=50" in table and "overlap@10" in table


def test_a_variant_limited_to_an_unknown_artifact_is_refused(tiny_artifact, tmp_path):
    with pytest.raises(UserError, match="names no artifact"):
        bench_serve([tiny_artifact], tmp_path, sizes=[ITEMS], kinds=["exact"], clients=[1], seconds=0.1,
                    variants=[["nowhere:", "serve.max_batch=4"]])  # fmt: skip


def test_artifacts_with_the_same_folder_name_are_refused(tiny_artifact, tmp_path):
    twin = copy_artifact(tiny_artifact, tmp_path / "twin" / tiny_artifact.name)
    with pytest.raises(UserError, match="distinct folder names"):
        bench_serve([tiny_artifact, twin], tmp_path, sizes=[ITEMS], kinds=["exact"], clients=[1], seconds=0.1)


def test_overlap_at_10_by_hand():
    first = [["a", "b", "c", "d"], ["x", "y"]]
    other = [["a", "b", "e", "f"], ["y", "x"]]
    assert overlap_at_10(first, other) == pytest.approx((0.5 + 1.0) / 2)
