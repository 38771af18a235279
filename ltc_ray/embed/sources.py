"""Where the images come from: a folder (recursive), a list file, or a Parquet column of
paths, on any fsspec URI. The listing is sorted (ids follow it) and checked before any
image is read.

A listed name is either relative to ``images_root`` (``join_uri(images_root, name)``
names the image) or a full URI / absolute path, used as is.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ltc_ray.errors import InputError, brief, storage_errors
from ltc_ray.io.fs import open_uri, url_to_fs
from ltc_ray.io.names import image_uri, is_absolute

__all__ = ["IMAGE_EXTENSIONS", "LIST_SUFFIXES", "PARQUET_SUFFIXES", "ImageListing",
           "image_uri", "is_absolute", "list_images", "source_kind"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                              ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"})
LIST_SUFFIXES = (".txt", ".lst", ".list")
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_LIST_BYTES = 1 << 33  # a list file larger than 8 GiB is not a list of image paths


@dataclass(frozen=True)
class ImageListing:
    """The images to embed, in id order."""

    source: str  # the URI the user gave
    kind: str  # "folder" | "list" | "parquet"
    images_root: str | None  # what relative names are relative to
    names: list[str]  # sorted, unique, as listed

    def __len__(self) -> int:
        return len(self.names)


def _parent(uri: str) -> str:
    """The folder holding ``uri`` (a URI keeps its protocol)."""
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        return f"{proto}://{posixpath.dirname(rest.rstrip('/'))}"
    return posixpath.dirname(uri.rstrip("/")) or "."


def source_kind(source: str, storage_options: dict | None = None) -> str:
    """"folder", "list" or "parquet"; InputError when it is missing or none of these."""
    with storage_errors(source):
        fs, path = url_to_fs(source, storage_options)
        if fs.isdir(path):
            return "folder"
        if not fs.exists(path):
            raise InputError(source, "input not found (a folder, a .txt/.lst list of paths, "
                             "or a .parquet file with a path column)")
    low = source.lower()
    if low.endswith(LIST_SUFFIXES):
        return "list"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise InputError(source, "unsupported input: give a folder of images, a list file "
                     f"({'/'.join(LIST_SUFFIXES)}: one path per line) or a Parquet file "
                     "with a column of paths")


def _sorted_unique(names: list[str], source: str) -> list[str]:
    if not names:
        raise InputError(source, "lists no images")
    arr = np.asarray(names, dtype=object)
    arr = arr[np.argsort(np.asarray(names, dtype=str), kind="stable")]
    dup = np.nonzero(arr[1:] == arr[:-1])[0]
    if len(dup):
        raise InputError(source, f"lists {brief(arr[dup[0]])!r} more than once")
    return arr.tolist()


def _list_folder(source: str, storage_options: dict | None) -> list[str]:
    fs, path = url_to_fs(source, storage_options)
    root = path.rstrip("/")
    names = []
    for p in fs.find(root):
        rel = p[len(root) + 1:] if p.startswith(root + "/") else posixpath.basename(p)
        if not any(part.startswith(".") for part in rel.split("/")):  # hidden files/dirs
            names.append(rel)
    return names


def _list_file(source: str, storage_options: dict | None) -> list[str]:
    fs, path = url_to_fs(source, storage_options)
    if fs.size(path) > MAX_LIST_BYTES:
        raise InputError(source, "list file is larger than 8 GiB")
    with open_uri(source, "rb", storage_options) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(source, "list file is not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _list_parquet(source: str, column: str, storage_options: dict | None) -> list[str]:
    fs, path = url_to_fs(source, storage_options)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if column not in names:
                raise InputError(source, f"has no column {column!r} (--path-column); "
                                 f"columns: {brief(names)}")
            col = pf.read(columns=[column]).column(column)
    except InputError:
        raise
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(source, f"cannot read it as Parquet ({brief(exc)})") from None
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise InputError(source, f"column {column!r} must hold strings, not {col.type}")
    if col.null_count:
        raise InputError(source, f"column {column!r} has {col.null_count} null path(s)")
    return [s.strip() for s in col.to_pylist()]


def list_images(source: str, *, path_column: str = "path", images_root: str | None = None,
                storage_options: dict | None = None) -> ImageListing:
    """The sorted, de-duplicated-checked listing of ``source``.

    Folder: every non-hidden file under it, recursively (files that are not images are
    listed too, and end in the failed list, never silently dropped); names are relative
    to the folder. List file / Parquet: names as written, relative to ``images_root``
    (default: the list file's folder) unless a URI or absolute path."""
    kind = source_kind(source, storage_options)
    with storage_errors(source):
        if kind == "folder":
            if images_root is not None:
                raise InputError("--images-root", "applies to list and Parquet inputs only; "
                                 "a folder's names are relative to the folder")
            root = source.rstrip("/") or "/"
            names = _list_folder(source, storage_options)
        elif kind == "list":
            root = images_root or _parent(source)
            names = _list_file(source, storage_options)
        else:
            root = images_root or _parent(source)
            names = _list_parquet(source, path_column, storage_options)
    if kind != "folder":
        bad = [n for n in names if n.startswith("../") or "/../" in n]
        if bad:
            raise InputError(source, f"path {brief(bad[0])!r} climbs out of the images root "
                             "with '..'; list it as an absolute path or URI")
    return ImageListing(source, kind, root, _sorted_unique(names, source))
