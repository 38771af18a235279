"""``gcn-ve``: GCN-V confidence, then GCN-E connectivity: on a k = 160 graph of the input
features, the top-rho most confident nodes choose their parent among their higher-
confidence neighbours with cosine > tau, by a GCN over that candidate subgraph whose node
inputs are the GCN-V features; the rest link to the nearest such neighbour (GCN-V's rule).

The method is here; its trainer is :mod:`.train`."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from ltc_ray.cluster.base import (
    ClusterMethod,
    HaloPartition,
    LinkHaloPartition,
    LinkResult,
    ScoreOutput,
    Shape,
    Tunable,
    lazy_module,
    register,
)
from ltc_ray.cluster.gcn_v import GCNVInference, pick
from ltc_ray.cluster.gcn_v.plan import hidden_width, inference_stage
from ltc_ray.cluster.gcn_ve.links import EDGE_K, gcn_e_links
from ltc_ray.cluster.shipped import ShippedNet
from ltc_ray.errors import InputError
from ltc_ray.io.fs import join_uri
from ltc_ray.params import COSINE, ROWS, SHARE, Range, param
from ltc_ray.plan_model import PlanContext, PlanStage, halo_link_stage, rate_key


@dataclass
class GCNVEParams:
    """GCN-V + GCN-E: a model directory from ``jobs/train.py --method gcn-ve``."""

    model: str = ""  # directory holding gcn-v/ and gcn-e/ (required; --model URI)
    # share of most confident nodes that use GCN-E; None = trained
    rho: float | None = param(None, valid=SHARE)
    # keep a parent edge when cosine (of the k = 160 input graph) > tau; None = trained
    tau: float | None = param(None, valid=COSINE)
    batch_rows: int = param(65536, valid=Range(1, ROWS))  # GCN-V rows per forward pass
    batch_size: int = param(256, valid=Range(1, 1 << 16))  # GCN-E subgraphs per pass


@register
class GCNVE(ClusterMethod):
    """``--model DIR`` holds ``gcn-v/`` and ``gcn-e/`` (both written by
    ``jobs/train.py --method gcn-ve``); rho and tau default to the values the GCN-E was
    tuned with on the training split.

    Candidates and edge pruning use a k = 160 graph of the INPUT features, with GCN-V's
    tau; the GCN-V features are only the nodes' inputs. The reference builds that graph on
    the GCN-V features, whose cosines fit the training identities (a tau tuned on train
    collapsed recall on test: 43 vs 67 pairwise F at scale 0.02)."""

    name = "gcn-ve"
    Params = GCNVEParams
    trainer = lazy_module("ltc_ray.cluster.gcn_ve.train")
    model_dirs = ("gcn-v/", "gcn-e/")
    # link_k is the GCN-E model's own k, set when the model is loaded
    shape = Shape(score="halo", node_features=True, link="halo", link_graph="input",
                  link_halo_features=True, link_reduce=True, uses_model=True,
                  tunable=Tunable("tau", 0.30, 0.95, 0.01),
                  score_params=("model", "batch_rows"))

    def load(self) -> None:
        p = self.params
        if not p.model:
            raise InputError("--model", "gcn-ve needs a model trained by jobs/train.py")
        from ltc_ray.models.gcn_e import GCNE  # torch: only when a model is loaded
        from ltc_ray.models.store import load_gcn_e, load_model

        v_model, v_meta = load_model(join_uri(p.model, "gcn-v"), expected_k=self.k,
                                     method="gcn-v", storage_options=self.storage_options)
        self.inference = GCNVInference(v_model, int(v_meta["in_dim"]), int(v_meta["hidden"]))
        edge_model, edge_meta = load_gcn_e(join_uri(p.model, "gcn-e"),
                                           expected_dim=self.inference.hidden,
                                           storage_options=self.storage_options)
        self.meta, self.edge_meta = v_meta, edge_meta
        self.edge_net = ShippedNet(edge_model, functools.partial(
            GCNE, self.inference.hidden, list(edge_meta["dims"])))
        v_tau = pick(None, v_meta.get("thresholds", {}).get("tau"), 0.65)
        self.rho = float(pick(p.rho, edge_meta.get("rho"), 0.2))
        self.tau = float(pick(p.tau, edge_meta.get("thresholds", {}).get("tau"), v_tau))
        self.shape = dataclasses.replace(self.shape, link_k=int(edge_meta["k"]))

    def check_inputs(self, dim: int, where: str) -> None:
        if dim != self.inference.in_dim:
            raise InputError(self.params.model, f"model was trained for dim "
                             f"{self.inference.in_dim}, the features ({where}) have {dim}")

    def plan(self, ctx: PlanContext) -> list[PlanStage]:
        """GCN-V inference actors, then GCN-E link actors on the k = 160 input graph
        serving the neighbours' rows and GCN-V features (defaults when not loaded)."""
        return [inference_stage(self, ctx),
                halo_link_stage(ctx, self.shape.link_k or EDGE_K, hidden_width(self),
                                rate_key(self, "link"), name="link (GCN-E, halo actors)")]

    def score_halo(self, part: HaloPartition) -> ScoreOutput:
        conf, hidden = self.inference.infer(part, self.params.batch_rows)
        return ScoreOutput(conf, hidden)

    def link_context(self, scores: np.ndarray) -> float:
        """The confidence at or above which a node chooses its parent with GCN-E."""
        from ltc_ray.models.gcn_e import confidence_quantile

        return confidence_quantile(scores, self.rho)

    def link_halo(self, part: LinkHaloPartition, scores: np.ndarray,
                  threshold: float) -> LinkResult:
        return gcn_e_links(self.edge_net.get(), part, scores, threshold, self.tau,
                           self.params.batch_size)
