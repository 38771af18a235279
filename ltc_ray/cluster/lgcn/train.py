"""L-GCN's trainer (``jobs/train.py --method lgcn``): the whole labelled split in one
worker, pivots sampled per epoch (:mod:`ltc_ray.models.train_lgcn`); the model directory
carries its subgraph shape and the propagation's ``max_size``/``step``."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict

import ray

from ltc_ray.cluster.training import TrainContext, load_split, positive_flags
from ltc_ray.errors import InputError
from ltc_ray.graph.knn_graph import KnnManifest
from ltc_ray.io.features import FeatureInfo
from ltc_ray.runtime import peak_rss_bytes, ray_get

log = logging.getLogger("ltc_ray")
PROPAGATION = {"max_size": 300, "step": 0.6}  # learn-to-cluster's L-GCN test setting


def train_config(options: dict, seed: int):
    """L-GCN's training config from the train job's flags."""
    from ltc_ray.models.train_lgcn import TrainLConfig

    cfg = positive_flags(TrainLConfig(seed=seed), options,
                         {"epochs": "epochs", "lr": "lr", "batch_rows": "batch_size"})
    hidden = options.get("hidden")
    if hidden is not None:
        if hidden <= 0:
            raise InputError("--hidden", f"must be positive, got {hidden}")
        cfg.dims = (int(hidden), int(hidden), max(1, hidden // 2), max(1, hidden // 2))
    return cfg


@ray.remote
def _train(info: FeatureInfo, graph: KnnManifest, labels_uri: str, output: str, cfg,
           threads: int) -> dict:
    import torch

    from ltc_ray.models.store import save_net
    from ltc_ray.models.train_lgcn import train_lgcn

    torch.set_num_threads(max(1, threads))
    t0 = time.perf_counter()
    x, ids, _, labels = load_split(info, graph, labels_uri)
    k = int(ids.shape[1])
    if cfg.hop1 is None or cfg.hop1 > k - 1:  # a graph with fewer neighbours than asked
        cfg = dataclasses.replace(cfg, hop1=k - 1)
    model, history = train_lgcn(x, ids, labels, cfg, progress=False)
    meta = {"k": k, "hop1": cfg.hop1, "hop2": cfg.hop2,
            "active": cfg.active, "thresholds": dict(PROPAGATION),
            "train_config": asdict(cfg), "history": history,
            "train_seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_bytes": peak_rss_bytes()}
    save_net(output, model, "lgcn", meta, info.storage_options)
    return meta


def train(ctx: TrainContext) -> dict:
    """L-GCN on the whole split in one worker."""
    info = ctx.info
    with ctx.stages.stage("train", rows=info.n_rows):
        meta = ray_get(_train.options(num_cpus=ctx.cpus).remote(
            info, ctx.graph, ctx.labels, ctx.output, ctx.train_config, ctx.cpus))
    last = meta["history"][-1] if meta["history"] else {}
    log.info("trained lgcn: %d epochs, last link accuracy %.3f", len(meta["history"]),
             last.get("accuracy", float("nan")))
    return meta


def summary(meta: dict, features: str) -> list[str]:
    """The train job's closing lines."""
    last = meta["history"][-1] if meta["history"] else {}
    return [f"lgcn trained on {features}: hop1 {meta['hop1']}, hop2 {meta['hop2']}, "
            f"{len(meta['history'])} epochs, last link accuracy "
            f"{100 * last.get('accuracy', float('nan')):.1f}%"]
