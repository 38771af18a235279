"""PSE-GCN building blocks: subgraphs, model, batched embedding, hard-triplet loss, training."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from _data import random_knn, sphere_faces

from ltc_ray.knn import exact_knn
from ltc_ray.models.pse_gcn import (
    CUT,
    PSEGCN,
    bucket_sizes,
    dynamic_adjacency,
    embed_nodes,
    hard_triplet_loss,
    max_nodes,
    subgraph_batch,
    subgraph_nodes,
)
from ltc_ray.models.train_pse import TrainPSEConfig, train_pse_gcn


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: reproducible results, and the shared 2-core machine stays usable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# identities as Gaussian blobs on the sphere, noisy enough that kNN rows mix them
faces = functools.partial(sphere_faces, noise=1.0)


def server(ids, sims, allowed=None, calls=None):
    """``rows_of``-style callback over whole-graph rows; KeyError for ids outside ``allowed``
    (as a partition that did not fetch them), each call's ids recorded in ``calls``."""

    def rows_of(q):
        q = np.asarray(q)
        if calls is not None:
            calls.append(q.copy())
        if allowed is not None and not np.isin(q, list(allowed)).all():
            raise KeyError(f"not fetched: {sorted(set(q.tolist()) - set(allowed))[:5]}")
        return ids[q], sims[q]

    return rows_of


def feats_server(x, allowed=None):
    def feats_of(q):
        q = np.asarray(q)
        if allowed is not None and not np.isin(q, list(allowed)).all():
            raise KeyError("not fetched")
        return x[q]

    return feats_of


def firsts(ids, v, m):
    """Node v's first m neighbours: row columns 1..m, minus -1 and v itself."""
    return [int(j) for j in ids[v, 1 : 1 + m] if j >= 0 and j != v]


def nodes_by_sets(rerank, c, hop1, hop2):
    h1 = firsts(rerank, c, hop1)
    others = set(h1)
    for v in h1:
        others.update(firsts(rerank, v, hop2))
    others.discard(c)
    return [c, *sorted(others)]


def dense_adjacency(ids, sims, nodes, local_k):
    """The local adjacency the obvious way: loops over the subgraph's nodes."""
    where = {v: i for i, v in enumerate(nodes)}
    m = len(nodes)
    w = np.zeros((m, m))
    for v in nodes:
        for j in range(1, local_k + 1):
            u = int(ids[v, j])
            if u < 0 or u == v or u not in where:
                continue
            s = max(float(sims[v, j]), 0.0)
            a, b = where[v], where[u]
            w[a, b] = max(w[a, b], s)
            w[b, a] = max(w[b, a], s)
    np.fill_diagonal(w, 1.0)
    return w / w.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- subgraphs


def test_subgraph_nodes_match_set_construction():
    rng = np.random.default_rng(0)
    n = 80
    rerank, rsims = random_knn(n, 10, rng)
    rerank = rerank.astype(np.int64)
    rerank[5, 2] = 5  # a stray self entry is dropped
    hop1, hop2 = 6, 3
    centres = np.array([17, 5, 3, 17, 79, 40])  # a repeated centre is fine
    calls = []
    nodes, sizes = subgraph_nodes(centres, server(rerank, rsims, calls=calls), hop1, hop2)
    assert nodes.shape == (len(centres), max_nodes(hop1, hop2)) == (6, 25)
    assert nodes.dtype == np.int64 and sizes.dtype == np.int64
    assert len(calls) == 2 and all((np.diff(c) > 0).all() for c in calls)  # sorted unique
    for b, c in enumerate(centres):
        want = nodes_by_sets(rerank, int(c), hop1, hop2)
        assert sizes[b] == len(want)
        assert nodes[b, : sizes[b]].tolist() == want
        assert (nodes[b, sizes[b] :] == -1).all()
    assert sizes.max() > 15  # the second hop is used
    with pytest.raises(ValueError):
        subgraph_nodes(np.array([-1]), server(rerank, rsims), hop1, hop2)


