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


class TpdiRule:
    """What a method built on the edge scorer tunes out of fold and applies to re-scored
    rows (hard-clusters: the TPDi threshold of density-peak linking). map-equation
    subclasses it with its keep rule; :func:`train_edge_model` trains either."""

    method = "hard-clusters"

    def __init__(self, params, seed: int = 0):
        self.params = params
        self.seed = seed

    def given(self) -> dict | None:
        """The thresholds the params pin (no search), else None."""
        return None if self.params.tau is None else {"tau": float(self.params.tau)}

    def default(self) -> dict:
        """The thresholds without a search (``tune_folds`` 0): the paper's 0.7."""
        return {"tau": 0.7}

    def tune(self, labels: np.ndarray, ids: np.ndarray, prob: np.ndarray
             ) -> tuple[dict, np.ndarray, dict]:
        """``(thresholds, cluster labels at them, crossfit entries)`` on out-of-fold rows."""
        edges_at = _tpdi_edges(ids, prob, self.params)
        tau, scores = tune_threshold(labels, edges_at, (0.10, 0.95, 0.01))
        cid, _, _ = merge_edges(len(ids), [edges_at(tau)])
        return {"tau": tau}, cid, {"tau_search": {f"{t:.2f}": round(f, 5)
                                                  for t, f in sorted(scores.items())}}

    def labels_at(self, ids: np.ndarray, prob: np.ndarray, thresholds: dict) -> np.ndarray:
        """Cluster labels of re-scored rows at ``thresholds``."""
        cid, _, _ = merge_edges(len(ids), [_tpdi_edges(ids, prob, self.params)(
            thresholds["tau"])])
        return cid

    def model_meta(self, thresholds: dict, k: int) -> dict:
        """What model.json carries beyond the scorer (``k``: the graph's neighbours)."""
        return {"thresholds": thresholds, "density": self.params.density}


@ray.remote
def train_edge_model(info: FeatureInfo, manifest: KnnManifest, labels_uri: str, output: str,
                     cfg, rule: TpdiRule, threads: int) -> dict:
    """Train the edge scorer on the whole split in one worker and write it with ``rule``'s
    thresholds. They are tuned on OUT-OF-FOLD scores
    (:func:`~ltc_ray.models.crossfit.out_of_fold_edges`, ``cfg.tune_folds`` identity
    folds), never in-sample: an in-sample scorer is over-confident on its own identities.
    ``tune_folds`` 0 keeps ``rule.default()``; params that pin them skip the search."""
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
    thresholds = rule.given() or rule.default()
    if cfg.tune_folds and rule.given() is None:
        batch = rule.params.batch_size
        order, oof_ids, oof_prob = out_of_fold_edges(x, labels, cfg, manifest.k, cfg.tune_folds,
                                                     batch)
        t_tune = time.perf_counter()
        oof_labels = labels[order]
        thresholds, cid, entries = rule.tune(oof_labels, oof_ids, oof_prob)
        meta["crossfit"] = {"folds": int(cfg.tune_folds), "k": int(oof_ids.shape[1]),
                            "seconds": round(time.perf_counter() - t0, 3),
                            "search_seconds": round(time.perf_counter() - t_tune, 3),
                            "metrics": evaluate(oof_labels, cid), **entries}
        del oof_ids, oof_prob
    t1 = time.perf_counter()
    model, history = train_edge_scorer(x, knn_ids, labels, cfg)
    train_seconds = time.perf_counter() - t1
    prob = edge_probabilities(model, knn_ids, x.__getitem__, rule.params.batch_size)
    del x
    ids, prob = resort_rows(knn_ids, prob)
    meta.update({
        **rule.model_meta(thresholds, knn_ids.shape[1]),
        "train_metrics": evaluate(labels, rule.labels_at(ids, prob, thresholds)),  # in-sample
        "train_config": asdict(cfg),
        "fingerprint": data_fingerprint(info.uri, n, info.dim, labels),
        "history": history,
        "train_seconds": round(train_seconds, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    })
    save_edge_scorer(output, model, meta, info.storage_options, method=rule.method)
    return meta


def train(ctx: TrainContext) -> dict:
    """``jobs/train.py --method hard-clusters``."""
    info = ctx.info
    with ctx.stages.stage("train", rows=info.n_rows):
        rule = TpdiRule(ctx.config.methods.of("hard-clusters"), int(ctx.config.seed))
        meta = ray_get(train_edge_model.options(num_cpus=ctx.cpus).remote(
            info, ctx.graph, ctx.labels, ctx.output, ctx.train_config, rule, ctx.cpus))
    log.info("trained hard-clusters: tau=%.2f, train pairwise F %.4f -> %s",
             meta["thresholds"]["tau"], meta["train_metrics"]["pairwise_f"], ctx.output)
    return meta


def summary(meta: dict, features: str) -> list[str]:
    """The train job's closing lines."""
    m = meta["train_metrics"]
    return [f"hard-clusters edge scorer trained on {features}: tau="
            f"{meta['thresholds']['tau']:.2f}, train pairwise F {100 * m['pairwise_f']:.2f}, "
            f"BCubed F {100 * m['bcubed_f']:.2f}"]
