"""Exact and approximate inner-product top-k over one database block.

Pure functions over arrays (faiss ``contrib`` style): the Ray actors in
``ltc_ray.pipeline.knn_stage`` call them, so do the tests and a single process.
Features are L2-normalised, so inner product = cosine similarity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ltc_ray.errors import FAISS_INSTALL, MissingDependency

try:  # faiss comes from the `cpu` or `gpu` extra: say which, as one line before any work
    import faiss
except ImportError as exc:
    raise MissingDependency.from_import_error("faiss", FAISS_INSTALL, exc) from exc

# Extra candidates fetched per shard beyond k. With the certificate of :func:`exact_topk`
# they make the top k exact (and shard-independent) for every row that has no near-tie
# at rank k; rows that do are searched again with more candidates.
TIE_MARGIN = 4
# Largest number of (query, candidate) slots one escalated re-search holds at once.
ESCALATE_ELEMS = 1 << 24


def default_nlist(n_rows: int) -> int:
    """learn-to-cluster's IVF rule: min(4096, 8 * round(sqrt(N))), at least 1."""
    return max(1, min(4096, 8 * round(math.sqrt(n_rows))))


def ivf_nlist(n_rows: int, nlist: int = 0) -> int:
    """The IVF list count an index over ``n_rows`` rows trains: ``nlist`` (0 =
    :func:`default_nlist`), capped so that every list has faiss' 39 training points."""
    return max(1, min(nlist or default_nlist(n_rows), n_rows // 39 or 1))


def build_index(
    xb: np.ndarray,
    kind: str = "flat",
    nlist: int = 0,
    nprobe: int = 32,
    seed: int = 0,
    use_gpu: bool = False,
) -> faiss.Index:
    """An inner-product index over ``xb`` ``(n, d) float32`` (row i has local id i)."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    n, d = xb.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = ivf_nlist(n, nlist)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(xb)
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(xb)
    return index


class FlatView:
    """Exact inner-product search over rows it does not copy (``faiss.knn`` on the caller's
    array), with the ``search``/``ntotal`` of a faiss index: an IVF shard measures its
    recall against exact search without a second copy of its rows."""

    def __init__(self, xb: np.ndarray):
        self.xb = np.ascontiguousarray(xb, dtype=np.float32)
        self.ntotal = len(self.xb)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return faiss.knn(q, self.xb, k, metric=faiss.METRIC_INNER_PRODUCT)


def search_block(
    index: faiss.Index, queries: np.ndarray, k: int, id_offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``queries`` in one database block.

    Returns global ids ``(b, k') int64`` (local id + ``id_offset``; -1 for empty
    slots when the block holds fewer than k rows) and sims ``(b, k') float32``,
    where k' = min(k, index.ntotal).
    """
    kk = min(k, index.ntotal)
    sims, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), kk)
    ids = ids.astype(np.int64, copy=False)
    valid = ids >= 0
    ids = np.where(valid, ids + id_offset, -1)
    sims = np.where(valid, sims, -np.inf).astype(np.float32, copy=False)
    return ids, sims


def score_error_bound(dim: int) -> float:
    """Upper bound on |float32 score - exact score| for unit rows of dimension ``dim``:
    a float32 dot product of d terms errs by at most γ_d = d·u/(1 - d·u) (u = 2⁻²⁴) times
    Σ|x_i·y_i| ≤ 1; doubled for norms that L2 normalisation leaves within a few u of one."""
    u = 2.0**-24
    gamma = dim * u / (1.0 - dim * u)
    return 2.0 * (gamma + 4.0 * u)


def rescore(
    queries: np.ndarray, xb: np.ndarray, local_ids: np.ndarray
) -> np.ndarray:
    """Similarities ``(b, k) float32`` of queries to ``xb[local_ids]`` that depend only on
    the two vectors of each pair.

    faiss' ``fvec_inner_products_by_idx`` runs one SIMD dot product per pair (threaded over
    queries), so a pair gets the same float32 bits whatever block, shard or position it
    was scored in on this machine, unlike a GEMM tile (whose edges may round differently).
    Invalid ids (-1) get -inf. Six times cheaper than the float64 re-scoring it replaces.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    base = np.ascontiguousarray(xb, dtype=np.float32)
    ids = np.ascontiguousarray(local_ids, dtype=np.int64)
    if len(q) != len(ids) or q.shape[1:] != base.shape[1:] or ids.ndim != 2:
        raise ValueError(f"queries {q.shape}, base {base.shape} and ids {ids.shape} disagree")
    if ids.size and int(ids.max()) >= len(base):
        raise ValueError(f"candidate id {int(ids.max())} outside a base of {len(base)} rows")
    out = np.empty(ids.shape, dtype=np.float32)
    if ids.size:
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(base), faiss.swig_ptr(ids),
            q.shape[1], len(q), ids.shape[1],
        )
    out[ids < 0] = -np.inf
    return out


def self_similarities(queries: np.ndarray) -> np.ndarray:
    """Each query's :func:`rescore` similarity to itself (the rank-0 entry)."""
    rows = np.arange(len(queries), dtype=np.int64)[:, None]
    return rescore(queries, queries, rows)[:, 0]


