"""A finished output written as the seed's folder layout (image-clustering-browser)::

    <root>/img_names.txt                                  every name, line i = sample_id i
    <root>/<YYYYmmdd-HHMMSS>-d<N>-c<K>/NNN/img_names.txt  one folder per cluster of size >= 2
    <root>/<run>/etc/img_names.txt                        every singleton
    <root>/<run>/NNN/<ts>-d<n>-c<k>/MMM/img_names.txt     a re-clustering of cluster NNN

Files hold names joined by ``\\n`` with no final newline, as the seed writes them. ``NNN``
is the cluster_id, which ltc-ray numbers by size rank (0 = largest), zero-padded to three
digits or more; N = samples, K = clusters (singletons included).

Streaming: the cluster parts are read one at a time (``sample_id`` and ``cluster_id``
only), the names of a part's rows fetched as one row range (or ``take`` when the part's
ids are not contiguous), grouped by cluster with one stable sort, buffered (at most
``CHUNK_ROWS`` names) and appended to each folder's file, one open per folder per flush.
Nothing holds more than one part's ids, ``CHUNK_ROWS`` names being grouped and
``CHUNK_ROWS`` buffered, plus a byte per sample (duplicate check). The cost at scale is the
file system's: one ``mkdir`` and about one ``open`` per folder.

The run folder is built out of sight and published whole: on a local disk in a hidden
``.<run>.*.partial`` folder beside it, renamed at the end (atomic); on object storage
(which cannot append) in a local temporary folder, uploaded with one recursive ``put`` at
the end. An existing run folder is never replaced.

``<root>/img_names.txt`` is written when absent (streamed). When present it must list the
same names, in any order: a nested export finds there the parent cluster's members, in the
parent's sample order, which need not be the re-cluster input's row order. It is compared
streamed, by count and an order-free fingerprint (a 64-bit sum of the names' hashes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ltc_ray.errors import InputError, brief, storage_errors
from ltc_ray.io.fs import current_umask, is_local_fs, join_uri, url_to_fs
from ltc_ray.io.names import SampleNames
from ltc_ray.io.output import CLUSTERS_DIR, SUMMARY, read_success

__all__ = ["CHUNK_ROWS", "NAMES_FILE", "SINGLETONS", "cluster_folder", "export_folders",
           "run_folder_name"]

log = logging.getLogger("ltc_ray")

NAMES_FILE = "img_names.txt"
SINGLETONS = "etc"
CHUNK_ROWS = 1 << 18  # names fetched and written at a time (within one part)
_SCAN_BYTES = 8 << 20
_TIME_FORMAT = "%Y%m%d-%H%M%S"


def run_folder_name(when: datetime, n_samples: int, n_clusters: int) -> str:
    """``<YYYYmmdd-HHMMSS>-d<N>-c<K>``, the seed's run folder name."""
    return f"{when.strftime(_TIME_FORMAT)}-d{n_samples}-c{n_clusters}"


def _cluster_dir(cluster_id: int, n_clusters_ge2: int) -> str:
    if cluster_id >= n_clusters_ge2:
        return SINGLETONS
    width = max(3, len(str(max(n_clusters_ge2 - 1, 0))))
    return f"{cluster_id:0{width}d}"


def cluster_folder(run_folder_uri: str, cluster_id: int, n_clusters_ge2: int) -> str:
    """The folder of ``cluster_id`` in a run folder: ``NNN`` (zero-padded to 3 digits or
    the width of the largest id) for the ``n_clusters_ge2`` clusters of size >= 2, which
    come first in ltc-ray's size-ranked ids; ``etc`` for the singletons after them."""
    if cluster_id < 0:
        raise ValueError(f"cluster_id {cluster_id} is negative")
    return join_uri(run_folder_uri, _cluster_dir(int(cluster_id), int(n_clusters_ge2)))


