"""Bad-input cases: input files (precomputed kNN contents, Parquet, .npy headers, internal formats).

Every case here fails on what the driver reads before Ray starts: the header of a
``--knn`` npz, the header of a ``.npy``, a small Parquet file (fully scanned in the driver)
or the file name of an internal format. Content problems a Ray worker finds (a kNN's
distances, a large corrupt Parquet) are tested in tests/test_io.py and tests/test_knn.py."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _bad_common import Case, D, K, N, _cluster

HDR = "invalid .npy header"
KNN_HDR = "array 'data' has an invalid header"


def _knn(name: str) -> tuple[str, ...]:
    return _cluster("--knn", f"{{d}}/files-knn-{name}.npz")


def _npy(name: str) -> tuple[str, ...]:
    return ("--features", f"{{d}}/files-npy-{name}.npy", "--set", f"knn.k={K}")


def _pq(name: str) -> tuple[str, ...]:
    return _cluster(features=f"{{d}}/files-{name}.parquet")


# fmt: off
CASES: list[Case] = [
    # --- precomputed kNN (--knn): what the npz header says, checked before Ray starts
    Case("files-knn-int-dtype", _knn("int"),
         "array 'data' has dtype <i8, expected float64 or float32", "{d}/files-knn-int.npz"),
    Case("files-knn-float16", _knn("f2"),
         "array 'data' has dtype <f2, expected float64 or float32", "{d}/files-knn-f2.npz"),
    Case("files-knn-big-endian", _knn("big-endian"),
         "array 'data' has dtype >f8, expected float64 or float32",
         "{d}/files-knn-big-endian.npz"),
    Case("files-knn-2d", _knn("2d"), f"array 'data' has shape ({N}, {2 * K}), expected (N, 2, k)",
         "{d}/files-knn-2d.npz"),
    Case("files-knn-three-planes", _knn("three-planes"),
         f"array 'data' has shape ({N}, 3, {K}), expected (N, 2, k)",
         "{d}/files-knn-three-planes.npz"),
    Case("files-knn-fortran", _knn("fortran"), "array 'data' is Fortran-ordered; expected C order",
         "{d}/files-knn-fortran.npz"),
    Case("files-knn-no-data-key", _knn("no-data"), "no array 'data' in the npz (keys: knns)",
         "{d}/files-knn-no-data.npz"),
    Case("files-knn-not-zip", _knn("not-zip"), "not a valid .npz (zip) file",
         "{d}/files-knn-not-zip.npz"),
    Case("files-knn-directory", _knn("dir"), "kNN file is a directory", "{d}/files-knn-dir.npz"),
    Case("files-knn-negative-dim", _knn("negative"),
         f"{KNN_HDR} (negative dimension in shape (-{N}, 2, {K}))",
         "{d}/files-knn-negative.npz"),
    Case("files-knn-header-not-dict", _knn("not-dict"),
         f"{KNN_HDR} (Header is not a dictionary", "{d}/files-knn-not-dict.npz"),
    Case("files-knn-header-oversized", _knn("oversized"),
         f"{KNN_HDR} (header of 20084 bytes, more than 10000)", "{d}/files-knn-oversized.npz"),
    Case("files-knn-corrupt-deflate", _knn("deflate"),
         "corrupt .npz (Error -3 while decompressing data", "{d}/files-knn-deflate.npz"),
    Case("files-knn-corrupt-member", _knn("member"),
         "corrupt .npz (Bad magic number for file header)", "{d}/files-knn-member.npz"),
    # --- .npy features: a header that lies or that ltc-ray cannot read
    Case("files-npy-negative-rows", _npy("negative-rows"),
         f"{HDR} (negative dimension in shape (-{N}, {D}))", "{d}/files-npy-negative-rows.npy"),
    Case("files-npy-negative-dim", _npy("negative-dim"),
         f"{HDR} (negative dimension in shape ({N}, -{D}))", "{d}/files-npy-negative-dim.npy"),
    Case("files-npy-zero-dim", _npy("zero-dim"), "rows have zero width (D = 0)",
         "{d}/files-npy-zero-dim.npy"),
    Case("files-npy-absurd-shape", _npy("absurd"), f"{HDR} (absurd shape (10",
         "{d}/files-npy-absurd.npy"),
    Case("files-npy-shape-lies", _npy("lies"),
         f"truncated: header says 1000000000 x {D} needing", "{d}/files-npy-lies.npy"),
    Case("files-npy-shape-not-tuple", _npy("shape-int"), f"{HDR} (shape is not valid: 7)",
         "{d}/files-npy-shape-int.npy"),
    Case("files-npy-header-not-dict", _npy("not-dict"), f"{HDR} (Header is not a dictionary",
         "{d}/files-npy-not-dict.npy"),
    Case("files-npy-header-syntax", _npy("syntax"), f"{HDR} (", "{d}/files-npy-syntax.npy"),
    Case("files-npy-header-oversized", _npy("oversized"),
         f"{HDR} (header of 20084 bytes, more than 10000)", "{d}/files-npy-oversized.npy"),
    Case("files-npy-header-huge-length", _npy("huge-length"),
         f"{HDR} (header of 4294967295 bytes, more than 10000)",
         "{d}/files-npy-huge-length.npy"),
    Case("files-npy-version", _npy("version"), "unsupported .npy format version 9.0",
         "{d}/files-npy-version.npy"),
    Case("files-npy-fortran", _npy("fortran"), "Fortran-order arrays are not supported",
         "{d}/files-npy-fortran.npy"),
    Case("files-npy-complex", _npy("complex"), "dtype complex64 not supported",
         "{d}/files-npy-complex.npy"),
    Case("files-npy-structured", _npy("structured"), "dtype [('a', '<f4')] not supported",
         "{d}/files-npy-structured.npy"),
    Case("files-npy-bad-descr", _npy("descr"),
         f"{HDR} (descr is not a valid dtype descriptor: 'zz9')", "{d}/files-npy-descr.npy"),
    Case("files-npy-big-endian", _npy("big-endian"), "big-endian dtype >f4 not supported",
         "{d}/files-npy-big-endian.npy"),
    # --- Parquet features (small: scanned in full by the driver)
    Case("files-parquet-duplicate-embedding", _pq("dup-embedding"),
         "column 'embedding' appears 2 times; column names must be unique",
         "{d}/files-dup-embedding.parquet"),
    Case("files-parquet-duplicate-id-column", _pq("dup-id-column"),
         "column 'id' appears 2 times; column names must be unique",
         "{d}/files-dup-id-column.parquet"),
    Case("files-parquet-corrupt-page", _pq("corrupt-page"),
         "corrupt Parquet file (Couldn't deserialize thrift", "{d}/files-corrupt-page.parquet"),
    Case("files-parquet-truncated", _pq("truncated"),
         "not a readable Parquet file (Parquet magic bytes not found in footer",
         "{d}/files-truncated.parquet"),
    Case("files-parquet-empty", _pq("empty"),
         "not a readable Parquet file (Parquet file size is 0 bytes)",
         "{d}/files-empty.parquet"),
    Case("files-parquet-null-embedding", _pq("null-embedding"), "row 5 has a null embedding",
         "{d}/files-null-embedding.parquet"),
    Case("files-parquet-null-value", _pq("null-value"),
         "row 7 has a null value in its embedding", "{d}/files-null-value.parquet"),
    # --- internal formats are not inputs
    Case("files-parts-json-as-features", ("--features", "{d}/files-parts/nodes.parts.json"),
         "is an internal ltc-ray format (feature parts a run writes for itself), not an input",
         "{d}/files-parts/nodes.parts.json"),
]
# fmt: on


def _npy_bytes(header: str, version: int = 1, payload: bytes = b"") -> bytes:
    """A .npy file with a hand-written header (padded as numpy pads it) and ``payload``."""
    text = header.encode("latin1")
    prefix = 10 if version == 1 else 12
    text += b" " * (63 - (prefix + len(text)) % 64) + b"\n"
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(text)) + text + payload


def _header(shape: str, descr: str = "'<f4'") -> str:
    return f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}"


def _knn_member(path: Path, data: bytes) -> None:
    """An npz whose ``data.npy`` member is ``data`` as stored (any bytes, even a bad header)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("data.npy", data)


