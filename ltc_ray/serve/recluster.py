"""Re-cluster one cluster of a finished run as a nested run, in the background.

What the seed did by hand (rerun the script on a cluster folder), as a job the page
starts and follows:

1. the cluster's members' rows are copied from the run's features into
   ``<run>/reclusters/<cluster_id>-<method>-<YYYYmmdd-HHMMSS>.input/embeddings.parquet``
   (``id`` = the parent's sample id, ``path`` = the sample's name, ``embedding``), read in
   row chunks (only chunks holding a member are read; never the whole matrix), with a
   ``report.json`` naming the images root so the nested run's names resolve to the images;
2. ``python -m ltc_ray.cli cluster`` runs on it as a subprocess (its own local Ray, or the
   cluster in ``RAY_ADDRESS``): k-means with a given K, or the run's own method with its
   config (``run.json``'s ``config`` as YAML), ``knn.k`` capped below the cluster's size;
   progress is the stage its log lines reached;
3. ``parent.json`` ({"run", "cluster_id"}) is written beside the nested ``run.json``
   (``run.json`` itself is listed with its size in ``_SUCCESS``, so it is left as is);
4. the nested run's folder layout is exported inside the parent's (``<run>/folders/``,
   exported first when absent), in the folder of the re-clustered cluster.

Job state lives in memory; one job runs at a time (each starts Ray with ``cpus`` CPUs).
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ltc_ray.cluster.baselines import KMeans
from ltc_ray.errors import InputError, brief
from ltc_ray.export.folders import cluster_folder, export_folders
from ltc_ray.io.features import feature_format, inspect_features, read_features
from ltc_ray.io.fs import (
    STORAGE_OPTIONS_ENV,
    is_local_fs,
    join_uri,
    uri_exists,
    url_to_fs,
    write_bytes_atomic,
)
from ltc_ray.serve.runs import PARENT, RECLUSTERS, RunIndex, RunRegistry

__all__ = ["CHUNK_ROWS", "METHODS", "Job", "Reclusterer", "write_subset"]

log = logging.getLogger("ltc_ray")

KMEANS = KMeans.name  # "kmeans": re-cluster with K clusters
METHODS = (KMEANS, "run")
CHUNK_ROWS = 65536
MIN_SIZE = 3  # knn.k >= 2 and k < rows: a cluster of 3 is the smallest that can run
FOLDERS = "folders"
_RUN_FOLDER = re.compile(r"^\d{8}-\d{6}-d\d+-c\d+$")
_STAGE = re.compile(r"\bstage (\w+): (start|done)")
# how far along a run is when a stage starts (stages a method lacks are skipped)
_STAGE_PROGRESS = {"plan": 0.08, "knn": 0.12, "graph_stats": 0.45, "score": 0.5, "link": 0.6,
                   "merge": 0.7, "attach": 0.76, "write": 0.8, "commit": 0.86}


@dataclass
class Job:
    """One re-cluster job, as ``GET /api/jobs/{job}`` reports it."""

    job: str
    run: str  # the parent run; ``nested`` is the new run's id
    cluster_id: int
    method: str
    k: int | None
    state: str = "queued"
    progress: float = 0.0
    message: str = "queued"
    nested: str | None = None
    folders: str | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    log_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40),
                                        repr=False)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("log_tail", "nested")}
        out["parent_run"] = self.run
        out["run"] = self.nested  # the contract: the nested run's id once done
        return out


def write_subset(index: RunIndex, members: np.ndarray, input_dir: str,
                 storage_options: dict | None = None) -> tuple[str, int]:
    """Write the members' rows (``id``, ``path``, ``embedding``) as
    ``<input_dir>/embeddings.parquet`` plus its ``report.json``; returns the file's URI
    and the feature dimension. Reads the run's features chunk by chunk."""
    features = index.record.get("features")
    if not isinstance(features, str) or not features:
        raise InputError(index.uri, "run.json names no features file to re-cluster from")
    if not uri_exists(features, storage_options):
        raise InputError(features, "the run's features file is not found (run.json "
                         "'features'); re-clustering needs it")
    dim = index.record.get("dim") if feature_format(features) == "bin" else None
    info = inspect_features(features, dim, storage_options)
    if info.n_rows != index.n_samples:
        raise InputError(features, f"has {info.n_rows} rows but the run has "
                         f"{index.n_samples} samples")
    members = np.sort(np.asarray(members, dtype=np.int64))
    pieces = []
    for lo in range(0, info.n_rows, CHUNK_ROWS):
        hi = min(info.n_rows, lo + CHUNK_ROWS)
        a, b = np.searchsorted(members, [lo, hi])
        if a == b:
            continue  # no member in this chunk: not read at all
        rows = read_features(info, lo, hi, normalize=False)
        pieces.append(np.ascontiguousarray(rows[members[a:b] - lo], dtype=np.float32))
    x = np.concatenate(pieces) if pieces else np.empty((0, info.dim), np.float32)
    columns = {"id": pa.array(members)}
    if index.names is not None:
        columns["path"] = pa.array(index.names_of(members), type=pa.string())
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), info.dim)
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, compression="zstd")
    uri = join_uri(input_dir, "embeddings.parquet")
    write_bytes_atomic(uri, buf.getvalue(), storage_options)
    report = {"kind": "ltc-ray-embeddings",
              "images_root": getattr(index.names, "images_root", None),
              "n_listed": len(members), "n_embedded": len(members), "n_failed": 0,
              "dim": info.dim, "parent": {"run": index.run, "features": features}}
    write_bytes_atomic(join_uri(input_dir, "report.json"),
                       json.dumps(report, indent=2).encode(), storage_options)
    return uri, info.dim


