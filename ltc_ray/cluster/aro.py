"""``aro``: approximate rank-order clustering (Otto et al. 2017), per partition.

The rank-order distance of a pair (a, b) needs only a's and b's top-``m`` lists, so each
partition computes it for its own rows with its neighbours' lists fetched as a halo
(link actors, like TPDi), keeps the pairs at distance <= ``threshold`` and the global
merge joins them: the same clusters as the whole graph in one process, for any number of
partitions, and no worker holds the whole graph.

Both parameters default to ``auto`` (issue 15): the list length ``m`` follows how many
neighbours a row typically shares its identity with (rank-order distances over lists much
longer than the identities compare impostors; over lists much shorter they miss the
identity), estimated without labels as the mean count of neighbours above knn-cc's
label-free cut; the threshold is then a function of ``m``. Both rules were fitted on the
domain-shift benchmark's train splits (``benchmarks/domain_shift.py --fit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ltc_ray.cluster.base import (
    ClusterMethod,
    LinkHaloPartition,
    LinkResult,
    PartitionInput,
    Shape,
    Tunable,
    nearest_higher_kept,
    neighbor_density,
    register,
)
from ltc_ray.graph.similarity_stats import SimilarityStats, derive
from ltc_ray.params import AUTO, NEIGHBOURS, Auto, Range, param

SCORE_NEIGHBORS = 10
PAIR_BUDGET = 2**21  # (rows x m x m) entries of one block's temporaries (~100 MB)

# auto list length: m = clip(round(M_SCALE * c + M_OFFSET), M_MIN, M_MAX), c = the mean
# number of neighbours with cosine >= knn-cc's auto cut (rule M_CUT)
M_CUT = Auto(0.72, "far:0.5", "r1:0.5")
M_SCALE, M_OFFSET, M_MIN, M_MAX = 0.75, 1.0, 3, 40
# auto threshold: T_BASE * (20 / m) ** T_POWER (rank-order distances shrink as lists grow)
T_BASE, T_POWER = 1.2, 0.0


@dataclass
class AROParams:
    """Approximate rank-order over each node's top ``neighbors`` list; link pairs with
    rank-order distance <= threshold; clusters = connected components."""

    # rank-order distance; auto: T_BASE * (20 / m) ** T_POWER
    threshold: float | str = param(AUTO, valid=Range(0.0, None, what="a rank-order distance"),
                                   auto=Auto(T_BASE, kind="aro-threshold"))
    # list length m (capped at knn.k); cost O(N m^2); auto: from the similarity profile
    neighbors: int | str = param(AUTO, valid=Range(1, NEIGHBOURS),
                                 auto=Auto(M_SCALE, M_CUT.low, M_CUT.high, kind="aro-m"))
    # link actors fetch their neighbours' rows in blocks above this many bytes
    halo_bytes: int = param(1 << 28, valid=Range(1, 1 << 50))


def _membership(rows: np.ndarray, queries: np.ndarray, sentinel: int) -> np.ndarray:
    """``(..., q) bool``: is ``queries[i, ..., j]`` in ``rows[i]`` (row lists ``(R, m)``,
    ids < 0 = padding); ``queries`` has the rows' leading axis first."""
    n_rows, m = rows.shape
    base = np.arange(n_rows, dtype=np.int64) * sentinel
    keys = np.sort(np.where(rows >= 0, base[:, None] + rows, base[:, None] + sentinel - 1),
                   axis=1).ravel()
    shape = (n_rows,) + (1,) * (queries.ndim - 1)
    q = base.reshape(shape) + queries
    pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    return (keys[pos] == q) & (queries >= 0)


def rank_order_block(a: np.ndarray, la: np.ndarray, lb: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-order distances of rows ``a (B,)`` with lists ``la (B, m)`` (self at rank 0)
    to their partners ``b = la[:, 1:]``, whose lists are ``lb (B, m-1, m)``:

    ``d(a, b) = #{i <= O_a(b) : f_a(i) not in top-m(b)}``,
    ``D(a, b) = (d(a, b) + d(b, a)) / min(O_a(b), O_b(a))``, with ``O_b(a) = m`` when a
    is not in b's list (then ``d(b, a)`` counts over b's whole list).
    Returns ``(src, dst, D)`` over the valid pairs (b >= 0, b != a)."""
    n, m = la.shape
    if n == 0 or m < 2:
        empty = np.empty(0, np.int64)
        return empty, empty, np.empty(0, np.float32)
    b = la[:, 1:]
    valid = (b >= 0) & (b != a[:, None])
    sentinel = int(max(la.max(), lb.max(), a.max())) + 2
    cols = np.arange(m)
    # d(a, b): a's list up to b's rank, checked against b's list
    flat_lb = lb.reshape(n * (m - 1), m)
    in_b = _membership(flat_lb, np.repeat(la, m - 1, axis=0), sentinel).reshape(n, m - 1, m)
    upto = cols[None, None, :] <= cols[None, 1:, None]
    d_ab = (~in_b & upto).sum(axis=2)
    # d(b, a): b's list up to a's rank in it (m - 1 when absent), checked against a's list
    pos_a = lb == a[:, None, None]
    o_ba = np.where(pos_a.any(axis=2), pos_a.argmax(axis=2), m)
    in_a = _membership(la, lb, sentinel)
    d_ba = (~in_a & (cols[None, None, :] <= np.minimum(o_ba, m - 1)[:, :, None])).sum(axis=2)
    denom = np.maximum(np.minimum(cols[None, 1:], o_ba), 1)
    dist = (d_ab + d_ba) / denom
    r, c = np.nonzero(valid)
    return a[r].astype(np.int64), b[r, c].astype(np.int64), dist[r, c].astype(np.float32)


def rank_order_distances(knn_ids: np.ndarray, m: int, block_rows: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`rank_order_block` over a whole graph, in blocks of rows (the reference the
    partitioned link is tested against)."""
    n = len(knn_ids)
    lists = knn_ids[:, :m].astype(np.int64)
    block_rows = block_rows or max(1, PAIR_BUDGET // (m * m))
    out = []
    for lo in range(0, n, block_rows):
        hi = min(n, lo + block_rows)
        la = lists[lo:hi]
        lb = lists[np.where(la[:, 1:] >= 0, la[:, 1:], 0)]
        out.append(rank_order_block(np.arange(lo, hi, dtype=np.int64), la, lb))
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))  # type: ignore


