"""GCN-V building blocks: adjacency (whole vs partitioned), target, model, training, store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _data import blobs, random_knn

from ltc_ray.errors import InputError
from ltc_ray.graph.adjacency import adjacency_rows, directed_edges, whole_graph_adjacency
from ltc_ray.knn import exact_knn
from ltc_ray.models import (
    GCNV,
    TrainConfig,
    aggregate,
    confidence_target,
    data_fingerprint,
    load_model,
    predict,
    raw_confidence,
    save_model,
    train_gcn_v,
)


def dense_adjacency(ids: np.ndarray, sims: np.ndarray) -> np.ndarray:
    """The GCN-V Â by its definition, one entry at a time (float64)."""
    n = len(ids)
    s = np.zeros((n, n))
    for i in range(n):
        for j, v in zip(ids[i], sims[i], strict=True):
            if j >= 0 and j != i and v >= 0:
                s[i, j] = max(s[i, j], v)
    a = np.maximum(s, s.T) + np.eye(n)
    return a / a.sum(axis=1, keepdims=True)


def partition_rows(n: int, parts: int, seed: int) -> list[np.ndarray]:
    """Rows split at random (not contiguous) into ``parts`` non-empty sorted groups."""
    owner = np.random.default_rng(seed).permutation(np.arange(n) % parts)
    return [np.flatnonzero(owner == p) for p in range(parts)]


def touching_edges(ids, sims, nodes, block_rows=17):
    """The directed kNN edges with src or dst in ``nodes``, gathered block by block."""
    parts = []
    for lo in range(0, len(ids), block_rows):
        src, dst, sim = directed_edges(ids[lo : lo + block_rows], sims[lo : lo + block_rows], lo)
        keep = np.isin(src, nodes) | np.isin(dst, nodes)
        parts.append((src[keep], dst[keep], sim[keep]))
    return tuple(np.concatenate(a) for a in zip(*parts, strict=True))


def as_global(adj_rows: sp.csr_matrix, cols: np.ndarray, n: int) -> sp.csr_matrix:
    return sp.csr_matrix(
        (adj_rows.data, cols[adj_rows.indices], adj_rows.indptr), shape=(adj_rows.shape[0], n)
    )


# ---------------------------------------------------------------- adjacency


def test_whole_graph_adjacency_matches_the_definition():
    ids, sims = random_knn(50, 6, seed=1)
    adj = whole_graph_adjacency(ids, sims)
    ref = dense_adjacency(ids, sims)
    dense = adj.toarray()
    assert adj.dtype == np.float32 and adj.shape == (50, 50)
    np.testing.assert_allclose(dense, ref, rtol=1e-6, atol=0)
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, rtol=1e-6)
    assert np.array_equal(dense != 0, dense.T != 0)  # max(S, Sᵀ) is symmetric before scaling
    # self loop weight 1 before normalisation: diag * rowsum(unnormalised) == 1
    weights = np.zeros((50, 50))
    for i in range(50):
        for j, v in zip(ids[i], sims[i], strict=True):
            if j >= 0 and j != i and v >= 0:
                weights[i, j] = max(weights[i, j], v)
    rowsum = (np.maximum(weights, weights.T) + np.eye(50)).sum(axis=1)
    np.testing.assert_allclose(np.diag(dense) * rowsum, 1.0, rtol=1e-6)
    # an edge whose similarity is negative in both directions is absent
    neg = [
        (i, j)
        for i in range(50)
        for j, v in zip(ids[i], sims[i], strict=True)
        if j >= 0 and v < 0 and not np.any((ids[j] == i) & (sims[j] >= 0))
    ]
    assert neg and all(dense[i, j] == 0 and dense[j, i] == 0 for i, j in neg)


def test_directed_edges_drop_self_negative_and_empty_slots():
    ids, sims = random_knn(30, 5, seed=2)
    src, dst, sim = directed_edges(ids[10:20], sims[10:20], row_offset=10)
    assert src.dtype == dst.dtype == np.int64 and sim.dtype == np.float32
    assert np.all((src >= 10) & (src < 20)) and np.all(src != dst)
    assert np.all(dst >= 0) and np.all(sim >= 0)
    expected = sum(
        1
        for i in range(10, 20)
        for j, v in zip(ids[i], sims[i], strict=True)
        if j >= 0 and j != i and v >= 0
    )
    assert len(src) == expected


@pytest.mark.parametrize("parts", [1, 2, 7])
def test_partition_rows_equal_whole_graph_rows_bitwise(parts):
    ids, sims = random_knn(50, 6, seed=3)
    whole = whole_graph_adjacency(ids, sims)
    for nodes in partition_rows(50, parts, seed=parts):
        rows, cols = adjacency_rows(nodes, *touching_edges(ids, sims, nodes))
        assert np.all(np.diff(cols) > 0) and np.all(np.isin(nodes, cols))
        got, want = as_global(rows, cols, 50), whole[nodes]
        assert np.array_equal(got.indptr, want.indptr)
        assert np.array_equal(got.indices, want.indices)
        assert np.array_equal(got.data, want.data)  # exact float32 equality


def test_extra_and_repeated_edges_do_not_change_rows():
    ids, sims = random_knn(40, 6, seed=4)
    nodes = np.array([3, 8, 21, 39])
    base, base_cols = adjacency_rows(nodes, *touching_edges(ids, sims, nodes))
    everything = directed_edges(ids, sims)
    doubled = tuple(np.concatenate([a, a[::-1]]) for a in everything)
    rows, cols = adjacency_rows(nodes, *doubled)
    assert np.array_equal(cols, base_cols)
    assert np.array_equal(rows.toarray(), base.toarray())


def test_huge_ids_give_the_same_rows():
    """Sparse id ranges (int64 ids far beyond the edge count) take the sort-based path."""
    ids, sims = random_knn(40, 6, seed=5)
    nodes = np.array([0, 5, 17, 30])
    src, dst, sim = touching_edges(ids, sims, nodes)
    base, base_cols = adjacency_rows(nodes, src, dst, sim)
    big = 3 * 2**40
    rows, cols = adjacency_rows(nodes + big, src + big, dst + big, sim)
    assert np.array_equal(cols, base_cols + big)
    assert np.array_equal(rows.indptr, base.indptr) and np.array_equal(rows.indices, base.indices)
    assert np.array_equal(rows.data, base.data)


# ---------------------------------------------------------------- target


def test_confidence_target_matches_loop_definition():
    x, labels = blobs(20, 5, 16, spread=1.5, seed=5)
    ids, sims = exact_knn(x, 8)
    raw = np.zeros(len(ids))
    for i in range(len(ids)):
        for j, s in zip(ids[i], sims[i], strict=True):
            raw[i] += s if labels[j] == labels[i] else -s
    want = raw / np.abs(raw).max()
    got = confidence_target(ids, sims, labels)
    assert got.dtype == np.float32 and got.shape == (100,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got).max() == pytest.approx(1.0)
    assert got.min() < 0 < got.max()  # both mixed and pure neighbourhoods occur
    # a block of rows gives the same raw values as the whole
    np.testing.assert_allclose(
        raw_confidence(ids[30:60], sims[30:60], labels, 30), raw[30:60], rtol=1e-5
    )


# ---------------------------------------------------------------- model / predict


def test_predict_shapes_and_batch_independence():
    rng = np.random.default_rng(6)
    torch.manual_seed(0)
    model = GCNV()  # production dims 256 -> 512
    x = rng.standard_normal((333, 256)).astype(np.float32)
    agg = rng.standard_normal((333, 256)).astype(np.float32)
    conf, hidden = predict(model, x, agg)
    assert conf.shape == (333,) and hidden.shape == (333, 512)
    assert conf.dtype == hidden.dtype == np.float32 and np.all(hidden >= 0)
    for batch in (1, 3, 7, 100, 257):
        c, h = predict(model, x, agg, batch_rows=batch)
        assert np.array_equal(c, conf) and np.array_equal(h, hidden), batch
    c, h = predict(model, x[101:106], agg[101:106], batch_rows=2)  # a slice, odd offsets
    assert np.array_equal(c, conf[101:106]) and np.array_equal(h, hidden[101:106])
    assert model.training  # predict restores the mode it found


def test_whole_graph_and_partitioned_aggregation_agree():
    ids, sims = random_knn(60, 7, seed=7)
    x = np.random.default_rng(7).standard_normal((60, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    torch.manual_seed(1)
    model = GCNV(16, 32)
    agg = aggregate(whole_graph_adjacency(ids, sims), x)
    np.testing.assert_allclose(agg, dense_adjacency(ids, sims) @ x, atol=1e-5)
    conf, _ = predict(model, x, agg)
    for nodes in partition_rows(60, 4, seed=8):
        rows, cols = adjacency_rows(nodes, *touching_edges(ids, sims, nodes))
        part_agg = aggregate(rows, x[cols])
        assert np.array_equal(part_agg, agg[nodes])
        part_conf, _ = predict(model, x[nodes], part_agg)
        np.testing.assert_allclose(part_conf, conf[nodes], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def train_data():
    x, labels = blobs(30, 12, 32, spread=2.0, seed=9)
    ids, sims = exact_knn(x, 10)
    return x, whole_graph_adjacency(ids, sims), confidence_target(ids, sims, labels), ids, sims


def _mse(model, x, adj, target):
    conf, _ = predict(model, x, aggregate(adj, x))
    return float(np.mean((conf - target) ** 2))


def test_one_full_graph_step_lowers_the_loss(train_data):
    x, adj, target, _, _ = train_data
    init, hist0 = train_gcn_v(x, adj, target, TrainConfig(hidden=32, epochs=0), progress=False)
    assert hist0 == []
    trained, hist = train_gcn_v(
        x, adj, target, TrainConfig(hidden=32, epochs=1, lr=1e-2), progress=False
    )
    before, after = _mse(init, x, adj, target), _mse(trained, x, adj, target)
    assert hist[0]["epoch"] == 1 and hist[0]["seconds"] >= 0
    assert hist[0]["loss"] == pytest.approx(before, rel=1e-4)  # loss measured before the step
    assert after < before


def test_seeded_training_is_reproducible(train_data):
    x, adj, target, _, _ = train_data
    rng_before = torch.get_rng_state()
    cfg = TrainConfig(hidden=32, epochs=3, batch_rows=50, seed=5)
    a, ha = train_gcn_v(x, adj, target, cfg, progress=False)
    b, hb = train_gcn_v(x, adj, target, cfg, progress=False)
    c, _ = train_gcn_v(
        x, adj, target, TrainConfig(hidden=32, epochs=3, batch_rows=50, seed=6), progress=False
    )
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[name], sb[name]) for name in sa)
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert not all(torch.equal(sa[name], sc[name]) for name in sa)


def test_mini_batch_training_lowers_the_loss(train_data):
    x, adj, target, _, _ = train_data
    init, _ = train_gcn_v(x, adj, target, TrainConfig(hidden=32, epochs=0), progress=False)
    cfg = TrainConfig(hidden=32, epochs=4, batch_rows=64, lr=3e-3)
    assert cfg.rows_per_step(len(x)) == 64
    model, hist = train_gcn_v(x, adj, target, cfg, progress=False)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert _mse(model, x, adj, target) < _mse(init, x, adj, target)
    assert TrainConfig(full_graph_max_rows=100).rows_per_step(1000) == 65536
    assert TrainConfig().rows_per_step(1000) == 1000


# ---------------------------------------------------------------- store


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(2)
    model = GCNV(32, 48)
    uri = str(tmp_path_factory.mktemp("store") / "gcnv")
    meta = {
        "k": 10,
        "thresholds": {"tau": 0.65},
        "data": data_fingerprint("mem://feats.bin", 360, 32, np.arange(360) % 12),
        "train": {"epochs": 1},
        "metrics": {"loss": 0.1},
    }
    save_model(uri, model, meta)
    return uri, model


def _copy_model(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_store_round_trip_local_and_memory(saved_model, train_data):
    uri, model = saved_model
    x = np.random.default_rng(10).standard_normal((40, 32)).astype(np.float32)
    agg = np.random.default_rng(11).standard_normal((40, 32)).astype(np.float32)
    loaded, meta = load_model(uri, expected_dim=32, expected_k=10, method="gcn-v")
    assert meta["method"] == "gcn-v" and meta["in_dim"] == 32 and meta["hidden"] == 48
    assert meta["thresholds"] == {"tau": 0.65} and len(meta["data"]["labels_sha256"]) == 64
    assert "torch" in meta["versions"] and not loaded.training
    want = predict(model, x, agg)
    got = predict(loaded, x, agg)
    assert np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    save_model("memory://models/gcnv", model, {"k": 10})
    mem, _ = load_model("memory://models/gcnv", expected_dim=32)
    assert np.array_equal(predict(mem, x, agg)[0], want[0])


def test_store_refuses_mismatches(saved_model):
    uri, _ = saved_model
    with pytest.raises(InputError, match="trained for dim 32, the features have 16"):
        load_model(uri, expected_dim=16)
    with pytest.raises(InputError, match="k=10.*k=80"):
        load_model(uri, expected_k=80)
    with pytest.raises(InputError, match="not 'gcn-e'"):
        load_model(uri, method="gcn-e")


def test_store_refuses_broken_directories(saved_model, tmp_path):
    uri, _ = saved_model
    with pytest.raises(InputError, match="model directory not found"):
        load_model(str(tmp_path / "nowhere"))

    no_weights = _copy_model(uri, tmp_path / "no_weights")
    (tmp_path / "no_weights" / "weights.pt").unlink()
    with pytest.raises(InputError, match=r"weights\.pt: weights\.pt not found"):
        load_model(no_weights)

    no_json = _copy_model(uri, tmp_path / "no_json")
    (tmp_path / "no_json" / "model.json").unlink()
    with pytest.raises(InputError, match="model.json not found"):
        load_model(no_json)

    bad_json = _copy_model(uri, tmp_path / "bad_json")
    (tmp_path / "bad_json" / "model.json").write_text("{not json")
    with pytest.raises(InputError, match="invalid model.json"):
        load_model(bad_json)

    corrupt = _copy_model(uri, tmp_path / "corrupt")
    path = tmp_path / "corrupt" / "weights.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="cannot read weights"):
        load_model(corrupt)

    wrong_arch = _copy_model(uri, tmp_path / "wrong_arch")
    meta_path = tmp_path / "wrong_arch" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["hidden"] = 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="weights do not fit gcn-v.*wrong shapes"):
        load_model(wrong_arch)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_store_refuses_pickle_payloads(saved_model, tmp_path):
    uri, _ = saved_model
    evil = _copy_model(uri, tmp_path / "evil")
    marker = tmp_path / "code_ran"
    state = dict(torch.load(f"{uri}/weights.pt", weights_only=True))
    state["payload"] = _Payload(str(marker))
    torch.save(state, tmp_path / "evil" / "weights.pt")
    with pytest.raises(InputError, match="cannot read weights"):
        load_model(evil)
    assert not marker.exists()