def test_subgraph_batch_local_adjacency():
    """Node sets from the re-ranked graph, weights from the ORIGINAL graph's first local_k
    neighbours: max of both directions, negative sims -> 0, diagonal 1, row-normalised."""
    rng = np.random.default_rng(1)
    n, d = 60, 5
    knn, ksims = random_knn(n, 9, rng)  # negative sims and -1 slots
    rerank, rsims = random_knn(n, 8, rng)
    knn, rerank = knn.astype(np.int64), rerank.astype(np.int64)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    centres = np.array([2, 31, 59])
    nodes, sizes = subgraph_nodes(centres, server(rerank, rsims), 4, 2)
    local_k = 5
    width = int(sizes.max()) + 3  # extra padding columns are fine
    nodes = np.pad(nodes[:, : sizes.max()], ((0, 0), (0, 3)), constant_values=-1)
    x, adj, mask = subgraph_batch(nodes, feats_server(feats), server(knn, ksims), local_k)
    assert x.shape == (3, width, d) and adj.shape == (3, width, width)
    assert x.dtype == adj.dtype == np.float32 and mask.dtype == bool
    for b in range(3):
        m = int(sizes[b])
        real = nodes[b, :m].tolist()
        assert mask[b].sum() == m and mask[b, :m].all()
        np.testing.assert_array_equal(x[b, :m], feats[real])
        want = dense_adjacency(knn, ksims, real, local_k)
        np.testing.assert_allclose(adj[b, :m, :m], want, rtol=0, atol=1e-6)
        assert not x[b, m:].any() and not adj[b, m:].any() and not adj[b, :, m:].any()
        assert (adj[b, :m, :m] > 0).sum() > m  # some edges besides the diagonal
    with pytest.raises(ValueError, match="real ids first"):
        subgraph_batch(np.array([[3, -1, 4]]), feats_server(feats), server(knn, ksims))


def test_bucket_ladder():
    got = bucket_sizes(np.array([1, 8, 9, 12, 13, 17, 25, 33, 49, 100, 181]), 181)
    assert got.tolist() == [8, 8, 12, 12, 16, 24, 32, 48, 64, 128, 181]
    assert bucket_sizes(np.array([3, 7]), 7).tolist() == [7, 7]


# ---------------------------------------------------------------- model


def random_batch(b, s, d, seed, real=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, s, d, generator=g), dim=-1)
    adj = torch.rand(b, s, s, generator=g) ** 4
    mask = torch.zeros(b, s, dtype=torch.bool)
    for i, r in enumerate(real if real is not None else [s] * b):
        mask[i, :r] = True
    keep = mask[:, :, None] & mask[:, None, :]
    adj = torch.where(keep, adj, 0.0) + torch.diag_embed(mask.float())
    return x, adj / adj.sum(-1, keepdim=True).clamp(min=1e-12), mask


def eval_model(d, dims, seed, warm=None):
    """A random model in eval mode with non-trivial batch-norm statistics: perturbed, or
    (``warm`` = a batch) those of 30 training-mode forwards over it."""
    torch.manual_seed(seed)
    net = PSEGCN(d, dims)
    if warm is not None:
        with torch.no_grad():
            for _ in range(30):
                net(*warm)
        return net.eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_model_shapes_norms_and_padding():
    net = eval_model(12, (16, 24), seed=0)
    x, adj, mask = random_batch(3, 10, 12, seed=1, real=[10, 6, 1])
    out = net(x, adj, mask)
    assert out.shape == (3, 10, 24)
    np.testing.assert_allclose(out.norm(dim=-1)[mask].detach().numpy(), 1.0, atol=1e-5)
    # More padding, holding NaN and garbage adjacency: the real nodes do not notice.
    xp = torch.full((3, 16, 12), float("nan"))
    ap = torch.full((3, 16, 16), 3.0)
    mp = torch.zeros(3, 16, dtype=torch.bool)
    xp[:, :10], mp[:, :10] = x, mask
    ap[:, :10, :10] = torch.where(mask[:, :, None] & mask[:, None, :], adj, 5.0)
    outp = net(xp, ap, mp)
    assert torch.isfinite(outp).all()
    torch.testing.assert_close(outp[mp], out[mask], rtol=0, atol=1e-5)
    # widths and in_dim as the model store rebuilds them: cls(in_dim, dims)
    again = PSEGCN(net.in_dim, tuple(net.dims))
    again.load_state_dict(net.state_dict())
    torch.testing.assert_close(again.eval()(x, adj, mask), out)
    with pytest.raises(ValueError):
        PSEGCN(12, (16, 24, 8))
    with pytest.raises(ValueError):
        net(x[..., :11], adj, mask)