def export_folders(output_uri: str, root_uri: str, *, names_uri: str | None = None,
                   storage_options: dict | None = None, when: datetime | None = None) -> str:
    """Write the finished output ``output_uri`` as the folder layout under ``root_uri``
    (see the module docstring); returns the run folder's URI.

    Streams (module docstring): at most one part's ids and ``CHUNK_ROWS`` names are held.
    ``names_uri``: a text file of names (line i = sample_id i) when the run's input has no
    ``path`` column. ``when``: the run folder's time stamp (default: now, local time, as
    the seed). Bad input (no names, a different ``img_names.txt`` at the root, an existing
    run folder) is an :class:`InputError` raised before anything is written; a damaged
    part found while streaming is one too, and leaves no run folder behind (the root's
    ``img_names.txt``, already written then, holds the right names)."""
    so = storage_options
    with storage_errors(output_uri):
        manifest = read_success(output_uri, so)
    names = SampleNames.for_output(output_uri, names_uri, so, manifest=manifest)
    n = names.n_rows
    with storage_errors(output_uri):
        sizes = _cluster_sizes(output_uri, n, so)
    # manifest order: ltc-ray writes part i with the i-th sample range, so each folder's
    # lines follow sample_id order (parts holding scattered ids give part-by-part order)
    parts = [e for e in manifest["files"] if e["path"].startswith(CLUSTERS_DIR + "/")]
    k, n_ge2 = len(sizes), int(np.count_nonzero(sizes >= 2))
    run_name = run_folder_name(when or datetime.now(), n, k)
    run_uri = join_uri(root_uri, run_name)
    with storage_errors(root_uri):
        fs, root = url_to_fs(root_uri, so)
        root = root.rstrip("/") or "/"
        if fs.isfile(root):
            raise InputError(root_uri, "folder root is a file; expected a folder (--root)")
        run_path = f"{root}/{run_name}"
        if fs.exists(run_path):
            raise InputError(run_uri, "already exists; refusing to write over it (choose "
                             "another --root or --timestamp)")
        _root_names(names, fs, f"{root}/{NAMES_FILE}", join_uri(root_uri, NAMES_FILE))
    local = is_local_fs(fs)
    if local:
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{run_name}.", suffix=".partial", dir=root)
        os.chmod(staging, 0o777 & ~current_umask())
        cleanup = staging
    else:
        cleanup = tempfile.mkdtemp(prefix="ltc-ray-folders-")
        staging = os.path.join(cleanup, run_name)
        os.mkdir(staging)
    try:
        per_cluster = _write_tree(staging, names, parts, output_uri, n, k, n_ge2, so)
        if not np.array_equal(per_cluster, sizes):
            bad = int(np.argmax(per_cluster != sizes))
            raise InputError(join_uri(output_uri, SUMMARY), f"cluster {bad} has size "
                             f"{int(sizes[bad])} but the cluster parts hold {int(per_cluster[bad])}"
                             " rows; the result is damaged")
        if local:
            if os.path.lexists(run_path):
                raise InputError(run_uri, "appeared while exporting; refusing to write over it")
            os.rename(staging, run_path)
        else:
            fs.invalidate_cache()
            if fs.exists(run_path):
                raise InputError(run_uri, "appeared while exporting; refusing to write over it")
            fs.put(staging + "/", run_path + "/", recursive=True)
            fs.invalidate_cache()
    finally:
        shutil.rmtree(cleanup, ignore_errors=True)
    log.info("wrote %d clusters of size >= 2 and %d singletons to %s", n_ge2,
             int(np.count_nonzero(sizes == 1)), run_uri)
    return run_uri


def _cluster_sizes(output_uri: str, n: int, so: dict | None) -> np.ndarray:
    """``size`` by dense ``cluster_id`` from the summary, checked: sizes add up to N and
    the clusters of size >= 2 come before the singletons (ltc-ray's size-ranked ids)."""
    where = join_uri(output_uri, SUMMARY)
    fs, path = url_to_fs(where, so)
    try:
        with fs.open(path, "rb") as fh:
            table = pq.ParquetFile(fh).read(columns=["cluster_id", "size"])
    except (pa.ArrowException, KeyError) as exc:
        raise InputError(where, f"not a readable cluster summary ({brief(exc)})") from None
    cid = table.column("cluster_id").to_numpy()
    size = table.column("size").to_numpy().astype(np.int64)
    if not np.array_equal(cid, np.arange(len(cid))):
        raise InputError(where, "cluster_id is not 0..K-1 in order; the result is damaged")
    if (len(size) and int(size.min()) < 1) or int(size.sum()) != n:
        raise InputError(where, f"sizes add up to {int(size.sum())}, not the result's {n} "
                         "samples (or a size is below 1); the result is damaged")
    big = size >= 2
    if np.any(big[1:] & ~big[:-1]):
        raise InputError(where, "clusters are not numbered by size (a cluster of size >= 2 "
                         "follows a singleton); the folder layout needs ltc-ray's size-ranked "
                         "cluster ids")
    return size


