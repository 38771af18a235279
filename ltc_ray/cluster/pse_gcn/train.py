"""PSE-GCN's trainer (``jobs/train.py --method pse-gcn``): the whole labelled split in one
worker. ``tau`` is tuned out of fold, as hard-clusters' is: per identity fold, a model
trained on the other folds embeds the held-out fold (its own kNN graph and re-ranking, as
an unseen split gets them) and tau maximises pairwise F over the folds' clusterings; then
the final model trains on the whole split. The model directory carries the re-ranking
and subgraph shapes and tau."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace

import numpy as np
import ray

from ltc_ray.cluster.components import merge_edges
from ltc_ray.cluster.pse_gcn import REFERENCE_TAU, RERANK
from ltc_ray.cluster.pse_gcn.link import confidence, peak_links
from ltc_ray.cluster.training import TrainContext, load_split, positive_flags, tune_threshold
from ltc_ray.errors import InputError
from ltc_ray.graph.knn_graph import KnnManifest
from ltc_ray.graph.rerank import rerank_graph
from ltc_ray.io.features import FeatureInfo
from ltc_ray.metrics import evaluate
from ltc_ray.runtime import peak_rss_bytes, ray_get

log = logging.getLogger("ltc_ray")
TAU_GRID = (0.30, 0.99, 0.01)  # cosine cuts searched on the out-of-fold embeddings


def train_config(options: dict, seed: int):
    """PSE-GCN's training config from the train job's flags."""
    from ltc_ray.models.train_pse import TrainPSEConfig

    cfg = positive_flags(TrainPSEConfig(seed=seed), options,
                         {"epochs": "epochs", "lr": "lr", "batch_rows": "batch_size",
                          "hidden": "hidden"})
    folds = options.get("tune_folds")
    cfg_folds = 2 if folds is None else int(folds)
    if cfg_folds < 0 or cfg_folds == 1:
        raise InputError("--tune-folds", f"must be 0 or at least 2, got {folds}")
    return cfg, cfg_folds


def rerank_shape(k: int) -> dict[str, int]:
    """The reference's re-ranking on a graph of ``k`` columns (k1 at most k)."""
    k1 = min(RERANK["k1"], k)
    return {"k1": k1, "k2": max(1, min(RERANK["k2"], k1)),
            "expand": min(RERANK["expand"], k), "top": RERANK["top"]}


def _whole(a: np.ndarray, b: np.ndarray | None = None):
    """A callback serving rows of whole arrays (one process holds the split)."""
    if b is None:
        return lambda q: a[np.asarray(q, dtype=np.int64)]
    return lambda q: (a[np.asarray(q, dtype=np.int64)], b[np.asarray(q, dtype=np.int64)])


def embed_split(model, x, knn_ids, knn_sims, rr_ids, rr_sims, cfg) -> np.ndarray:
    """Embeddings of every row of a split held whole."""
    import torch

    from ltc_ray.models.pse_gcn import embed_nodes

    with torch.no_grad():
        return embed_nodes(model, np.arange(len(x), dtype=np.int64), _whole(x),
                           _whole(knn_ids, knn_sims), _whole(rr_ids, rr_sims), cfg.hop1,
                           cfg.hop2, local_k=cfg.local_k, batch_size=32)


