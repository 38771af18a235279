"""The Ray tasks of the score and link stages, by shape, and the global merge (the
executor, :mod:`ltc_ray.pipeline.executor`, decides when they run).

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

from ltc_ray.cluster.base import (
    ClusterMethod,
    LinkHaloPartition,
    LinkStageContext,
    PartitionInput,
    StageTools,
)
from ltc_ray.cluster.components import (
    dense_cluster_ids,
    merge_edges,
    representatives,
    spanning_forest,
)
from ltc_ray.cluster.whole_graph import labels_to_clusters
from ltc_ray.config import ClusterConfig
from ltc_ray.graph.knn_graph import KnnManifest, read_knn_rows
from ltc_ray.graph.ranking import first_true
from ltc_ray.graph.similarity_stats import rank_histograms
from ltc_ray.io.features import FeatureInfo, read_features
from ltc_ray.pipeline.halo import link_with_halo, score_with_halo, start_link_actors
from ltc_ray.pipeline.knn_stage import build_knn_graph
from ltc_ray.pipeline.stages import load_array, save_concat, slice_rows
from ltc_ray.runtime import delay_for_tests, peak_rss_bytes, ray_get, wait_all

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


@ray.remote(max_retries=3)
def histogram_partition(manifest: KnnManifest, start: int, stop: int, so: dict | None
                        ) -> tuple[np.ndarray, int]:
    """One partition's similarity histograms (summed by the executor) and peak RSS."""
    knn_ids, knn_sims = read_knn_rows(manifest, start, stop, so)
    return rank_histograms(knn_ids, knn_sims), peak_rss_bytes()


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
    edges = (spanning_forest(result.src, result.dst, manifest.n_rows) if forest
             else (result.src, result.dst))
    stats = {"edges": int(len(result.src)), "forest_edges": int(len(edges[0])),
             "peak_rss": peak_rss_bytes()}
    return result.parent, edges, stats


SMALL_GRAPH_BYTES = 64 * 2**20  # a rows-only halo linker reads a graph this small whole


def _halo_in_tasks(method: ClusterMethod, manifest: KnnManifest) -> bool:
    """A rows-only halo linker on the input graph (ARO) over a graph small enough to read
    whole in each task: tasks reuse warm workers, where link actors start new processes
    (seconds each; the same result either way)."""
    shape = method.shape
    row_bytes = manifest.k * 12  # int64 ids at most + float32 similarities
    return (not shape.link_halo_features and shape.score != "rescore" and not shape.link_reduce
            and manifest.n_rows * row_bytes <= SMALL_GRAPH_BYTES)


@ray.remote(num_returns=3, max_retries=3)
def _link_rows_halo(method: ClusterMethod, manifest: KnnManifest, start: int, stop: int,
                    so: dict | None, forest: bool, *score_parts):
    """The task of :func:`_halo_in_tasks`: the whole (small) graph is every row's halo."""
    delay_for_tests("link")
    scores = np.concatenate(score_parts)
    knn_ids, knn_sims = read_knn_rows(manifest, 0, manifest.n_rows, so)

    def rows_of(query):
        q = np.asarray(query, dtype=np.int64)
        return knn_ids[q], knn_sims[q]

    part = LinkHaloPartition(start, stop, knn_ids[start:stop], knn_sims[start:stop],
                             feats_of=None, rows_of=rows_of)
    result = method.link_halo(part, scores, None)
    edges = (spanning_forest(result.src, result.dst, manifest.n_rows) if forest
             else (result.src, result.dst))
    stats = {"edges": int(len(result.src)), "forest_edges": int(len(edges[0])),
             "peak_rss": peak_rss_bytes()}
    return result.parent, edges, stats


@ray.remote(max_retries=3)
def _edge_stats(raw: tuple, merged: tuple) -> dict:
    """A "stage" linker's partition: its edges and those the merge reads (its forest)."""
    return {"edges": int(len(raw[0])), "forest_edges": int(len(merged[0])),
            "peak_rss": peak_rss_bytes()}


@ray.remote(max_retries=3)
def _forest_of(edges: tuple, n_rows: int) -> tuple:
    return spanning_forest(edges[0], edges[1], n_rows)


@ray.remote
def _link_context(method: ClusterMethod, *score_parts):
    """The value a "halo" linker with ``link_reduce`` needs from all scores (GCN-E: the
    confidence quantile above which nodes use the model)."""
    return method.link_context(np.concatenate(score_parts))


