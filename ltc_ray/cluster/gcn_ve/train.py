"""GCN-E's trainer (``jobs/train.py --method gcn-ve``): GCN-V first (:mod:`..gcn_v.train`),
then GCN-E on out-of-fold GCN-V outputs."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import ray

from ltc_ray.cluster.base import LinkHaloPartition
from ltc_ray.cluster.components import merge_edges
from ltc_ray.cluster.gcn_v.train import summary as v_summary
from ltc_ray.cluster.gcn_v.train import train_config as v_config
from ltc_ray.cluster.gcn_v.train import train_gcn_v
from ltc_ray.cluster.gcn_ve.links import EDGE_K, gcn_e_links
from ltc_ray.cluster.training import TrainContext
from ltc_ray.io.features import FeatureInfo, read_features
from ltc_ray.io.fs import join_uri
from ltc_ray.io.labels import read_labels
from ltc_ray.metrics import evaluate
from ltc_ray.runtime import peak_rss_bytes, ray_get

log = logging.getLogger("ltc_ray")
CROSSFIT_FOLDS = 2  # identity folds for GCN-E's out-of-fold training data


def train_config(options: dict, seed: int):
    """(GCN-V's config, GCN-E's config, rho) from the train job's flags."""
    from ltc_ray.models.train_e import TrainEConfig

    edge_cfg = TrainEConfig(seed=seed)
    if options.get("edge_epochs") is not None:
        edge_cfg.epochs = options["edge_epochs"]
    rho = options.get("rho")
    return v_config(options, seed), edge_cfg, 0.2 if rho is None else float(rho)


@ray.remote
def _train_gcn_e(info: FeatureInfo, labels_uri: str, output: str, cfg, v_cfg, k: int,
                 edge_k: int, rho: float, tau: float, folds: int, threads: int) -> dict:
    """Train GCN-E on out-of-fold GCN-V outputs (:mod:`ltc_ray.models.crossfit`): each
    identity fold's features, confidences and kNN graphs come from a GCN-V trained on the
    other folds, as a test split's do. Links the folds with GCN-V's tau (tuned on the whole
    split) and records the out-of-fold metrics."""
    import torch

    from ltc_ray.models.crossfit import out_of_fold_gcn_v
    from ltc_ray.models.gcn_e import confidence_quantile
    from ltc_ray.models.store import save_gcn_e
    from ltc_ray.models.train_e import train_gcn_e

    torch.set_num_threads(max(1, threads))
    so = info.storage_options
    n = info.n_rows
    t0 = time.perf_counter()
    x = read_features(info, 0, n)
    labels = read_labels(labels_uri, expected_rows=n, storage_options=so)
    oof = out_of_fold_gcn_v(x, labels, v_cfg, k, edge_k, folds)
    del x
    crossfit_seconds = time.perf_counter() - t0
    h, conf, ids, sims = oof.hidden, oof.confidence, oof.knn_ids, oof.knn_sims
    model, history = train_gcn_e(h, conf, ids, sims, oof.labels, cfg)
    threshold = confidence_quantile(conf, rho)
    part = LinkHaloPartition(0, n, ids, sims, lambda q: h[q], lambda q: (ids[q], sims[q]))
    link = gcn_e_links(model, part, conf, threshold, tau, batch_size=256)
    cid, _, _ = merge_edges(n, [(link.src, link.dst)])
    meta = {
        "k": int(ids.shape[1]),
        "rho": rho,
        "thresholds": {"tau": tau},
        "crossfit": {"folds": int(folds), "gcn_v_k": int(k),
                     "seconds": round(crossfit_seconds, 3)},
        "train_metrics": evaluate(oof.labels, cid),  # out of fold: the folds side by side
        "train_config": asdict(cfg),
        "history": history,
        "train_seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    save_gcn_e(output, model, meta, so)
    return meta


def train(ctx: TrainContext) -> dict:
    """GCN-V into ``<output>/gcn-v``, then GCN-E into ``<output>/gcn-e``."""
    import dataclasses

    v_cfg, edge_cfg, rho = ctx.train_config
    meta = train_gcn_v(dataclasses.replace(ctx, train_config=v_cfg),
                       join_uri(ctx.output, "gcn-v"))
    info = ctx.info
    with ctx.stages.stage("train_e", rows=info.n_rows):
        meta["gcn_e"] = ray_get(_train_gcn_e.options(num_cpus=ctx.cpus).remote(
            info, ctx.labels, join_uri(ctx.output, "gcn-e"), edge_cfg, v_cfg, ctx.graph.k,
            EDGE_K, rho, meta["thresholds"]["tau"], CROSSFIT_FOLDS, ctx.cpus))
    log.info("trained gcn-e: rho=%.2f tau=%.2f, train pairwise F %.4f", rho,
             meta["gcn_e"]["thresholds"]["tau"], meta["gcn_e"]["train_metrics"]["pairwise_f"])
    return meta


def summary(meta: dict, features: str) -> list[str]:
    """The train job's closing lines: GCN-V's, then GCN-E's."""
    e = meta["gcn_e"]
    return [*v_summary(meta, features),
            f"gcn-e trained: rho={e['rho']:.2f}, tau={e['thresholds']['tau']:.2f}, train "
            f"pairwise F {100 * e['train_metrics']['pairwise_f']:.2f}"]
