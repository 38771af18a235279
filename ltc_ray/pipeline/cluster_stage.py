"""Per-partition scoring and linking on Ray, then the global merge.

Each partition task reads only its own rows of the kNN graph. Link tasks see every
node's score (N float32, shared zero-copy through the object store) and, in forest
mode, reduce their edges to a star forest before anything leaves the worker. The
merge runs in one worker task over O(N) forest edges; the driver holds only refs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import ray

from ltc_ray.cluster.base import ClusterMethod, PartitionInput
from ltc_ray.cluster.components import merge_edges, representatives, spanning_forest
from ltc_ray.config import ClusterConfig
from ltc_ray.graph.knn_graph import KnnManifest, read_knn_rows
from ltc_ray.io.features import FeatureInfo, read_features
from ltc_ray.pipeline.halo import link_with_halo, score_with_halo
from ltc_ray.pipeline.runtime import peak_rss_bytes, ray_get, wait_all
from ltc_ray.pipeline.stages import delay_for_tests, slice_rows

log = logging.getLogger("ltc_ray")


def partition_ranges(n_rows: int, cfg: ClusterConfig, cpus: float) -> list[tuple[int, int]]:
    """Contiguous row ranges, one per partition (results never depend on the count)."""
    n_parts = cfg.partitions or max(
        math.ceil(n_rows / cfg.partition_rows), min(int(cpus), math.ceil(n_rows / 20000))
    )
    n_parts = max(1, min(n_parts, n_rows))
    bounds = np.linspace(0, n_rows, n_parts + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _load(manifest: KnnManifest, start: int, stop: int, so: dict | None) -> PartitionInput:
    knn_ids, knn_sims = read_knn_rows(manifest, start, stop, so)
    return PartitionInput(start=start, stop=stop, knn_ids=knn_ids, knn_sims=knn_sims)


@ray.remote(num_returns=2, max_retries=3)
def _score_partition(method: ClusterMethod, manifest: KnnManifest, start: int, stop: int,
                     so: dict | None):
    delay_for_tests("score")
    scores = method.score(_load(manifest, start, stop, so))
    return scores, peak_rss_bytes()


@ray.remote(num_returns=3, max_retries=3)
def _link_partition(method: ClusterMethod, manifest: KnnManifest, start: int, stop: int,
                    so: dict | None, forest: bool, *score_parts):
    delay_for_tests("link")
    scores = np.concatenate(score_parts)
    result = method.link(_load(manifest, start, stop, so), scores)
    edges = spanning_forest(result.src, result.dst) if forest else (result.src, result.dst)
    stats = {"edges": int(len(result.src)), "forest_edges": int(len(edges[0])),
             "peak_rss": peak_rss_bytes()}
    return result.parent, edges, stats


@ray.remote
def _confidence_quantile(rho: float, *score_parts) -> float:
    from ltc_ray.models.gcn_e import confidence_quantile

    return confidence_quantile(np.concatenate(score_parts), rho)


@ray.remote(num_returns=3, max_retries=3)
def _merge(n_rows: int, n_parts: int, *refs):
    edge_lists, score_parts = refs[:n_parts], refs[n_parts:]
    cluster_id, sizes, _ = merge_edges(n_rows, list(edge_lists))
    reps = representatives(cluster_id, np.concatenate(score_parts), len(sizes))
    return cluster_id, (sizes, reps), peak_rss_bytes()


@ray.remote(num_returns=4, max_retries=3)
def _cluster_whole_graph(method: ClusterMethod, manifest: KnnManifest, so: dict | None,
                         features: FeatureInfo | None, *score_parts):
    """A whole-graph method (``cluster.whole_graph``) in ONE task: read every kNN row
    from the graph files, cluster, then dense ids, summary and parents."""
    from ltc_ray.cluster.whole_graph import labels_to_clusters

    delay_for_tests("link")
    knn_ids, knn_sims = read_knn_rows(manifest, 0, manifest.n_rows, so)
    edges = int(np.count_nonzero(knn_ids[:, 1:] >= 0))
    if getattr(method, "needs_features", False):  # k-means: the features too
        if features is None:
            raise ValueError(f"{method.name} needs the feature matrix")
        labels = method.cluster_features(read_features(features, 0, manifest.n_rows),
                                         knn_ids, knn_sims)
    else:
        labels = method.cluster_graph(knn_ids, knn_sims)
    del knn_ids, knn_sims
    cluster_id, sizes, reps, parent = labels_to_clusters(labels, np.concatenate(score_parts))
    stats = {"edges": edges, "peak_rss": peak_rss_bytes()}
    return cluster_id, (sizes, reps), parent, stats


def _whole_graph_stage(method: ClusterMethod, manifest: KnnManifest,
                       ranges: list[tuple[int, int]], scores: list, so: dict | None,
                       stage_log, features: FeatureInfo | None = None) -> ClusterRefs:
    n = manifest.n_rows
    with stage_log.stage("link", rows=n) as rec:
        cluster_id, summary, parent, stats_ref = _cluster_whole_graph.remote(
            method, manifest, so, features, *scores)
        stats = ray_get(stats_ref)
        rec.worker_peak_rss_bytes = stats["peak_rss"]
        rec.extra.update(edges=stats["edges"], merge_mode="whole-graph")
    with stage_log.stage("merge", rows=n) as rec:
        sizes, _ = ray_get(summary)
        rec.extra["n_clusters"] = len(sizes)
        log.info("%s (whole graph): %d clusters, largest %d", method.name, len(sizes),
                 int(sizes[0]) if len(sizes) else 0)
    parents = [slice_rows.remote(parent, lo, hi) for lo, hi in ranges]
    return ClusterRefs(ranges=ranges, scores=scores, parents=parents, cluster_id=cluster_id,
                       summary=summary, n_clusters=len(sizes))


@dataclass
class ClusterRefs:
    """Object refs to the stage's results, one entry per partition where it applies."""

    ranges: list[tuple[int, int]]
    scores: list
    parents: list
    cluster_id: object  # ref to (N,) int64
    summary: object  # ref to (sizes (C,), representative (C,))
    n_clusters: int


