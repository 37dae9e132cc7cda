"""Nearest-item search with faiss over L2-normalised item embeddings (inner product = cosine).

Exact (flat) by default; for large catalogues HNSW (over the exact vectors, or `hnsw-sq8`: over 8-bit
scalar-quantised copies, a quarter of the memory each step of the walk reads, the candidates then re-ranked
on their exact vectors), IVF, or PQ (every item scanned as 4-bit product quantisation codes with SIMD
lookups, the best candidates then re-ranked on their exact vectors).
Catalogue row r is faiss label r - 1 (row 0 = PAD is never indexed). Dims: B queries, N rows, D width.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from hllm.errors import UserError
from hllm.files import atomic_write, write_json
from hllm.serve_config import ServeConfig
from hllm.serving.export import Artifact, encode_histories

OVERLAP_K = 10
# setting -> faiss parameter, set at query time (no rebuild)
QUERY_TIME = {"hnsw_ef_search": "efSearch", "ivf_probes": "nprobe", "pq_rerank": "k_factor_rf"}
PQ_CENTROIDS = 16  # 4-bit codes
# hnsw-sq8: candidates the graph walk returns per label asked for, re-ranked on exact vectors
# (at efSearch >= 4k the walk finds them anyway; 1M items, width 128: recall@10 equal to hnsw's).
SQ8_RERANK = 4


def build_index(
    vectors: np.ndarray,
    kind: str,
    *,
    hnsw_m: int = 32,
    hnsw_ef_construction: int = 64,
    hnsw_ef_search: int = 128,
    ivf_lists: int = 0,
    ivf_probes: int = 32,
    pq_codes: int = 0,
    pq_rerank: int = 50,
) -> faiss.Index:
    """An inner-product index over `vectors` (N, D) float32; label i is row i of `vectors`."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    width = vectors.shape[1]
    match kind:
        case "exact":
            index = faiss.IndexFlatIP(width)
        case "hnsw":
            index = faiss.IndexHNSWFlat(width, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = hnsw_ef_construction
            index.hnsw.efSearch = hnsw_ef_search
        case "hnsw-sq8":
            index = faiss.index_factory(width, f"HNSW{hnsw_m}_SQ8,RFlat", faiss.METRIC_INNER_PRODUCT)
            graph = faiss.downcast_index(index.base_index)
            graph.hnsw.efConstruction = hnsw_ef_construction
            graph.hnsw.efSearch = hnsw_ef_search
            index.k_factor = SQ8_RERANK
            index.train(vectors)  # the 8-bit codes' range per dimension
        case "ivf":
            lists = ivf_lists or min(65536, max(1, round(math.sqrt(len(vectors)))))
            if len(vectors) < lists:
                raise UserError(
                    f"{lists} IVF lists need at least as many items, got {len(vectors)}",
                    where="serve.ivf_lists",
                )
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, lists, faiss.METRIC_INNER_PRODUCT)
            index.cp.max_points_per_centroid = 64  # k-means on a sample: minutes -> seconds at 1M items
            index.train(vectors)
            index.nprobe = ivf_probes
        case "pq":
            index = _pq_index(vectors, pq_codes or width // 2)
            index.k_factor = pq_rerank
    index.add(vectors)
    return index


def _pq_index(vectors: np.ndarray, codes: int) -> faiss.Index:
    """A trained, empty index: 4-bit PQ fast-scan codes, re-ranked on the exact vectors it also keeps."""
    width = vectors.shape[1]
    if width % codes:
        raise UserError(f"{codes} PQ codes do not divide the embedding width {width}", where="serve.pq_codes")
    if len(vectors) < PQ_CENTROIDS:
        raise UserError(
            f"a PQ index needs at least {PQ_CENTROIDS} items to train its codes, got {len(vectors)}",
            where="serve.index",
        )
    index = faiss.index_factory(width, f"PQ{codes}x4fs,RFlat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    return index


def settings_of(serve: ServeConfig, kind: str | None = None) -> dict:
    """The build parameters that define an index of `kind` (default: serve.index)."""
    kind = kind or serve.index
    hnsw = {
        "hnsw_m": serve.hnsw_m,
        "hnsw_ef_construction": serve.hnsw_ef_construction,
        "hnsw_ef_search": serve.hnsw_ef_search,
    }
    params = {
        "exact": {},
        "hnsw": hnsw,
        "hnsw-sq8": hnsw,
        "ivf": {"ivf_lists": serve.ivf_lists, "ivf_probes": serve.ivf_probes},
        "pq": {"pq_codes": serve.pq_codes, "pq_rerank": serve.pq_rerank},
    }
    return {"kind": kind, **params[kind]}


def overlap_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k (B, k) that the approximate top-k (B, k) also found."""
    hits = [len(set(a[a >= 0].tolist()) & set(t.tolist())) for a, t in zip(found, truth)]
    return float(np.mean(hits) / truth.shape[1])


class _ReadWriteLock:
    """Many searches at once, or one add alone; waiting adds go first so they are never starved."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writers = 0  # waiting or writing

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: self._writers == 0)
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._condition:
            self._writers += 1
            self._condition.wait_for(lambda: self._readers == 0)
        try:
            yield  # callers serialise their writes themselves (see ItemIndex.add)
        finally:
            with self._condition:
                self._writers -= 1
                self._condition.notify_all()


class ItemIndex:
    """A faiss index over catalogue rows 1.. that grows (cold-start items) while it is searched.

    faiss may not be searched while it is being added to, so searches share a read lock and adds
    take the write lock: a search sees the index wholly before or wholly after an add.
    """

    def __init__(self, index: faiss.Index) -> None:
        self._index = index
        self._lock = _ReadWriteLock()
        self._add_lock = threading.Lock()

    @property
    def size(self) -> int:
        """Indexed rows (PAD excluded)."""
        return self._index.ntotal

    def search(self, queries: np.ndarray, k: int, *, kept: int | None = None) -> tuple[np.ndarray, ...]:
        """Scores (B, k) and catalogue rows (B, k), best first; row -1 where fewer than k were found.
        `kept`: see `search`."""
        with self._lock.reading():
            scores, labels = search(self._index, queries, k, kept=kept)
        return scores, np.where(labels >= 0, labels + 1, -1)

    def add(self, vectors: np.ndarray) -> None:
        """Append rows (n, D) after the current last row."""
        with self._add_lock, self._lock.writing():
            self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))


