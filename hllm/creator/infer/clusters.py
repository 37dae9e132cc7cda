"""Users -> k-means clusters (faiss), each user assigned to its nearest centroid in L2 (the
objective k-means minimises; the reference assigned by inner product), and top-N clusters per
item by matching score.

Dims: U users, C clusters, M items, H width.
"""

from __future__ import annotations

import faiss
import numpy as np

from hllm.errors import UserError


def fit_kmeans(
    embeddings: np.ndarray, k: int, *, iterations: int = 40, restarts: int = 2, seed: int = 0
) -> np.ndarray:
    """L2 k-means centroids (C, H) of the rows of `embeddings` (U, H), best of `restarts`."""
    if k > len(embeddings):
        raise UserError(
            f"{k} clusters for {len(embeddings)} users: k must not exceed the number of users",
            where="creator.infer.clusters",
        )
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    kmeans = faiss.Kmeans(
        vectors.shape[1], k, niter=iterations, nredo=restarts, seed=seed, verbose=False, spherical=False
    )
    kmeans.train(vectors)
    return kmeans.centroids.copy()


def assign_clusters(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid in L2 distance -> (U,) int64, exactly as k-means assigns."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, nearest = index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 1)
    return nearest[:, 0].astype(np.int64)


def top_clusters(
    scores: np.ndarray, top_n: int, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `top_n` best clusters of each item whose score is at least `threshold`; ties go to the
    lower cluster index. Returns (clusters, item columns, scores), by item, then score descending.

    Args:
        scores: (C, M) matching probability of every (cluster, item) pair.
    """
    order = np.argsort(-scores, axis=0, kind="stable")[:top_n]  # (n, M) best clusters per item
    best = np.take_along_axis(scores, order, axis=0)  # (n, M)
    columns = np.broadcast_to(np.arange(scores.shape[1]), order.shape)
    keep = (best >= threshold).T  # item-major, so the output is grouped by item
    return order.T[keep], columns.T[keep], best.T[keep]
