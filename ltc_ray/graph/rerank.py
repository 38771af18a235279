"""k-reciprocal re-ranking of a kNN graph (Zhong et al., CVPR 2017, the binary-set version
PSE-GCN uses) as array code over one partition of rows with a halo.

Definitions (``N_k(i)`` = the first ``k`` ids of kNN row ``i``, -1 slots ignored)::

    R(i,k)  = {j in N_k(i) : i in N_k(j)}
    R*(i)   = R(i,k1) ∪ ⋃ {R(j,k2) : j in R(i,k1), 3|R(j,k2) ∩ R(i,k1)| >= 2|R(j,k2)|}
    C(i)    = N_k1(i) ∪ ⋃_{h in N_k1(i)} N_expand(h)
    s(i,j)  = |R*(i) ∩ R*(j)| / |R*(i) ∪ R*(j)|,  j in C(i)

and ``rerank(i)`` = the ``top`` candidates by ``s`` descending, ties by smaller id, ``i``
itself always first with ``s = 1``. The reference does this with Python sets (hours and
>100 GB at 5M rows); here every set operation is a sorted int64 key lookup or a product of
binary CSR matrices over a compact (per chunk) column space.

A partition owns the contiguous rows ``[start, start + n)``. The three phases need, in turn:
the kNN rows of the 1-hop nodes (phase 1), the rows and phase-1 masks of the reciprocal 1-hop
nodes (phase 2), the kNN rows of the 1-hop nodes and the R* sets of the candidates (phase 3).
Owned rows are served from the arguments; the callbacks are asked (with sorted unique int64
ids, at most once per chunk and phase) only for ids outside the partition, so an actor only
needs to serve its halo. ``rerank_graph`` runs all three phases in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

__all__ = [
    "CHUNK",
    "RowsOf",
    "csr_take",
    "expanded_sets",
    "jaccard_rerank",
    "reciprocal_masks",
    "rerank_graph",
]

RowsOf = Callable[[np.ndarray], np.ndarray]  # sorted unique global ids -> knn id rows (m, k)
NeighboursOf = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # -> (rows, masks)
RstarOf = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # -> CSR (indptr, indices)

# Anchors (owned rows) processed at a time in phases 2 and 3: phase 3 holds ~(1 + k1 *
# (1 + expand)) candidate pairs per anchor, ~1.8M pairs per chunk at the defaults.
CHUNK = 2048

IN_K1 = np.uint8(1)  # mask bit 0: column is in R(i, k1)
IN_K2 = np.uint8(2)  # mask bit 1: column is in R(i, k2)


# --------------------------------------------------------------------------- helpers


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-D int array by sorting (numpy 2's hash-based unique is slower)."""
    a = np.sort(a, kind="stable")
    return a[np.r_[True, a[1:] != a[:-1]]] if len(a) else a


def _argsort(a: np.ndarray) -> np.ndarray:
    """``argsort`` of a 1-D non-negative int array, stable. Sorts ``value << b | position``
    as plain int64 when that fits (about twice as fast as an indirect sort)."""
    bits = max(len(a) - 1, 1).bit_length()
    if len(a) == 0 or int(a.max()) >= 1 << (62 - bits):
        return np.argsort(a, kind="stable")
    packed = np.sort((a.astype(np.int64) << bits) | np.arange(len(a), dtype=np.int64))
    return packed & ((1 << bits) - 1)


def _unique_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique values of a 1-D non-negative int array and each element's index among
    them: by a lookup table when the values are dense (at most ``4 * len(a)``, as for
    the candidates of a chunk in a small graph), else from one sort."""
    if len(a) and int(a.max()) < 4 * len(a):
        seen = np.zeros(int(a.max()) + 1, bool)
        seen[a] = True
        uniq = np.flatnonzero(seen)
        slot = np.zeros(len(seen), np.int64)
        slot[uniq] = np.arange(len(uniq))
        return uniq, slot[a]
    order = _argsort(a)
    s = a[order]
    fresh = np.r_[True, s[1:] != s[:-1]] if len(s) else np.zeros(0, bool)
    inverse = np.empty(len(a), np.int64)
    inverse[order] = np.cumsum(fresh) - 1
    return s[fresh], inverse


def _lookup(keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each query in the sorted ``keys`` (the first of equal keys) and whether
    it is there at all."""
    if len(keys) == 0:
        return np.zeros(len(queries), np.int64), np.zeros(len(queries), bool)
    at = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return at, keys[at] == queries


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for each ``(s, l)``, without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, np.int64) - offsets, lengths) + np.arange(total)


