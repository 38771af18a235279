"""What every trainer shares: the context the train job hands a method's trainer, the
whole split loaded in one worker, and the coarse-then-fine threshold search."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ltc_ray.cluster.components import merge_edges
from ltc_ray.errors import InputError
from ltc_ray.graph.knn_graph import KnnManifest, read_knn_rows
from ltc_ray.io.features import FeatureInfo, read_features
from ltc_ray.io.labels import read_labels
from ltc_ray.metrics import pairwise_prf

TAU_GRID = (0.30, 0.95, 0.01)


@dataclass
class TrainContext:
    """A labelled split with its kNN graph, ready for a method's ``train``.

    ``build_graph(info, knn_config, directory) -> KnnManifest`` builds a second sharded kNN
    graph (over node features a trainer wrote), so trainers need nothing from the
    pipeline; ``stages`` records named stages (``stages.stage(name, rows=N)``)."""

    info: FeatureInfo
    graph: KnnManifest
    labels: str
    output: str
    config: Any  # ltc_ray.config.Config
    train_config: Any  # the method's own, from its ``train_config``
    cpus: int
    work_dir: str
    stages: Any
    build_graph: Callable[..., KnnManifest]

    @property
    def storage_options(self) -> dict | None:
        return self.info.storage_options


def positive_flags(cfg: Any, options: dict, flags: dict[str, str]) -> Any:
    """Set ``cfg.<attr>`` from each train flag in ``flags`` (flag -> attr) that was given;
    a value <= 0 is an InputError naming the flag. Returns ``cfg``."""
    for flag, attr in flags.items():
        value = options.get(flag)
        if value is not None:
            if value <= 0:
                raise InputError(f"--{flag.replace('_', '-')}", f"must be positive, got {value}")
            setattr(cfg, attr, value)
    return cfg


def tune_threshold(labels: np.ndarray, edges_at, grid: tuple[float, float, float] = TAU_GRID
                   ) -> tuple[float, dict[float, float]]:
    """Best link threshold on the training split by pairwise F, coarse then fine.

    ``edges_at(tau) -> (src, dst)`` gives the parent edges kept at ``tau``.
    """
    n = len(labels)
    low, high, step = grid
    scores: dict[float, float] = {}

    def trial(tau: float) -> float:
        tau = round(float(tau), 6)
        if tau not in scores:
            cid, _, _ = merge_edges(n, [edges_at(tau)])
            scores[tau] = pairwise_prf(labels, cid)[2]
        return scores[tau]

    best = max(np.arange(low, high + 1e-9, step * 5), key=trial)
    for tau in np.arange(best - 4 * step, best + 4 * step + 1e-9, step):
        if low - 1e-9 <= tau <= high + 1e-9:
            trial(tau)
    return float(max(sorted(scores), key=lambda t: scores[t])), scores


def load_split(info: FeatureInfo, graph: KnnManifest, labels_uri: str):
    """A whole training split in one worker: features ``(N, d)``, its kNN rows and labels."""
    so = info.storage_options
    n = info.n_rows
    x = read_features(info, 0, n)
    knn_ids, knn_sims = read_knn_rows(graph, 0, n, so)
    return x, knn_ids, knn_sims, read_labels(labels_uri, expected_rows=n, storage_options=so)
