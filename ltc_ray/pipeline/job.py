"""The clustering job end to end: checks -> the executor's stages -> write -> commit.

The stages up to the merge are :mod:`ltc_ray.pipeline.executor`'s (shared with tune and
train); this module adds what only the job does: the output's checks and lock, the
Parquet parts, metrics, ``run.json`` and the commit.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import ray

from ltc_ray import __version__
from ltc_ray.cluster import ClusterMethod, get_method
from ltc_ray.config import Config
from ltc_ray.errors import InputError, storage_errors
from ltc_ray.io.features import (
    DEFAULT_BIN_DIM,
    FeatureInfo,
    feature_format,
    inspect_features,
    read_ids,
)
from ltc_ray.io.fs import join_uri, uri_exists, url_to_fs
from ltc_ray.io.knn_files import check_ltc_knn
from ltc_ray.io.labels import read_labels
from ltc_ray.io.lock import OutputLock, sole_writer
from ltc_ray.io.output import (
    METRICS,
    RUN,
    SUMMARY,
    check_output_disjoint,
    check_output_location,
    commit,
    part_file,
    write_cluster_part,
    write_json,
    write_summary,
)
from ltc_ray.metrics import evaluate, size_distribution, size_line
from ltc_ray.pipeline.executor import Inputs, Run, scan_small_inputs
from ltc_ray.pipeline.stages import fingerprint
from ltc_ray.runtime import StageLog, new_run_id, peak_rss_bytes, ray_get, wait_all

log = logging.getLogger("ltc_ray")


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


def preflight(spec: JobSpec, method: ClusterMethod) -> Inputs:
    """Cheap checks before Ray starts: output location, file headers, method vs inputs,
    and the full scan of inputs small enough to read in the driver."""
    so = spec.storage_options
    with storage_errors(spec.output):
        check_output_disjoint(spec.output, {
            "feature file": spec.features, "label file": spec.labels, "kNN file": spec.knn,
            "model": method.model_uri(), "work directory (--work-dir)": spec.resolved_work_dir},
            so)
        check_output_location(spec.output, spec.overwrite, so)
    inputs = preflight_inputs(spec)
    method.check_inputs(inputs.info.dim, spec.features)
    return inputs


def preflight_inputs(spec: JobSpec) -> Inputs:
    """Header checks of the inputs (format, N, D, k < N, labels present, a precomputed kNN
    that fits), then the full scan of the small ones. A storage failure (endpoint,
    credentials) here is an InputError naming the URI."""
    cfg, so = spec.config, spec.storage_options
    with storage_errors(spec.features):
        fmt = feature_format(spec.features)
        # dim is the width of a .bin; for self-describing formats only a cross-check, and
        # only when set (--dim, config) to other than the .bin default
        dim = cfg.dim if fmt == "bin" or cfg.dim != DEFAULT_BIN_DIM else None
        info = inspect_features(spec.features, dim, so)
    if cfg.knn.k >= info.n_rows:
        raise InputError(
            "config knn.k", f"k={cfg.knn.k} must be smaller than the number of samples "
            f"({info.n_rows} in {spec.features})",
        )
    if spec.labels is not None:
        with storage_errors(spec.labels):
            if not uri_exists(spec.labels, so):
                raise InputError(spec.labels, "label file not found")
    if spec.knn and cfg.knn.reuse:
        with storage_errors(spec.knn):
            if uri_exists(spec.knn, so):
                check_ltc_knn(spec.knn, info.n_rows, cfg.knn.k, so)
    inputs = Inputs(spec.features, info, spec.labels, spec.knn, so)
    scan_small_inputs(inputs)
    return inputs


def start_run(spec: JobSpec, stages: StageLog | None = None) -> Run:
    """Header checks, Ray, the parallel validation and the kNN graph: what every job over a
    labelled or unlabelled split does first (the job, tune, train)."""
    run = Run(preflight_inputs(spec), spec.config, spec.resolved_work_dir, spec.num_cpus,
              stages)
    run.prepare()
    return run


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
    method = get_method(cfg.method, cfg, spec.storage_options)
    inputs = preflight(spec, method)
    run_id = new_run_id()
    run = Run(inputs, cfg, spec.resolved_work_dir, spec.num_cpus)
    with sole_writer(spec.output, run_id, so,
                     lambda: check_output_location(spec.output, spec.overwrite, so)) as (lock, _):
        log.info("run %s: %s, N=%d, D=%d, method=%s, output=%s", run_id, spec.features,
                 inputs.info.n_rows, inputs.info.dim, cfg.method, spec.output)
        return _run_locked(spec, method, run, run_id, lock, t_start)


def _run_locked(spec: JobSpec, method: ClusterMethod, run: Run, run_id: str,
                lock: OutputLock, t_start: float) -> dict[str, Any]:
    """The job's work, holding the output's lock: Ray, the stages, the commit."""
    cfg, so, work = spec.config, spec.storage_options, spec.resolved_work_dir
    info, stages, store = run.info, run.stages, run.store
    staging = join_uri(work, "staging", run_id)
    manifest = run.prepare()
    refs = run.cluster(method)

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

    sizes = size_distribution(ray_get(refs.summary)[0])
    log.info("%s", size_line(sizes))
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
        "cluster_sizes": sizes,
        # ``auto`` parameters: the values derived from this graph and the statistics behind
        "derived_parameters": run.derived,
        "similarity": run.similarity_summary(),
        "shift_warnings": run.shift_warnings,
        "config": cfg.to_dict(),
        "versions": _versions(),
        "stages": stages.to_dict(),
        "knn_recall": manifest.recall,
        "knn_source": manifest.source,
        "driver_peak_rss_bytes": peak_rss_bytes(),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "work_dir": work,
        "reused_stages": list(store.reused),
        "stage_fingerprints": dict(store.fingerprints),
    }
    if metrics is not None:
        run_record["metrics"] = metrics
    write_json(join_uri(staging, RUN), run_record, so)
    with stages.stage("commit"):
        lock.ensure_held()
        commit(staging, spec.output, part_rows, run_id, so)
    fs, path = url_to_fs(staging, so)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    # the write stage is never skipped (its completion is _SUCCESS); its marker records
    # which run committed what, from which link result
    write_in = {"upstream": store.fingerprints.get("link"), "output": spec.output}
    try:
        store.finish("write", fingerprint(write_in), write_in, {"run_id": run_id})
    except Exception as exc:  # noqa: BLE001 - the result is committed; a note must not fail it
        log.warning("could not record the write stage's marker: %s", exc)
    log.info("done in %.1f s: %d clusters written to %s", run_record["wall_seconds"],
             refs.n_clusters, spec.output)
    return run_record
