"""Data layer: real files on local disk and on fsspec's in-memory filesystem."""

from __future__ import annotations

import io
import logging
import os
import pickle
import uuid
import zipfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import require

from ltc_ray.errors import InputError, WorkFileError
from ltc_ray.io import (
    BENCHMARK_PARTS,
    FeatureInfo,
    check_unique_ids,
    file_size,
    inspect_features,
    inspect_ltc_knn,
    iter_ltc_knn,
    join_uri,
    knn_path,
    load_knn_block,
    open_uri,
    part_name,
    part_paths,
    read_bytes_range,
    read_features,
    read_ids,
    read_labels,
    require_file,
    save_knn_block,
    scan_features,
    uri_exists,
    validate_knn,
    validate_rows,
    write_bytes_atomic,
    write_labels,
    write_ltc_knn,
)

RNG_SEED = 1234


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path) -> str:
    """A fresh directory URI, on disk or in fsspec's memory filesystem."""
    if request.param == "local":
        yield str(tmp_path)
        return
    prefix = f"memory://test-io-{uuid.uuid4().hex}"
    yield prefix
    fs = fsspec.filesystem("memory")
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)


def put(uri: str, data: bytes) -> str:
    with open_uri(uri, "wb") as f:
        f.write(data)
    return uri


def feats(rng: np.random.Generator, n: int, d: int, dtype=np.float32) -> np.ndarray:
    return (rng.standard_normal((n, d)) * 3.0).astype(dtype)


def write_npy(uri: str, arr: np.ndarray, **kwargs) -> str:
    with open_uri(uri, "wb") as f:
        np.save(f, arr, **kwargs)
    return uri


def write_parquet(uri: str, table: pa.Table, row_group_size: int) -> str:
    with open_uri(uri, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size)
    return uri


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------- fs helpers


def test_join_uri_handles_remote_and_local_without_double_slashes():
    assert join_uri("s3://bucket/data/", "features", "/a.bin") == "s3://bucket/data/features/a.bin"
    assert join_uri("s3://bucket", "knns", "p1") == "s3://bucket/knns/p1"
    assert join_uri("/data/", "labels/", "x.meta") == "/data/labels/x.meta"
    assert join_uri("/", "x") == "/x"
    assert join_uri("memory://", "a", "b") == "memory://a/b"


def test_byte_range_exists_size_and_atomic_write(root):
    uri = join_uri(root, "sub", "blob.bin")
    assert not uri_exists(uri)
    write_bytes_atomic(uri, bytes(range(200)))
    assert uri_exists(uri)
    assert file_size(uri) == 200
    assert read_bytes_range(uri, 10, 15) == bytes(range(10, 15))
    write_bytes_atomic(uri, b"new")
    assert read_bytes_range(uri, 0, 3) == b"new"
    if not root.startswith("memory://"):
        assert os.listdir(os.path.dirname(uri)) == ["blob.bin"]  # no temp files left


def test_require_file_reports_missing_and_directory(root):
    missing = join_uri(root, "nope.bin")
    with pytest.raises(InputError, match="feature file not found") as err:
        require_file(missing, "feature file")
    assert missing in str(err.value)
    put(join_uri(root, "dir", "inner.txt"), b"x")
    with pytest.raises(InputError, match="is a directory"):
        require_file(join_uri(root, "dir"), "feature file")


# ---------------------------------------------------------------- .bin


def test_bin_round_trip_slices_and_normalises(root, rng):
    x = feats(rng, 23, 16)
    uri = put(join_uri(root, "features", "part1_test.bin"), x.tobytes())
    info = inspect_features(uri, dim=16)
    assert (info.format, info.n_rows, info.dim, info.dtype, info.header_bytes) == (
        "bin",
        23,
        16,
        "float32",
        0,
    )
    raw = read_features(info, 0, 23, normalize=False)
    np.testing.assert_array_equal(raw, x)
    full = read_features(info, 0, 23)
    assert full.dtype == np.float32 and full.flags.c_contiguous and full.shape == (23, 16)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(full, unit_rows(x), atol=1e-6)
    part = read_features(info, 5, 7)
    np.testing.assert_array_equal(part, full[5:7])
    assert read_features(info, 9, 9).shape == (0, 16)
    raw_part = read_features(info, 5, 7, normalize=False)
    assert raw_part.flags.writeable
    np.testing.assert_array_equal(raw_part, x[5:7])


def test_bin_slice_read_ignores_bad_rows_elsewhere(tmp_path, rng):
    """A range read touches only its own bytes: bad rows outside it do not matter."""
    x = feats(rng, 10, 8)
    x[0] = np.nan
    x[9] = 0.0
    uri = put(str(tmp_path / "f.bin"), x.tobytes())
    info = inspect_features(uri, dim=8)
    np.testing.assert_allclose(read_features(info, 3, 6), unit_rows(x[3:6]), atol=1e-6)
    with pytest.raises(InputError, match="row 0 contains NaN or Inf"):
        read_features(info, 0, 6)


def test_bin_default_dim_is_256(tmp_path, rng):
    uri = put(str(tmp_path / "f.bin"), feats(rng, 3, 256).tobytes())
    info = inspect_features(uri)
    assert (info.n_rows, info.dim) == (3, 256)


