"""faiss indexes: exact equals brute force, HNSW/IVF/PQ reach the recall they promise, adds under searches."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

import hllm.serving.index
from hllm.bench.serve import scale_artifact
from hllm.errors import UserError
from hllm.serving.export import load_artifact
from hllm.serving.index import (
    ItemIndex,
    build_index,
    index_artifact,
    index_path,
    open_index,
    overlap_at_k,
    search,
    settings_of,
)
from tests.support import copy_artifact

ITEMS, WIDTH, QUERIES, K = 2000, 32, 200, 10


def normalised(rng: np.random.Generator, n: int, width: int = WIDTH) -> np.ndarray:
    vectors = rng.standard_normal((n, width)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray]:
    """2,000 random unit vectors and 200 unit queries."""
    rng = np.random.default_rng(0)
    return normalised(rng, ITEMS), normalised(rng, QUERIES)


@pytest.fixture(scope="module")
def exact_top(catalogue) -> np.ndarray:
    vectors, queries = catalogue
    return build_index(vectors, "exact").search(queries, K)[1]


def test_exact_equals_numpy_brute_force(catalogue, exact_top):
    vectors, queries = catalogue
    scores = queries @ vectors.T  # (B, N)
    truth = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    found_scores, found = build_index(vectors, "exact").search(queries, K)
    np.testing.assert_allclose(found_scores, np.take_along_axis(scores, truth, axis=1), atol=1e-5)
    # Labels agree wherever the scores are not tied (random floats: everywhere).
    assert (found == truth).mean() > 0.999
    assert overlap_at_k(exact_top, truth) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("kind", ["hnsw", "hnsw-sq8", "ivf", "pq"])
def test_approximate_indexes_reach_recall_090(catalogue, exact_top, kind):
    vectors, queries = catalogue
    index = build_index(vectors, kind)
    assert index.ntotal == ITEMS
    scores, found = index.search(queries, K)
    assert overlap_at_k(found, exact_top) >= 0.9
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_overlap_at_k_by_hand():
    found = np.array([[1, 2, 3], [4, 5, -1]])
    truth = np.array([[1, 2, 9], [6, 5, 4]])
    assert overlap_at_k(found, truth) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert overlap_at_k(truth, truth) == 1.0
    assert overlap_at_k(np.full((2, 3), -1), truth) == 0.0  # "not found" (-1) is never a hit


def test_too_many_ivf_lists_are_a_user_error(catalogue):
    vectors, _ = catalogue  # an unknown kind never gets here: the config and the CLI refuse it
    with pytest.raises(UserError, match="serve.ivf_lists"):
        build_index(vectors[:10], "ivf", ivf_lists=20)


def test_hnsw_sq8_walks_8_bit_codes_and_scores_on_the_exact_vectors(catalogue):
    vectors, queries = catalogue
    index = build_index(vectors, "hnsw-sq8", hnsw_m=8, hnsw_ef_search=40)
    graph = faiss.downcast_index(index.base_index)
    assert isinstance(graph, faiss.IndexHNSWSQ) and graph.hnsw.efSearch == 40
    scores, found = search(index, queries, 30, kept=K)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, found, axis=1), atol=1e-5)


def test_pq_recall_grows_with_the_candidates_it_reranks(catalogue, exact_top):
    vectors, queries = catalogue
    index = build_index(vectors, "pq", pq_codes=8, pq_rerank=1)  # 8 codes of 4 bits: a coarse ranking
    coarse = overlap_at_k(index.search(queries, K)[1], exact_top)
    index.k_factor = 50
    scores, found = index.search(queries, K)
    assert coarse < 0.9 <= overlap_at_k(found, exact_top)
    exact_scores = np.take_along_axis(queries @ vectors.T, found, axis=1)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)  # re-ranked on the exact vectors


def test_a_search_that_keeps_few_rows_reranks_for_those(catalogue, exact_top):
    """Asking 60 to keep 10 (a history of 50 filtered out) re-ranks 20 x 10 + 50 candidates, not 20 x 60."""
    vectors, queries = catalogue
    index = build_index(vectors, "pq", pq_codes=8, pq_rerank=20)
    truth_60 = build_index(vectors, "exact").search(queries, 60)[1]
    deep, kept = search(index, queries, 60)[1], search(index, queries, 60, kept=10)[1]
    assert overlap_at_k(kept[:, :10], exact_top) >= 0.9  # the kept ten are found as well
    assert overlap_at_k(kept, truth_60) < overlap_at_k(deep, truth_60)  # the rest got fewer candidates
    assert index.k_factor == 20  # per call: the shared index is unchanged
    hnsw = build_index(vectors, "hnsw")
    np.testing.assert_array_equal(search(hnsw, queries, 60, kept=10)[1], search(hnsw, queries, 60)[1])


@pytest.mark.parametrize(
    ("rows", "codes", "where"),
    [(100, 5, "serve.pq_codes"), (10, 0, "serve.index")],  # 5 does not divide 32; 10 items < 16 centroids
)
def test_pq_settings_it_cannot_build_are_user_errors(catalogue, rows, codes, where):
    vectors, _ = catalogue
    with pytest.raises(UserError, match=where):
        build_index(vectors[:rows], "pq", pq_codes=codes)


@pytest.mark.parametrize("kind", ["exact", "hnsw", "hnsw-sq8", "pq"])
def test_added_vector_is_found_and_size_grows(catalogue, kind):
    vectors, _ = catalogue
    index = ItemIndex(build_index(vectors, kind))
    assert index.size == ITEMS
    new = normalised(np.random.default_rng(1), 1)
    index.add(new)
    assert index.size == ITEMS + 1
    scores, rows = index.search(new, 3)
    assert rows[0, 0] == ITEMS + 1  # catalogue row = label + 1 (row 0 is PAD)
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_searches_stay_consistent_while_vectors_are_added(catalogue):
    """Searches share the index with one thread adding: every answer is complete and ordered."""
    vectors, queries = catalogue
    start = 300
    index = ItemIndex(build_index(vectors[:start], "hnsw", hnsw_ef_search=32))
    extra = normalised(np.random.default_rng(2), 2000)
    problems: list[str] = []
    searches = [0, 0, 0]
    adding = threading.Event()
    adding.set()
    together = threading.Barrier(4, timeout=30)  # all four threads start at once

    def add() -> None:
        together.wait()
        try:
            for i in range(0, len(extra), 50):
                index.add(extra[i : i + 50])
        finally:
            adding.clear()

    def search(offset: int) -> None:
        together.wait()
        for n in range(2000):  # bounded: stops at 2,000 searches even if the adder is still busy
            query = queries[(offset + n) % len(queries)][None]
            scores, rows = index.search(query, K)
            size = index.size
            searches[offset] += 1
            if not ((rows >= 1) & (rows <= size)).all():
                problems.append(f"rows {rows.tolist()} outside 1..{size}")
            if len(set(rows[0].tolist())) < K:
                problems.append(f"a row twice: {rows.tolist()}")
            if (np.diff(scores[0]) > 1e-6).any():
                problems.append(f"scores not best first: {scores.tolist()}")
            if not adding.is_set() and n > 20:
                break

    threads = [threading.Thread(target=add), *(threading.Thread(target=search, args=(t,)) for t in range(3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a thread hung (lock never released?)"
    assert not problems, problems[:5]
    assert min(searches) > 20
    assert index.size == start + len(extra)
    scores, rows = index.search(extra[-1:], 1)
    assert rows[0, 0] == start + len(extra) and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_index_artifact_reports_recall_and_saves_an_index_open_index_reuses(
    tiny_artifact,
    tmp_path,
    monkeypatch,
):
    artifact = load_artifact(copy_artifact(tiny_artifact, tmp_path / "a"))
    report = index_artifact(artifact, "hnsw")
    assert report["recall@10"] == 1.0  # 12 items: the HNSW search width covers them all
    assert report["kind"] == "hnsw" and report["items"] == 12 and report["queries"] > 0
    assert report["saved_index_read"] is False  # built here
    path = index_path(artifact, "hnsw")
    assert path.is_file() and path.with_suffix(".json").is_file()
    stamp = path.stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("the saved index should have been read, not rebuilt")

    settings = settings_of(artifact.config.serve, "hnsw")
    with monkeypatch.context() as patch:
        patch.setattr(hllm.serving.index, "build_index", no_build)
        index = open_index(artifact, settings)
        # The search width is set per query: a new one reuses the saved graph.
        wider = open_index(artifact, {**settings, "hnsw_ef_search": 777})
    assert index.ntotal == 12 and path.stat().st_mtime_ns == stamp
    assert faiss.downcast_index(wider).hnsw.efSearch == 777
    assert index_artifact(artifact, "hnsw")["saved_index_read"] is True
    # Other settings define another index: it is rebuilt (and saved over the old one).
    rebuilt = open_index(artifact, {**settings, "hnsw_m": 8})
    assert rebuilt.ntotal == 12


def test_a_saved_pq_index_takes_its_rerank_depth_from_the_settings(tiny_artifact, tmp_path, monkeypatch):
    padded = scale_artifact(tiny_artifact, tmp_path / "a", 200)  # 16 items at least train 4-bit codes
    artifact = load_artifact(padded, ["serve.pq_codes=4"])
    settings = settings_of(artifact.config.serve, "pq")
    report = index_artifact(artifact, "pq")
    assert report["recall@10"] == 1.0 and report["saved_index_read"] is False  # 10 x 50 candidates: all
    with monkeypatch.context() as patch:
        patch.setattr(hllm.serving.index, "build_index", lambda *a, **k: pytest.fail("rebuilt"))
        deeper = open_index(artifact, {**settings, "pq_rerank": 7})
    assert deeper.k_factor == 7 and deeper.ntotal == 200


def test_a_saved_hnsw_sq8_index_takes_its_search_width_from_the_settings(
    tiny_artifact, tmp_path, monkeypatch
):
    artifact = load_artifact(copy_artifact(tiny_artifact, tmp_path / "a"))
    settings = settings_of(artifact.config.serve, "hnsw-sq8")
    assert index_artifact(artifact, "hnsw-sq8")["recall@10"] == 1.0  # 12 items: all within reach
    assert index_path(artifact, "hnsw-sq8") != index_path(artifact, "hnsw")  # both can be kept
    with monkeypatch.context() as patch:
        patch.setattr(hllm.serving.index, "build_index", lambda *a, **k: pytest.fail("rebuilt"))
        wider = open_index(artifact, {**settings, "hnsw_ef_search": 777})
    assert faiss.downcast_index(wider.base_index).hnsw.efSearch == 777 and wider.ntotal == 12
