"""map-equation's trainer: hard-clusters' edge scorer on the whole labelled split in one
worker, the keep rule (``tau``, ``max_neighbours``) tuned on out-of-fold edge scores with
the map equation itself, the model directory written."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import ray

from ltc_ray.cluster.hard_clusters.algorithm import tpdi
from ltc_ray.cluster.hard_clusters.train import train_config
from ltc_ray.cluster.map_equation import kept_edges
from ltc_ray.cluster.training import TrainContext, load_split
from ltc_ray.graph.map_equation import map_equation_labels
from ltc_ray.metrics import evaluate, pairwise_prf
from ltc_ray.runtime import peak_rss_bytes, ray_get

__all__ = ["summary", "train", "train_config", "tune_keep_rule"]

log = logging.getLogger("ltc_ray")

TAU_GRID = (0.10, 0.95, 0.01)  # coarse in steps of 5 x 0.01, then 0.01 around the best
NEIGHBOUR_GRID = (5, 10, 20, 40)  # and k - 1 (no cap)


def _labels_at(ids: np.ndarray, dist: np.ndarray, tau: float, top: int, seed: int,
               trials: int) -> np.ndarray:
    src, dst, w = kept_edges(np.arange(len(ids), dtype=np.int64), ids, dist, tau, top)
    return map_equation_labels(len(ids), src, dst, w, seed=seed, trials=trials)


def tune_keep_rule(labels: np.ndarray, ids: np.ndarray, dist: np.ndarray, seed: int = 0,
                   trials: int = 1, grid: tuple[float, float, float] = TAU_GRID
                   ) -> tuple[float, int, dict[str, float]]:
    """``(tau, max_neighbours, {"tau/max_neighbours": pairwise F})``: the keep rule with the
    best pairwise F of the map equation on re-scored rows ``ids`` with TPDi ``dist``
    (out-of-fold scores). Coordinate search: tau without a cap (coarse, then fine), the cap
    at that tau, tau again at that cap (fine); ties go to the smaller tau and the larger
    cap."""
    k1 = ids.shape[1] - 1
    scores: dict[tuple[float, int], float] = {}

    def trial(tau: float, top: int) -> float:
        key = (round(float(tau), 6), int(top))
        if key not in scores:
            got = _labels_at(ids, dist, key[0], key[1], seed, trials)
            scores[key] = pairwise_prf(labels, got)[2]
        return scores[key]

    low, high, step = grid
    taus = [round(c, 6) for c in np.arange(low, high + 1e-9, step * 5)]

    def best_tau(top: int, around: float | None) -> float:
        values = taus if around is None else [
            round(c, 6) for c in np.arange(around - 4 * step, around + 4 * step + 1e-9, step)
            if low - 1e-9 <= c <= high + 1e-9]
        return max(values, key=lambda c: (trial(c, top), -c))

    tau = best_tau(k1, None)
    tau = best_tau(k1, tau)
    tops = sorted({t for t in (*NEIGHBOUR_GRID, k1) if t <= k1})
    top = max(tops, key=lambda t: (trial(tau, t), t))
    tau = best_tau(top, tau)
    return tau, top, {f"{c:.2f}/{t}": round(f, 5) for (c, t), f in sorted(scores.items())}


@ray.remote
def _train_map_equation(info, manifest, labels_uri: str, output: str, cfg, params,
                        seed: int, threads: int) -> dict:
    """Train the edge scorer on the whole split in one worker; the keep rule is tuned on
    OUT-OF-FOLD scores (``cfg.tune_folds`` identity folds, each scored by a scorer trained
    on the others), never in-sample, where the scorer is over-confident on its own
    identities. ``tune_folds`` 0 keeps the paper's TPDi < 0.7 without a cap."""
    import torch

    from ltc_ray.models.crossfit import out_of_fold_edges
    from ltc_ray.models.edge_scorer import edge_probabilities, resort_rows
    from ltc_ray.models.store import METHOD_ME, data_fingerprint, save_edge_scorer
    from ltc_ray.models.train_hc import train_edge_scorer

    torch.set_num_threads(max(1, threads))
    t0 = time.perf_counter()
    x, knn_ids, _, labels = load_split(info, manifest, labels_uri)
    n = len(labels)
    k1 = knn_ids.shape[1] - 1
    meta: dict = {}
    tau = 0.7 if params.tau is None else float(params.tau)
    top = k1 if params.max_neighbours is None else min(int(params.max_neighbours), k1)
    sigma = params.tpdi_sigma
    if cfg.tune_folds and params.tau is None and params.max_neighbours is None:
        order, oof_ids, oof_prob = out_of_fold_edges(x, labels, cfg, manifest.k, cfg.tune_folds,
                                                     params.batch_size)
        t_tune = time.perf_counter()
        oof_labels = labels[order]
        oof_dist = tpdi(oof_ids, oof_prob, lambda q: (oof_ids[q], oof_prob[q]), sigma)
        tau, top, search = tune_keep_rule(oof_labels, oof_ids, oof_dist, seed, params.trials)
        top = min(top, k1) if top < oof_ids.shape[1] - 1 else k1  # uncapped stays uncapped
        got = _labels_at(oof_ids, oof_dist, tau, top, seed, params.trials)
        meta["crossfit"] = {"folds": int(cfg.tune_folds), "k": int(oof_ids.shape[1]),
                            "seconds": round(time.perf_counter() - t0, 3),
                            "search_seconds": round(time.perf_counter() - t_tune, 3),
                            "metrics": evaluate(oof_labels, got), "search": search}
        del oof_ids, oof_prob, oof_dist
    t1 = time.perf_counter()
    model, history = train_edge_scorer(x, knn_ids, labels, cfg)
    train_seconds = time.perf_counter() - t1
    prob = edge_probabilities(model, knn_ids, x.__getitem__, params.batch_size)
    del x
    ids, prob = resort_rows(knn_ids, prob)
    dist = tpdi(ids, prob, lambda q: (ids[q], prob[q]), sigma)
    got = _labels_at(ids, dist, tau, top, seed, params.trials)
    meta.update({
        "thresholds": {"tau": tau, "max_neighbours": top},
        "train_metrics": evaluate(labels, got),  # in-sample, at the tuned rule
        "train_config": asdict(cfg),
        "fingerprint": data_fingerprint(info.uri, n, info.dim, labels),
        "history": history,
        "train_seconds": round(train_seconds, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    })
    save_edge_scorer(output, model, meta, info.storage_options, method=METHOD_ME)
    return meta


def train(ctx: TrainContext) -> dict:
    """``jobs/train.py --method map-equation``."""
    info = ctx.info
    with ctx.stages.stage("train", rows=info.n_rows):
        meta = ray_get(_train_map_equation.options(num_cpus=ctx.cpus).remote(
            info, ctx.graph, ctx.labels, ctx.output, ctx.train_config,
            ctx.config.methods.of("map-equation"), int(ctx.config.seed), ctx.cpus))
    t = meta["thresholds"]
    log.info("trained map-equation: tau=%.2f, max_neighbours=%d, train pairwise F %.4f -> %s",
             t["tau"], t["max_neighbours"], meta["train_metrics"]["pairwise_f"], ctx.output)
    return meta


def summary(meta: dict, features: str) -> list[str]:
    """The train job's closing lines."""
    m, t = meta["train_metrics"], meta["thresholds"]
    lines = [f"map-equation edge scorer trained on {features}: tau={t['tau']:.2f}, "
             f"max_neighbours={t['max_neighbours']}, train pairwise F "
             f"{100 * m['pairwise_f']:.2f}, BCubed F {100 * m['bcubed_f']:.2f}"]
    cf = meta.get("crossfit")
    if cf:
        lines.append(f"out of fold ({cf['folds']} identity folds): pairwise F "
                     f"{100 * cf['metrics']['pairwise_f']:.2f}")
    return lines
