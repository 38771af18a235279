"""Finished runs under a results root, and a cached index of each run for the web API.

Discovery walks the results root for folders holding ``_SUCCESS`` and ``run.json`` (an
ltc-ray cluster output; an embedding job's output has no ``run.json``). Inside a run it
descends only into ``reclusters/`` (the nested runs the page starts); elsewhere it skips
``clusters/``, work areas (``*.work``, ``*_work``, ``*.input``), hidden folders and folder
layouts (a folder holding ``img_names.txt``: thousands of cluster folders below it).

A run's :class:`RunIndex` is built once and kept until its ``_SUCCESS`` changes: cluster
membership sorted by ``cluster_id`` with offsets (so a cluster's members are one slice),
each sample's cluster, sizes and representatives from ``cluster_summary.parquet``, and
its names (:class:`ltc_ray.io.names.SampleNames`), held as one Arrow string array once a
search needs them (vectorised ``match_substring``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ltc_ray.errors import InputError, brief
from ltc_ray.io.fs import file_stamp, join_uri, url_to_fs
from ltc_ray.io.names import SampleNames
from ltc_ray.io.output import CLUSTERS_DIR, RUN, SUCCESS, SUMMARY, read_success
from ltc_ray.serve.annotations import AnnotationStore
from ltc_ray.serve.paths import clean_segments, resolve_under

__all__ = ["PARENT", "RECLUSTERS", "RunIndex", "RunRegistry", "UnknownRun", "discover_runs"]

log = logging.getLogger("ltc_ray")

PARENT = "parent.json"  # beside run.json: run.json's bytes are in the _SUCCESS manifest
RECLUSTERS = "reclusters"
_SKIP_SUFFIXES = (".work", "_work", ".input")
_SKIP_NAMES = {CLUSTERS_DIR}
FOLDER_NAMES = "img_names.txt"
MAX_DEPTH = 8
MAX_DIRS = 20000
STAMP_TTL_S = 2.0  # how long a run's _SUCCESS stamp is trusted before it is checked again


class UnknownRun(LookupError):
    """No finished run with that id under the results root: answered with 404."""


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def discover_runs(results_uri: str, storage_options: dict | None = None) -> list[str]:
    """Ids (paths relative to the results root, ``"."`` for the root itself) of the
    finished cluster runs under ``results_uri``, sorted."""
    fs, root = url_to_fs(results_uri, storage_options)
    root = root.rstrip("/") or "/"
    fs.invalidate_cache()
    found: list[str] = []
    stack: list[tuple[str, int]] = [(root, 0)]
    visited = 0
    while stack and visited < MAX_DIRS:
        path, depth = stack.pop()
        visited += 1
        try:
            entries = fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        names = {_basename(e["name"]): e for e in entries}
        dirs = sorted(n for n, e in names.items() if e.get("type") == "directory")
        is_run = SUCCESS in names and RUN in names and names[SUCCESS].get("type") == "file"
        if is_run:
            rel = path[len(root):].strip("/") if path != root else ""
            found.append(rel or ".")
            children = [d for d in dirs if d == RECLUSTERS]
        elif FOLDER_NAMES in names:
            children = []
        else:
            children = [d for d in dirs if not d.startswith((".", "_")) and d not in _SKIP_NAMES
                        and not d.endswith(_SKIP_SUFFIXES)]
        if depth < MAX_DEPTH:
            stack.extend((f"{path.rstrip('/')}/{d}", depth + 1) for d in reversed(children))
    return sorted(found)


def _read_json(uri: str, storage_options: dict | None, limit: int = 16 << 20) -> dict:
    fs, path = url_to_fs(uri, storage_options)
    with fs.open(path, "rb") as fh:
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise InputError(uri, "is too large for a run's JSON file")
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise InputError(uri, "is not valid JSON") from None
    if not isinstance(value, dict):
        raise InputError(uri, "is not a JSON object")
    return value


def _valid_parent(value: object) -> dict | None:
    if isinstance(value, dict) and isinstance(value.get("run"), str) \
            and isinstance(value.get("cluster_id"), int):
        return {"run": value["run"], "cluster_id": int(value["cluster_id"])}
    return None


@dataclass
class RunIndex:
    """What the API needs of one finished run, in memory (numpy / Arrow)."""

    run: str
    uri: str
    stamp: dict
    record: dict  # run.json
    parent: dict | None
    sizes: np.ndarray  # (K,) int64, by cluster_id
    representative: np.ndarray  # (K,) int64 sample ids
    members: np.ndarray  # (N,) int64 sample ids sorted by (cluster_id, sample_id)
    offsets: np.ndarray  # (K + 1,) int64: cluster c's members are members[offsets[c]:offsets[c+1]]
    cluster_of: np.ndarray  # (N,) int64 cluster of each sample id
    names: object | None  # SampleNames, or None when the run has no names
    names_error: str | None
    images_root: str | None
    annotations: AnnotationStore
    storage_options: dict | None = field(default=None, repr=False)
    checked_at: float = 0.0
    _names_array: pa.Array | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def n_samples(self) -> int:
        return int(len(self.cluster_of))

    @property
    def n_clusters(self) -> int:
        return int(len(self.sizes))

    def cluster_members(self, cluster_id: int) -> np.ndarray:
        return self.members[self.offsets[cluster_id]:self.offsets[cluster_id + 1]]

    def names_array(self) -> pa.Array:
        """Every sample's name as one Arrow string array (row i = sample i), read once;
        without names, the sample ids as strings (search then matches ids)."""
        with self._lock:
            if self._names_array is None:
                if self.names is None:
                    arr = pa.array(np.arange(self.n_samples, dtype=np.int64)).cast(pa.string())
                else:
                    arr = self.names.read(0, self.n_samples)
                    if isinstance(arr, pa.ChunkedArray):
                        arr = arr.combine_chunks()
                    if len(arr) != self.n_samples:
                        raise InputError(self.uri, f"names list {len(arr)} rows, the run has "
                                         f"{self.n_samples}")
                self._names_array = arr
            return self._names_array

    def names_of(self, sample_ids: np.ndarray) -> list[str | None]:
        """Names of some samples (None without names): from the array once it is loaded,
        else only the rows asked for."""
        if self.names is None:
            return [None] * len(sample_ids)
        if self._names_array is not None:
            return self._names_array.take(pa.array(np.asarray(sample_ids, np.int64))).to_pylist()
        return list(self.names.take(np.asarray(sample_ids, dtype=np.int64)))

    def match(self, text: str) -> np.ndarray:
        """Sample ids whose name contains ``text`` (case-insensitive), ascending."""
        hits = pc.match_substring(self.names_array(), text, ignore_case=True)
        return np.flatnonzero(hits.fill_null(False).to_numpy(zero_copy_only=False))

    def cluster_names(self) -> dict[int, str]:
        return self.annotations.cluster_names()


class RunRegistry:
    """The results root's runs, each indexed on first use and re-indexed when its
    ``_SUCCESS`` changes (a rerun committed over it)."""

    def __init__(self, results_uri: str, images_uri: str | None = None,
                 storage_options: dict | None = None):
        self.results_uri = str(results_uri).rstrip("/") or "/"
        self.images_uri = images_uri
        self.storage_options = storage_options
        self._indexes: dict[str, RunIndex] = {}
        self._infos: dict[str, tuple[dict, dict]] = {}
        self._lock = threading.Lock()
        self._run_locks: dict[str, threading.Lock] = {}

    def run_uri(self, run: str) -> str:
        """URI of run id ``run`` (validated: a relative path inside the results root)."""
        if not isinstance(run, str) or not run:
            raise UnknownRun("run is required")
        if run == ".":
            return self.results_uri
        segments = clean_segments(run)  # PathRefused: 403
        if not segments:
            return self.results_uri
        return resolve_under(self.results_uri, "/".join(segments), self.storage_options)

    def run_id(self, uri: str) -> str:
        """Id of a run at ``uri`` (inside the results root)."""
        _, root = url_to_fs(self.results_uri, self.storage_options)
        _, path = url_to_fs(uri, self.storage_options)
        rel = path.rstrip("/")[len(root.rstrip("/")):].strip("/")
        return rel or "."

    def list_runs(self) -> list[dict]:
        """One summary per finished run (the ``/api/runs`` rows)."""
        out = []
        for run in discover_runs(self.results_uri, self.storage_options):
            try:
                out.append(self.info(run))
            except (InputError, OSError, UnknownRun) as exc:
                log.warning("serve: skipping run %s: %s", run, brief(exc))
        return out

    def _stamp(self, uri: str) -> dict:
        fs, path = url_to_fs(join_uri(uri, SUCCESS), self.storage_options)
        try:
            return file_stamp(fs, path)
        except FileNotFoundError:
            raise UnknownRun("no finished run there") from None

    def info(self, run: str) -> dict:
        """The run's summary row: name, method, sizes, pairwise F, parent, has_names."""
        uri = self.run_uri(run)
        stamp = self._stamp(uri)
        cached = self._infos.get(run)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        record = _read_json(join_uri(uri, RUN), self.storage_options)
        metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
        names, _ = self._names(uri)
        row = {
            "run": run, "name": record.get("name"), "method": record.get("method"),
            "n_samples": record.get("n_samples"), "n_clusters": record.get("n_clusters"),
            "pairwise_f": metrics.get("pairwise_f"), "run_id": record.get("run_id"),
            "parent": self._parent(uri, record), "has_names": names is not None,
            "features": record.get("features"),
            "images_root": getattr(names, "images_root", None) if names is not None else None,
        }
        self._infos[run] = (stamp, row)
        return row

    def _parent(self, uri: str, record: dict) -> dict | None:
        parent = _valid_parent(record.get("parent"))
        if parent is not None:
            return parent
        fs, path = url_to_fs(join_uri(uri, PARENT), self.storage_options)
        if not fs.exists(path):
            return None
        try:
            return _valid_parent(_read_json(join_uri(uri, PARENT), self.storage_options))
        except InputError:
            return None

    def _names(self, uri: str) -> tuple[object | None, str | None]:
        try:
            return SampleNames.for_output(uri, storage_options=self.storage_options), None
        except (InputError, OSError, ValueError) as exc:
            return None, brief(exc, 200)

    def get(self, run: str) -> RunIndex:
        """The run's index, rebuilt when its ``_SUCCESS`` changed."""
        uri = self.run_uri(run)
        with self._lock:
            lock = self._run_locks.setdefault(run, threading.Lock())
        with lock:
            index = self._indexes.get(run)
            now = time.monotonic()
            if index is not None and now - index.checked_at < STAMP_TTL_S:
                return index
            stamp = self._stamp(uri)
            if index is not None and index.stamp == stamp:
                index.checked_at = now
                return index
            index = self._build(run, uri, stamp)
            index.checked_at = time.monotonic()
            self._indexes[run] = index
            return index

    def forget(self, run: str | None = None) -> None:
        """Drop cached indexes (all, or one run's)."""
        with self._lock:
            if run is None:
                self._indexes.clear()
                self._infos.clear()
            else:
                self._indexes.pop(run, None)
                self._infos.pop(run, None)

    def _build(self, run: str, uri: str, stamp: dict) -> RunIndex:
        so = self.storage_options
        manifest = read_success(uri, so)
        record = _read_json(join_uri(uri, RUN), so)
        fs, root = url_to_fs(uri, so)
        root = root.rstrip("/")
        sample_parts, cluster_parts = [], []
        for entry in manifest["files"]:
            if not entry["path"].startswith(CLUSTERS_DIR + "/"):
                continue
            with fs.open(f"{root}/{entry['path']}", "rb") as fh:
                table = pq.ParquetFile(fh).read(columns=["sample_id", "cluster_id"])
            sample_parts.append(table.column("sample_id").to_numpy().astype(np.int64))
            cluster_parts.append(table.column("cluster_id").to_numpy().astype(np.int64))
        sample_id = np.concatenate(sample_parts) if sample_parts else np.empty(0, np.int64)
        cluster_id = np.concatenate(cluster_parts) if cluster_parts else np.empty(0, np.int64)
        with fs.open(f"{root}/{SUMMARY}", "rb") as fh:
            summary = pq.ParquetFile(fh).read(columns=["cluster_id", "size", "representative"])
        order = np.argsort(summary.column("cluster_id").to_numpy(), kind="stable")
        sizes = summary.column("size").to_numpy().astype(np.int64)[order]
        representative = summary.column("representative").to_numpy().astype(np.int64)[order]
        n, k = len(sample_id), len(sizes)
        if n and (sample_id.min() < 0 or sample_id.max() >= n or cluster_id.min() < 0
                  or cluster_id.max() >= k):
            raise InputError(uri, "cluster parts hold sample or cluster ids out of range")
        counts = np.bincount(cluster_id, minlength=k)
        if not np.array_equal(counts, sizes):
            raise InputError(join_uri(uri, SUMMARY), "sizes disagree with the cluster parts")
        cluster_of = np.empty(n, dtype=np.int64)
        cluster_of[sample_id] = cluster_id
        members = np.lexsort((sample_id, cluster_id))
        members = sample_id[members]
        offsets = np.zeros(k + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        names, names_error = self._names(uri)
        images_root = self.images_uri or (getattr(names, "images_root", None) if names else None)
        return RunIndex(
            run=run, uri=uri, stamp=stamp, record=record, parent=self._parent(uri, record),
            sizes=sizes, representative=representative, members=members, offsets=offsets,
            cluster_of=cluster_of, names=names, names_error=names_error,
            images_root=images_root, annotations=AnnotationStore(uri, so),
            storage_options=so,
        )
