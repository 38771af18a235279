"""``map-equation``: the map equation (two-level Infomap) over learned edge probabilities,
run per connected component in parallel (issue 20).

Why: every system at the top of the MS1M tables ends with Infomap over a refined graph
(FaceMap, B-Attention + Infomap, FC-ESER, the Sparse Differential Transformer), and plain
Infomap with one well-chosen cosine cut beats the project's density-peak methods on
face-like data. Here the edge model decides which edges Infomap sees and how much each
weighs:

1. the hard-clusters edge scorer (a transformer over each kNN row,
   :mod:`ltc_ray.models.edge_scorer`) gives every kNN edge p = P(same identity); rows are
   re-sorted by p (the re-scored graph, ``<work>/knn-rescored``), with hard-clusters'
   one-step NDDE density as the node score (it picks each cluster's representative);
2. p alone is a weak signal on unseen identities (AUC 0.83 on synthetic part1, no better
   than cosine), but the overlap of two nodes' p-distributions is strong (AUC 0.97): so
   each edge gets hard-clusters' TPDi, 1 - sum_c Q_ic Q_jc over common neighbours c with
   Q = sqrt(row-softmax(-(1 - p) / sigma)), computed on partition actors over the one-hop
   halo of re-scored rows;
3. each node keeps the edges the evidence supports: TPDi < ``tau`` among its first
   ``max_neighbours`` by p, weighted by the overlap 1 - TPDi;
4. the map equation clusters the kept edges per connected component in parallel pieces
   (:mod:`ltc_ray.cluster.map_equation_stage`); a node without a kept edge joins its most
   similar neighbour's cluster when their cosine clears the label-free attach cut
   (``cluster.attach_singletons`` auto is on for this method: the domain-shift benchmark's
   verdict), else stays a singleton.

``tau`` and ``max_neighbours`` are tuned out of fold by ``jobs/train.py --method
map-equation`` (:mod:`.train`) and carried by the model; a new cut reuses the edge scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltc_ray.cluster.base import (
    ClusterMethod,
    LinkStageContext,
    LinkStageOutput,
    Shape,
    lazy_module,
    register,
)
from ltc_ray.cluster.hard_clusters import EdgeScorerStage
from ltc_ray.cluster.hard_clusters.algorithm import tpdi
from ltc_ray.cluster.map_equation.plan import plan_stages
from ltc_ray.graph.map_equation import (
    DEFAULT_MAX_PIECE_EDGES,
    DEFAULT_MAX_PIECE_NODES,
    map_equation_labels,
)
from ltc_ray.params import NEIGHBOURS, POSITIVE, ROUNDS, SIGMA, Range, param
from ltc_ray.plan_model import PlanContext, PlanStage

__all__ = ["MapEquationMethod", "MapEquationParams", "kept_edges"]

DEFAULT_TAU = 0.7  # hard-clusters' paper value, when a model carries no tuned cut


@dataclass
class MapEquationParams:
    """map-equation: a model directory from ``jobs/train.py --method map-equation`` (edge
    scorer + the tuned keep rule), the map equation over the kept edges weighted by p."""

    model: str = ""  # edge scorer directory (required; --model URI)
    # keep an edge when its TPDi < tau; None = tuned with the model
    tau: float | None = param(None, valid=Range(0.0, 2.0, what="a TPDi distance threshold"))
    # keep at most this many edges per node (by p); None = tuned with the model
    max_neighbours: int | None = param(None, valid=Range(1, NEIGHBOURS))
    tpdi_sigma: float = param(0.05, valid=SIGMA)  # TPDi softmax temperature on 1 - p
    # anchors whose neighbours' rows a link actor fetches at once (memory: ~ chunk·k rows)
    chunk_rows: int = param(4096, valid=Range(1, 1 << 30))
    trials: int = param(1, valid=Range(1, 1000))  # Infomap trials (the best is kept)
    # a piece task's budget; a larger component is split (coarse blocks, then refined)
    max_piece_edges: int = param(DEFAULT_MAX_PIECE_EDGES, valid=Range(1, 1 << 40))
    max_piece_nodes: int = param(DEFAULT_MAX_PIECE_NODES, valid=Range(2, (1 << 31) - 1))
    split_passes: int = param(3, valid=Range(1, 100))  # passes over an oversized component
    # the node score (each cluster's representative): hard-clusters' NDDE density
    density: str = param("approximate", choices=("approximate", "iterative"))
    density_k: int = param(20, valid=Range(1, NEIGHBOURS))  # neighbours in the NDDE rows
    density_sigma: float = param(0.5, valid=SIGMA)  # NDDE softmax temperature on 1 - p
    damping: float = param(0.1, valid=Range(0.0, 1.0, high_open=True, what="a damping factor"))
    eps: float = param(0.05, valid=POSITIVE)  # iterative NDDE: stop when ||delta rho||_1 < eps
    max_iter: int = param(100, valid=Range(1, ROUNDS))  # iterative NDDE: iterations at most
    # anchors per edge-scorer forward pass (each pass is padded to it)
    batch_size: int = param(256, valid=Range(1, 1 << 16))
    # halo an edge actor fetches at once (features), else per chunk of rows (same result)
    halo_bytes: int = param(1 << 28, valid=Range(1, 1 << 50))


def kept_edges(node_ids: np.ndarray, ids: np.ndarray, dist: np.ndarray, tau: float,
               max_neighbours: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The keep rule on re-scored rows (sorted by p descending; self and padding anywhere)
    with their TPDi ``dist``: ``(src, dst, overlap 1 - TPDi float64)`` of each node's edges
    with TPDi < ``tau`` among its first ``max_neighbours`` other neighbours."""
    ids = np.asarray(ids, dtype=np.int64)
    other = (ids >= 0) & (ids != node_ids[:, None])
    rank = np.cumsum(other, axis=1)  # 1 for the first other neighbour
    keep = other & (rank <= max_neighbours) & (dist < tau) & (dist < 1.0)
    r, c = np.nonzero(keep)
    return node_ids[r], ids[r, c], 1.0 - dist[r, c].astype(np.float64)