def test_embed_centres_equals_forward():
    net = eval_model(16, (32, 20), seed=2)
    x, adj, mask = random_batch(5, 24, 16, seed=3, real=[24, 17, 9, 2, 0])
    full = net(x, adj, mask)[:, 0]
    got = net.embed_centres(x, adj, mask)
    assert got.shape == (5, 20)
    torch.testing.assert_close(got[:4], full[:4], rtol=0, atol=1e-5)
    assert torch.isfinite(got).all()  # an empty subgraph gives a finite row


def test_dynamic_adjacency_reference_cut():
    # Structure features at known angles: cos 1, 0.6, 0.4, -0.2 to the first node.
    def unit(c):
        return [c, math.sqrt(1 - c * c)]

    s = torch.tensor([[unit(1.0), unit(0.6), unit(0.4), unit(-0.2)]])
    pair = torch.ones(1, 4, 4, dtype=torch.bool)
    pair[0, 3, :], pair[0, :, 3] = False, False
    a = dynamic_adjacency(s, s, pair)[0]
    cos = (s[0] @ s[0].T).numpy()
    w = np.where((cos >= CUT) & pair[0].numpy(), cos, 0.0)
    np.testing.assert_allclose(a.numpy(), w / (w.sum(1, keepdims=True) + 1e-5), atol=1e-6)
    assert a[0, 2] == 0 and a[0, 1] > 0 and not a[3].any() and not a[:, 3].any()
    # Inside the model: every kept entry of A1 and A2 is a cosine >= CUT, and some are cut.
    x, adj, mask = random_batch(4, 12, 8, seed=5, real=[12, 12, 7, 3])
    net = eval_model(8, (16, 8), seed=4, warm=(x, adj, mask))
    cut = 0
    for g in net.structure(x, adj, mask):
        g = g.detach()
        diag = torch.diagonal(g, dim1=1, dim2=2)
        assert (diag[mask] > 0).all() and not g[~mask].any() and not g[:, :, 12:].any()
        cos = g / diag[:, :, None].clamp(min=1e-12)  # A_ij / A_ii = cos_ij / cos_ii, cos_ii = 1
        kept = (g > 0) & mask[:, :, None]
        assert (cos[kept] >= CUT - 1e-4).all()
        pair = mask[:, :, None] & mask[:, None, :]
        cut += int((pair & (g == 0)).sum())
        sums = g.sum(-1)[mask]
        assert ((sums <= 1) & (sums > 0.99)).all()
    assert cut > 0


# ---------------------------------------------------------------- embedding


