"""The map equation (two-level Infomap) over a large weighted graph, split into independent
pieces that run in parallel (issue 20).

Why per component: no flow passes between connected components and Infomap moves nodes
along links, so each component is solved on its own (whole-graph Infomap can, rarely, still
differ on a disconnected graph through its random moves of degree <= 2 nodes; a graph that
is one component gives exactly the single call's partition). Hence:

* isolated nodes are singletons and a 2-node component is one module (its code length is
  1 bit against 3 bits for two modules), both without calling Infomap;
* every other component is a *unit*: ONE Infomap call on it alone, nodes numbered by sorted
  global id, ``--two-level --silent --flow-model undirected --seed <seed+1> --num-trials
  <trials>`` (the flags of the ``infomap`` baseline, ``cluster/baselines.py``). A unit's
  labels therefore never depend on what it is packed with, how many workers there are, or
  whether Ray runs it;
* units, in order of their smallest node, are packed greedily into *pieces* (one task each)
  of at most ``pack_edges`` edges (default ``max_piece_edges``) and ``max_piece_nodes``
  nodes. Packing only sets task granularity, never labels.

A component over the budget (``> max_piece_nodes`` nodes or ``> max_piece_edges``
edges) is *oversized* and APPROXIMATED, in ``split_passes`` passes (default 3):

1. coarse partition into blocks: breadth-first order from the component's smallest node
   (scipy) in the first pass; in later passes the previous pass's modules one after another
   (in order of their first node in that BFS order), so blocks hold whole clusters. The
   order is cut into contiguous blocks of ``<= max_piece_nodes`` nodes and a degree sum
   ``<= 2 * max_piece_edges`` (so a block holds at most ``max_piece_edges`` edges), at a
   module boundary where one fits;
2. the block-internal graph (cut edges dropped) is planned like any graph: its components are
   units, packed into pieces, all run as independent tasks;
3. boundary moves: a node with a cut edge joins the module (of any block) it has the most
   weight to, when that beats its own block module. Without this step a node whose cluster
   mates fell into the next block stays in a wrong module for good;
4. refinement on the super-graph: each module becomes a super-node whose self-link weight is
   twice its internal weight plus its members' self-links (Infomap's undirected model adds a
   self-link's weight once to the node's flow, so the super-node's flow is its members'
   flow) and whose links are the summed weights between modules, cut edges included. The map
   equation of a partition of super-nodes then equals the original graph's map equation of
   the merged partition up to a constant (the node-entropy term does not depend on the
   partition), so Infomap on the super-graph merges modules as whole-graph Infomap would
   score the merges. The super-graph is solved the same way (split again, steps 1-4, while
   over budget) and nodes take their super-node's module.

This can merge block modules and move boundary nodes, but never re-split a module or move
an interior node, hence the later passes with blocks made of modules. Measured against one
Infomap call on the whole component (pairwise F; planted partitions of 11K-20K nodes in
groups of 3-300, 20-50 % of the edges across groups, blocks of 1/2 to 1/20 of the
component): BFS blocks in one pass without boundary moves 0.24-0.97; with boundary moves
0.56-0.99; two passes 0.94-1.0; three passes 0.997-1.0. At 200K nodes (2,000 groups of 100,
30 % cross edges, blocks of 20K-50K nodes): one pass 0.978-0.9998, two or three 1.0
(tests/test_map_equation.py checks >= 0.95). If a level
contracts nothing or after ``MAX_SPLIT_LEVELS`` levels, the super-graph runs whole regardless
of the budget, with a warning. The driver holds each oversized component's edge arrays
(about 60 bytes per edge at peak while contracting), never Infomap's structures.

Memory of one worker for a piece of ``nodes`` / ``edges``: :func:`piece_memory_bytes`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order, connected_components

__all__ = [
    "DEFAULT_MAX_PIECE_EDGES",
    "DEFAULT_MAX_PIECE_NODES",
    "Piece",
    "PiecePlan",
    "connected_pieces",
    "infomap_args",
    "map_equation_labels",
    "piece_memory_bytes",
    "run_piece",
]

log = logging.getLogger("ltc_ray")

# ~2.5 GB per worker by piece_memory_bytes; a component up to this size runs exactly
DEFAULT_MAX_PIECE_EDGES = 10_000_000
DEFAULT_MAX_PIECE_NODES = 1_000_000
MAX_SPLIT_LEVELS = 16  # super-graph levels of one oversized component before running it whole

INFOMAP_CALLS = 0  # Infomap runs in this process (the tests count them)


def infomap_args(seed: int, trials: int) -> str:
    """The Infomap flags of every call (the ``infomap`` baseline's; Infomap refuses seed 0,
    so ``seed`` s maps to Infomap seed s + 1)."""
    return (f"--two-level --silent --flow-model undirected --seed {int(seed) + 1} "
            f"--num-trials {int(trials)}")


@dataclass(frozen=True)
class Piece:
    """Units packed into one task. ``nodes`` are the piece's node ids in the planned graph,
    unit after unit, ascending inside a unit (piece-local id = position here); ``src < dst``
    are piece-local, grouped by unit in the units' order."""

    nodes: np.ndarray  # (m,) int64
    unit_sizes: np.ndarray  # (u,) int64 nodes per unit
    unit_edges: np.ndarray  # (u,) int64 edges per unit
    src: np.ndarray  # (e,) int32
    dst: np.ndarray  # (e,) int32
    weight: np.ndarray  # (e,) float64
    self_weight: np.ndarray | None = None  # (m,) float64 self-link weights (super-graphs)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return len(self.src)


