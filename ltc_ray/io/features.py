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
import math
import posixpath
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ltc_ray.errors import InputError, brief
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
    "parse_npy_header",
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
# numpy's own default ``max_header_size``: a longer .npy header is refused unread
NPY_MAX_HEADER_BYTES = 10000
# no storage holds an array this large; a header claiming one is corrupt
_NPY_MAX_ARRAY_BYTES = 2**60
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
    uri: str,
    dim: int | None = None,
    storage_options: dict | None = None,
    *,
    internal_parts: bool = False,
) -> FeatureInfo:
    """Read only the header/metadata of a feature file and check it is usable.

    ``dim`` is required knowledge for ``.bin`` (default 256) and a cross-check for the
    self-describing formats. Raises :class:`InputError` naming the file on any problem.
    ``*.parts.json`` (node features a run wrote in pieces) is ltc-ray's own format: only a
    run reading back what it wrote passes ``internal_parts=True``; from a user it is refused.
    """
    fmt = feature_format(uri)
    if fmt == "parts" and not internal_parts:
        raise InputError(
            uri,
            "is an internal ltc-ray format (feature parts a run writes for itself), not an "
            "input; give a .bin, .npy or .parquet feature file",
        )
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


def _part_file(name: object) -> str:
    """A part's file name from a manifest, refused unless it lies inside the manifest's
    own directory (a relative path without ``..``, no scheme, no absolute path)."""
    if not isinstance(name, str) or not name or "\\" in name or "://" in name:
        raise ValueError(f"part file {brief(repr(name))} is not a relative path")
    segments = name.split("/")
    if posixpath.isabs(name) or any(seg in ("", ".", "..") for seg in segments):
        raise ValueError(f"part file {brief(repr(name))} is outside the manifest's directory")
    return name


def _manifest_int(value: object, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {brief(repr(value))}")
    return value


def _inspect_parts(uri: str, dim: int | None, storage_options: dict | None) -> FeatureInfo:
    """The parts manifest a run wrote; its parts must tile ``[0, N)`` exactly, in files
    next to the manifest, so no row is missing or read twice and nothing else is read."""
    try:
        manifest = json.loads(read_bytes_range(uri, 0, file_size(uri, storage_options),
                                               storage_options))
        if not isinstance(manifest, dict) or manifest.get("kind") != PARTS_KIND:
            raise ValueError("not a feature-parts manifest")
        d = _manifest_int(manifest["dim"], "dim", 1)
        n = _manifest_int(manifest["n_rows"], "n_rows", 0)
        base = uri.rsplit("/", 1)[0] if "/" in uri else "."
        entries = manifest["parts"]
        if not isinstance(entries, list) or not entries:
            raise ValueError("no parts")
        parts = sorted(
            (_manifest_int(p["start"], "start", 0), _manifest_int(p["stop"], "stop", 1),
             join_uri(base, _part_file(p["file"])),
             _manifest_int(p["header_bytes"], "header_bytes", 0))
            for p in entries
        )
        expected = 0
        for lo, hi, _, _ in parts:
            if lo != expected or hi <= lo:
                raise ValueError(f"parts do not tile [0, {n}): part [{lo}, {hi}) after "
                                 f"row {expected}")
            expected = hi
        if expected != n:
            raise ValueError(f"parts cover [0, {expected}), the manifest says {n} rows")
        token = str(manifest["token"])
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InputError(uri, f"invalid feature-parts manifest ({brief(exc)})") from None
    if dim is not None and int(dim) != d:
        raise InputError(uri, f"has dim {d}, expected {dim}")
    return FeatureInfo(uri, "parts", n, d, "float32", 0, False, storage_options,
                       version=token, parts=tuple(parts))


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


def _npy_length_field(version: tuple[int, int]) -> str | None:
    """struct format of the header-length field of a .npy format version (None: unknown)."""
    return {1: "<H", 2: "<I", 3: "<I"}.get(version[0]) if version[1] == 0 else None


def _npy_header(uri: str, storage_options: dict | None) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) from the first bytes of a .npy file."""
    size = file_size(uri, storage_options)
    if size == 0:
        raise InputError(uri, "feature file is empty")
    prefix = read_bytes_range(uri, 0, min(size, 12), storage_options)
    if len(prefix) < 10 or prefix[:6] != b"\x93NUMPY":
        raise InputError(uri, "not a .npy file (bad magic bytes)")
    length_field = _npy_length_field((prefix[6], prefix[7]))
    if length_field is None:
        raise InputError(uri, f"unsupported .npy format version {prefix[6]}.{prefix[7]}")
    start = 8 + struct.calcsize(length_field)
    if len(prefix) < start:
        raise InputError(uri, "truncated .npy header")
    header_len = struct.unpack(length_field, prefix[8:start])[0]
    if header_len > NPY_MAX_HEADER_BYTES:
        raise InputError(
            uri, f"invalid .npy header (header of {header_len} bytes, more than "
            f"{NPY_MAX_HEADER_BYTES})"
        )
    total = start + header_len
    if total > size:
        raise InputError(uri, "truncated .npy header")
    buf = io.BytesIO(read_bytes_range(uri, 0, total, storage_options))
    shape, fortran, dtype = parse_npy_header(buf, uri, "invalid .npy header")
    return shape, fortran, dtype, total


def _read_upto(stream: IO[bytes], nbytes: int) -> bytes:
    """Up to ``nbytes`` from ``stream`` (fewer only at its end)."""
    parts, got = [], 0
    while got < nbytes:
        chunk = stream.read(nbytes - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def parse_npy_header(stream: IO[bytes], uri: str, problem: str) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) from a stream positioned at an .npy magic string;
    never unpickles anything and reads at most :data:`NPY_MAX_HEADER_BYTES` of header.
    A malformed header (not a dict, bad syntax, a negative or absurd shape, ...) is an
    InputError ``problem (detail)`` of one bounded line."""
    prefix = _read_upto(stream, 8)
    if len(prefix) < 8 or prefix[:6] != b"\x93NUMPY":
        raise InputError(uri, f"{problem} (bad magic bytes)")
    length_field = _npy_length_field((prefix[6], prefix[7]))
    if length_field is None:
        raise InputError(uri, f"{problem} (unsupported .npy format version "
                              f"{prefix[6]}.{prefix[7]})")
    length_bytes = _read_upto(stream, struct.calcsize(length_field))
    if len(length_bytes) < struct.calcsize(length_field):
        raise InputError(uri, f"{problem} (truncated)")
    header_len = struct.unpack(length_field, length_bytes)[0]
    if header_len > NPY_MAX_HEADER_BYTES:
        raise InputError(uri, f"{problem} (header of {header_len} bytes, more than "
                              f"{NPY_MAX_HEADER_BYTES})")
    header = _read_upto(stream, header_len)
    if len(header) < header_len:
        raise InputError(uri, f"{problem} (truncated)")
    whole = io.BytesIO(prefix + length_bytes + header)
    try:
        version = np.lib.format.read_magic(whole)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(whole)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(whole)
        dtype = np.dtype(dtype)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parser failure is bad input
        detail = brief(exc) if isinstance(exc, ValueError) else (
            f"header is not a Python literal: {type(exc).__name__}")
        raise InputError(uri, f"{problem} ({detail})") from None
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InputError(uri, f"{problem} (negative dimension in shape {brief(shape)})")
    if math.prod(shape) * dtype.itemsize > _NPY_MAX_ARRAY_BYTES:
        raise InputError(uri, f"{problem} (absurd shape {brief(shape)})")
    return shape, bool(fortran), dtype


