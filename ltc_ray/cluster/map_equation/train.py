"""map-equation's trainer: hard-clusters' edge scorer on the whole labelled split in one
worker, the keep rule (``tau``, ``max_neighbours``) tuned on out-of-fold edge scores with
the map equation itself, the model directory written."""

from __future__ import annotations

import logging

import numpy as np

from ltc_ray.cluster.hard_clusters.algorithm import tpdi
from ltc_ray.cluster.hard_clusters.train import TpdiRule, train_config, train_edge_model
from ltc_ray.cluster.map_equation import kept_edges
from ltc_ray.cluster.training import TrainContext
from ltc_ray.graph.map_equation import map_equation_labels
from ltc_ray.metrics import pairwise_prf
from ltc_ray.runtime import ray_get

__all__ = ["KeepRule", "summary", "train", "train_config", "tune_keep_rule"]

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


class KeepRule(TpdiRule):
    """map-equation's keep rule (``tau`` on TPDi, ``max_neighbours``; None = no cap) tuned
    with the map equation itself (:func:`tune_keep_rule`)."""

    method = "map-equation"

    def given(self) -> dict | None:
        p = self.params
        if p.tau is None and p.max_neighbours is None:
            return None
        return {"tau": 0.7 if p.tau is None else float(p.tau),
                "max_neighbours": p.max_neighbours}

    def default(self) -> dict:
        return {"tau": 0.7, "max_neighbours": None}

    def _distances(self, ids: np.ndarray, prob: np.ndarray) -> np.ndarray:
        return tpdi(ids, prob, lambda q: (ids[q], prob[q]), self.params.tpdi_sigma)

    def tune(self, labels: np.ndarray, ids: np.ndarray, prob: np.ndarray
             ) -> tuple[dict, np.ndarray, dict]:
        dist = self._distances(ids, prob)
        tau, top, search = tune_keep_rule(labels, ids, dist, self.seed, self.params.trials)
        top = None if top >= ids.shape[1] - 1 else top  # uncapped stays uncapped
        got = _labels_at(ids, dist, tau, top or ids.shape[1], self.seed, self.params.trials)
        return {"tau": tau, "max_neighbours": top}, got, {"search": search}

    def labels_at(self, ids: np.ndarray, prob: np.ndarray, thresholds: dict) -> np.ndarray:
        top = thresholds["max_neighbours"] or ids.shape[1]
        return _labels_at(ids, self._distances(ids, prob), thresholds["tau"], top, self.seed,
                          self.params.trials)

    def model_meta(self, thresholds: dict, k: int) -> dict:
        top = thresholds["max_neighbours"]
        return {"thresholds": {"tau": thresholds["tau"],
                               "max_neighbours": k - 1 if top is None else min(top, k - 1)}}


def train(ctx: TrainContext) -> dict:
    """``jobs/train.py --method map-equation``."""
    info = ctx.info
    with ctx.stages.stage("train", rows=info.n_rows):
        rule = KeepRule(ctx.config.methods.of("map-equation"), int(ctx.config.seed))
        meta = ray_get(train_edge_model.options(num_cpus=ctx.cpus).remote(
            info, ctx.graph, ctx.labels, ctx.output, ctx.train_config, rule, ctx.cpus))
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
