"""The distributed map equation (issue 20, ltc_ray/graph/map_equation.py): one piece equals
one Infomap call, labels do not depend on workers or packing, trivial components skip
Infomap, oversized components are split deterministically and stay close to whole-component
Infomap, and bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from ltc_ray.graph import map_equation as me
from ltc_ray.metrics.scores import pairwise_prf


def planted(groups: int, size: int, k: int, noise: float, seed: int, offset: int = 0,
            w_in=(0.4, 0.9), w_out=(0.2, 0.6)):
    """kNN-like planted partition: each node draws ``k`` neighbours, a fraction ``noise`` of
    them anywhere (weaker weights), the rest in its own group. ``(src, dst, weight, truth)``
    over nodes ``offset ..``, ids shuffled so groups are not id ranges."""
    rng = np.random.default_rng(seed)
    n = groups * size
    src = np.repeat(np.arange(n), k)
    same = rng.random(n * k) >= noise
    dst = np.where(same, (src // size) * size + rng.integers(0, size, n * k),
                   rng.integers(0, n, n * k))
    w = np.where(same, rng.uniform(*w_in, n * k), rng.uniform(*w_out, n * k))
    perm = rng.permutation(n)
    truth = np.empty(n, np.int64)
    truth[perm] = np.arange(n) // size
    return perm[src] + offset, perm[dst] + offset, w, truth


def direct_infomap(n: int, src, dst, w, seed: int = 0, trials: int = 1) -> np.ndarray:
    """One public ``infomap.Infomap`` call on the whole graph, as the ``infomap`` baseline
    makes it (each undirected link once, max weight, same flags)."""
    from infomap import Infomap

    u, v, ww = me._canonical_edges(n, src, dst, w)
    im = Infomap(me.infomap_args(seed, trials))
    im.add_links(np.column_stack([u, v, ww]).astype(np.float64))
    modules = im.run().modules()
    labels = np.arange(n, dtype=np.int64) + n
    labels[list(modules)] = list(modules.values())
    return labels


def same_partition(a, b) -> bool:
    pairs = np.unique(np.stack([a, b]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def many_components(seed: int = 0):
    """Clusters of 1-3 planted groups (weak links join some groups), 2-node components and
    isolated nodes, ids interleaved: ``(n, src, dst, w)``."""
    rng = np.random.default_rng(seed)
    parts, offset = [], 0
    for c in range(40):
        groups = 1 + c % 3
        s, d, w, _ = planted(groups, 12 + c % 7, 5, 0.0, seed + c, offset, w_in=(0.5, 1.0))
        if groups > 1:  # a few weak links between this component's groups
            size = 12 + c % 7
            a = offset + rng.integers(0, size, 3)
            b = offset + size + rng.integers(0, size * (groups - 1), 3)
            s, d, w = np.r_[s, a], np.r_[d, b], np.r_[w, np.full(3, 0.05)]
        parts.append((s, d, w))
        offset += groups * (12 + c % 7)
    pairs = offset + np.arange(0, 30, 2)  # 15 two-node components
    parts.append((pairs, pairs + 1, rng.uniform(0.3, 0.9, len(pairs))))
    n = offset + 30 + 25  # and 25 isolated nodes
    perm = rng.permutation(n)
    src = np.concatenate([p[0] for p in parts])
    dst = np.concatenate([p[1] for p in parts])
    w = np.concatenate([p[2] for p in parts])
    return n, perm[src], perm[dst], w


def test_one_piece_equals_one_infomap_call():
    n = 1500
    src, dst, w, truth = planted(30, 50, 8, 0.3, seed=1)
    # both directions, repeats and a self loop: the graph is still the same
    src2, dst2, w2 = np.r_[src, dst, 7], np.r_[dst, src, 7], np.r_[w, w * 0.5, 1.0]
    plan = me.connected_pieces(n, src2, dst2, w2)
    assert len(plan.pieces) == 1 and plan.n_units == 1 and not plan.oversized
    for seed, trials in ((0, 1), (3, 2)):
        labels = me.map_equation_labels(n, src2, dst2, w2, seed=seed, trials=trials)
        assert same_partition(labels, direct_infomap(n, src, dst, w, seed, trials))
        # dense ids numbered by smallest member
        _, first = np.unique(labels, return_index=True)
        assert np.array_equal(labels[np.sort(first)], np.arange(labels.max() + 1))
    assert pairwise_prf(truth, labels)[2] > 0.95  # and the partition is the planted one


def test_self_links_add_their_weight_once_to_a_node_flow():
    """What the super-graph's self-links rely on (undirected model); and the engine call of
    run_piece equals the public Infomap facade with self-links."""
    from infomap import Infomap

    links = np.array([[0, 1, 1.0], [1, 2, 1.0], [0, 0, 2.0]])
    im = Infomap(me.infomap_args(0, 1))
    im.add_links(links)
    flow = {node.node_id: node.flow for node in im.run().nodes(states=True)}
    assert flow == pytest.approx({0: 3 / 6, 1: 2 / 6, 2: 1 / 6})

    src, dst, w, _ = planted(8, 20, 6, 0.3, seed=5)
    u, v, ww = me._canonical_edges(160, src, dst, w)
    loops = np.random.default_rng(0).uniform(0.0, 3.0, 160)
    piece = me._whole_piece(160, u, v, ww, loops)
    im = Infomap(me.infomap_args(2, 1))
    im.add_links(np.r_[np.column_stack([u, v, ww]),
                       np.column_stack([np.arange(160), np.arange(160), loops])])
    modules = im.run().modules()
    fast = me.run_piece(piece, seed=2)
    assert same_partition(fast, [modules[i] for i in range(160)])
    saved = list(me._ENGINE)
    try:  # the facade path, taken when an infomap version lays its engine out differently
        me._ENGINE[:] = [None]
        assert np.array_equal(me.run_piece(piece, seed=2), fast)
    finally:
        me._ENGINE[:] = saved


def test_labels_do_not_depend_on_workers_or_packing(ray_local):
    n, src, dst, w = many_components()
    ref = me.map_equation_labels(n, src, dst, w, seed=4)
    plan = me.connected_pieces(n, src, dst, w, max_piece_edges=300, max_piece_nodes=100)
    assert len(plan.pieces) > 5 and not plan.oversized
    for kwargs in ({"max_piece_edges": 300, "max_piece_nodes": 100},
                   {"max_piece_edges": 1000, "max_piece_nodes": 60, "pack_edges": 150}):
        assert np.array_equal(me.map_equation_labels(n, src, dst, w, seed=4, **kwargs), ref)
        before = me.INFOMAP_CALLS
        assert np.array_equal(
            me.map_equation_labels(n, src, dst, w, seed=4, workers=2, **kwargs), ref)
        assert me.INFOMAP_CALLS == before  # every Infomap call ran in a Ray task
    # a component on its own gets the same modules
    graph = sp.coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
    comp = connected_components(graph, directed=False)[1]
    biggest = np.argmax(np.bincount(comp))
    one = comp[src] == biggest
    mine = np.flatnonzero(comp == biggest)
    alone = me.map_equation_labels(n, src[one], dst[one], w[one], seed=4)
    assert len(np.unique(ref[mine])) > 1 and same_partition(alone[mine], ref[mine])


def test_isolated_nodes_and_pairs_skip_infomap():
    n, src, dst, w = many_components()
    graph = sp.coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
    sizes = np.bincount(connected_components(graph, directed=False)[1])
    plan = me.connected_pieces(n, src, dst, w)
    assert len(plan.singletons) == 25 and len(plan.pairs) == 15
    assert plan.n_units == (sizes >= 3).sum() >= 40
    before = me.INFOMAP_CALLS
    labels = me.map_equation_labels(n, src, dst, w)
    assert me.INFOMAP_CALLS - before == plan.n_units  # none for the 40 trivial components
    sizes = np.bincount(labels)
    assert np.array_equal(np.sort(labels[plan.pairs], axis=1)[:, 0], labels[plan.pairs[:, 1]])
    assert (sizes[labels[plan.singletons]] == 1).all()
    assert (sizes[labels[plan.pairs[:, 0]]] == 2).all()

    before = me.INFOMAP_CALLS  # only trivial components: no Infomap at all
    labels = me.map_equation_labels(6, [0, 3], [1, 2], [0.5, 0.7])
    assert me.INFOMAP_CALLS == before
    assert labels.tolist() == [0, 0, 1, 1, 2, 3]


def test_oversized_component_is_split_deterministically_and_close(ray_local):
    n = 3000
    src, dst, w, truth = planted(60, 50, 8, 0.3, seed=2)
    budget = {"max_piece_nodes": 400, "max_piece_edges": 100_000}
    plan = me.connected_pieces(n, src, dst, w, **budget)
    assert len(plan.oversized) == 1 and plan.oversized[0].n_nodes == n and not plan.pieces
    whole = direct_infomap(n, src, dst, w)
    before = me.INFOMAP_CALLS
    split = me.map_equation_labels(n, src, dst, w, **budget)
    assert me.INFOMAP_CALLS - before > 10  # blocks and super-graphs, not one call
    assert np.array_equal(me.map_equation_labels(n, src, dst, w, **budget), split)
    before = me.INFOMAP_CALLS
    assert np.array_equal(me.map_equation_labels(n, src, dst, w, workers=2, **budget), split)
    assert me.INFOMAP_CALLS == before  # the blocks and super-graphs ran in Ray tasks
    f_whole = pairwise_prf(whole, split)[2]
    one_pass = pairwise_prf(whole, me.map_equation_labels(n, src, dst, w, split_passes=1,
                                                          **budget))[2]
    print(f"pairwise F against whole-component Infomap: {f_whole:.4f} (1 pass {one_pass:.4f}); "
          f"whole vs truth {pairwise_prf(truth, whole)[2]:.4f}")
    assert f_whole >= 0.95 and f_whole >= one_pass


def test_a_budget_too_small_to_contract_falls_back_to_a_whole_run(caplog):
    src, dst, w, _ = planted(10, 20, 6, 0.2, seed=1)
    with caplog.at_level("WARNING", logger="ltc_ray"):
        labels = me.map_equation_labels(200, src, dst, w, max_piece_nodes=3)
    assert "did not shrink" in caplog.text
    assert np.array_equal(me.map_equation_labels(200, src, dst, w, max_piece_nodes=3), labels)
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))


def test_bad_input_is_refused_and_an_empty_graph_is_all_singletons():
    ok = (np.array([0, 1]), np.array([1, 2]), np.array([0.5, 0.5]))
    cases = [
        ((3, ok[0], ok[1][:1], ok[2]), "same length"),
        ((3, ok[0], np.array([1, 3]), ok[2]), r"lie in \[0, 3\)"),
        ((3, np.array([-1, 1]), ok[1], ok[2]), r"lie in \[0, 3\)"),
        ((3, ok[0], ok[1], np.array([0.5, -0.1])), ">= 0"),
        ((3, ok[0], ok[1], np.array([np.nan, 0.5])), "NaN"),
        ((3, ok[0].astype(float), ok[1], ok[2]), "integers"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            me.map_equation_labels(*args)
    with pytest.raises(ValueError, match="max_piece_nodes"):
        me.connected_pieces(3, *ok, max_piece_nodes=1)
    assert me.map_equation_labels(4, [], [], []).tolist() == [0, 1, 2, 3]
    assert me.map_equation_labels(0, [], [], []).tolist() == []
    # zero weights and self loops are no edges
    assert me.map_equation_labels(3, [0, 1], [1, 1], [0.0, 2.0]).tolist() == [0, 1, 2]


def test_piece_memory_estimate_grows_with_nodes_and_edges():
    small, more_nodes = me.piece_memory_bytes(1000, 10_000), me.piece_memory_bytes(2000, 10_000)
    assert 0 < small < more_nodes < me.piece_memory_bytes(2000, 20_000)
    # the default budget fits a few GB (the module's measured constants)
    assert 1 << 30 < me.piece_memory_bytes(me.DEFAULT_MAX_PIECE_NODES,
                                           me.DEFAULT_MAX_PIECE_EDGES) < 4 << 30
