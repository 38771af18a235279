"""``lgcn``: Wang et al., "Linkage-based Face Clustering via Graph Convolution Network"
(CVPR 2019), as learn-to-cluster re-implements it: a GCN over each pivot's instance
subgraph (its kNN row, the nearest neighbours of each, features minus the pivot's)
predicts which neighbours share the pivot's identity; the pooled pivot-neighbour
probabilities are clustered by the dynamic-threshold propagation (components of at
most ``max_size`` samples, the cut rising by ``(1 - th) * step`` until they fit).

Shape: a re-scoring stage of its own (:mod:`.stage`: pivot subgraphs on partition actors,
writing a graph whose weights are the probabilities), then a link stage of its own (the
propagation, over all partitions with the global merge machinery), so a new ``max_size``
or ``step`` reuses the probabilities. Its trainer is :mod:`.train`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltc_ray.cluster.base import (
    ClusterMethod,
    LinkStageContext,
    LinkStageOutput,
    RescoreContext,
    RescoreOutput,
    Shape,
    lazy_module,
    register,
)
from ltc_ray.cluster.lgcn.plan import plan_stages
from ltc_ray.cluster.shipped import load_trained_net
from ltc_ray.errors import InputError
from ltc_ray.params import ROWS, Range, param
from ltc_ray.plan_model import PlanContext, PlanStage

__all__ = ["LGCNMethod", "LGCNParams"]


@dataclass
class LGCNParams:
    """L-GCN: a model directory from ``jobs/train.py --method lgcn``."""

    model: str = ""  # model directory (required; --model URI)
    # the propagation: largest cluster, and how fast the cut rises (None: the model's)
    max_size: int | None = param(None, valid=Range(1, ROWS))
    step: float | None = param(None, valid=Range(0.0, 1.0, low_open=True, what="a step"))
    batch_size: int = param(32, valid=Range(1, 1 << 16))  # pivot subgraphs per forward pass
    # pivots per halo fetch on an actor (memory: their three-hop neighbourhood at once)
    chunk_rows: int = param(2048, valid=Range(1, ROWS))


@register
class LGCNMethod(ClusterMethod):
    """``--model DIR`` from ``jobs/train.py --method lgcn``; the subgraph shape (hop-1 and
    hop-2 sizes, links per node) comes with the model, and so do ``max_size`` and
    ``step`` unless given (learn-to-cluster: 300 and 0.6)."""

    name = "lgcn"
    Params = LGCNParams
    trainer = lazy_module("ltc_ray.cluster.lgcn.train")
    shape = Shape(score="rescore", link="stage", uses_model=True,
                  score_params=("model", "batch_size"))

    def load(self) -> None:
        p = self.params
        self.net, meta = load_trained_net(self.name, p.model, self.storage_options)
        self.meta = meta
        self.in_dim = int(meta["in_dim"])
        for key in ("hop1", "hop2", "active"):
            value = meta.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(p.model, f"invalid model.json: {key} must be a positive int")

    def check_inputs(self, dim: int, where: str) -> None:
        if dim != self.in_dim:
            raise InputError(self.params.model, f"model was trained for dim {self.in_dim}, "
                                                f"the features ({where}) have {dim}")

    def hops(self) -> tuple[int, int]:
        """(hop-1 size, hop-2 size) on this graph (hop 1 at most k - 1)."""
        meta = getattr(self, "meta", {}) or {}
        return min(int(meta.get("hop1", self.k - 1)), self.k - 1), int(meta.get("hop2", 10))

    def propagation(self) -> tuple[int, float]:
        """(max_size, step): the params, else what the model was tuned with, else the
        reference's 300 and 0.6."""
        tuned = (getattr(self, "meta", {}) or {}).get("thresholds", {})
        p = self.params
        return (int(p.max_size if p.max_size is not None else tuned.get("max_size", 300)),
                float(p.step if p.step is not None else tuned.get("step", 0.6)))

    def plan(self, ctx: PlanContext) -> list[PlanStage]:
        return plan_stages(self, ctx)

    def pivot_probabilities(self, pivots: np.ndarray, knn_rows: np.ndarray, feats_of,
                            rows_of) -> np.ndarray:
        """P(same identity) of each pivot's hop-1 neighbours ``(n, hop1)``."""
        from ltc_ray.models.lgcn import edge_probabilities
        from ltc_ray.runtime import worker_device

        hop1, hop2 = self.hops()
        return edge_probabilities(self.net.get(), pivots, knn_rows, feats_of, rows_of, hop1,
                                  hop2, int(self.meta.get("active", 10)),
                                  self.params.batch_size, worker_device())

    def rescore_graph(self, ctx: RescoreContext) -> RescoreOutput:
        from ltc_ray.cluster.lgcn.stage import score_pivots

        scores, graph, stats = score_pivots(self, ctx.features, ctx.graph, ctx.ranges,
                                            ctx.cpus, ctx.gpus, ctx.out_dir,
                                            self.params.chunk_rows, ctx.tools)
        return RescoreOutput(scores, graph, stats)

    def stage_links(self, ctx: LinkStageContext) -> LinkStageOutput:
        from ltc_ray.cluster.lgcn.stage import label_links

        max_size, step = self.propagation()
        parents, edges, stats = label_links(ctx.graph, ctx.ranges, max_size, step,
                                            ctx.storage_options)
        return LinkStageOutput(parents, edges, {**stats, "max_size": max_size, "step": step})
