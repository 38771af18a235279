"""``gcn-v``: learn-to-cluster's GCN-V vertex confidence, inferred over partitions with
halos, then linking to the nearest neighbour of higher confidence (cosine > tau).

The method (shape, params, inference) is here; its trainer is :mod:`.train`."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ltc_ray.cluster.base import (
    ClusterMethod,
    HaloPartition,
    LinkResult,
    PartitionInput,
    ScoreOutput,
    Shape,
    Tunable,
    lazy_module,
    register,
)
from ltc_ray.cluster.density_peak import link_to_nearest_higher
from ltc_ray.cluster.gcn_v.plan import inference_stage
from ltc_ray.cluster.shipped import ShippedNet
from ltc_ray.errors import InputError
from ltc_ray.params import COSINE, ROWS, Auto, Range, param
from ltc_ray.plan_model import PlanContext, PlanStage, default_link_stage

TAU_TUNABLE = Tunable("tau", 0.30, 0.95, 0.01)


@dataclass
class GCNVParams:
    """GCN-V: a trained model's confidence, then density-peak-style linking."""

    model: str = ""  # model directory written by jobs/train.py (required; --model URI)
    # link when cosine > tau; None = the tau tuned with the model; auto = a label-free rule
    # on this graph (graph/similarity_stats.py). alpha 0.64, not density-peak's 0.86: on the
    # domain-shift benchmark a model trained on ms1m-like scored 60.0 on low-sim with 0.64
    # (49.7 with its own tau; 50.5 with 0.86)
    tau: float | str | None = param(None, valid=COSINE, auto=Auto(0.64, "far:0.5", "r1:0.5"))
    # link on a new kNN of the GCN's own 512-d features (the paper's pass, threshold tau2);
    # off by default: on the synthetic benchmark it scores better on train, worse on test
    feature_pass: bool = False
    # threshold of the feature pass; None = tuned with the model
    tau2: float | None = param(None, valid=COSINE)
    # inference rows per forward pass inside a partition
    batch_rows: int = param(65536, valid=Range(1, ROWS))


def pick(configured, tuned, fallback):
    """A configured value wins, then the value tuned with the model, then the paper's."""
    return configured if configured is not None else tuned if tuned is not None else fallback


class GCNVInference:
    """GCN-V weights shipped to workers (the torch module is rebuilt there, once) and the
    halo inference every GCN-V-based method shares."""

    def __init__(self, net, in_dim: int, hidden: int):
        from ltc_ray.models.gcn_v import GCNV as Net  # torch: only once a model is loaded

        self.in_dim, self.hidden = in_dim, hidden
        self.shipped = ShippedNet(net, functools.partial(Net, in_dim, hidden))

    def net(self):
        return self.shipped.get()

    def infer(self, part: HaloPartition, batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Confidence ``(n,) float32`` and hidden features ``(n, hidden)`` of the owned rows."""
        from ltc_ray.models.gcn_v import aggregate, predict

        agg = aggregate(part.adj, part.x_cols)
        conf, hidden = predict(self.net(), part.x, agg, batch_rows=batch_rows,
                               device=part.device)
        return conf.astype(np.float32), hidden


@register
class GCNV(ClusterMethod):
    """Scores = the model's confidence for each node from ``[x_i ‖ (Â X)_i]``; needs the
    one-hop halo (neighbours' features and reverse edges), fetched by partition actors.

    ``tau`` defaults to the value tuned on the model's training split (carried in the
    model directory), so a model never depends on a test split's labels. With
    ``feature_pass`` the score stage also emits the hidden features, a second kNN is built
    over them and linking uses ``tau2`` on that graph.
    """

    name = "gcn-v"
    Params = GCNVParams
    trainer = lazy_module("ltc_ray.cluster.gcn_v.train")
    # the model (its content hash is part of every fingerprint) and what the actors emit
    shape = Shape(score="halo", uses_model=True, tunable=TAU_TUNABLE,
                  score_params=("model", "batch_rows", "feature_pass"))

    def compile_shape(self) -> Shape:
        if not self.params.feature_pass:
            return self.shape
        return Shape(score="halo", link_graph="node-features", node_features=True,
                     uses_model=True, tunable=Tunable("tau2", 0.30, 0.95, 0.01),
                     score_params=("model", "batch_rows", "feature_pass"))

    def load(self) -> None:
        if not self.params.model:
            raise InputError("--model", f"{self.name} needs a model trained by jobs/train.py")
        from ltc_ray.models.store import load_model

        model, meta = load_model(self.params.model, expected_k=self.k, method="gcn-v",
                                 storage_options=self.storage_options)
        self.meta = meta
        self.inference = GCNVInference(model, int(meta["in_dim"]), int(meta["hidden"]))

    @property
    def tau(self) -> float:
        return pick(self.params.tau, self.meta.get("thresholds", {}).get("tau"), 0.65)

    @property
    def tau2(self) -> float:
        return pick(self.params.tau2, self.meta.get("thresholds", {}).get("tau2"), 0.8)

    def check_inputs(self, dim: int, where: str) -> None:
        if dim != self.inference.in_dim:
            raise InputError(self.params.model, f"model was trained for dim "
                             f"{self.inference.in_dim}, the features ({where}) have {dim}")

    def score_halo(self, part: HaloPartition) -> ScoreOutput:
        """Confidence; with the feature pass also the hidden features the pipeline writes
        and builds the second kNN graph from."""
        conf, hidden = self.inference.infer(part, self.params.batch_rows)
        return ScoreOutput(conf, hidden if self.shape.node_features else None)

    def plan(self, ctx: PlanContext) -> list[PlanStage]:
        """Inference actors (:mod:`.plan`), then the shape's per-partition link."""
        return [inference_stage(self, ctx), default_link_stage(self, ctx)]

    def link(self, part: PartitionInput, scores: np.ndarray) -> LinkResult:
        """On the input graph (tau) or, in the feature pass, on the GCN-feature graph (tau2)."""
        return link_to_nearest_higher(part, scores,
                                      self.tau2 if self.params.feature_pass else self.tau)