def test_embeddings_do_not_depend_on_batch_composition():
    x, labels = faces(10, 12, 16, seed=6)
    ids, sims = exact_knn(x, 10)
    ids = ids.astype(np.int64)
    rerank, rsims = ids.copy(), sims.copy()  # a stand-in re-ranked graph: reversed rows
    rerank[:, 1:], rsims[:, 1:] = ids[:, :0:-1], sims[:, :0:-1]
    net = eval_model(16, (16, 12), seed=7)
    hop1, hop2, local_k = 5, 3, 4
    n = len(x)
    rng = np.random.default_rng(0)
    centres = rng.permutation(n)[:70]
    # A partition that fetched only what its centres' subgraphs need (KeyError otherwise).
    nodes, sizes = subgraph_nodes(centres, server(rerank, rsims), hop1, hop2)
    members = set(nodes[nodes >= 0].tolist())
    hop1_nodes = {int(v) for c in centres for v in firsts(rerank, int(c), hop1)}
    fo = feats_server(x, members)
    ro = server(ids, sims, members)
    rr = server(rerank, rsims, set(centres.tolist()) | hop1_nodes)

    def run(c, batch_size=8):
        return embed_nodes(net, c, fo, ro, rr, hop1, hop2, local_k, batch_size=batch_size)

    full = run(centres)
    assert full.shape == (70, 12) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    perm = rng.permutation(70)
    split = np.zeros_like(full)
    split[perm[:23]] = run(centres[perm[:23]])
    split[perm[23:][::-1]] = run(centres[perm[23:][::-1]])
    np.testing.assert_allclose(split, full, rtol=0, atol=1e-6)
    # Each row is the model's forward on that centre's own unpadded subgraph.
    for i in (0, 33, 69):
        m = int(sizes[i])
        xb, adj, mask = subgraph_batch(nodes[i : i + 1, :m], fo, ro, local_k)
        want = net(torch.from_numpy(xb), torch.from_numpy(adj), torch.from_numpy(mask))[0, 0]
        np.testing.assert_allclose(full[i], want.detach().numpy(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- loss


def test_hard_triplet_loss_by_hand():
    r3 = math.sqrt(3) / 2
    emb = torch.zeros(2, 4, 2)
    emb[0] = torch.tensor([[1.0, 0.0], [0.5, r3], [0.0, 1.0], [-1.0, 0.0]])
    emb[1] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, -1.0]])
    labels = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    emb.requires_grad_(True)
    loss = hard_triplet_loss(emb, labels, mask)
    # Subgraph 0: cos(0,1) = 0.5, cos(0,2) = 0, cos(1,2) = r3; slot 3 is padding (else it
    # would be node 2's hardest positive at cos 0). Subgraph 1 has one label among its real
    # nodes: no anchor (its padded slot's label 0 and node 2 of subgraph 0 do not count).
    # anchor 0: p 0.5, n 0;  anchor 1: p 0.5, n r3;  anchor 2: p 1 (itself), n r3
    t1 = [max(0, 0 - 0.5 + 0.8), max(0, r3 - 0.5 + 0.8), max(0, r3 - 1 + 0.8)]
    t2 = [0.0, r3 - 0.1, r3 - 0.1]
    t3 = [0.4, 0.4, 0.0]
    want = sum(t1) / 3 + sum(t2) / 3 + sum(t3) / 3
    assert abs(float(loss.detach()) - want) < 1e-6
    loss.backward()
    assert emb.grad[0, :3].abs().sum() > 0 and not emb.grad[1].any()
    alone = hard_triplet_loss(emb[1:], labels[1:], mask[1:])
    assert float(alone.detach()) == 0.0 and alone.requires_grad


# ---------------------------------------------------------------- training


def separation(emb, labels):
    """Mean same-label minus mean different-label cosine, and 1-NN label accuracy."""
    cos = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    np.fill_diagonal(cos, -np.inf)
    nn_acc = float((labels[cos.argmax(axis=1)] == labels).mean())
    cos[~off] = 0
    return cos[same & off].mean() - cos[~same].mean(), nn_acc


