"""Size-constrained components (:mod:`ltc_ray.graph.constrained`) over edges that stay
in their partitions, on Ray.

Each round, every partition task filters its own edges (both ends still staying, weight
at or above the round's cut) and reduces them to a star forest; one settle task runs the
components over the union of forests (O(N) edges) and accepts the small ones. Once the
edges still in play fit :data:`LOCAL_EDGES`, one task finishes the remaining rounds
itself (:func:`~ltc_ray.graph.constrained.raise_cuts`): same labels, no more round trips.
The driver holds refs and two numbers per round. Labels do not depend on the number of
partitions (tested against the single-process definition).
"""

from __future__ import annotations

import numpy as np
import ray

from ltc_ray.cluster.components import spanning_forest
from ltc_ray.graph.constrained import MAX_ROUNDS, next_cut, raise_cuts, settle
from ltc_ray.runtime import ray_get

__all__ = ["LOCAL_EDGES", "constrained_components_ray", "pooled_pairs"]

LOCAL_EDGES = 4_000_000  # edges (24 B each with their weight) one task finishes alone

Edges = tuple[np.ndarray, np.ndarray, np.ndarray]  # src, dst (int64), weight (float32)


@ray.remote(num_returns=3, max_retries=3)
def _filter_round(edges: Edges, remain: np.ndarray | None, th: float | None):
    """This round's edges of one partition (``remain`` None: round 0, all of them), their
    star forest and their count."""
    src, dst, w = edges
    if remain is not None:
        keep = remain[src] & remain[dst]
        if th is not None:
            keep &= w >= th
        src, dst, w = src[keep], dst[keep], w[keep]
    return (src, dst, w), spanning_forest(src, dst, len(remain) if remain is not None
                                          else None), len(src)


@ray.remote(num_returns=3, max_retries=3)
def _settle(remain: np.ndarray, label: np.ndarray, max_size: int, *forests):
    remain, label = remain.copy(), label.copy()
    src = np.concatenate([f[0] for f in forests]) if forests else np.empty(0, np.int64)
    dst = np.concatenate([f[1] for f in forests]) if forests else np.empty(0, np.int64)
    left = settle(remain, label, src, dst, max_size)
    return remain, label, left


@ray.remote(num_returns=2, max_retries=3)
def _finish(remain: np.ndarray, label: np.ndarray, th: float, rounds: int, left: int,
            max_size: int, step: float, max_rounds: int, *edges: Edges):
    remain, label = remain.copy(), label.copy()
    src = np.concatenate([e[0] for e in edges])
    dst = np.concatenate([e[1] for e in edges])
    w = np.concatenate([e[2] for e in edges])
    rounds = raise_cuts(remain, label, src, dst, w, th, rounds, left, max_size, step,
                        max_rounds)
    return label, rounds


def constrained_components_ray(n_nodes: int, edges: list, min_weight: float, max_size: int,
                               step: float, max_rounds: int = MAX_ROUNDS,
                               local_edges: int = LOCAL_EDGES) -> tuple[object, int]:
    """``(label ref (n_nodes,) int64, rounds)`` of
    :func:`~ltc_ray.graph.constrained.constrained_components` over the union of the edge
    refs ``edges`` (one ``(src, dst, weight)`` per partition; ``min_weight`` their smallest
    weight, 1.0 when there are none)."""
    remain = ray.put(np.ones(n_nodes, dtype=bool))
    label = ray.put(np.arange(n_nodes, dtype=np.int64))
    outs = [_filter_round.remote(e, None, None) for e in edges]
    remain, label, left = _settle.remote(remain, label, max_size, *[o[1] for o in outs])
    edges, counts = [o[0] for o in outs], [o[2] for o in outs]
    left, th, rounds = ray_get(left), float(min_weight), 0
    while left:
        if sum(ray_get(counts)) <= local_edges:
            label, rounds = _finish.remote(remain, label, th, rounds, left, max_size, step,
                                           max_rounds, *edges)
            return label, ray_get(rounds)
        rounds += 1
        th = next_cut(th, step)
        outs = [_filter_round.remote(e, remain, th) for e in edges]
        edges, counts = [o[0] for o in outs], [o[2] for o in outs]
        remain, label, left = _settle.remote(remain, label,
                                             max_size if rounds < max_rounds else n_nodes,
                                             *[o[1] for o in outs])
        left = ray_get(left)
    return label, rounds


@ray.remote(max_retries=3)
def _route(edges: Edges, bounds: np.ndarray) -> list:
    """Directed edges keyed by the partition owning their smaller end (one list entry per
    partition)."""
    src, dst, w = edges
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    owner = np.searchsorted(bounds, lo, side="right") - 1
    order = np.argsort(owner, kind="stable")
    cuts = np.searchsorted(owner[order], np.arange(len(bounds)))
    lo, hi, w = lo[order], hi[order], w[order]
    return [(lo[a:b], hi[a:b], w[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


@ray.remote(num_returns=2, max_retries=3)
def _pool(index: int, *routed: list):
    """One partition's undirected pairs, the weights of a pair's two directions averaged."""
    lo = np.concatenate([r[index][0] for r in routed])
    hi = np.concatenate([r[index][1] for r in routed])
    w = np.concatenate([r[index][2] for r in routed]).astype(np.float64)
    if len(lo) == 0:
        return (lo, hi, w.astype(np.float32)), 1.0
    order = np.lexsort((hi, lo))
    lo, hi, w = lo[order], hi[order], w[order]
    start = np.flatnonzero(np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])])
    mean = (np.add.reduceat(w, start) / np.diff(np.r_[start, len(lo)])).astype(np.float32)
    return (lo[start], hi[start], mean), float(mean.min())


def pooled_pairs(edges: list, ranges: list[tuple[int, int]]) -> tuple[list, float]:
    """Undirected pairs from directed weighted edges (refs, one per partition), a pair's
    weight the mean over the directions present (L-GCN's ``pool='avg'``; the same kNN
    edge listed twice in one direction counts twice). Returns (edge refs, smallest
    weight); each pair lands in the partition of its smaller end."""
    bounds = np.array([lo for lo, _ in ranges] + [ranges[-1][1]], dtype=np.int64)
    routed = [_route.remote(e, bounds) for e in edges]
    outs = [_pool.remote(i, *routed) for i in range(len(ranges))]
    mins = ray_get([o[1] for o in outs])
    return [o[0] for o in outs], min(mins, default=1.0)
