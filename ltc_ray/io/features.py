"""Feature matrices (.bin, .npy, Parquet) read by row range, never whole to use a slice.

A :class:`FeatureInfo` is what a driver learns from the file's header or metadata
(N, D, format); it is small and picklable, so Ray ships it to the workers, which then
read their own row ranges straight from storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ltc_ray.errors import InputError
from ltc_ray.io.fs import (
    file_size,
    join_uri,
    read_bytes_range,
    require_file,
    url_to_fs,
    write_bytes_atomic,
)

__all__ = [
    "DEFAULT_BIN_DIM",
    "FEATURE_FORMATS",
    "FeatureInfo",
    "check_unique_ids",
    "feature_format",
    "inspect_features",
    "read_features",
    "read_ids",
    "scan_features",
    "validate_rows",
    "write_feature_part",
    "write_parts_manifest",
]

DEFAULT_BIN_DIM = 256
FEATURE_FORMATS = {
    ".parts.json": "parts",
    ".bin": "bin",
    ".npy": "npy",
    ".parquet": "parquet",
    ".pq": "parquet",
}
PARTS_KIND = "ltc-ray-feature-parts"
_NPY_DTYPES = ("float16", "float32", "float64")
EMBEDDING_COLUMN = "embedding"
ID_COLUMN = "id"


@dataclass(frozen=True)
class FeatureInfo:
    """Where a feature matrix lives and its shape; enough to read any row range.

    ``storage_options`` may hold credentials, so it is kept out of ``repr``/``str``
    and out of equality/hashing.
    """

    uri: str
    format: str  # "bin" | "npy" | "parquet"
    n_rows: int
    dim: int
    dtype: str  # on-disk dtype, e.g. "float32" (bin is always float32)
    header_bytes: int  # .npy data offset; 0 for bin/parquet
    has_ids: bool  # parquet with an `id` column
    storage_options: dict | None = field(default=None, repr=False, compare=False)
    version: str = ""  # changes when the file's content may have (fsspec ukey / parts token)
    parts: tuple = ()  # "parts" format: ((start, stop, uri, header_bytes), ...)

    @property
    def row_bytes(self) -> int:
        """Bytes per row on disk for the byte-addressed formats (bin, npy)."""
        return self.dim * np.dtype(self.dtype).itemsize


def feature_format(uri: str) -> str:
    """Format name from the file extension; unknown extensions are an input error."""
    name = str(uri).rstrip("/").rsplit("/", 1)[-1].lower()
    for ext, fmt in FEATURE_FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise InputError(
        uri, "unsupported feature format; supported: .bin (float32 N x D), .npy, .parquet/.pq"
    )


def inspect_features(
    uri: str, dim: int | None = None, storage_options: dict | None = None
) -> FeatureInfo:
    """Read only the header/metadata of a feature file and check it is usable.

    ``dim`` is required knowledge for ``.bin`` (default 256) and a cross-check for the
    self-describing formats. Raises :class:`InputError` naming the file on any problem.
    """
    fmt = feature_format(uri)
    require_file(uri, "feature file", storage_options)
    if dim is not None and (isinstance(dim, bool) or int(dim) != dim or dim <= 0):
        raise InputError(uri, f"dim must be a positive integer, got {dim!r}")
    if fmt == "parts":
        info = _inspect_parts(uri, dim, storage_options)
    elif fmt == "bin":
        info = _inspect_bin(uri, dim, storage_options)
    elif fmt == "npy":
        info = _inspect_npy(uri, dim, storage_options)
    else:
        info = _inspect_parquet(uri, dim, storage_options)
    if info.n_rows < 2:
        raise InputError(uri, f"need at least 2 samples, found {info.n_rows}")
    if not info.version:
        fs, path = url_to_fs(uri, storage_options)
        info = dataclasses.replace(info, version=str(fs.ukey(path)))
    return info


def write_feature_part(
    directory: str, index: int, start: int, x: np.ndarray, storage_options: dict | None = None
) -> tuple[int, int, str, int]:
    """Write rows ``start..`` of a matrix produced in pieces (e.g. GCN features written by
    partition actors) as ``part-<index>.npy``; returns its entry for the parts manifest."""
    x = np.ascontiguousarray(x, dtype="<f4")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, x, allow_pickle=False)
    name = f"part-{index:05d}.npy"
    header = len(buf.getvalue()) - x.nbytes
    write_bytes_atomic(join_uri(directory, name), buf.getvalue(), storage_options)
    return (int(start), int(start + len(x)), name, int(header))


def write_parts_manifest(
    uri: str, dim: int, parts: list[tuple[int, int, str, int]], storage_options: dict | None = None
) -> None:
    """Publish pieces written by :func:`write_feature_part` as one readable matrix
    (``*.parts.json``); rows must tile ``[0, N)`` in order."""
    parts = sorted(parts)
    if parts[0][0] != 0 or any(a[1] != b[0] for a, b in zip(parts[:-1], parts[1:], strict=True)):
        raise ValueError("feature parts must tile [0, N) without gaps")
    manifest = {
        "kind": PARTS_KIND,
        "n_rows": parts[-1][1],
        "dim": int(dim),
        "token": uuid.uuid4().hex,
        "parts": [{"start": a, "stop": b, "file": f, "header_bytes": h} for a, b, f, h in parts],
    }
    write_bytes_atomic(uri, json.dumps(manifest, indent=1).encode(), storage_options)


def _inspect_parts(uri: str, dim: int | None, storage_options: dict | None) -> FeatureInfo:
    try:
        manifest = json.loads(read_bytes_range(uri, 0, file_size(uri, storage_options),
                                               storage_options))
        if manifest.get("kind") != PARTS_KIND:
            raise ValueError("not a feature-parts manifest")
        d = int(manifest["dim"])
        base = uri.rsplit("/", 1)[0] if "/" in uri else "."
        parts = tuple(
            (int(p["start"]), int(p["stop"]), join_uri(base, p["file"]), int(p["header_bytes"]))
            for p in manifest["parts"]
        )
        n = int(manifest["n_rows"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(uri, f"invalid feature-parts manifest ({exc})") from None
    if dim is not None and int(dim) != d:
        raise InputError(uri, f"has dim {d}, expected {dim}")
    return FeatureInfo(uri, "parts", n, d, "float32", 0, False, storage_options,
                       version=str(manifest["token"]), parts=parts)


def _inspect_bin(uri: str, dim: int | None, storage_options: dict | None) -> FeatureInfo:
    d = DEFAULT_BIN_DIM if dim is None else int(dim)
    size = file_size(uri, storage_options)
    if size == 0:
        raise InputError(uri, "feature file is empty")
    row_bytes = 4 * d
    if size % row_bytes:
        raise InputError(
            uri,
            f"size {size} bytes is not a multiple of 4 * D = {row_bytes} bytes for "
            f"float32 rows with D = {d}; --dim may be wrong",
        )
    return FeatureInfo(uri, "bin", size // row_bytes, d, "float32", 0, False, storage_options)


def _npy_header(uri: str, storage_options: dict | None) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) from the first bytes of a .npy file."""
    size = file_size(uri, storage_options)
    if size == 0:
        raise InputError(uri, "feature file is empty")
    prefix = read_bytes_range(uri, 0, min(size, 12), storage_options)
    if len(prefix) < 10 or prefix[:6] != b"\x93NUMPY":
        raise InputError(uri, "not a .npy file (bad magic bytes)")
    major = prefix[6]
    if major == 1:
        total = 10 + struct.unpack("<H", prefix[8:10])[0]
    elif major in (2, 3) and len(prefix) >= 12:
        total = 12 + struct.unpack("<I", prefix[8:12])[0]
    else:
        raise InputError(uri, f"unsupported .npy format version {major}.{prefix[7]}")
    if total > size:
        raise InputError(uri, "truncated .npy header")
    buf = io.BytesIO(read_bytes_range(uri, 0, total, storage_options))
    shape, fortran, dtype = parse_npy_header(buf, uri, "invalid .npy header")
    return shape, fortran, dtype, total