def test_bin_errors(tmp_path, rng):
    x = feats(rng, 10, 8)
    truncated = put(str(tmp_path / "trunc.bin"), x.tobytes()[:-4])
    with pytest.raises(InputError) as err:
        inspect_features(truncated, dim=8)
    msg = str(err.value)
    assert truncated in msg and str(10 * 8 * 4 - 4) in msg and "D = 8" in msg and "--dim" in msg

    good = put(str(tmp_path / "good.bin"), x.tobytes())
    with pytest.raises(InputError, match="--dim may be wrong"):
        inspect_features(good, dim=12)
    with pytest.raises(InputError, match="positive"):
        inspect_features(good, dim=0)
    empty = put(str(tmp_path / "empty.bin"), b"")
    with pytest.raises(InputError, match="empty"):
        inspect_features(empty, dim=8)
    with pytest.raises(InputError, match="not found"):
        inspect_features(str(tmp_path / "missing.bin"), dim=8)
    one = put(str(tmp_path / "one.bin"), x[:1].tobytes())
    with pytest.raises(InputError, match="need at least 2 samples, found 1"):
        inspect_features(one, dim=8)
    with pytest.raises(InputError, match="supported: .bin") as err:
        inspect_features(str(tmp_path / "feats.csv"))
    assert "feats.csv" in str(err.value)


@pytest.mark.parametrize(
    ("bad_value", "message"),
    [
        (np.nan, "row 6 contains NaN or Inf"),
        (np.inf, "row 6 contains NaN or Inf"),
        (0.0, "row 6 has zero norm"),
    ],
)
def test_bad_rows_are_named(tmp_path, rng, bad_value, message):
    x = feats(rng, 9, 4)
    if bad_value == 0.0:
        x[6] = 0.0
    else:
        x[6, 2] = bad_value
    uri = put(str(tmp_path / "f.bin"), x.tobytes())
    info = inspect_features(uri, dim=4)
    with pytest.raises(InputError, match=message) as err:
        read_features(info, 0, 9)
    assert uri in str(err.value)
    with pytest.raises(InputError, match=message):  # global row index from a later chunk
        scan_features(info, 0, 9, chunk_rows=4)
    scan_features(info, 0, 6, chunk_rows=4)  # rows before the bad one are fine
    with pytest.raises(InputError, match=message):
        validate_rows(x[4:], info, start=4)


def test_extreme_but_finite_rows_normalise(tmp_path):
    """Float64 accumulation: tiny and huge rows are neither zero-norm nor overflow."""
    x = np.array([[1e-30, 0, 2e-30, 0], [3e37, -3e38, 1e38, 3e38], [1, 2, 3, 4]], np.float32)
    uri = put(str(tmp_path / "f.bin"), x.tobytes())
    out = read_features(inspect_features(uri, dim=4), 0, 3)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out, unit_rows(x), atol=1e-6)


# ---------------------------------------------------------------- .npy


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_npy_round_trip(root, rng, dtype):
    x = feats(rng, 17, 6, dtype)
    uri = write_npy(join_uri(root, "f.npy"), x)
    info = inspect_features(uri)
    assert (info.format, info.n_rows, info.dim, info.dtype) == ("npy", 17, 6, np.dtype(dtype).name)
    assert info.header_bytes > 0 and info.header_bytes % 16 == 0
    full = read_features(info, 0, 17)
    assert full.dtype == np.float32
    np.testing.assert_allclose(full, unit_rows(x.astype(np.float32)), atol=1e-6)
    np.testing.assert_array_equal(read_features(info, 11, 14), full[11:14])
    np.testing.assert_array_equal(
        read_features(info, 2, 5, normalize=False), x[2:5].astype(np.float32)
    )


def test_npy_version_2_header(tmp_path, rng):
    x = feats(rng, 5, 3)
    uri = str(tmp_path / "v2.npy")
    with open(uri, "wb") as f:
        np.lib.format.write_array(f, x, version=(2, 0))
    info = inspect_features(uri)
    np.testing.assert_array_equal(read_features(info, 1, 4, normalize=False), x[1:4])


def test_npy_errors(tmp_path, rng):
    obj = np.empty((3, 2), dtype=object)
    obj[:] = 1.0
    pickled = write_npy(str(tmp_path / "obj.npy"), obj, allow_pickle=True)
    with pytest.raises(InputError, match="pickled arrays are refused"):
        inspect_features(pickled)
    with pytest.raises(InputError, match="2-D"):
        inspect_features(write_npy(str(tmp_path / "3d.npy"), feats(rng, 4, 6).reshape(4, 2, 3)))
    with pytest.raises(InputError, match="Fortran"):
        inspect_features(write_npy(str(tmp_path / "f.npy"), np.asfortranarray(feats(rng, 4, 6))))
    with pytest.raises(InputError, match="dtype int64 not supported"):
        inspect_features(write_npy(str(tmp_path / "int.npy"), np.ones((4, 3), np.int64)))
    good = write_npy(str(tmp_path / "good.npy"), feats(rng, 4, 6))
    with pytest.raises(InputError, match="D = 6 but dim 8"):
        inspect_features(good, dim=8)
    with pytest.raises(InputError, match="at least 2 samples, found 1"):
        inspect_features(write_npy(str(tmp_path / "one.npy"), feats(rng, 1, 6)))
    data = open(good, "rb").read()
    with pytest.raises(InputError, match="truncated"):
        inspect_features(put(str(tmp_path / "cut.npy"), data[:-5]))
    with pytest.raises(InputError, match="magic"):
        inspect_features(put(str(tmp_path / "junk.npy"), b"not an npy file at all"))


# ---------------------------------------------------------------- Parquet


def embedding_table(x: np.ndarray, fixed: bool, ids: np.ndarray | None = None) -> pa.Table:
    n, d = x.shape
    flat = pa.array(x.reshape(-1))
    if fixed:
        col = pa.FixedSizeListArray.from_arrays(flat, d)
    else:
        col = pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)), flat)
    cols = {"embedding": col}
    if ids is not None:
        cols["id"] = pa.array(ids)
    return pa.table(cols)