def _graph(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from ltc_ray.knn.search import exact_knn

    ids, sims = exact_knn(np.ascontiguousarray(x, dtype=np.float32), min(k, len(x) - 1))
    return ids.astype(np.int64), sims.astype(np.float32)


def _fit(x, ids, sims, labels, shape, cfg):
    from ltc_ray.models.train_pse import train_pse_gcn

    rr_ids, rr_sims = rerank_graph(ids, **shape)
    return train_pse_gcn(x, ids, sims, rr_ids, rr_sims, labels, cfg)


def link_edges(emb_ids: np.ndarray, emb_sims: np.ndarray):
    """``edges_at(tau)`` over a whole embedding graph (confidences computed once)."""
    conf = confidence(emb_sims)
    nbr = np.where(emb_ids >= 0, conf[np.maximum(emb_ids, 0)], -np.inf)
    nodes = np.arange(len(emb_ids), dtype=np.int64)

    def edges_at(tau: float):
        link = peak_links(nodes, emb_ids, emb_sims, conf, nbr, tau)
        return link.src, link.dst

    return edges_at


def out_of_fold_tau(x, labels, k: int, folds: int, cfg) -> tuple[float, dict]:
    """tau by pairwise F over the held-out folds' clusterings, and what was measured."""
    from ltc_ray.models.crossfit import identity_folds

    t0 = time.perf_counter()
    fold_of = identity_folds(labels, folds, cfg.seed)
    smallest = int(np.bincount(fold_of, minlength=folds).min())
    kf = min(k, smallest - 1)
    if kf < 2:
        raise InputError("--tune-folds", f"a fold of {smallest} samples is too small")
    shape = rerank_shape(kf)
    order, graphs, offset = [], [], 0
    for f in range(folds):
        train_rows, held = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
        xt = x[train_rows]
        model, history = _fit(xt, *_graph(xt, kf), labels[train_rows], shape,
                              replace(cfg, hop1=min(cfg.hop1, shape["top"] - 1)))
        del xt
        xh = x[held]
        ids, sims = _graph(xh, kf)
        emb = embed_split(model, xh, ids, sims, *rerank_graph(ids, **shape), cfg)
        e_ids, e_sims = _graph(emb, kf)
        graphs.append((np.where(e_ids >= 0, e_ids + offset, -1), e_sims))
        order.append(held)
        offset += len(held)
        log.info("pse-gcn cross-fit: fold %d/%d, model on %d rows (last loss %.4f), %d held "
                 "out", f + 1, folds, len(train_rows), history[-1]["loss"] if history
                 else float("nan"), len(held))
    order = np.concatenate(order)
    oof_labels = labels[order]
    edges_at = link_edges(np.concatenate([g[0] for g in graphs]),
                          np.concatenate([g[1] for g in graphs]))
    tau, scores = tune_threshold(oof_labels, edges_at, TAU_GRID)
    cid, _, _ = merge_edges(len(order), [edges_at(tau)])
    return tau, {"folds": folds, "k": kf, "seconds": round(time.perf_counter() - t0, 3),
                 "metrics": evaluate(oof_labels, cid),
                 "tau_search": {f"{t:.2f}": round(v, 5) for t, v in sorted(scores.items())}}


@ray.remote
def _train(info: FeatureInfo, graph: KnnManifest, labels_uri: str, output: str, cfg,
           folds: int, tau_param: float | None, threads: int) -> dict:
    import torch

    from ltc_ray.models.store import data_fingerprint, save_net

    torch.set_num_threads(max(1, threads))
    t0 = time.perf_counter()
    x, ids, sims, labels = load_split(info, graph, labels_uri)
    ids = ids.astype(np.int64)
    k = int(ids.shape[1])
    shape = rerank_shape(k)
    cfg = replace(cfg, hop1=min(cfg.hop1, shape["top"] - 1), threads=threads)
    meta: dict = {}
    tau = REFERENCE_TAU if tau_param is None else float(tau_param)
    if folds and tau_param is None:
        tau, meta["crossfit"] = out_of_fold_tau(x, labels, k, folds, cfg)
    t1 = time.perf_counter()
    model, history = _fit(x, ids, sims, labels, shape, cfg)
    meta.update({
        "k": k, "rerank": shape, "hop1": cfg.hop1, "hop2": cfg.hop2, "local_k": cfg.local_k,
        "thresholds": {"tau": tau}, "train_config": asdict(cfg), "history": history,
        "fingerprint": data_fingerprint(info.uri, len(labels), info.dim, labels),
        "train_seconds": round(time.perf_counter() - t1, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_bytes": peak_rss_bytes()})
    save_net(output, model, "pse-gcn", meta, info.storage_options)
    return meta


def train(ctx: TrainContext) -> dict:
    """PSE-GCN on the whole split in one worker (tau out of fold first)."""
    info = ctx.info
    cfg, folds = ctx.train_config
    with ctx.stages.stage("train", rows=info.n_rows):
        meta = ray_get(_train.options(num_cpus=ctx.cpus).remote(
            info, ctx.graph, ctx.labels, ctx.output, cfg, folds,
            ctx.config.methods.of("pse-gcn").tau, ctx.cpus))
    log.info("trained pse-gcn: tau=%.2f -> %s", meta["thresholds"]["tau"], ctx.output)
    return meta


def summary(meta: dict, features: str) -> list[str]:
    """The train job's closing lines."""
    line = (f"pse-gcn trained on {features}: hop1 {meta['hop1']}, hop2 {meta['hop2']}, "
            f"tau={meta['thresholds']['tau']:.2f}")
    cross = meta.get("crossfit")
    if cross:
        line += f" (out of fold: pairwise F {100 * cross['metrics']['pairwise_f']:.2f})"
    return [line]
