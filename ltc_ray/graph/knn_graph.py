"""The kNN graph as an artifact: fixed-size row blocks plus a JSON manifest.

Block ``b`` holds rows ``[b * block_rows, min((b + 1) * block_rows, N))`` as
``knn_ids (n, k)`` (int32 while N < 2**31) and ``knn_sims (n, k) float32``,
sorted by similarity descending with self at rank 0. Any stage can read any row
range without touching the other blocks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from ltc_ray.errors import InputError, brief
from ltc_ray.io.fs import file_stamp, join_uri, url_to_fs, write_bytes_atomic
from ltc_ray.io.knn_files import load_knn_block, write_ltc_knn
from ltc_ray.io.output import overlaps

log = logging.getLogger("ltc_ray")

MANIFEST = "manifest.json"


def block_file(index: int) -> str:
    return f"block-{index:06d}.npz"


@dataclass
class KnnManifest:
    """Where a run's kNN graph lives and how it was made."""

    directory: str
    n_rows: int
    k: int
    block_rows: int
    source: str  # "computed" | "imported"
    index: str = "flat"
    recall: float | None = None  # measured recall@k when approximate
    details: dict = field(default_factory=dict)
    # uneven blocks (one per partition, e.g. a re-scored graph): block b holds rows
    # [bounds[b], bounds[b + 1]); None = fixed blocks of ``block_rows``
    bounds: list[int] | None = None

    @property
    def n_blocks(self) -> int:
        if self.bounds is not None:
            return len(self.bounds) - 1
        return -(-self.n_rows // self.block_rows)

    def block_range(self, index: int) -> tuple[int, int]:
        if self.bounds is not None:
            return int(self.bounds[index]), int(self.bounds[index + 1])
        start = index * self.block_rows
        return start, min(start + self.block_rows, self.n_rows)

    def blocks_of(self, start: int, stop: int) -> range:
        """Indices of the blocks that rows ``[start, stop)`` overlap."""
        last_row = max(stop, 1) - 1
        if self.bounds is not None:
            edges = np.asarray(self.bounds)
            first = int(np.searchsorted(edges, start, side="right")) - 1
            return range(first, int(np.searchsorted(edges, last_row, side="right")))
        return range(start // self.block_rows, last_row // self.block_rows + 1)

    def block_uri(self, index: int) -> str:
        return join_uri(self.directory, block_file(index))


def save_manifest(manifest: KnnManifest, storage_options: dict | None = None) -> tuple[int, str]:
    """Write ``manifest.json`` atomically; returns its ``(bytes, sha256)`` for a stage marker."""
    data = json.dumps(asdict(manifest), indent=2, sort_keys=True).encode()
    write_bytes_atomic(join_uri(manifest.directory, MANIFEST), data, storage_options)
    return len(data), hashlib.sha256(data).hexdigest()


def load_manifest(directory: str, storage_options: dict | None = None) -> KnnManifest | None:
    """The manifest of a complete kNN graph in ``directory``, or None (also when the file is
    damaged: the stage that owns the graph then builds it again)."""
    fs, path = url_to_fs(join_uri(directory, MANIFEST), storage_options)
    try:
        tree = json.loads(fs.cat_file(path))
        tree["directory"] = directory
        manifest = KnnManifest(**tree)
        if manifest.n_rows < 0 or manifest.k < 1 or manifest.block_rows < 1:
            raise ValueError("impossible sizes")
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as exc:  # (UnicodeDecodeError is a ValueError)
        log.warning("%s/%s is damaged (%s); ignoring it", directory, MANIFEST, str(exc)[:80])
        return None
    return manifest


def read_knn_rows(
    manifest: KnnManifest, start: int, stop: int, storage_options: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of the graph, loading only the blocks they overlap."""
    if not 0 <= start <= stop <= manifest.n_rows:
        raise ValueError(f"row range [{start}, {stop}) outside [0, {manifest.n_rows})")
    ids_parts, sims_parts = [], []
    for b in manifest.blocks_of(start, stop):
        ids, sims, block_start = load_knn_block(manifest.block_uri(b), storage_options)
        lo = max(start, block_start) - block_start
        hi = min(stop, block_start + len(ids)) - block_start
        ids_parts.append(ids[lo:hi])
        sims_parts.append(sims[lo:hi])
    return np.concatenate(ids_parts), np.concatenate(sims_parts)


EXPORT_MARKER_SUFFIX = ".ltc-ray.json"  # <output>.ltc-ray.json: "ltc-ray wrote <output>"
EXPORT_FORMAT = "ltc-ray-knn-export/1"
_MANIFEST_FIELDS = {"directory", "n_rows", "k", "block_rows", "source", "index", "recall",
                    "details", "bounds"}


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _read_manifest_checked(directory: str, storage_options: dict | None) -> KnnManifest | None:
    """Like :func:`load_manifest`, but a manifest that is present and damaged is an
    :class:`InputError` naming it (an export must not silently skip or misread a graph)."""

    uri = join_uri(directory, MANIFEST)
    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(path):
        return None
    if fs.isdir(path):
        raise InputError(uri, "is a directory, not a kNN graph manifest")
    try:
        tree = json.loads(fs.cat_file(path))
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
        raise InputError(uri, "is not valid JSON; the kNN graph's manifest is damaged") from None
    if not isinstance(tree, dict):
        raise InputError(uri, "is not a JSON object; the kNN graph's manifest is damaged")
    unknown = sorted(set(tree) - _MANIFEST_FIELDS, key=str)
    if unknown:
        raise InputError(uri, f"has an unknown field {str(unknown[0])[:40]!r}")
    for name in ("n_rows", "k", "block_rows"):
        if not _is_int(tree.get(name), 1):
            raise InputError(uri, f"'{name}' is not a positive integer")
    n_rows, bounds = tree["n_rows"], tree.get("bounds")
    if bounds is not None and not (
        isinstance(bounds, list) and len(bounds) >= 2 and all(_is_int(b, 0) for b in bounds)
        and bounds[0] == 0 and bounds[-1] == n_rows
        and all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    ):
        raise InputError(uri, f"'bounds' is not an ascending list of rows from 0 to {n_rows}")
    if not isinstance(tree.get("source"), str) or not isinstance(tree.get("details", {}), dict):
        raise InputError(uri, "'source' or 'details' has the wrong type")
    tree["directory"] = directory
    return KnnManifest(**tree)


def _check_export_target(
    output: str, work_dir: str, overwrite: bool, storage_options: dict | None
) -> None:
    """An export writes a new file, or with ``overwrite`` replaces one that an earlier
    export wrote (its ``<output>.ltc-ray.json`` marker matches the file's size,
    modification time and ETag); never a user's file, never anything in the work
    directory."""
    if overlaps(output, work_dir, storage_options):
        raise InputError(output, f"overlaps the work directory {brief(work_dir)}, whose graph "
                         "is being read (and that a run may clear); choose a path outside it")
    fs, path = url_to_fs(output, storage_options)
    if fs.isdir(path):
        raise InputError(output, "is a directory; --output names the .npz file to write")
    marker_uri = output + EXPORT_MARKER_SUFFIX
    marker_fs, marker_path = url_to_fs(marker_uri, storage_options)
    marker = None
    if marker_fs.exists(marker_path):
        try:
            marker = json.loads(marker_fs.cat_file(marker_path))
            if not isinstance(marker, dict) or marker.get("format") != EXPORT_FORMAT:
                raise ValueError
        except (ValueError, RecursionError, IsADirectoryError):
            raise InputError(marker_uri, "exists and is not an ltc-ray export marker; "
                             "refusing to replace it: choose a new --output") from None
    if not fs.exists(path):
        return
    if not overwrite:
        raise InputError(output, "already exists; refusing to overwrite it: choose a new path "
                         "(--overwrite replaces only a kNN export ltc-ray wrote)")
    stamp = file_stamp(fs, path)
    if marker is None or {key: marker.get(key) for key in stamp} != stamp:
        raise InputError(output, "already exists and is not a kNN export ltc-ray wrote (no "
                         f"matching {brief(marker_uri.rsplit('/', 1)[-1], 60)}); "
                         "--overwrite replaces only those: choose a new path")


def export_ltc_npz(
    work_dir: str, output: str, storage_options: dict | None = None, overwrite: bool = False
) -> tuple[int, int]:
    """Stream a run's kNN graph (``<work_dir>/knn`` or ``work_dir`` itself) into a
    learn-to-cluster ``faiss_k_<k>.npz``; returns (N, k).

    A job deletes only what it wrote: an existing ``output`` is refused unless
    ``overwrite`` and the ``<output>.ltc-ray.json`` marker an earlier export left beside it
    still matches it (see :func:`_check_export_target`). Each block is checked against
    the manifest while streaming; nothing is left at ``output`` if one is damaged."""
    manifest = _read_manifest_checked(
        join_uri(work_dir, "knn"), storage_options
    ) or _read_manifest_checked(work_dir, storage_options)
    if manifest is None:
        raise InputError(work_dir, "no complete kNN graph here (knn/manifest.json missing)")
    _check_export_target(output, work_dir, overwrite, storage_options)

    def blocks():
        for b in range(manifest.n_blocks):
            uri = manifest.block_uri(b)
            ids, sims, start = load_knn_block(uri, storage_options)
            lo, hi = manifest.block_range(b)
            if start != lo or ids.shape != (hi - lo, manifest.k):
                raise InputError(uri, f"holds {ids.shape[0]} rows from row {start} with "
                                 f"k={ids.shape[1]}; the manifest says {hi - lo} rows from row "
                                 f"{lo} with k={manifest.k}")
            if ids.size and (int(ids.min()) < -1 or int(ids.max()) >= manifest.n_rows):
                raise InputError(uri, f"has a neighbour id outside [-1, {manifest.n_rows})")
            if np.isnan(sims).any():
                raise InputError(uri, "has a NaN similarity")
            yield ids, sims

    write_ltc_knn(output, manifest.n_rows, manifest.k, blocks(), storage_options)
    fs, path = url_to_fs(output, storage_options)
    marker = {"format": EXPORT_FORMAT, **file_stamp(fs, path), "n_rows": manifest.n_rows,
              "k": manifest.k}
    write_bytes_atomic(output + EXPORT_MARKER_SUFFIX,
                       json.dumps(marker, indent=2).encode() + b"\n", storage_options)
    return manifest.n_rows, manifest.k
