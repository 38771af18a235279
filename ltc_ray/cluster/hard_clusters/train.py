"""hard-clusters' trainer: the edge scorer on the whole labelled split in one worker, the
TPDi threshold tuned out of fold, the model directory written."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import ray

from ltc_ray.cluster.components import merge_edges
from ltc_ray.cluster.hard_clusters.algorithm import link_by_tpdi, ndde_density, tpdi
from ltc_ray.cluster.training import TrainContext, load_split, tune_threshold
from ltc_ray.errors import InputError
from ltc_ray.graph.knn_graph import KnnManifest
from ltc_ray.io.features import FeatureInfo
from ltc_ray.metrics import evaluate
from ltc_ray.runtime import peak_rss_bytes, ray_get

log = logging.getLogger("ltc_ray")


def train_config(options: dict, seed: int):
    """The edge scorer's training config from the train job's flags."""
    from ltc_ray.models.train_hc import EdgeTrainConfig

    cfg = EdgeTrainConfig(seed=seed)  # flag ranges: checked by the CLI
    for flag, attr in (("epochs", "epochs"), ("lr", "lr"), ("batch_rows", "batch_size")):
        value = options.get(flag)
        if value is not None:
            if value <= 0:  # gcn-v's batch_rows 0 (full graph) has no meaning here
                raise InputError(f"--{flag.replace('_', '-')}", f"must be positive, got {value}")
            setattr(cfg, attr, value)
    folds = options.get("tune_folds")
    if folds is not None:
        if folds < 0 or folds == 1:
            raise InputError("--tune-folds", f"must be 0 or at least 2, got {folds}")
        cfg.tune_folds = folds
    hidden = options.get("hidden")
    if hidden is not None:
        if hidden <= 0 or hidden % cfg.shape["heads"]:
            raise InputError("--hidden", f"must be a positive multiple of "
                             f"{cfg.shape['heads']} (attention heads), got {hidden}")
        cfg.shape["d_model"] = hidden
    return cfg


def _tpdi_edges(ids: np.ndarray, prob: np.ndarray, params):
    """``edges_at(tau)`` over a whole re-scored graph: NDDE density and TPDi computed once."""
    density, _ = ndde_density(ids, prob, params.density_k, params.density_sigma, params.density,
                              params.damping, params.eps, params.max_iter)
    dist = tpdi(ids, prob, lambda q: (ids[q], prob[q]), params.tpdi_sigma)
    node_ids = np.arange(len(ids), dtype=np.int64)

    def edges_at(tau: float):
        link = link_by_tpdi(node_ids, ids, dist, density, tau)
        return link.src, link.dst

    return edges_at


@ray.remote
def _train_hard_clusters(info: FeatureInfo, manifest: KnnManifest, labels_uri: str, output: str,
                         cfg, params, threads: int) -> dict:
    """Train the edge scorer on the whole split in one worker. The TPDi threshold is tuned
    by pairwise F on OUT-OF-FOLD scores (:func:`~ltc_ray.models.crossfit.out_of_fold_edges`,
    ``cfg.tune_folds`` identity folds), never in-sample: an in-sample scorer is
    over-confident on its own identities. ``tune_folds`` 0 keeps the paper's 0.7."""
    import torch

    from ltc_ray.models.crossfit import out_of_fold_edges
    from ltc_ray.models.edge_scorer import edge_probabilities, resort_rows
    from ltc_ray.models.store import data_fingerprint, save_edge_scorer
    from ltc_ray.models.train_hc import train_edge_scorer

    torch.set_num_threads(max(1, threads))
    t0 = time.perf_counter()
    x, knn_ids, _, labels = load_split(info, manifest, labels_uri)
    n = len(labels)
    meta: dict = {}
    tau = 0.7 if params.tau is None else float(params.tau)
    if cfg.tune_folds and params.tau is None:
        order, oof_ids, oof_prob = out_of_fold_edges(x, labels, cfg, manifest.k, cfg.tune_folds,
                                                     params.batch_size)
        oof_labels = labels[order]
        edges_at = _tpdi_edges(oof_ids, oof_prob, params)
        tau, scores = tune_threshold(oof_labels, edges_at, (0.10, 0.95, 0.01))
        cid, _, _ = merge_edges(n, [edges_at(tau)])
        meta["crossfit"] = {"folds": int(cfg.tune_folds), "k": int(oof_ids.shape[1]),
                            "seconds": round(time.perf_counter() - t0, 3),
                            "metrics": evaluate(oof_labels, cid),
                            "tau_search": {f"{t:.2f}": round(f, 5)
                                           for t, f in sorted(scores.items())}}
        del oof_ids, oof_prob
    t1 = time.perf_counter()
    model, history = train_edge_scorer(x, knn_ids, labels, cfg)
    train_seconds = time.perf_counter() - t1
    prob = edge_probabilities(model, knn_ids, x.__getitem__, params.batch_size)
    del x
    ids, prob = resort_rows(knn_ids, prob)
    cid, _, _ = merge_edges(n, [_tpdi_edges(ids, prob, params)(tau)])
    meta.update({
        "thresholds": {"tau": tau},
        "density": params.density,
        "train_metrics": evaluate(labels, cid),  # in-sample, at the tuned tau
        "train_config": asdict(cfg),
        "fingerprint": data_fingerprint(info.uri, n, info.dim, labels),
        "history": history,
        "train_seconds": round(train_seconds, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    })
    save_edge_scorer(output, model, meta, info.storage_options)
    return meta


def train(ctx: TrainContext) -> dict:
    """``jobs/train.py --method hard-clusters``."""
    info = ctx.info
    with ctx.stages.stage("train", rows=info.n_rows):
        meta = ray_get(_train_hard_clusters.options(num_cpus=ctx.cpus).remote(
            info, ctx.graph, ctx.labels, ctx.output, ctx.train_config,
            ctx.config.methods.of("hard-clusters"), ctx.cpus))
    log.info("trained hard-clusters: tau=%.2f, train pairwise F %.4f -> %s",
             meta["thresholds"]["tau"], meta["train_metrics"]["pairwise_f"], ctx.output)
    return meta


def summary(meta: dict, features: str) -> list[str]:
    """The train job's closing lines."""
    m = meta["train_metrics"]
    return [f"hard-clusters edge scorer trained on {features}: tau="
            f"{meta['thresholds']['tau']:.2f}, train pairwise F {100 * m['pairwise_f']:.2f}, "
            f"BCubed F {100 * m['bcubed_f']:.2f}"]