def parse_npy_header(stream: IO[bytes], uri: str, problem: str) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) from a stream positioned at an .npy magic string;
    never unpickles anything. A malformed header is an InputError ``problem (detail)``."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise InputError(uri, f"{problem} ({exc})") from None
    return tuple(shape), bool(fortran), np.dtype(dtype)


def _inspect_npy(uri: str, dim: int | None, storage_options: dict | None) -> FeatureInfo:
    shape, fortran, dtype, offset = _npy_header(uri, storage_options)
    if dtype.hasobject:
        raise InputError(uri, "pickled arrays are refused (object dtype); save a float32 array")
    if len(shape) != 2:
        raise InputError(uri, f"expected a 2-D (N, D) array, found shape {shape}")
    if fortran:
        raise InputError(uri, "Fortran-order arrays are not supported; save a C-order array")
    if dtype.fields is not None or dtype.kind != "f" or dtype.name not in _NPY_DTYPES:
        raise InputError(uri, f"dtype {dtype} not supported; use float32, float16 or float64")
    if dtype.byteorder == ">":
        raise InputError(uri, f"big-endian dtype {dtype.str} not supported; save little-endian")
    n, d = int(shape[0]), int(shape[1])
    if d == 0:
        raise InputError(uri, "rows have zero width (D = 0)")
    if dim is not None and dim != d:
        raise InputError(uri, f"features have D = {d} but dim {dim} was given (--dim)")
    need = offset + n * d * dtype.itemsize
    size = file_size(uri, storage_options)
    if size < need:
        raise InputError(
            uri, f"truncated: header says {n} x {d} needing {need} bytes, file has {size}"
        )
    return FeatureInfo(uri, "npy", n, d, dtype.name, offset, False, storage_options)


