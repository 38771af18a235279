"""URI helpers over fsspec, so every reader works on local paths and object storage alike.

Every function takes a URI (plain path, ``file://``, ``s3://``, ``gs://``, ``memory://``, ...)
and optional ``storage_options`` passed to the fsspec filesystem (credentials, endpoints).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ltc_ray.errors import InputError

__all__ = [
    "file_size",
    "file_stamp",
    "is_local_fs",
    "join_uri",
    "list_known_tree",
    "open_uri",
    "read_bytes_range",
    "STORAGE_OPTIONS_ENV",
    "require_file",
    "uri_exists",
    "url_to_fs",
    "write_bytes_atomic",
]


# ``--storage-options`` as an environment variable: credentials kept out of argv (and ps)
STORAGE_OPTIONS_ENV = "LTC_RAY_STORAGE_OPTIONS"


def url_to_fs(
    uri: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and in-filesystem path for ``uri`` (fsspec caches filesystem instances)."""
    return fsspec.core.url_to_fs(str(uri), **(storage_options or {}))


def join_uri(base: str, *parts: str) -> str:
    """Join path segments onto a local path or URI without doubling slashes.

    ``join_uri("s3://b/x/", "knns", "part1_test")`` -> ``"s3://b/x/knns/part1_test"``.
    """
    base = str(base)
    if not base.endswith("://"):
        stripped = base.rstrip("/")
        base = stripped if stripped else "/"
    out = base
    for part in parts:
        seg = str(part).strip("/")
        if not seg:
            continue
        out = out + seg if out.endswith("/") else f"{out}/{seg}"
    return out


def uri_exists(uri: str, storage_options: dict | None = None) -> bool:
    """Whether a file or directory exists at ``uri``."""
    fs, path = url_to_fs(uri, storage_options)
    return bool(fs.exists(path))


def require_file(
    uri: str, what: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Fail early with a clear message unless ``uri`` is an existing file.

    ``what`` names the role, e.g. ``"feature file"``; returns ``(fs, path)`` for reuse.
    """
    fs, path = url_to_fs(uri, storage_options)
    if fs.isdir(path):
        raise InputError(uri, f"{what} is a directory")
    if not fs.exists(path):
        raise InputError(uri, f"{what} not found")
    return fs, path


def read_bytes_range(uri: str, start: int, stop: int, storage_options: dict | None = None) -> bytes:
    """Bytes ``[start, stop)`` of a file, fetched as one ranged read (no whole-file download)."""
    if start < 0 or stop < start:
        raise ValueError(f"bad byte range [{start}, {stop})")
    if stop == start:
        return b""
    fs, path = url_to_fs(uri, storage_options)
    return fs.cat_file(path, start=start, end=stop)


def file_size(uri: str, storage_options: dict | None = None) -> int:
    """Size of the file at ``uri`` in bytes."""
    fs, path = url_to_fs(uri, storage_options)
    return int(fs.size(path))


def file_stamp(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    """Size, modification time and (object stores) ETag of a file: what a job's marker
    records of a file it wrote, so a file saved over it since no longer matches (the jobs
    replace only their own unchanged files)."""
    fs.invalidate_cache(path)
    info = fs.info(path)
    try:
        modified = fs.modified(path).isoformat()
    except (NotImplementedError, AttributeError, KeyError):
        modified = None
    etag = info.get("ETag") or info.get("etag")
    return {"bytes": int(info["size"]), "modified": modified,
            "etag": str(etag) if etag is not None else None}


def list_known_tree(fs: fsspec.AbstractFileSystem, path: str,
                    top_names: set[str]) -> tuple[list[str], set[str]]:
    """``(unknown top-level names, every file under path relative to it)`` of a directory
    a job means to replace. Files are listed only when every top-level entry is one of
    ``top_names``: a user's tree is never walked."""
    path = path.rstrip("/")
    top = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    unknown = sorted(top - top_names)
    if unknown:
        return unknown, set()
    return [], {p[len(path) + 1:] for p in fs.find(path) if p.startswith(path + "/")}


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk (where atomic rename is available)."""
    return isinstance(fs, LocalFileSystem)


def write_bytes_atomic(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` so readers never see a partial file.

    Local: a temporary file in the same directory, then ``os.replace``. Object stores
    publish a single ``put`` atomically, so remote paths are written with ``pipe``.
    """
    fs, path = url_to_fs(uri, storage_options)
    if not is_local_fs(fs):
        fs.pipe_file(path, bytes(data))
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 is not the user's choice
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@functools.cache
def current_umask() -> int:
    """The process's umask, read once (reading it means setting it, which is not
    thread-safe, so it is done a single time and put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def open_uri(
    uri: str, mode: str = "rb", storage_options: dict | None = None, **kwargs: Any
) -> Iterator[IO]:
    """Open ``uri`` like ``open``; for local writes the parent directory is created."""
    fs, path = url_to_fs(uri, storage_options)
    if is_local_fs(fs) and any(c in mode for c in "wax"):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with fs.open(path, mode, **kwargs) as f:
        yield f
