"""GCN-V's trainer: train on the whole labelled split in one worker, tune tau on the input
graph and tau2 on a kNN graph of its own hidden features, save the model directory."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import ray

from ltc_ray.cluster.base import PartitionInput
from ltc_ray.cluster.components import merge_edges
from ltc_ray.cluster.density_peak import link_to_nearest_higher
from ltc_ray.cluster.training import TrainContext, load_split, tune_threshold
from ltc_ray.graph.knn_graph import KnnManifest, read_knn_rows
from ltc_ray.io.features import (
    FeatureInfo,
    inspect_features,
    write_feature_part,
    write_parts_manifest,
)
from ltc_ray.io.fs import join_uri
from ltc_ray.io.labels import read_labels
from ltc_ray.metrics import evaluate
from ltc_ray.runtime import peak_rss_bytes, ray_get

log = logging.getLogger("ltc_ray")


def train_config(options: dict, seed: int):
    """GCN-V's training config from the train job's flags (ranges checked by the CLI)."""
    from ltc_ray.models.train import TrainConfig

    cfg = TrainConfig(seed=seed)
    for flag in ("epochs", "lr", "batch_rows", "hidden"):
        if options.get(flag) is not None:
            setattr(cfg, flag, options[flag])
    return cfg


def tune_tau(knn_ids: np.ndarray, knn_sims: np.ndarray, confidence: np.ndarray,
             labels: np.ndarray) -> tuple[float, dict[float, float]]:
    """The nearest-higher linking threshold (GCN-V) tuned on the training split."""
    part = PartitionInput(0, len(labels), knn_ids, knn_sims)

    def edges_at(tau: float):
        link = link_to_nearest_higher(part, confidence, tau)
        return link.src, link.dst

    return tune_threshold(labels, edges_at)


def link_and_score(knn_ids, knn_sims, confidence, labels, tau) -> dict:
    n = len(labels)
    link = link_to_nearest_higher(PartitionInput(0, n, knn_ids, knn_sims), confidence, tau)
    cid, _, _ = merge_edges(n, [(link.src, link.dst)])
    return evaluate(labels, cid)


@ray.remote(num_returns=3)
def _train_gcn_v(info: FeatureInfo, manifest: KnnManifest, labels_uri: str, feature_dir: str,
                 train_cfg, threads: int):
    """Train on the whole split; tune tau on the input graph; write the hidden features
    for the feature-pass graph. Returns (partial meta, model, confidence)."""
    import torch

    from ltc_ray.models.gcn_v import predict
    from ltc_ray.models.store import data_fingerprint
    from ltc_ray.models.train import train_gcn_v_on_graph

    torch.set_num_threads(max(1, threads))
    so = info.storage_options
    n = info.n_rows
    t0 = time.perf_counter()
    x, knn_ids, knn_sims, labels = load_split(info, manifest, labels_uri)
    # ÂX once: training and inference both use it
    model, history, agg = train_gcn_v_on_graph(x, knn_ids, knn_sims, labels, train_cfg)
    confidence, hidden = predict(model, x, agg)
    part = write_feature_part(feature_dir, 0, 0, hidden, so)
    tau, tau_scores = tune_tau(knn_ids, knn_sims, confidence, labels)
    meta = {
        "method": "gcn-v",
        "in_dim": int(info.dim),
        "hidden": int(train_cfg.hidden),
        "k": int(manifest.k),
        "tau_search": {f"{t:.2f}": round(f, 5) for t, f in sorted(tau_scores.items())},
        "train_metrics_input_graph": link_and_score(knn_ids, knn_sims, confidence, labels, tau),
        "thresholds": {"tau": tau},
        "train_config": asdict(train_cfg),
        "fingerprint": data_fingerprint(info.uri, n, info.dim, labels),
        "history": history,
        "feature_part": part,
        "train_seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    return meta, model, confidence


@ray.remote
def _finish_gcn_v(meta: dict, model, confidence: np.ndarray, graph: KnnManifest,
                  labels_uri: str, output: str, so: dict | None) -> dict:
    """Tune tau2 on the GCN-feature graph (for ``feature_pass=true``), save the model."""
    from ltc_ray.models.store import save_model

    n = len(confidence)
    labels = read_labels(labels_uri, expected_rows=n, storage_options=so)
    knn_ids, knn_sims = read_knn_rows(graph, 0, n, so)
    tau2, tau2_scores = tune_tau(knn_ids, knn_sims, confidence, labels)
    feature_metrics = link_and_score(knn_ids, knn_sims, confidence, labels, tau2)
    meta = dict(meta)
    meta.pop("feature_part", None)
    meta["thresholds"] = {**meta["thresholds"], "tau2": tau2}
    meta["tau2_search"] = {f"{t:.2f}": round(f, 5) for t, f in sorted(tau2_scores.items())}
    meta["train_metrics_feature_graph"] = feature_metrics
    meta["train_metrics"] = meta["train_metrics_input_graph"]  # the default pass
    save_model(output, model, meta, so)
    return meta


def train_gcn_v(ctx: TrainContext, output: str) -> dict:
    """Train GCN-V, tune tau and tau2 on the split, write the model to ``output``."""
    info, stages, so = ctx.info, ctx.stages, ctx.storage_options
    train_cfg = ctx.train_config
    feature_dir = join_uri(ctx.work_dir, "node-features")
    with stages.stage("train", rows=info.n_rows):
        meta_ref, model_ref, conf_ref = _train_gcn_v.options(num_cpus=ctx.cpus).remote(
            info, ctx.graph, ctx.labels, feature_dir, train_cfg, ctx.cpus)
        part = ray_get(meta_ref)["feature_part"]
    parts_uri = join_uri(feature_dir, "features.parts.json")
    write_parts_manifest(parts_uri, train_cfg.hidden, [tuple(part)], so)
    feature_info = inspect_features(parts_uri, storage_options=so, internal_parts=True)
    with stages.stage("knn_features", rows=info.n_rows):
        graph = ctx.build_graph(feature_info, ctx.config.knn,
                                join_uri(ctx.work_dir, "knn-features"))
    with stages.stage("tune_feature_pass", rows=info.n_rows):
        return ray_get(_finish_gcn_v.remote(meta_ref, model_ref, conf_ref, graph, ctx.labels,
                                            output, so))


def train(ctx: TrainContext) -> dict:
    """``jobs/train.py --method gcn-v``."""
    meta = train_gcn_v(ctx, ctx.output)
    log.info("trained gcn-v: tau=%.2f (train F on the input graph %.4f), tau2=%.2f (feature "
             "graph %.4f) -> %s", meta["thresholds"]["tau"],
             meta["train_metrics_input_graph"]["pairwise_f"], meta["thresholds"]["tau2"],
             meta["train_metrics_feature_graph"]["pairwise_f"], ctx.output)
    return meta


def summary(meta: dict, features: str) -> list[str]:
    """The train job's closing lines."""
    m = meta["train_metrics"]
    return [f"gcn-v trained on {features}: tau={meta['thresholds']['tau']:.2f}, train "
            f"pairwise F {100 * m['pairwise_f']:.2f}, BCubed F {100 * m['bcubed_f']:.2f}"]
