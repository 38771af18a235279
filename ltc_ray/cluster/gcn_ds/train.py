"""GCN-D's trainer (``jobs/train.py --method gcn-d``; :mod:`.train_s` adds GCN-S for
``gcn-ds``): the whole labelled split in one worker, proposals at the chosen settings
(:func:`~ltc_ray.cluster.gcn_ds.proposals.generate_proposals`, the definition the job's
distributed stage equals), GCN-D regressing each proposal's IoU with its identity, the
settings and the graph's similarity anchors written into the model directory."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import ray

from ltc_ray.cluster.gcn_ds import HIGH_RULE, LOW_RULE
from ltc_ray.cluster.gcn_ds.proposals import ProposalTable, deoverlap, generate_proposals
from ltc_ray.cluster.gcn_ds.settings import PRESETS
from ltc_ray.cluster.training import TrainContext, load_split
from ltc_ray.errors import InputError
from ltc_ray.graph.knn_graph import KnnManifest
from ltc_ray.graph.similarity_stats import derive, graph_stats
from ltc_ray.io.features import FeatureInfo
from ltc_ray.io.fs import join_uri
from ltc_ray.metrics import evaluate
from ltc_ray.runtime import peak_rss_bytes, ray_get

log = logging.getLogger("ltc_ray")
DEFAULT_PRESET = "8"
# GCN-D/GCN-S optimiser steps when --epochs is not given: about 30 epochs of a scale-0.05
# split's ~2.8K proposals (held-out IoU correlation 0.73 after 10 epochs, 0.80 after 30),
# and at least one epoch of a large split's
STEP_BUDGET = 1500
MAX_AUTO_EPOCHS = 40
SEGMENTS = False  # train_s: GCN-S too


def train_config(options: dict, seed: int, segments: bool = SEGMENTS):
    """(GCN-D's config, GCN-S's config or None, the proposal preset) from the flags."""
    from ltc_ray.models.train_ds import TrainDConfig, TrainSConfig

    # lr 1e-3 without dropout: held-out IoU correlation 0.80 and pairwise F 70.99 at scale
    # 0.05 after 30 epochs, against 0.80 / 70.40 at 3e-3 (README, "gcn-d / gcn-ds")
    d_cfg = TrainDConfig(seed=seed, lr=1e-3, dropout=0.0)
    s_cfg = TrainSConfig(seed=seed, lr=1e-3, dropout=0.0) if segments else None
    auto_epochs = options.get("epochs") is None
    for flag, attr in (("epochs", "epochs"), ("lr", "lr"), ("batch_rows", "batch_size")):
        value = options.get(flag)
        if value is not None:
            if value <= 0:
                raise InputError(f"--{flag.replace('_', '-')}", f"must be positive, got {value}")
            for cfg in (d_cfg, s_cfg):
                if cfg is not None:
                    setattr(cfg, attr, value)
    hidden = options.get("hidden")
    if hidden is not None:
        if hidden <= 0:
            raise InputError("--hidden", f"must be positive, got {hidden}")
        for cfg in (d_cfg, s_cfg):
            if cfg is not None:
                cfg.dims = (int(hidden), cfg.dims[-1])
    preset = options.get("proposals") or DEFAULT_PRESET
    if preset not in PRESETS:
        raise InputError("--proposals", f"choose one of {', '.join(PRESETS)}, got {preset!r}")
    if auto_epochs:  # set from the proposal count once it is known (auto_epochs)
        for cfg in (d_cfg, s_cfg):
            if cfg is not None:
                cfg.epochs = 0
    return d_cfg, s_cfg, preset


def auto_epochs(cfg, proposals: int):
    """``cfg`` with epochs 0 ("not given") replaced by :data:`STEP_BUDGET` steps' worth."""
    import dataclasses
    import math

    if cfg is None or cfg.epochs:
        return cfg
    per_epoch = max(1, math.ceil(proposals / cfg.batch_size))
    return dataclasses.replace(
        cfg, epochs=max(1, min(MAX_AUTO_EPOCHS, math.ceil(STEP_BUDGET / per_epoch))))


def anchors_of(knn_ids: np.ndarray, knn_sims: np.ndarray) -> dict:
    """The graph's label-free anchors the settings' cuts are placed between (the values
    ``anchor_low``/``anchor_high: auto`` derive on a test graph)."""
    stats = graph_stats(knn_ids, knn_sims)
    return {"low": derive(LOW_RULE, stats)[0], "high": derive(HIGH_RULE, stats)[0]}


