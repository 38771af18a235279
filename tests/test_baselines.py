"""Whole-graph unsupervised baselines (issue 7): each method's own semantics, checked
against a direct implementation on tiny graphs. Blob recovery, partition invariance and
determinism are in the registry-parametrized tests (test_cluster.py, test_determinism.py)."""

from __future__ import annotations

import numpy as np
import pytest
from _data import blobs
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from ltc_ray.cluster import REGISTRY, get_method
from ltc_ray.cluster.aro import rank_order_distances
from ltc_ray.cluster.whole_graph import (
    WholeGraphMethod,
    components,
    knn_edges,
    labels_to_clusters,
    row_argmax,
)
from ltc_ray.config import Config, KnnConfig
from ltc_ray.graph.similarity_stats import graph_stats
from ltc_ray.knn import exact_knn

BASELINES = ("infomap", "chinese-whispers", "knn-dbscan", "cdp", "hac", "kmeans")


def _method(name: str, k: int, seed: int = 0, graph=None, **params):
    """The method with ``params`` set; its remaining ``auto`` params derived on ``graph``
    (ids, sims) when given, as the job derives them."""
    cfg = Config(method=name, knn=KnnConfig(k=k), seed=seed)
    for key, value in params.items():
        setattr(cfg.methods.of(name), key, value)
    method = get_method(name, cfg)
    if graph is not None:
        method, _ = method.resolved(graph_stats(*graph))
    return method


SEPARATING = {"infomap": {"threshold": 0.6}, "chinese-whispers": {"threshold": 0.6},
              "knn-dbscan": {"eps": 0.4}, "cdp": {"threshold": 0.6, "max_size": 60},
              "hac": {"threshold": 0.4}, "kmeans": {"threshold": 0.6}}


def _same_partition(a, b):
    pairs = np.unique(np.stack([a, b]), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))


def _graph(x, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return exact_knn(x.astype(np.float32), k)


def test_baselines_are_whole_graph_methods_with_a_tunable():
    """Every baseline has a tunable threshold; all but Infomap run the whole graph in one
    task (Infomap runs per component in parallel pieces: tests/test_map_equation_method.py)."""
    for name in BASELINES:
        cls = REGISTRY[name]
        if name == "infomap":
            assert cls.shape.link == "stage" and callable(cls.cluster_graph)
        else:
            assert issubclass(cls, WholeGraphMethod) and cls.shape.link == "whole-graph"
        assert cls.shape.tunable is not None and hasattr(
            Config().methods.of(name), cls.shape.tunable.param
        )


def test_labels_to_clusters_parent_is_the_representative():
    labels = np.array([7, 7, 3, 7, 3, 9])
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.6, 0.3], np.float32)
    cid, sizes, reps, parent = labels_to_clusters(labels, scores)
    np.testing.assert_array_equal(cid, [0, 0, 1, 0, 1, 2])
    np.testing.assert_array_equal(sizes, [3, 2, 1])
    np.testing.assert_array_equal(reps, [1, 4, 5])
    np.testing.assert_array_equal(parent, [1, -1, 4, 1, -1, -1])


def test_row_argmax_breaks_ties_to_the_smallest_column():
    import scipy.sparse as sp

    m = sp.csr_matrix(np.array([[0, 2, 2, 1], [0, 0, 0, 0], [3, 0, 0, 3]], np.float32))
    rows, col, val = row_argmax(m)
    np.testing.assert_array_equal(rows, [0, 2])
    np.testing.assert_array_equal(col, [1, 0])
    np.testing.assert_array_equal(val, [2, 3])


@pytest.mark.parametrize("name", BASELINES)
def test_seed_does_not_change_separated_blobs(name):
    x, labels = blobs(n_per=25, n_clusters=8, dim=32, spread=0.3, seed=5)
    ids, sims = _graph(x, 30)
    xn = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def run(seed):
        # each method's own semantics at a cut that separates these blobs (the ``auto``
        # rules are test_auto.py's subject)
        method = _method(name, 30, seed=seed, graph=(ids, sims), **SEPARATING[name])
        # kmeans reads the features too
        return method.cluster_graph(ids, sims,
                                    xn if method.shape.whole_graph_features else None)

    runs = [run(s) for s in (0, 1, 0)]
    assert _same_partition(runs[0], labels)
    assert _same_partition(runs[1], labels)
    np.testing.assert_array_equal(runs[0], runs[2])  # same seed, identical labels