@pytest.mark.parametrize("fixed", [False, True], ids=["list", "fixed_size_list"])
def test_parquet_round_trip_across_row_groups(root, rng, fixed):
    x = feats(rng, 50, 5)
    ids = rng.permutation(1000)[:50].astype(np.int64) + 10**12
    uri = write_parquet(join_uri(root, "f.parquet"), embedding_table(x, fixed, ids), 7)
    assert pq.ParquetFile(fsspec.open(uri).open()).metadata.num_row_groups == 8
    info = inspect_features(uri)
    assert (info.format, info.n_rows, info.dim, info.dtype, info.has_ids) == (
        "parquet",
        50,
        5,
        "float32",
        True,
    )
    full = read_features(info, 0, 50)
    np.testing.assert_allclose(full, unit_rows(x), atol=1e-6)
    for start, stop in [(0, 7), (5, 9), (6, 22), (13, 14), (48, 50), (20, 20)]:
        np.testing.assert_array_equal(read_features(info, start, stop), full[start:stop])
        got_ids = read_ids(info, start, stop)
        assert got_ids.dtype == np.int64
        np.testing.assert_array_equal(got_ids, ids[start:stop])
    np.testing.assert_array_equal(read_features(info, 6, 22, normalize=False), x[6:22])
    check_unique_ids(read_ids(info, 0, 50), uri)


def test_parquet_float64_without_ids(tmp_path, rng):
    x = feats(rng, 9, 4, np.float64)
    uri = write_parquet(str(tmp_path / "f.pq"), embedding_table(x, fixed=False), 4)
    info = inspect_features(uri, dim=4)
    assert info.dtype == "float64" and not info.has_ids
    assert read_ids(info, 0, 9) is None
    np.testing.assert_allclose(read_features(info, 3, 9), unit_rows(x[3:9]), atol=1e-6)


def test_parquet_errors(tmp_path, rng):
    x = feats(rng, 6, 3)
    dup_ids = np.array([4, 8, 15, 16, 8, 42])
    uri = write_parquet(str(tmp_path / "dup.parquet"), embedding_table(x, True, dup_ids), 4)
    info = inspect_features(uri)
    with pytest.raises(InputError, match="id 8 appears more than once") as err:
        check_unique_ids(read_ids(info, 0, 6), uri)
    assert uri in str(err.value)

    ints = pa.table({"embedding": pa.array([[1, 2], [3, 4]], type=pa.list_(pa.int32()))})
    bad_type = write_parquet(str(tmp_path / "ints.parquet"), ints, 10)
    with pytest.raises(InputError, match=r"column 'embedding' has type list<\w+: int32>"):
        inspect_features(bad_type)
    strings = pa.table({"embedding": ["a", "b"]})
    with pytest.raises(InputError, match="expected list<float32> or fixed_size_list<float32>"):
        inspect_features(write_parquet(str(tmp_path / "str.parquet"), strings, 10))
    no_col = pa.table({"vec": pa.array([[1.0], [2.0]])})
    with pytest.raises(InputError, match="no column 'embedding'.*vec"):
        inspect_features(write_parquet(str(tmp_path / "nocol.parquet"), no_col, 10))
    str_ids = embedding_table(x, True).append_column("id", pa.array(list("abcdef")))
    with pytest.raises(InputError, match="column 'id' has type string"):
        inspect_features(write_parquet(str(tmp_path / "strid.parquet"), str_ids, 10))
    ragged = pa.table(
        {"embedding": pa.array([[1.0, 2.0], [1.0, 0.5], [3.0]], pa.list_(pa.float32()))}
    )
    ragged_info = inspect_features(write_parquet(str(tmp_path / "ragged.parquet"), ragged, 2))
    with pytest.raises(InputError, match="row 2 has 1 values, expected D = 2"):
        read_features(ragged_info, 0, 3)
    np.testing.assert_allclose(
        read_features(ragged_info, 0, 2, normalize=False), [[1, 2], [1, 0.5]]
    )
    with pytest.raises(InputError, match="at least 2 samples, found 1"):
        inspect_features(
            write_parquet(str(tmp_path / "one.parquet"), embedding_table(x[:1], True), 4)
        )
    with pytest.raises(InputError, match="D = 3 but dim 5"):
        inspect_features(uri, dim=5)


def test_check_unique_ids_accepts_unique_and_names_a_duplicate(rng):
    ids = rng.permutation(10_000)
    check_unique_ids(ids, "x")
    ids[7000] = ids[3]
    with pytest.raises(InputError, match=f"x: id {ids[3]} appears more than once"):
        check_unique_ids(ids, "x")


# ---------------------------------------------------------------- FeatureInfo


def test_feature_info_hides_storage_options_and_pickles(tmp_path, rng):
    uri = put(str(tmp_path / "f.bin"), feats(rng, 4, 2).tobytes())
    secret = {"key": "AKIA-SECRET", "secret": "hunter2"}
    info = inspect_features(uri, dim=2, storage_options=secret)
    assert "hunter2" not in repr(info) and "hunter2" not in str(info)
    back = pickle.loads(pickle.dumps(info))
    assert back == info and back.storage_options == secret
    assert isinstance(hash(info), int)
    assert isinstance(back, FeatureInfo)


# ---------------------------------------------------------------- labels


def test_labels_round_trip(root, rng):
    labels = rng.integers(-1, 50, size=300)
    uri = join_uri(root, "labels", "part1_test.meta")
    write_labels(uri, labels)
    got = read_labels(uri, expected_rows=300)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, labels)


def test_labels_tolerate_trailing_blank_lines_and_crlf(tmp_path):
    uri = put(str(tmp_path / "l.meta"), b"3\r\n-1\r\n7\r\n\r\n")
    np.testing.assert_array_equal(read_labels(uri), [3, -1, 7])
    uri = put(str(tmp_path / "l2.meta"), b"3\n4")
    np.testing.assert_array_equal(read_labels(uri, expected_rows=2), [3, 4])


