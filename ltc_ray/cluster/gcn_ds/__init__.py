"""``gcn-d`` and ``gcn-ds``: Yang et al., "Learning to Cluster Faces on an Affinity Graph"
(CVPR 2019). Super-vertex proposals at several settings (:mod:`.settings`,
:mod:`.proposals`), GCN-D scoring each proposal's IoU with its identity, for ``gcn-ds``
GCN-S dropping the members that do not belong, then de-overlap: each sample joins its
best-scored proposal that keeps it.

Shape: a score stage of its own (proposals + scoring on partition actors,
:mod:`.stage`) and a link stage of its own (de-overlap), so a new de-overlap setting
reuses the proposals and their scores. The trainer is :mod:`.train`, the memory model
:mod:`.plan`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from ltc_ray.cluster.base import (
    ClusterMethod,
    LinkStageContext,
    LinkStageOutput,
    RescoreContext,
    Shape,
    StageOutput,
    lazy_module,
    register,
)
from ltc_ray.cluster.gcn_ds.plan import plan_stages
from ltc_ray.cluster.gcn_ds.settings import (
    PRESETS,
    ProposalSetting,
    map_cuts,
    settings_from_meta,
)
from ltc_ray.cluster.shipped import ShippedNet
from ltc_ray.errors import InputError
from ltc_ray.io.fs import join_uri, uri_exists
from ltc_ray.params import AUTO, COSINE, SHARE, Auto, Range, param
from ltc_ray.plan_model import PlanContext, PlanStage

__all__ = ["GCND", "GCNDParams", "GCNDS", "GCNDSParams", "ProposalSetting"]

# the label-free anchors a model's cuts are placed between (graph.similarity_stats)
LOW_RULE = Auto(0.0, "far:0.5", "r1:0.5")
HIGH_RULE = Auto(1.0, "far:0.5", "r1:0.5")
SCORE_FIELDS = ("model", "proposals", "thresholds", "anchor_low", "anchor_high",
                "batch_size")


@dataclass
class GCNDParams:
    """GCN-D: a model directory from ``jobs/train.py --method gcn-d`` (or gcn-ds)."""

    model: str = ""  # model directory (required; --model URI)
    # proposal settings: the model's own (what it was trained on) or a learn-to-cluster preset
    proposals: str = param("model", choices=("model", *PRESETS))
    # the settings' cosine cuts: moved to this graph's anchors (relative) or as trained
    thresholds: str = param("relative", choices=("relative", "trained"))
    # auto: this graph's anchors (median far and rank-1 similarity) the cuts are placed on
    anchor_low: float | str = param(AUTO, valid=COSINE, auto=LOW_RULE)
    anchor_high: float | str = param(AUTO, valid=COSINE, auto=HIGH_RULE)
    # de-overlap: proposals scored below this are not used
    min_score: float = param(-1.0, valid=Range(-1e6, 1e6, what="a proposal score"))
    batch_size: int = param(64, valid=Range(1, 1 << 16))  # proposals per forward pass


@dataclass
class GCNDSParams(GCNDParams):
    """GCN-D + GCN-S: a model directory from ``jobs/train.py --method gcn-ds``."""

    # GCN-S runs on the proposals whose GCN-D score lies in [segment_low, segment_high]
    segment_low: float = param(0.1, valid=SHARE)
    segment_high: float = param(0.9, valid=SHARE)
    # de-overlap: a segmented proposal keeps a member whose GCN-S probability is above this
    keep_threshold: float = param(0.5, valid=Range(0.0, 1.0, high_open=True,
                                                   what="a probability"))


def _rebuild(cls, in_dim: int, dims: tuple, center: bool, structure: bool):
    """The empty net a worker fills with the shipped weights (with its input options)."""
    net = cls(in_dim, dims)
    net.center, net.structure = center, structure
    return net


def _shipped(model) -> ShippedNet:
    return ShippedNet(model, functools.partial(_rebuild, type(model), model.in_dim,
                                               tuple(model.dims), bool(model.center),
                                               bool(model.structure)))


def _net(uri: str, kind: str, expected_dim: int | None, so: dict | None):
    from ltc_ray.models.store import load_net

    return load_net(uri, kind, expected_dim=expected_dim, storage_options=so)


@register
class GCND(ClusterMethod):
    """``--model DIR`` from ``jobs/train.py --method gcn-d`` (a gcn-ds directory works too:
    its GCN-D is used). The proposal settings and their cuts come with the model; the cuts
    move to this graph's similarity anchors unless ``thresholds: trained``."""

    name = "gcn-d"
    Params = GCNDParams
    trainer = lazy_module("ltc_ray.cluster.gcn_ds.train")
    shape = Shape(score="stage", link="stage", uses_model=True,
                  score_params=SCORE_FIELDS)
    segments = False  # gcn-ds: GCN-S segments the uncertain proposals

    def _model_dir(self, sub: str) -> str:
        p = self.params
        if sub == "gcn-d" and uri_exists(join_uri(p.model, "model.json"),
                                         self.storage_options):
            return p.model
        return join_uri(p.model, sub)

    def load(self) -> None:
        p = self.params
        if not p.model:
            raise InputError("--model", f"{self.name} needs a model trained by jobs/train.py "
                                        f"--method {self.name}")

        d_uri = self._model_dir("gcn-d")
        from ltc_ray.models.gcn_ds import STRUCTURE_COLUMNS

        model, meta = _net(d_uri, "gcn-d", None, self.storage_options)
        self.meta = meta
        # the feature dim: the model's inputs less the member structure columns
        self.in_dim = int(meta["in_dim"]) - STRUCTURE_COLUMNS * bool(model.structure)
        self.settings = settings_from_meta(meta.get("proposals"), d_uri)
        self.d_net = _shipped(model)
        self.s_net = None
        if self.segments:
            s_model, _ = _net(join_uri(p.model, "gcn-s"), "gcn-s", model.in_dim + 1,
                              self.storage_options)
            self.s_net = _shipped(s_model)

    def check_inputs(self, dim: int, where: str) -> None:
        if dim != self.in_dim:
            raise InputError(self.params.model, f"model was trained for dim {self.in_dim}, "
                                                f"the features ({where}) have {dim}")

    # -- the settings this run uses
    def proposal_settings(self) -> list[ProposalSetting]:
        """The model's (or a preset's) settings, k capped at the graph's, cuts moved to
        this graph's anchors (``thresholds: relative`` with numeric anchors)."""
        p = self.params
        meta = getattr(self, "meta", {}) or {}
        settings = (PRESETS[p.proposals] if p.proposals != "model"
                    else getattr(self, "settings", PRESETS["8"]))
        settings = [dataclasses.replace(s, k=min(s.k, self.k)) for s in settings]
        anchors = meta.get("anchors") or {}
        trained = (anchors.get("low"), anchors.get("high"))
        current = (p.anchor_low, p.anchor_high)
        if p.thresholds == "trained" or not all(
                isinstance(v, int | float) for v in (*trained, *current)):
            return settings
        return map_cuts(settings, trained, current)

    def plan(self, ctx: PlanContext) -> list[PlanStage]:
        return plan_stages(self, ctx)

    # -- scoring (on partition actors)
    def score_proposals(self, offsets: np.ndarray, members: np.ndarray, feats_of, rows_of
                        ) -> tuple[np.ndarray, np.ndarray]:
        """``(score (P,), keep (M,))`` of proposals given as CSR: GCN-D's IoU estimate and,
        for gcn-ds, GCN-S's probability that a member belongs (1 where not segmented)."""
        from ltc_ray.models import gcn_ds as nets
        from ltc_ray.runtime import worker_device

        device = worker_device()
        adj_k = min(int(self.meta.get("adj_k", self.k)), self.k)
        scores = nets.score_proposals(self.d_net.get(), offsets, members, feats_of, rows_of,
                                      adj_k, self.params.batch_size, device)
        keep = np.ones(len(members), dtype=np.float32)
        if self.s_net is None or len(scores) == 0:
            return scores.astype(np.float32), keep
        p = self.params
        chosen = np.flatnonzero((scores >= p.segment_low) & (scores <= p.segment_high))
        if len(chosen):
            sizes = np.diff(offsets)[chosen]
            starts = offsets[chosen]
            take = np.repeat(starts - np.r_[0, np.cumsum(sizes)[:-1]], sizes) + \
                np.arange(sizes.sum())
            sub_offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
            keep[take] = nets.segment_proposals(self.s_net.get(), sub_offsets, members[take],
                                                feats_of, rows_of, adj_k, p.batch_size,
                                                device)
        return scores.astype(np.float32), keep

    def stage_scores(self, ctx: RescoreContext) -> StageOutput:
        import ray

        from ltc_ray.cluster.gcn_ds.stage import build_proposals, score_proposals, table_uri

        settings = self.proposal_settings()
        proposal_dir = join_uri(ctx.out_dir, "proposals")
        refs = build_proposals(ctx.features, ctx.graph, settings, ctx.ranges, ctx.knn_config,
                               ctx.tools.build_graph, proposal_dir)
        scores, keep, node_parts, stats = score_proposals(self, ctx.features, ctx.graph, refs,
                                                          ctx.ranges, ctx.cpus, ctx.gpus,
                                                          ctx.tools)
        artifacts = {table_uri(proposal_dir, i): None for i in range(len(settings))}
        saves = {}
        for i, (s, k) in enumerate(zip(scores, keep, strict=True)):
            for name, ref in ((f"scores-{i:02d}.npy", s), (f"keep-{i:02d}.npy", k)):
                uri = join_uri(ctx.out_dir, name)
                saves[uri] = ctx.tools.save_array(uri, ref)
        artifacts.update(zip(saves, ray.get(list(saves.values())), strict=True))
        meta = {"settings": [s.to_dict() for s in settings], "counts": refs.counts}
        stats.update(refs.stats)
        return StageOutput(node_parts, artifacts, meta, stats)

    # -- de-overlap
    def stage_links(self, ctx: LinkStageContext) -> LinkStageOutput:
        from ltc_ray.cluster.gcn_ds.stage import deoverlap_parents, load_proposals

        so, meta = ctx.storage_options, ctx.score_meta
        settings = settings_from_meta(meta.get("settings"), ctx.score_dir)
        refs = load_proposals(join_uri(ctx.score_dir, "proposals"), settings, meta["counts"],
                              so, ctx.score_digests)

        def load(name: str):
            uri = join_uri(ctx.score_dir, name)
            return ctx.tools.load_array(uri, ctx.score_digests.get(uri))

        scores = [load(f"scores-{i:02d}.npy") for i in range(len(settings))]
        keep = [load(f"keep-{i:02d}.npy") for i in range(len(settings))]
        p = self.params
        parents, edges, _ = deoverlap_parents(refs, scores, keep, ctx.graph.n_rows, ctx.ranges,
                                              getattr(p, "keep_threshold", 0.5), p.min_score)
        return LinkStageOutput(parents, edges, {"proposals": refs.total,
                                                "settings": len(settings)})


@register
class GCNDS(GCND):
    """``--model DIR`` from ``jobs/train.py --method gcn-ds`` (``gcn-d/`` and ``gcn-s/``):
    GCN-D scores, GCN-S segments the proposals scored between ``segment_low`` and
    ``segment_high``, and de-overlap keeps a member when GCN-S gives it more than
    ``keep_threshold``."""

    name = "gcn-ds"
    Params = GCNDSParams
    trainer = lazy_module("ltc_ray.cluster.gcn_ds.train_s")
    # which proposals GCN-S segments is part of the scores; keep_threshold is not
    shape = Shape(score="stage", link="stage", uses_model=True,
                  score_params=(*SCORE_FIELDS, "segment_low", "segment_high"))
    model_dirs = ("gcn-d/", "gcn-s/")
    segments = True