@dataclass(frozen=True)
class PiecePlan:
    """How a graph splits: singletons and 2-node modules (no Infomap), pieces of units (one
    task each) and oversized components (one single-unit :class:`Piece` each, too large for
    one worker: split by :func:`map_equation_labels`). Depends only on the graph and the
    budgets."""

    n: int
    max_piece_edges: int
    max_piece_nodes: int
    singletons: np.ndarray  # (s,) int64 isolated nodes
    pairs: np.ndarray  # (p, 2) int64 2-node components, smaller id first
    pieces: list[Piece]
    oversized: list[Piece]

    @property
    def n_units(self) -> int:
        return int(sum(len(p.unit_sizes) for p in self.pieces))


# ---------------------------------------------------------------- input


def _check_budgets(max_piece_edges: int, max_piece_nodes: int, pack_edges: int | None) -> None:
    if int(max_piece_edges) < 1 or int(max_piece_nodes) < 2:
        raise ValueError(f"piece budgets must allow a pair: max_piece_edges {max_piece_edges} "
                         f"(>= 1), max_piece_nodes {max_piece_nodes} (>= 2)")
    if int(max_piece_nodes) >= 2**31:
        raise ValueError(f"max_piece_nodes {max_piece_nodes} must be < 2**31 (int32 local ids)")
    if pack_edges is not None and int(pack_edges) < 1:
        raise ValueError(f"pack_edges {pack_edges} must be >= 1")