def test_label_errors(tmp_path):
    uri = put(str(tmp_path / "l.meta"), b"1\n2\n3\n")
    with pytest.raises(InputError, match="has 3 labels but the features have 4 rows") as err:
        read_labels(uri, expected_rows=4)
    assert uri in str(err.value)
    with pytest.raises(InputError, match="has 3 labels but the features have 2 rows"):
        read_labels(uri, expected_rows=2)
    bad = put(str(tmp_path / "bad.meta"), b"\n".join([b"1"] * 16 + [b"abc", b"2"]) + b"\n")
    with pytest.raises(InputError, match="line 17 is not an integer: 'abc'"):
        read_labels(bad)
    with pytest.raises(InputError, match="line 2 is not an integer: '1.5'"):
        read_labels(put(str(tmp_path / "f.meta"), b"1\n1.5\n"))
    with pytest.raises(InputError, match="line 2 is not an integer: '4 5'"):
        read_labels(put(str(tmp_path / "two.meta"), b"1\n4 5\n6\n"))
    with pytest.raises(InputError, match="line 2 is empty"):
        read_labels(put(str(tmp_path / "gap.meta"), b"1\n\n6\n"))
    with pytest.raises(InputError, match="int64 range"):
        read_labels(put(str(tmp_path / "big.meta"), b"1\n99999999999999999999\n"))
    with pytest.raises(InputError, match="empty"):
        read_labels(put(str(tmp_path / "empty.meta"), b"\n\n"))
    with pytest.raises(InputError, match="labels file not found"):
        read_labels(str(tmp_path / "missing.meta"))


# ---------------------------------------------------------------- learn-to-cluster kNN npz


def ltc_knn_array(rng, n: int, k: int, dtype=np.float64) -> np.ndarray:
    """(n, 2, k) like learn-to-cluster: self first, then neighbours by ascending dist."""
    ids = np.stack([rng.permutation(n)[:k] for _ in range(n)])
    ids[:, 0] = np.arange(n)
    dist = np.sort(rng.uniform(0.0, 1.5, size=(n, k)), axis=1)
    dist[:, 0] = 0.0
    return np.stack([ids.astype(np.float64), dist], axis=1).astype(dtype)


def collect(blocks) -> tuple[list[int], np.ndarray, np.ndarray]:
    starts, ids, sims = [], [], []
    for start, block_ids, block_sims in blocks:
        starts.append(start)
        ids.append(block_ids)
        sims.append(block_sims)
    return starts, np.concatenate(ids), np.concatenate(sims)


@pytest.mark.parametrize(
    ("saver", "dtype"), [(np.savez_compressed, np.float64), (np.savez, np.float32)]
)
def test_ltc_knn_streaming_reader_matches_np_load(root, rng, saver, dtype):
    arr = ltc_knn_array(rng, 103, 9, dtype)
    uri = join_uri(root, "knns", "part1_test", "faiss_k_9.npz")
    with open_uri(uri, "wb") as f:
        saver(f, data=arr)
    assert inspect_ltc_knn(uri) == (103, 9)
    with open_uri(uri, "rb") as f:
        ref = np.load(f, allow_pickle=False)["data"]
    starts, ids, sims = collect(iter_ltc_knn(uri, block_rows=25))
    assert starts == [0, 25, 50, 75, 100]
    assert ids.dtype == np.int32 and sims.dtype == np.float32
    np.testing.assert_array_equal(ids, ref[:, 0, :].astype(np.int64))
    np.testing.assert_allclose(sims, 1.0 - ref[:, 1, :].astype(np.float64), atol=1e-6)
    assert (ids[:, 0] == np.arange(103)).all()


def test_ltc_knn_writer_round_trip(root, rng):
    n, k = 61, 7
    arr = ltc_knn_array(rng, n, k)
    knn_ids = arr[:, 0, :].astype(np.int32)
    knn_sims = (1.0 - arr[:, 1, :]).astype(np.float32)
    uri = join_uri(root, "out", "faiss_k_7.npz")
    blocks = ((knn_ids[i : i + 20], knn_sims[i : i + 20]) for i in range(0, n, 20))
    write_ltc_knn(uri, n, k, blocks)
    with open_uri(uri, "rb") as f:
        zf = zipfile.ZipFile(f)
        assert zf.getinfo("data.npy").compress_type == zipfile.ZIP_DEFLATED
        data = np.load(f, allow_pickle=False)["data"]
    assert data.shape == (n, 2, k) and data.dtype == np.float64
    np.testing.assert_array_equal(data[:, 0, :], knn_ids)
    np.testing.assert_allclose(data[:, 1, :], 1.0 - knn_sims.astype(np.float64), atol=1e-7)
    _, ids, sims = collect(iter_ltc_knn(uri, block_rows=16))
    np.testing.assert_array_equal(ids, knn_ids)
    np.testing.assert_allclose(sims, knn_sims, atol=1e-6)


def test_ltc_knn_writer_refuses_wrong_row_count_and_leaves_nothing(tmp_path, rng):
    ids = np.zeros((5, 3), np.int32)
    sims = np.ones((5, 3), np.float32)
    uri = str(tmp_path / "faiss_k_3.npz")
    with pytest.raises(ValueError, match="expected n_rows = 6"):
        write_ltc_knn(uri, 6, 3, [(ids, sims)])
    with pytest.raises(ValueError, match="more than n_rows"):
        write_ltc_knn(uri, 4, 3, [(ids, sims)])
    assert os.listdir(tmp_path) == []