@contextlib.contextmanager
def _parquet_file(uri: str, storage_options: dict | None) -> Iterator[pq.ParquetFile]:
    fs, path = url_to_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(uri, f"not a readable Parquet file ({exc})") from None
        try:
            yield pf
        finally:
            pf.close()


def _embedding_dtype(uri: str, t: pa.DataType) -> str:
    ok_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if ok_list and t.value_type in (pa.float32(), pa.float64()):
        return "float32" if t.value_type == pa.float32() else "float64"
    raise InputError(
        uri,
        f"column '{EMBEDDING_COLUMN}' has type {t}, expected list<float32> or "
        "fixed_size_list<float32>",
    )


def _inspect_parquet(uri: str, dim: int | None, storage_options: dict | None) -> FeatureInfo:
    with _parquet_file(uri, storage_options) as pf:
        schema = pf.schema_arrow
        if EMBEDDING_COLUMN not in schema.names:
            cols = ", ".join(schema.names) or "none"
            raise InputError(uri, f"no column '{EMBEDDING_COLUMN}' (columns: {cols})")
        emb_type = schema.field(EMBEDDING_COLUMN).type
        dtype = _embedding_dtype(uri, emb_type)
        has_ids = ID_COLUMN in schema.names
        if has_ids and not pa.types.is_integer(schema.field(ID_COLUMN).type):
            t = schema.field(ID_COLUMN).type
            raise InputError(uri, f"column '{ID_COLUMN}' has type {t}, expected an integer type")
        n = int(pf.metadata.num_rows)
        if pa.types.is_fixed_size_list(emb_type):
            d = int(emb_type.list_size)
        elif n == 0:
            d = 0
        else:
            first = next(pf.iter_batches(batch_size=1, columns=[EMBEDDING_COLUMN]))
            cell = first.column(0)[0]
            if not cell.is_valid:
                raise InputError(uri, "row 0 has a null embedding")
            d = len(cell)
    if n >= 2 and d == 0:
        raise InputError(uri, "embeddings have length 0")
    if dim is not None and n >= 1 and dim != d:
        raise InputError(uri, f"features have D = {d} but dim {dim} was given (--dim)")
    return FeatureInfo(uri, "parquet", n, d, dtype, 0, has_ids, storage_options)