@ray.remote
def _train(info: FeatureInfo, graph: KnnManifest, labels_uri: str, output: str, d_cfg, s_cfg,
           preset: str, threads: int) -> dict:
    import dataclasses

    import torch

    from ltc_ray.models.store import save_net
    from ltc_ray.models.train_ds import train_gcn_d, train_gcn_s

    torch.set_num_threads(max(1, threads))
    so = info.storage_options
    t0 = time.perf_counter()
    x, ids, sims, labels = load_split(info, graph, labels_uri)
    k = int(ids.shape[1])
    settings = [dataclasses.replace(s, k=min(s.k, k)) for s in PRESETS[preset]]
    table = generate_proposals(x, ids, sims, settings)
    proposal_seconds = time.perf_counter() - t0
    if len(table) == 0:
        raise InputError(info.uri, f"no proposals at the {preset}-setting preset on this "
                                   "split: the kNN similarities sit below every cut")

    d_cfg, s_cfg = auto_epochs(d_cfg, len(table)), auto_epochs(s_cfg, len(table))

    def feats_of(q):
        return x[q]

    def rows_of(q):
        return ids[q], sims[q]

    d_model, d_history = train_gcn_d(table.offsets, table.members, feats_of, rows_of, labels,
                                     d_cfg, adj_k=k, progress=False)
    d_model.eval()
    from ltc_ray.models.gcn_ds import score_proposals, segment_proposals

    scores = score_proposals(d_model, table.offsets, table.members, feats_of, rows_of, k)
    keep = None
    s_model = s_history = None
    if s_cfg is not None:
        s_model, s_history = train_gcn_s(table.offsets, table.members, feats_of, rows_of,
                                         labels, s_cfg, adj_k=k, progress=False)
        s_model.eval()
        keep = _segment(s_model, table, scores, feats_of, rows_of, k, segment_proposals)
    chosen = deoverlap(table, scores, len(labels), keep)
    cid = np.where(chosen >= 0, chosen, len(table) + np.arange(len(labels)))
    anchors = anchors_of(ids, sims)
    common = {
        "k": k, "adj_k": k, "proposals": [s.to_dict() for s in settings], "preset": preset,
        "anchors": anchors, "proposal_count": len(table),
        "train_metrics": evaluate(labels, cid),  # in-sample: the trained nets on train
        "seconds": {"proposals": round(proposal_seconds, 3),
                    "total": round(time.perf_counter() - t0, 3)},
        "peak_rss_bytes": peak_rss_bytes(),
    }
    d_meta = {**common, "train_config": asdict(d_cfg), "history": d_history}
    if s_model is None:
        save_net(output, d_model, "gcn-d", d_meta, so)
        return d_meta
    save_net(join_uri(output, "gcn-d"), d_model, "gcn-d", d_meta, so)
    s_meta = {**common, "train_config": asdict(s_cfg), "history": s_history}
    save_net(join_uri(output, "gcn-s"), s_model, "gcn-s", s_meta, so)
    return {**d_meta, "gcn_s": {"history": s_history}}


def _segment(s_model, table: ProposalTable, scores, feats_of, rows_of, k, segment_fn,
             low: float = 0.1, high: float = 0.9) -> np.ndarray:
    """GCN-S keep probabilities (1 outside [low, high]), as the method computes them."""
    keep = np.ones(len(table.members), dtype=np.float32)
    chosen = np.flatnonzero((scores >= low) & (scores <= high))
    if len(chosen):
        sizes = table.sizes[chosen]
        take = np.repeat(table.offsets[chosen] - np.r_[0, np.cumsum(sizes)[:-1]], sizes) + \
            np.arange(sizes.sum())
        keep[take] = segment_fn(s_model, np.r_[0, np.cumsum(sizes)].astype(np.int64),
                                table.members[take], feats_of, rows_of, k)
    return keep


def train(ctx: TrainContext) -> dict:
    """GCN-D (and GCN-S) on the whole split in one worker."""
    d_cfg, s_cfg, preset = ctx.train_config
    info = ctx.info
    with ctx.stages.stage("train", rows=info.n_rows):
        meta = ray_get(_train.options(num_cpus=ctx.cpus).remote(
            info, ctx.graph, ctx.labels, ctx.output, d_cfg, s_cfg, preset, ctx.cpus))
    log.info("trained %s on %d proposals (%s settings): in-sample pairwise F %.4f",
             "gcn-ds" if s_cfg is not None else "gcn-d", meta["proposal_count"], preset,
             meta["train_metrics"]["pairwise_f"])
    return meta


def summary(meta: dict, features: str) -> list[str]:
    """The train job's closing lines."""
    m = meta["train_metrics"]
    return [f"trained on {features}: {meta['proposal_count']} proposals at the "
            f"{meta['preset']}-setting preset (anchors {meta['anchors']['low']:.3f} / "
            f"{meta['anchors']['high']:.3f}); in-sample pairwise F {100 * m['pairwise_f']:.2f}"]
