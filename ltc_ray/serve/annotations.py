"""Merge, split and rename notes on a finished run, kept beside it as Parquet.

The committed output (``clusters/``, ``cluster_summary.parquet``, ``run.json``,
``_SUCCESS``) is never changed: the notes are rows of ``<run>/annotations.parquet``
(``seq``, ``time``, ``action``, ``cluster_ids``, ``sample_ids``, ``name``), the whole
file rewritten atomically on each note (``write_bytes_atomic``: a temporary file then a
rename locally, one ``put`` on object storage), so a reader never sees half a file.
A rename (or a merge with a name) gives clusters the name the page shows.
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ltc_ray.errors import InputError
from ltc_ray.io.fs import file_stamp, join_uri, url_to_fs, write_bytes_atomic

__all__ = ["ACTIONS", "ANNOTATIONS", "MAX_NAME_CHARS", "AnnotationStore", "check_annotation"]

ANNOTATIONS = "annotations.parquet"
ACTIONS = ("merge", "split", "rename")
MAX_NAME_CHARS = 200
MAX_CLUSTER_IDS = 10_000
MAX_SAMPLE_IDS = 1_000_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SCHEMA = pa.schema([
    ("seq", pa.int64()), ("time", pa.string()), ("action", pa.string()),
    ("cluster_ids", pa.list_(pa.int64())), ("sample_ids", pa.list_(pa.int64())),
    ("name", pa.string()),
])
RELOAD_S = 2.0


def _ids(values: object, what: str, limit: int) -> np.ndarray:
    if values is None:
        return np.empty(0, dtype=np.int64)
    if not isinstance(values, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InputError(what, "must be a list of integers")
    if len(values) > limit:
        raise InputError(what, f"lists more than {limit} ids")
    return np.asarray(values, dtype=np.int64)


def check_annotation(action: str, cluster_ids: object, sample_ids: object, name: object,
                     sizes: np.ndarray, cluster_of: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Validated ``(cluster_ids, sample_ids, name)`` of a note, or :class:`InputError`:
    the clusters exist; merge names two or more distinct clusters; split names one cluster
    and some (not all) of its members; rename names one cluster and a non-empty name."""
    if action not in ACTIONS:
        raise InputError("action", f"must be one of {', '.join(ACTIONS)}")
    clusters = _ids(cluster_ids, "cluster_ids", MAX_CLUSTER_IDS)
    samples = _ids(sample_ids, "sample_ids", MAX_SAMPLE_IDS)
    if name is not None:
        if not isinstance(name, str):
            raise InputError("name", "must be a string")
        name = name.strip()
        if len(name) > MAX_NAME_CHARS:
            raise InputError("name", f"is longer than {MAX_NAME_CHARS} characters")
        if _CONTROL.search(name):
            raise InputError("name", "holds control characters")
        name = name or None
    k = len(sizes)
    if clusters.size and (clusters.min() < 0 or clusters.max() >= k):
        bad = int(clusters[(clusters < 0) | (clusters >= k)][0])
        raise InputError("cluster_ids", f"cluster {bad} does not exist (the run has {k})")
    if np.unique(clusters).size != clusters.size:
        raise InputError("cluster_ids", "lists a cluster twice")
    if action == "merge":
        if clusters.size < 2:
            raise InputError("cluster_ids", "a merge needs two or more clusters")
        if samples.size:
            raise InputError("sample_ids", "a merge takes whole clusters, no sample_ids")
    elif action == "split":
        if clusters.size != 1:
            raise InputError("cluster_ids", "a split names exactly one cluster")
        if not samples.size:
            raise InputError("sample_ids", "a split needs the samples to split off")
        if np.unique(samples).size != samples.size:
            raise InputError("sample_ids", "lists a sample twice")
        n = len(cluster_of)
        if samples.min() < 0 or samples.max() >= n:
            raise InputError("sample_ids", f"sample ids must be in 0..{n - 1}")
        outside = samples[cluster_of[samples] != clusters[0]]
        if outside.size:
            raise InputError("sample_ids", f"sample {int(outside[0])} is not in cluster "
                             f"{int(clusters[0])}")
        if samples.size >= sizes[clusters[0]]:
            raise InputError("sample_ids", "a split must leave some members in the cluster")
    else:
        if clusters.size != 1:
            raise InputError("cluster_ids", "a rename names exactly one cluster")
        if samples.size:
            raise InputError("sample_ids", "a rename takes no sample_ids")
        if name is None:
            raise InputError("name", "a rename needs a non-empty name")
    return clusters, samples, name


class AnnotationStore:
    """The notes of one run: read from ``annotations.parquet`` (again when it changed),
    appended one at a time under a lock."""

    def __init__(self, run_uri: str, storage_options: dict | None = None):
        self.uri = join_uri(run_uri, ANNOTATIONS)
        self.storage_options = storage_options
        self._rows: list[dict] | None = None
        self._stamp: dict | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def _current_stamp(self) -> dict | None:
        fs, path = url_to_fs(self.uri, self.storage_options)
        try:
            return file_stamp(fs, path)
        except FileNotFoundError:
            return None

    def _load(self) -> list[dict]:
        now = time.monotonic()
        if self._rows is not None and now - self._checked < RELOAD_S:
            return self._rows
        stamp = self._current_stamp()
        if self._rows is None or stamp != self._stamp:
            if stamp is None:
                rows: list[dict] = []
            else:
                fs, path = url_to_fs(self.uri, self.storage_options)
                with fs.open(path, "rb") as fh:
                    table = pq.ParquetFile(fh).read()
                rows = table.select([f.name for f in SCHEMA]).to_pylist()
            self._rows, self._stamp = rows, stamp
        self._checked = now
        return self._rows

    def rows(self) -> list[dict]:
        """Every note, oldest first."""
        with self._lock:
            return list(self._load())

    def cluster_names(self) -> dict[int, str]:
        """Cluster id -> the name its latest rename (or named merge) gave it."""
        names: dict[int, str] = {}
        for row in self.rows():
            if row["name"] and row["action"] in ("rename", "merge"):
                for c in row["cluster_ids"] or []:
                    names[int(c)] = row["name"]
        return names

    def append(self, action: str, cluster_ids: Sequence[int], sample_ids: Sequence[int],
               name: str | None) -> dict:
        """Add one (already validated) note and rewrite the file atomically."""
        with self._lock:
            self._checked = 0.0
            rows = list(self._load())
            row = {
                "seq": (max(r["seq"] for r in rows) + 1) if rows else 1,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "action": action,
                "cluster_ids": [int(c) for c in cluster_ids],
                "sample_ids": [int(s) for s in sample_ids],
                "name": name,
            }
            rows.append(row)
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buf, compression="zstd")
            write_bytes_atomic(self.uri, buf.getvalue(), self.storage_options)
            self._rows, self._stamp = rows, self._current_stamp()
            self._checked = time.monotonic()
            return row