@ray.remote(num_returns=3, max_retries=3)
def _merge(n_rows: int, n_parts: int, *refs):
    edge_lists, score_parts = refs[:n_parts], refs[n_parts:]
    cluster_id, sizes, _ = merge_edges(n_rows, list(edge_lists))
    reps = representatives(cluster_id, np.concatenate(score_parts), len(sizes))
    return cluster_id, (sizes, reps), peak_rss_bytes()


@ray.remote(num_returns=4, max_retries=3)
def _cluster_whole_graph(method: ClusterMethod, manifest: KnnManifest, so: dict | None,
                         features: FeatureInfo | None, *score_parts):
    """A whole-graph method in ONE task: read every kNN row from the graph files (and the
    features when its shape asks), cluster, then dense ids, summary and parents."""
    delay_for_tests("link")
    knn_ids, knn_sims = read_knn_rows(manifest, 0, manifest.n_rows, so)
    edges = int(np.count_nonzero(knn_ids[:, 1:] >= 0))
    x = None
    if method.shape.whole_graph_features:  # k-means: the features too
        if features is None:
            raise ValueError(f"{method.name} needs the feature matrix")
        x = read_features(features, 0, manifest.n_rows)
    labels = method.cluster_graph(knn_ids, knn_sims, x)
    del knn_ids, knn_sims, x
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


def stage_tools(so: dict | None, resources: dict | None = None, seed: int = 0) -> StageTools:
    """The machinery handed to a method's own stages (:class:`StageTools`)."""
    def start_actors(info, graph, ranges, cpus, gpus=0.0):
        return start_link_actors(info, graph, ranges, cpus, gpus, so)

    def build_graph(info, knn_config, directory):
        return build_knn_graph(info, knn_config, directory, resources or {}, seed)[0]

    return StageTools(
        start_actors=start_actors, build_graph=build_graph,
        save_array=lambda uri, *parts: save_concat.remote(uri, so, *parts),
        load_array=lambda uri, sha256=None: load_array.remote(uri, so, sha256),
        slice_rows=lambda ref, lo, hi: slice_rows.remote(ref, lo, hi))


@dataclass
class ClusterRefs:
    """Object refs to the stage's results, one entry per partition where it applies."""

    ranges: list[tuple[int, int]]
    scores: list
    parents: list
    cluster_id: object  # ref to (N,) int64
    summary: object  # ref to (sizes (C,), representative (C,))
    n_clusters: int


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
) -> tuple[list, list, int]:
    """Per-partition scores (refs); for "halo" scorers also the per-partition entries of
    node features written to ``feature_dir`` (when the shape emits them) and their width."""
    n = manifest.n_rows
    so = storage_options
    feature_parts: list = []
    width = 0
    with stage_log.stage("score", rows=n) as rec:
        if method.shape.score == "halo":
            if info is None:
                raise ValueError(f"method {method.name} needs the features (info)")
            scores, stat_refs, actors = score_with_halo(method, info, manifest, ranges, cpus,
                                                        feature_dir, gpus)
            stats = wait_all(stat_refs, f"score ({method.name})", "partition")
            for actor in actors:
                ray.kill(actor)
            rss = [s["peak_rss"] for s in stats]
            feature_parts = [s["feature_part"] for s in stats if s.get("feature_part")]
            width = max((s.get("feature_dim", 0) for s in stats), default=0)
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
    return scores, feature_parts, width


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
    gpus: float = 0.0,
    stage: tuple[str | None, dict, dict] = (None, {}, {}),
) -> ClusterRefs:
    """Link every partition given all scores, then the global merge. "halo" linkers (GCN-E,
    TPDi) link on actors over ``manifest``'s rows (and ``info``'s node features when the
    shape asks); "whole-graph" methods run in one task instead; "stage" linkers run their
    own step (given the score stage's directory, meta and file digests: ``stage``)."""
    n = manifest.n_rows
    so = storage_options
    shape = method.shape
    if shape.link == "whole-graph":  # one task over the whole graph (see cluster.whole_graph)
        return _whole_graph_stage(method, manifest, ranges, scores, so, stage_log, features)
    merge_mode = cfg.merge
    if merge_mode == "auto":
        merge_mode = "local" if n * (manifest.k - 1) <= cfg.merge_local_max_edges else "forest"
    forest = merge_mode == "forest"
    with stage_log.stage("link", rows=n) as rec:
        actors = []
        if shape.link == "stage":
            score_dir, score_meta, digests = stage
            out = method.stage_links(LinkStageContext(
                features, manifest, ranges, scores, cpus, gpus, score_dir, score_meta, so,
                digests, stage_tools(so)))
            parents, raw = out.parents, out.edges
            edges = [_forest_of.remote(e, manifest.n_rows) for e in raw] if forest else raw
            stat_refs = [_edge_stats.remote(r, e) for r, e in zip(raw, edges, strict=True)]
            rec.extra.update(out.stats)
        elif shape.link == "halo" and not _halo_in_tasks(method, manifest):
            context = None
            if shape.link_reduce:
                context = ray_get(_link_context.remote(method, *scores))
                rec.extra["link_context"] = context
            parents, edges, stat_refs, actors = link_with_halo(
                method, info if shape.link_halo_features else None, manifest,
                ranges, cpus, scores, forest, context, so)
        else:  # a task per partition: its rows (or, small rows-only halo linkers, all rows)
            task = _link_rows_halo if shape.link == "halo" else _link_partition
            method_ref = ray.put(method)
            triples = [task.remote(method_ref, manifest, lo, hi, so, forest, *scores)
                       for lo, hi in ranges]
            parents, edges, stat_refs = ([t[i] for t in triples] for i in range(3))
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