def test_ltc_knn_errors(tmp_path, rng):
    ragged = np.empty((4, 2), dtype=object)  # what hnsw produces when rows differ in length
    for i in range(4):
        ragged[i, 0] = np.arange(i + 1)
        ragged[i, 1] = np.zeros(i + 1)
    uri = str(tmp_path / "hnsw_k_80.npz")
    np.savez_compressed(uri, data=ragged)
    with pytest.raises(InputError, match="pickled arrays are refused"):
        inspect_ltc_knn(uri)
    with pytest.raises(InputError, match="pickled arrays are refused"):
        next(iter_ltc_knn(uri))

    np.savez(str(tmp_path / "shape.npz"), data=np.zeros((4, 3, 2)))
    with pytest.raises(InputError, match=r"shape \(4, 3, 2\), expected \(N, 2, k\)"):
        inspect_ltc_knn(str(tmp_path / "shape.npz"))
    np.savez(str(tmp_path / "key.npz"), knns=np.zeros((4, 2, 2)))
    with pytest.raises(InputError, match="no array 'data'.*knns"):
        inspect_ltc_knn(str(tmp_path / "key.npz"))
    put(str(tmp_path / "junk.npz"), b"definitely not a zip file")
    with pytest.raises(InputError, match="not a valid .npz"):
        inspect_ltc_knn(str(tmp_path / "junk.npz"))
    with pytest.raises(InputError, match="kNN file not found"):
        inspect_ltc_knn(str(tmp_path / "missing.npz"))

    arr = ltc_knn_array(rng, 30, 4)
    arr[17, 0, 2] = 30.0  # == N: out of range
    np.savez_compressed(str(tmp_path / "range.npz"), data=arr)
    with pytest.raises(
        InputError, match=r"row 17: neighbour id 30.0 is not an integer in \[0, 30\)"
    ):
        collect(iter_ltc_knn(str(tmp_path / "range.npz"), block_rows=8))
    arr = ltc_knn_array(rng, 30, 4)
    arr[3, 0, 1] = 2.5
    np.savez_compressed(str(tmp_path / "frac.npz"), data=arr)
    with pytest.raises(InputError, match="row 3: neighbour id 2.5"):
        collect(iter_ltc_knn(str(tmp_path / "frac.npz")))


# ---------------------------------------------------------------- block files and validation


def test_knn_block_round_trip(root, rng):
    knn_ids = rng.integers(0, 1000, size=(12, 5)).astype(np.int32)
    knn_sims = rng.uniform(-1, 1, size=(12, 5)).astype(np.float32)
    uri = join_uri(root, "knn", "block-00003.npz")
    save_knn_block(uri, knn_ids, knn_sims, start_row=36)
    ids, sims, start = load_knn_block(uri)
    assert start == 36 and ids.dtype == np.int32 and sims.dtype == np.float32
    np.testing.assert_array_equal(ids, knn_ids)
    np.testing.assert_array_equal(sims, knn_sims)
    if not root.startswith("memory://"):
        assert os.listdir(os.path.dirname(uri)) == ["block-00003.npz"]


def test_knn_block_errors(tmp_path):
    obj = np.empty(2, dtype=object)
    uri = str(tmp_path / "pickled.npz")
    np.savez(uri, ids=obj, sims=np.zeros((2, 1), np.float32), start=np.int64(0))
    # a block is the run's own work file: damage is never blamed on the user's input
    with pytest.raises(WorkFileError, match="pickled arrays are refused"):
        load_knn_block(uri)
    np.savez(str(tmp_path / "partial.npz"), ids=np.zeros((2, 1), np.int32))
    with pytest.raises(WorkFileError, match=r"lacks arrays \['sims', 'start'\]"):
        load_knn_block(str(tmp_path / "partial.npz"))


def test_validate_knn():
    ids = np.array([[0, 1], [1, 0], [2, 1]], np.int32)
    sims = np.array([[1.0, 0.5], [1.0, 0.5], [1.0, 0.2]], np.float32)
    validate_knn(ids, sims, 3, "blk")
    with pytest.raises(InputError, match=r"blk: neighbour id 3 outside \[0, 3\)"):
        validate_knn(ids + 1, sims, 3, "blk")
    with pytest.raises(InputError, match="neighbour id -1"):
        validate_knn(ids - 1, sims, 3, "blk")
    with pytest.raises(InputError, match="must both be"):
        validate_knn(ids, sims[:2], 3, "blk")
    bad = sims.copy()
    bad[2, 1] = np.nan
    with pytest.raises(InputError, match="row 2 has a NaN or Inf similarity"):
        validate_knn(ids, bad, 3, "blk")
    with pytest.raises(InputError, match="expected integers"):
        validate_knn(ids.astype(np.float32), sims, 3, "blk")


# ---------------------------------------------------------------- layout


def test_part_paths_follow_learn_to_cluster_layout():
    assert [part_name(p) for p in BENCHMARK_PARTS] == [
        "part0_train",
        "part1_test",
        "part3_test",
        "part5_test",
        "part7_test",
        "part9_test",
    ]
    paths = part_paths("s3://bucket/ms1m/", 9)
    assert paths.features == "s3://bucket/ms1m/features/part9_test.bin"
    assert paths.labels == "s3://bucket/ms1m/labels/part9_test.meta"
    assert paths.knn == "s3://bucket/ms1m/knns/part9_test/faiss_k_80.npz"
    assert part_paths("/data", 0).features == "/data/features/part0_train.bin"
    assert knn_path("/data", "part1_test", k=160, method="hnsw") == (
        "/data/knns/part1_test/hnsw_k_160.npz"
    )


def test_unknown_part_is_an_input_error():
    with pytest.raises(InputError) as err:
        part_paths("/data", 4)
    assert str(err.value) == "--part: no such benchmark part 4; choose one of 0, 1, 3, 5, 7, 9"
    assert err.value.where == "--part"


