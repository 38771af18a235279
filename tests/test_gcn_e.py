"""GCN-E building blocks: candidates, subgraphs, model, parent choice, training, store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _data import blobs, random_knn

from ltc_ray.errors import InputError
from ltc_ray.graph.adjacency import whole_graph_adjacency
from ltc_ray.knn import exact_knn
from ltc_ray.models.gcn_e import (
    GCNE,
    candidate_scores,
    candidate_table,
    choose_parents,
    confidence_quantile,
    subgraph_batch,
)
from ltc_ray.models.store import load_gcn_e, load_model, save_gcn_e
from ltc_ray.models.train_e import TrainEConfig, train_gcn_e

SMALL = (24, 24, 16, 16)


def random_graph(n: int, k: int, d: int, seed: int, levels: int = 6):
    """A random asymmetric kNN graph (self first, sims descending, some negative, a few -1
    slots), unit features and confidences with many ties (``levels`` distinct values)."""
    rng = np.random.default_rng(seed)
    ids, sims = random_knn(n, k, rng, low=-0.3)
    ids = ids.astype(np.int64)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    conf = rng.integers(0, levels, size=n).astype(np.float32) / levels
    return ids, sims, feats, conf


def serve(ids, sims, feats):
    """``feats_of``/``rows_of`` over whole-graph arrays (what a partition serves from its halo)."""
    return (lambda q: feats[q]), (lambda q: (ids[q], sims[q]))


def nbr_conf(ids, conf):
    return conf[np.where(ids >= 0, ids, 0)]


def outranks(conf, j, i):
    return conf[j] > conf[i] or (conf[j] == conf[i] and j < i)


# ---------------------------------------------------------------- candidates


def test_candidate_table_matches_loop():
    ids, _, _, conf = random_graph(50, 12, 4, seed=0, levels=3)
    nodes = np.arange(50)
    cand, count = candidate_table(nodes, ids, conf, nbr_conf(ids, conf))
    want = [[j for j in row if j >= 0 and outranks(conf, j, i)] for i, row in enumerate(ids)]
    assert cand.shape == (50, max(map(len, want))) and cand.dtype == np.int64
    for i, w in enumerate(want):
        assert count[i] == len(w)
        assert cand[i, : len(w)].tolist() == w and np.all(cand[i, len(w) :] == -1)
    assert any(len(w) == 0 for w in want) and any(len(w) > 3 for w in want)

    capped, ccount = candidate_table(nodes, ids, conf, nbr_conf(ids, conf), max_candidates=3)
    assert capped.shape == (50, 3)
    assert np.array_equal(ccount, np.minimum(count, 3))
    assert np.array_equal(capped, np.where(np.arange(3) < ccount[:, None], cand[:, :3], -1))

    sub = np.arange(7, 50, 5)  # any subset of rows gives the same rows
    s_cand, s_count = candidate_table(sub, ids[sub], conf[sub], nbr_conf(ids, conf)[sub])
    assert np.array_equal(s_count, count[sub])
    assert np.array_equal(s_cand, cand[sub, : s_cand.shape[1]])


def test_confidence_quantile():
    conf = np.random.default_rng(1).random(1000).astype(np.float32)
    for rho in (0.1, 0.2, 0.3333, 0.9):
        q = confidence_quantile(conf, rho)
        assert int(np.sum(conf >= q)) == round(rho * 1000)
    assert confidence_quantile(conf, 0.0) == np.inf
    assert confidence_quantile(conf, 1.0) == -np.inf
    with pytest.raises(ValueError):
        confidence_quantile(conf, 1.5)


# ---------------------------------------------------------------- subgraphs


def dense_subgraph(cand_i, ids, sims):
    """The restricted adjacency of one candidate list by its definition (float64)."""
    m = len(cand_i)
    s = np.zeros((m, m))
    for a, j in enumerate(cand_i):
        for l_id, v in zip(ids[j], sims[j], strict=True):
            if l_id >= 0 and l_id != j and v >= 0 and l_id in cand_i:
                c = cand_i.index(l_id)
                s[a, c] = max(s[a, c], v)
    a_mat = np.maximum(s, s.T) + np.eye(m)
    return a_mat / a_mat.sum(axis=1, keepdims=True)


def test_subgraph_batch_matches_dense_definition():
    ids, sims, feats, conf = random_graph(80, 30, 8, seed=2)
    centres = np.array([3, 10, 11, 40, 41, 79])
    cand, count = candidate_table(
        centres, ids[centres], conf[centres], nbr_conf(ids, conf)[centres]
    )
    feats_of, rows_of = serve(ids, sims, feats)
    requested: list[np.ndarray] = []

    def rows_logged(q):
        requested.append(np.asarray(q))
        return rows_of(q)

    x, adj, mask = subgraph_batch(cand, count, feats[centres], feats_of, rows_logged)
    s = cand.shape[1]
    assert x.shape == (6, s, 8) and adj.shape == (6, s, s) and mask.shape == (6, s)
    assert x.dtype == adj.dtype == np.float32 and count.min() == 0 and count.max() > 10
    # only the candidates' own rows are needed (the 2-hop neighbourhood of the centres)
    assert set(np.concatenate(requested).tolist()) == set(cand[cand >= 0].tolist())
    whole = whole_graph_adjacency(ids, sims).toarray()
    for b, i in enumerate(centres):
        m = int(count[b])
        c_i = cand[b, :m].tolist()
        assert mask[b].tolist() == [True] * m + [False] * (s - m)
        np.testing.assert_array_equal(x[b, :m], feats[c_i] - feats[i])
        assert np.all(x[b, m:] == 0) and np.all(adj[b, m:] == 0) and np.all(adj[b, :, m:] == 0)
        if m == 0:
            continue
        np.testing.assert_allclose(adj[b, :m, :m], dense_subgraph(c_i, ids, sims), atol=1e-6)
        np.testing.assert_allclose(adj[b, :m].sum(axis=1), 1.0, atol=1e-6)
        # restricting the globally normalised Â and re-normalising gives the same matrix
        restricted = whole[np.ix_(c_i, c_i)]
        restricted /= restricted.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(adj[b, :m, :m], restricted, atol=1e-6)
        assert m < 5 or np.count_nonzero(adj[b, :m, :m]) > m  # candidates are linked

    # huge global ids (binary search instead of a lookup table) give the same batch
    big = np.arange(80, dtype=np.int64) * 1_000_003 + 2**40
    big_ids = np.where(ids >= 0, big[np.maximum(ids, 0)], -1)
    big_feats = {int(g): f for g, f in zip(big, feats, strict=True)}
    big_rows = {int(g): i for i, g in enumerate(big)}
    xb, adjb, maskb = subgraph_batch(
        np.where(cand >= 0, big[np.maximum(cand, 0)], -1), count, feats[centres],
        lambda q: np.stack([big_feats[int(g)] for g in q]),
        lambda q: (big_ids[[big_rows[int(g)] for g in q]], sims[[big_rows[int(g)] for g in q]]),
    )  # fmt: skip
    assert np.array_equal(xb, x) and np.array_equal(adjb, adj) and np.array_equal(maskb, mask)

    # a hand-made case: 1 <-> 2 both negative (dropped), 3 <-> 4 both ways (max), 1 -> 3 one
    # way, 2 -> 2 a self entry (dropped), 4 -> -1 an empty slot
    h_ids = np.array([[0, 1, 2, 3], [1, 2, 3, 0], [2, 1, 2, 0], [3, 4, 0, 1], [4, 3, -1, 0]])
    h_sims = np.array(
        [[1, 0.9, 0.8, 0.7], [1, -0.5, 0.4, 0.1], [1, -0.2, 0.9, 0.1], [1, 0.7, 0.2, -0.1],
         [1, 0.3, -np.inf, 0.2]], dtype=np.float32,
    )  # fmt: skip
    h_feats = np.eye(5, 3, dtype=np.float32)
    hx, hadj, hmask = subgraph_batch(
        np.array([[1, 2, 3, 4]]), np.array([4]), h_feats[:1], *serve(h_ids, h_sims, h_feats)
    )
    want = np.array([[1, 0, 0.4, 0], [0, 1, 0, 0], [0.4, 0, 1, 0.7], [0, 0, 0.7, 1]])
    np.testing.assert_allclose(hadj[0], want / want.sum(axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(hx[0], h_feats[1:] - h_feats[0])

    # centres without candidates give an all-padding subgraph
    x0, adj0, mask0 = subgraph_batch(
        np.full((2, 3), -1), np.zeros(2, dtype=np.int64), feats[:2], feats_of, rows_of
    )
    assert not mask0.any() and not x0.any() and not adj0.any()


# ---------------------------------------------------------------- model


def test_graph_conv_layer_matches_definition():
    torch.manual_seed(0)
    model = GCNE(8, SMALL)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 5, 8))
    adj = rng.random((3, 5, 5))
    adj /= adj.sum(axis=2, keepdims=True)
    w = model.conv1.weight.detach().double().numpy()
    bias = model.conv1.bias.detach().double().numpy()
    want = np.maximum(np.concatenate([x, adj @ x], axis=2) @ w + bias, 0)
    got = model.conv1(torch.from_numpy(x).float(), torch.from_numpy(adj).float())
    assert got.shape == (3, 5, SMALL[0])
    np.testing.assert_allclose(got.detach().numpy(), want, atol=1e-5)
    names = {name.split(".")[0] for name in model.state_dict()}
    assert names == {"conv1", "conv2", "conv3", "conv4", "classifier"}  # learn-to-cluster names


def test_gcne_padding_does_not_change_real_outputs():
    torch.manual_seed(0)
    model = GCNE(8, SMALL).eval()
    ids, sims, feats, conf = random_graph(60, 20, 8, seed=3)
    centres = np.arange(60)
    cand, count = candidate_table(centres, ids, conf, nbr_conf(ids, conf))
    keep = count >= 2
    x, adj, mask = subgraph_batch(cand[keep], count[keep], feats[keep], *serve(ids, sims, feats))
    b, s, _ = x.shape
    with torch.no_grad():
        out = model(torch.from_numpy(x), torch.from_numpy(adj), torch.from_numpy(mask))
        # 7 more slots holding garbage (NaN features, random edges) stay outside real slots
        xp = np.full((b, s + 7, 8), np.nan, dtype=np.float32)
        ap = np.random.default_rng(4).random((b, s + 7, s + 7)).astype(np.float32)
        xp[:, :s] = np.where(mask[..., None], x, np.nan)
        ap[:, :s, :s] = adj
        mp = np.zeros((b, s + 7), dtype=bool)
        mp[:, :s] = mask
        outp = model(torch.from_numpy(xp), torch.from_numpy(ap), torch.from_numpy(mp))
    real = torch.from_numpy(mask)
    assert out.shape == (b, s, 2)
    torch.testing.assert_close(outp[:, :s][real], out[real], rtol=0, atol=1e-6)
    assert torch.isfinite(out[real]).all()
    torch.testing.assert_close(out[real].exp().sum(-1), torch.ones(int(real.sum())))
    assert (out[real] <= 0).all()

    # the aggregation does couple real slots: changing one candidate moves another's output
    x2 = x.copy()
    x2[0, 1] += 1.0
    with torch.no_grad():
        out2 = model(torch.from_numpy(x2), torch.from_numpy(adj), torch.from_numpy(mask))
    linked = np.flatnonzero(adj[0, :, 1] > 0)
    linked = linked[(linked != 1) & mask[0, linked]]
    assert len(linked) and not torch.allclose(out2[0, linked], out[0, linked])
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, 9), torch.zeros(1, 3, 3), torch.ones(1, 3, dtype=torch.bool))


# ---------------------------------------------------------------- parents


@pytest.fixture(scope="module")
def parent_case():
    ids, sims, feats, conf = random_graph(300, 40, 8, seed=5, levels=20)
    torch.manual_seed(1)
    model = GCNE(8, SMALL).eval()
    use = conf >= confidence_quantile(conf, 0.5)
    return model, ids, sims, feats, conf, use


def _parents(case, nodes, batch_size=256):
    model, ids, sims, feats, conf, use = case
    return choose_parents(
        model, nodes, conf[nodes], ids[nodes], sims[nodes], nbr_conf(ids, conf)[nodes],
        use[nodes], *serve(ids, sims, feats), batch_size=batch_size,
    )  # fmt: skip


def test_choose_parents_rules_and_forest(parent_case):
    model, ids, sims, feats, conf, use = parent_case
    n = len(ids)
    nodes = np.arange(n)
    parent = _parents(parent_case, nodes)
    cand, count = candidate_table(nodes, ids, conf, nbr_conf(ids, conf))
    assert parent.dtype == np.int64 and parent.shape == (n,)
    ran = use & (count > 1)
    assert ran.sum() > 20 and (~ran & (count > 1)).sum() > 20 and (count == 0).sum() >= 1
    for i in range(n):
        higher = [j for j in ids[i] if j >= 0 and outranks(conf, j, i)]
        if not higher:
            assert parent[i] == -1
            continue
        assert parent[i] in higher and outranks(conf, parent[i], i)
        if not ran[i]:
            assert parent[i] == higher[0]  # the nearest higher-ranked neighbour
    # model nodes: the chosen candidate has the best score of an unpadded one-node forward
    feats_of, rows_of = serve(ids, sims, feats)
    for i in np.flatnonzero(ran):
        m = int(count[i])
        x, adj, mask = subgraph_batch(cand[i : i + 1, :m], count[i : i + 1], feats[i : i + 1],
                                      feats_of, rows_of)  # fmt: skip
        with torch.no_grad():
            p = model(torch.from_numpy(x), torch.from_numpy(adj), torch.from_numpy(mask))[0, :, 1]
        chosen = cand[i, :m].tolist().index(parent[i])
        assert p[chosen] >= p.max() - 1e-5
    assert (parent[ran] != cand[ran, 0]).any()  # the model does not just pick the nearest
    # the links form a forest: pointer jumping reaches a root from every node
    root = np.where(parent >= 0, parent, nodes)
    for _ in range(n):
        root = root[root]
    assert np.all(parent[root] == -1)


def test_choose_parents_independent_of_batch_and_node_set(parent_case):
    model, ids, sims, feats, conf, use = parent_case
    nodes = np.arange(len(ids))
    full = _parents(parent_case, nodes)
    for batch in (1, 3, 17):
        assert np.array_equal(_parents(parent_case, nodes, batch_size=batch), full)
    for part in (nodes[::3], nodes[1::3][::-1], nodes[150:]):
        assert np.array_equal(_parents(parent_case, part, batch_size=5), full[part])
    # with at most one candidate kept, every node takes its nearest higher-ranked neighbour
    one = choose_parents(
        model, nodes, conf, ids, sims, nbr_conf(ids, conf), use, *serve(ids, sims, feats),
        max_candidates=1,
    )  # fmt: skip
    cand, count = candidate_table(nodes, ids, conf, nbr_conf(ids, conf))
    assert np.array_equal(one, np.where(count > 0, cand[:, 0], -1))

    # the scores themselves are bitwise the same whatever the batch or the other centres
    feats_of, rows_of = serve(ids, sims, feats)
    scores = candidate_scores(model, nodes, cand, count, feats_of, rows_of)
    assert np.all(np.isfinite(scores) == (np.arange(cand.shape[1]) < count[:, None]))
    for batch, part in ((1, nodes), (7, nodes[::2]), (64, nodes[::-1][:100])):
        got = candidate_scores(model, part, cand[part], count[part], feats_of, rows_of, batch)
        assert np.array_equal(got, scores[part]), batch


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def train_case():
    """Overlapping blobs: GCN-V-like features = the unit inputs, conf = a kNN density."""
    x, labels = blobs(40, 10, 16, spread=1.5, seed=6)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids, sims = exact_knn(x, 20)
    conf = sims[:, 1:].mean(axis=1).astype(np.float32)
    return x, conf, ids.astype(np.int64), sims, labels


def test_training_lowers_the_loss_and_picks_better_parents(train_case):
    x, conf, ids, sims, labels = train_case
    dims = (32, 32, 16, 16)
    cfg = TrainEConfig(epochs=12, batch_size=16, ignore_ratio=0.3, dims=dims, lr=1e-2)
    model, hist = train_gcn_e(x, conf, ids, sims, labels, cfg, progress=False)
    assert [h["epoch"] for h in hist] == list(range(1, 13))
    assert all(set(h) == {"epoch", "loss", "accuracy", "seconds"} for h in hist)
    assert hist[-1]["loss"] < 0.9 * hist[0]["loss"]
    assert hist[-1]["accuracy"] > hist[0]["accuracy"] and not model.training
    init, none = train_gcn_e(x, conf, ids, sims, labels, TrainEConfig(epochs=0, dims=dims))
    assert none == []

    # on the top 30%, the trained model links to same-identity candidates more often than an
    # untrained one and than the nearest-higher rule it replaces
    nodes = np.arange(len(x))
    use = conf >= confidence_quantile(conf, 0.3)
    cand, count = candidate_table(nodes, ids, conf, conf[ids])
    ran = use & (count > 1)

    def purity(m):
        parent = choose_parents(m, nodes, conf, ids, sims, conf[ids], use, *serve(ids, sims, x))
        return float(np.mean(labels[parent[ran]] == labels[ran]))

    nearest = float(np.mean(labels[cand[ran, 0]] == labels[ran]))
    assert ran.sum() > 50
    assert purity(model) > purity(init) + 0.1 and purity(model) > nearest


def test_seeded_training_is_reproducible(train_case):
    x, conf, ids, sims, labels = train_case
    rng_before = torch.get_rng_state()
    cfg = TrainEConfig(epochs=2, batch_size=8, ignore_ratio=0.5, dims=SMALL, seed=3)
    a, ha = train_gcn_e(x, conf, ids, sims, labels, cfg, progress=False)
    b, hb = train_gcn_e(x, conf, ids, sims, labels, cfg, progress=False)
    cfg.seed = 4
    c, _ = train_gcn_e(x, conf, ids, sims, labels, cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[name], sb[name]) for name in sa)
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert not all(torch.equal(sa[name], sc[name]) for name in sa)
    with pytest.raises(ValueError):
        TrainEConfig(ignore_ratio=1.0)
    with pytest.raises(ValueError):
        train_gcn_e(x, conf[:-1], ids, sims, labels, cfg, progress=False)


# ---------------------------------------------------------------- store


def test_store_round_trip_and_refusals(tmp_path, parent_case):
    model = parent_case[0]
    uri = str(tmp_path / "gcne")
    save_gcn_e(uri, model, {"k": 40, "thresholds": {"tau": 0.8, "rho": 0.2}})
    loaded, meta = load_gcn_e(uri, expected_dim=8, expected_k=40)
    assert meta["method"] == "gcn-e" and meta["dims"] == list(SMALL) and meta["in_dim"] == 8
    assert not loaded.training
    assert all(torch.equal(t, loaded.state_dict()[n]) for n, t in model.state_dict().items())
    save_gcn_e("memory://models/gcne", model, {"k": 40})
    mem, _ = load_gcn_e("memory://models/gcne")
    assert np.array_equal(_parents((mem, *parent_case[1:]), np.arange(300)),
                          _parents(parent_case, np.arange(300)))  # fmt: skip

    with pytest.raises(InputError, match="trained for dim 8, the features have 512"):
        load_gcn_e(uri, expected_dim=512)
    with pytest.raises(InputError, match="k=40.*k=160"):
        load_gcn_e(uri, expected_k=160)
    with pytest.raises(InputError, match="'gcn-e' model, expected 'gcn-v'"):
        load_model(uri)
    with pytest.raises(ValueError, match="kNN size k"):
        save_gcn_e(str(tmp_path / "nok"), model, {})

    meta_path = tmp_path / "gcne" / "model.json"
    record = json.loads(meta_path.read_text())
    record["dims"] = [24, 24, 16, 32]
    meta_path.write_text(json.dumps(record))
    with pytest.raises(InputError, match="weights do not fit gcn-e.*wrong shapes"):
        load_gcn_e(uri)
    record["dims"] = [24, 24]
    meta_path.write_text(json.dumps(record))
    with pytest.raises(InputError, match="dims must be 4 positive ints"):
        load_gcn_e(uri)


def test_identity_folds_keep_identities_together_and_are_seeded():
    from ltc_ray.models.crossfit import identity_folds

    labels = np.repeat(np.arange(40), np.arange(1, 41))
    folds = identity_folds(labels, 2, seed=0)
    for ident in np.unique(labels):
        assert len(np.unique(folds[labels == ident])) == 1
    per_fold_ids = [len(np.unique(labels[folds == f])) for f in (0, 1)]
    assert per_fold_ids == [20, 20]
    assert np.array_equal(folds, identity_folds(labels, 2, seed=0))
    assert not np.array_equal(folds, identity_folds(labels, 2, seed=1))
    with pytest.raises(ValueError):
        identity_folds(np.zeros(5), 2, seed=0)


def test_out_of_fold_outputs_never_see_the_held_out_fold():
    """Each fold's confidences and features come from a GCN-V that never saw it: relabelling
    the samples of fold 0 (a label permutation inside the fold) changes nothing in fold 0's
    outputs, while fold 1's (whose model trained on fold 0) do change. The folds' graphs
    never cross and every row is one training sample."""
    from ltc_ray.models.crossfit import identity_folds, out_of_fold_gcn_v
    from ltc_ray.models.train import TrainConfig

    x, labels = blobs(30, 8, 16, spread=1.4, seed=2)
    cfg = TrainConfig(hidden=16, epochs=5, seed=0, threads=1)
    a = out_of_fold_gcn_v(x, labels, cfg, k=10, edge_k=15)
    n = len(labels)
    assert np.array_equal(np.sort(a.order), np.arange(n))
    assert np.array_equal(a.labels, labels[a.order])
    assert a.knn_ids.shape == (n, 15) and a.hidden.shape == (n, 16)
    assert np.allclose(np.linalg.norm(a.hidden, axis=1), 1.0, atol=1e-5)
    assert np.all(a.fold[a.knn_ids] == a.fold[:, None])  # no neighbour across folds
    assert np.array_equal(a.knn_ids[:, 0], np.arange(n))  # self first

    fold = identity_folds(labels, 2, cfg.seed)
    relabelled = labels.copy()
    in0 = fold == 0
    ids0 = np.unique(labels[in0])
    relabelled[in0] = np.roll(ids0, 1)[np.searchsorted(ids0, labels[in0])]
    b = out_of_fold_gcn_v(x, relabelled, cfg, k=10, edge_k=15)
    rows0 = a.fold == 0
    assert np.array_equal(a.confidence[rows0], b.confidence[rows0])
    assert np.array_equal(a.hidden[rows0], b.hidden[rows0])
    # a real permutation of fold 0's identities keeps the target the same, so move one
    # sample between identities to make fold 1's model see different labels
    moved = relabelled.copy()
    first, second = np.flatnonzero(in0)[:2]
    moved[first] = labels[second] if labels[second] != relabelled[first] else ids0[-1]
    c = out_of_fold_gcn_v(x, moved, cfg, k=10, edge_k=15)
    assert np.array_equal(a.confidence[rows0], c.confidence[rows0])
    assert not np.array_equal(a.confidence[~rows0], c.confidence[~rows0])
