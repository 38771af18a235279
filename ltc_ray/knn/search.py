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

RESCORE_CHUNK = 512
# Extra candidates fetched per shard and re-ranked exactly, so near-ties around the k-th
# neighbour resolve the same way (similarity, then id) however the base is sharded.
TIE_MARGIN = 8


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


def rescore(
    queries: np.ndarray, xb: np.ndarray, local_ids: np.ndarray
) -> np.ndarray:
    """Exact similarities ``(b, k) float32`` of queries to ``xb[local_ids]``.

    Computed in float64 and rounded once, so a pair gets the same value however
    the database was sharded or blocked (faiss' float32 GEMM may round
    differently at tile edges); invalid ids (-1) get -inf.
    """
    out = np.empty(local_ids.shape, dtype=np.float32)
    valid = local_ids >= 0
    safe = np.where(valid, local_ids, 0)
    for lo in range(0, len(queries), RESCORE_CHUNK):
        hi = min(lo + RESCORE_CHUNK, len(queries))
        q = queries[lo:hi].astype(np.float64)
        cand = xb[safe[lo:hi]].astype(np.float64)  # (c, k, d)
        out[lo:hi] = np.einsum("cd,ckd->ck", q, cand)
    out[~valid] = -np.inf
    return out


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
    index = build_index(x, "flat")
    ids, _ = search_block(index, x, k + TIE_MARGIN)
    sims = rescore(x, x, ids)
    ids, sims = merge_topk([(ids, sims)], k)
    self_sims = np.einsum("nd,nd->n", x.astype(np.float64), x.astype(np.float64))
    return put_self_first(np.arange(len(x)), ids, sims, self_sims)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each row's exact top-k found in the approximate list."""
    valid = approx_ids >= 0
    found = ((approx_ids[:, :, None] == exact_ids[:, None, :]) & valid[:, :, None]).any(axis=2)
    return float(found.sum()) / exact_ids.size