def _check_range(info: FeatureInfo, start: int, stop: int) -> None:
    if not 0 <= start <= stop <= info.n_rows:
        raise ValueError(f"row range [{start}, {stop}) outside [0, {info.n_rows}) of {info.uri}")


def _parquet_column(info: FeatureInfo, column: str, start: int, stop: int) -> pa.Array:
    """Rows ``[start, stop)`` of one column, reading only the overlapping row groups."""
    pieces = []
    with _parquet_file(info.uri, info.storage_options) as pf:
        col_type = pf.schema_arrow.field(column).type
        meta = pf.metadata
        rg_start = 0
        for rg in range(meta.num_row_groups):
            rg_rows = meta.row_group(rg).num_rows
            rg_stop = rg_start + rg_rows
            if rg_stop > start and rg_start < stop:
                col = pf.read_row_group(rg, columns=[column]).column(0)
                lo = max(start, rg_start) - rg_start
                hi = min(stop, rg_stop) - rg_start
                pieces.extend(col.slice(lo, hi - lo).chunks)
            rg_start = rg_stop
            if rg_start >= stop:
                break
    if not pieces:
        return pa.array([], type=col_type)
    return pa.concat_arrays(pieces) if len(pieces) > 1 else pieces[0]


def _parquet_embeddings(info: FeatureInfo, start: int, stop: int) -> np.ndarray:
    arr = _parquet_column(info, EMBEDDING_COLUMN, start, stop)
    n = stop - start
    if arr.null_count:
        i = int(np.flatnonzero(~np.asarray(arr.is_valid()))[0])
        raise InputError(info.uri, f"row {start + i} has a null embedding")
    if not pa.types.is_fixed_size_list(arr.type):
        offsets = np.asarray(arr.offsets)
        lengths = np.diff(offsets)
        bad = np.flatnonzero(lengths != info.dim)
        if bad.size:
            i = int(bad[0])
            raise InputError(
                info.uri, f"row {start + i} has {lengths[i]} values, expected D = {info.dim}"
            )
    values = arr.flatten()
    if values.null_count:
        i = int(np.flatnonzero(~np.asarray(values.is_valid()))[0]) // info.dim
        raise InputError(info.uri, f"row {start + i} has a null value in its embedding")
    return values.to_numpy(zero_copy_only=False).reshape(n, info.dim)


