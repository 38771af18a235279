"""The clustering job end to end: plan -> kNN -> score/link/merge -> write -> commit.

Stages talk through artifacts in the run's work area (the kNN block files) and
Ray object refs; the driver holds the plan, refs and small summaries, never the
feature matrix or the N*k graph.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import ray

from ltc_ray import __version__
from ltc_ray.cluster import ClusterMethod, get_method
from ltc_ray.config import Config
from ltc_ray.errors import InputError
from ltc_ray.io.features import (
    FeatureInfo,
    check_unique_ids,
    inspect_features,
    read_ids,
    scan_features,
    write_parts_manifest,
)
from ltc_ray.io.fs import join_uri, uri_exists, url_to_fs
from ltc_ray.io.labels import read_labels
from ltc_ray.io.output import (
    METRICS,
    RUN,
    SUMMARY,
    check_output_location,
    commit,
    part_file,
    write_cluster_part,
    write_json,
    write_summary,
)
from ltc_ray.metrics import evaluate
from ltc_ray.pipeline.cluster_stage import (
    ClusterRefs,
    link_merge_stage,
    partition_ranges,
    run_cluster_stage,
    score_stage,
)
from ltc_ray.pipeline.knn_stage import build_knn_graph, import_ltc_knn
from ltc_ray.pipeline.runtime import StageLog, init_ray, peak_rss_bytes, ray_get, wait_all

log = logging.getLogger("ltc_ray")

VALIDATE_CHUNK_ROWS = 262144


@dataclass
class JobSpec:
    """Everything one clustering run needs; built by the CLI, validated here."""

    features: str
    output: str
    config: Config
    labels: str | None = None
    knn: str | None = None  # precomputed learn-to-cluster npz to reuse when it exists
    work_dir: str | None = None
    overwrite: bool = False
    num_cpus: int | None = None  # local Ray only
    storage_options: dict | None = field(default=None, repr=False)
    name: str | None = None  # e.g. "part1_test"

    @property
    def resolved_work_dir(self) -> str:
        return self.work_dir or self.output.rstrip("/") + ".work"


def preflight(spec: JobSpec, method: ClusterMethod) -> FeatureInfo:
    """Cheap checks before Ray starts: output location, file headers, method vs inputs."""
    check_output_location(spec.output, spec.overwrite, spec.storage_options)
    info = preflight_inputs(spec)
    method.check_inputs(info.dim, spec.features)
    return info


def preflight_inputs(spec: JobSpec) -> FeatureInfo:
    """Header-only checks of the inputs: format, N, D, k < N, labels present."""
    cfg = spec.config
    info = inspect_features(spec.features, cfg.dim, spec.storage_options)
    if cfg.knn.k >= info.n_rows:
        raise InputError(
            "config knn.k", f"k={cfg.knn.k} must be smaller than the number of samples "
            f"({info.n_rows} in {spec.features})",
        )
    if spec.labels is not None and not uri_exists(spec.labels, spec.storage_options):
        raise InputError(spec.labels, "label file not found")
    return info


@ray.remote(num_cpus=1, max_retries=3)
def _validate_chunk(info: FeatureInfo, start: int, stop: int) -> int:
    scan_features(info, start, stop)
    return peak_rss_bytes()


@ray.remote(num_cpus=1)
def _validate_labels(uri: str, n_rows: int, so: dict | None) -> int:
    read_labels(uri, expected_rows=n_rows, storage_options=so)
    return peak_rss_bytes()


@ray.remote(num_cpus=1)
def _validate_ids(info: FeatureInfo) -> int:
    ids = read_ids(info, 0, info.n_rows)
    if ids is not None:
        check_unique_ids(ids, info.uri)
    return peak_rss_bytes()


@ray.remote(max_retries=3)
def _write_part(index: int, start: int, stop: int, cluster_id: np.ndarray, score: np.ndarray,
                parent: np.ndarray, info: FeatureInfo, staging: str) -> tuple[str, int, int]:
    ids = read_ids(info, start, stop) if info.has_ids else None
    rel = part_file(index)
    rows = write_cluster_part(
        join_uri(staging, rel), np.arange(start, stop), cluster_id[start:stop], score, parent,
        ids, info.storage_options,
    )
    return rel, rows, peak_rss_bytes()


@ray.remote(max_retries=3)
def _write_summary(summary: tuple, staging: str, so: dict | None) -> int:
    sizes, reps = summary
    return write_summary(join_uri(staging, SUMMARY), sizes, reps, so)


@ray.remote
def read_labels_task(labels_uri: str, n_rows: int, so: dict | None) -> np.ndarray:
    return read_labels(labels_uri, expected_rows=n_rows, storage_options=so)


@ray.remote
def evaluate_task(labels: np.ndarray, cluster_id: np.ndarray) -> dict:
    return evaluate(labels, cluster_id)


def validate_inputs(spec: JobSpec, info: FeatureInfo, resources: dict, stages: StageLog) -> None:
    """Plan stage: scan every row (NaN/Inf/zero norm), labels and ids in parallel, so
    bad input fails before the expensive kNN work."""
    so = spec.storage_options
    with stages.stage("plan", rows=info.n_rows) as rec:
        checks = [
            _validate_chunk.remote(info, lo, min(lo + VALIDATE_CHUNK_ROWS, info.n_rows))
            for lo in range(0, info.n_rows, VALIDATE_CHUNK_ROWS)
        ]
        if spec.labels:
            checks.append(_validate_labels.remote(spec.labels, info.n_rows, so))
        if info.has_ids:
            checks.append(_validate_ids.remote(info))
        rec.worker_peak_rss_bytes = max(wait_all(checks, "validate", "chunk"))
        rec.extra["resources"] = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}


def knn_stage(spec: JobSpec, info: FeatureInfo, resources: dict, stages: StageLog):
    """Import a precomputed learn-to-cluster graph when one is given and present,
    else build it on Ray; either way the graph lands in ``<work>/knn``."""
    cfg = spec.config
    so = spec.storage_options
    with stages.stage("knn", rows=info.n_rows) as rec:
        knn_dir = join_uri(spec.resolved_work_dir, "knn")
        if spec.knn and cfg.knn.reuse and uri_exists(spec.knn, so):
            manifest, knn_stats = import_ltc_knn(spec.knn, info, cfg.knn, knn_dir)
        else:
            manifest, knn_stats = build_knn_graph(info, cfg.knn, knn_dir, resources, cfg.seed)
        rec.worker_peak_rss_bytes = knn_stats.pop("worker_peak_rss_bytes", 0)
        rec.extra.update(knn_stats)
        rec.skipped = bool(knn_stats.get("reused"))
    return manifest


def cluster_stages(spec: JobSpec, method: ClusterMethod, info: FeatureInfo,
                   manifest, resources: dict, stages: StageLog) -> ClusterRefs:
    """Score, link, merge. A method with a feature pass (GCN-V's paper setting) writes its
    node features, gets a second sharded kNN graph over them and links on that graph."""
    cfg, so = spec.config, spec.storage_options
    cpus = float(resources.get("CPU", 1))
    gpus = float(resources.get("GPU", 0)) if cfg.knn.gpu == "auto" else 0.0
    if not getattr(method, "feature_pass", False):
        return run_cluster_stage(method, manifest, cfg.cluster, cpus, so, stages, info=info,
                                 gpus=gpus)
    work = spec.resolved_work_dir
    feature_dir = join_uri(work, "node-features")
    ranges = partition_ranges(manifest.n_rows, cfg.cluster, cpus)
    scores, parts = score_stage(method, manifest, ranges, cpus, so, stages, info=info,
                                feature_dir=feature_dir, gpus=gpus)
    parts_uri = join_uri(feature_dir, "features.parts.json")
    write_parts_manifest(parts_uri, method.hidden, parts, so)
    feature_info = inspect_features(parts_uri, storage_options=so)
    knn_cfg = dataclasses.replace(cfg.knn, k=getattr(method, "feature_k", cfg.knn.k))
    # the graph to link on: over the GCN features (GCN-V's pass b) or, for a method that
    # only needs those features as node inputs, over the input features with its own k
    on_input = getattr(method, "edge_graph", "features") == "input"
    with stages.stage("knn_features", rows=info.n_rows) as rec:
        graph, knn_stats = build_knn_graph(
            info if on_input else feature_info, knn_cfg,
            join_uri(work, f"knn-{'input' if on_input else 'features'}-k{knn_cfg.k}"),
            resources, cfg.seed)
        rec.worker_peak_rss_bytes = knn_stats.pop("worker_peak_rss_bytes", 0)
        rec.extra.update(knn_stats)
    return link_merge_stage(method, graph, ranges, scores, cfg.cluster, so, stages,
                            info=feature_info, cpus=cpus)


def inputs_and_graph(spec: JobSpec):
    """Header checks, Ray, the parallel validation and the kNN graph: what every job over a
    labelled or unlabelled split does first. Returns (info, resources, stages, manifest)."""
    info = preflight_inputs(spec)
    resources = init_ray(spec.num_cpus)
    stages = StageLog()
    validate_inputs(spec, info, resources, stages)
    return info, resources, stages, knn_stage(spec, info, resources, stages)


def _versions() -> dict[str, str]:
    out = {"ltc_ray": __version__, "python": platform.python_version()}
    for pkg in ("ray", "faiss-cpu", "faiss-gpu", "numpy", "scipy", "pyarrow", "fsspec"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def run_job(spec: JobSpec) -> dict[str, Any]:
    """Run one clustering job; returns the run record (also written as run.json)."""
    t_start = time.perf_counter()
    cfg = spec.config
    so = spec.storage_options
    method = get_method(cfg.method, cfg)
    info = preflight(spec, method)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    work = spec.resolved_work_dir
    staging = join_uri(work, "staging", run_id)
    stages = StageLog()
    log.info("run %s: %s, N=%d, D=%d, method=%s, output=%s", run_id, spec.features,
             info.n_rows, info.dim, cfg.method, spec.output)

    resources = init_ray(spec.num_cpus)
    validate_inputs(spec, info, resources, stages)
    manifest = knn_stage(spec, info, resources, stages)

    refs = cluster_stages(spec, method, info, manifest, resources, stages)

    with stages.stage("write", rows=info.n_rows) as rec:
        writes = [
            _write_part.remote(i, lo, hi, refs.cluster_id, refs.scores[i], refs.parents[i],
                               info, staging)
            for i, (lo, hi) in enumerate(refs.ranges)
        ]
        summary_ref = _write_summary.remote(refs.summary, staging, so)
        metrics_ref = None
        if spec.labels:
            labels_ref = read_labels_task.remote(spec.labels, info.n_rows, so)
            metrics_ref = evaluate_task.remote(labels_ref, refs.cluster_id)
        written = wait_all(writes, "write", "file")
        part_rows = {rel: rows for rel, rows, _ in written}
        part_rows[SUMMARY] = ray_get(summary_ref)
        rec.worker_peak_rss_bytes = max(rss for _, _, rss in written)

    metrics = None
    if metrics_ref is not None:
        with stages.stage("metrics", rows=info.n_rows):
            metrics = ray_get(metrics_ref)
            write_json(join_uri(staging, METRICS), metrics, so)

    run_record = {
        "run_id": run_id,
        "name": spec.name,
        "method": cfg.method,
        "features": spec.features,
        "labels": spec.labels,
        "format": info.format,
        "n_samples": info.n_rows,
        "dim": info.dim,
        "n_clusters": refs.n_clusters,
        "config": cfg.to_dict(),
        "versions": _versions(),
        "stages": stages.to_dict(),
        "knn_recall": manifest.recall,
        "knn_source": manifest.source,
        "driver_peak_rss_bytes": peak_rss_bytes(),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "work_dir": work,
    }
    if metrics is not None:
        run_record["metrics"] = metrics
    write_json(join_uri(staging, RUN), run_record, so)
    with stages.stage("commit"):
        commit(staging, spec.output, part_rows, run_id, so)
    _remove(staging, so)
    log.info("done in %.1f s: %d clusters written to %s", run_record["wall_seconds"],
             refs.n_clusters, spec.output)
    return run_record


def _remove(uri: str, so: dict | None) -> None:
    fs, path = url_to_fs(uri, so)
    if fs.exists(path):
        fs.rm(path, recursive=True)