def _read_part(output_uri: str, entry: dict, n: int, k: int,
               so: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """``(sample_id, cluster_id)`` of one part, checked against the manifest and ranges."""
    where = join_uri(output_uri, entry["path"])
    fs, path = url_to_fs(where, so)
    data = fs.cat_file(path)  # one request; a part is one block of the result
    try:
        # ParquetFile.read, not pq.read_table: see ltc_ray.io.output._read_part
        table = pq.ParquetFile(pa.BufferReader(data)).read(columns=["sample_id", "cluster_id"])
    except (pa.ArrowException, KeyError) as exc:
        raise InputError(where, f"not a readable cluster part ({brief(exc)})") from None
    del data
    if table.num_rows != entry["rows"]:
        raise InputError(where, f"has {table.num_rows} rows but _SUCCESS lists {entry['rows']}")
    for name in ("sample_id", "cluster_id"):
        column = table.column(name)
        if not pa.types.is_integer(column.type) or column.null_count:
            raise InputError(where, f"column '{name}' is not integers without nulls")
    sid = table.column("sample_id").to_numpy().astype(np.int64, copy=False)
    cid = table.column("cluster_id").to_numpy().astype(np.int64, copy=False)
    if len(sid) and (int(sid.min()) < 0 or int(sid.max()) >= n):
        raise InputError(where, f"sample_id outside 0..{n - 1}; the result is damaged")
    if len(cid) and (int(cid.min()) < 0 or int(cid.max()) >= k):
        raise InputError(where, f"cluster_id outside 0..{k - 1}; the result is damaged")
    return sid, cid


def _names_of(names: SampleNames, sid: np.ndarray) -> pa.Array:
    """Names of sorted unique rows ``sid``: one row range when contiguous, else take()."""
    if int(sid[-1]) - int(sid[0]) + 1 == len(sid):
        arr = names.read(int(sid[0]), int(sid[-1]) + 1)
    else:
        arr = pa.array(names.take(sid), type=pa.string())
    _check_one_line(arr, names.source)
    return arr


def _check_one_line(arr: pa.Array, where: str) -> None:
    """A name holding a line break cannot be written one a line."""
    bad = pc.or_(pc.match_substring(arr, "\n"), pc.match_substring(arr, "\r"))
    if pc.any(bad).as_py():
        row = int(np.argmax(bad.to_numpy(zero_copy_only=False)))
        raise InputError(where, f"name {brief(repr(arr[row].as_py()))} holds a line break; "
                         "img_names.txt holds one name a line")


class _FolderWriter:
    """Appends lines to the folders' files under a local staging folder, buffering them
    so a cluster spread over several parts costs one open per flush, not one per part.
    The buffer holds at most ``CHUNK_ROWS`` names (flushed when it reaches that)."""

    def __init__(self, staging: str, n_ge2: int) -> None:
        self.staging, self.n_ge2 = staging, n_ge2
        self.started = np.zeros(n_ge2 + 1, dtype=bool)  # file exists; n_ge2 = etc
        self.pending: dict[int, list[str]] = {}
        self.pending_rows = 0

    def add(self, folder: int, lines: list[str]) -> None:
        self.pending.setdefault(folder, []).append("\n".join(lines))
        self.pending_rows += len(lines)

    def flush(self) -> None:
        for f in sorted(self.pending):
            directory = os.path.join(self.staging, _cluster_dir(f, self.n_ge2))
            if not self.started[f]:
                os.mkdir(directory)
            text = "\n".join(self.pending[f])
            with open(os.path.join(directory, NAMES_FILE), "a", encoding="utf-8") as fh:
                fh.write("\n" + text if self.started[f] else text)
            self.started[f] = True
        self.pending.clear()
        self.pending_rows = 0


def _write_tree(staging: str, names: SampleNames, parts: list[dict], output_uri: str,
                n: int, k: int, n_ge2: int, so: dict | None) -> np.ndarray:
    """Append every part's names to its clusters' files under the local ``staging``
    folder; returns the rows written per cluster_id (checked against the summary)."""
    seen = np.zeros(n, dtype=bool)
    per_cluster = np.zeros(k, dtype=np.int64)
    out = _FolderWriter(staging, n_ge2)
    for entry in parts:
        sid, cid = _read_part(output_uri, entry, n, k, so)
        if not len(sid):
            continue
        order = np.argsort(sid, kind="stable")
        sid, cid = sid[order], cid[order]
        if np.any(sid[1:] == sid[:-1]) or np.any(seen[sid]):
            raise InputError(join_uri(output_uri, entry["path"]), "a sample_id appears twice "
                             "in the result; the result is damaged")
        seen[sid] = True
        per_cluster += np.bincount(cid, minlength=k)
        for a in range(0, len(sid), CHUNK_ROWS):
            s, c = sid[a:a + CHUNK_ROWS], cid[a:a + CHUNK_ROWS]
            if out.pending_rows + len(s) > CHUNK_ROWS:
                out.flush()
            arr = _names_of(names, s)
            folder = np.minimum(c, n_ge2)
            by_folder = np.argsort(folder, kind="stable")  # sample order kept inside
            folder = folder[by_folder]
            listed = arr.take(pa.array(by_folder)).to_pylist()
            del arr
            starts = np.concatenate([[0], np.flatnonzero(folder[1:] != folder[:-1]) + 1])
            stops = np.append(starts[1:], len(folder))
            for lo, hi in zip(starts.tolist(), stops.tolist(), strict=True):
                out.add(int(folder[lo]), listed[lo:hi])
    out.flush()
    return per_cluster


def _root_names(names: SampleNames, fs, path: str, uri: str) -> None:
    """Write ``<root>/img_names.txt`` (streamed) when absent; when present, refuse it
    unless it lists the same names (any order; see the module docstring)."""
    if fs.exists(path):
        if fs.isdir(path):
            raise InputError(uri, "is a folder; expected the root's names file")
        _check_same_names(names, fs, path, uri)
        return
    if is_local_fs(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{NAMES_FILE}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as fh:
                _write_all_names(names, fh)
            if os.path.lexists(path):
                raise InputError(uri, "appeared while exporting; refusing to write over it")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    else:  # an object store publishes the (multipart) upload only on close
        with fs.open(path, "wb") as fh:
            _write_all_names(names, fh)


def _write_all_names(names: SampleNames, fh) -> None:
    for a in range(0, names.n_rows, CHUNK_ROWS):
        arr = names.read(a, min(a + CHUNK_ROWS, names.n_rows))
        _check_one_line(arr, names.source)
        text = "\n".join(arr.to_pylist())
        fh.write(("\n" + text if a else text).encode("utf-8"))


def _fingerprint(items: list[str]) -> int:
    """Order-free 64-bit fingerprint of some names: the wrapping sum of their hashes
    (consistent within this process, which is all a comparison here needs)."""
    if not items:
        return 0
    hashes = np.fromiter(map(hash, items), dtype=np.int64, count=len(items))
    return int(hashes.view(np.uint64).sum(dtype=np.uint64))


def _check_same_names(names: SampleNames, fs, path: str, uri: str) -> None:
    """Both lists streamed: counts and order-free fingerprints must agree."""
    mask = (1 << 64) - 1
    expected_count, expected = 0, 0
    for a in range(0, names.n_rows, CHUNK_ROWS):
        items = names.read(a, min(a + CHUNK_ROWS, names.n_rows)).to_pylist()
        expected_count += len(items)
        expected = (expected + _fingerprint(items)) & mask
    found_count, found = 0, 0

    def add(lines: bytes) -> None:
        nonlocal found_count, found
        try:
            items = lines.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            raise InputError(uri, "is not UTF-8 text; not a names file") from None
        items = [s[:-1] if s.endswith("\r") else s for s in items]
        found_count += len(items)
        found = (found + _fingerprint(items)) & mask

    carry = b""
    with fs.open(path, "rb") as fh:
        while block := fh.read(_SCAN_BYTES):
            data = carry + block
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            add(data[:cut])  # every line up to the last newline seen
            carry = data[cut + 1:]
    if carry:  # the last line, written without a newline (as the seed does)
        add(carry)
    if found_count != expected_count or found != expected:
        what = (f"{found_count} names" if found_count != expected_count
                else f"{found_count} names, but not the same ones")
        raise InputError(uri, f"already exists and lists {what}; the result has "
                         f"{expected_count} samples named in {brief(names.source)}. Choose "
                         "another --root (an export never rewrites a root's img_names.txt)")