@register
class MapEquationMethod(EdgeScorerStage, ClusterMethod):
    """``--model DIR`` is an edge scorer written by ``jobs/train.py --method map-equation``;
    ``tau`` and ``max_neighbours`` default to the values tuned with it out of fold.

    Shape: hard-clusters' re-scoring stage (edge scorer + NDDE density on actors, writing a
    re-sorted graph), then a link stage of its own: partition actors serving the re-scored
    rows compute TPDi and keep edges by the rule, and the map equation runs per connected
    component in parallel pieces. The keep rule's fields are not score params, so a new
    cut reuses the edge scores."""

    name = "map-equation"
    Params = MapEquationParams
    trainer = lazy_module("ltc_ray.cluster.map_equation.train")
    # singletons join their most similar neighbour's cluster by default (the label-free
    # attach step): on the domain-shift benchmark +1.1 (ms1m-like) and +8.5 (low-sim)
    # pairwise F, +0.02 at scale 0.05
    shape = Shape(score="rescore", link="stage", uses_model=True,
                  score_params=("model", "batch_size", "density", "density_k",
                                "density_sigma", "damping", "eps", "max_iter"),
                  attach_singletons=True)

    def load(self) -> None:
        self.load_scorer(self.name)

    def keep_rule(self) -> tuple[float, int]:
        """(tau, max_neighbours): the params, else what the model was tuned with."""
        tuned = (getattr(self, "meta", {}) or {}).get("thresholds", {})
        p = self.params
        cut = p.tau if p.tau is not None else tuned.get("tau", DEFAULT_TAU)
        top = p.max_neighbours if p.max_neighbours is not None else tuned.get(
            "max_neighbours", self.k - 1)
        return float(cut), int(top)

    def budget(self):
        """The seed, trials and piece budgets (a ``MapEquationBudget``)."""
        from ltc_ray.cluster.map_equation_stage import MapEquationBudget  # (Ray)

        return MapEquationBudget.of(self.params, self.seed)

    def plan(self, ctx: PlanContext) -> list[PlanStage]:
        return plan_stages(self, ctx)

    # -- the rescore stage: hard-clusters' EdgeScorerStage (edge actors)
    # -- link: TPDi and the keep rule on partition actors, then the map equation
    def stage_links(self, ctx: LinkStageContext) -> LinkStageOutput:
        from ltc_ray.cluster.map_equation.stage import map_equation_links

        tau, top = self.keep_rule()
        parents, edges, stats = map_equation_links(self, ctx, tau, top)
        return LinkStageOutput(parents, edges, {**stats, "tau": tau, "max_neighbours": top})

    def row_distances(self, ids: np.ndarray, prob: np.ndarray, rows_of) -> np.ndarray:
        """TPDi ``(n, k)`` of re-scored rows; ``rows_of`` serves any neighbour's row."""
        return tpdi(ids, prob, rows_of, self.params.tpdi_sigma)

    def cluster_rows(self, ids: np.ndarray, prob: np.ndarray) -> np.ndarray:
        """The same clusters in this process from a whole re-scored graph (training,
        tests): labels ``(N,)``."""
        tau, top = self.keep_rule()
        b = self.budget()
        dist = self.row_distances(ids, prob, lambda q: (ids[q], prob[q]))
        src, dst, w = kept_edges(np.arange(len(ids), dtype=np.int64), ids, dist, tau, top)
        return map_equation_labels(len(ids), src, dst, w, seed=b.seed, trials=b.trials,
                                   max_piece_edges=b.max_piece_edges,
                                   max_piece_nodes=b.max_piece_nodes,
                                   split_passes=b.split_passes)