def aro_list_length(stats: SimilarityStats, k: int) -> tuple[int, dict]:
    """The auto ``m`` and the statistic behind it."""
    cut, basis = derive(M_CUT, stats)
    count = stats.mean_count_above(cut)
    m = int(np.clip(round(M_SCALE * count + M_OFFSET), M_MIN, min(M_MAX, max(2, k - 1))))
    return m, {"cut": cut, "cut_rule": M_CUT.describe(), "mean_neighbours_above_cut":
               round(count, 3), "rule": f"clip(round({M_SCALE:g} * count + {M_OFFSET:g}), "
               f"{M_MIN}, {M_MAX})", **{f"cut_{key}": value for key, value in basis.items()
                                        if key.endswith("_value")}}


def aro_threshold(m: int) -> tuple[float, dict]:
    """The auto threshold for list length ``m``."""
    value = round(T_BASE * (20.0 / m) ** T_POWER, 3)
    return value, {"rule": f"{T_BASE:g} * (20 / m) ** {T_POWER:g}", "m": m}


@register
class ApproxRankOrder(ClusterMethod):
    """Approximate rank-order clustering: components of the pairs (a, b), b in a's
    top-``neighbors`` list, whose rank-order distance (:func:`rank_order_block`) is <=
    ``threshold``; computed per partition over the neighbours' lists (link actors).
    ``score`` is the 10-NN density; ``parent`` the most similar kept partner that
    outranks the node by score (-1: none)."""

    name = "aro"
    Params = AROParams
    shape = Shape(score="rows", link="halo", score_params=(), halo_bytes=1 << 28,
                  tunable=Tunable("threshold", 0.0, 3.0, 0.05))

    def compile_shape(self) -> Shape:
        return Shape(score="rows", link="halo", score_params=(),
                     halo_bytes=int(self.params.halo_bytes), tunable=type(self).shape.tunable)

    def derive_params(self, stats: SimilarityStats, fields: dict[str, Auto]
                      ) -> dict[str, tuple[Any, dict]]:
        out: dict[str, tuple[Any, dict]] = {}
        m = self.params.neighbors
        if "neighbors" in fields:
            m, basis = aro_list_length(stats, self.k)
            out["neighbors"] = (m, basis)
        if "threshold" in fields:
            out["threshold"] = aro_threshold(max(2, min(int(m), self.k)))
        return out

    def score(self, part: PartitionInput) -> np.ndarray:
        return neighbor_density(part.knn_sims, SCORE_NEIGHBORS)

    def list_length(self, k: int) -> int:
        return max(2, min(int(self.params.neighbors), k))

    def link_halo(self, part: LinkHaloPartition, scores: np.ndarray,
                  context: None = None) -> LinkResult:
        m = self.list_length(part.knn_ids.shape[1])
        node_ids = np.arange(part.start, part.stop, dtype=np.int64)
        lists = part.knn_ids[:, :m].astype(np.int64)
        block = max(1, PAIR_BUDGET // (m * m))
        src, dst = [], []
        for lo in range(0, len(lists), block):
            la = lists[lo:lo + block]
            partners = np.where(la[:, 1:] >= 0, la[:, 1:], node_ids[lo:lo + block, None])
            uniq, inverse = np.unique(partners, return_inverse=True)
            rows = part.rows_of(uniq)[0][:, :m].astype(np.int64)
            lb = rows[inverse.reshape(partners.shape)]
            s, d, dist = rank_order_block(node_ids[lo:lo + block], la, lb)
            keep = dist <= self.params.threshold
            src.append(s[keep])
            dst.append(d[keep])
        src_all = np.concatenate(src) if src else np.empty(0, np.int64)
        dst_all = np.concatenate(dst) if dst else np.empty(0, np.int64)
        return LinkResult(parent=self._parents(part, node_ids, src_all, dst_all, scores),
                          src=src_all, dst=dst_all)

    def _parents(self, part: LinkHaloPartition, node_ids: np.ndarray, src: np.ndarray,
                 dst: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Per owned node, its most similar kept partner that outranks it (-1: none)."""
        ids = part.knn_ids[:, 1:].astype(np.int64)
        kept = np.zeros(ids.shape, dtype=bool)
        if len(src):  # the kept pairs as cells of the owned rows
            width = scores.size + 1
            row_keys = np.arange(len(ids), dtype=np.int64)[:, None] * width + ids
            pair_keys = np.sort((src - part.start) * width + dst)
            pos = np.minimum(np.searchsorted(pair_keys, row_keys), len(pair_keys) - 1)
            kept = (pair_keys[pos] == row_keys) & (ids >= 0)
        return nearest_higher_kept(node_ids, ids, kept, scores)