def _corrupt(path: Path, offset: int, nbytes: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + nbytes] = b"\xff" * nbytes
    path.write_bytes(bytes(raw))


def _knn_files(d: Path) -> None:
    good = np.zeros((N, 2, K))
    np.savez(d / "files-knn-int.npz", data=good.astype(np.int64))
    np.savez(d / "files-knn-f2.npz", data=good.astype(np.float16))
    np.savez(d / "files-knn-big-endian.npz", data=good.astype(">f8"))
    np.savez(d / "files-knn-2d.npz", data=np.zeros((N, 2 * K)))
    np.savez(d / "files-knn-three-planes.npz", data=np.zeros((N, 3, K)))
    np.savez(d / "files-knn-fortran.npz", data=np.asfortranarray(good))
    np.savez(d / "files-knn-no-data.npz", knns=good)
    (d / "files-knn-not-zip.npz").write_text("a kNN, honestly\n")
    (d / "files-knn-dir.npz").mkdir()
    _knn_member(d / "files-knn-negative.npz", _npy_bytes(_header(f"(-{N}, 2, {K})", "'<f8'")))
    _knn_member(d / "files-knn-not-dict.npz", _npy_bytes("['descr', '<f8']"))
    big = _header(f"({N}, 2, {K})", "'<f8'")[:-1] + "'pad': '" + "x" * 19950 + "'}"
    _knn_member(d / "files-knn-oversized.npz", _npy_bytes(big, version=2))
    deflate = d / "files-knn-deflate.npz"
    np.savez_compressed(deflate, data=good)
    _corrupt(deflate, _member_data_offset(deflate), 16)
    member = d / "files-knn-member.npz"
    np.savez(member, data=good)
    _corrupt(member, 0, 4)  # the member's local header; the central directory still lists it