def run_cluster_stage(
    method: ClusterMethod,
    manifest: KnnManifest,
    cfg: ClusterConfig,
    cpus: float,
    storage_options: dict | None,
    stage_log,
    scores: list | None = None,
    info: FeatureInfo | None = None,
    feature_dir: str | None = None,
    link_manifest: KnnManifest | None = None,
    gpus: float = 0.0,
) -> ClusterRefs:
    """Score, link and merge; returns refs (the driver never materialises N-sized data).

    ``scores`` (refs from an earlier call with the same partitioning) skips scoring:
    tuning a link threshold re-links without re-scoring. ``link_manifest`` links on
    another graph than the one scored on (GCN-V's pass over its own features).
    """
    ranges = partition_ranges(manifest.n_rows, cfg, cpus)
    if scores is None or len(scores) != len(ranges):
        scores, _ = score_stage(method, manifest, ranges, cpus, storage_options, stage_log,
                                info=info, feature_dir=feature_dir, gpus=gpus)
    return link_merge_stage(method, link_manifest or manifest, ranges, scores, cfg,
                            storage_options, stage_log, features=info)


def score_stage(
    method: ClusterMethod,
    manifest: KnnManifest,
    ranges: list[tuple[int, int]],
    cpus: float,
    storage_options: dict | None,
    stage_log,
    info: FeatureInfo | None = None,
    feature_dir: str | None = None,
    gpus: float = 0.0,
) -> tuple[list, list]:
    """Per-partition scores (refs); for halo methods also the per-partition entries of
    node features written to ``feature_dir`` (when the method emits them)."""
    n = manifest.n_rows
    so = storage_options
    feature_parts: list = []
    with stage_log.stage("score", rows=n) as rec:
        if method.needs_halo:
            if info is None:
                raise ValueError(f"method {method.name} needs the features (info)")
            scores, stat_refs, actors = score_with_halo(method, info, manifest, ranges, cpus,
                                                        feature_dir, gpus)
            stats = wait_all(stat_refs, f"score ({method.name})", "partition")
            for actor in actors:
                ray.kill(actor)
            rss = [s["peak_rss"] for s in stats]
            feature_parts = [s["feature_part"] for s in stats if s.get("feature_part")]
            rec.extra["halo_rows"] = sum(s["halo"] for s in stats)
            rec.extra["actor_peak_rss_bytes"] = rss
        else:
            method_ref = ray.put(method)
            pairs = [_score_partition.remote(method_ref, manifest, lo, hi, so)
                     for lo, hi in ranges]
            scores = [p[0] for p in pairs]
            rss = wait_all([p[1] for p in pairs], f"score ({method.name})", "partition")
        rec.worker_peak_rss_bytes = max(rss)
        rec.extra["partitions"] = len(ranges)
    return scores, feature_parts


