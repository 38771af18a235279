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
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import ray

from ltc_ray import __version__
from ltc_ray.cluster import ClusterMethod, get_method
from ltc_ray.config import Config
from ltc_ray.errors import InputError, storage_errors
from ltc_ray.graph.knn_graph import load_manifest
from ltc_ray.io.features import (
    DEFAULT_BIN_DIM,
    FeatureInfo,
    check_unique_ids,
    feature_format,
    inspect_features,
    read_ids,
    scan_features,
    write_parts_manifest,
)
from ltc_ray.io.fs import file_size, join_uri, uri_exists, url_to_fs
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
from ltc_ray.metrics import evaluate
from ltc_ray.pipeline.cluster_stage import (
    ClusterRefs,
    link_merge_stage,
    partition_ranges,
    score_stage,
)
from ltc_ray.pipeline.knn_stage import build_knn_graph, import_ltc_knn
from ltc_ray.pipeline.runtime import (
    StageLog,
    init_ray,
    new_run_id,
    peak_rss_bytes,
    ray_get,
    wait_all,
)
from ltc_ray.pipeline.stages import (
    StageStore,
    fingerprint,
    graph_artifacts,
    load_array,
    load_pair,
    save_concat,
    save_pair,
    slice_rows,
    tree_digest,
)

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


# Inputs up to this size are scanned (rows, labels, ids) in the driver before Ray starts:
# milliseconds of reading, where a Ray start costs seconds. Larger ones are scanned in
# parallel by Ray tasks in the plan stage, still before the kNN.
DRIVER_SCAN_MAX_BYTES = 4 * 2**20


def preflight(spec: JobSpec, method: ClusterMethod) -> FeatureInfo:
    """Cheap checks before Ray starts: output location, file headers, method vs inputs,
    and the full scan of inputs small enough to read in the driver."""
    so = spec.storage_options
    with storage_errors(spec.output):
        model = getattr(method.params, "model", "") or None
        check_output_disjoint(spec.output, {
            "feature file": spec.features, "label file": spec.labels, "kNN file": spec.knn,
            "model": model, "work directory (--work-dir)": spec.resolved_work_dir}, so)
        check_output_location(spec.output, spec.overwrite, so)
    info = preflight_inputs(spec)
    method.check_inputs(info.dim, spec.features)
    return info


