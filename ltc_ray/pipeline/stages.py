"""Resumable stages: fingerprints of what a stage depends on and completion markers.

Each stage of a run owns ``<work>/stages/<name>/``. It first removes its old ``_DONE``
marker, writes its artifacts (``.npy`` arrays, kNN block files, written atomically by
workers), and writes ``_DONE`` last: a JSON record holding the fingerprint of everything
the result depends on (input version tokens, the config keys the stage reads, the model's
content hash, the upstream stage's fingerprint), the size and sha256 of every artifact,
and a checksum of the record itself. A later run whose stage computes the same fingerprint
finds the marker and reuses the artifacts instead of recomputing; a crash mid-stage
leaves no marker, so that stage (and only that stage) runs again.

Resume heals: a marker that is unreadable or fails its checksum, or whose artifacts are
missing, truncated or fail their sha256, does not count, and the stage is computed
again. Sizes come from one directory listing in the driver; the hashes are checked by Ray
tasks (never by reading the files in the driver). A work file found damaged while
loading it raises :class:`WorkFileError` (exit 1, not the bad-input exit 2).

Inputs are versioned by :func:`uri_version`: a content hash for small local files, so an
in-place rewrite of the same size within one mtime tick is still seen, and the storage's
own token for the others (size/mtime for large local files, the ETag on object stores).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import ray

from ltc_ray.errors import InputError, WorkFileError, brief
from ltc_ray.graph.knn_graph import MANIFEST, KnnManifest
from ltc_ray.io.features import FeatureInfo
from ltc_ray.io.fs import is_local_fs, join_uri, url_to_fs, write_bytes_atomic
from ltc_ray.runtime import ray_get

log = logging.getLogger("ltc_ray")

STAGES_DIR = "stages"
DONE = "_DONE"
# inputs up to this size are versioned by a hash of their content, not by size/mtime
SMALL_INPUT_BYTES = 2**20
_HASH_CHUNK = 16 * 2**20

Digest = tuple[int, str]  # (bytes, sha256 hex) of one file

__all__ = [
    "DONE",
    "Digest",
    "StageStore",
    "WorkFileError",
    "digest_bytes",
    "digest_files",
    "features_version",
    "fingerprint",
    "graph_artifacts",
    "load_npy",
    "save_npy",
    "tree_digest",
    "uri_version",
]


def fingerprint(payload: Any) -> str:
    """A short stable hash of a JSON-serialisable payload (key order does not matter)."""
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def digest_bytes(data: bytes | memoryview) -> Digest:
    """``(bytes, sha256)`` of a buffer a writer already holds."""
    return len(data), hashlib.sha256(data).hexdigest()


def uri_version(uri: str | None, storage_options: dict | None = None) -> str | None:
    """A token that changes when the file at ``uri`` changes; None for no file.

    Local files up to :data:`SMALL_INPUT_BYTES` (labels of small splits, configs, small
    npz) are versioned by a hash of their content, so a rewrite in place with the same size
    within one mtime tick is still seen; larger ones by fsspec's ``ukey`` (size/mtime),
    which costs no read. On object stores ``ukey`` is the ETag, itself derived from the
    content, so nothing is read there either."""
    if not uri:
        return None
    fs, path = url_to_fs(uri, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    size = info.get("size")
    if (is_local_fs(fs) and info.get("type") == "file" and isinstance(size, int)
            and size <= SMALL_INPUT_BYTES):
        return "sha256:" + hashlib.sha256(fs.cat_file(path)).hexdigest()[:32]
    return str(fs.ukey(path))


def features_version(info: FeatureInfo) -> str:
    """The version token of a feature input: :func:`uri_version` of its file (a content
    hash when small), or the token of a parts manifest a run wrote."""
    if info.format == "parts":
        return info.version
    return uri_version(info.uri, info.storage_options) or info.version


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


def graph_artifacts(manifest: KnnManifest, digests: Mapping[str, Digest] | None = None
                    ) -> dict[str, Digest | None]:  # fmt: skip
    """A kNN graph's artifacts: its manifest and every block file, with the digests its
    writers returned where known (the others are hashed by :meth:`StageStore.finish`)."""
    digests = digests or {}
    uris = [join_uri(manifest.directory, MANIFEST)]
    uris += [manifest.block_uri(b) for b in range(manifest.n_blocks)]
    return {uri: digests.get(uri) for uri in uris}


def _marker_checksum(marker: dict) -> str:
    data = json.dumps(marker, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()


class StageStore:
    """The completion markers and array artifacts of one run's work area."""

    def __init__(self, work_dir: str, storage_options: dict | None = None):
        self.work_dir = work_dir
        self.root = join_uri(work_dir, STAGES_DIR)
        self.storage_options = storage_options
        self.fingerprints: dict[str, str] = {}  # stage -> fingerprint, in run order
        self.reused: list[str] = []  # stages this run took from an earlier run
        self._versions: dict[str, str | None] = {}  # input URI -> version, read once a run

    def input_version(self, uri: str | None) -> str | None:
        """:func:`uri_version` of an input, computed once per run (several stages key on it)."""
        if not uri:
            return None
        if uri not in self._versions:
            self._versions[uri] = uri_version(uri, self.storage_options)
        return self._versions[uri]

    def features_version(self, info: FeatureInfo) -> str:
        """:func:`features_version`, computed once per run."""
        key = f"features:{info.uri}"
        if key not in self._versions:
            self._versions[key] = features_version(info)
        return self._versions[key]

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

    @staticmethod
    def sha256(marker: dict, uri: str) -> str | None:
        """The sha256 a completed stage's marker records for its artifact ``uri``, for
        loaders to verify what they read."""
        record = (marker.get("artifacts") or {}).get(uri)
        return record.get("sha256") if isinstance(record, dict) else None

    def completed(self, stage: str, fp: str) -> dict | None:
        """The marker of ``stage`` when it completed with fingerprint ``fp`` and its
        artifacts are all still there, whole and unchanged (size, sha256), else None."""
        marker = self._read_marker(stage)
        if marker is None or marker.get("fingerprint") != fp:
            return None
        problem = check_artifacts(marker.get("artifacts"), self.storage_options)
        if problem:
            log.warning("stage %s: completed result damaged (%s); computing it again", stage,
                        problem)  # fmt: skip
            return None
        return marker

    def _read_marker(self, stage: str) -> dict | None:
        """The marker of ``stage``; None when absent, unreadable or failing its checksum."""
        fs, path = url_to_fs(self.uri(stage, DONE), self.storage_options)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            marker = json.loads(data)
            checksum = marker.pop("checksum", None)
        except (ValueError, TypeError, AttributeError):  # (UnicodeDecodeError: a ValueError)
            marker, checksum = None, None
        if marker is not None and checksum is None:
            log.warning("stage %s: its %s marker predates artifact checksums; computing the "
                        "stage again", stage, DONE)  # fmt: skip
            return None
        if marker is None or checksum != _marker_checksum(marker):
            log.warning("stage %s: its %s marker is damaged; computing the stage again",
                        stage, DONE)  # fmt: skip
            return None
        return marker

    def loads_intact(self, stage: str, refs: list) -> bool:
        """Wait for the loads of a reused ``stage``'s arrays (workers check each against its
        recorded sha256). On a damaged file drop the stage's marker and return False: the
        caller computes the stage again in this run."""
        try:
            ray_get([_loaded.remote(ref) for ref in refs])
        except WorkFileError as exc:
            log.warning("stage %s: %s; computing it again", stage, exc.problem)
            self.begin(stage)
            return False
        return True

    @contextlib.contextmanager
    def heals(self) -> Iterator[None]:
        """Blame damage on the work file, never on the input: a :class:`WorkFileError`, or
        an InputError naming a file under the work directory (a reader that cannot tell it
        reads the run's own file), drops the marker of every stage that vouches for that
        file, so the rerun computes it again, and leaves as a WorkFileError (exit 1)."""
        try:
            yield
        except (WorkFileError, InputError) as exc:
            where = str(exc.where)
            if isinstance(exc, InputError) and not where.startswith(
                    self.work_dir.rstrip("/") + "/"):  # fmt: skip
                raise
            dropped = self.forget(where)
            log.warning("%s is damaged; dropped the completed stage(s) %s that used it",
                        where, dropped or "(none)")  # fmt: skip
            if isinstance(exc, WorkFileError):
                raise
            raise WorkFileError(where, exc.problem) from None

    def forget(self, uri: str) -> list[str]:
        """Drop the marker of every stage whose artifacts include ``uri``; their names."""
        fs, root = url_to_fs(self.root, self.storage_options)
        try:
            entries = fs.ls(root, detail=False)
        except FileNotFoundError:
            return []
        dropped = []
        for stage in sorted(posixpath.basename(str(e).rstrip("/")) for e in entries):
            marker = self._read_marker(stage)
            if marker is not None and uri in (marker.get("artifacts") or {}):
                self.begin(stage)
                dropped.append(stage)
        return dropped

    def begin(self, stage: str) -> None:
        """Drop an old marker before new artifacts overwrite the old ones."""
        fs, path = url_to_fs(self.uri(stage, DONE), self.storage_options)
        if fs.exists(path):
            fs.rm(path)

    def finish(self, stage: str, fp: str, inputs: dict, meta: dict | None = None,
               artifacts: Mapping[str, Digest | None] | Iterable[str] = ()) -> None:
        """Write the marker last: the stage's ``artifacts`` are complete. ``artifacts``
        maps each URI to the ``(bytes, sha256)`` its writer returned; URIs without one (or
        given as a plain list) are hashed now by Ray tasks, which also check that a zip
        (a kNN block) just written reads back whole."""
        if not isinstance(artifacts, Mapping):
            artifacts = dict.fromkeys(artifacts)
        missing = [uri for uri, digest in artifacts.items() if digest is None]
        hashed = digest_files(missing, self.storage_options, check_zip=True)
        records = {}
        for uri, digest in artifacts.items():
            size, sha = digest if digest is not None else hashed[uri] or (None, None)
            if sha is None:
                raise WorkFileError(uri, "missing right after the stage wrote it")
            records[uri] = {"bytes": int(size), "sha256": str(sha)}
        marker = {
            "stage": stage,
            "fingerprint": fp,
            "inputs": inputs,
            "meta": meta or {},
            "artifacts": records,
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        marker = json.loads(json.dumps(marker, default=str))  # the form a reader sees
        marker["checksum"] = _marker_checksum(marker)
        data = json.dumps(marker, indent=2, sort_keys=True).encode()
        write_bytes_atomic(self.uri(stage, DONE), data, self.storage_options)


def check_artifacts(artifacts: Any, storage_options: dict | None = None) -> str | None:
    """What is wrong with a marker's artifacts (missing, wrong size, wrong sha256), or
    None when they are all intact. Sizes from one listing per directory; hashes by Ray
    tasks."""
    if not isinstance(artifacts, dict):
        return "its marker records no artifact digests (written by an older version)"
    expected: dict[str, Digest] = {}
    for uri, record in artifacts.items():
        try:
            expected[uri] = (int(record["bytes"]), str(record["sha256"]))
        except (TypeError, KeyError, ValueError):
            return f"its marker has no digest for {uri}"
    sizes = _listed_sizes(list(expected), storage_options)
    for uri, (size, _) in expected.items():
        if sizes.get(uri) is None:
            return f"{uri} is missing"
        if sizes[uri] != size:
            return f"{uri} has {sizes[uri]} bytes, {size} were written"
    for uri, digest in digest_files(list(expected), storage_options).items():
        if digest != expected[uri]:
            return f"{uri} fails its sha256 check"
    return None


def _listed_sizes(uris: list[str], storage_options: dict | None) -> dict[str, int | None]:
    """The size of each file in ``uris`` (None: missing), from one listing per directory."""
    by_dir: dict[str, list[str]] = {}
    for uri in uris:
        by_dir.setdefault(uri.rstrip("/").rsplit("/", 1)[0], []).append(uri)
    sizes: dict[str, int | None] = {}
    for parent, members in by_dir.items():
        fs, path = url_to_fs(parent, storage_options)
        fs.invalidate_cache(path)  # object stores cache listings: this one must be fresh
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            entries = []
        listed = {posixpath.basename(str(e["name"]).rstrip("/")): e.get("size")
                  for e in entries if e.get("type") == "file"}  # fmt: skip
        for uri in members:
            size = listed.get(posixpath.basename(uri.rstrip("/")))
            sizes[uri] = int(size) if size is not None else None
    return sizes


def _file_digests(uris: list[str], storage_options: dict | None,
                  check_zip: bool = False) -> list[Digest | None]:  # fmt: skip
    """``(bytes, sha256)`` of each file (None: missing), streamed in chunks. With
    ``check_zip``, a ``.npz`` must also pass its own CRC-32s (a block just written)."""
    out: list[Digest | None] = []
    for uri in uris:
        fs, path = url_to_fs(uri, storage_options)
        try:
            if check_zip and uri.endswith(".npz"):
                data = fs.cat_file(path)
                _check_zip(uri, data)
                out.append(digest_bytes(data))
                continue
            digest, size = hashlib.sha256(), 0
            with fs.open(path, "rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
            out.append((size, digest.hexdigest()))
        except FileNotFoundError:
            out.append(None)
    return out


def _check_zip(uri: str, data: bytes) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as exc:
        raise WorkFileError(uri, f"unreadable right after it was written ({brief(exc)})"
                            ) from None  # fmt: skip
    if bad is not None:
        raise WorkFileError(uri, f"member {bad} fails its CRC right after it was written")


@ray.remote(num_cpus=0, max_retries=3, scheduling_strategy="SPREAD")
def _digest_task(uris: list[str], storage_options: dict | None,
                 check_zip: bool) -> list[Digest | None]:  # fmt: skip
    return _file_digests(uris, storage_options, check_zip)


def digest_files(uris: list[str], storage_options: dict | None = None,
                 check_zip: bool = False) -> dict[str, Digest | None]:  # fmt: skip
    """``(bytes, sha256)`` of each file (None: missing), hashed by as many Ray tasks as
    the cluster has CPUs, spread over its nodes (light I/O tasks that request no CPU, like
    the stage loaders, so they never wait behind actors); in this process only when Ray
    is not running."""
    uris = list(uris)
    if not uris:
        return {}
    if not ray.is_initialized():
        return dict(zip(uris, _file_digests(uris, storage_options, check_zip), strict=True))
    n_tasks = min(len(uris), max(1, int(ray.cluster_resources().get("CPU", 1))))
    groups = [uris[i::n_tasks] for i in range(n_tasks)]
    results = ray_get([_digest_task.remote(g, storage_options, check_zip) for g in groups])
    return {uri: digest for group, found in zip(groups, results, strict=True)
            for uri, digest in zip(group, found, strict=True)}  # fmt: skip


def save_npy(uri: str, array: np.ndarray, storage_options: dict | None = None) -> Digest:
    """One array as ``.npy`` (no pickle), written atomically so a retried writer is
    harmless; returns ``(bytes, sha256)`` of the buffer written, for the stage marker."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    data = buf.getbuffer()
    write_bytes_atomic(uri, data, storage_options)
    return digest_bytes(data)


def load_npy(uri: str, storage_options: dict | None = None, sha256: str | None = None
             ) -> np.ndarray:  # fmt: skip
    """An array written by :func:`save_npy` (pickled objects are refused). With ``sha256``
    (from the stage marker) the bytes read must match it. A missing, unreadable or altered
    file is a :class:`WorkFileError`: it is the run's own file, not the user's input."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise WorkFileError(uri, "stage result is missing") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise WorkFileError(uri, "its sha256 differs from the one recorded when it was written")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise WorkFileError(uri, f"not a readable .npy ({brief(exc)})") from None


@ray.remote(num_cpus=0, max_retries=3)
def save_concat(uri: str, storage_options: dict | None, *parts: np.ndarray) -> Digest:
    """Concatenate per-partition arrays and save them in a worker (not the driver);
    returns the file's ``(bytes, sha256)``."""
    array = np.concatenate(parts) if parts else np.empty(0)
    return save_npy(uri, array, storage_options)


@ray.remote(num_cpus=0, max_retries=3)
def save_pair(uri_a: str, uri_b: str, storage_options: dict | None,
              pair: tuple) -> tuple[Digest, Digest]:  # fmt: skip
    """Save a ``(a, b)`` result (e.g. the merge's cluster sizes and representatives)."""
    return save_npy(uri_a, pair[0], storage_options), save_npy(uri_b, pair[1], storage_options)


@ray.remote(num_cpus=0, max_retries=3)
def load_array(uri: str, storage_options: dict | None, sha256: str | None = None) -> np.ndarray:
    """A stored stage result, loaded (and checked against ``sha256``) by a worker into the
    object store."""
    return load_npy(uri, storage_options, sha256)


@ray.remote(num_cpus=0, max_retries=3)
def load_pair(uri_a: str, uri_b: str, storage_options: dict | None,
              sha256_a: str | None = None, sha256_b: str | None = None) -> tuple:  # fmt: skip
    """The counterpart of :func:`save_pair`."""
    return (load_npy(uri_a, storage_options, sha256_a),
            load_npy(uri_b, storage_options, sha256_b))  # fmt: skip


@ray.remote(num_cpus=0)
def _loaded(value: Any) -> bool:
    """Succeeds once ``value`` (a ref passed in) loaded; fails with the load's error."""
    return True


@ray.remote(num_cpus=0)
def slice_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a stored (N,) result: one partition's share."""
    return np.ascontiguousarray(array[start:stop])