def test_training_separates_held_out_identities():
    x, labels = faces(60, 10, 24, seed=8, noise=1.6)
    ids, sims = exact_knn(x, 12)
    train = labels < 40  # identities 40..59 are held out
    tr = np.flatnonzero(train)
    remap = np.full(len(x), -1)
    remap[tr] = np.arange(len(tr))
    tids, tsims = exact_knn(x[tr], 12)
    cfg = TrainPSEConfig(steps=80, batch_size=8, hidden=32, out_dim=32, hop1=6, hop2=3, fill=0,
                         local_k=5, lr=0.05)
    model, hist = train_pse_gcn(x[tr], tids, tsims, tids, tsims, labels[tr], cfg)
    assert not model.training and len(hist) == 2  # 80 steps over passes of 50 batches
    assert [h["steps"] for h in hist] == [50, 30] and hist[-1]["lr"] == pytest.approx(5e-5)
    assert all(math.isfinite(h["loss"]) and 0 <= h["separated"] <= 1 for h in hist)
    random_model, none = train_pse_gcn(x[tr], tids, tsims, tids, tsims, labels[tr],
                                       TrainPSEConfig(steps=0, hidden=32, out_dim=32))
    assert none == []
    held = np.flatnonzero(~train)
    ro = server(ids, sims)
    fo = feats_server(x)

    def embed(net):
        return embed_nodes(net, held, fo, ro, ro, 6, 3, 5, batch_size=16)

    gap_t, acc_t = separation(embed(model), labels[held])
    gap_r, acc_r = separation(embed(random_model), labels[held])
    gap_x, acc_x = separation(x[held], labels[held])
    print(f"gap/1-NN: trained {gap_t:.3f}/{acc_t:.3f} random {gap_r:.3f}/{acc_r:.3f} "
          f"features {gap_x:.3f}/{acc_x:.3f}")
    assert gap_t > gap_r + 0.1
    assert acc_t > acc_r + 0.05


def test_training_is_seeded_and_checks_inputs():
    x, labels = faces(8, 6, 8, seed=9)
    ids, sims = exact_knn(x, 6)
    cfg = TrainPSEConfig(epochs=1, batch_size=16, hidden=8, out_dim=8, hop1=3, hop2=2,
                         local_k=3)
    a, ha = train_pse_gcn(x, ids, sims, ids, sims, labels, cfg)
    b, hb = train_pse_gcn(x, ids, sims, ids, sims, labels, cfg)
    assert len(ha) == 1 and ha[0]["steps"] == 3 and ha[0]["centres"] == 48
    assert ha[0]["loss"] == hb[0]["loss"]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError):
        train_pse_gcn(x, ids, sims, ids[:5], sims[:5], labels, cfg)
    with pytest.raises(ValueError):
        TrainPSEConfig(hop1=0)


def test_training_fill_draws_other_near_identities_once():
    """The reference's fill: members of the identities nearest the centre's, never the
    centre's own, never a node already in the subgraph, never twice."""
    from ltc_ray.models.train_pse import NearestClassFill, _with_fill

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 8))
    labels = np.repeat(np.arange(6), 20)
    x = (centres[labels] + 0.1 * rng.standard_normal((120, 8))).astype(np.float32)
    fill = NearestClassFill(x, labels, classes=2)
    means = np.stack([x[labels == c].mean(0) for c in range(6)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    cos = means @ means.T
    np.fill_diagonal(cos, -np.inf)
    nearest = np.argsort(-cos, axis=1)[:, :2]
    drawn = fill.draw(np.arange(0, 120, 20), 30, rng)
    for row, c in zip(drawn, range(6), strict=True):
        assert set(labels[row]) <= set(nearest[c]) and c not in set(labels[row])
    block = np.array([[0, 1, 2, -1], [20, -1, -1, -1]])
    out = _with_fill(block, np.array([[1, 40, 40, -1], [21, 22, 20, 21]]))
    np.testing.assert_array_equal(out, [[0, 1, 2, 40, -1, -1, -1, -1],
                                        [20, 21, 22, -1, -1, -1, -1, -1]])
