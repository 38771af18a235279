"""``hard-clusters``: Chen et al., "On Mitigating Hard Clusters for Face Clustering" (ECCV 2022).

The method lives here whole: the algorithm (:mod:`.algorithm`: NDDE density, TPDi
distance, linking), its own re-scoring stage on Ray actors (:mod:`.rescore`), its trainer
(:mod:`.train`) and its memory model (:mod:`.plan`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from ltc_ray.cluster.base import (
    ClusterMethod,
    LinkHaloPartition,
    LinkResult,
    PartitionInput,
    RescoreContext,
    RescoreOutput,
    Shape,
    lazy_module,
    register,
)
from ltc_ray.cluster.hard_clusters.algorithm import (
    L1_UNITS,
    TPDI_BLOCK,
    IncomingEdges,
    halo_chunk_rows,
    l1_units,
    link_by_tpdi,
    ndde_density,
    tpdi,
    tpdi_rows,
    transition_edges,
    transition_q,
)
from ltc_ray.cluster.hard_clusters.plan import plan_stages
from ltc_ray.cluster.shipped import ShippedNet
from ltc_ray.errors import InputError
from ltc_ray.params import NEIGHBOURS, POSITIVE, ROUNDS, SIGMA, Range, param
from ltc_ray.plan_model import PlanContext, PlanStage

__all__ = [
    "EdgeScorerStage",
    "L1_UNITS",
    "TPDI_BLOCK",
    "HardClusters",
    "HardClustersParams",
    "IncomingEdges",
    "halo_chunk_rows",
    "l1_units",
    "link_by_tpdi",
    "ndde_density",
    "tpdi",
    "tpdi_rows",
    "transition_edges",
    "transition_q",
]


@dataclass
class HardClustersParams:
    """hard-clusters (Chen et al. 2022): a model directory from ``jobs/train.py --method
    hard-clusters`` (edge scorer), NDDE density and TPDi-distance density-peak linking."""

    model: str = ""  # edge scorer directory (required; --model URI)
    # keep a parent edge when TPDi < tau; None = recorded with model
    tau: float | None = param(None, valid=Range(0.0, 2.0, what="a TPDi distance threshold"))
    # NDDE: approximate (one step) | iterative (diffusion)
    density: str = param("approximate", choices=("approximate", "iterative"))
    # neighbours in the NDDE transition rows (self included)
    density_k: int = param(20, valid=Range(1, NEIGHBOURS))
    density_sigma: float = param(0.5, valid=SIGMA)  # NDDE softmax temperature on d' = 1 - p
    # iterative NDDE: rho <- d rho + (1 - d) P^T rho
    damping: float = param(0.1, valid=Range(0.0, 1.0, high_open=True, what="a damping factor"))
    eps: float = param(0.05, valid=POSITIVE)  # iterative NDDE: stop when ||delta rho||_1 < eps
    max_iter: int = param(100, valid=Range(1, ROUNDS))  # iterative NDDE: iterations at most
    tpdi_sigma: float = param(0.05, valid=SIGMA)  # TPDi softmax temperature on d'
    # anchors per edge-scorer forward pass (each pass is padded to it)
    batch_size: int = param(256, valid=Range(1, 1 << 16))
    # halo an edge or link actor fetches at once (features; re-scored rows); a larger halo
    # (rows in random order at scale: the whole corpus) is fetched per chunk of rows
    # instead, with more requests and the same results
    halo_bytes: int = param(1 << 28, valid=Range(1, 1 << 50))


class EdgeScorerStage:
    """The re-scoring stage hard-clusters and map-equation share: the edge scorer of a model
    directory written for ``kind`` on edge actors (:mod:`.rescore`), rows re-sorted by p,
    NDDE density as the node score. The host class has ``params`` with ``model``,
    ``batch_size``, ``halo_bytes`` and the NDDE fields."""

    def compile_shape(self) -> Shape:
        return dataclasses.replace(type(self).shape, halo_bytes=self.params.halo_bytes)

    def load_scorer(self, kind: str) -> dict:
        """Read the edge scorer (refused unless written for ``kind``); returns model.json."""
        if not self.params.model:
            raise InputError("--model", f"{kind} needs a model trained by jobs/train.py "
                                        f"--method {kind}")
        from ltc_ray.models.edge_scorer import EdgeScorer  # torch: only with a model
        from ltc_ray.models.store import load_edge_scorer

        model, meta = load_edge_scorer(self.params.model, expected_k=self.k,
                                       storage_options=self.storage_options, method=kind)
        self.meta = meta
        self.scorer_shape = model.shape
        self.scorer = ShippedNet(model, functools.partial(EdgeScorer, model.shape))
        return meta

    def check_inputs(self, dim: int, where: str) -> None:
        if dim != self.scorer_shape.in_dim:
            raise InputError(self.params.model, f"model was trained for dim "
                             f"{self.scorer_shape.in_dim}, the features ({where}) have {dim}")

    def rescore_graph(self, ctx: RescoreContext) -> RescoreOutput:
        from ltc_ray.cluster.hard_clusters.rescore import rescore_and_density  # (Ray)

        scores, graph, stats = rescore_and_density(self, ctx.features, ctx.graph, ctx.ranges,
                                                   ctx.cpus, ctx.out_dir, ctx.gpus)
        return RescoreOutput(scores, graph, stats)

    def rescore_rows(self, knn_ids: np.ndarray, feats_of,
                     device: str) -> tuple[np.ndarray, np.ndarray]:
        """The owned rows re-sorted by d' = 1 - p: ``(ids, p)``."""
        from ltc_ray.models.edge_scorer import edge_probabilities, resort_rows

        prob = edge_probabilities(self.scorer.get(), knn_ids, feats_of, self.params.batch_size,
                                  device)
        return resort_rows(knn_ids, prob)

    def transition_edges(self, node_ids: np.ndarray, knn_ids: np.ndarray,
                         prob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = self.params
        return transition_edges(node_ids, knn_ids, prob, p.density_k, p.density_sigma,
                                self_loops=p.density == "approximate")


@register
class HardClusters(EdgeScorerStage, ClusterMethod):
    """``--model DIR`` is an edge scorer written by ``jobs/train.py --method hard-clusters``;
    tau defaults to the value recorded with the model (the paper's 0.7 unless tuned).

    Shape: a re-scoring stage of its own (edge scorer + NDDE density on actors, writing a
    re-sorted graph), then TPDi linking on that graph with a halo of the neighbours' rows
    (no features). tau is tuned by ``jobs/train.py`` on out-of-fold edge scores (an
    in-sample search with the final scorer, what ``jobs/tune.py`` would do, picks a tau that
    does not transfer), so the shape declares nothing tunable."""

    name = "hard-clusters"
    Params = HardClustersParams
    trainer = lazy_module("ltc_ray.cluster.hard_clusters.train")
    shape = Shape(score="rescore", link="halo", uses_model=True,
                  score_params=("model", "batch_size", "density", "density_k",
                                "density_sigma", "damping", "eps", "max_iter"))

    def load(self) -> None:
        tuned = self.load_scorer(self.name).get("thresholds", {})
        self.tau = float(self.params.tau if self.params.tau is not None
                         else tuned.get("tau", 0.7))

    def plan(self, ctx: PlanContext) -> list[PlanStage]:
        """Edge actors and TPDi link actors with their own memory model (:mod:`.plan`)."""
        return plan_stages(self, ctx)

    # -- the rescore stage: EdgeScorerStage (edge actors, :mod:`.rescore`)
    # -- link (per partition, TPDi over the one-hop halo of re-scored rows)
    def link_halo(self, part: LinkHaloPartition, scores: np.ndarray,
                  context: None = None) -> LinkResult:
        node_ids = np.arange(part.start, part.stop, dtype=np.int64)
        dist = tpdi(part.knn_ids, part.knn_sims, part.rows_of, self.params.tpdi_sigma)
        return link_by_tpdi(node_ids, part.knn_ids, dist, scores, self.tau)

    def link_whole(self, part: PartitionInput, scores: np.ndarray) -> LinkResult:
        """A whole re-scored graph in one piece (tests, training): its rows are their own
        halo."""
        ids, sims = part.knn_ids, part.knn_sims

        def rows_of(query):
            return ids[query - part.start], sims[query - part.start]

        return self.link_halo(LinkHaloPartition(part.start, part.stop, ids, sims, None,
                                                rows_of), scores)
