"""The map equation (two-level Infomap) over the kept edges of every partition, on Ray,
with no task holding more than its share of the graph (issue 20).

The algorithm and its exactness argument are in :mod:`ltc_ray.graph.map_equation`: no flow
crosses connected components, so each component is solved alone. Here the components and
their pieces are found and solved without any task holding every edge:

1. per partition, its kept edges ``(src, dst, weight)`` (the method's rule, a task each)
   become a star forest (:func:`~ltc_ray.cluster.components.spanning_forest`);
2. ONE task joins the forests (O(N) edges) into components; each node gets its component's
   smallest member;
3. per partition, the directed edge count of each component it touches;
4. ONE task lays the components out: singletons and 2-node components are settled there
   (a pair is one module, as in :func:`~ltc_ray.graph.map_equation.map_equation_labels`);
   the other components, in order of their smallest node, are packed into pieces of at most
   ``max_piece_edges`` directed edges and ``max_piece_nodes`` nodes; a component over either
   budget is a piece of its own, which its task splits (coarse blocks, boundary moves,
   super-graph refinement) with Ray tasks of its own;
5. per partition, its edges routed to their piece (one object per piece);
6. a task per piece gathers its edges from every partition and runs
   :func:`~ltc_ray.graph.map_equation.map_equation_labels` on them (node ids renumbered in
   ascending order, so every Infomap call sees what a single process would);
7. ONE task writes each node's module as its smallest member; per partition, ``parent``
   is that member (-1 for itself) and the merge edges are the stars to it.

Labels depend only on the kept edges, the seed, the trials and the budgets: never on the
number of partitions, pieces or workers. Memory per task (:func:`stage_memory`): a partition
task its kept edges; the two single tasks O(N) (``N·40`` bytes, no edges but the forests);
a piece task its edges (185 B per directed edge while it plans) plus Infomap's structures
(:func:`~ltc_ray.graph.map_equation.piece_memory_bytes`); an oversized component's task
holds that component's edges (about 60 bytes each) while its blocks run elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import ray

from ltc_ray.cluster.components import merge_edges, spanning_forest, stars_to_label
from ltc_ray.cluster.whole_graph import knn_edges
from ltc_ray.graph.knn_graph import read_knn_rows
from ltc_ray.graph.map_equation import (
    DEFAULT_MAX_PIECE_EDGES,
    DEFAULT_MAX_PIECE_NODES,
    map_equation_labels,
    piece_memory_bytes,
)
from ltc_ray.plan_model import Estimate, PlanStage
from ltc_ray.runtime import peak_rss_bytes, ray_get, wait_all

log = logging.getLogger("ltc_ray")

__all__ = ["MapEquationBudget", "cosine_edges", "map_equation_stage", "plan_stages",
           "stage_memory"]

# bytes per node of the two O(N) tasks: the forest (child, root int64) 16, component and
# smallest member int64 16, piece index int32 4, sizes/temporaries ~8 (measured below 40)
COMPONENT_BYTES_PER_NODE = 40
# bytes per kept directed edge in a partition task: int64 src/dst + float64 weight, the
# forest's sort and the routing's sort (one more copy)
PARTITION_BYTES_PER_EDGE = 56
# bytes per edge an oversized component's task holds while it contracts (graph.map_equation)
SPLIT_BYTES_PER_EDGE = 60
# bytes per gathered directed edge in a piece task before Infomap: the concatenated parts,
# local ids, the canonical (u < v) pairs and their sort, the components' layout. Measured
# at 584K rows (infomap, cosine 0.38): a piece of 9.99M directed edges and 142K nodes
# peaked at 3.01 GB, of which the worker baseline ~0.35 GB and Infomap's run ~0.8 GB
# (piece_memory_bytes) leave ~1.8 GB: 183 B per directed edge
PIECE_PLAN_BYTES_PER_EDGE = 185


@dataclass(frozen=True)
class MapEquationBudget:
    """Infomap's seed and trials and the per-task budgets of the pieces."""

    seed: int = 0
    trials: int = 1
    max_piece_edges: int = DEFAULT_MAX_PIECE_EDGES
    max_piece_nodes: int = DEFAULT_MAX_PIECE_NODES
    split_passes: int = 3

    @classmethod
    def of(cls, params, seed: int) -> MapEquationBudget:
        """From a method's params (``trials``, ``max_piece_edges``, ``max_piece_nodes``,
        ``split_passes``) and ``Config.seed``."""
        return cls(int(seed), int(params.trials), int(params.max_piece_edges),
                   int(params.max_piece_nodes), int(params.split_passes))


