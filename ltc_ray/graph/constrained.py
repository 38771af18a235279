"""Size-constrained connected components: learn-to-cluster's super-vertex proposals and
L-GCN's dynamic-threshold propagation, one definition.

Round 0 takes the connected components of every given edge. A component of at most
``max_size`` nodes is accepted; the nodes of larger ones stay. Each later round raises
the cut, ``th <- th + (1 - th) * step`` (``th`` starts at the smallest edge weight), and
takes the components of the staying nodes over their edges of weight ``>= th``; again
the small ones are accepted. After ``max_rounds`` raised cuts the staying nodes keep the
components of the last round, whatever their size (the reference loops for ever when a
large component is tied at weight 1.0).

A node's label is the smallest node id of its accepted component, so labels never
depend on edge order, duplicates, direction or partitioning. The reference walks Python
sets with BFS; here each round is one scipy connected-components call, and
:mod:`ltc_ray.cluster.constrained` runs the same rounds over partitioned edges on Ray
(:func:`settle` is the step both share).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

__all__ = ["MAX_ROUNDS", "constrained_components", "next_cut", "raise_cuts", "settle"]

MAX_ROUNDS = 100  # learn-to-cluster's super-vertex iteration limit


def next_cut(th: float, step: float) -> float:
    """The raised cut of the next round (float64 arithmetic, the same everywhere)."""
    return float(th) + (1.0 - float(th)) * float(step)


def _roots(nodes: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Per node of the sorted ``nodes``, the smallest node of its component over the
    edges ``src -> dst`` (global ids, both ends in ``nodes``)."""
    m = len(nodes)
    if len(src):
        a, b = np.searchsorted(nodes, src), np.searchsorted(nodes, dst)
        graph = sp.coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(m, m)).tocsr()
        _, comp = connected_components(graph, directed=True, connection="weak")
    else:
        comp = np.arange(m)
    # nodes are sorted: the first occurrence of a component is its smallest node
    first = np.full(int(comp.max()) + 1 if m else 0, m, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(m))
    return nodes[first[comp]]


def settle(remain: np.ndarray, label: np.ndarray, src: np.ndarray, dst: np.ndarray,
           max_size: int) -> int:
    """One round over the staying nodes (``remain`` True) and this round's edges between
    them (raw edges or any forest with the same connectivity): components of at most
    ``max_size`` nodes are accepted (``label`` set to their smallest node, ``remain``
    cleared), in place. Returns how many nodes stay."""
    nodes = np.flatnonzero(remain)
    if len(nodes) == 0:
        return 0
    roots = _roots(nodes, np.asarray(src, np.int64), np.asarray(dst, np.int64))
    # components are labelled by their smallest node: sizes by a count over the roots
    uniq, inverse, counts = np.unique(roots, return_inverse=True, return_counts=True)
    ok = counts[inverse.reshape(-1)] <= max_size
    label[nodes[ok]] = roots[ok]
    remain[nodes[ok]] = False
    return int(len(nodes) - np.count_nonzero(ok))


def constrained_components(n_nodes: int, src: np.ndarray, dst: np.ndarray,
                           weight: np.ndarray, max_size: int, step: float,
                           max_rounds: int = MAX_ROUNDS) -> tuple[np.ndarray, int]:
    """``(label (n_nodes,) int64, rounds)``: the smallest node of each node's component
    (the module docstring's rounds) and how many raised cuts ran. Nodes without edges
    are their own component."""
    if max_size < 1 or not 0.0 < step <= 1.0 or max_rounds < 1:
        raise ValueError(f"bad constraint: max_size {max_size}, step {step}, "
                         f"max_rounds {max_rounds}")
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    weight = np.asarray(weight)
    label = np.arange(n_nodes, dtype=np.int64)
    remain = np.ones(n_nodes, dtype=bool)
    left = settle(remain, label, src, dst, max_size)
    th = float(weight.min()) if len(weight) else 1.0
    rounds = raise_cuts(remain, label, src, dst, weight, th, 0, left, max_size, step,
                        max_rounds)
    return label, rounds


def raise_cuts(remain: np.ndarray, label: np.ndarray, src: np.ndarray, dst: np.ndarray,
               weight: np.ndarray, th: float, rounds: int, left: int, max_size: int,
               step: float, max_rounds: int) -> int:
    """The raised-cut rounds after ``rounds`` of them (cut ``th``, ``left`` nodes staying),
    in place; returns the number of rounds run in all. The distributed rounds hand over
    to this once their edges fit one worker."""
    n_nodes = len(remain)
    while left:
        rounds += 1
        th = next_cut(th, step)
        keep = (weight >= th) & remain[src] & remain[dst]
        src, dst, weight = src[keep], dst[keep], weight[keep]
        left = settle(remain, label, src, dst, max_size if rounds < max_rounds else n_nodes)
    return rounds