def test_hac_equals_sequential_average_linkage():
    """Reciprocal rounds on the sparse graph == scipy's sequential average linkage on the
    dense similarity with missing pairs at 0, cut at the same average similarity."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 8)).astype(np.float32)
    ids, sims = _graph(x, 12)
    n = len(ids)
    dense = np.zeros((n, n))
    rows = np.repeat(np.arange(n), 11)
    dense[rows, ids[:, 1:].ravel()] = sims[:, 1:].ravel()
    dense = np.maximum(dense, dense.T)
    for threshold in (0.2, 0.35, 0.5):
        got = _method("hac", 12, threshold=threshold).cluster_graph(ids, sims)
        dist = 1.0 - dense
        np.fill_diagonal(dist, 0.0)
        ref = fcluster(
            linkage(squareform(dist, checks=False), "average"),
            1.0 - threshold,
            criterion="distance",
        )
        assert _same_partition(got, ref), threshold
        assert 1 < len(np.unique(got)) < n


def test_cdp_raises_the_threshold_only_for_oversized_components():
    x, labels = blobs(n_per=40, n_clusters=6, dim=32, spread=0.8, seed=2)
    ids, sims = _graph(x, 20)
    loose = _method("cdp", 20, threshold=0.1, max_size=10_000, step=0.05).cluster_graph(ids, sims)
    assert len(np.unique(loose)) < 6  # a low threshold chains blobs together...
    capped = _method("cdp", 20, threshold=0.1, max_size=40, step=0.05).cluster_graph(ids, sims)
    assert np.bincount(capped).max() <= 40  # ...which the raise cuts to size
    assert len(np.unique(capped)) >= 6
    # without oversized components CDP is thresholded connected components
    cc = components(len(ids), *knn_edges(ids, sims, 0.1)[:2])
    np.testing.assert_array_equal(loose, cc)
    # components that already fit keep their labels: cut only the oversized ones
    fit = np.bincount(loose)[loose] <= 40
    assert _same_partition(loose[fit], capped[fit])


def test_knn_dbscan_core_border_and_noise():
    # rows: self at rank 0; 0-3 a tight group, 4 near 3 only, 5 alone
    ids = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 0, 4], [4, 3, 5], [5, 4, 3]])
    sims = np.array(
        [
            [1, 0.95, 0.9],
            [1, 0.95, 0.9],
            [1, 0.95, 0.9],
            [1, 0.9, 0.8],
            [1, 0.9, 0.1],
            [1, 0.1, 0.05],
        ],
        np.float32,
    )
    labels = _method("knn-dbscan", 3, eps=0.15, min_samples=3).cluster_graph(ids, sims)
    # 0, 1, 2 are core (self + 2 within eps); 3 (self + 0) is a border of core 0; 4 is
    # within eps of 3 only, which is not core -> noise, like 5 (nothing within eps)
    assert labels[0] == labels[1] == labels[2] == labels[3]
    assert len({labels[0], labels[4], labels[5]}) == 3


def test_rank_order_distance_matches_the_formula():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    ids, _ = _graph(x, 8)
    m = 8
    src, dst, dist = rank_order_distances(ids, m)
    lists = [list(row) for row in ids]

    def d(a, b, upto):
        return sum(1 for i in range(upto + 1) if lists[a][i] not in lists[b])

    for a, b, got in list(zip(src, dst, dist, strict=True))[::7]:
        o_ab = lists[a].index(b)
        o_ba = lists[b].index(a) if a in lists[b] else m
        want = (d(a, b, o_ab) + d(b, a, min(o_ba, m - 1))) / min(o_ab, o_ba)
        assert got == pytest.approx(want), (a, b)


def test_chinese_whispers_and_infomap_respect_the_threshold():
    x, _ = blobs(n_per=20, n_clusters=5, dim=32, spread=0.3, seed=4)
    ids, sims = _graph(x, 15)
    for name in ("chinese-whispers", "infomap"):
        none = _method(name, 15, threshold=0.9999).cluster_graph(ids, sims)
        assert len(np.unique(none)) == len(ids)  # no edge survives: all singletons


def test_kmeans_refines_graph_components_and_fixed_k_is_seeded():
    """K and the first centroids come from the kNN components at ``threshold``: touching
    blobs that one component joins stay one cluster, and a threshold that splits them
    gives the blobs back. With ``n_clusters`` fixed, the random init is seeded."""
    x, labels = blobs(40, 6, 24, spread=0.5, seed=11)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids, sims = exact_knn(x, 30)
    split = _method("kmeans", 30, threshold=0.6).cluster_graph(ids, sims, x)
    assert _same_partition(split, labels)
    wide_ids, wide_sims = exact_knn(x, 60)  # rows reach into other blobs
    one = _method("kmeans", 60, threshold=-1.0).cluster_graph(wide_ids, wide_sims, x)
    assert len(np.unique(one)) == 1  # every kNN edge kept: one component, K = 1
    fixed = [_method("kmeans", 30, seed=s, n_clusters=6, nredo=5).cluster_graph(ids, sims, x)
             for s in (0, 0, 3)]
    assert np.array_equal(fixed[0], fixed[1])
    assert len(np.unique(fixed[2])) == 6
