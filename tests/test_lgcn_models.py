"""L-GCN building blocks: instance pivot subgraphs, model, batched inference, training."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from _data import random_knn, sphere_faces

from ltc_ray.knn import exact_knn
from ltc_ray.models.lgcn import LGCN, edge_probabilities, ips_batch, ips_sizes
from ltc_ray.models.train_lgcn import TrainLConfig, train_lgcn

SMALL = (32, 32, 16, 16)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: results are then reproducible, and the shared 2-core test machine
    is not slowed to a crawl by two threads fighting other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# identities as Gaussian blobs on the sphere, noisy enough that kNN rows mix them
faces = functools.partial(sphere_faces, noise=0.9)


def serve(ids, feats, calls=None):
    """``feats_of``/``rows_of`` over whole-graph arrays, counting calls when asked."""

    def feats_of(q):
        if calls is not None:
            calls["feats"] += 1
        return feats[q]

    def rows_of(q):
        if calls is not None:
            calls["rows"] += 1
        return ids[q], np.zeros(ids[q].shape, np.float32)

    return feats_of, rows_of


def firsts(ids, v, m):
    """Node v's first m neighbours by the module's rule: row columns 1..m, minus -1 and v."""
    return [int(j) for j in ids[v, 1 : 1 + m] if j >= 0 and j != v]


def ips_by_sets(ids, feats, p, hop1, hop2, active):
    """The IPS of pivot p built the obvious way: sets and dicts (learn-to-cluster's feeder)."""
    h1 = firsts(ids, p, hop1)
    nodes = {p, *h1}
    for v in h1:
        nodes.update(firsts(ids, v, hop2))
    nodes = sorted(nodes)
    where = {v: i for i, v in enumerate(nodes)}
    edges = set()
    for v in nodes:
        for u in firsts(ids, v, active):
            if u in where:
                edges.add((where[v], where[u]))
                edges.add((where[u], where[v]))
    x = feats[nodes] - feats[p]
    slot = [where[int(j)] if j >= 0 and j != p else -1 for j in ids[p, 1 : 1 + hop1]]
    return nodes, edges, x, slot


def auc(score, target):
    """Area under the ROC curve (rank statistic, ties averaged)."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    s = score[order]
    edges = np.r_[0, np.flatnonzero(np.diff(s)) + 1, len(s)]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2
    pos = target.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def pivot_edges(model, x, ids, labels, hop1, hop2, active=10):
    feats_of, rows_of = serve(ids, x)
    n = len(x)
    prob = edge_probabilities(model, np.arange(n), ids, feats_of, rows_of, hop1, hop2, active)
    nbr = ids[:, 1 : 1 + hop1]
    valid = nbr >= 0
    same = labels[np.where(valid, nbr, 0)] == labels[:, None]
    return prob, prob[valid], same[valid]


# ---------------------------------------------------------------- subgraphs


def test_ips_matches_set_construction():
    rng = np.random.default_rng(0)
    n, k, d = 70, 12, 6
    ids, _ = random_knn(n, k, rng)
    ids = ids.astype(np.int64)
    ids[5, 3] = 5  # a stray self entry is dropped like an empty slot
    feats = rng.standard_normal((n, d)).astype(np.float32)
    hop1, hop2, active = 8, 4, 5
    pivots = np.array([3, 5, 17, 3, 64, 40])  # a repeated pivot is fine
    calls = {"feats": 0, "rows": 0}
    feats_of, rows_of = serve(ids, feats, calls)
    x, adj, mask, slot = ips_batch(pivots, ids[pivots], feats_of, rows_of, hop1, hop2, active)
    assert calls == {"feats": 1, "rows": 2}
    assert x.dtype == adj.dtype == np.float32 and slot.dtype == np.int64
    sizes = ips_sizes(pivots, ids[pivots], rows_of, hop1, hop2)
    s = x.shape[1]
    assert s % 8 == 0 and s - 8 < sizes.max() <= s and slot.shape == (len(pivots), hop1)
    for b, p in enumerate(pivots):
        nodes, edges, xp, sp = ips_by_sets(ids, feats, int(p), hop1, hop2, active)
        m = len(nodes)
        assert sizes[b] == m and mask[b].sum() == m and mask[b, :m].all()
        np.testing.assert_allclose(x[b, :m], xp, rtol=0, atol=1e-6)
        assert not x[b, m:].any() and not adj[b, m:].any() and not adj[b, :, m:].any()
        got = set(zip(*np.nonzero(adj[b]), strict=True))
        assert got == edges and len(edges) > m
        rowsum = adj[b, :m].sum(axis=1)
        linked = adj[b, :m].any(axis=1)
        np.testing.assert_allclose(rowsum[linked], 1.0, atol=1e-6)
        deg = (adj[b, :m] > 0).sum(axis=1)
        nz = adj[b, :m][adj[b, :m] > 0]
        np.testing.assert_allclose(nz, np.repeat(1.0 / deg[linked], deg[linked]), atol=1e-6)
        assert slot[b].tolist() == sp
    assert (slot[1] == -1).any()  # the stray self entry and the -1 slots of row 5


def test_ips_rejects_bad_shapes():
    ids, _ = random_knn(20, 6, 1)
    feats_of, rows_of = serve(ids.astype(np.int64), np.zeros((20, 3), np.float32))
    with pytest.raises(ValueError, match="hop1"):
        ips_batch(np.array([0]), ids[:1], feats_of, rows_of, hop1=6)
    with pytest.raises(ValueError, match="knn_rows"):
        ips_batch(np.array([0, 1]), ids[:1], feats_of, rows_of, hop1=3)


# ---------------------------------------------------------------- model


def test_model_ignores_padding_and_checks_shapes():
    torch.manual_seed(0)
    model = LGCN(8, SMALL).eval()
    x = torch.randn(2, 16, 8)
    adj = torch.rand(2, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :10], mask[1, :16] = True, True
    slot = torch.tensor([[1, 2, -1], [3, 0, 15]])
    out = model(x, adj / adj.sum(2, keepdim=True), mask, slot)
    assert out.shape == (2, 3, 2)
    np.testing.assert_allclose(out.exp().sum(-1).detach().numpy(), 1.0, atol=1e-6)
    x2, adj2 = x.clone(), adj.clone()
    x2[0, 10:] = float("nan")
    adj2[0, 10:], adj2[0, :, 10:] = float("nan"), 7.0
    out2 = model(x2, adj2 / adj.sum(2, keepdim=True), mask, slot)
    assert torch.isfinite(out2).all()
    # pivot 0's real part (slots < 10) saw the same input up to its adjacency to padding
    ref = model(x, torch.where(mask[:, None, :], adj, 0.0) / adj.sum(2, keepdim=True), mask, slot)
    torch.testing.assert_close(out2[0, :2], ref[0, :2])
    with pytest.raises(ValueError):
        model(x[..., :7], adj, mask, slot)
    with pytest.raises(ValueError):
        LGCN(8, (4, 4, 4))


def test_pivot_result_is_batch_independent():
    x, labels = faces(12, 10, 16, seed=3)
    ids, _ = exact_knn(x, 12)
    ids = ids.astype(np.int64)
    ids[7, 4] = -1
    torch.manual_seed(1)
    model = LGCN(16, SMALL)
    model.bn0.running_mean.uniform_(-0.1, 0.1)
    model.bn0.running_var.uniform_(0.5, 2.0)
    feats_of, rows_of = serve(ids, x)
    pivots = np.arange(len(x))
    full = edge_probabilities(model, pivots, ids, feats_of, rows_of, 9, 4, 5, batch_size=64)
    assert full.shape == (len(x), 9) and full.dtype == np.float32
    assert full[7, 3] == 0.0 and (full[ids[:, 1:10] >= 0] > 0).all()
    for batch in (1, 5):
        got = edge_probabilities(model, pivots, ids, feats_of, rows_of, 9, 4, 5, batch)
        np.testing.assert_allclose(got, full, rtol=0, atol=1e-5)
    for p in (0, 7, 55):
        alone = edge_probabilities(model, pivots[p : p + 1], ids[p : p + 1], feats_of,
                                   rows_of, 9, 4, 5)
        np.testing.assert_allclose(alone[0], full[p], rtol=0, atol=1e-5)
    assert model.training  # the caller's mode is restored


# ---------------------------------------------------------------- training


def test_config_validation():
    with pytest.raises(ValueError):
        TrainLConfig(dims=(8, 8, 8))
    with pytest.raises(ValueError):
        TrainLConfig(max_pivots=0)
    with pytest.raises(ValueError):
        TrainLConfig(hop1=0)
    with pytest.raises(ValueError):
        TrainLConfig(lr=0.0)
    with pytest.raises(ValueError):
        TrainLConfig(momentum=1.0)


@pytest.fixture(scope="module")
def split():
    """60 identities x 15 samples, 32-d: 40 identities to train on, 20 held out."""
    x, y = faces(60, 15, 32, seed=10)
    train = y < 40
    out = []
    for part in (train, ~train):
        out += [x[part], exact_knn(x[part], 20)[0].astype(np.int64), y[part]]
    return tuple(out)


def test_training_is_deterministic(split):
    x_tr, ids_tr, y_tr = split[:3]
    cfg = TrainLConfig(epochs=2, batch_size=8, seed=4, threads=1, dims=SMALL, hop1=12, hop2=4,
                       active=8, max_pivots=48)
    model, hist = train_lgcn(x_tr, ids_tr, y_tr, cfg, progress=False)
    again, hist2 = train_lgcn(x_tr, ids_tr, y_tr, cfg, progress=False)
    assert [h["loss"] for h in hist] == [h["loss"] for h in hist2]
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert len(hist) == 2 and hist[0]["pivots"] == 48 and not model.training
    other, hist3 = train_lgcn(x_tr, ids_tr, y_tr, TrainLConfig(**{**cfg.__dict__, "seed": 5}),
                              progress=False)
    assert not torch.equal(other.conv1.weight, model.conv1.weight)
    assert hist3[0]["loss"] != hist[0]["loss"]


def test_trained_model_beats_random_weights_on_held_out_identities(split):
    x_tr, ids_tr, y_tr, x_te, ids_te, y_te = split
    cfg = TrainLConfig(epochs=8, batch_size=8, seed=0, threads=1, dims=(64, 64, 32, 32),
                       hop1=19, hop2=5, active=8, max_pivots=None)
    model, hist = train_lgcn(x_tr, ids_tr, y_tr, cfg, progress=False)
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"] and hist[0]["pivots"] == len(x_tr)
    untrained = LGCN(32, cfg.dims)  # random weights, fresh batch-norm statistics
    _, p_rand, same = pivot_edges(untrained, x_te, ids_te, y_te, 19, 5, 8)
    _, p_fit, _ = pivot_edges(model, x_te, ids_te, y_te, 19, 5, 8)
    assert 0.5 < same.mean() < 0.85  # both classes well represented
    auc_rand, auc_fit = auc(p_rand, same), auc(p_fit, same)
    acc_rand = ((p_rand > 0.5) == same).mean()
    acc_fit = ((p_fit > 0.5) == same).mean()
    assert auc_fit > 0.92 and auc_fit > auc_rand + 0.2, (auc_rand, auc_fit)
    assert acc_fit > 0.85 and acc_fit > acc_rand + 0.1, (acc_rand, acc_fit)