def _canonical_edges(
    n: int, src, dst, weight
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked undirected edges ``u < v`` sorted by ``(u, v)``, one per pair with its largest
    weight; self loops and zero weights dropped. Bad input is a ValueError saying what."""
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    n = int(n)
    src, dst, weight = np.asarray(src), np.asarray(dst), np.asarray(weight)
    if not (src.ndim == dst.ndim == weight.ndim == 1 and len(src) == len(dst) == len(weight)):
        raise ValueError(f"src {src.shape}, dst {dst.shape} and weight {weight.shape} must be "
                         "1-D arrays of the same length (one entry per edge)")
    if len(src) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
    if src.dtype.kind not in "iu" or dst.dtype.kind not in "iu":
        raise ValueError(f"node ids must be integers, got src {src.dtype} and dst {dst.dtype}")
    lo, hi = min(int(src.min()), int(dst.min())), max(int(src.max()), int(dst.max()))
    if lo < 0 or hi >= n:
        raise ValueError(f"node ids must lie in [0, {n}), got ids from {lo} to {hi}")
    if weight.dtype.kind not in "iuf":
        raise ValueError(f"weights must be numbers, got {weight.dtype}")
    weight = weight.astype(np.float64, copy=False)
    bad = ~np.isfinite(weight)
    if bad.any():
        raise ValueError(f"weights must be finite: {int(bad.sum())} are NaN or infinite")
    if (weight < 0).any():
        raise ValueError(f"weights must be >= 0 (cut or rescale similarities first), got "
                         f"{int((weight < 0).sum())} negative, the smallest {weight.min():.4g}")
    src = src.astype(np.int64, copy=False)
    dst = dst.astype(np.int64, copy=False)
    keep = (src != dst) & (weight > 0)
    return _merge_pairs(n, np.minimum(src, dst)[keep], np.maximum(src, dst)[keep],
                        weight[keep], np.maximum)


def _merge_pairs(m: int, u: np.ndarray, v: np.ndarray, w: np.ndarray, reduce
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(u, v)`` (ids < ``m``) sorted, each once, their weights reduced (``np.maximum``
    or ``np.add``, in input order within a pair: deterministic)."""
    if len(u) == 0:
        return u.astype(np.int64), v.astype(np.int64), w.astype(np.float64)
    if m < 3_000_000_000:  # m * m fits in int64
        key = u * m + v
        order = np.argsort(key, kind="stable")
        key = key[order]
        first = np.r_[True, key[1:] != key[:-1]]
    else:
        order = np.lexsort((v, u))
        first = np.r_[True, (u[order][1:] != u[order][:-1]) | (v[order][1:] != v[order][:-1])]
    starts = np.flatnonzero(first)
    w = reduce.reduceat(w[order], starts)
    keep = order[starts]
    return u[keep], v[keep], w


# ---------------------------------------------------------------- planning


def _smallest_member(labels: np.ndarray) -> np.ndarray:
    """Per node, the index of the smallest node with its label (the canonical module id)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int64)


def _plan(m: int, u: np.ndarray, v: np.ndarray, w: np.ndarray, self_w: np.ndarray | None,
          max_edges: int, max_nodes: int, pack_edges: int
          ) -> tuple[np.ndarray, np.ndarray, list[Piece], list[Piece]]:
    """``(singletons, pairs, pieces, oversized)`` of a graph over ids ``0..m-1`` with
    canonical edges. 2-node components are pairs only without self-links (``self_w`` None):
    with them the optimum may keep the two apart, so they go to Infomap."""
    if len(u):
        graph = sp.csr_matrix((np.ones(len(u), np.int8), (u, v)), shape=(m, m))
        _, comp = connected_components(graph, directed=False)
        # renumber components by their smallest node
        _, first, comp = np.unique(comp, return_index=True, return_inverse=True)
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first)] = np.arange(len(first))
        comp = rank[comp.reshape(-1)]
    else:
        comp = np.arange(m, dtype=np.int64)
    n_comp = int(comp.max()) + 1 if m else 0
    size = np.bincount(comp, minlength=n_comp)
    edges = np.bincount(comp[u], minlength=n_comp)
    single = size == 1
    pair = (size == 2) & (self_w is None)
    big = ~single & ~pair & ((size > max_nodes) | (edges > max_edges))
    unit = ~single & ~pair & ~big
    singletons = np.flatnonzero(single[comp]).astype(np.int64)
    pair_nodes = np.flatnonzero(pair[comp])  # ascending: each pair's smaller id first
    pairs = pair_nodes[np.argsort(comp[pair_nodes], kind="stable")].reshape(-1, 2)

    # lay units (then oversized components) out contiguously, nodes ascending inside each
    unit_comps, big_comps = np.flatnonzero(unit), np.flatnonzero(big)
    n_units = len(unit_comps)
    slot = np.full(n_comp, -1, np.int64)
    slot[unit_comps] = np.arange(n_units)
    slot[big_comps] = n_units + np.arange(len(big_comps))
    node_slot = slot[comp]
    laid = np.flatnonzero(node_slot >= 0)
    laid = laid[np.argsort(node_slot[laid], kind="stable")].astype(np.int64)
    pos = np.zeros(m, np.int64)
    pos[laid] = np.arange(len(laid))
    edge_slot = node_slot[u]
    laid_edges = np.flatnonzero(edge_slot >= 0)
    laid_edges = laid_edges[np.argsort(edge_slot[laid_edges], kind="stable")]
    n_slots = n_units + len(big_comps)
    slot_nodes = size[np.r_[unit_comps, big_comps]].astype(np.int64)
    slot_edges = edges[np.r_[unit_comps, big_comps]].astype(np.int64)
    node_start = np.zeros(n_slots + 1, np.int64)
    np.cumsum(slot_nodes, out=node_start[1:])
    edge_start = np.zeros(n_slots + 1, np.int64)
    np.cumsum(slot_edges, out=edge_start[1:])

    def piece(a: int, b: int) -> Piece:  # slots a..b-1
        nodes = laid[node_start[a]:node_start[b]]
        idx = laid_edges[edge_start[a]:edge_start[b]]
        return Piece(
            nodes=nodes, unit_sizes=slot_nodes[a:b], unit_edges=slot_edges[a:b],
            src=(pos[u[idx]] - node_start[a]).astype(np.int32),
            dst=(pos[v[idx]] - node_start[a]).astype(np.int32),
            weight=w[idx], self_weight=None if self_w is None else self_w[nodes])

    # greedy packing: close a piece when the next unit would exceed a budget
    pieces, a = [], 0
    while a < n_units:
        b = min(np.searchsorted(node_start, node_start[a] + max_nodes, side="right"),
                np.searchsorted(edge_start, edge_start[a] + pack_edges, side="right")) - 1
        b = min(max(int(b), a + 1), n_units)
        pieces.append(piece(a, b))
        a = b
    oversized = [piece(s, s + 1) for s in range(n_units, n_slots)]
    return singletons, pairs, pieces, oversized


def connected_pieces(
    n: int, src, dst, weight, max_piece_edges: int = DEFAULT_MAX_PIECE_EDGES,
    max_piece_nodes: int = DEFAULT_MAX_PIECE_NODES, *, pack_edges: int | None = None,
) -> PiecePlan:
    """Split an undirected weighted graph (``src``, ``dst``, ``weight`` (e,) in any order,
    either direction, repeats allowed: the largest weight per pair is kept, self loops and
    zero weights dropped) into singletons, 2-node modules, pieces of whole components
    (closed at ``pack_edges`` edges, default ``max_piece_edges``, or ``max_piece_nodes``
    nodes) and oversized components. The plan depends only on the graph and the budgets,
    never on the number of workers."""
    _check_budgets(max_piece_edges, max_piece_nodes, pack_edges)
    u, v, w = _canonical_edges(n, src, dst, weight)
    pack = int(max_piece_edges if pack_edges is None else min(pack_edges, max_piece_edges))
    singles, pairs, pieces, over = _plan(int(n), u, v, w, None, int(max_piece_edges),
                                         int(max_piece_nodes), pack)
    return PiecePlan(int(n), int(max_piece_edges), int(max_piece_nodes), singles, pairs,
                     pieces, over)


# ---------------------------------------------------------------- Infomap


def _engine():
    """The SWIG class behind ``infomap.Infomap`` (same engine, same argument string; ~0.2 ms
    a call against ~1.1 ms through the Python facade, which matters for many small units),
    or None when this infomap version lays it out differently (then the facade is used)."""
    try:
        from infomap._swig import InfomapWrapper
    except ImportError:
        return None
    needed = ("addLinksFromNumpy2D", "run", "getNodeData")
    return InfomapWrapper if all(hasattr(InfomapWrapper, a) for a in needed) else None


_ENGINE: list = []  # [InfomapWrapper or None], resolved on first use


def _vector(values) -> np.ndarray:
    """A SWIG ``std::vector`` as int64, read by index. Not by iteration: SWIG modules share
    one iterator type, so once faiss (also SWIG) is imported, iterating Infomap's vectors
    dispatches to faiss's iterator class and crashes the process (seen in a job's driver
    after its kNN stage)."""
    count = len(values)
    get = values.__getitem__
    return np.fromiter((get(i) for i in range(count)), dtype=np.int64, count=count)


def _infomap_modules(m: int, links: np.ndarray, args: str) -> np.ndarray:
    """Module id per node ``0..m-1`` of one Infomap run on ``links (e, 3) float64``; a node
    absent from the links gets a module of its own."""
    global INFOMAP_CALLS
    if len(links) == 0:
        return np.arange(m, dtype=np.int64)
    INFOMAP_CALLS += 1
    if not _ENGINE:
        _ENGINE.append(_engine())
    engine = _ENGINE[0]
    if engine is not None:
        im = engine(args + " --silent")  # what infomap.Infomap(args) passes on
        im.addLinksFromNumpy2D(links, links.shape[0], 3, "f", 8)
        im.run("")
        data = im.getNodeData(1, False)
        node, module = _vector(data.node_id), _vector(data.module_id)
    else:
        from infomap import Infomap

        im = Infomap(args)
        im.add_links(links)
        modules = im.run().modules()
        node = np.fromiter(modules.keys(), dtype=np.int64, count=len(modules))
        module = np.fromiter(modules.values(), dtype=np.int64, count=len(modules))
    labels = np.arange(m, dtype=np.int64) + (int(module.max()) + 1 if len(module) else 0)
    labels[node] = module
    return labels


def run_piece(piece: Piece, seed: int = 0, trials: int = 1) -> np.ndarray:
    """Module labels ``(m,) int64`` of a piece: one Infomap call per unit (ids local to the
    unit, ascending global order), each node labelled with the piece-local index of its
    module's smallest member. A unit's labels do not depend on the rest of the piece."""
    args = infomap_args(seed, trials)
    labels = np.empty(piece.n_nodes, dtype=np.int64)
    node_at = np.r_[0, np.cumsum(piece.unit_sizes)]
    edge_at = np.r_[0, np.cumsum(piece.unit_edges)]
    for i in range(len(piece.unit_sizes)):
        a, b, e0, e1 = node_at[i], node_at[i + 1], edge_at[i], edge_at[i + 1]
        links = np.empty((e1 - e0, 3), dtype=np.float64)
        links[:, 0] = piece.src[e0:e1] - a
        links[:, 1] = piece.dst[e0:e1] - a
        links[:, 2] = piece.weight[e0:e1]
        if piece.self_weight is not None:
            sw = piece.self_weight[a:b]
            loops = np.flatnonzero(sw > 0)
            links = np.concatenate([links, np.column_stack([loops, loops, sw[loops]])])
        labels[a:b] = a + _smallest_member(_infomap_modules(int(b - a), links, args))
    return labels


# ---------------------------------------------------------------- oversized components


def _blocks(m: int, u: np.ndarray, v: np.ndarray, max_nodes: int, max_edges: int,
            coarse: np.ndarray | None = None) -> np.ndarray:
    """Block id per node: breadth-first order from node 0 (with ``coarse`` labels: their
    clusters one after another, in order of their first node in that order), cut into
    contiguous runs of at most ``max_nodes`` nodes and degree sum ``2 * max_edges`` (a single
    heavier node alone), at a cluster boundary unless one cluster alone is over that."""
    graph = sp.csr_matrix((np.ones(len(u), np.int8), (u, v)), shape=(m, m))
    order = breadth_first_order(graph, 0, directed=False, return_predecessors=False)
    if len(order) != m:
        raise AssertionError("an oversized component must be connected")
    if coarse is None:
        bounds = np.arange(m + 1)
    else:
        rank = np.empty(m, np.int64)
        rank[order] = np.arange(m)
        _, cl = np.unique(coarse, return_inverse=True)
        cl = cl.reshape(-1)
        first = np.full(int(cl.max()) + 1, m, np.int64)
        np.minimum.at(first, cl, rank)
        order = np.lexsort((rank, first[cl]))
        key = first[cl][order]
        bounds = np.r_[np.flatnonzero(np.r_[True, key[1:] != key[:-1]]), m]
    degree = np.bincount(u, minlength=m) + np.bincount(v, minlength=m)
    cum = np.r_[0, np.cumsum(degree[order])]
    block = np.empty(m, np.int64)
    a, b_id = 0, 0
    while a < m:
        b = min(a + max_nodes, int(np.searchsorted(cum, cum[a] + 2 * max_edges, "right")) - 1)
        snap = bounds[np.searchsorted(bounds, b, "right") - 1]  # last cluster start <= b
        b = snap if snap > a else b
        b = min(max(b, a + 1), m)
        block[order[a:b]] = b_id
        a, b_id = b, b_id + 1
    return block


def _contract(m: int, u: np.ndarray, v: np.ndarray, w: np.ndarray, self_w: np.ndarray,
              rep: np.ndarray) -> tuple[np.ndarray, int, tuple]:
    """``(super-node per node, s, super-graph (u, v, w, self_w))``: modules (equal ``rep``)
    become super-nodes numbered by smallest member; a super-node's self-link is its members'
    self-links plus twice its internal weight (so its flow is their total flow)."""
    _, sup = np.unique(_smallest_member(rep), return_inverse=True)
    sup = sup.reshape(-1).astype(np.int64)
    s = int(sup.max()) + 1
    su, sv = sup[u], sup[v]
    inside = su == sv
    loops = (np.bincount(sup, weights=self_w, minlength=s)
             + 2.0 * np.bincount(su[inside], weights=w[inside], minlength=s))
    out = ~inside
    a, b = np.minimum(su[out], sv[out]), np.maximum(su[out], sv[out])
    return sup, s, (*_merge_pairs(s, a, b, w[out], np.add), loops)


def _boundary_moves(m: int, u: np.ndarray, v: np.ndarray, w: np.ndarray, block: np.ndarray,
                    rep: np.ndarray) -> np.ndarray:
    """Block modules with their boundary fixed: a node with a cut edge joins the module (of
    any block) it has the most weight to when that beats its own module (ties: stay, then
    the smallest module). All nodes decide on the block results at once."""
    cut = block[u] != block[v]
    touch = np.zeros(m, bool)
    touch[u[cut]] = True
    touch[v[cut]] = True
    a, b, ww = np.r_[u, v], np.r_[v, u], np.r_[w, w]  # both directions
    keep = touch[a]
    node, mod, total = _merge_pairs(m, a[keep], rep[b[keep]], ww[keep], np.add)
    if len(node) == 0:
        return rep
    own = np.zeros(m)
    mine = mod == rep[node]
    own[node[mine]] = total[mine]
    # per node (entries sorted by node, then module): the heaviest module, the smallest on ties
    starts = np.flatnonzero(np.r_[True, node[1:] != node[:-1]])
    heaviest = np.maximum.reduceat(total, starts)
    count = np.diff(np.r_[starts, len(node)])
    top = np.flatnonzero(total == np.repeat(heaviest, count))
    best = top[np.r_[True, node[top][1:] != node[top][:-1]]]
    best = best[total[best] > own[node[best]]]
    rep = rep.copy()
    rep[node[best]] = mod[best]
    return rep


def _whole_piece(m: int, u, v, w, self_w) -> Piece:
    return Piece(np.arange(m, dtype=np.int64), np.array([m], np.int64),
                 np.array([len(u)], np.int64), u.astype(np.int32), v.astype(np.int32),
                 w, self_w)


class _Split:
    """One oversized component solved pass by pass, level by level (module docstring, steps
    1-4). Each level hands out independent pieces (:meth:`jobs`) and takes their labels back
    (:meth:`take`); ``final`` is then a label per component node."""

    def __init__(self, comp: Piece, max_edges: int, max_nodes: int, pack_edges: int,
                 passes: int):
        self.nodes = comp.nodes
        m = comp.n_nodes
        self.original = (m, comp.src.astype(np.int64), comp.dst.astype(np.int64), comp.weight,
                         comp.self_weight)
        self.budget = (max_edges, max_nodes, pack_edges)
        self.passes_left = passes - 1
        self.coarse: np.ndarray | None = None
        self.final: np.ndarray | None = None
        self._restart()

    def _restart(self) -> None:
        self.graph = self.original
        self.mapping = np.arange(self.original[0], dtype=np.int64)  # -> current-level node
        self.level = 0
        self.whole = False
        self.pending: tuple = ()
        self.block = np.empty(0, np.int64)

    def _finish(self, labels: np.ndarray) -> None:
        """The top level's labels: done, or the next pass with blocks of these modules."""
        if self.passes_left > 0:
            self.passes_left -= 1
            self.coarse = labels[self.mapping]
            self._restart()
        else:
            self.final = labels[self.mapping]

    def jobs(self) -> list[Piece]:
        m, u, v, w, self_w = self.graph
        max_edges, max_nodes, pack_edges = self.budget
        if m == 1:  # everything merged into one module
            self._finish(np.zeros(1, np.int64))
            return [] if self.final is not None else self.jobs()
        if self.whole or (m <= max_nodes and len(u) <= max_edges):
            self.whole = True
            return [_whole_piece(m, u, v, w, self_w)]
        coarse = self.coarse if self.level == 0 else None
        self.block = block = _blocks(m, u, v, max_nodes, max_edges, coarse)
        inside = block[u] == block[v]
        singles, pairs, pieces, over = _plan(m, u[inside], v[inside], w[inside], self_w,
                                             max_edges, max_nodes, pack_edges)
        assert not over, "a block is within the budget by construction"
        self.pending = (pairs, pieces)
        return pieces

    def take(self, results: Sequence[np.ndarray]) -> None:
        m, u, v, w, self_w = self.graph
        rep = np.arange(m, dtype=np.int64)
        if self.whole:
            self._finish(results[0])
            return
        pairs, pieces = self.pending
        rep[pairs[:, 1]] = pairs[:, 0]
        for piece, labels in zip(pieces, results, strict=True):
            rep[piece.nodes] = piece.nodes[labels]
        rep = _boundary_moves(m, u, v, w, self.block, rep)
        sup, s, (su, sv, sw, loops) = _contract(
            m, u, v, w, np.zeros(m) if self_w is None else self_w, rep)
        self.level += 1
        if s == m or self.level >= MAX_SPLIT_LEVELS:
            log.warning("map equation: an oversized component of %d nodes did not shrink "
                        "enough (%d -> %d super-nodes at level %d); running it whole, over "
                        "the piece budget", len(self.nodes), m, s, self.level)
            self.whole = True
        self.graph = (s, su, sv, sw, loops)
        self.mapping = sup[self.mapping]