def _yaml_config(config: dict) -> bytes:
    import yaml

    return yaml.safe_dump(config, sort_keys=True).encode()


class Reclusterer:
    """Starts and tracks re-cluster jobs (a one-worker thread pool)."""

    def __init__(self, registry: RunRegistry, cpus: int = 1,
                 storage_options: dict | None = None):
        self.registry = registry
        self.cpus = max(1, int(cpus))
        self.storage_options = storage_options
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ltc-recluster")
        self._procs: set[subprocess.Popen] = set()
        self._tmp: tempfile.TemporaryDirectory | None = None

    def submit(self, run: str, cluster_id: int, method: str, k: int | None) -> Job:
        """Check the request against the run (InputError: 400), then queue the job."""
        index = self.registry.get(run)
        if method not in METHODS:
            raise InputError("method", f"must be one of {', '.join(METHODS)}")
        if not 0 <= cluster_id < index.n_clusters:
            raise InputError("cluster_id", f"cluster {cluster_id} does not exist (the run has "
                             f"{index.n_clusters})")
        size = int(index.sizes[cluster_id])
        if size < MIN_SIZE:
            raise InputError("cluster_id", f"cluster {cluster_id} has {size} member(s); "
                             f"re-clustering needs at least {MIN_SIZE}")
        if method == KMEANS:
            if k is None or not 2 <= k <= size:
                raise InputError("k", f"k-means needs k in 2..{size} (the cluster's size)")
        else:
            k = None
            if not isinstance(index.record.get("config"), dict):
                raise InputError(index.uri, "run.json records no config to rerun the method")
        job = Job(job=uuid.uuid4().hex[:12], run=run, cluster_id=int(cluster_id),
                  method=method, k=k)
        with self._lock:
            self.jobs[job.job] = job
        self._pool.submit(self._run, job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def shutdown(self) -> None:
        """Stop running subprocesses (server shutdown)."""
        for proc in list(self._procs):
            if proc.poll() is None:
                proc.terminate()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _set(self, job: Job, progress: float | None = None, message: str | None = None,
             **fields) -> None:
        with self._lock:
            if progress is not None:
                job.progress = max(job.progress, min(1.0, float(progress)))
            if message is not None:
                job.message = message
            for key, value in fields.items():
                setattr(job, key, value)

    def _run(self, job: Job) -> None:
        try:
            self._set(job, 0.01, "reading the cluster's features", state="running")
            self._execute(job)
            self._set(job, 1.0, None if job.folders is None else "done", state="done")
        except Exception as exc:  # noqa: BLE001 - reported on the job, the server goes on
            if isinstance(exc, InputError):
                error = f"{exc.where}: {exc.problem}"
            else:
                error = f"{type(exc).__name__}: {brief(exc, 300)}"
                log.exception("serve: re-cluster job %s failed", job.job)
            self._set(job, None, "failed", state="failed", error=error)

    def _nested_uri(self, index: RunIndex, job: Job, method_name: str) -> str:
        base = join_uri(index.uri, RECLUSTERS,
                        f"{job.cluster_id}-{method_name}-{time.strftime('%Y%m%d-%H%M%S')}")
        uri, n = base, 1
        while uri_exists(uri, self.storage_options) or uri_exists(uri + ".input",
                                                                   self.storage_options):
            n += 1
            uri = f"{base}-{n}"
        return uri

    def _execute(self, job: Job) -> None:
        so = self.storage_options
        index = self.registry.get(job.run)
        members = index.cluster_members(job.cluster_id)
        record = index.record
        method_name = KMEANS if job.method == KMEANS else str(record.get("method") or "run")
        nested = self._nested_uri(index, job, method_name)
        input_dir = nested + ".input"
        subset, _ = write_subset(index, members, input_dir, so)
        self._set(job, 0.05, f"wrote {len(members)} rows; starting the cluster job")
        k_run = record.get("config", {}).get("knn", {}).get("k", 80) \
            if isinstance(record.get("config"), dict) else 80
        knn_k = max(2, min(int(k_run) if isinstance(k_run, int) else 80, len(members) - 1))
        argv = [sys.executable, "-m", "ltc_ray.cli", "cluster", "--features", subset,
                "--output", nested, "--work-dir", join_uri(input_dir, "work"),
                "--num-cpus", str(self.cpus)]
        if job.method == KMEANS:
            argv += ["--method", KMEANS, "--set", f"methods.{KMEANS}.n_clusters={job.k}"]
        else:
            argv += ["--config", self._config_file(input_dir, record["config"])]
            if isinstance(record.get("model"), str):
                argv += ["--model", record["model"]]
        argv += ["--set", f"knn.k={knn_k}"]
        # credentials travel in the environment, never on the command line (ps shows argv)
        self._subprocess(job, argv, {STORAGE_OPTIONS_ENV: json.dumps(so)} if so else {})
        write_bytes_atomic(join_uri(nested, PARENT), json.dumps(
            {"run": job.run, "cluster_id": job.cluster_id}, indent=2).encode(), so)
        self.registry.forget()
        nested_id = self.registry.run_id(nested)
        self._set(job, 0.9, "exporting the folder layout", nested=nested_id)
        folders = self._folders_or_reason(index, job, nested)
        if folders is not None:
            self._set(job, 0.99, "exported the folder layout", folders=folders)

    def _config_file(self, input_dir: str, config: dict) -> str:
        """The run's config as a local YAML file (``--config`` reads local files only):
        beside the subset on the local disk, else in a temporary folder of this server."""
        data = _yaml_config(config)
        fs, path = url_to_fs(input_dir, self.storage_options)
        if not is_local_fs(fs):
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="ltc-ray-serve-")
            path = tempfile.mkdtemp(dir=self._tmp.name)
        target = os.path.join(path, "config.yaml")
        write_bytes_atomic(target, data)
        return target

    def _subprocess(self, job: Job, argv: list[str], extra_env: dict[str, str]) -> None:
        env = dict(os.environ)
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        env.setdefault("RAY_AUTH_MODE", "disabled")
        env.setdefault("TQDM_DISABLE", "1")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra_env)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, text=True, errors="replace")
        self._procs.add(proc)
        try:
            for line in proc.stdout:
                line = line.rstrip()
                job.log_tail.append(line)
                self._progress_from(job, line)
            rc = proc.wait()
        finally:
            self._procs.discard(proc)
        if rc != 0:
            errors = [ln for ln in job.log_tail if ln.startswith(("error:", "failed:"))]
            detail = errors[-1] if errors else (job.log_tail[-1] if job.log_tail else "")
            raise RuntimeError(f"the cluster job exited with {rc}: {brief(detail, 300)}")

    def _progress_from(self, job: Job, line: str) -> None:
        m = _STAGE.search(line)
        if m:
            stage, what = m.groups()
            at = _STAGE_PROGRESS.get(stage)
            if at is None:
                at = job.progress + 0.02
            if what == "done":
                at += 0.02
            self._set(job, min(at, 0.88), f"stage {stage}: {what}")
        elif "starting a local Ray" in line or "joining the Ray cluster" in line:
            self._set(job, 0.06, "starting Ray")
        elif re.search(r"\bdone in [\d.]+ s: \d+ clusters", line):
            self._set(job, 0.88, line.split(" INFO ", 1)[-1])

    def _export_folders(self, index: RunIndex, job: Job, nested: str) -> str | None:
        """The nested run's folder layout inside the parent's (exported first if absent);
        None (with the reason in the message) when the run has no names to write."""
        if index.names is None:
            self._set(job, None, "no folder layout: the run has no sample names")
            return None

        so = self.storage_options
        root = join_uri(index.uri, FOLDERS)
        fs, root_path = url_to_fs(root, so)
        run_folder = None
        if fs.isdir(root_path):
            fs.invalidate_cache(root_path)
            found = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root_path, detail=False)
                           if fs.isdir(p))
            found = [d for d in found if _RUN_FOLDER.match(d)]
            if found:
                run_folder = join_uri(root, found[-1])
        if run_folder is None:
            run_folder = export_folders(index.uri, root, storage_options=so)
        n_ge2 = int(np.count_nonzero(index.sizes >= 2))
        target = cluster_folder(run_folder, job.cluster_id, n_ge2)
        return export_folders(nested, target, storage_options=so)

    def _folders_or_reason(self, index: RunIndex, job: Job, nested: str) -> str | None:
        """The folder export, whose failure (names the layout cannot take, a folder
        already there) leaves the nested run done, with the reason in the message."""
        try:
            return self._export_folders(index, job, nested)
        except InputError as exc:
            self._set(job, None, f"no folder layout: {exc.where}: {exc.problem}")
            return None
