"""GCN-D / GCN-S: proposal batches, targets, seeds, batch invariance, training, determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from ltc_ray.models.gcn_ds import (
    GCND,
    GCNS,
    proposal_batch,
    proposal_targets,
    score_proposals,
    seed_positions,
    segment_proposals,
    segment_targets,
)
from ltc_ray.models.train_ds import TrainDConfig, TrainSConfig, train_gcn_d, train_gcn_s

SMALL = (64, 32)
K = 10


def synthetic(seed: int = 0, n_id: int = 40, per: int = 15, d: int = 32):
    """40 identities x 15 samples around random unit centres (L2-normalised, 32-d), exact kNN
    (k = 10, self first) and proposals: connected components of kNN edges above 0.7 and 0.8,
    plus 500 random subsets of one identity, half of them joined with 3-10 members of another
    (so some are pure, some mixed). Returns feats, labels, knn ids/sims, offsets, members."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_id, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_id), per)
    x = centres[labels] + 0.6 * rng.standard_normal((len(labels), d)) / np.sqrt(d)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    n = len(x)
    sims = x @ x.T
    np.fill_diagonal(sims, 2.0)  # self first
    knn = np.argsort(-sims, axis=1, kind="stable")[:, :K]
    knn_sims = np.take_along_axis(sims, knn, 1).astype(np.float32)
    knn_sims[:, 0] = 1.0
    props = []
    for th in (0.7, 0.8):
        r, c = np.nonzero((knn_sims >= th) & (np.arange(K) > 0))
        graph = sp.coo_matrix((np.ones(len(r)), (r, knn[r, c])), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        props += [
            m
            for m in np.split(np.argsort(comp, kind="stable"), np.cumsum(np.bincount(comp))[:-1])
            if 2 <= len(m) <= 60
        ]
    for _ in range(500):
        a, b = rng.choice(n_id, 2, replace=False)
        ma = rng.choice(np.flatnonzero(labels == a), rng.integers(3, per + 1), replace=False)
        n_b = rng.integers(3, 11) if rng.random() < 0.5 else 0
        mb = rng.choice(np.flatnonzero(labels == b), n_b, replace=False)
        props.append(np.r_[ma, mb])
    props = [np.unique(p) for p in props]
    offsets = np.r_[0, np.cumsum([len(p) for p in props])].astype(np.int64)
    return x, labels, knn.astype(np.int64), knn_sims, offsets, np.concatenate(props)


@pytest.fixture(scope="module")
def data():
    x, labels, knn, knn_sims, offsets, members = synthetic()
    return {
        "x": x,
        "labels": labels,
        "knn": knn,
        "offsets": offsets,
        "members": members,
        "feats_of": lambda q: x[q],
        "rows_of": lambda q: (knn[q], knn_sims[q]),
    }


def proposals(d):
    return [d["members"][a:b] for a, b in zip(d["offsets"][:-1], d["offsets"][1:], strict=True)]


def subset(d, idx):
    """The CSR of proposals ``idx`` only."""
    props = proposals(d)
    chosen = [props[i] for i in idx]
    offsets = np.r_[0, np.cumsum([len(p) for p in chosen])].astype(np.int64)
    return offsets, np.concatenate(chosen)


def loop_graph(p, knn, adj_k):
    """Set-based adjacency of proposal p: in-proposal kNN edges, symmetrised, + I."""
    where = {int(v): i for i, v in enumerate(p)}
    a = np.eye(len(p))
    for i, v in enumerate(p):
        for u in knn[v, :adj_k]:
            if int(u) in where and u != v:
                a[i, where[int(u)]] = a[where[int(u)], i] = 1.0
    return a


def split(d, seed=1):
    n = len(d["offsets"]) - 1
    perm = np.random.default_rng(seed).permutation(n)
    return subset(d, np.sort(perm[: n // 2])), subset(d, np.sort(perm[n // 2 :]))


# ---------------------------------------------------------------- targets


def test_proposal_targets_match_loop(data):
    labels = data["labels"]
    props = proposals(data)
    assert len(props) > 500
    sizes = Counter(labels.tolist())
    iou = proposal_targets(data["offsets"], data["members"], labels, "iou")
    iop = proposal_targets(data["offsets"], data["members"], labels, "iop")
    assert iou.dtype == np.float32 and iou.shape == (len(props),)
    for i in list(range(0, len(props), 37)) + [len(props) - 1]:
        count = Counter(labels[props[i]].tolist())
        best = min(count, key=lambda lab: (-count[lab], lab))
        inter = count[best]
        assert iop[i] == pytest.approx(inter / len(props[i]), abs=1e-6)
        assert iou[i] == pytest.approx(inter / (len(props[i]) + sizes[best] - inter), abs=1e-6)
    # the data hold pure, mixed and partial proposals
    assert (iop == 1).any() and (iop < 0.75).sum() > 50 and ((iou < 1) & (iop == 1)).any()

    # ties go to the smallest label; labels need not be 0..L-1 (-1 is a label too)
    lab = np.array([7, 7, 3, 3, -1, 9, 9, 9, 3])  # sample 8 is in no proposal
    t = proposal_targets(np.array([0, 4, 8]), np.arange(8), lab, "iou")
    # 7 and 3 tie in the first proposal: label 3 (|G| = 3) wins, not 7 (|G| = 2 -> 2/4)
    assert t.tolist() == pytest.approx([2 / 5, 3 / 4])
    assert proposal_targets(np.array([0, 4, 8]), np.arange(8), lab, "iop").tolist() == [0.5, 0.75]
    with pytest.raises(ValueError, match="kind"):
        proposal_targets(np.array([0, 4, 8]), np.arange(8), lab, "f1")
    with pytest.raises(ValueError, match="sorted"):
        proposal_targets(np.array([0, 2]), np.array([3, 1]), lab, "iou")


def test_segment_targets_match_loop(data):
    labels, props = data["labels"], proposals(data)
    seeds = np.random.default_rng(3).integers(0, [len(p) for p in props])
    got = segment_targets(data["offsets"], data["members"], labels, seeds)
    want = np.concatenate([labels[p] == labels[p[s]] for p, s in zip(props, seeds, strict=True)])
    assert got.dtype == np.int64 and np.array_equal(got, want.astype(np.int64))
    assert 0 < got.mean() < 1
    with pytest.raises(ValueError, match="seed_pos"):
        segment_targets(data["offsets"], data["members"], labels, seeds + 100)


# ---------------------------------------------------------------- batches and seeds


def test_proposal_batch_matches_loop(data):
    props, knn, x = proposals(data), data["knn"], data["x"]
    idx = np.array([5, 0, len(props) - 1, 60, 61])
    calls = []

    def rows_of(q):
        calls.append("rows")
        return data["rows_of"](q)

    def feats_of(q):
        calls.append("feats")
        return x[q]

    seed = np.array([0, 1, 2, 0, 1])
    for adj_k, sp_ in ((K, None), (4, seed)):
        calls.clear()
        xb, adj, mask = proposal_batch(
            data["offsets"], data["members"], idx, feats_of, rows_of, adj_k, sp_, slot_block=8
        )
        assert sorted(calls) == ["feats", "rows"]  # one call each per batch
        s = -(-max(len(props[i]) for i in idx) // 8) * 8
        assert xb.shape == (5, s, 32 + (sp_ is not None)) and adj.shape == (5, s, s)
        for row, i in enumerate(idx):
            p = props[i]
            n = len(p)
            assert mask[row].tolist() == [True] * n + [False] * (s - n)
            a = loop_graph(p, knn, adj_k)
            np.testing.assert_allclose(adj[row, :n, :n], a / a.sum(1, keepdims=True), rtol=1e-6)
            np.testing.assert_array_equal(xb[row, :n, :32], x[p])
            assert not xb[row, n:].any() and not adj[row, n:].any() and not adj[row, :, n:].any()
            if sp_ is not None:
                assert xb[row, :, 32].tolist() == [float(j == sp_[row]) for j in range(s)]
    # the truncated graph has fewer edges
    assert (adj > 0).sum() < (
        proposal_batch(data["offsets"], data["members"], idx, feats_of, rows_of, K)[1] > 0
    ).sum()
    bad = data["members"].copy()
    a, b = data["offsets"][5], data["offsets"][6]
    bad[a:b] = bad[a:b][::-1]
    with pytest.raises(ValueError, match="sorted"):
        proposal_batch(data["offsets"], bad, [5], feats_of, rows_of, K)


def test_seed_positions_match_loop(data):
    props, knn = proposals(data), data["knn"]
    seeds = seed_positions(data["offsets"], data["members"], data["rows_of"], K)
    assert seeds.dtype == np.int64 and seeds.shape == (len(props),)
    for i in range(0, len(props), 11):
        degree = loop_graph(props[i], knn, K).sum(1)
        assert seeds[i] == int(np.argmax(degree))  # first of the best-connected
    assert (seeds > 0).any()


# ---------------------------------------------------------------- models


def test_padding_never_reaches_real_slots():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for model, in_dim in ((GCND(8, (16, 8)), 8), (GCNS(9, (16, 8)), 9)):
        model.eval()
        x = torch.from_numpy(rng.standard_normal((3, 8, in_dim)).astype(np.float32))
        adj = torch.from_numpy(rng.random((3, 8, 8)).astype(np.float32))
        mask = torch.from_numpy(np.arange(8)[None, :] < np.array([[8], [3], [5]]))
        dirty_x, dirty_adj = x.clone(), adj.clone()
        dirty_x[~mask] = float("nan")
        dirty_adj[1, :, 3:] = float("nan")
        dirty_adj[2, 6:, :] = 1e6
        clean_x = torch.where(mask.unsqueeze(-1), x, 0.0)
        out = model(dirty_x, dirty_adj, mask)
        ref = model(clean_x, torch.where(mask.unsqueeze(1) & mask.unsqueeze(2), adj, 0.0), mask)
        if out.ndim == 3:
            out, ref = out[mask], ref[mask]
        assert torch.isfinite(out).all() and torch.equal(out, ref)


def test_score_and_segment_are_batch_invariant(data):
    torch.manual_seed(0)
    d_model, s_model = GCND(32, SMALL), GCNS(33, SMALL)
    fo, ro = data["feats_of"], data["rows_of"]
    sizes = np.diff(data["offsets"])
    small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
    off, mem = subset(data, np.r_[small, big, 0:100:3, 500:560])  # all sizes, fewer forwards
    sizes = np.diff(off)
    small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
    score = score_proposals(d_model, off, mem, fo, ro, K, batch_size=256)
    keep = segment_proposals(s_model, off, mem, fo, ro, K, batch_size=256)
    assert score.shape == (len(off) - 1,) and keep.shape == mem.shape
    # bitwise the same in other batch sizes and alone
    assert np.array_equal(score, score_proposals(d_model, off, mem, fo, ro, K, batch_size=5))
    assert np.array_equal(keep, segment_proposals(s_model, off, mem, fo, ro, K, batch_size=3))
    for i in (small, big, 40):
        o1, m1 = off[i : i + 2] - off[i], mem[off[i] : off[i + 1]]
        assert np.array_equal(score_proposals(d_model, o1, m1, fo, ro, K, 1), score[[i]])
        np.testing.assert_array_equal(
            segment_proposals(s_model, o1, m1, fo, ro, K, 1), keep[off[i] : off[i + 1]]
        )
    # the seed keeps itself; probabilities in [0, 1]
    seeds = seed_positions(off, mem, ro, K)
    assert np.all(keep[off[:-1] + seeds] == 1.0) and (keep >= 0).all() and (keep <= 1).all()
    assert (keep < 1).any()

    # the raw forward: alone (own padding) vs padded to the largest proposal of a batch
    for model, seed in ((d_model, None), (s_model, seeds)):
        idx = np.array([small, big, 7])
        sp_ = None if seed is None else seed[idx]
        batch = [torch.from_numpy(a) for a in proposal_batch(off, mem, idx, fo, ro, K, sp_)]
        alone = [
            torch.from_numpy(a)
            for a in proposal_batch(off, mem, idx[:1], fo, ro, K, None if sp_ is None else sp_[:1])
        ]
        assert batch[0].shape[1] > alone[0].shape[1]
        with torch.no_grad():
            model.eval()
            got, want = model(*batch)[0], model(*alone)[0]
        if got.ndim == 2:
            n = sizes[small]
            got, want = got[:n], want[:n]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- training


def test_trained_gcn_d_beats_random_weights(data):
    (otr, mtr), (ote, mte) = split(data)
    fo, ro, labels = data["feats_of"], data["rows_of"], data["labels"]
    target = proposal_targets(ote, mte, labels, "iop")
    cfg = TrainDConfig(epochs=30, lr=3e-3, batch_size=32, dims=SMALL, target="iop", threads=1)
    model, history = train_gcn_d(otr, mtr, fo, ro, labels, cfg, adj_k=K, progress=False)
    assert len(history) == 30 and history[-1]["loss"] < history[0]["loss"] * 0.7
    assert not model.training
    trained = score_proposals(model, ote, mte, fo, ro, K)
    untrained = score_proposals(GCND(32, SMALL), ote, mte, fo, ro, K)
    r_trained = np.corrcoef(trained, target)[0, 1]
    r_untrained = np.corrcoef(untrained, target)[0, 1]
    constant = proposal_targets(otr, mtr, labels, "iop").mean()  # the best constant guess
    assert r_trained > 0.5 and r_trained > r_untrained + 0.3, (r_trained, r_untrained)
    assert np.mean((trained - target) ** 2) < 0.85 * np.mean((constant - target) ** 2)


def test_trained_gcn_s_beats_random_weights(data):
    (otr, mtr), (ote, mte) = split(data)
    fo, ro, labels = data["feats_of"], data["rows_of"], data["labels"]
    target = segment_targets(ote, mte, labels, seed_positions(ote, mte, ro, K))
    cfg = TrainSConfig(epochs=30, lr=3e-3, batch_size=32, dims=SMALL, threads=1)
    model, history = train_gcn_s(otr, mtr, fo, ro, labels, cfg, adj_k=K, progress=False)
    assert history[-1]["accuracy"] > history[0]["accuracy"]
    acc = np.mean((segment_proposals(model, ote, mte, fo, ro, K) > 0.5) == target)
    torch.manual_seed(1)
    acc0 = np.mean((segment_proposals(GCNS(33, SMALL), ote, mte, fo, ro, K) > 0.5) == target)
    majority = max(target.mean(), 1 - target.mean())
    assert acc > 0.9 and acc > max(acc0, majority) + 0.1, (acc, acc0, majority)


def test_training_is_deterministic(data):
    fo, ro, labels = data["feats_of"], data["rows_of"], data["labels"]
    off, mem = data["offsets"], data["members"]

    def weights(train, cfg):
        before = torch.random.get_rng_state()
        model, history = train(off, mem, fo, ro, labels, cfg, adj_k=K, progress=False)
        assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
        return model.state_dict(), history

    for train, config in ((train_gcn_d, TrainDConfig), (train_gcn_s, TrainSConfig)):
        cfg = config(epochs=2, batch_size=16, max_slots=256, dims=(16, 8), threads=1, seed=4)
        (a, ha), (b, hb) = weights(train, cfg), weights(train, cfg)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
        cfg.seed = 5
        c, _ = weights(train, cfg)
        assert not all(torch.equal(a[k], c[k]) for k in a)


def test_configs_are_validated():
    assert TrainDConfig(dims=[8, 4]).dims == (8, 4)
    for bad in (
        {"epochs": -1},
        {"lr": 0},
        {"batch_size": 0},
        {"dims": ()},
        {"dropout": 1.0},
        {"max_slots": 0},
        {"threads": -1},
    ):
        with pytest.raises(ValueError):
            TrainDConfig(**bad)
        with pytest.raises(ValueError):
            TrainSConfig(**bad)
    with pytest.raises(ValueError):
        TrainDConfig(target="f1")
    with pytest.raises(ValueError):
        GCND(0)