@ray.remote(max_retries=3)
def _attach_targets(manifest: KnnManifest, start: int, stop: int, so: dict | None,
                    cluster_id: np.ndarray, summary: tuple, threshold: float) -> np.ndarray:
    """Per owned row: the neighbour a singleton attaches to (its most similar kNN
    neighbour in a cluster of >= 2 with cosine >= ``threshold``), else -1."""
    knn_ids, knn_sims = read_knn_rows(manifest, start, stop, so)
    sizes = summary[0]
    nbr = knn_ids[:, 1:].astype(np.int64)
    safe = np.where(nbr >= 0, nbr, 0)
    single = sizes[cluster_id[start:stop]] == 1
    ok = (nbr >= 0) & (knn_sims[:, 1:] >= threshold) & (sizes[cluster_id[safe]] >= 2)
    col, has = first_true(ok)
    has &= single
    return np.where(has, nbr[np.arange(len(nbr)), col], -1)


@ray.remote(num_returns=3, max_retries=3)
def _apply_attach(cluster_id: np.ndarray, n_parts: int, *refs):
    """New dense ids and summary once every attaching singleton joined its target's
    cluster (targets are never singletons, so one pass suffices: no chains)."""
    targets = np.concatenate(refs[:n_parts])
    scores = np.concatenate(refs[n_parts:])
    moved = targets >= 0
    joined = cluster_id.copy()
    joined[moved] = cluster_id[targets[moved]]
    new_id, sizes, _ = dense_cluster_ids(joined)
    reps = representatives(new_id, scores, len(sizes))
    return new_id, (sizes, reps), int(np.count_nonzero(moved))


@ray.remote
def _attach_parents(parent: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.where(target >= 0, target, parent)


def attach_singletons(refs: ClusterRefs, manifest: KnnManifest, threshold: float,
                      so: dict | None, stage_log) -> ClusterRefs:
    """The optional label-free step after the merge (issue 15): every singleton whose
    most similar neighbour in a larger cluster is at cosine >= ``threshold`` joins that
    cluster (its parent becomes that neighbour). Per partition, then one relabel task;
    deterministic and independent of the partitioning."""
    n = manifest.n_rows
    with stage_log.stage("attach", rows=n) as rec:
        targets = [_attach_targets.remote(manifest, lo, hi, so, refs.cluster_id, refs.summary,
                                          threshold) for lo, hi in refs.ranges]
        cluster_id, summary, moved = _apply_attach.remote(refs.cluster_id, len(targets),
                                                          *targets, *refs.scores)
        parents = [_attach_parents.remote(p, t)
                   for p, t in zip(refs.parents, targets, strict=True)]
        moved = ray_get(moved)
        sizes, _ = ray_get(summary)
        rec.extra.update(attached=moved, threshold=threshold, n_clusters=len(sizes))
        log.info("attach: %d singletons joined a cluster at cosine >= %.3f; %d clusters",
                 moved, threshold, len(sizes))
    return ClusterRefs(ranges=refs.ranges, scores=refs.scores, parents=parents,
                       cluster_id=cluster_id, summary=summary, n_clusters=len(sizes))
