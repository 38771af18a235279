"""The job's output contract (DESIGN.md): Parquet parts, summary, JSON files, ``_SUCCESS``.

Everything is written under a staging prefix in the run's work area and moved
to the final location only when the run has succeeded; ``_SUCCESS`` (a JSON
manifest of the part files and their row counts) is written last, so a reader
that finds it can trust the rest.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ltc_ray.errors import InputError
from ltc_ray.io.fs import is_local_fs, join_uri, open_uri, url_to_fs, write_bytes_atomic
from ltc_ray.redact import redact

SUCCESS = "_SUCCESS"
CLUSTERS_DIR = "clusters"
SUMMARY = "cluster_summary.parquet"
METRICS = "metrics.json"
RUN = "run.json"
OUTPUT_NAMES = {CLUSTERS_DIR, SUMMARY, METRICS, RUN, SUCCESS}


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
    """``obj`` as indented JSON; any known credential in it is masked (see ltc_ray.redact)."""
    text = redact(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    write_bytes_atomic(uri, text.encode() + b"\n", storage_options)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def check_output_location(uri: str, overwrite: bool, storage_options: dict | None = None) -> None:
    """Refuse, before any work, an output that is a file, a completed result (without
    ``overwrite``) or a non-empty directory holding something other than our outputs."""
    fs, path = url_to_fs(uri, storage_options)
    if fs.isfile(path):
        raise InputError(uri, "output path is a file; expected a directory (or a new path)")
    if not fs.isdir(path):
        return
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    if SUCCESS in names and not overwrite:
        raise InputError(uri, "already holds a completed result (_SUCCESS); pass --overwrite")
    foreign = sorted(names - OUTPUT_NAMES)
    if foreign and not overwrite:
        raise InputError(
            uri,
            f"output directory is not empty and holds no ltc-ray result (e.g. '{foreign[0]}'); "
            "choose a new path or pass --overwrite",
        )


def commit(
    staging: str,
    output: str,
    part_rows: dict[str, int],
    run_id: str,
    storage_options: dict | None = None,
) -> None:
    """Move staged outputs to ``output`` and write ``_SUCCESS`` last.

    An older result at ``output`` loses its ``_SUCCESS`` first, so at no moment
    does a ``_SUCCESS`` vouch for a mix of old and new files.
    """
    fs, out_path = url_to_fs(output, storage_options)
    _, staging_path = url_to_fs(staging, storage_options)
    out_path, staging_path = out_path.rstrip("/"), staging_path.rstrip("/")
    fs.invalidate_cache()  # workers wrote the staging files; the driver's listings are stale
    if fs.isdir(out_path):
        if fs.exists(f"{out_path}/{SUCCESS}"):
            fs.rm(f"{out_path}/{SUCCESS}")
        for entry in fs.ls(out_path, detail=False):
            fs.rm(entry, recursive=True)
    fs.makedirs(out_path, exist_ok=True)
    # File by file: object stores have no directories to move (a recursive ``mv`` of a
    # prefix trips over directory markers), and a local rename needs its parent.
    for src in sorted(fs.find(staging_path)):
        dst = f"{out_path}/{src[len(staging_path) + 1 :]}"
        if is_local_fs(fs):
            fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        fs.mv(src, dst)
    fs.invalidate_cache()
    missing = [p for p in part_rows if not fs.exists(f"{out_path}/{p}")]
    if missing:
        raise OSError(f"commit to {output}: {missing[0]} is missing after the move")
    manifest = {
        "run_id": run_id,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": [{"path": p, "rows": r} for p, r in sorted(part_rows.items())],
        "rows": int(sum(r for p, r in part_rows.items() if p.startswith(CLUSTERS_DIR + "/"))),
    }
    write_json(join_uri(output, SUCCESS), manifest, storage_options)


def read_success(output: str, storage_options: dict | None = None) -> dict:
    """The ``_SUCCESS`` manifest; an output without it is refused (incomplete or failed run)."""
    uri = join_uri(output, SUCCESS)
    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(path):
        raise InputError(output, "no _SUCCESS marker: the run did not finish, refusing to read it")
    with open_uri(uri, "rb", storage_options) as fh:
        return json.loads(fh.read())


def read_clusters(output: str, storage_options: dict | None = None) -> pa.Table:
    """All cluster rows of a committed output, sorted by ``sample_id``."""
    manifest = read_success(output, storage_options)
    tables = []
    for entry in manifest["files"]:
        if not entry["path"].startswith(CLUSTERS_DIR + "/"):
            continue
        with open_uri(join_uri(output, entry["path"]), "rb", storage_options) as fh:
            table = pq.read_table(fh)
        if table.num_rows != entry["rows"]:
            raise InputError(
                join_uri(output, entry["path"]),
                f"has {table.num_rows} rows but _SUCCESS lists {entry['rows']}",
            )
        tables.append(table)
    table = pa.concat_tables(tables)
    return table.sort_by("sample_id")
