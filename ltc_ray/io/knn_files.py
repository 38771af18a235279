"""kNN graph files: learn-to-cluster ``faiss_k_80.npz`` import/export and our block files.

Our in-memory convention: ``knn_ids (n, k) int32`` (int64 when N >= 2**31) and
``knn_sims (n, k) float32`` cosine similarity, sorted by similarity descending, self at
rank 0; an empty slot is id -1 with similarity -inf. learn-to-cluster stores ``data`` of
shape ``(N, 2, k)`` float64: ids, then ``1 - cos``, empty slots as id -1 (faiss' marker;
our export writes distance inf there). At part9 that is 6.7 GB, so it is read and written
as a stream of row blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from typing import IO

import numpy as np

from ltc_ray.errors import InputError, WorkFileError, brief
from ltc_ray.io.features import parse_npy_header
from ltc_ray.io.fs import is_local_fs, require_file, url_to_fs, write_bytes_atomic

__all__ = [
    "EMPTY_SLOT",
    "SIM_TOLERANCE",
    "check_ltc_knn",
    "id_dtype_for",
    "inspect_ltc_knn",
    "iter_ltc_knn",
    "load_knn_block",
    "save_knn_block",
    "validate_knn",
    "write_ltc_knn",
]

_LTC_MEMBER = "data.npy"
_LTC_DTYPES = ("float32", "float64")
EMPTY_SLOT = -1  # neighbour id of an empty slot (faiss' marker), kept with similarity -inf
# float rounding allowed on a similarity (1 - distance) before it counts as outside [-1, 1]
SIM_TOLERANCE = 1e-5
# what zipfile/zlib raise while reading a corrupt or truncated archive member
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError)


def id_dtype_for(n_rows: int) -> np.dtype:
    """Neighbour-id dtype for a graph over ``n_rows`` samples: int32 unless N >= 2**31."""
    return np.dtype(np.int32) if n_rows < 2**31 else np.dtype(np.int64)


@contextlib.contextmanager
def _ltc_member(
    uri: str, storage_options: dict | None
) -> Iterator[tuple[IO[bytes], int, int, np.dtype]]:
    """Open ``data.npy`` inside the npz, parse its header; yield (stream, N, k, dtype).
    A corrupt archive, found here or while the caller reads the stream, is an InputError."""
    fs, path = require_file(uri, "kNN file", storage_options)
    with fs.open(path, "rb") as f:
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, EOFError):
            raise InputError(uri, "not a valid .npz (zip) file") from None
        with zf:
            names = zf.namelist()
            if _LTC_MEMBER not in names:
                keys = ", ".join(n.removesuffix(".npy") for n in names) or "none"
                raise InputError(uri, f"no array 'data' in the npz (keys: {brief(keys)})")
            try:  # (encrypted or unknown compression: RuntimeError / NotImplementedError)
                member = zf.open(_LTC_MEMBER)
            except (*_ZIP_ERRORS, NotImplementedError, RuntimeError) as exc:
                raise InputError(uri, f"corrupt .npz ({brief(exc)})") from None
            with member:
                try:
                    n, k, dtype = _check_member_header(member, uri)
                    yield member, n, k, dtype
                except _ZIP_ERRORS as exc:
                    raise InputError(uri, f"corrupt .npz ({brief(exc)})") from None


def _check_member_header(member: IO[bytes], uri: str) -> tuple[int, int, np.dtype]:
    """(N, k, dtype) from the header of ``data.npy``, refusing what cannot be a kNN."""
    shape, fortran, dtype = parse_npy_header(member, uri, "array 'data' has an invalid header")
    if dtype.hasobject:
        raise InputError(
            uri,
            "pickled arrays are refused (array 'data' has object dtype, e.g. a "
            "ragged hnsw kNN); rebuild the kNN with faiss",
        )
    if len(shape) != 3 or shape[1] != 2:
        raise InputError(
            uri, f"array 'data' has shape {brief(shape)}, expected (N, 2, k)"
        )
    if dtype.name not in _LTC_DTYPES or dtype.byteorder == ">":
        raise InputError(
            uri, f"array 'data' has dtype {brief(dtype.str)}, expected float64 or float32"
        )
    if fortran:
        raise InputError(uri, "array 'data' is Fortran-ordered; expected C order")
    return int(shape[0]), int(shape[2]), dtype


def inspect_ltc_knn(uri: str, storage_options: dict | None = None) -> tuple[int, int]:
    """``(N, k)`` of a learn-to-cluster kNN npz from its header alone."""
    with _ltc_member(uri, storage_options) as (_, n, k, _dtype):
        return n, k


def check_ltc_knn(uri: str, n_rows: int, k: int, storage_options: dict | None = None) -> None:
    """Refuse, from the header alone, a learn-to-cluster kNN npz that cannot serve a graph
    of ``k`` neighbours over ``n_rows`` samples (pickled, wrong shape, rows or k)."""
    n, k_file = inspect_ltc_knn(uri, storage_options)
    if n != n_rows:
        raise InputError(uri, f"kNN file has {n} rows but the features have {n_rows}")
    if k_file < k:
        raise InputError(
            uri,
            f"kNN file has k={k_file} neighbours, config asks for knn.k={k} "
            f"(set knn.k={k_file} or knn.reuse=false)",
        )


def _read_exact(stream: IO[bytes], nbytes: int, uri: str) -> bytes:
    parts, got = [], 0
    while got < nbytes:
        chunk = stream.read(nbytes - got)
        if not chunk:
            raise InputError(uri, "array 'data' is truncated")
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def iter_ltc_knn(
    uri: str, block_rows: int = 65536, storage_options: dict | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Stream a learn-to-cluster kNN npz as ``(start_row, knn_ids, knn_sims)`` blocks.

    ``knn_ids`` is ``(b, k)`` int32 (int64 when N >= 2**31), ``knn_sims`` ``(b, k)``
    float32 = 1 - dist, in the file's column order (not re-sorted). Memory stays at one
    block whatever N; works for compressed and stored zips. An id that is neither an
    integer in ``[0, N)`` nor -1 (an empty slot, similarity -inf), and a distance that is
    not finite or puts the similarity outside [-1, 1] (beyond :data:`SIM_TOLERANCE`, within
    which it is clipped) are an input error naming the first bad row.
    """
    if block_rows <= 0:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    with _ltc_member(uri, storage_options) as (member, n, k, dtype):
        ids_dtype = id_dtype_for(n)
        row_bytes = 2 * k * dtype.itemsize
        for start in range(0, n, block_rows):
            b = min(block_rows, n - start)
            buf = _read_exact(member, b * row_bytes, uri)
            block = np.frombuffer(buf, dtype=dtype.newbyteorder("<")).reshape(b, 2, k)
            ids_f, dist = block[:, 0, :], block[:, 1, :]
            empty = ids_f == EMPTY_SLOT
            bad_id = ((ids_f != np.floor(ids_f)) | (ids_f < 0) | (ids_f >= n)) & ~empty
            with np.errstate(invalid="ignore", over="ignore"):
                sims = 1.0 - dist.astype(np.float64)
                bad_sim = ~(np.abs(sims) <= 1.0 + SIM_TOLERANCE) & ~empty  # NaN/Inf too
            bad_row = (bad_id | bad_sim).any(axis=1)
            if bad_row.any():
                r = int(np.argmax(bad_row))
                raise InputError(uri, _bad_slot(start + r, ids_f[r], dist[r], bad_id[r], n))
            knn_sims = np.clip(sims, -1.0, 1.0).astype(np.float32)
            knn_sims[empty] = -np.inf
            yield start, np.where(empty, EMPTY_SLOT, ids_f).astype(ids_dtype), knn_sims