def search(index: faiss.Index, queries: np.ndarray, k: int, *, kept: int | None = None) -> tuple:
    """`index.search` of queries (B, D) for k labels, of which the caller keeps `kept` and filters out
    the rest (a user's own items). A re-ranking index (pq) then re-ranks serve.pq_rerank candidates
    per kept label plus one per filtered one, not pq_rerank per label: at k = 10 + a 50-item history,
    550 candidates instead of 3,000, at the same recall of the kept ten (hnsw-sq8 likewise)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if kept is None or not isinstance(index, faiss.IndexRefine):
        return index.search(queries, k)
    params = faiss.IndexRefineSearchParameters()
    params.k_factor = (index.k_factor * kept + k - kept) / k
    return index.search(queries, k, params=params)


def index_path(artifact: Artifact, kind: str) -> Path:
    return artifact.folder / f"index-{kind}.faiss"


def open_index(artifact: Artifact, settings: dict, *, save: bool = True) -> faiss.Index:
    """The artifact's saved index when it was built with `settings` from these embeddings, else a new one."""
    if (index := saved_index(artifact, settings)) is not None:
        return index
    build = {key: value for key, value in settings.items() if key != "kind"}
    index = build_index(artifact.embeddings[1:], settings["kind"], **build)
    if save and settings["kind"] != "exact":  # an exact index is as fast to rebuild as to read
        path = index_path(artifact, settings["kind"])
        atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))
        write_json(path.with_suffix(".json"), _built_from(artifact, settings))
    return index


def saved_index(artifact: Artifact, settings: dict) -> faiss.Index | None:
    """The saved index if it was built with `settings` from these embeddings (its search-time knobs
    set from `settings`, no rebuild), else None."""
    path = index_path(artifact, settings["kind"])
    meta = path.with_suffix(".json")
    expected = _built_from(artifact, settings)
    if not (path.is_file() and meta.is_file() and json.loads(meta.read_text(encoding="utf-8")) == expected):
        return None
    index = faiss.read_index(str(path))
    if index.ntotal != expected["items"]:
        return None
    for key, name in QUERY_TIME.items():
        if key in settings:
            faiss.ParameterSpace().set_index_parameter(index, name, settings[key])
    return index


def _built_from(artifact: Artifact, settings: dict) -> dict:
    """What a saved index must have been built with to be reused."""
    return {
        **{key: value for key, value in settings.items() if key not in QUERY_TIME},
        "items": len(artifact.embeddings) - 1,
        "embeddings_sha256": artifact.manifest["files"]["embeddings.npy"]["sha256"],
    }


def held_out_queries(artifact: Artifact) -> np.ndarray:
    """User LLM predictions (B, D) for the artifact's sample histories: queries no index was built on."""
    lookup = {raw: row for row, raw in enumerate(artifact.item_ids) if row}
    histories = [[lookup[i] for i in history if i in lookup] for history in artifact.histories]
    histories = [h for h in histories if h]
    if not histories:
        raise UserError(
            "the artifact holds no sample histories to test an index with", where=str(artifact.folder)
        )
    return encode_histories(artifact, [artifact.embeddings[h] for h in histories])


def index_artifact(artifact: Artifact, kind: str) -> dict:
    """Build (and save) the `kind` index of an artifact; recall@10 and query time against exact search."""
    settings = settings_of(artifact.config.serve, kind)
    queries = held_out_queries(artifact)
    start = time.perf_counter()
    saved = saved_index(artifact, settings)
    index = saved if saved is not None else open_index(artifact, settings)
    build_seconds = time.perf_counter() - start
    exact = build_index(artifact.embeddings[1:], "exact")
    k = min(OVERLAP_K, exact.ntotal)
    report = {**settings, "items": exact.ntotal, "queries": len(queries), "build_s": round(build_seconds, 2)}
    report["saved_index_read"] = saved is not None  # build_s is then the time to read it
    found = {}
    for name, searched in (("exact", exact), (kind, index)):
        start = time.perf_counter()
        found[name] = np.stack(
            [searched.search(q[None], k)[1][0] for q in queries]
        )  # one query per call, as served
        report[f"{name}_ms_per_query"] = round(1000 * (time.perf_counter() - start) / len(queries), 3)
    # The ANN literature's "recall@k"; the key stays as committed benchmarks/serve/serve.json has it.
    report[f"recall@{OVERLAP_K}"] = overlap_at_k(found[kind], found["exact"])
    return report
