"""Resumable stages: fingerprints of what a stage depends on and completion markers.

Each stage of a run owns ``<work>/stages/<name>/``. It first removes its old ``_DONE``
marker, writes its artifacts (``.npy`` arrays, written atomically by workers), and writes
``_DONE`` last: a JSON record holding the fingerprint of everything the result depends
on (input version tokens, the config keys the stage reads, the model's content hash, the
upstream stage's fingerprint). A later run whose stage computes the same fingerprint
finds the marker and reuses the artifacts instead of recomputing; a crash mid-stage
leaves no marker, so that stage (and only that stage) runs again.

Also here: :func:`delay_for_tests`, a test-only hook that slows a stage's workers down so a
test can kill a process in the middle of that stage. It is inert unless the
``LTC_RAY_TEST_STAGE_DELAY`` environment variable names the stage.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from typing import Any

import numpy as np
import ray

from ltc_ray.io.fs import join_uri, open_uri, uri_exists, url_to_fs, write_bytes_atomic

log = logging.getLogger("ltc_ray")

STAGES_DIR = "stages"
DONE = "_DONE"
DELAY_ENV = "LTC_RAY_TEST_STAGE_DELAY"


def fingerprint(payload: Any) -> str:
    """A short stable hash of a JSON-serialisable payload (key order does not matter)."""
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def uri_version(uri: str | None, storage_options: dict | None = None) -> str | None:
    """A token that changes when the file at ``uri`` may have changed (fsspec ``ukey``:
    size/mtime locally, ETag on object stores); None for no file."""
    if not uri:
        return None
    fs, path = url_to_fs(uri, storage_options)
    return str(fs.ukey(path)) if fs.exists(path) else None


def tree_digest(uri: str, storage_options: dict | None = None) -> str:
    """sha256 over every file under ``uri`` (paths and bytes): a model directory's content
    hash, so retraining into the same path invalidates the stages that used the model."""
    fs, root = url_to_fs(uri, storage_options)
    paths = sorted(fs.find(root)) if fs.isdir(root) else [root]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        digest.update(fs.cat_file(path))
    return digest.hexdigest()[:16]


class StageStore:
    """The completion markers and array artifacts of one run's work area."""

    def __init__(self, work_dir: str, storage_options: dict | None = None):
        self.root = join_uri(work_dir, STAGES_DIR)
        self.storage_options = storage_options
        self.fingerprints: dict[str, str] = {}  # stage -> fingerprint, in run order
        self.reused: list[str] = []  # stages this run took from an earlier run

    def lookup(self, stage: str, inputs: dict) -> tuple[str, dict | None]:
        """Fingerprint ``inputs`` and return ``(fingerprint, marker or None)``: the marker
        of a completed result to reuse, if there is one (then call :meth:`reuse`)."""
        fp = fingerprint(inputs)
        self.fingerprints[stage] = fp
        return fp, self.completed(stage, fp)

    def reuse(self, stage: str) -> None:
        """Log and remember (for run.json) that ``stage`` was taken from an earlier run."""
        log.info("stage %s: reusing completed result (fingerprint %s)", stage,
                 self.fingerprints[stage])  # fmt: skip
        self.reused.append(stage)

    def dir(self, stage: str) -> str:
        return join_uri(self.root, stage)

    def uri(self, stage: str, name: str) -> str:
        return join_uri(self.dir(stage), name)

    def completed(self, stage: str, fp: str) -> dict | None:
        """The marker of ``stage`` when it completed with fingerprint ``fp`` and its
        artifacts are all still there, else None."""
        uri = self.uri(stage, DONE)
        if not uri_exists(uri, self.storage_options):
            return None
        with open_uri(uri, "rb", self.storage_options) as fh:
            marker = json.loads(fh.read())
        if marker.get("fingerprint") != fp:
            return None
        missing = [
            a for a in marker.get("artifacts", []) if not uri_exists(a, self.storage_options)
        ]
        if missing:
            log.warning("stage %s: completed result lost %s; computing it again", stage, missing[0])
            return None
        return marker

    def begin(self, stage: str) -> None:
        """Drop an old marker before new artifacts overwrite the old ones."""
        fs, path = url_to_fs(self.uri(stage, DONE), self.storage_options)
        if fs.exists(path):
            fs.rm(path)

    def finish(self, stage: str, fp: str, inputs: dict, meta: dict | None = None,
               artifacts: list[str] = ()) -> None:  # fmt: skip
        """Write the marker last: the stage's ``artifacts`` (URIs) are complete."""
        marker = {
            "stage": stage,
            "fingerprint": fp,
            "inputs": inputs,
            "meta": meta or {},
            "artifacts": list(artifacts),
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        data = json.dumps(marker, indent=2, sort_keys=True, default=str).encode()
        write_bytes_atomic(self.uri(stage, DONE), data, self.storage_options)


def save_npy(uri: str, array: np.ndarray, storage_options: dict | None = None) -> None:
    """One array as ``.npy`` (no pickle), written atomically so a retried writer is harmless."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes_atomic(uri, buf.getvalue(), storage_options)


def load_npy(uri: str, storage_options: dict | None = None) -> np.ndarray:
    """An array written by :func:`save_npy` (pickled objects are refused)."""
    with open_uri(uri, "rb", storage_options) as fh:
        return np.load(io.BytesIO(fh.read()), allow_pickle=False)


@ray.remote(num_cpus=0, max_retries=3)
def save_concat(uri: str, storage_options: dict | None, *parts: np.ndarray) -> int:
    """Concatenate per-partition arrays and save them in a worker (not the driver)."""
    array = np.concatenate(parts) if parts else np.empty(0)
    save_npy(uri, array, storage_options)
    return int(len(array))


@ray.remote(num_cpus=0, max_retries=3)
def save_pair(uri_a: str, uri_b: str, storage_options: dict | None, pair: tuple) -> None:
    """Save a ``(a, b)`` result (e.g. the merge's cluster sizes and representatives)."""
    save_npy(uri_a, pair[0], storage_options)
    save_npy(uri_b, pair[1], storage_options)


@ray.remote(num_cpus=0, max_retries=3)
def load_array(uri: str, storage_options: dict | None) -> np.ndarray:
    """A stored stage result, loaded by a worker into the object store."""
    return load_npy(uri, storage_options)


@ray.remote(num_cpus=0, max_retries=3)
def load_pair(uri_a: str, uri_b: str, storage_options: dict | None) -> tuple:
    """The counterpart of :func:`save_pair`."""
    return load_npy(uri_a, storage_options), load_npy(uri_b, storage_options)


@ray.remote(num_cpus=0)
def slice_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a stored (N,) result: one partition's share."""
    return np.ascontiguousarray(array[start:stop])


def delay_for_tests(stage: str) -> None:
    """TEST-ONLY hook: sleep when ``LTC_RAY_TEST_STAGE_DELAY`` names ``stage``.

    The value is ``stage:seconds[,stage:seconds]`` (e.g. ``knn:2.0``); workers of that
    stage sleep that long per unit of work, so a failure test can SIGKILL a worker or the
    driver mid-stage on tiny data. Unset (the default) it does nothing.
    """
    spec = os.environ.get(DELAY_ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, seconds = item.partition(":")
        if name.strip() == stage:
            time.sleep(float(seconds or 0))
