"""The training job: kNN on a labelled split, then a model trained in one Ray worker.

The worker (not the driver) holds the split's features and graph. After training it
picks the linking threshold on the same training split, so the model directory
carries every threshold it needs and test labels are never looked at.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import ray

from ltc_ray.cluster.base import PartitionInput
from ltc_ray.cluster.components import merge_edges
from ltc_ray.cluster.density_peak import link_to_nearest_higher
from ltc_ray.config import Config
from ltc_ray.errors import InputError, storage_errors
from ltc_ray.graph.knn_graph import KnnManifest, read_knn_rows
from ltc_ray.io.features import (
    FeatureInfo,
    inspect_features,
    read_features,
    write_feature_part,
    write_parts_manifest,
)
from ltc_ray.io.fs import join_uri, url_to_fs
from ltc_ray.io.labels import read_labels
from ltc_ray.io.lock import sole_writer
from ltc_ray.io.output import check_output_disjoint
from ltc_ray.metrics import evaluate, pairwise_prf
from ltc_ray.models.store import MODEL_JSON, WEIGHTS, check_model_location
from ltc_ray.pipeline.job import JobSpec, inputs_and_graph
from ltc_ray.pipeline.knn_stage import build_knn_graph
from ltc_ray.pipeline.runtime import new_run_id, peak_rss_bytes, ray_get

log = logging.getLogger("ltc_ray")
TRAINABLE = ("gcn-v", "gcn-ve", "hard-clusters")
EDGE_K = 160  # GCN-E's candidate kNN size (learn-to-cluster's setting)
CROSSFIT_FOLDS = 2  # identity folds for GCN-E's out-of-fold training data
TAU_GRID = (0.30, 0.95, 0.01)


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


def tune_tau(knn_ids: np.ndarray, knn_sims: np.ndarray, confidence: np.ndarray,
             labels: np.ndarray) -> tuple[float, dict[float, float]]:
    """The nearest-higher linking threshold (GCN-V) tuned on the training split."""
    part = PartitionInput(0, len(labels), knn_ids, knn_sims)

    def edges_at(tau: float):
        link = link_to_nearest_higher(part, confidence, tau)
        return link.src, link.dst

    return tune_threshold(labels, edges_at)


def _link_and_score(knn_ids, knn_sims, confidence, labels, tau) -> dict:
    n = len(labels)
    link = link_to_nearest_higher(PartitionInput(0, n, knn_ids, knn_sims), confidence, tau)
    cid, _, _ = merge_edges(n, [(link.src, link.dst)])
    return evaluate(labels, cid)


def _load_split(info: FeatureInfo, graph: KnnManifest, labels_uri: str):
    """A whole training split in one worker: features ``(N, d)``, its kNN rows and labels."""
    so = info.storage_options
    n = info.n_rows
    x = read_features(info, 0, n)
    knn_ids, knn_sims = read_knn_rows(graph, 0, n, so)
    return x, knn_ids, knn_sims, read_labels(labels_uri, expected_rows=n, storage_options=so)


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
    x, knn_ids, knn_sims, labels = _load_split(info, manifest, labels_uri)
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
        "train_metrics_input_graph": _link_and_score(knn_ids, knn_sims, confidence, labels, tau),
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
    feature_metrics = _link_and_score(knn_ids, knn_sims, confidence, labels, tau2)
    meta = dict(meta)
    meta.pop("feature_part", None)
    meta["thresholds"] = {**meta["thresholds"], "tau2": tau2}
    meta["tau2_search"] = {f"{t:.2f}": round(f, 5) for t, f in sorted(tau2_scores.items())}
    meta["train_metrics_feature_graph"] = feature_metrics
    meta["train_metrics"] = meta["train_metrics_input_graph"]  # the default pass
    save_model(output, model, meta, so)
    return meta


@ray.remote
def _train_gcn_e(info: FeatureInfo, labels_uri: str, output: str, cfg, v_cfg, k: int,
                 edge_k: int, rho: float, tau: float, folds: int, threads: int) -> dict:
    """Train GCN-E on out-of-fold GCN-V outputs (:mod:`ltc_ray.models.crossfit`): each
    identity fold's features, confidences and kNN graphs come from a GCN-V trained on the
    other folds, as a test split's do. Links the folds with GCN-V's tau (tuned on the whole
    split) and records the out-of-fold metrics."""
    import torch

    from ltc_ray.cluster.gcn_ve import LinkHaloPartition, gcn_e_links
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


def _tpdi_edges(ids: np.ndarray, prob: np.ndarray, params):
    """``edges_at(tau)`` over a whole re-scored graph: NDDE density and TPDi computed once."""
    from ltc_ray.cluster.hard_clusters import link_by_tpdi, ndde_density, tpdi

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
    x, knn_ids, _, labels = _load_split(info, manifest, labels_uri)
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


def train(
    method: str,
    features: str,
    labels: str,
    output: str,
    config: Config,
    train_cfg,
    knn: str | None = None,
    work_dir: str | None = None,
    overwrite: bool = False,
    num_cpus: int | None = None,
    storage_options: dict | None = None,
    edge_cfg=None,
    rho: float = 0.2,
) -> dict:
    """Train ``method`` on a labelled split and write the model directory to ``output``
    (gcn-ve: ``output/gcn-v`` and ``output/gcn-e``; hard-clusters: the edge scorer, trained
    with ``edge_cfg``, a :class:`~ltc_ray.models.train_hc.EdgeTrainConfig`)."""
    if method not in TRAINABLE:
        raise InputError("--method", f"cannot train '{method}'; trainable: {', '.join(TRAINABLE)}")
    spec = JobSpec(features=features, labels=labels, knn=knn, output=output, config=config,
                   work_dir=work_dir or output.rstrip("/") + ".work", num_cpus=num_cpus,
                   storage_options=storage_options)
    with storage_errors(output):
        check_output_disjoint(output, {
            "feature file": features, "label file": labels, "kNN file": knn,
            "work directory (--work-dir)": spec.resolved_work_dir}, storage_options)
        check_model_location(output, overwrite, storage_options)
    with sole_writer(output, new_run_id(), storage_options,
                     lambda: check_model_location(output, overwrite, storage_options)
                     ) as (lock, old_files):  # fmt: skip
        meta = _train_locked(method, spec, train_cfg, edge_cfg, rho)
        lock.ensure_held()
        written = {f"{sub}{name}" for sub in (("gcn-v/", "gcn-e/") if method == "gcn-ve"
                                              else ("",)) for name in (WEIGHTS, MODEL_JSON)}
        for rel in sorted(set(old_files) - written):  # an earlier model's leftovers only
            _, path = url_to_fs(join_uri(output, rel), storage_options)
            url_to_fs(output, storage_options)[0].rm(path)
        return meta


def _train_locked(method: str, spec: JobSpec, train_cfg, edge_cfg, rho: float) -> dict:
    """:func:`train`'s work, holding the model directory's lock."""
    config, output, so, labels = spec.config, spec.output, spec.storage_options, spec.labels
    v_output = join_uri(output, "gcn-v") if method == "gcn-ve" else output
    info, resources, stages, manifest = inputs_and_graph(spec)
    cpus = max(1, int(resources.get("CPU", 1)))
    if method == "hard-clusters":
        from ltc_ray.models.train_hc import EdgeTrainConfig

        edge_cfg = edge_cfg or EdgeTrainConfig(seed=config.seed)
        with stages.stage("train", rows=info.n_rows):
            meta = ray_get(_train_hard_clusters.options(num_cpus=cpus).remote(
                info, manifest, labels, output, edge_cfg, config.methods.hard_clusters, cpus))
        meta["stages"] = stages.to_dict()
        log.info("trained hard-clusters: tau=%.2f, train pairwise F %.4f -> %s",
                 meta["thresholds"]["tau"], meta["train_metrics"]["pairwise_f"], output)
        return meta
    feature_dir = join_uri(spec.resolved_work_dir, "node-features")
    with stages.stage("train", rows=info.n_rows):
        train_cfg.seed = config.seed
        meta_ref, model_ref, conf_ref = _train_gcn_v.options(num_cpus=cpus).remote(
            info, manifest, labels, feature_dir, train_cfg, cpus)
        part = ray_get(meta_ref)["feature_part"]
    parts_uri = join_uri(feature_dir, "features.parts.json")
    write_parts_manifest(parts_uri, train_cfg.hidden, [tuple(part)], so)
    feature_info = inspect_features(parts_uri, storage_options=so, internal_parts=True)
    with stages.stage("knn_features", rows=info.n_rows):
        graph, _ = build_knn_graph(feature_info, config.knn,
                                   join_uri(spec.resolved_work_dir, "knn-features"), resources,
                                   config.seed)
    with stages.stage("tune_feature_pass", rows=info.n_rows):
        meta = ray_get(_finish_gcn_v.remote(meta_ref, model_ref, conf_ref, graph, labels, v_output,
                                            so))
    if method == "gcn-ve":
        from ltc_ray.models.train_e import TrainEConfig

        edge_cfg = edge_cfg or TrainEConfig(seed=config.seed)
        with stages.stage("train_e", rows=info.n_rows):
            meta["gcn_e"] = ray_get(_train_gcn_e.options(num_cpus=cpus).remote(
                info, labels, join_uri(output, "gcn-e"), edge_cfg, train_cfg, manifest.k,
                EDGE_K, rho, meta["thresholds"]["tau"], CROSSFIT_FOLDS, cpus))
        log.info("trained gcn-e: rho=%.2f tau=%.2f, train pairwise F %.4f", rho,
                 meta["gcn_e"]["thresholds"]["tau"], meta["gcn_e"]["train_metrics"]["pairwise_f"])
    meta["stages"] = stages.to_dict()
    log.info("trained %s: tau=%.2f (train F on the input graph %.4f), tau2=%.2f (feature "
             "graph %.4f) -> %s", method, meta["thresholds"]["tau"],
             meta["train_metrics_input_graph"]["pairwise_f"], meta["thresholds"]["tau2"],
             meta["train_metrics_feature_graph"]["pairwise_f"], output)
    return meta
