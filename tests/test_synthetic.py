"""The synthetic MS1M benchmark: exact split sizes, layout, determinism, difficulty."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import fsspec
import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ltc_ray.errors import InputError
from ltc_ray.synthetic import (
    SyntheticParams,
    base_part_sizes,
    benchmark_sizes,
    generator,
    identity_sizes,
    make_benchmark,
)

DIM = 256
TINY = 0.002  # ~1.2K samples / 17 identities per base part

# Published MS1M split sizes (learn-to-cluster README): the contract, not a result.
MS1M = {
    "part0_train": (576_494, 8_573),
    "part1_test": (584_013, 8_573),
    "part3_test": (1_740_301, 25_719),
    "part5_test": (2_890_517, 42_865),
    "part7_test": (4_046_365, 60_011),
    "part9_test": (5_206_761, 77_157),
}


def read_features(path: str, dim: int = DIM) -> np.ndarray:
    return np.fromfile(path, dtype="<f4").reshape(-1, dim)


def read_labels(path: str) -> np.ndarray:
    with open(path) as f:
        return np.array(f.read().split(), dtype=np.int64)


def pairwise_f(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    n = len(labels_true)
    key = labels_true * (int(labels_pred.max()) + 1) + labels_pred
    tk = (np.unique(key, return_counts=True)[1].astype(np.int64) ** 2).sum() - n
    pk = (np.unique(labels_pred, return_counts=True)[1].astype(np.int64) ** 2).sum() - n
    qk = (np.unique(labels_true, return_counts=True)[1].astype(np.int64) ** 2).sum() - n
    precision, recall = tk / pk, tk / qk
    return 2 * precision * recall / (precision + recall)


def components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("tiny"))
    return root, make_benchmark(root, parts=(0, 1, 3, 5), scale=TINY, seed=3, progress=False)


def test_full_scale_sizes_are_ms1m_exactly():
    assert benchmark_sizes(1.0) == MS1M
    base = base_part_sizes(1.0)
    assert len(base) == 10 and all(ids == 8_573 for _, ids in base)
    # unpublished base parts split each published pair evenly
    assert base[2][0] + base[3][0] == MS1M["part3_test"][0] - MS1M["part1_test"][0]
    assert abs(base[8][0] - base[9][0]) <= 1


def test_scaled_sizes_follow_the_union_rule():
    sizes, base = benchmark_sizes(0.1), base_part_sizes(0.1)
    assert base[1] == (round(584_013 * 0.1), round(8_573 * 0.1))
    for n in (1, 3, 5, 7, 9):
        assert sizes[f"part{n}_test"] == (
            sum(b[0] for b in base[1 : n + 1]),
            sum(b[1] for b in base[1 : n + 1]),
        )


def test_identity_sizes_long_tailed_exact_total_and_mean_68():
    n_samples, n_ids = base_part_sizes(0.2)[1]
    sizes = identity_sizes(1, scale=0.2, seed=0)
    assert sizes.shape == (n_ids,) and sizes.sum() == n_samples
    assert sizes.min() >= 2
    assert 66 <= sizes.mean() <= 70
    assert sizes.max() >= 3 * np.median(sizes)  # long tail, not all ~68
    assert len(np.unique(sizes)) > 50
    assert np.array_equal(sizes, identity_sizes(1, scale=0.2, seed=0))
    assert not np.array_equal(sizes, identity_sizes(1, scale=0.2, seed=1))


def test_tiny_generation_writes_the_layout_with_right_sizes(tiny):
    root, written = tiny
    expected = benchmark_sizes(TINY)
    assert set(written) == {"part0_train", "part1_test", "part3_test", "part5_test"}
    for name, info in written.items():
        assert info["features"] == os.path.join(root, "features", f"{name}.bin")
        assert info["labels"] == os.path.join(root, "labels", f"{name}.meta")
        n, ids = expected[name]
        assert (info["n_samples"], info["n_ids"]) == (n, ids)
        assert os.path.getsize(info["features"]) == n * DIM * 4
        labels = read_labels(info["labels"])
        assert len(labels) == n and len(np.unique(labels)) == ids
    assert not [f for f in os.listdir(os.path.join(root, "features")) if f.endswith(".tmp")]


def test_test_parts_are_concatenations_of_base_parts(tiny):
    _, written = tiny
    raw = {name: Path(info["features"]).read_bytes() for name, info in written.items()}
    meta = {name: Path(info["labels"]).read_text() for name, info in written.items()}
    assert raw["part3_test"].startswith(raw["part1_test"])
    assert raw["part5_test"].startswith(raw["part3_test"])
    assert meta["part5_test"].startswith(meta["part3_test"])
    assert meta["part3_test"].startswith(meta["part1_test"])
    # part5 = base parts 1..5, each a block of consecutive global identity ids
    labels = read_labels(written["part5_test"]["labels"])
    n_ids = base_part_sizes(TINY)[0][1]
    offsets = np.cumsum([0] + [n for n, _ in base_part_sizes(TINY)[1:6]])
    for b in range(5):
        block = labels[offsets[b] : offsets[b + 1]]
        assert set(block) == set(range((b + 1) * n_ids, (b + 2) * n_ids))


def test_train_and_test_identities_are_disjoint(tiny):
    _, written = tiny
    train = set(read_labels(written["part0_train"]["labels"]))
    test = set(read_labels(written["part1_test"]["labels"]))
    assert train and test and not train & test


def test_rows_are_unit_and_shuffled(tiny):
    _, written = tiny
    x = read_features(written["part1_test"]["features"])
    assert x.dtype == np.float32 and np.isfinite(x).all()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    labels = read_labels(written["part1_test"]["labels"])
    assert (np.diff(labels) != 0).sum() > 10 * len(np.unique(labels))  # not sorted by identity


def test_same_bytes_whatever_the_chunk_size(tmp_path, monkeypatch):
    # small shuffle windows so identities straddle windows and chunks hold several
    monkeypatch.setattr(generator, "SHUFFLE_ROWS", 500)
    outs = []
    for chunk_rows in (1, 1_700, 10**7):
        root = tmp_path / f"c{chunk_rows}"
        written = make_benchmark(
            str(root), (1, 3), scale=TINY, seed=7, progress=False, chunk_rows=chunk_rows
        )
        outs.append(
            {
                k: (Path(v["features"]).read_bytes(), Path(v["labels"]).read_text())
                for k, v in written.items()
            }
        )
    assert outs[0] == outs[1] == outs[2]
    # each window of 500 rows holds exactly the rows of the identity-sorted order there
    labels = read_labels(str(tmp_path / "c1" / "labels" / "part1_test.meta"))
    first_gid = base_part_sizes(TINY)[0][1]
    sorted_order = np.repeat(
        first_gid + np.arange(len(identity_sizes(1, TINY, 7))), identity_sizes(1, TINY, 7)
    )
    assert len(labels) > 1_000
    for start in range(0, len(labels), 500):
        window = labels[start : start + 500]
        assert np.array_equal(np.sort(window), sorted_order[start : start + 500])
    other = make_benchmark(str(tmp_path / "s8"), (1,), scale=TINY, seed=8, progress=False)
    assert Path(other["part1_test"]["features"]).read_bytes() != outs[0]["part1_test"][0]


def test_fsspec_uri_writes_the_same_bytes(tiny):
    _, local = tiny
    url = "memory://ltc-synthetic-test"
    written = make_benchmark(url, (1,), scale=TINY, seed=3, progress=False)
    with fsspec.open(written["part1_test"]["features"], "rb") as f:
        assert f.read() == Path(local["part1_test"]["features"]).read_bytes()
    fsspec.filesystem("memory").rm("/ltc-synthetic-test", recursive=True)


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    make_benchmark(str(tmp_path / "a"), (1,), scale=TINY, progress=True)
    out, err = capsys.readouterr()
    assert "rows" in err and out == ""
    make_benchmark(str(tmp_path / "b"), (1,), scale=TINY, progress=False)
    assert capsys.readouterr() == ("", "")


def test_failed_generation_leaves_no_files(tmp_path):
    broken = SyntheticParams(mode_probs=(0.5, 0.5, 0.5))  # fails inside generation
    with pytest.raises(ValueError):
        make_benchmark(str(tmp_path), (0, 3), scale=TINY, progress=False, params=broken)
    assert os.listdir(tmp_path / "features") == [] and os.listdir(tmp_path / "labels") == []


@pytest.mark.parametrize("parts", [(2,), (0, 4), (), (10,), ("x",), None])
def test_bad_parts_raise_input_error(tmp_path, parts):
    with pytest.raises(InputError, match="^--parts: "):
        make_benchmark(str(tmp_path), parts=parts, scale=TINY, progress=False)
    assert not (tmp_path / "features").exists()


@pytest.mark.parametrize("scale", [0.0, -0.1, 1.5, float("nan"), "big"])
def test_bad_scale_raises_input_error(tmp_path, scale):
    with pytest.raises(InputError, match="^--scale: "):
        make_benchmark(str(tmp_path), parts=(1,), scale=scale, progress=False)
    with pytest.raises(InputError):
        benchmark_sizes(scale)


def test_difficulty_is_ms1m_like_and_oracle_is_near_perfect(tmp_path):
    """Thresholded kNN-CC is far from perfect while label-true kNN edges recover the identities."""
    written = make_benchmark(str(tmp_path), (1,), scale=0.01, seed=0, progress=False)
    x = read_features(written["part1_test"]["features"])
    labels = read_labels(written["part1_test"]["labels"])
    index = faiss.IndexFlatIP(DIM)
    index.add(x)
    knn_sims, knn_ids = index.search(x, 80)
    n = len(x)
    src, dst, sims = np.repeat(np.arange(n), 80), knn_ids.ravel(), knn_sims.ravel()
    same = labels[src] == labels[dst]
    assert pairwise_f(labels, components(n, src[same], dst[same])) > 0.99
    best_cc = max(
        pairwise_f(labels, components(n, src[sims >= t], dst[sims >= t]))
        for t in np.arange(0.4, 0.95, 0.02)
    )
    assert 0.45 < best_cc < 0.85