# ---------------------------------------------------------------- object storage (moto S3 server)


@pytest.fixture(scope="module")
def s3_options():
    """storage_options for a local moto S3 server with one bucket, ``ltc``."""
    server_mod = require("moto.server")
    s3fs = require("s3fs")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
    }
    s3fs.S3FileSystem(**options).call_s3("create_bucket", Bucket="ltc")
    yield options
    server.stop()


def test_s3_features_labels_and_knn_with_storage_options(s3_options, rng):
    root = "s3://ltc/ms1m"
    paths = part_paths(root, 1)
    x = feats(rng, 40, 8)
    write_bytes_atomic(paths.features, x.tobytes(), s3_options)
    info = inspect_features(paths.features, dim=8, storage_options=s3_options)
    assert info.n_rows == 40 and "testing" not in repr(info)
    back = pickle.loads(pickle.dumps(info))  # what a Ray worker receives
    np.testing.assert_array_equal(read_features(back, 5, 7, normalize=False), x[5:7])
    scan_features(back, 0, 40, chunk_rows=16)

    labels = rng.integers(0, 5, size=40)
    write_labels(paths.labels, labels, s3_options)
    np.testing.assert_array_equal(read_labels(paths.labels, 40, s3_options), labels)

    arr = ltc_knn_array(rng, 40, 6)
    knn_ids, knn_sims = arr[:, 0, :].astype(np.int32), (1 - arr[:, 1, :]).astype(np.float32)
    write_ltc_knn(
        paths.knn, 40, 6, [(knn_ids[:25], knn_sims[:25]), (knn_ids[25:], knn_sims[25:])], s3_options
    )
    assert inspect_ltc_knn(paths.knn, s3_options) == (40, 6)
    _, ids, sims = collect(iter_ltc_knn(paths.knn, 16, s3_options))
    np.testing.assert_array_equal(ids, knn_ids)
    np.testing.assert_allclose(sims, knn_sims, atol=1e-6)

    pq_uri = join_uri(root, "emb.parquet")
    write_parquet_remote = embedding_table(x, fixed=True, ids=np.arange(40) + 7)
    with open_uri(pq_uri, "wb", s3_options) as f:
        pq.write_table(write_parquet_remote, f, row_group_size=9)
    pinfo = inspect_features(pq_uri, storage_options=s3_options)
    np.testing.assert_array_equal(read_features(pinfo, 8, 19, normalize=False), x[8:19])
    np.testing.assert_array_equal(read_ids(pinfo, 8, 19), np.arange(8, 19) + 7)

    with pytest.raises(InputError, match="not found"):
        inspect_features(join_uri(root, "missing.bin"), storage_options=s3_options)


# ---------------------------------------------------------------- input file contents (issue 13)


def _write_ltc(path, arr: np.ndarray, saver=np.savez) -> str:
    saver(str(path), data=arr)
    return str(path)


def test_ltc_knn_similarities_outside_unit_range_or_not_finite_name_the_first_bad_row(
    tmp_path, rng
):
    """1 - distance must be a cosine similarity: a file with similarities above 1 (or
    distances NaN/Inf) is refused, naming the file and the first bad row in any block."""
    cases = [
        (-0.5, r"row 23: distance -0.5 gives similarity 1.5, outside \[-1, 1\]"),
        (2.25, r"row 23: distance 2.25 gives similarity -1.25, outside \[-1, 1\]"),
        (np.nan, "row 23: distance nan is not finite"),
        (np.inf, "row 23: distance inf is not finite"),
        (-np.inf, "row 23: distance -inf is not finite"),
    ]
    for value, message in cases:
        arr = ltc_knn_array(rng, 40, 5)
        arr[23, 1, 3] = value
        arr[31, 1, 1] = -3.0  # a later bad row: the first one is named
        uri = _write_ltc(tmp_path / "bad.npz", arr)
        with pytest.raises(InputError, match=message) as err:
            collect(iter_ltc_knn(uri, block_rows=8))
        assert err.value.where == uri and "\n" not in str(err.value)
    arr = ltc_knn_array(rng, 40, 5)
    arr[6, 0, 2] = -2.0  # only -1 marks an empty slot
    with pytest.raises(InputError, match=r"row 6: neighbour id -2.0 is not an integer in \[0, 40"):
        collect(iter_ltc_knn(_write_ltc(tmp_path / "ids.npz", arr)))


def test_ltc_knn_rounding_is_clipped_and_empty_slots_are_kept(tmp_path, rng):
    """Float rounding within 1e-5 of [-1, 1] is clipped into it; id -1 is an empty slot
    (as our export writes it: distance inf) and reads back as id -1, similarity -inf."""
    arr = ltc_knn_array(rng, 20, 4, np.float32)
    arr[:, 1, 0] = -4e-6  # self at distance ~0: similarity 1.000004
    arr[3, 1, 2] = 2.0 + 4e-6
    arr[5, 0, 3], arr[5, 1, 3] = -1.0, np.inf
    _, ids, sims = collect(iter_ltc_knn(_write_ltc(tmp_path / "ok.npz", arr), block_rows=6))
    assert sims.dtype == np.float32 and (sims[:, 0] == 1.0).all() and sims[3, 2] == -1.0
    assert ids[5, 3] == -1 and sims[5, 3] == -np.inf
    finite = np.isfinite(sims)
    assert (np.abs(sims[finite]) <= 1.0).all()