def exact_topk(
    index, queries: np.ndarray, xb: np.ndarray, k: int, id_offset: int = 0,
    margin: int = TIE_MARGIN, certify: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k of ``queries`` in one database block by (:func:`rescore` similarity desc, id
    asc): global ids ``(b, k) int64`` (-1 pads), sims ``(b, k) float32``, and the number of
    rows that needed a wider search.

    ``index`` (faiss flat, or any index with the same ``search``) proposes ``k + margin``
    candidates by its own float32 scores, which are within :func:`score_error_bound` of
    the exact ones, as are the re-scored ones. So a row is certain when its k-th re-scored
    similarity exceeds the last fetched index score plus twice that bound: no unfetched
    row can reach or tie it. Uncertain rows (near-ties at rank k, duplicate vectors) are
    searched again with 4x the candidates until certain or the block is exhausted. The
    result is the exact top k of the block, so per-shard lists merge (:func:`merge_topk`)
    into the same graph for any shard and block count. ``certify=False`` (IVF: the
    candidates are approximate anyway) keeps the first pass.
    """
    n = index.ntotal
    fetch = min(k + margin, n)
    local, fetched = search_block(index, queries, fetch)
    sims = rescore(queries, xb, local)
    ids, sims = merge_topk([(local, sims)], k)
    widened = 0
    if certify and fetch < n and k <= n:
        eps = 2.0 * score_error_bound(xb.shape[1])
        unsure = np.flatnonzero(sims[:, k - 1] <= fetched[:, -1] + eps)
        widened = len(unsure)
        while len(unsure) and fetch < n:
            fetch = min(4 * fetch, n)
            step = max(1, ESCALATE_ELEMS // fetch)
            still = []
            for lo in range(0, len(unsure), step):
                rows = unsure[lo : lo + step]
                cand, got = search_block(index, queries[rows], fetch)
                sub_ids, sub_sims = merge_topk([(cand, rescore(queries[rows], xb, cand))], k)
                ids[rows], sims[rows] = sub_ids, sub_sims
                if fetch < n:
                    still.append(rows[sub_sims[:, k - 1] <= got[:, -1] + eps])
            unsure = np.concatenate(still) if still else unsure[:0]
    ids = np.where(ids >= 0, ids + id_offset, -1)
    return ids, sims, widened


def merge_topk(
    partials: Sequence[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact merge of per-shard top-k lists into one ``(b, k)`` list.

    Order is by similarity descending, ties by id ascending, so the result does
    not depend on how many shards produced the candidates.
    """
    ids = np.concatenate([p[0] for p in partials], axis=1)
    sims = np.concatenate([p[1] for p in partials], axis=1)
    # -1 ids carry -inf sims and fall to the end; among ties prefer the lower id.
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -sims), axis=1)[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1)


def put_self_first(
    row_ids: np.ndarray, ids: np.ndarray, sims: np.ndarray, self_sims: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's own id to rank 0 (learn-to-cluster convention).

    Duplicate vectors can outrank self; when self is missing from the list it is
    inserted with similarity ``self_sims`` and the last neighbour dropped.
    """
    b, k = ids.shape
    is_self = ids == row_ids[:, None]
    has_self = is_self.any(axis=1)
    drop = np.where(has_self, is_self.argmax(axis=1), k - 1)
    cols = np.arange(k - 1)[None, :]
    cols = cols + (cols >= drop[:, None])
    rest_ids = np.take_along_axis(ids, cols, axis=1)
    rest_sims = np.take_along_axis(sims, cols, axis=1)
    first_sims = np.where(has_self, sims[np.arange(b), drop], self_sims).astype(np.float32)
    out_ids = np.concatenate([row_ids[:, None].astype(ids.dtype), rest_ids], axis=1)
    out_sims = np.concatenate([first_sims[:, None], rest_sims], axis=1)
    return out_ids, out_sims


def exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Single-process exact kNN of ``x`` against itself (reference and small data)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    ids, sims, _ = exact_topk(build_index(x, "flat"), x, x, k)
    return put_self_first(np.arange(len(x)), ids, sims, self_similarities(x))


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each row's exact top-k found in the approximate list."""
    valid = approx_ids >= 0
    found = ((approx_ids[:, :, None] == exact_ids[:, None, :]) & valid[:, :, None]).any(axis=2)
    return float(found.sum()) / exact_ids.size