def stage_memory(n: int, kept_edges: int, partitions: int, budget: MapEquationBudget,
                 largest_component_edges: int | None = None) -> dict[str, dict[str, int]]:
    """Peak bytes per task kind (above the worker's baseline), by term: for ``n`` rows
    with ``kept_edges`` directed kept edges over ``partitions`` partitions. An oversized
    component's task holds its own edges (``largest_component_edges``, unknown before the
    run: None assumes every kept edge lies in one component, the worst case)."""
    per_part = -(-kept_edges // max(partitions, 1))
    piece_edges = min(budget.max_piece_edges, kept_edges)
    piece_nodes = min(budget.max_piece_nodes, n)
    largest = kept_edges if largest_component_edges is None else largest_component_edges
    return {
        "partition_task": {"kept edges, forest, routing": per_part * PARTITION_BYTES_PER_EDGE},
        "component_task": {"forests, components, layout": n * COMPONENT_BYTES_PER_NODE},
        "piece_task": {"piece edges (gathered, canonical, laid out)":
                           piece_edges * PIECE_PLAN_BYTES_PER_EDGE,
                       "Infomap (graph.map_equation.piece_memory_bytes)":
                           piece_memory_bytes(piece_nodes, piece_edges)},
        "oversized_task": {"one component's edges while it is split":
                           (largest // 2) * SPLIT_BYTES_PER_EDGE
                           if largest > budget.max_piece_edges else 0},
    }


# ---------------------------------------------------------------- tasks


@ray.remote(max_retries=3)
def cosine_edges(graph, lo: int, hi: int, so: dict | None, threshold: float) -> tuple:
    """A partition's kNN edges with cosine >= ``threshold`` (and > 0), weighted by cosine:
    the ``infomap`` baseline's kept edges."""
    ids, sims = read_knn_rows(graph, lo, hi, so)
    src, dst, sim = knn_edges(ids, sims, threshold)
    keep = sim > 0
    return src[keep] + lo, dst[keep], sim[keep].astype(np.float64)


@ray.remote(max_retries=3)
def _forest(edges: tuple, n: int) -> tuple:
    src, dst = edges[0], edges[1]
    return spanning_forest(np.asarray(src, np.int64), np.asarray(dst, np.int64), n)


@ray.remote(max_retries=3)
def _smallest_members(n: int, *forests) -> np.ndarray:
    """Per node, the smallest node of its component (over all kept edges) ``(n,) int64``."""
    cluster_id, _, first = merge_edges(n, list(forests))
    return first[cluster_id].astype(np.int64)


@ray.remote(max_retries=3)
def _component_edges(edges: tuple, smallest: np.ndarray) -> tuple:
    """``(component key, directed edges)`` of the components this partition's edges touch."""
    keys, counts = np.unique(smallest[np.asarray(edges[0], np.int64)], return_counts=True)
    return keys, counts.astype(np.int64)


@ray.remote(num_returns=2, max_retries=3)
def _lay_out(n: int, max_edges: int, max_nodes: int, smallest: np.ndarray, *counts):
    """``(piece of each node (n,) int32, -1 when settled here; layout stats)``."""
    size = np.bincount(smallest, minlength=n)
    edges = np.zeros(n, np.int64)
    for keys, c in counts:
        np.add.at(edges, keys, c)
    comps = np.flatnonzero(size >= 3)  # ascending smallest node: the packing order
    nodes_of, edges_of = size[comps].astype(np.int64), edges[comps]
    alone = (nodes_of > max_nodes) | (edges_of > max_edges)
    piece = np.empty(len(comps), np.int64)
    oversized: list[int] = []
    # greedy packing in order, closing a piece when the next unit would overflow it: a
    # loop over pieces (at most E / max_edges + N / max_nodes + oversized), not over nodes
    node_end = np.cumsum(nodes_of)
    edge_end = np.cumsum(edges_of)
    i, p, m = 0, 0, len(comps)
    while i < m:
        if alone[i]:
            piece[i] = p
            oversized.append(p)
            i, p = i + 1, p + 1
            continue
        base_n = node_end[i - 1] if i else 0
        base_e = edge_end[i - 1] if i else 0
        j = min(int(np.searchsorted(node_end, base_n + max_nodes, side="right")),
                int(np.searchsorted(edge_end, base_e + max_edges, side="right")))
        stop = np.flatnonzero(alone[i:j])
        j = max(i + 1, i + int(stop[0]) if len(stop) else j)
        piece[i:j] = p
        i, p = j, p + 1
    piece_of_comp = np.full(n, -1, np.int64)
    piece_of_comp[comps] = piece
    stats = {"components": int(np.count_nonzero(size)), "singletons": int(np.sum(size == 1)),
             "pairs": int(np.sum(size == 2)), "units": int(len(comps)), "pieces": int(p),
             "oversized": [int(o) for o in oversized],
             "largest_component": int(size.max(initial=0)),
             "largest_component_edges": int(edges.max(initial=0)),
             "peak_rss": peak_rss_bytes()}
    return piece_of_comp[smallest].astype(np.int32), stats


@ray.remote(max_retries=3)
def _route(edges: tuple, piece_of: np.ndarray, n_pieces: int):
    """This partition's edges grouped by piece, one ``(src, dst, weight)`` return per piece
    (``num_returns=n_pieces``: each piece task fetches only its own)."""
    src, dst, w = (np.asarray(a) for a in edges)
    piece = piece_of[src]
    keep = piece >= 0
    src, dst, w, piece = src[keep], dst[keep], w[keep], piece[keep]
    order = np.argsort(piece, kind="stable")
    bounds = np.searchsorted(piece[order], np.arange(n_pieces + 1))
    src, dst, w = src[order], dst[order], w[order]
    out = [(src[a:b], dst[a:b], w[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return out if n_pieces > 1 else out[0]


@ray.remote(num_returns=2, max_retries=3)
def _solve_piece(budget: MapEquationBudget, workers: int | None, *parts):
    """``((nodes, smallest member of each node's module) global ids, stats)`` of a piece."""
    src = np.concatenate([p[0] for p in parts]).astype(np.int64)
    dst = np.concatenate([p[1] for p in parts]).astype(np.int64)
    w = np.concatenate([p[2] for p in parts]).astype(np.float64)
    nodes = np.unique(np.concatenate([src, dst]))
    local = map_equation_labels(
        len(nodes), np.searchsorted(nodes, src), np.searchsorted(nodes, dst), w,
        seed=budget.seed, trials=budget.trials, max_piece_edges=budget.max_piece_edges,
        max_piece_nodes=budget.max_piece_nodes, split_passes=budget.split_passes,
        workers=workers)
    first = np.full(int(local.max(initial=-1)) + 1, len(nodes), np.int64)
    np.minimum.at(first, local, np.arange(len(nodes)))
    rep = nodes[first[local]]
    return (nodes, rep), {"nodes": int(len(nodes)), "edges": int(len(src)),
                          "peak_rss": peak_rss_bytes()}


@ray.remote(max_retries=3)
def _module_members(smallest: np.ndarray, *solved) -> np.ndarray:
    """Per node, the smallest member of its module ``(n,) int64``."""
    label = smallest.copy()
    for nodes, rep in solved:
        label[nodes] = rep
    return label


_parents = ray.remote(num_returns=2, max_retries=3)(stars_to_label)


def map_equation_stage(n: int, edge_refs: list, ranges: list[tuple[int, int]],
                       budget: MapEquationBudget, cpus: float) -> tuple[list, list, dict]:
    """(parent refs, merge-edge refs, stats) of the map equation over the kept edges
    ``edge_refs`` (a ref per partition to ``(src, dst, weight)`` global ids, either
    direction, weights > 0; repeats keep the largest weight)."""
    forests = [_forest.remote(e, n) for e in edge_refs]
    smallest = _smallest_members.remote(n, *forests)
    counts = [_component_edges.remote(e, smallest) for e in edge_refs]
    piece_of, layout_ref = _lay_out.remote(n, int(budget.max_piece_edges),
                                           int(budget.max_piece_nodes), smallest, *counts)
    layout = ray_get(layout_ref)
    n_pieces = layout["pieces"]
    oversized = set(layout["oversized"])
    solved, stat_refs = [], []
    if n_pieces:
        routed = [_route.options(num_returns=n_pieces).remote(e, piece_of, n_pieces)
                  for e in edge_refs]
        if n_pieces == 1:
            routed = [[r] for r in routed]
        workers = max(1, int(cpus))
        for j in range(n_pieces):
            parts = [r[j] for r in routed]
            result, stat = _solve_piece.remote(budget, workers if j in oversized else None,
                                               *parts)
            solved.append(result)
            stat_refs.append(stat)
    piece_stats = wait_all(stat_refs, "map equation", "piece") if stat_refs else []
    label = _module_members.remote(smallest, *solved)
    out = [_parents.remote(label, lo, hi) for lo, hi in ranges]
    rss = [layout["peak_rss"]] + [s["peak_rss"] for s in piece_stats]
    stats = {k: v for k, v in layout.items() if k != "peak_rss"}
    stats.update(piece_edges=max((s["edges"] for s in piece_stats), default=0),
                 piece_nodes=max((s["nodes"] for s in piece_stats), default=0),
                 map_equation_peak_rss_bytes=max(rss))
    log.info("map equation: %d components (%d singletons, %d pairs), %d pieces (%d "
             "oversized), largest component %d nodes", stats["components"],
             stats["singletons"], stats["pairs"], n_pieces, len(oversized),
             stats["largest_component"])
    return [o[0] for o in out], [o[1] for o in out], stats


def plan_stages(ctx, budget: MapEquationBudget, kept_edges: int, kept_how: str,
                edge_rule: str, edge_stage: PlanStage | None = None) -> list[PlanStage]:
    """The map equation's stages in a dry-run plan for ``kept_edges`` directed kept edges
    (``kept_how`` says where that count comes from) kept by ``edge_rule`` in a task per
    partition (or by the method's own ``edge_stage``); the worst case for an oversized
    component (all kept edges in one) is stated, since components are unknown before the
    run."""
    n, k, parts = ctx.n, ctx.k, ctx.partitions
    mem = stage_memory(n, kept_edges, parts, budget)
    n_part = ctx.rows_per_partition
    base = ctx.worker_baseline
    pieces = max(1, -(-kept_edges // budget.max_piece_edges), -(-n // budget.max_piece_nodes))
    stages = [
        edge_stage or PlanStage(
            "link: kept edges", f"a task per partition over its kNN rows: {edge_rule} "
            f"({kept_how})", "link_task", parts,
            Estimate(base, {"kNN rows": n_part * k * 8, **mem["partition_task"]}), n_part),
        PlanStage("map equation: components", "ONE task joining the partitions' forests "
                  "into components and laying them out in pieces (O(N), no edges)",
                  "component_task", 1, Estimate(base, mem["component_task"]), n),
        PlanStage("map equation: pieces", f"about {pieces} piece task(s) of at most "
                  f"{budget.max_piece_edges:,} edges / {budget.max_piece_nodes:,} nodes, "
                  "one Infomap call per component", "piece_task", pieces,
                  Estimate(base, mem["piece_task"]), min(n, budget.max_piece_nodes)),
    ]
    if mem["oversized_task"]["one component's edges while it is split"]:
        stages.append(PlanStage(
            "map equation: oversized component", "worst case, every kept edge in ONE "
            "component: its task holds the component's edges while its blocks run as piece "
            "tasks", "oversized_task", 1, Estimate(base, mem["oversized_task"]), n))
    return stages