def preflight_inputs(spec: JobSpec) -> FeatureInfo:
    """Header checks of the inputs (format, N, D, k < N, labels present, a precomputed kNN
    that fits), then :func:`driver_scans` of the small ones. A storage failure (endpoint,
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
    small = driver_scans(spec, info)
    with storage_errors(spec.features):
        if "rows" in small:
            scan_features(info, 0, info.n_rows)
        if "ids" in small:
            check_unique_ids(read_ids(info, 0, info.n_rows), info.uri)
    if "labels" in small:
        with storage_errors(spec.labels):
            read_labels(spec.labels, expected_rows=info.n_rows, storage_options=so)
    return info


def driver_scans(spec: JobSpec, info: FeatureInfo) -> set[str]:
    """Which full-input checks ("rows", "labels", "ids") are small enough for the driver
    (:data:`DRIVER_SCAN_MAX_BYTES`); :func:`validate_inputs` runs the others on Ray."""
    small = set()
    if info.n_rows * info.row_bytes <= DRIVER_SCAN_MAX_BYTES:
        small.add("rows")
    if info.has_ids and 8 * info.n_rows <= DRIVER_SCAN_MAX_BYTES:
        small.add("ids")
    if spec.labels is not None:
        with storage_errors(spec.labels):
            if file_size(spec.labels, spec.storage_options) <= DRIVER_SCAN_MAX_BYTES:
                small.add("labels")
    return small


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


def validate_inputs(spec: JobSpec, info: FeatureInfo, resources: dict, stages: StageLog,
                    store: StageStore | None = None) -> None:
    """Plan stage: scan every row (NaN/Inf/zero norm), labels and ids in parallel, so
    bad input fails before the expensive kNN work. With a ``store``, a completed scan of
    the same input versions (content hashes for small files) is reused."""
    so = spec.storage_options
    with stages.stage("plan", rows=info.n_rows) as rec:
        rec.extra["resources"] = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
        if store is not None:
            inputs = {
                "features": info.uri, "version": store.features_version(info),
                "format": info.format, "n_rows": info.n_rows, "dim": info.dim,
                "labels": spec.labels, "labels_version": store.input_version(spec.labels),
            }
            fp, marker = store.lookup("plan", inputs)
            rec.extra["fingerprint"] = fp
            if marker is not None:
                store.reuse("plan")
                rec.skipped = True
                return
            store.begin("plan")
        in_driver = driver_scans(spec, info)  # already checked by preflight_inputs
        rec.extra["checked_in_driver"] = sorted(in_driver)
        checks = []
        if "rows" not in in_driver:
            checks += [
                _validate_chunk.remote(info, lo, min(lo + VALIDATE_CHUNK_ROWS, info.n_rows))
                for lo in range(0, info.n_rows, VALIDATE_CHUNK_ROWS)
            ]
        if spec.labels and "labels" not in in_driver:
            checks.append(_validate_labels.remote(spec.labels, info.n_rows, so))
        if info.has_ids and "ids" not in in_driver:
            checks.append(_validate_ids.remote(info))
        rec.worker_peak_rss_bytes = max(wait_all(checks, "validate", "chunk"), default=0)
        if store is not None:
            store.finish("plan", fp, inputs, {"n_rows": info.n_rows, "dim": info.dim})


def _knn_keys(cfg, seed: int) -> dict:
    """The kNN config keys the graph depends on (not shards, mode or block size: the
    graph is the same whatever the layout)."""
    return {"k": cfg.k, "index": cfg.index, "nlist": cfg.nlist, "nprobe": cfg.nprobe,
            "seed": seed if cfg.index != "flat" else None}


def knn_stage(spec: JobSpec, info: FeatureInfo, resources: dict, stages: StageLog,
              store: StageStore | None = None):
    """Import a precomputed learn-to-cluster graph when one is given and present,
    else build it on Ray; either way the graph lands in ``<work>/knn``. With a ``store``,
    a completed graph for the same features, kNN keys and imported file (each keyed by its
    version) is reused when its manifest and every block file are intact; else (a
    deleted ``_DONE`` too) it is built or imported again."""
    cfg = spec.config
    so = spec.storage_options
    with stages.stage("knn", rows=info.n_rows) as rec:
        knn_dir = join_uri(spec.resolved_work_dir, "knn")
        use_import = bool(spec.knn and cfg.knn.reuse and uri_exists(spec.knn, so))
        if store is not None:
            # the features themselves, not the plan: new labels must not cost the graph
            inputs = {"features": [info.uri, store.features_version(info), info.n_rows,
                                   info.dim],
                      **_knn_keys(cfg.knn, cfg.seed),
                      "import": [spec.knn, store.input_version(spec.knn)] if use_import else None}
            fp, marker = store.lookup("knn", inputs)
            rec.extra["fingerprint"] = fp
            manifest = load_manifest(knn_dir, so) if marker is not None else None
            if manifest is not None:
                store.reuse("knn")
                rec.skipped = True
                rec.extra["recall"] = manifest.recall
                return manifest
            store.begin("knn")
        if use_import:
            manifest, knn_stats = import_ltc_knn(spec.knn, info, cfg.knn, knn_dir)
        else:
            manifest, knn_stats = build_knn_graph(info, cfg.knn, knn_dir, resources, cfg.seed)
        rec.worker_peak_rss_bytes = knn_stats.pop("worker_peak_rss_bytes", 0)
        block_digests = knn_stats.pop("block_digests", None)  # (bytes, sha256) by block URI
        rec.extra.update(knn_stats)
        if store is not None:
            store.finish("knn", fp, inputs, {"source": manifest.source},
                         artifacts=graph_artifacts(manifest, block_digests))
    return manifest


def _method_inputs(method: ClusterMethod, keys: tuple[str, ...] | None,
                   model_digest: str | None) -> dict:
    """What a method stage depends on: the method, the params ``keys`` (None: all) and the
    model's content hash in place of its path."""
    params = dataclasses.asdict(method.params)
    if keys is not None:
        params = {key: params.get(key) for key in keys}
    params.pop("model", None)
    return {"method": method.name, "params": params, "model": model_digest}


