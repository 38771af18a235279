"""PSE-GCN's cluster formation on the kNN graph of its embeddings: a node's confidence is
the sum of the cosines over its kNN row (self included), and it links to its FIRST
neighbour, in descending-cosine order, that is strictly more confident, when that cosine
is at least ``tau`` (Li et al. 2024, ``clustering.py``; the reference's division by the
largest |confidence| changes no comparison and is left out). A strict ``>`` never forms a
cycle; a node whose first more-confident neighbour is too far stays a root."""

from __future__ import annotations

import numpy as np

from ltc_ray.cluster.base import LinkResult, first_true

__all__ = ["confidence", "peak_links"]


def confidence(knn_sims: np.ndarray) -> np.ndarray:
    """``(n,) float64``: the sum of each row's similarities (empty slots hold 0). Every
    actor computes a node's confidence from the same row in the same order, so the value
    does not depend on who computes it."""
    return np.asarray(knn_sims, dtype=np.float32).astype(np.float64).sum(axis=1)


def peak_links(node_ids: np.ndarray, knn_ids: np.ndarray, knn_sims: np.ndarray,
               own_conf: np.ndarray, nbr_conf: np.ndarray, tau: float) -> LinkResult:
    """Parents of the nodes ``node_ids`` whose rows are ``knn_ids``/``knn_sims`` (self at
    rank 0, similarity descending, -1 = empty), given their confidences ``own_conf (n,)``
    and their neighbours' ``nbr_conf (n, k)`` (any value where the slot is empty)."""
    ids = np.asarray(knn_ids)[:, 1:].astype(np.int64)
    sims = np.asarray(knn_sims)[:, 1:]
    valid = (ids >= 0) & (ids != node_ids[:, None])
    higher = valid & (nbr_conf[:, 1:] > own_conf[:, None])
    col, has = first_true(higher)
    rows = np.arange(len(ids))
    link = has & (sims[rows, col] >= tau)
    parent = np.where(link, ids[rows, col], -1).astype(np.int64)
    return LinkResult(parent, node_ids[link].astype(np.int64), parent[link])
