"""Size-constrained components (super-vertex proposals, L-GCN propagation): the vectorised
rounds equal a set-based BFS written as learn-to-cluster describes it, and the Ray rounds
equal both for any partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from ltc_ray.graph.constrained import constrained_components


def reference(n, src, dst, weight, max_size, step, max_rounds=100):
    """learn-to-cluster's loop with Python sets: BFS components, oversized ones stay,
    the cut rises from the smallest weight."""
    links = [dict() for _ in range(n)]
    for a, b, w in zip(src.tolist(), dst.tolist(), weight.tolist(), strict=True):
        if a != b:
            links[a][b] = max(w, links[a].get(b, -np.inf)) if b in links[a] else w
            links[b][a] = links[a][b]
    label = list(range(n))

    def components(nodes, th):
        seen, comps = set(), []
        for start in sorted(nodes):
            if start in seen:
                continue
            group, queue = {start}, [start]
            seen.add(start)
            while queue:
                u = queue.pop()
                for v, w in links[u].items():
                    if v in nodes and v not in seen and (th is None or w >= th):
                        seen.add(v)
                        group.add(v)
                        queue.append(v)
            comps.append(group)
        return comps

    remain, th, rounds = set(range(n)), None, 0
    cut = float(weight.min()) if len(weight) else 1.0
    while remain:
        big = set()
        last = rounds == max_rounds
        for group in components(remain, th):
            if len(group) <= max_size or last:
                for v in group:
                    label[v] = min(group)
            else:
                big |= group
        remain = big
        if remain:
            rounds += 1
            cut = cut + (1 - cut) * step
            th = cut
    return np.array(label), rounds


def random_graph(seed, n=300, e=900):
    rng = np.random.default_rng(seed)
    # clumps of dense edges plus random long edges: components that need re-cutting
    src = rng.integers(0, n, e)
    dst = np.where(rng.random(e) < 0.8, (src + rng.integers(1, 12, e)) % n,
                   rng.integers(0, n, e))
    weight = rng.random(e).astype(np.float32) * 0.6 + 0.4
    return n, src, dst, weight


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_size,step", [(10, 0.05), (40, 0.3), (3, 0.6)])
def test_rounds_equal_the_set_based_definition(seed, max_size, step):
    n, src, dst, weight = random_graph(seed)
    # the same undirected edge listed with two weights: the reference keeps the larger
    keep = src != dst
    src, dst, weight = src[keep], dst[keep], weight[keep]
    ours, rounds = constrained_components(n, src, dst, weight, max_size, step)
    # a pair listed twice: our edges pass a cut when either does, as does the max weight
    want, want_rounds = reference(n, src, dst, weight, max_size, step)
    np.testing.assert_array_equal(ours, want)
    assert rounds == want_rounds
    sizes = np.bincount(ours)
    assert sizes.max() <= max_size
    assert (ours <= np.arange(n)).all()  # the smallest member labels a component


def test_round_limit_keeps_the_last_components():
    # a clique tied at weight 1.0 can never be cut: after the limit it stays whole
    n = 6
    src, dst = np.triu_indices(n, 1)
    weight = np.ones(len(src), np.float32)
    label, rounds = constrained_components(n, src, dst, weight, 2, 0.5, max_rounds=3)
    assert rounds == 3
    assert (label == 0).all()
    want, _ = reference(n, src, dst, weight, 2, 0.5, max_rounds=3)
    np.testing.assert_array_equal(label, want)


def test_bad_constraints_are_refused():
    with pytest.raises(ValueError):
        constrained_components(3, np.array([0]), np.array([1]), np.array([0.5]), 0, 0.1)
    with pytest.raises(ValueError):
        constrained_components(3, np.array([0]), np.array([1]), np.array([0.5]), 2, 0.0)


@pytest.mark.parametrize("parts,local", [(1, 0), (3, 0), (4, 10**9), (7, 50)])
def test_ray_rounds_equal_single_process(ray_local, parts, local):
    import ray

    from ltc_ray.cluster.constrained import constrained_components_ray

    n, src, dst, weight = random_graph(5, n=400, e=1500)
    want, want_rounds = constrained_components(n, src, dst, weight, 12, 0.1)
    bounds = np.linspace(0, len(src), parts + 1).astype(int)
    edges = [ray.put((src[a:b].astype(np.int64), dst[a:b].astype(np.int64), weight[a:b]))
             for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    label, rounds = constrained_components_ray(n, edges, float(weight.min()), 12, 0.1,
                                               local_edges=local)
    np.testing.assert_array_equal(ray.get(label), want)
    assert rounds == want_rounds


def test_pooled_pairs_average_both_directions(ray_local):
    import ray

    from ltc_ray.cluster.constrained import pooled_pairs

    src = np.array([0, 1, 2, 5, 3], np.int64)
    dst = np.array([1, 0, 5, 2, 4], np.int64)
    w = np.array([0.2, 0.6, 0.9, 0.5, 0.3], np.float32)
    ranges = [(0, 3), (3, 6)]
    edges = [ray.put((src[:3], dst[:3], w[:3])), ray.put((src[3:], dst[3:], w[3:]))]
    refs, low = pooled_pairs(edges, ranges)
    got = [ray.get(r) for r in refs]
    pairs = {(int(a), int(b)): float(c) for lo, hi, ws in got
             for a, b, c in zip(lo, hi, ws, strict=True)}
    assert pairs == pytest.approx({(0, 1): 0.4, (2, 5): 0.7, (3, 4): 0.3})
    assert low == pytest.approx(0.3)
    # each pair lands with the owner of its smaller end
    assert set(map(tuple, np.c_[got[0][0], got[0][1]].tolist())) == {(0, 1), (2, 5)}
