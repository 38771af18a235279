"""The job's output contract (DESIGN.md): Parquet parts, summary, JSON files, ``_SUCCESS``.

Everything is written under a staging prefix in the run's work area and moved
to the final location only when the run has succeeded; ``_SUCCESS`` (a JSON
manifest of the part files and their row counts) is written last, so a reader
that finds it can trust the rest.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ltc_ray.errors import InputError, brief
from ltc_ray.io.fs import (
    is_local_fs,
    join_uri,
    list_known_tree,
    open_uri,
    url_to_fs,
    write_bytes_atomic,
)
from ltc_ray.redact import redact

SUCCESS = "_SUCCESS"
COMMITTING = "_COMMITTING"  # a commit in progress: lists the old result's and the new files
LOCK = "_LOCK"  # the running job's lease on the location (ltc_ray.io.lock)
CLUSTERS_DIR = "clusters"
SUMMARY = "cluster_summary.parquet"
METRICS = "metrics.json"
RUN = "run.json"
# ``ltc-ray report`` writes this beside a committed result (after its _SUCCESS); it counts
# as ltc-ray's only when it carries REPORT_TAG, so an overwrite removes a stale report but
# never adopts a user's own report.html
REPORT = "report.html"
REPORT_TAG = b'<meta name="generator" content="ltc-ray report">'
OUTPUT_NAMES = {CLUSTERS_DIR, SUMMARY, METRICS, RUN, SUCCESS, COMMITTING, LOCK, REPORT}
MANIFEST_FORMAT = "ltc-ray-output/1"  # _SUCCESS lists every file of the result


PART_NAME = re.compile(CLUSTERS_DIR + r"/part-\d{5,}\.parquet")


def part_file(index: int) -> str:
    return f"{CLUSTERS_DIR}/part-{index:05d}.parquet"


def _write_table(uri: str, table: pa.Table, storage_options: dict | None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(uri, buf.getvalue(), storage_options)


def write_cluster_part(
    uri: str,
    sample_id: np.ndarray,
    cluster_id: np.ndarray,
    score: np.ndarray,
    parent: np.ndarray,
    ids: np.ndarray | None = None,
    storage_options: dict | None = None,
) -> int:
    """One ``clusters/part-*.parquet`` file; returns its row count."""
    columns = {
        "sample_id": pa.array(np.asarray(sample_id, dtype=np.int64)),
        "cluster_id": pa.array(np.asarray(cluster_id, dtype=np.int64)),
        "score": pa.array(np.asarray(score, dtype=np.float32)),
        "parent": pa.array(np.asarray(parent, dtype=np.int64)),
    }
    if ids is not None:
        columns["id"] = pa.array(np.asarray(ids, dtype=np.int64))
    _write_table(uri, pa.table(columns), storage_options)
    return len(sample_id)


def write_summary(
    uri: str, sizes: np.ndarray, representative: np.ndarray, storage_options: dict | None = None
) -> int:
    """``cluster_summary.parquet``: ``cluster_id``, ``size``, ``representative``."""
    table = pa.table(
        {
            "cluster_id": pa.array(np.arange(len(sizes), dtype=np.int64)),
            "size": pa.array(np.asarray(sizes, dtype=np.int64)),
            "representative": pa.array(np.asarray(representative, dtype=np.int64)),
        }
    )
    _write_table(uri, table, storage_options)
    return len(sizes)


def write_json(uri: str, obj: Any, storage_options: dict | None = None) -> None:
    """``obj`` as indented JSON; any known credential in it is masked (see ltc_ray.redact).
    NaN and infinities are refused: they are not JSON, and no reader could parse them."""
    text = redact(json.dumps(obj, indent=2, sort_keys=True, default=_json_default,
                             allow_nan=False))
    write_bytes_atomic(uri, text.encode() + b"\n", storage_options)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@dataclass
class OutputState:
    """What is at an output location before a run commits there."""

    exists: bool = False
    completed: bool = False  # holds a readable ltc-ray ``_SUCCESS`` manifest
    owned: list[str] = field(default_factory=list)  # files an earlier ltc-ray result wrote


def _manifest_paths(fs, path: str, name: str, uri: str) -> set[str] | None:
    """The relative paths a ``_SUCCESS`` or ``_COMMITTING`` manifest lists (None: absent).

    A manifest that does not parse proves nothing about who wrote the files: refused."""
    if not fs.exists(f"{path}/{name}"):
        return None
    try:
        if fs.isdir(f"{path}/{name}"):
            raise ValueError("a directory")
        manifest = json.loads(fs.cat_file(f"{path}/{name}"))
        files = manifest["files"]
        listed = {str(entry["path"]) for entry in files}
        for entry in (manifest.get("old") or []):
            listed.add(str(entry))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InputError(
            uri, f"holds a {name} that is not an ltc-ray manifest; refusing to replace or "
            "remove anything there: choose a new path",
        ) from None
    if name == SUCCESS and manifest.get("format") != MANIFEST_FORMAT:
        listed |= {RUN, METRICS}  # results committed before the manifest listed every file
    return listed


def _is_our_report(fs, path: str) -> bool:
    """Whether ``path`` is a report ``ltc-ray report`` wrote (its generator tag, first 4 KiB)."""
    try:
        return not fs.isdir(path) and REPORT_TAG in fs.cat_file(path, start=0, end=4096)
    except OSError:
        return False


def inspect_output(uri: str, storage_options: dict | None = None) -> OutputState:
    """What an output location holds, refusing one that anything but ltc-ray wrote to.

    Only files listed by an earlier result's ``_SUCCESS`` (or by the ``_COMMITTING`` note
    of a commit that was interrupted) count as ltc-ray's; a location holding anything
    else is refused whatever the flags, so a job can never delete a user's files."""
    fs, path = url_to_fs(uri, storage_options)
    path = path.rstrip("/")
    if fs.isfile(path):
        raise InputError(uri, "output path is a file; expected a directory (or a new path)")
    if not fs.isdir(path):
        return OutputState()
    foreign, files = list_known_tree(fs, path, OUTPUT_NAMES)
    files -= {LOCK}
    success = None
    if not foreign:
        success = _manifest_paths(fs, path, SUCCESS, uri)
        pending = _manifest_paths(fs, path, COMMITTING, uri)
        owned = (success or set()) | (pending or set()) | {SUCCESS, COMMITTING}
        if (success is not None or pending is not None) and REPORT in files \
                and _is_our_report(fs, f"{path}/{REPORT}"):
            owned.add(REPORT)
        # only names ltc-ray writes can be vouched for: a forged manifest cannot adopt a file
        owned = {rel for rel in owned if rel in OUTPUT_NAMES or PART_NAME.fullmatch(rel)}
        foreign = sorted(files - owned)
    if foreign:
        raise InputError(
            uri, f"output directory holds files ltc-ray did not write (e.g. "
            f"'{brief(foreign[0])}'); refusing to touch it whatever the flags: choose a new "
            "(or empty) output path",
        )
    return OutputState(exists=True, completed=success is not None, owned=sorted(files))