def test_ltc_knn_corrupt_archives_are_input_errors(tmp_path, rng):
    """A corrupt deflate stream, a member whose bytes changed (CRC) or that ends early is
    one InputError naming the file, found while reading the header or the rows."""
    from _bad_files import _corrupt, _member_data_offset

    arr = ltc_knn_array(rng, 64, 5)
    deflate = tmp_path / "deflate.npz"
    np.savez_compressed(deflate, data=arr)
    _corrupt(deflate, _member_data_offset(deflate) + 4, 16)
    with pytest.raises(InputError, match=r"corrupt \.npz \(Error -3 while decompressing"):
        collect(iter_ltc_knn(str(deflate)))
    crc = tmp_path / "crc.npz"
    np.savez(crc, data=arr)
    _corrupt(crc, _member_data_offset(crc) + 128 + 8 * 200, 8)  # an id in row 10's bytes
    with pytest.raises(InputError, match="row 10|Bad CRC-32") as err:
        collect(iter_ltc_knn(str(crc)))
    assert err.value.where == str(crc)
    short = tmp_path / "short.npz"
    with zipfile.ZipFile(short, "w") as zf:  # the header promises 64 rows, 30 are stored
        buf = io.BytesIO()
        np.save(buf, arr)
        zf.writestr("data.npy", buf.getvalue()[: 128 + 30 * 2 * 5 * 8])
    with pytest.raises(InputError, match="array 'data' is truncated"):
        collect(iter_ltc_knn(str(short)))


class _CountingStream:
    """A stream that records how many bytes were asked of it."""

    def __init__(self, data: bytes):
        self.inner = io.BytesIO(data)
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        out = self.inner.read(n)
        self.read_bytes += len(out)
        return out


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (-4, 3), }", "negative dimension"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (4, -3), }", "negative dimension"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (10**30, 3), }", "invalid .npy"),
        (f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({10**30}, 3), }}", "absurd shape"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), ", "not a Python literal"),
        ("('descr', '<f4')", "Header is not a dictionary"),
        ("{'descr': '" + "z" * 500 + "', 'fortran_order': False, 'shape': (4, 3), }",
         "descr is not a valid dtype descriptor"),
        ("{'descr': '<f4', 'fortran_order': 'no', 'shape': (4, 3), }", "fortran_order"),
        ("{'descr': '<f4', 'fortran_order': True, 'shape': (4, 3), }", "Fortran-order"),
        ("{'descr': '<U3', 'fortran_order': False, 'shape': (4, 3), }", "dtype <U3 not supp"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), 'x': '" + "a" * 12000 + "'}",
         "more than 10000"),
    ],
    ids=["neg-rows", "neg-dim", "expression", "absurd", "syntax", "tuple", "long-descr",
         "fortran-str", "fortran", "unicode", "oversized"],
)
def test_npy_headers_that_lie_are_one_bounded_line(tmp_path, header, message):
    from _bad_files import _npy_bytes

    uri = put(str(tmp_path / "x.npy"), _npy_bytes(header, version=2, payload=bytes(48)))
    with pytest.raises(InputError, match=message) as err:
        inspect_features(uri)
    assert err.value.where == uri
    assert "\n" not in err.value.problem and len(err.value.problem) < 160


def test_npy_header_length_is_checked_before_the_header_is_read():
    """A length field of 4 GiB (in a zip member, or a huge file) is refused having read
    12 bytes, not 4 GiB."""
    from ltc_ray.io.features import parse_npy_header

    stream = _CountingStream(b"\x93NUMPY\x02\x00" + (2**32 - 1).to_bytes(4, "little") + b"{" * 50)
    with pytest.raises(InputError, match=r"header of 4294967295 bytes, more than 10000"):
        parse_npy_header(stream, "x.npy", "invalid .npy header")
    assert stream.read_bytes == 12


def test_parquet_column_names_must_be_unique(tmp_path, rng):
    x = feats(rng, 6, 3)
    emb = embedding_table(x, fixed=True).column("embedding")
    ids = pa.array(np.arange(6))
    for names, column in ((["embedding", "embedding"], "embedding"), (["embedding", "id", "id"],
                                                                     "id")):
        arrays = [emb if n == "embedding" else ids for n in names]
        uri = write_parquet(str(tmp_path / f"dup-{column}.parquet"),
                            pa.Table.from_arrays(arrays, names=names), 10)
        with pytest.raises(InputError, match=f"column '{column}' appears 2 times") as err:
            inspect_features(uri)
        assert err.value.where == uri
    # a duplicate among columns ltc-ray does not read is fine
    other = pa.Table.from_arrays([emb, ids, ids], names=["embedding", "note", "note"])
    info = inspect_features(write_parquet(str(tmp_path / "other.parquet"), other, 10))
    assert (info.n_rows, info.dim, info.has_ids) == (6, 3, False)


def _corrupt_row_group(path, row_group: int) -> None:
    """Overwrite the first page header of one row group: footer and other groups intact."""
    from _bad_files import _corrupt

    offset = pq.ParquetFile(str(path)).metadata.row_group(row_group).column(0).data_page_offset
    _corrupt(path, offset, 32)


def test_corrupt_parquet_pages_are_input_errors_in_every_reader(tmp_path, rng):
    x = feats(rng, 120, 4)
    path = tmp_path / "corrupt.parquet"
    write_parquet(str(path), embedding_table(x, fixed=False, ids=np.arange(120)), 20)
    _corrupt_row_group(path, 3)
    info = inspect_features(str(path))  # the footer and row 0 are fine
    np.testing.assert_allclose(read_features(info, 0, 60), unit_rows(x[:60]), atol=1e-6)
    for read in (lambda: scan_features(info, 0, 120, chunk_rows=50),
                 lambda: read_features(info, 55, 70),
                 lambda: read_features(pickle.loads(pickle.dumps(info)), 60, 80)):
        with pytest.raises(InputError, match=r"corrupt Parquet file \(Couldn't deserialize") as err:
            read()
        assert err.value.where == str(path) and "\n" not in str(err.value)
    half = tmp_path / "half.parquet"
    half.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputError, match="not a readable Parquet file"):
        inspect_features(str(half))