# ---------------------------------------------------------------- running


_REMOTE: list = []


def _run_pieces(pieces: Sequence[Piece], seed: int, trials: int, workers: int | None
                ) -> list[np.ndarray]:
    """Labels of each piece: Ray tasks (1 CPU each, at most ``workers`` in flight) when
    ``workers > 1`` and Ray is initialized, else in this process. Same labels either way."""
    if not pieces:
        return []
    if workers is not None and workers > 1:
        import ray

        if ray.is_initialized():
            if not _REMOTE:
                _REMOTE.append(ray.remote(num_cpus=1)(run_piece))
            remote = _REMOTE[0]
            out: list = [None] * len(pieces)
            flying: dict = {}
            nxt = 0
            while nxt < len(pieces) or flying:
                while nxt < len(pieces) and len(flying) < workers:
                    flying[remote.remote(pieces[nxt], seed, trials)] = nxt
                    nxt += 1
                done, _ = ray.wait(list(flying), num_returns=1)
                for ref in done:
                    out[flying.pop(ref)] = ray.get(ref)
            return out
    return [run_piece(p, seed, trials) for p in pieces]


def map_equation_labels(
    n: int, src, dst, weight, *, seed: int = 0, trials: int = 1,
    max_piece_edges: int = DEFAULT_MAX_PIECE_EDGES,
    max_piece_nodes: int = DEFAULT_MAX_PIECE_NODES, pack_edges: int | None = None,
    split_passes: int = 3, workers: int | None = None,
) -> np.ndarray:
    """Two-level map-equation modules of an undirected weighted graph as dense labels
    ``(n,) int64`` numbered by smallest member. Pieces run as Ray tasks when ``workers > 1``
    and Ray is initialized, else in process; the labels are the same for any ``workers`` and
    ``pack_edges`` (exact per component within the budgets, approximate for oversized ones:
    module docstring)."""
    seed, trials = int(seed), int(trials)
    if seed < 0 or trials < 1:
        raise ValueError(f"seed {seed} must be >= 0 and trials {trials} >= 1")
    if int(split_passes) < 1:
        raise ValueError(f"split_passes {split_passes} must be >= 1")
    if workers is not None and int(workers) < 1:
        raise ValueError(f"workers {workers} must be >= 1 (or None: in process)")
    plan = connected_pieces(n, src, dst, weight, max_piece_edges, max_piece_nodes,
                            pack_edges=pack_edges)
    n = plan.n
    pack = int(max_piece_edges if pack_edges is None else min(pack_edges, max_piece_edges))
    label = np.arange(n, dtype=np.int64)  # any member of the node's module
    label[plan.pairs[:, 1]] = plan.pairs[:, 0]
    splits = [_Split(c, plan.max_piece_edges, plan.max_piece_nodes, pack, int(split_passes))
              for c in plan.oversized]
    batch: list[tuple[_Split | None, list[Piece]]] = [(None, plan.pieces)]
    batch += [(s, s.jobs()) for s in splits]  # an oversized component never ends here
    while batch:  # one round per super-graph level; all pieces of a round run in parallel
        results = _run_pieces([p for _, ps in batch for p in ps], seed, trials, workers)
        nxt, i = [], 0
        for owner, ps in batch:
            got, i = results[i:i + len(ps)], i + len(ps)
            if owner is None:
                for piece, labels in zip(ps, got, strict=True):
                    label[piece.nodes] = piece.nodes[labels]
                continue
            owner.take(got)
            if owner.final is None:
                jobs = owner.jobs()
                if owner.final is None:
                    nxt.append((owner, jobs))
        batch = nxt
    for s in splits:
        label[s.nodes] = s.nodes[_smallest_member(s.final)]
    # every label is a member's id; dense ids in order of each module's smallest member
    first = _smallest_member(label)
    _, dense = np.unique(first, return_inverse=True)
    return dense.reshape(-1).astype(np.int64)