def _read_raw(info: FeatureInfo, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` as stored (on-disk dtype), shape ``(stop - start, dim)``."""
    _check_range(info, start, stop)
    n = stop - start
    if info.format == "parquet":
        return _parquet_embeddings(info, start, stop)
    if info.format == "parts":
        pieces = []
        for lo, hi, part_uri, header in info.parts:
            if hi <= start or lo >= stop:
                continue
            part = FeatureInfo(part_uri, "npy", hi - lo, info.dim, "float32", header, False,
                               info.storage_options)
            pieces.append(_read_raw(part, max(start, lo) - lo, min(stop, hi) - lo))
        return np.concatenate(pieces) if pieces else np.empty((0, info.dim), np.float32)
    dtype = np.dtype(info.dtype).newbyteorder("<")
    begin = info.header_bytes + start * info.row_bytes
    data = read_bytes_range(info.uri, begin, begin + n * info.row_bytes, info.storage_options)
    if len(data) != n * info.row_bytes:
        raise InputError(
            info.uri, f"file is shorter than expected while reading rows {start}..{stop}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(n, info.dim)


def _squared_norms(x: np.ndarray) -> np.ndarray:
    """(n,) float64 squared row norms; NaN/Inf rows come out non-finite, zero rows as 0.

    Accumulating in float64 means no finite float32/float64-range row overflows or
    underflows, so the result is an exact test for both bad cases.
    """
    if x.dtype == np.float64:
        with np.errstate(over="ignore", invalid="ignore"):
            return np.einsum("ij,ij->i", x, x)
    return np.einsum("ij,ij->i", x, x, dtype=np.float64)


def _check_squared_norms(sq: np.ndarray, info: FeatureInfo, start: int) -> None:
    bad = np.flatnonzero(~np.isfinite(sq))
    if bad.size:
        raise InputError(info.uri, f"row {start + int(bad[0])} contains NaN or Inf")
    zero = np.flatnonzero(sq == 0)
    if zero.size:
        raise InputError(info.uri, f"row {start + int(zero[0])} has zero norm")


def validate_rows(x: np.ndarray, info: FeatureInfo, start: int) -> None:
    """Refuse rows that cannot be L2-normalised: NaN/Inf entries or zero norm.

    ``x`` is ``(n, dim)`` raw (un-normalised) rows that start at file row ``start``; the
    error names the file and the first bad row.
    """
    _check_squared_norms(_squared_norms(x), info, start)


def read_features(info: FeatureInfo, start: int, stop: int, normalize: bool = True) -> np.ndarray:
    """Rows ``[start, stop)`` as ``(stop - start, dim)`` float32, C-contiguous.

    With ``normalize`` (the default everywhere in learn-to-cluster) rows are validated
    and L2-normalised, so inner products are cosine similarities.
    """
    raw = _read_raw(info, start, stop)
    if not normalize:
        x = raw.astype(np.float32, copy=False)
        return np.ascontiguousarray(x) if x.flags.writeable else x.copy()
    sq = _squared_norms(raw)
    _check_squared_norms(sq, info, start)
    norms = np.sqrt(sq)
    x32 = raw.astype(np.float32, copy=False)
    with np.errstate(over="ignore"):
        norms32 = norms.astype(np.float32)
    out = np.divide(x32, norms32[:, None], dtype=np.float32)
    # A float32 norm can overflow for rows near float32 max; redo those in float64.
    wide = np.flatnonzero(~np.isfinite(norms32))
    if wide.size:
        out[wide] = (raw[wide].astype(np.float64) / norms[wide, None]).astype(np.float32)
    return out


def read_ids(info: FeatureInfo, start: int, stop: int) -> np.ndarray | None:
    """``(stop - start,)`` int64 external ids from a Parquet ``id`` column, else ``None``."""
    if not info.has_ids:
        return None
    _check_range(info, start, stop)
    arr = _parquet_column(info, ID_COLUMN, start, stop)
    if arr.null_count:
        i = int(np.flatnonzero(~np.asarray(arr.is_valid()))[0])
        raise InputError(info.uri, f"row {start + i} has a null '{ID_COLUMN}'")
    try:
        arr = arr.cast(pa.int64())
    except pa.ArrowInvalid:
        raise InputError(info.uri, f"column '{ID_COLUMN}' has values beyond int64") from None
    return arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def scan_features(info: FeatureInfo, start: int, stop: int, chunk_rows: int = 65536) -> None:
    """Validate rows ``[start, stop)`` chunk by chunk, before any expensive stage runs.

    Memory stays at one chunk (``chunk_rows x dim``); raises :class:`InputError` on the
    first bad row.
    """
    _check_range(info, start, stop)
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    for lo in range(start, stop, chunk_rows):
        hi = min(stop, lo + chunk_rows)
        validate_rows(_read_raw(info, lo, hi), info, lo)


def check_unique_ids(ids: np.ndarray, where: str) -> None:
    """Refuse duplicated external ids ``(n,)``, naming one of them (sort + neighbour compare)."""
    ids = np.asarray(ids)
    if ids.size < 2:
        return
    s = np.sort(ids, kind="stable")
    dup = np.flatnonzero(s[1:] == s[:-1])
    if dup.size:
        raise InputError(where, f"id {s[dup[0]]} appears more than once")