def check_output_location(uri: str, overwrite: bool,
                          storage_options: dict | None = None) -> OutputState:
    """Refuse, before any work, an output that is a file, holds files ltc-ray did not
    write (whatever the flags), or holds a completed result (without ``overwrite``)."""
    state = inspect_output(uri, storage_options)
    if state.completed and not overwrite:
        raise InputError(uri, "already holds a completed result (_SUCCESS); pass --overwrite "
                         "to replace it")
    return state


def _norm(uri: str, storage_options: dict | None) -> tuple[str, str]:
    """(protocol, absolute normalised path) of ``uri``; local paths resolve symlinks."""
    fs, path = url_to_fs(uri, storage_options)
    if is_local_fs(fs):
        return "file", os.path.realpath(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, "/" + posixpath.normpath(path.strip("/"))


def overlaps(a: str, b: str, storage_options: dict | None = None) -> bool:
    """Whether one location is, contains or lies inside the other."""
    (pa_, a_path), (pb_, b_path) = _norm(a, storage_options), _norm(b, storage_options)
    if pa_ != pb_:
        return False
    a_path, b_path = a_path.rstrip("/") or "/", b_path.rstrip("/") or "/"

    def within(inner: str, outer: str) -> bool:
        return inner == outer or inner.startswith(outer.rstrip("/") + "/")

    return within(a_path, b_path) or within(b_path, a_path)


def check_output_disjoint(output: str, others: dict[str, str | None],
                          storage_options: dict | None = None, flag: str = "--output") -> None:
    """Refuse an output location that is, contains or lies inside an input or the work
    directory: committing there would replace or delete what the job reads."""
    for role, uri in others.items():
        if uri and overlaps(output, uri, storage_options):
            raise InputError(
                output, f"output location overlaps the {role} ({brief(uri)}); choose an "
                f"output outside every input and the work directory ({flag})",
            )


def commit(
    staging: str,
    output: str,
    part_rows: dict[str, int],
    run_id: str,
    storage_options: dict | None = None,
) -> None:
    """Move staged outputs to ``output`` and write ``_SUCCESS`` last.

    Call it holding the output's lock (:mod:`ltc_ray.io.lock`). The location is inspected
    again first (files that appeared during the run stop the commit, untouched). Then
    ``_COMMITTING`` lists the old result's files and the new ones, so a commit killed
    midway leaves a location the next run recognises as its own; the old result loses its
    ``_SUCCESS`` first and only its listed files are removed, so at no moment does a
    ``_SUCCESS`` vouch for a mix of old and new files, and nothing else is ever deleted.
    """
    fs, out_path = url_to_fs(output, storage_options)
    _, staging_path = url_to_fs(staging, storage_options)
    out_path, staging_path = out_path.rstrip("/"), staging_path.rstrip("/")
    fs.invalidate_cache()  # workers wrote the staging files; the driver's listings are stale
    state = inspect_output(output, storage_options)
    staged = {src[len(staging_path) + 1:]: int(info["size"])
              for src, info in sorted(fs.find(staging_path, detail=True).items())}
    missing = sorted(set(part_rows) - set(staged))
    if missing:
        raise OSError(f"commit to {output}: {missing[0]} was not staged")
    files = [{"path": rel, "rows": part_rows.get(rel), "bytes": size}
             for rel, size in sorted(staged.items())]
    write_json(join_uri(output, COMMITTING),
               {"run_id": run_id, "files": files, "old": state.owned}, storage_options)
    old = [rel for rel in state.owned if rel != COMMITTING]
    for rel in sorted(old, key=lambda r: r != SUCCESS):  # _SUCCESS first
        if fs.exists(f"{out_path}/{rel}"):
            fs.rm(f"{out_path}/{rel}")
    if is_local_fs(fs):  # directories the old result's files left empty
        with contextlib.suppress(OSError):
            os.rmdir(f"{out_path}/{CLUSTERS_DIR}")
    # File by file: object stores have no directories to move (a recursive ``mv`` of a
    # prefix trips over directory markers), and a local rename needs its parent.
    for rel in staged:
        dst = f"{out_path}/{rel}"
        if is_local_fs(fs):
            fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        fs.mv(f"{staging_path}/{rel}", dst)
    fs.invalidate_cache()
    missing = [p for p in staged if not fs.exists(f"{out_path}/{p}")]
    if missing:
        raise OSError(f"commit to {output}: {missing[0]} is missing after the move")
    manifest = {
        "format": MANIFEST_FORMAT,
        "run_id": run_id,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        "rows": int(sum(r for p, r in part_rows.items() if p.startswith(CLUSTERS_DIR + "/"))),
    }
    write_json(join_uri(output, SUCCESS), manifest, storage_options)
    fs.rm(f"{out_path}/{COMMITTING}")



_MANIFEST_MAX_BYTES = 64 << 20  # a manifest lists one entry per file: far below this
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_PART_COLUMNS = {"sample_id": pa.int64(), "cluster_id": pa.int64(), "score": pa.float32(),
                 "parent": pa.int64()}
_PART_ID_COLUMN = "id"  # optional: the input's own ids, int64


def _is_count(value: Any) -> bool:
    """A JSON row or byte count: a non-negative integer (``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_inside_path(path: Any) -> bool:
    """Whether a path a manifest lists is plain, relative and normalised, so joined onto
    the output it names a file inside it: ``/``-separated segments of letters, digits,
    ``._-`` only, none of them ``.`` or ``..`` (no absolute path, scheme, backslash,
    ``~``, ``%``-escape or empty segment can pass)."""
    if not isinstance(path, str) or not path or len(path) > 1024:
        return False
    return all(seg not in (".", "..") and seg and set(seg) <= _PATH_CHARS
               for seg in path.split("/"))


def _check_manifest(manifest: Any, uri: str) -> dict:
    """Refuse a ``_SUCCESS`` manifest whose structure a reader cannot trust: every listed
    path must lie inside the output, counts must be integers, parts must add up."""
    if not isinstance(manifest, dict):
        raise InputError(uri, f"is JSON but not an object (a {type(manifest).__name__}); "
                         "not a manifest ltc-ray wrote")
    fmt = manifest.get("format")
    if fmt is not None and fmt != MANIFEST_FORMAT:
        raise InputError(uri, f"has format {brief(repr(fmt))}; this ltc-ray reads "
                         f"{MANIFEST_FORMAT} (and older manifests without a format)")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise InputError(uri, "has no 'files' list; not a manifest ltc-ray wrote")
    seen: set[str] = set()
    part_rows = 0
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            raise InputError(uri, f"files[{i}] is not an object with 'path' and 'rows'")
        path = entry.get("path")
        if not _is_inside_path(path):
            shown = brief(repr(path)) if isinstance(path, str) else type(path).__name__
            raise InputError(uri, f"files[{i}].path {shown} is not a relative path inside the "
                             "output; refusing to read it")
        if path in seen:
            raise InputError(uri, f"lists {brief(path)} twice")
        seen.add(path)
        rows = entry.get("rows")
        is_part = path.startswith(CLUSTERS_DIR + "/")
        if not (_is_count(rows) or (rows is None and not is_part)):
            raise InputError(uri, f"files[{i}].rows ({brief(path)}) is not a non-negative "
                             "integer")
        if "bytes" in entry and not _is_count(entry["bytes"]):
            raise InputError(uri, f"files[{i}].bytes ({brief(path)}) is not a non-negative "
                             "integer")
        part_rows += rows if is_part else 0
    if not any(p.startswith(CLUSTERS_DIR + "/") for p in seen):
        raise InputError(uri, f"lists no cluster part ({CLUSTERS_DIR}/...); nothing to read")
    total = manifest.get("rows", part_rows)
    if not _is_count(total) or total != part_rows:
        raise InputError(uri, f"says rows={brief(repr(total))} but its cluster parts list "
                         f"{part_rows} rows")
    return manifest


def _check_listed_files(fs, root: str, output: str, files: list[dict]) -> None:
    """Every file the manifest lists exists, is a file inside the output (no symbolic
    link out of it) and, where the manifest records it, has its size."""
    found = fs.find(root, detail=True)
    found_info = {name[len(root) + 1:]: info for name, info in found.items()
             if name.startswith(root + "/")}
    real_root = os.path.realpath(root) if is_local_fs(fs) else None
    for entry in files:
        rel = entry["path"]
        info = found_info.get(rel)
        where = join_uri(output, rel)
        if info is None:
            raise InputError(where, "is listed in _SUCCESS but missing; the result was "
                             "changed after the run finished")
        size = int(info.get("size") or 0)
        if real_root is not None:  # local: a symbolic link may lead anywhere
            real = os.path.realpath(f"{root}/{rel}")
            if not real.startswith(real_root + os.sep):
                raise InputError(where, "resolves outside the output (a symbolic link); "
                                 "refusing to read it")
            if not os.path.isfile(real):
                raise InputError(where, "is listed in _SUCCESS but is not a file")
            size = os.path.getsize(real)
        elif info.get("type") not in (None, "file"):
            raise InputError(where, "is listed in _SUCCESS but is not a file")
        if "bytes" in entry and size != entry["bytes"]:
            raise InputError(where, f"has {size} bytes but _SUCCESS lists {entry['bytes']}; "
                             "the file was changed after the run finished")


def _read_part(fs, path: str, where: str, rows: int, n_total: int, with_id: bool | None
               ) -> pa.Table:
    """One cluster part, checked against the contract before anything computes on it:
    Parquet, the columns and types of ``write_cluster_part``, the listed row count,
    ``sample_id`` in ``[0, n_total)``, ``cluster_id >= 0``, no nulls."""
    data = fs.cat_file(path)
    try:
        # ParquetFile.read is synchronous: pq.read_table leaves pre-buffering work on
        # Arrow's IO threads, which aborts the interpreter (SIGABRT, "terminate called
        # without an active exception") when the process exits right after, as it does
        # on an error (apache/arrow#33975).
        parquet = pq.ParquetFile(pa.BufferReader(data))
        names = parquet.schema_arrow.names
        missing = [c for c in _PART_COLUMNS if c not in names]
        if missing:
            raise InputError(where, f"has no column '{missing[0]}' (a cluster part has "
                             f"{', '.join(_PART_COLUMNS)}, optionally id)")
        wanted = [*_PART_COLUMNS, *([_PART_ID_COLUMN] if _PART_ID_COLUMN in names else [])]
        for name in wanted:
            if names.count(name) > 1:
                raise InputError(where, f"has column '{name}' {names.count(name)} times")
        if parquet.metadata.num_rows != rows:
            raise InputError(where, f"has {parquet.metadata.num_rows} rows but _SUCCESS lists "
                             f"{rows}")
        table = parquet.read(columns=wanted, use_threads=False)  # no pool work left behind
    except (pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(where, "not a readable Parquet file (damaged or not Parquet)") from None
    has_id = _PART_ID_COLUMN in table.column_names
    if with_id is not None and has_id != with_id:
        raise InputError(where, "column 'id' is in some cluster parts only")
    for name in table.column_names:
        column = table.column(name)
        expected = _PART_COLUMNS.get(name, pa.int64())
        if column.type != expected:
            raise InputError(where, f"column '{name}' has type {column.type}, expected "
                             f"{expected}")
        if column.null_count:
            raise InputError(where, f"column '{name}' has {column.null_count} null values")
    if table.num_rows:
        sample_id = table.column("sample_id").to_numpy()
        lo, hi = int(sample_id.min()), int(sample_id.max())
        if lo < 0 or hi >= n_total:
            bad = lo if lo < 0 else hi
            raise InputError(where, f"sample_id {bad} is outside 0..{n_total - 1} (the "
                             f"result has {n_total} rows)")
        cluster_id = table.column("cluster_id").to_numpy()
        if int(cluster_id.min()) < 0:
            raise InputError(where, f"cluster_id {int(cluster_id.min())} is negative")
    return table


def read_success(output: str, storage_options: dict | None = None) -> dict:
    """The ``_SUCCESS`` manifest, checked (:func:`_check_manifest`); an output without it
    is refused (incomplete or failed run), and so is one that is not our JSON manifest."""
    uri = join_uri(output, SUCCESS)
    fs, path = url_to_fs(uri, storage_options)
    fs.invalidate_cache(path.rsplit("/", 1)[0])  # another process may have just committed
    if not fs.exists(path):
        raise InputError(output, "no _SUCCESS marker: the run did not finish, refusing to read it")
    if fs.isdir(path):
        raise InputError(uri, "is a directory, not the JSON manifest a finished run writes")
    with open_uri(uri, "rb", storage_options) as fh:
        raw = fh.read(_MANIFEST_MAX_BYTES + 1)
    if len(raw) > _MANIFEST_MAX_BYTES:
        raise InputError(uri, f"is larger than {_MANIFEST_MAX_BYTES >> 20} MiB; not a manifest "
                         "ltc-ray wrote")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        detail = f" ({exc.msg} at line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) \
            else ""
        raise InputError(uri, f"is not valid JSON{detail}; the result is damaged") from None
    return _check_manifest(manifest, uri)


def read_clusters(output: str, storage_options: dict | None = None) -> pa.Table:
    """All cluster rows of a committed output, sorted by ``sample_id``.

    The result is checked against its ``_SUCCESS`` manifest first (listed files present,
    inside the output, of the listed size and row count, with the contract's columns, and
    ``sample_id`` exactly ``0..N-1`` once each), so a damaged or tampered output is an
    :class:`InputError` naming the file, never a traceback or a wrong score."""
    manifest = read_success(output, storage_options)
    fs, root = url_to_fs(output, storage_options)
    root = root.rstrip("/")
    _check_listed_files(fs, root, output, manifest["files"])
    parts = [e for e in manifest["files"] if e["path"].startswith(CLUSTERS_DIR + "/")]
    n_total = sum(e["rows"] for e in parts)
    tables: list[pa.Table] = []
    for entry in parts:
        with_id = _PART_ID_COLUMN in tables[0].column_names if tables else None
        tables.append(_read_part(fs, f"{root}/{entry['path']}", join_uri(output, entry["path"]),
                                 entry["rows"], n_total, with_id))
    table = pa.concat_tables(tables)
    sample_id = table.column("sample_id").to_numpy()
    counts = np.bincount(sample_id, minlength=n_total)  # in range: checked per part
    if n_total and counts.max() > 1:  # the rows add up to n_total, so no gap without this
        dup = int(np.argmax(counts > 1))
        second = int(np.flatnonzero(sample_id == dup)[1])
        ends = np.cumsum([t.num_rows for t in tables])
        part = parts[int(np.searchsorted(ends, second, side="right"))]["path"]
        raise InputError(join_uri(output, part), f"sample_id {dup} appears {counts[dup]} times "
                         f"in the result (sample_ids must be 0..{n_total - 1}, each once)")
    order = np.empty(n_total, dtype=np.int64)
    order[sample_id] = np.arange(n_total, dtype=np.int64)
    return table.take(pa.array(order))