def link_merge_stage(
    method: ClusterMethod,
    manifest: KnnManifest,
    ranges: list[tuple[int, int]],
    scores: list,
    cfg: ClusterConfig,
    storage_options: dict | None,
    stage_log,
    info: FeatureInfo | None = None,
    cpus: float = 1.0,
    features: FeatureInfo | None = None,
) -> ClusterRefs:
    """Link every partition given all scores, then the global merge. Methods that link
    with a two-hop halo (GCN-E) link on actors over ``manifest``'s rows of ``info``.
    Whole-graph methods (``method.whole_graph``) run in one task instead."""
    n = manifest.n_rows
    so = storage_options
    if method.whole_graph:  # one task over the whole graph (see cluster.whole_graph)
        return _whole_graph_stage(method, manifest, ranges, scores, so, stage_log, features)
    merge_mode = cfg.merge
    if merge_mode == "auto":
        merge_mode = "local" if n * (manifest.k - 1) <= cfg.merge_local_max_edges else "forest"
    forest = merge_mode == "forest"
    with stage_log.stage("link", rows=n) as rec:
        actors = []
        if method.needs_link_halo:
            threshold = None
            if hasattr(method, "rho"):  # GCN-E: the top-rho confidence share uses the model
                threshold = ray_get(_confidence_quantile.remote(method.rho, *scores))
                rec.extra["model_threshold"] = threshold
            parents, edges, stat_refs, actors = link_with_halo(
                method, info if method.link_features else None, manifest,
                ranges, cpus, scores, forest, threshold, so)
        else:
            method_ref = ray.put(method)
            triples = [_link_partition.remote(method_ref, manifest, lo, hi, so, forest, *scores)
                       for lo, hi in ranges]
            parents = [t[0] for t in triples]
            edges = [t[1] for t in triples]
            stat_refs = [t[2] for t in triples]
        stats = wait_all(stat_refs, f"link ({method.name})", "partition")
        for actor in actors:
            ray.kill(actor)
        rec.worker_peak_rss_bytes = max(s["peak_rss"] for s in stats)
        rec.extra.update(
            edges=sum(s["edges"] for s in stats),
            forest_edges=sum(s["forest_edges"] for s in stats),
            merge_mode=merge_mode,
        )
        if actors:  # rows fetched from other partitions' actors, in how many requests
            rec.extra["halo_rows"] = sum(s["halo"] for s in stats)
            rec.extra["halo_requests"] = sum(s["halo_requests"] for s in stats)

    with stage_log.stage("merge", rows=n) as rec:
        cluster_id, summary, rss = _merge.remote(n, len(edges), *edges, *scores)
        rec.worker_peak_rss_bytes = ray_get(rss)
        sizes, _ = ray_get(summary)
        rec.extra["n_clusters"] = len(sizes)
        log.info("merge: %d clusters, largest %d", len(sizes), int(sizes[0]) if len(sizes) else 0)
    return ClusterRefs(ranges=ranges, scores=scores, parents=parents, cluster_id=cluster_id,
                       summary=summary, n_clusters=len(sizes))