def _row_slices(uri: str, ranges: list[tuple[int, int]], so: dict | None,
                sha256: str | None = None) -> list:
    """Refs to the per-partition slices of a stored (N,) array (loaded, and checked
    against the ``sha256`` its stage marker records, by a worker)."""
    full = load_array.remote(uri, so, sha256)
    return [slice_rows.remote(full, lo, hi) for lo, hi in ranges]


def cluster_stages(spec: JobSpec, method: ClusterMethod, info: FeatureInfo,
                   manifest, resources: dict, stages: StageLog,
                   store: StageStore) -> ClusterRefs:
    """Score, link, merge. A method with a feature pass (GCN-V's paper setting) writes its
    node features, gets a second sharded kNN graph over them and links on that graph.

    Each of score, knn_features and link (with the merge) is a resumable stage: its
    results are stored under ``store`` and reused when its fingerprint matches and every
    artifact (arrays, the re-scored or feature-pass graph with all its blocks, the node
    features) is intact; a damaged one makes that stage run again. A work file found
    damaged while a stage reads it is a WorkFileError that drops the marker vouching for
    it (:meth:`StageStore.heals`), so the rerun computes it again.
    """
    with store.heals():
        return _cluster_stages(spec, method, info, manifest, resources, stages, store)


def _cluster_stages(spec: JobSpec, method: ClusterMethod, info: FeatureInfo,
                    manifest, resources: dict, stages: StageLog,
                    store: StageStore) -> ClusterRefs:
    """The body of :func:`cluster_stages`."""
    cfg, so = spec.config, spec.storage_options
    cpus = float(resources.get("CPU", 1))
    gpus = float(resources.get("GPU", 0)) if cfg.knn.gpu == "auto" else 0.0
    n = manifest.n_rows
    feature_pass = bool(getattr(method, "feature_pass", False))
    model_uri = getattr(method.params, "model", "")
    model_digest = tree_digest(model_uri, so) if model_uri else None
    ranges = partition_ranges(n, cfg.cluster, cpus)
    work = spec.resolved_work_dir
    feature_dir = join_uri(work, "node-features") if feature_pass else None

    # -- score (model inference for learned methods)
    score_in = {"upstream": store.fingerprints.get("knn"),
                **_method_inputs(method, method.score_params, model_digest)}
    score_fp, marker = store.lookup("score", score_in)
    scores_uri = store.uri("score", "scores.npy")
    rescores = method.rescores_graph
    rescored_dir = join_uri(work, "knn-rescored")
    rescored = None  # the graph a rescoring method (hard-clusters) links on
    if marker is not None and rescores:
        rescored = load_manifest(rescored_dir, so)
        if rescored is None:
            marker = None  # the re-scored graph is gone: score again
    if marker is not None:
        scores = _row_slices(scores_uri, ranges, so, store.sha256(marker, scores_uri))
        if not store.loads_intact("score", scores):
            marker = None
    if marker is not None:
        with stages.stage("score", rows=n) as rec:
            store.reuse("score")
            rec.skipped = True
            rec.extra["fingerprint"] = score_fp
    elif rescores:
        from ltc_ray.pipeline.rescore import rescore_and_density

        store.begin("score")
        _remove(rescored_dir, so)
        with stages.stage("score", rows=n) as rec:
            scores, rescored, stats = rescore_and_density(method, info, manifest, ranges, cpus,
                                                          rescored_dir, gpus)
            rec.worker_peak_rss_bytes = max(stats["actor_peak_rss_bytes"])
            rec.extra.update(stats, partitions=len(ranges), fingerprint=score_fp)
        scores_digest = ray_get(save_concat.remote(scores_uri, so, *scores))
        store.finish("score", score_fp, score_in, {"partitions": len(ranges)},
                     artifacts={scores_uri: scores_digest, **graph_artifacts(rescored)})
    else:
        store.begin("score")
        scores, parts = score_stage(method, manifest, ranges, cpus, so, stages, info=info,
                                    feature_dir=feature_dir, gpus=gpus)
        artifacts = {}
        if feature_pass:  # the node features: their parts manifest and every part file
            parts_uri = join_uri(feature_dir, "features.parts.json")
            write_parts_manifest(parts_uri, method.hidden, parts, so)
            artifacts = dict.fromkeys([parts_uri, *(join_uri(feature_dir, part[2])
                                                    for part in parts)])  # fmt: skip
        artifacts[scores_uri] = ray_get(save_concat.remote(scores_uri, so, *scores))
        stages.stages["score"].extra["fingerprint"] = score_fp
        store.finish("score", score_fp, score_in, {"partitions": len(ranges)},
                     artifacts=artifacts)

    # -- knn_features (feature-pass methods): a second graph to link on
    graph, link_info, upstream = rescored or manifest, None, score_fp
    if feature_pass:
        parts_uri = join_uri(feature_dir, "features.parts.json")
        link_info = inspect_features(parts_uri, storage_options=so, internal_parts=True)
        knn_cfg = dataclasses.replace(
            cfg.knn, k=min(getattr(method, "feature_k", cfg.knn.k), info.n_rows - 1))
        # the graph to link on: over the GCN features (GCN-V's pass b) or, for a method that
        # only needs those features as node inputs, over the input features with its own k
        on_input = getattr(method, "edge_graph", "features") == "input"
        graph_dir = join_uri(work, f"knn-{'input' if on_input else 'features'}-k{knn_cfg.k}")
        kf_in = {"upstream": store.fingerprints.get("knn") if on_input else score_fp,
                 "on": "input" if on_input else "features", **_knn_keys(knn_cfg, cfg.seed)}
        upstream, marker = store.lookup("knn_features", kf_in)
        with stages.stage("knn_features", rows=info.n_rows) as rec:
            rec.extra["fingerprint"] = upstream
            graph = load_manifest(graph_dir, so) if marker is not None else None
            if graph is not None:
                store.reuse("knn_features")
                rec.skipped = True
            else:
                store.begin("knn_features")
                graph, knn_stats = build_knn_graph(info if on_input else link_info, knn_cfg,
                                                   graph_dir, resources, cfg.seed)
                rec.worker_peak_rss_bytes = knn_stats.pop("worker_peak_rss_bytes", 0)
                block_digests = knn_stats.pop("block_digests", None)
                rec.extra.update(knn_stats)
                store.finish("knn_features", upstream, kf_in,
                             artifacts=graph_artifacts(graph, block_digests))

    # -- link and merge
    link_in = {"upstream": upstream, **_method_inputs(method, None, model_digest)}
    link_fp, marker = store.lookup("link", link_in)
    names = ("parents.npy", "cluster_id.npy", "sizes.npy", "representatives.npy")
    parents_uri, cid_uri, sizes_uri, reps_uri = (store.uri("link", name) for name in names)
    if marker is not None:
        sha = {uri: store.sha256(marker, uri) for uri in (parents_uri, cid_uri, sizes_uri,
                                                           reps_uri)}  # fmt: skip
        refs = ClusterRefs(
            ranges=ranges, scores=scores,
            parents=_row_slices(parents_uri, ranges, so, sha[parents_uri]),
            cluster_id=load_array.remote(cid_uri, so, sha[cid_uri]),
            summary=load_pair.remote(sizes_uri, reps_uri, so, sha[sizes_uri], sha[reps_uri]),
            n_clusters=int(marker["meta"]["n_clusters"]),
        )
        if store.loads_intact("link", [*refs.parents, refs.cluster_id, refs.summary]):
            with stages.stage("link", rows=n) as rec:
                store.reuse("link")
                rec.skipped = True
                rec.extra["fingerprint"] = link_fp
            return refs
    store.begin("link")
    refs = link_merge_stage(method, graph, ranges, scores, cfg.cluster, so, stages,
                            info=link_info, cpus=cpus if feature_pass or rescores else 1.0,
                            features=info)
    parents_digest, cid_digest, (sizes_digest, reps_digest) = ray_get([
        save_concat.remote(parents_uri, so, *refs.parents),
        save_concat.remote(cid_uri, so, refs.cluster_id),
        save_pair.remote(sizes_uri, reps_uri, so, refs.summary)])
    stages.stages["link"].extra["fingerprint"] = link_fp
    store.finish("link", link_fp, link_in, {"n_clusters": refs.n_clusters},
                 artifacts={parents_uri: parents_digest, cid_uri: cid_digest,
                            sizes_uri: sizes_digest, reps_uri: reps_digest})
    return refs