def _member_data_offset(path: Path) -> int:
    """Where ``data.npy``'s (compressed) bytes start inside a zip."""
    header = zipfile.ZipFile(path).getinfo("data.npy").header_offset
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[header + 26 : header + 30])
    return header + 30 + name_len + extra_len


def _npy_files(d: Path) -> None:
    rows = np.zeros((N, D), np.float32).tobytes()
    headers = {
        "negative-rows": _header(f"(-{N}, {D})"),
        "negative-dim": _header(f"({N}, -{D})"),
        "zero-dim": _header(f"({N}, 0)"),
        "absurd": _header(f"({10**18}, {D})"),
        "lies": _header(f"(1000000000, {D})"),
        "shape-int": _header("7"),
        "not-dict": "['descr', '<f4']",
        "syntax": _header(f"({N}, {D})")[:-2],  # the closing brace is missing
        "descr": _header(f"({N}, {D})", "'zz9'"),
    }
    for name, header in headers.items():
        (d / f"files-npy-{name}.npy").write_bytes(_npy_bytes(header, payload=rows))
    big = _header(f"({N}, {D})")[:-1] + "'pad': '" + "x" * 20000 + "'}"
    (d / "files-npy-oversized.npy").write_bytes(_npy_bytes(big, version=2, payload=rows))
    (d / "files-npy-huge-length.npy").write_bytes(
        b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**32 - 1) + b"{" * 64 + rows
    )
    (d / "files-npy-version.npy").write_bytes(
        b"\x93NUMPY\x09\x00" + _npy_bytes(_header(f"({N}, {D})"))[8:] + rows
    )
    x = np.random.default_rng(13).standard_normal((N, D)).astype(np.float32)
    np.save(d / "files-npy-fortran.npy", np.asfortranarray(x))
    np.save(d / "files-npy-complex.npy", x.astype(np.complex64))
    np.save(d / "files-npy-structured.npy", np.zeros((N, D), dtype=[("a", "<f4")]))
    np.save(d / "files-npy-big-endian.npy", x.astype(">f4"))


def _parquet_files(d: Path) -> None:
    x = np.random.default_rng(17).standard_normal((N, D)).astype(np.float32)
    emb = pa.array(list(x), type=pa.list_(pa.float32()))
    ids = pa.array(np.arange(N, dtype=np.int64))
    pq.write_table(pa.Table.from_arrays([emb, ids, emb], names=["embedding", "id", "embedding"]),
                   d / "files-dup-embedding.parquet")
    pq.write_table(pa.Table.from_arrays([emb, ids, ids], names=["embedding", "id", "id"]),
                   d / "files-dup-id-column.parquet")
    good = d / "files-good.parquet"  # (not a case: the source of the broken ones below)
    pq.write_table(pa.table({"embedding": emb}), good, row_group_size=50)
    page = d / "files-corrupt-page.parquet"
    page.write_bytes(good.read_bytes())
    # a later row group's page header: the footer and row 0 read fine, the scan does not
    _corrupt(page, pq.ParquetFile(good).metadata.row_group(2).column(0).data_page_offset, 32)
    raw = good.read_bytes()
    (d / "files-truncated.parquet").write_bytes(raw[: len(raw) // 2])
    (d / "files-empty.parquet").write_bytes(b"")
    rows = [list(r) for r in x]
    rows[5] = None
    pq.write_table(pa.table({"embedding": pa.array(rows, pa.list_(pa.float32()))}),
                   d / "files-null-embedding.parquet")
    rows = [list(r) for r in x]
    rows[7][3] = None
    pq.write_table(pa.table({"embedding": pa.array(rows, pa.list_(pa.float32()))}),
                   d / "files-null-value.parquet")


def _parts_files(d: Path) -> None:
    """A genuine feature-parts manifest, as a GCN-V run writes it, offered as --features."""
    from ltc_ray.io.features import write_feature_part, write_parts_manifest

    x = np.random.default_rng(19).standard_normal((N, D)).astype(np.float32)
    part = write_feature_part(str(d / "files-parts"), 0, 0, x)
    write_parts_manifest(str(d / "files-parts" / "nodes.parts.json"), D, [part])


def make_data(d: Path) -> None:
    """The files these cases need, written into the shared data directory ``d``."""
    _knn_files(d)
    _npy_files(d)
    _parquet_files(d)
    _parts_files(d)
