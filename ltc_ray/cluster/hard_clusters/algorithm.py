"""The hard-clusters algorithm (Chen et al., ECCV 2022) as array code.

1. A transformer edge scorer (:mod:`ltc_ray.models.edge_scorer`) gives each kNN edge
   P(same identity) = p; d' = 1 - p, and every row is re-sorted by d'.
2. NDDE density from the transition matrix P (row-softmax of -d'/sigma over the first m = 20
   neighbours): one step from a uniform start (density = incoming weight, the reference's
   default) or the diffusion rho <- d rho + (1 - d) P^T rho iterated to ||delta||_1 < eps,
   as sparse sums over the kNN edges (never a dense N x N).
3. TPDi distance: Q_i = sqrt(row-softmax(-d'_i / 0.05)) over the whole row;
   TPDi(i, j) = 1 - sum over common neighbours c of Q_ic Q_jc, for every j in N(i).
4. Each node links to its TPDi-nearest neighbour of higher density, kept when TPDi < tau.

:mod:`.rescore` runs it on partition actors. Sums are taken in an order fixed by the
global ids (incoming edges sorted by (target, source); a row's terms in its own order), so
densities, distances and clusters are bit-identical whatever the partitioning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltc_ray.cluster.base import LinkResult, first_true, halo_fits, higher_ranked

# Fixed-point units of the diffusion's L1 change: an exact integer sum is the same whatever
# the order partitions report in, so every partitioning stops after the same iteration.
L1_UNITS = float(2**52)
TPDI_BLOCK = 512  # anchors per TPDi block: a block gathers (B, k, k) neighbour rows


def halo_chunk_rows(n_rows: int, halo_rows: int, k: int, dim: int, halo_bytes: int,
                    batch: int = 256) -> int:
    """Rows an edge actor scores per halo fetch: all of them when its halo's features fit
    in ``halo_bytes``, else chunks whose neighbours (at most rows·k) fit, so its memory is
    bounded whatever the corpus size and row order (results do not depend on it)."""
    if halo_fits(halo_rows, dim * 4, halo_bytes):
        return max(n_rows, 1)
    return max(batch, halo_bytes // (k * dim * 4))


# ----------------------------------------------------------------------------- NDDE
def transition_edges(node_ids: np.ndarray, knn_ids: np.ndarray, prob: np.ndarray, m: int,
                     sigma: float, self_loops: bool = True
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The owned rows of the NDDE transition matrix as edges ``(src, dst, weight float64)``.

    Row i is the softmax of -d'/sigma over its first ``m`` neighbours (rows sorted by d');
    without ``self_loops`` (the diffusion's P_ii = 0) i itself is left out of the softmax.
    """
    ids = np.asarray(knn_ids[:, :m], dtype=np.int64)
    valid = ids >= 0
    if not self_loops:
        valid &= ids != node_ids[:, None]
    logits = np.where(valid, -(1.0 - prob[:, :m].astype(np.float64)) / sigma, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    top[~np.isfinite(top)] = 0.0
    weight = np.where(valid, np.exp(logits - top), 0.0)
    total = weight.sum(axis=1, keepdims=True)
    weight = np.divide(weight, total, out=np.zeros_like(weight), where=total > 0)
    src = np.broadcast_to(node_ids[:, None], ids.shape)
    return src[valid], ids[valid], weight[valid]


@dataclass
class IncomingEdges:
    """The transition edges INTO nodes ``[lo, hi)``, sorted by (target, source), so sums
    over them run in an order fixed by global ids (bit-identical for any partitioning)."""

    lo: int
    hi: int
    src: np.ndarray  # (e,) int64
    weight: np.ndarray  # (e,) float64
    targets: np.ndarray  # (t,) distinct targets, ascending
    starts: np.ndarray  # (t,) first edge of each target

    @classmethod
    def build(cls, lo: int, hi: int, src: np.ndarray, dst: np.ndarray,
              weight: np.ndarray) -> IncomingEdges:
        keep = (dst >= lo) & (dst < hi)
        src, dst, weight = src[keep], dst[keep], weight[keep]
        order = np.lexsort((src, dst))
        src, dst, weight = src[order], dst[order], weight[order]
        targets, starts = np.unique(dst, return_index=True)
        return cls(lo, hi, src, weight, targets, starts)

    def pull(self, values: np.ndarray | None = None) -> np.ndarray:
        """``sum_i P_ij values_i`` for every owned j, ``(hi - lo,) float64``; ``values``
        aligned with ``src`` (None: all ones, i.e. the incoming weight)."""
        out = np.zeros(self.hi - self.lo, dtype=np.float64)
        if len(self.src):
            terms = self.weight if values is None else self.weight * values
            out[self.targets - self.lo] = np.add.reduceat(terms, self.starts)
        return out


def l1_units(delta: np.ndarray) -> int:
    """``||delta||_1`` in exact fixed-point units of 2**-52 (see :data:`L1_UNITS`)."""
    return int(np.rint(np.abs(delta) * L1_UNITS).astype(np.int64).sum(dtype=np.int64))


def ndde_density(knn_ids: np.ndarray, prob: np.ndarray, m: int = 20, sigma: float = 0.5,
                 mode: str = "approximate", damping: float = 0.1, eps: float = 0.05,
                 max_iter: int = 100) -> tuple[np.ndarray, int]:
    """NDDE over a whole graph in one process (training, tests): ``(density, iterations)``.

    The pipeline computes the same quantities per partition with the same helpers."""
    n = len(knn_ids)
    node_ids = np.arange(n, dtype=np.int64)
    src, dst, w = transition_edges(node_ids, knn_ids, prob, m, sigma,
                                   self_loops=mode == "approximate")
    incoming = IncomingEdges.build(0, n, src, dst, w)
    if mode == "approximate":
        return incoming.pull(), 1
    rho = np.full(n, 1.0 / n)
    for it in range(1, max_iter + 1):
        new = damping * rho + (1.0 - damping) * incoming.pull(rho[incoming.src])
        change = l1_units(new - rho)
        rho = new
        if change < eps * L1_UNITS:
            return rho, it
    return rho, max_iter


# ----------------------------------------------------------------------------- TPDi
def transition_q(knn_ids: np.ndarray, prob: np.ndarray, sigma: float) -> np.ndarray:
    """``Q (n, k) float64``: sqrt of the row-softmax of -d'/sigma (+1e-5 in the denominator,
    as in the reference); 0 for padding."""
    d = 1.0 - prob.astype(np.float64)
    e = np.where(knn_ids >= 0, np.exp(-d / sigma), 0.0)
    return np.sqrt(e / (e.sum(axis=1, keepdims=True) + 1e-5))


def tpdi_rows(knn_ids: np.ndarray, q: np.ndarray, nbr_ids: np.ndarray,
              nbr_q: np.ndarray) -> np.ndarray:
    """TPDi ``(B, k) float64`` between each anchor and each of its neighbours.

    ``knn_ids``/``q`` ``(B, k)``: the anchors' rows; ``nbr_ids``/``nbr_q`` ``(B, k, k)``: the
    rows of those neighbours. Common neighbours are found by one sorted search (keys offset
    per anchor), so no per-row Python; each sum runs over the neighbour's row in its order.
    """
    b, k = knn_ids.shape
    ids = knn_ids.astype(np.int64)
    span = int(max(ids.max(initial=0), nbr_ids.max(initial=0))) + 2
    order = np.argsort(ids, axis=1, kind="stable")
    mine = np.take_along_axis(ids, order, axis=1)
    mine_q = np.take_along_axis(q, order, axis=1)
    offset = (np.arange(b, dtype=np.int64) * span)[:, None]
    keys = (offset + mine + 1).ravel()  # ascending: rows in order, each row sorted
    theirs = nbr_ids.astype(np.int64)
    query = offset[:, :, None] + theirs + 1
    pos = np.minimum(np.searchsorted(keys, query.ravel()), keys.size - 1).reshape(query.shape)
    # an anchor's padding (id -1) has key offset + 0, which no valid neighbour id reaches
    hit = (keys[pos] == query) & (theirs >= 0)
    overlap = np.where(hit, mine_q.ravel()[pos] * nbr_q, 0.0).sum(axis=2)
    out = 1.0 - overlap
    out[ids < 0] = np.inf
    return out


def tpdi(knn_ids: np.ndarray, prob: np.ndarray, rows_of, sigma: float = 0.05,
         block: int = TPDI_BLOCK) -> np.ndarray:
    """TPDi ``(n, k) float64`` for owned rows ``knn_ids``/``prob`` (sorted by d'); ``rows_of``
    serves the (ids, p) rows of any neighbour (the one-hop halo)."""
    n, k = knn_ids.shape
    out = np.empty((n, k), dtype=np.float64)
    q = transition_q(knn_ids, prob, sigma)
    for lo in range(0, n, block):
        ids = knn_ids[lo: lo + block].astype(np.int64)
        safe = np.where(ids >= 0, ids, ids[:, :1])
        nbr_ids, nbr_p = rows_of(safe.ravel())
        nbr_ids = np.asarray(nbr_ids, dtype=np.int64).reshape(len(ids), k, -1)
        nbr_p = np.asarray(nbr_p).reshape(nbr_ids.shape)
        nbr_q = transition_q(nbr_ids.reshape(-1, nbr_ids.shape[2]), nbr_p.reshape(
            -1, nbr_ids.shape[2]), sigma).reshape(nbr_ids.shape)
        out[lo: lo + len(ids)] = tpdi_rows(ids, q[lo: lo + len(ids)], nbr_ids, nbr_q)
    return out


# ----------------------------------------------------------------------------- linking
def link_by_tpdi(node_ids: np.ndarray, knn_ids: np.ndarray, dist: np.ndarray,
                 scores: np.ndarray, tau: float) -> LinkResult:
    """Parent = the TPDi-nearest neighbour that outranks the node (density, then smaller
    id: the reference's ``>=`` made a strict order, so parents never form cycles; ties in
    TPDi keep the d' order); the edge is kept when TPDi < ``tau``."""
    ids = knn_ids.astype(np.int64)
    valid = (ids >= 0) & (ids != node_ids[:, None])
    order = np.argsort(np.where(valid, dist, np.inf), axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    valid = np.take_along_axis(valid, order, axis=1)
    safe = np.where(valid, ids, 0)
    outranks = higher_ranked(node_ids, scores[node_ids], ids, scores[safe]) & valid
    col, has = first_true(outranks)
    rows = np.arange(len(ids))
    linked = has & (dist[rows, col] < tau)
    parent = np.where(linked, ids[rows, col], -1)
    keep = parent >= 0
    return LinkResult(parent=parent, src=node_ids[keep], dst=parent[keep])
