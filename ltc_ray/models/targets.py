"""GCN-V training target: learn-to-cluster's ``s_nbr`` vertex confidence.

c_i = Σ_{j ∈ kNN(i), y_j = y_i} S_ij − Σ_{j ∈ kNN(i), y_j ≠ y_i} S_ij over the whole kNN row,
self included (+S_ii), no similarity threshold; then c / max|c| over the whole training graph.
A node deep inside its identity scores near 1, a node among other identities near -1.
"""

from __future__ import annotations

import numpy as np

__all__ = ["confidence_target", "raw_confidence", "target_scale"]


def raw_confidence(
    knn_ids: np.ndarray, knn_sims: np.ndarray, labels: np.ndarray, row_offset: int = 0
) -> np.ndarray:
    """Unnormalised ``s_nbr`` for rows ``row_offset ..`` of the graph: ``(n,) float32``.

    ``knn_ids``/``knn_sims`` ``(n, k)``; ``labels (N,)`` integer labels of every node. Invalid
    neighbour slots (id -1) contribute nothing. Sums run in float64.
    """
    knn_ids = np.asarray(knn_ids)
    knn_sims = np.asarray(knn_sims)
    labels = np.asarray(labels)
    if knn_ids.ndim != 2 or knn_ids.shape != knn_sims.shape:
        raise ValueError(
            f"knn_ids {knn_ids.shape} and knn_sims {knn_sims.shape} must be the same (n, k)"
        )
    n = len(knn_ids)
    if row_offset < 0 or row_offset + n > len(labels):
        raise ValueError(f"rows [{row_offset}, {row_offset + n}) outside the {len(labels)} labels")
    if n and int(np.max(knn_ids)) >= len(labels):
        raise ValueError(f"knn_ids refer to node {int(np.max(knn_ids))}, labels has {len(labels)}")
    valid = knn_ids >= 0
    nbr_labels = labels[np.where(valid, knn_ids, 0)]
    own = labels[row_offset : row_offset + n, None]
    signed = np.where(nbr_labels == own, knn_sims, -knn_sims).astype(np.float64)
    return np.where(valid, signed, 0.0).sum(axis=1).astype(np.float32)


def target_scale(raw: np.ndarray) -> float:
    """The global normaliser max|c| (1.0 when every c is 0, so the target stays finite)."""
    raw = np.asarray(raw)
    scale = float(np.max(np.abs(raw))) if raw.size else 0.0
    return scale if scale > 0 else 1.0


def confidence_target(knn_ids: np.ndarray, knn_sims: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The GCN-V regression target ``(n,) float32`` in [-1, 1] for a whole graph.

    ``knn_ids``/``knn_sims`` ``(n, k)`` with self at rank 0, ``labels (n,)``. Compute per block
    with :func:`raw_confidence` and divide by :func:`target_scale` of all blocks for large data.
    """
    if len(knn_ids) != len(labels):
        raise ValueError(f"{len(knn_ids)} kNN rows but {len(labels)} labels")
    raw = raw_confidence(knn_ids, knn_sims, labels)
    return (raw / np.float32(target_scale(raw))).astype(np.float32)