def _inspect_npy(uri: str, dim: int | None, storage_options: dict | None) -> FeatureInfo:
    shape, fortran, dtype, offset = _npy_header(uri, storage_options)
    if dtype.hasobject:
        raise InputError(uri, "pickled arrays are refused (object dtype); save a float32 array")
    if len(shape) != 2:
        raise InputError(uri, f"expected a 2-D (N, D) array, found shape {brief(shape)}")
    if fortran:
        raise InputError(uri, "Fortran-order arrays are not supported; save a C-order array")
    if dtype.fields is not None or dtype.kind != "f" or dtype.name not in _NPY_DTYPES:
        raise InputError(
            uri, f"dtype {brief(dtype)} not supported; use float32, float16 or float64"
        )
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


def _is_parquet_format_error(exc: BaseException) -> bool:
    """Whether pyarrow refused the file's bytes (corrupt, truncated, not Parquet) rather
    than storage failing: Arrow's own errors, and the bare ``OSError`` without an errno
    that Arrow raises for an undecodable page or footer. A storage failure (an OSError
    subclass or one with an errno, botocore's, ...) stays what it is, so workers retry it."""
    if isinstance(exc, pa.ArrowException):
        return True
    return type(exc) is OSError and exc.errno is None


@contextlib.contextmanager
def _parquet_file(uri: str, storage_options: dict | None) -> Iterator[pq.ParquetFile]:
    """The open ParquetFile; a format error while opening or reading it (in the driver or
    in a Ray task scanning its rows) is an InputError naming the file, in one line."""
    fs, path = url_to_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:
            if not _is_parquet_format_error(exc):
                raise
            raise InputError(uri, f"not a readable Parquet file ({brief(exc)})") from None
        try:
            yield pf
        except Exception as exc:
            if not _is_parquet_format_error(exc):
                raise
            raise InputError(uri, f"corrupt Parquet file ({brief(exc)})") from None
        finally:
            pf.close()


def _unique_column(uri: str, schema: pa.Schema, name: str) -> bool:
    """Whether the column ``name`` is present; refused when it appears more than once, as
    a reader could not tell which one holds the data."""
    count = schema.names.count(name)
    if count > 1:
        raise InputError(uri, f"column '{name}' appears {count} times; column names must be "
                              "unique")
    return count == 1


def _embedding_dtype(uri: str, t: pa.DataType) -> str:
    ok_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if ok_list and t.value_type in (pa.float32(), pa.float64()):
        return "float32" if t.value_type == pa.float32() else "float64"
    raise InputError(
        uri,
        f"column '{EMBEDDING_COLUMN}' has type {brief(t)}, expected list<float32> or "
        "fixed_size_list<float32>",
    )


def _inspect_parquet(uri: str, dim: int | None, storage_options: dict | None) -> FeatureInfo:
    with _parquet_file(uri, storage_options) as pf:
        schema = pf.schema_arrow
        if not _unique_column(uri, schema, EMBEDDING_COLUMN):
            cols = brief(", ".join(schema.names) or "none")
            raise InputError(uri, f"no column '{EMBEDDING_COLUMN}' (columns: {cols})")
        emb_type = schema.field(EMBEDDING_COLUMN).type
        dtype = _embedding_dtype(uri, emb_type)
        has_ids = _unique_column(uri, schema, ID_COLUMN)
        if has_ids and not pa.types.is_integer(schema.field(ID_COLUMN).type):
            t = schema.field(ID_COLUMN).type
            raise InputError(
                uri, f"column '{ID_COLUMN}' has type {brief(t)}, expected an integer type"
            )
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
    if len(arr) != n:
        raise InputError(info.uri, f"corrupt Parquet file (rows {start}..{stop} hold "
                                   f"{len(arr)} values: the row groups disagree with the footer)")
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