# ---------------------------------------------------------------- memory


def piece_memory_bytes(nodes: int, edges: int) -> int:
    """Estimated peak memory of one worker for a piece of ``nodes`` / ``edges`` (undirected,
    as planned), on top of the worker's own baseline: the piece's arrays, the links handed
    to Infomap and Infomap's network and optimiser. Measured on this machine (see the
    constants); for the memory model and the ``--dry-run`` plan."""
    return int(_MEM_FIXED + _MEM_PER_NODE * nodes + _MEM_PER_EDGE * edges)


# Peak RSS of run_piece on one connected planted kNN-like unit (groups of 100, 10 % noise
# edges), ru_maxrss minus the RSS before the piece was loaded, infomap 2.16, one trial, this
# machine: 50K nodes / 239K edges 89 MB (1.1 s), 50K / 851K 152 MB, 200K / 956K 346 MB
# (5.2 s), 200K / 1.84M 461 MB (7.4 s), 200K / 3.40M 662 MB (8.3 s), 400K / 3.68M 919 MB
# (14.3 s). Least squares: -4.5 MB + 1141 B/node + 128 B/edge (within 6 %); rounded up
# here, so the estimate is 3-16 % above those runs. More trials keep one more partition.
_MEM_FIXED = 8 << 20
_MEM_PER_NODE = 1150
_MEM_PER_EDGE = 130
