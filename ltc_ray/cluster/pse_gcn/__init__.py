"""``pse-gcn``: Li et al., "Progressive structure enhancement GCN for face clustering"
(EAAI 2024), redesigned to run at scale.

Shape: a re-scoring stage of its own (:mod:`.stage`, on partition actors): the input kNN
graph is re-ranked by k-reciprocal Jaccard similarity (:mod:`ltc_ray.graph.rerank`,
sparse array code over a two-hop halo; written as the re-scored graph, exportable like any
other), then every node's subgraph on the re-ranked graph goes through the DGC blocks
(:mod:`ltc_ray.models.pse_gcn`) and its centre's 512-d embedding is written as node
features. The pipeline builds a second sharded kNN over those embeddings; the link step
(:mod:`.link`) links each node to its first more-confident neighbour when the cosine is at
least ``tau``, with the neighbours' rows fetched from their owners. ``tau`` is tuned out of
fold by the trainer (:mod:`.train`) and carried by the model; a new ``tau`` reuses the
embeddings and their graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltc_ray.cluster.base import (
    ClusterMethod,
    LinkHaloPartition,
    LinkResult,
    RescoreContext,
    RescoreOutput,
    Shape,
    lazy_module,
    register,
)
from ltc_ray.cluster.pse_gcn.link import confidence, peak_links
from ltc_ray.cluster.pse_gcn.plan import plan_stages
from ltc_ray.cluster.shipped import load_trained_net
from ltc_ray.errors import InputError
from ltc_ray.params import ROWS, Range, param
from ltc_ray.plan_model import PlanContext, PlanStage

__all__ = ["PSEGCNMethod", "PSEGCNParams", "REFERENCE_TAU"]

REFERENCE_TAU = 0.87  # the reference's tau0 (``clustering.py``), when a model has none
# the reference's re-ranking and subgraph shapes (a model records its own)
RERANK = {"k1": 80, "k2": 40, "expand": 10, "top": 80}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class PSEGCNParams:
    """PSE-GCN: a model directory from ``jobs/train.py --method pse-gcn``."""

    model: str = ""  # model directory (required; --model URI)
    # keep a node's link to its first more-confident neighbour when cos >= tau
    # (None: the value tuned out of fold with the model)
    tau: float | None = param(None, valid=Range(-1.0, 1.0, what="a cosine threshold"))
    batch_size: int = param(32, valid=Range(1, 1 << 16))  # subgraphs per forward pass
    # rows per halo fetch on an actor (memory: their two-hop neighbourhood at once)
    chunk_rows: int = param(1024, valid=Range(1, ROWS))


@register
class PSEGCNMethod(ClusterMethod):
    """``--model DIR`` from ``jobs/train.py --method pse-gcn``; the re-ranking, subgraph
    shape and ``tau`` come with the model."""

    name = "pse-gcn"
    Params = PSEGCNParams
    trainer = lazy_module("ltc_ray.cluster.pse_gcn.train")
    shape = Shape(score="rescore", node_features=True, link="halo",
                  link_graph="node-features", uses_model=True, score_params=("model",))

    def load(self) -> None:
        p = self.params
        self.net, meta = load_trained_net(self.name, p.model, self.storage_options)
        self.meta = meta
        self.in_dim = int(meta["in_dim"])
        for key in ("hop1", "hop2", "local_k"):
            if not _positive_int(meta.get(key)):
                raise InputError(p.model, f"invalid model.json: {key} must be a positive int")
        rerank = meta.get("rerank", {})
        if not isinstance(rerank, dict) or set(rerank) - set(RERANK) or not all(
                _positive_int(v) for v in rerank.values()):
            raise InputError(p.model, "invalid model.json: rerank must map k1, k2, expand, "
                                      "top to positive ints")
        tau = (meta.get("thresholds") or {}).get("tau", REFERENCE_TAU)
        if not isinstance(tau, int | float) or not -1.0 <= float(tau) <= 1.0:
            raise InputError(p.model, f"invalid model.json: thresholds.tau must be a cosine "
                                      f"in [-1, 1], got {tau}")

    def check_inputs(self, dim: int, where: str) -> None:
        if dim != self.in_dim:
            raise InputError(self.params.model, f"model was trained for dim {self.in_dim}, "
                                                f"the features ({where}) have {dim}")

    # -- what the model carries, fitted to this graph's k
    def rerank_shape(self) -> dict[str, int]:
        """k1, k2, expand and top of the re-ranking on a graph of ``self.k`` columns."""
        meta = getattr(self, "meta", {}) or {}
        shape = {**RERANK, **meta.get("rerank", {})}
        k1 = min(int(shape["k1"]), self.k)
        return {"k1": k1, "k2": max(1, min(int(shape["k2"]), k1)),
                "expand": min(int(shape["expand"]), self.k), "top": int(shape["top"])}

    def subgraph_shape(self) -> tuple[int, int, int]:
        """(hop1, hop2, local_k) of the subgraphs on this graph."""
        meta = getattr(self, "meta", {}) or {}
        top = self.rerank_shape()["top"]
        return (min(int(meta.get("hop1", 79)), top - 1), min(int(meta.get("hop2", 10)), top - 1),
                min(int(meta.get("local_k", 10)), self.k))

    def tau(self) -> float:
        """The params' tau, else the one tuned with the model, else the reference's."""
        if self.params.tau is not None:
            return float(self.params.tau)
        tuned = (getattr(self, "meta", {}) or {}).get("thresholds", {})
        return float(tuned.get("tau", REFERENCE_TAU))

    def plan(self, ctx: PlanContext) -> list[PlanStage]:
        return plan_stages(self, ctx)

    def embed(self, centres: np.ndarray, feats_of, rows_of, rerank_of) -> np.ndarray:
        """The centres' embeddings ``(n, O) float32`` (no grad, float32, the actor's
        device)."""
        from ltc_ray.models.pse_gcn import embed_nodes
        from ltc_ray.runtime import worker_device

        hop1, hop2, local_k = self.subgraph_shape()
        return embed_nodes(self.net.get(), centres, feats_of, rows_of, rerank_of, hop1, hop2,
                           local_k=local_k, batch_size=self.params.batch_size,
                           device=worker_device())

    # -- the rescore stage (:mod:`.stage`)
    def rescore_graph(self, ctx: RescoreContext) -> RescoreOutput:
        from ltc_ray.cluster.pse_gcn.stage import rerank_and_embed

        return rerank_and_embed(self, ctx)

    # -- link (per partition, the neighbours' rows of the embedding graph fetched)
    def link_halo(self, part: LinkHaloPartition, scores: np.ndarray,
                  context: None = None) -> LinkResult:
        node_ids = np.arange(part.start, part.stop, dtype=np.int64)
        ids = part.knn_ids.astype(np.int64)
        valid = ids >= 0
        uniq = np.unique(ids[valid])
        conf_of = confidence(part.rows_of(uniq)[1])
        nbr_conf = np.where(valid, conf_of[np.searchsorted(uniq, np.where(valid, ids, uniq[0]))],
                            -np.inf)
        return peak_links(node_ids, ids, part.knn_sims, confidence(part.knn_sims), nbr_conf,
                          self.tau())
