"""The GCN-V graph Â = D⁻¹ (max(S, Sᵀ) + I) over a kNN graph, whole or one partition at a time.

S_ij is the cosine of j ∈ kNN(i) with self removed and negative similarities dropped
(learn-to-cluster ``th_sim = 0``); the max makes it symmetric, I adds a unit self loop and D
normalises rows (a zero row keeps divisor 1). A partition's rows need only the kNN edges that
touch its nodes (their out-edges and the in-edges pointing at them), so a partition actor can
build its rows of Â from its halo and get exactly (bitwise, float32) the whole-graph rows.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["adjacency_rows", "directed_edges", "whole_graph_adjacency"]


def directed_edges(
    knn_ids: np.ndarray, knn_sims: np.ndarray, row_offset: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kNN edges i -> j of a block of rows, as ``(src, dst) (e,) int64, sim (e,) float32``.

    ``knn_ids``/``knn_sims`` are ``(n, k)`` rows ``row_offset ..`` of the graph. Self edges,
    invalid ids (-1) and similarities below 0 (or NaN) are dropped: they never enter Â.
    """
    knn_ids = np.asarray(knn_ids)
    knn_sims = np.asarray(knn_sims)
    if knn_ids.ndim != 2 or knn_ids.shape != knn_sims.shape:
        raise ValueError(
            f"knn_ids {knn_ids.shape} and knn_sims {knn_sims.shape} must be the same (n, k)"
        )
    n, k = knn_ids.shape
    src = np.repeat(np.arange(row_offset, row_offset + n, dtype=np.int64), k)
    dst = knn_ids.reshape(-1).astype(np.int64, copy=False)
    sim = knn_sims.reshape(-1).astype(np.float32, copy=False)
    keep = (dst >= 0) & (dst != src) & (sim >= 0)
    return src[keep], dst[keep], sim[keep]


def _use_table(max_id: int, n_entries: int) -> bool:
    """Whether an id-indexed lookup table (8 bytes per id up to ``max_id``) is cheap next to
    ``n_entries`` entries: O(E) gathers instead of O(E log t) searches."""
    return max_id + 1 <= 2 * n_entries + 2**22


def _locate(targets: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each id in sorted ``targets`` and whether it is there at all."""
    if len(targets) == 0 or len(ids) == 0:
        return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
    max_id = max(int(targets[-1]), int(ids.max()))
    if _use_table(max_id, len(ids)):
        table = np.full(max_id + 1, -1, dtype=np.int64)
        table[targets] = np.arange(len(targets))
        pos = table[ids]
        return pos, pos >= 0
    pos = np.searchsorted(targets, ids)
    found = pos < len(targets)
    found[found] = targets[pos[found]] == ids[found]
    return pos, found


def _compact(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(unique sorted ids, index of each id in them)``, like ``np.unique(return_inverse)``."""
    max_id = int(ids.max()) if len(ids) else -1
    if not _use_table(max_id, len(ids)):
        return np.unique(ids, return_inverse=True)
    present = np.zeros(max_id + 1, dtype=bool)
    present[ids] = True
    rank = np.cumsum(present, dtype=np.int64) - 1
    return np.flatnonzero(present).astype(np.int64), rank[ids]


def _group_order(rows: np.ndarray, cols: np.ndarray, n_cols: int) -> np.ndarray:
    """Order sorting entries by (row, col): one int64 key when it fits, else a lexsort."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    if (int(rows.max()) + 1) * n_cols < 2**62:
        return np.argsort(rows * n_cols + cols)
    return np.lexsort((cols, rows))


def adjacency_rows(
    targets: np.ndarray, src: np.ndarray, dst: np.ndarray, sim: np.ndarray
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Rows of Â for ``targets`` (sorted unique global ids) from a directed kNN edge list.

    The edge list must hold every kNN edge touching a target in either direction; edges that
    touch no target are ignored, repeated edges count once (the max). Returns
    ``(adj (t, m) float32 csr, cols (m,) int64)``: column c is global node ``cols[c]``; ``cols``
    is sorted and contains ``targets``. Entries are ordered by global column before the row sum,
    so a row comes out bitwise the same whatever else is in the list. Memory O(edges).
    """
    targets = np.asarray(targets, dtype=np.int64)
    if targets.ndim != 1 or (len(targets) > 1 and not np.all(targets[1:] > targets[:-1])):
        raise ValueError("targets must be a 1-D array of sorted unique node ids")
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    sim = np.asarray(sim, dtype=np.float32)
    if not (src.shape == dst.shape == sim.shape) or src.ndim != 1:
        raise ValueError(f"src {src.shape}, dst {dst.shape}, sim {sim.shape} must be (e,) each")
    keep = (src != dst) & (sim >= 0) & (src >= 0) & (dst >= 0)
    src, dst, sim = src[keep], dst[keep], sim[keep]
    t = len(targets)

    # Row i of max(S, Sᵀ) + I: out-edges i -> j, in-edges j -> i seen as i -> j, and (i, i) = 1.
    pos_s, out_edge = _locate(targets, src)
    pos_d, in_edge = _locate(targets, dst)
    rows = np.concatenate([pos_s[out_edge], pos_d[in_edge], np.arange(t, dtype=np.int64)])
    nbrs = np.concatenate([dst[out_edge], src[in_edge], targets])
    weights = np.concatenate([sim[out_edge], sim[in_edge], np.ones(t, dtype=np.float32)])
    del pos_s, pos_d, out_edge, in_edge
    cols, col_idx = _compact(nbrs)
    del nbrs
    m = len(cols)

    order = _group_order(rows, col_idx, m)
    rows, col_idx, weights = rows[order], col_idx[order], weights[order]
    del order
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (col_idx[1:] != col_idx[:-1])
    starts = np.flatnonzero(first)
    weights = np.maximum.reduceat(weights, starts) if len(starts) else weights
    rows, col_idx = rows[starts], col_idx[starts]

    # bincount adds in array order (row, then global column): the same sum in every partition.
    degree = np.bincount(rows, weights=weights.astype(np.float64), minlength=t)
    degree[degree <= 0] = 1.0
    data = (weights / degree[rows]).astype(np.float32)
    indptr = np.zeros(t + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=t), out=indptr[1:])
    adj = sp.csr_matrix((data, col_idx, indptr), shape=(t, m))
    adj.has_sorted_indices = True
    return adj, cols


def whole_graph_adjacency(knn_ids: np.ndarray, knn_sims: np.ndarray) -> sp.csr_matrix:
    """Â over the whole graph: ``(N, N) float32`` csr for ``knn_ids``/``knn_sims`` ``(N, k)``.

    The same computation as :func:`adjacency_rows` with every node a target, so its rows equal a
    partition's rows bitwise. At part0 size (576K x 80) it takes ~25 s on 2 cores with ~5 GB of
    temporaries (~110 bytes per directed edge) on top of the inputs.
    """
    n = len(knn_ids)
    if n and int(np.max(knn_ids)) >= n:
        raise ValueError(f"knn_ids refer to node {int(np.max(knn_ids))} but the graph has {n} rows")
    adj, cols = adjacency_rows(np.arange(n, dtype=np.int64), *directed_edges(knn_ids, knn_sims))
    assert len(cols) == n  # every node is a target, no id lies outside [0, n)
    return adj