def test_parquet_storage_failures_are_not_mistaken_for_corrupt_files():
    """Only Arrow's own errors (and its bare errno-less OSError) mean corrupt bytes; a
    storage failure keeps its type so a Ray task retries it and the CLI reports it as such."""
    from ltc_ray.io.features import _is_parquet_format_error

    assert _is_parquet_format_error(pa.ArrowInvalid("bad page"))
    assert _is_parquet_format_error(OSError("Couldn't deserialize thrift"))
    assert not _is_parquet_format_error(OSError(5, "Input/output error"))
    assert not _is_parquet_format_error(ConnectionError("reset by peer"))
    assert not _is_parquet_format_error(PermissionError("denied"))
    assert not _is_parquet_format_error(ValueError("a bug"))


def _parts(tmp_path, rng, sizes=(7, 5, 9)):
    from ltc_ray.io.features import write_feature_part

    x = feats(rng, sum(sizes), 6)
    starts = np.cumsum((0, *sizes))
    parts = [write_feature_part(str(tmp_path), i, int(starts[i]), x[starts[i] : starts[i + 1]])
             for i in range(len(sizes))]
    return x, parts


def test_parts_manifest_is_an_internal_format(tmp_path, rng):
    """`*.parts.json` is what a run writes for itself: refused as a user's --features,
    read back only with ``internal_parts=True``."""
    from ltc_ray.io.features import write_parts_manifest

    x, parts = _parts(tmp_path, rng)
    uri = str(tmp_path / "features.parts.json")
    write_parts_manifest(uri, 6, parts)
    with pytest.raises(InputError, match="is an internal ltc-ray format") as err:
        inspect_features(uri)
    assert err.value.where == uri
    info = inspect_features(uri, internal_parts=True)
    assert (info.format, info.n_rows, info.dim) == ("parts", 21, 6)
    np.testing.assert_allclose(read_features(info, 0, 21), unit_rows(x), atol=1e-6)
    np.testing.assert_array_equal(read_features(info, 5, 15, normalize=False), x[5:15])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["parts"].pop(1), r"parts do not tile \[0, 21\): part \[12, 21\) after row 7"),
        (lambda m: m["parts"][1].update(start=5), r"part \[5, 12\) after row 7"),
        (lambda m: m.update(n_rows=30), r"parts cover \[0, 21\), the manifest says 30 rows"),
        (lambda m: m.update(n_rows=15), r"parts cover \[0, 21\), the manifest says 15 rows"),
        (lambda m: m["parts"][0].update(file="../outside.npy"), "outside the manifest's directory"),
        (lambda m: m["parts"][0].update(file="/etc/passwd"), "outside the manifest's directory"),
        (lambda m: m["parts"][0].update(file="s3://bucket/x.npy"), "is not a relative path"),
        (lambda m: m["parts"][0].update(file="sub/../../x.npy"), "outside the manifest's"),
        (lambda m: m["parts"][2].update(stop=16), r"part \[12, 16\)|parts cover \[0, 16\)"),
        (lambda m: m.update(dim=0), "dim must be an integer >= 1"),
        (lambda m: m["parts"][0].update(header_bytes=-1), "header_bytes must be an integer"),
        (lambda m: m.update(parts=[]), "no parts"),
    ],
    ids=["gap", "overlap", "short", "long", "dotdot", "absolute", "scheme", "nested-dotdot",
         "part-short", "dim", "header", "empty"],
)
def test_parts_manifest_must_tile_the_rows_from_its_own_directory(tmp_path, rng, edit, message):
    import json

    from ltc_ray.io.features import write_parts_manifest

    _, parts = _parts(tmp_path, rng)
    uri = str(tmp_path / "features.parts.json")
    write_parts_manifest(uri, 6, parts)
    manifest = json.loads((tmp_path / "features.parts.json").read_text())
    edit(manifest)
    (tmp_path / "features.parts.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=message) as err:
        inspect_features(uri, internal_parts=True)
    assert err.value.where == uri and "invalid feature-parts manifest" in err.value.problem


def test_corrupt_parquet_above_the_driver_scan_is_named_by_the_ray_scan(
    ray_local, tmp_path, capsys, monkeypatch
):
    """A corrupt Parquet too large for the driver's scan (> 4 MiB) is found by the
    parallel Ray scan: exit 2, one error line naming the file, no traceback, no output."""
    from _data import blobs

    from ltc_ray.cli import main
    from ltc_ray.pipeline.executor import DRIVER_SCAN_MAX_BYTES, Inputs, driver_scans

    d = 16
    n = DRIVER_SCAN_MAX_BYTES // (4 * d) + 2000
    x, _ = blobs(n_per=n // 10, n_clusters=10, dim=d, spread=0.5, seed=2)
    path = tmp_path / "big.parquet"
    write_parquet(str(path), embedding_table(x, fixed=False), 8192)
    groups = pq.ParquetFile(str(path)).metadata.num_row_groups
    _corrupt_row_group(path, groups // 2)
    assert driver_scans(Inputs(str(path), inspect_features(str(path)))) == set()  # the Ray path
    out = tmp_path / "out"
    # the CLI's log handler writes to the stderr of the test that first installed it
    monkeypatch.setattr(logging.getLogger("ltc_ray"), "handlers", [])
    capsys.readouterr()
    code = main(["cluster", "--features", str(path), "--set", "knn.k=10", "--output", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: corrupt Parquet file ("), err
    assert "Traceback" not in err
    assert not out.exists()
    assert not (tmp_path / "out.work" / "knn").exists()  # refused before the kNN