def inputs_and_graph(spec: JobSpec):
    """Header checks, Ray, the parallel validation and the kNN graph: what every job over a
    labelled or unlabelled split does first. Returns (info, resources, stages, manifest)."""
    info = preflight_inputs(spec)
    resources = init_ray(spec.num_cpus)
    stages = StageLog()
    store = StageStore(spec.resolved_work_dir, spec.storage_options)
    validate_inputs(spec, info, resources, stages, store)
    return info, resources, stages, knn_stage(spec, info, resources, stages, store)


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
    info = preflight(spec, method)
    run_id = new_run_id()
    stages = StageLog()
    store = StageStore(spec.resolved_work_dir, so)  # completed stages of earlier runs
    with sole_writer(spec.output, run_id, so,
                     lambda: check_output_location(spec.output, spec.overwrite, so)) as (lock, _):
        log.info("run %s: %s, N=%d, D=%d, method=%s, output=%s", run_id, spec.features,
                 info.n_rows, info.dim, cfg.method, spec.output)
        return _run_locked(spec, method, info, run_id, stages, store, lock, t_start)


def _run_locked(spec: JobSpec, method: ClusterMethod, info: FeatureInfo, run_id: str,
                stages: StageLog, store: StageStore, lock: OutputLock,
                t_start: float) -> dict[str, Any]:
    """The job's work, holding the output's lock: Ray, the stages, the commit."""
    cfg, so, work = spec.config, spec.storage_options, spec.resolved_work_dir
    staging = join_uri(work, "staging", run_id)
    resources = init_ray(spec.num_cpus)
    validate_inputs(spec, info, resources, stages, store)
    manifest = knn_stage(spec, info, resources, stages, store)

    refs = cluster_stages(spec, method, info, manifest, resources, stages, store)

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
        "reused_stages": list(store.reused),
        "stage_fingerprints": dict(store.fingerprints),
    }
    if metrics is not None:
        run_record["metrics"] = metrics
    write_json(join_uri(staging, RUN), run_record, so)
    with stages.stage("commit"):
        lock.ensure_held()
        commit(staging, spec.output, part_rows, run_id, so)
    _remove(staging, so)
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


def _remove(uri: str, so: dict | None) -> None:
    fs, path = url_to_fs(uri, so)
    if fs.exists(path):
        fs.rm(path, recursive=True)