def _binary_csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_array:
    """0/1 CSR of the given cells (duplicates collapse to 1), canonical (sorted indices)."""
    m = sp.csr_array((np.ones(len(rows), np.int32), (rows, cols)), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1
    return m


def _sample(m: sp.csr_array, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``m[rows, cols]`` for cells sorted by (row, col) and unique (0 where not stored).

    An element-wise product with the 0/1 matrix of the cells runs in linear time on ``m``
    as it comes out of a matrix product (unsorted rows), so ``m`` is never sorted; only the
    result, which holds at most ``len(rows)`` cells, is."""
    out = np.zeros(len(rows), m.dtype)
    if len(rows) == 0:
        return out
    indptr = np.zeros(m.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=m.shape[0]), out=indptr[1:])
    mask = sp.csr_array((np.ones(len(rows), m.dtype), cols, indptr), shape=m.shape)
    hit = sp.csr_array(m.multiply(mask))
    hit.sum_duplicates()
    ncols = max(m.shape[1], 1)
    keys = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(hit.indptr)) * ncols
    at = np.searchsorted(rows.astype(np.int64) * ncols + cols, keys + hit.indices)
    out[at] = hit.data
    return out


def csr_take(
    indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(indptr, indices)`` of the given local ``rows`` (any order, repeats allowed), as
    int64; how an actor serves the R* sets of its rows to other partitions."""
    indptr = np.asarray(indptr, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    lengths = indptr[rows + 1] - indptr[rows]
    out_ptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=out_ptr[1:])
    return out_ptr, np.asarray(indices, dtype=np.int64)[_ranges(indptr[rows], lengths)]


def _owned(ids: np.ndarray, start: int, n: int) -> np.ndarray:
    return (ids >= start) & (ids < start + n)


def _checked(got: np.ndarray, m: int, k: int, what: str) -> np.ndarray:
    got = np.asarray(got)
    if got.ndim != 2 or got.shape != (m, k):
        raise ValueError(f"{what} returned {got.shape} for {m} ids, expected ({m}, {k})")
    return got


def _rows(ids: np.ndarray, start: int, knn_ids: np.ndarray, rows_of: RowsOf) -> np.ndarray:
    """kNN rows ``(m, k) int64`` of sorted unique ``ids``: owned ones from ``knn_ids``, the
    rest from one ``rows_of`` call."""
    n, k = knn_ids.shape
    out = np.empty((len(ids), k), np.int64)
    own = _owned(ids, start, n)
    out[own] = knn_ids[ids[own] - start]
    if not own.all():
        out[~own] = _checked(rows_of(ids[~own]), int((~own).sum()), k, "rows_of")
    return out


def _neighbours(
    ids: np.ndarray,
    start: int,
    knn_ids: np.ndarray,
    masks: np.ndarray,
    neighbours_of: NeighboursOf,
) -> tuple[np.ndarray, np.ndarray]:
    """kNN rows and phase-1 masks of sorted unique ``ids`` (owned ones from the arguments)."""
    n, k = knn_ids.shape
    rows = np.empty((len(ids), k), np.int64)
    mk = np.empty((len(ids), k), np.uint8)
    own = _owned(ids, start, n)
    rows[own] = knn_ids[ids[own] - start]
    mk[own] = masks[ids[own] - start]
    if not own.all():
        m = int((~own).sum())
        got_rows, got_masks = neighbours_of(ids[~own])
        rows[~own] = _checked(got_rows, m, k, "neighbours_of")
        mk[~own] = _checked(got_masks, m, k, "neighbours_of")
    return rows, mk


def _rstar(
    ids: np.ndarray,
    start: int,
    n: int,
    rstar: tuple[np.ndarray, np.ndarray],
    rstar_of: RstarOf,
) -> tuple[np.ndarray, np.ndarray]:
    """CSR of the R* sets of sorted unique ``ids`` (owned ones from ``rstar``), in their
    order."""
    own = _owned(ids, start, n)
    if own.all():
        return csr_take(*rstar, ids - start)
    parts = [(own, csr_take(*rstar, ids[own] - start))]
    ptr, ind = rstar_of(ids[~own])
    ptr, ind = np.asarray(ptr, np.int64), np.asarray(ind, np.int64)
    m = int((~own).sum())
    if ptr.shape != (m + 1,) or ptr[0] != 0 or ptr[-1] != len(ind):
        raise ValueError(f"rstar_of returned indptr {ptr.shape} for {m} ids")
    parts.append((~own, (ptr, ind)))
    lengths = np.zeros(len(ids), np.int64)
    for where, (p, _) in parts:
        lengths[where] = np.diff(p)
    out_ptr = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(lengths, out=out_ptr[1:])
    out_ind = np.empty(int(out_ptr[-1]), np.int64)
    for where, (p, i) in parts:
        out_ind[_ranges(out_ptr[:-1][where], np.diff(p))] = i
    return out_ptr, out_ind


def _as_knn(knn_ids: np.ndarray) -> np.ndarray:
    knn_ids = np.asarray(knn_ids)
    if knn_ids.ndim != 2 or not np.issubdtype(knn_ids.dtype, np.integer):
        raise ValueError(f"knn_ids must be a 2-D int array, got {knn_ids.dtype} {knn_ids.shape}")
    return knn_ids


def _check_params(k: int, k1: int, k2: int | None = None, expand: int | None = None,
                  top: int | None = None) -> None:
    if not 1 <= k1 <= k:
        raise ValueError(f"k1 must be in [1, k = {k}], got {k1}")
    if k2 is not None and not 1 <= k2 <= k1:
        raise ValueError(f"k2 must be in [1, k1 = {k1}], got {k2}")
    if expand is not None and not 0 <= expand <= k:
        raise ValueError(f"expand must be in [0, k = {k}], got {expand}")
    if top is not None and top < 1:
        raise ValueError(f"top must be >= 1, got {top}")


# --------------------------------------------------------------------------- phases


def reciprocal_masks(
    start: int, knn_ids: np.ndarray, rows_of: RowsOf, k1: int = 80, k2: int = 40
) -> np.ndarray:
    """Phase 1, owned rows ``[start, start + n)``: ``(n, k) uint8``, bit 0 set where column
    ``c`` of row ``i`` is in ``R(i, k1)``, bit 1 where it is in ``R(i, k2)``. Needs the rows
    of the 1-hop nodes (one ``rows_of`` call)."""
    knn_ids = _as_knn(knn_ids)
    n, k = knn_ids.shape
    _check_params(k, k1, k2)
    out = np.zeros((n, k), np.uint8)
    nb = knn_ids[:, :k1].astype(np.int64)
    r, c = np.nonzero(nb >= 0)
    if len(r) == 0:
        return out
    j = nb[r, c]
    uniq, ju = _unique_inverse(j)
    rows = _rows(uniq, start, knn_ids, rows_of)[:, :k1]
    # Rank of owned id v in row u, as sorted keys u_index * n + (v - start) (first = the
    # smallest rank), looked up at (j, i) for every i -> j; queries go in sorted so the
    # search stays in cache.
    ur, uc = np.nonzero((rows >= start) & (rows < start + n))
    key = ur * n + (rows[ur, uc] - start)
    order = _argsort(key)
    query = ju * n + r
    qo = _argsort(query)
    at, found = _lookup(key[order], query[qo])
    back = np.empty(len(j), np.int64)  # rank of i in row j (k1 = not in N_k1(j))
    back[qo] = np.where(found, uc[order][at], k1)
    out[r, c] = (back < k1).astype(np.uint8) * IN_K1
    out[r, c] |= ((c < k2) & (back < k2)).astype(np.uint8) * IN_K2
    return out


def expanded_sets(
    start: int,
    knn_ids: np.ndarray,
    masks: np.ndarray,
    neighbours_of: NeighboursOf,
    *,
    chunk: int = CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Phase 2: R*(i) of the owned rows as CSR (``indptr (n+1,) int64``, ``indices`` int64
    sorted ascending within each row). ``neighbours_of(sorted unique ids)`` -> (their kNN
    id rows ``(m, k)``, their phase-1 masks ``(m, k) uint8``); asked once per chunk for the
    non-owned members of R(i, k1)."""
    knn_ids = _as_knn(knn_ids)
    masks = np.asarray(masks, dtype=np.uint8)
    n, k = knn_ids.shape
    if masks.shape != (n, k):
        raise ValueError(f"masks {masks.shape} must match knn_ids {knn_ids.shape}")
    lengths, indices = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        h = hi - lo
        nb = knn_ids[lo:hi].astype(np.int64)
        a, c = np.nonzero(masks[lo:hi] & IN_K1)
        j = nb[a, c]  # (anchor, j in R(anchor, k1)), maybe repeated
        hop1 = _sorted_unique(j)
        rows, mk = _neighbours(hop1, start, knn_ids, masks, neighbours_of)
        b, d = np.nonzero(mk & IN_K2)
        member = rows[b, d]  # (hop1 index, l in R(hop1, k2))
        cols, at = _unique_inverse(np.concatenate([j, member]))
        r1 = _binary_csr(a, at[: len(j)], (h, len(cols)))
        mcol = at[len(j) :]
        r2 = _binary_csr(b, mcol, (len(hop1), len(cols)))
        # |R(j,k2) ∩ R(i,k1)| for every j in R(i,k1): (R1 · R2ᵀ) sampled at R1's cells.
        pa = np.repeat(np.arange(h, dtype=np.int64), np.diff(r1.indptr))
        pj = np.searchsorted(hop1, cols[r1.indices])
        r2t = _binary_csr(mcol, b, (len(cols), len(hop1)))
        common = _sample(r1 @ r2t, pa, pj).astype(np.int64)
        take = 3 * common >= 2 * np.diff(r2.indptr)[pj]
        sel = _binary_csr(pa[take], pj[take], (h, len(hop1)))
        rs = (r1 + (sel @ r2)).tocsr()
        rs.sum_duplicates()  # canonical: sorted local columns = sorted global ids
        lengths.append(np.diff(rs.indptr).astype(np.int64))
        indices.append(cols[rs.indices])
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.concatenate(lengths), out=indptr[1:])
    return indptr, np.concatenate(indices)


def jaccard_rerank(
    start: int,
    knn_ids: np.ndarray,
    rstar: tuple[np.ndarray, np.ndarray],
    rows_of: RowsOf,
    rstar_of: RstarOf,
    k1: int = 80,
    expand: int = 10,
    top: int = 80,
    *,
    chunk: int = CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Phase 3: ``(ids (n, top) int64, sims (n, top) float32)``, row ``i`` = ``i`` (sim 1)
    then its best candidates by Jaccard of R* sets descending, ties by smaller id, padded
    with id -1 / sim 0. ``rows_of`` gives kNN rows of the 1-hop nodes (for the candidates),
    ``rstar_of(sorted unique ids)`` -> CSR (indptr, indices) of their R* sets (sorted unique
    per row), rows in the order asked; each is called at most once per chunk."""
    knn_ids = _as_knn(knn_ids)
    n, k = knn_ids.shape
    _check_params(k, k1, expand=expand, top=top)
    rstar = (np.asarray(rstar[0], np.int64), np.asarray(rstar[1], np.int64))
    if rstar[0].shape != (n + 1,):
        raise ValueError(f"rstar indptr {rstar[0].shape} must be ({n + 1},)")
    out_ids = np.full((n, top), -1, np.int64)
    out_sims = np.zeros((n, top), np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        h = hi - lo
        anchor = np.arange(start + lo, start + hi, dtype=np.int64)
        nb = knn_ids[lo:hi, :k1].astype(np.int64)
        valid = nb >= 0
        hop1, at1 = _unique_inverse(nb[valid])
        ext = np.full((h, k1, expand), -1, np.int64)
        ext[valid] = _rows(hop1, start, knn_ids, rows_of)[:, :expand][at1]
        # Candidate pairs (anchor, id), self always in: each anchor's row of candidates,
        # sorted and deduplicated in place, so the pairs come sorted by (anchor, id).
        grid = np.concatenate([anchor[:, None], nb, ext.reshape(h, -1)], axis=1)
        grid.sort(axis=1)
        fresh = grid >= 0
        fresh[:, 1:] &= grid[:, 1:] != grid[:, :-1]
        pa, col = np.nonzero(fresh)
        pc = grid[pa, col]
        cand, pi = _unique_inverse(pc)
        # |R*(i) ∩ R*(c)|: R*_anchors · R*_candᵀ over the anchors' R* ids, sampled at pairs.
        optr, oind = csr_take(*rstar, np.arange(lo, hi))
        cptr, cind = _rstar(cand, start, n, rstar, rstar_of)
        # Columns: the anchors' R* ids; candidates' members outside them cannot meet.
        ids, at = _unique_inverse(np.concatenate([oind, cind]))
        is_col = np.zeros(len(ids), bool)
        is_col[at[: len(oind)]] = True
        col_of = np.cumsum(is_col) - 1
        ncols = int(is_col.sum())
        ro = _binary_csr(np.repeat(np.arange(h), np.diff(optr)), col_of[at[: len(oind)]],
                         (h, ncols))
        crow = np.repeat(np.arange(len(cand), dtype=np.int64), np.diff(cptr))
        inside = is_col[at[len(oind) :]]
        rct = _binary_csr(col_of[at[len(oind) :][inside]], crow[inside], (ncols, len(cand)))
        inter = _sample(ro @ rct, pa, pi).astype(np.float64)
        union = np.diff(optr)[pa] + np.diff(cptr)[pi] - inter
        sim = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        is_self = pc == anchor[pa]
        sim[is_self] = 1.0
        # Pairs are sorted by (anchor, id); a stable sort by (anchor, -score) keeps ids
        # ascending among equal scores. Self scores 2 so it always comes first.
        order = np.lexsort((-np.where(is_self, 2.0, sim), pa))
        pa, pc, sim = pa[order], pc[order], sim[order]
        count = np.bincount(pa, minlength=h)
        rank = np.arange(len(pa)) - np.repeat(np.cumsum(count) - count, count)
        keep = rank < top
        out_ids[lo + pa[keep], rank[keep]] = pc[keep]
        out_sims[lo + pa[keep], rank[keep]] = sim[keep]
    return out_ids, out_sims


# --------------------------------------------------------------------------- driver


def _check_bounds(bounds: Sequence[int] | None, n: int) -> np.ndarray:
    if bounds is None:
        return np.array([0, n], np.int64)
    b = np.asarray(bounds, dtype=np.int64).reshape(-1)
    if len(b) < 2 or b[0] != 0 or b[-1] != n or np.any(np.diff(b) < 0):
        raise ValueError(f"bounds must rise from 0 to N = {n}, got {list(b)}")
    return b


def rerank_graph(
    knn_ids: np.ndarray,
    k1: int = 80,
    k2: int = 40,
    expand: int = 10,
    top: int = 80,
    bounds: Sequence[int] | None = None,
    *,
    chunk: int = CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Single-process re-ranking of a whole graph ``(N, k)``: the three phases per partition
    (``bounds`` = partition starts plus N; default one partition) with callbacks reading the
    whole arrays. The result does not depend on ``bounds`` or ``chunk``."""
    knn_ids = _as_knn(knn_ids)
    n, k = knn_ids.shape
    _check_params(k, k1, k2, expand, top)
    if n and (int(knn_ids.max()) >= n or int(knn_ids.min()) < -1):
        raise ValueError(f"knn ids must be in [-1, N = {n})")
    b = _check_bounds(bounds, n)
    parts = [(int(s), int(e)) for s, e in zip(b[:-1], b[1:], strict=True) if e > s]

    def rows_of(ids: np.ndarray) -> np.ndarray:
        return knn_ids[ids]

    masks = np.zeros((n, k), np.uint8)
    for s, e in parts:
        masks[s:e] = reciprocal_masks(s, knn_ids[s:e], rows_of, k1, k2)

    def neighbours_of(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return knn_ids[ids], masks[ids]

    sets = [expanded_sets(s, knn_ids[s:e], masks[s:e], neighbours_of, chunk=chunk)
            for s, e in parts]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.concatenate([np.zeros(0, np.int64)] + [np.diff(p) for p, _ in sets]),
              out=indptr[1:])
    indices = np.concatenate([np.zeros(0, np.int64)] + [i for _, i in sets])

    def rstar_of(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return csr_take(indptr, indices, ids)

    out_ids = np.full((n, top), -1, np.int64)
    out_sims = np.zeros((n, top), np.float32)
    for (s, e), rs in zip(parts, sets, strict=True):
        out_ids[s:e], out_sims[s:e] = jaccard_rerank(
            s, knn_ids[s:e], rs, rows_of, rstar_of, k1, expand, top, chunk=chunk
        )
    return out_ids, out_sims