def _bad_slot(row: int, ids: np.ndarray, dist: np.ndarray, bad_id: np.ndarray, n: int) -> str:
    """What is wrong with the first bad slot of one row of a learn-to-cluster kNN."""
    if bad_id.any():
        c = int(np.argmax(bad_id))
        return (f"row {row}: neighbour id {float(ids[c])} is not an integer in [0, {n}) "
                f"(nor {EMPTY_SLOT} for an empty slot)")
    valid = ids != EMPTY_SLOT
    with np.errstate(invalid="ignore", over="ignore"):
        bad = valid & ~(np.abs(1.0 - dist.astype(np.float64)) <= 1.0 + SIM_TOLERANCE)
    d = float(dist[int(np.argmax(bad))])
    if not np.isfinite(d):
        return f"row {row}: distance {d} is not finite"
    return (f"row {row}: distance {d:.6g} gives similarity {1.0 - d:.6g}, outside [-1, 1] "
            "(distances must be 1 - cosine, in [0, 2])")


def write_ltc_knn(
    uri: str,
    n_rows: int,
    k: int,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    storage_options: dict | None = None,
) -> None:
    """Write a learn-to-cluster ``faiss_k_<k>.npz`` from ``(knn_ids, knn_sims)`` row blocks.

    Blocks are ``(b, k)`` each, in row order, ``n_rows`` rows in all; the result reads back
    with ``np.load(uri)['data']`` as ``(N, 2, k)`` float64 (ids, 1 - sim). Compressed,
    zip64, written as a stream. Nothing is left at ``uri`` if writing fails.
    """
    fs, path = url_to_fs(uri, storage_options)
    if is_local_fs(fs):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
        try:
            with os.fdopen(fd, "wb") as f:
                _write_ltc_stream(f, n_rows, k, blocks)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    try:
        with fs.open(path, "wb") as f:
            _write_ltc_stream(f, n_rows, k, blocks)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(path)
        raise


def _write_ltc_stream(
    f: IO[bytes], n_rows: int, k: int, blocks: Iterable[tuple[np.ndarray, np.ndarray]]
) -> None:
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype("<f8")),
        "fortran_order": False,
        "shape": (int(n_rows), 2, int(k)),
    }
    written = 0
    # Level 1: ~4x faster than zlib's default on kNN data for about the same size.
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open(_LTC_MEMBER, "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for knn_ids, knn_sims in blocks:
                knn_ids, knn_sims = np.asarray(knn_ids), np.asarray(knn_sims)
                if knn_ids.ndim != 2 or knn_ids.shape[1] != k or knn_sims.shape != knn_ids.shape:
                    raise ValueError(
                        f"block shapes {knn_ids.shape} / {knn_sims.shape}, expected (b, {k})"
                    )
                if written + knn_ids.shape[0] > n_rows:
                    raise ValueError(f"blocks hold more than n_rows = {n_rows} rows")
                out = np.empty((knn_ids.shape[0], 2, k), dtype="<f8")
                out[:, 0, :] = knn_ids
                np.subtract(1.0, knn_sims, out=out[:, 1, :], dtype=np.float64)
                member.write(memoryview(out).cast("B"))
                written += knn_ids.shape[0]
            if written != n_rows:
                raise ValueError(f"blocks hold {written} rows, expected n_rows = {n_rows}")


def save_knn_block(
    uri: str,
    knn_ids: np.ndarray,
    knn_sims: np.ndarray,
    start_row: int,
    storage_options: dict | None = None,
) -> tuple[int, str]:
    """Write one query block's ``(b, k)`` ids/sims (rows ``start_row..``) as an npz, atomically.

    Returns ``(bytes, sha256)`` of what was written, hashed from the buffer already in
    memory, for the stage marker that later vouches for the file."""
    knn_ids, knn_sims = np.asarray(knn_ids), np.asarray(knn_sims, dtype=np.float32)
    if knn_ids.ndim != 2 or knn_sims.shape != knn_ids.shape:
        raise ValueError(f"knn_ids {knn_ids.shape} and knn_sims {knn_sims.shape} must be (b, k)")
    if not np.issubdtype(knn_ids.dtype, np.integer):
        raise ValueError(f"knn_ids must be integers, got {knn_ids.dtype}")
    buf = io.BytesIO()
    np.savez(buf, ids=knn_ids, sims=knn_sims, start=np.int64(start_row))
    data = buf.getbuffer()
    write_bytes_atomic(uri, data, storage_options)
    return len(data), hashlib.sha256(data).hexdigest()


def load_knn_block(
    uri: str, storage_options: dict | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(knn_ids (b, k), knn_sims (b, k) float32, start_row)`` from a block file.

    Block files are written by the run itself, so a missing or unreadable one (the zip's
    CRC-32 catches flipped bytes) is a :class:`WorkFileError`, never blamed on the input."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise WorkFileError(uri, "kNN block file is missing") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {name: z[name] for name in ("ids", "sims", "start") if name in z.files}
    except (ValueError, OSError, EOFError, KeyError, *_ZIP_ERRORS) as exc:
        if "allow_pickle" in str(exc):
            raise WorkFileError(uri, "pickled arrays are refused (object dtype)") from None
        raise WorkFileError(uri, f"not a readable kNN block ({brief(exc)})") from None
    missing = sorted({"ids", "sims", "start"} - set(arrays))
    if missing:
        raise WorkFileError(uri, f"kNN block lacks arrays {missing}")
    knn_ids, knn_sims, start = arrays["ids"], arrays["sims"], arrays["start"]
    if knn_ids.ndim != 2 or knn_sims.shape != knn_ids.shape or start.shape != ():
        raise WorkFileError(
            uri, f"kNN block shapes {knn_ids.shape} / {knn_sims.shape} disagree"
        )
    return knn_ids, knn_sims, int(start)


def validate_knn(knn_ids: np.ndarray, knn_sims: np.ndarray, n_rows: int, where: str) -> None:
    """Check ``(n, k)`` kNN arrays: matching shapes, ids in ``[0, n_rows)``, finite sims."""
    if knn_ids.ndim != 2 or knn_sims.shape != knn_ids.shape:
        raise InputError(
            where, f"knn_ids {knn_ids.shape} and knn_sims {knn_sims.shape} must both be (n, k)"
        )
    if not np.issubdtype(knn_ids.dtype, np.integer):
        raise InputError(where, f"neighbour ids have dtype {knn_ids.dtype}, expected integers")
    if knn_ids.size:
        lo, hi = int(knn_ids.min()), int(knn_ids.max())
        if lo < 0 or hi >= n_rows:
            bad = lo if lo < 0 else hi
            raise InputError(where, f"neighbour id {bad} outside [0, {n_rows})")
    if not np.isfinite(knn_sims).all():
        r = int(np.argwhere(~np.isfinite(knn_sims))[0][0])
        raise InputError(where, f"row {r} has a NaN or Inf similarity")
