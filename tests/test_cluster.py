"""Global merge and the clustering methods (every registered method gets the same checks)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from _data import blobs, write_bin
from scipy.sparse.csgraph import connected_components

from ltc_ray.cluster import (
    REGISTRY,
    PartitionInput,
    dense_cluster_ids,
    get_method,
    merge_edges,
    representatives,
    spanning_forest,
)
from ltc_ray.cluster.base import higher_ranked
from ltc_ray.cluster.whole_graph import labels_to_clusters
from ltc_ray.config import ClusterConfig, Config, KnnConfig
from ltc_ray.errors import InputError
from ltc_ray.io.features import inspect_features
from ltc_ray.knn import exact_knn
from ltc_ray.metrics import pairwise_prf
from ltc_ray.pipeline.cluster_stage import partition_ranges
from ltc_ray.pipeline.executor import Run
from ltc_ray.pipeline.knn_stage import build_knn_graph
from ltc_ray.runtime import ray_get


def _scipy_labels(n, src, dst):
    g = sp.coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
    return connected_components(g, directed=True, connection="weak")[1]


def _same_partition(a, b):
    """Two labelings describe the same partition of the samples."""
    pairs = np.unique(np.stack([a, b]), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("seed", range(5))
def test_forest_merge_equals_single_scipy_pass(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    src, dst = rng.integers(0, n, 1500), rng.integers(0, n, 1500)
    local, sizes, _ = merge_edges(n, [(src, dst)])
    assert _same_partition(local, _scipy_labels(n, src, dst))
    chunks = np.array_split(np.arange(len(src)), 7)
    forests = [spanning_forest(src[c], dst[c]) for c in chunks]
    assert sum(len(f[0]) for f in forests) <= 2 * len(src)
    forest, forest_sizes, _ = merge_edges(n, forests)
    np.testing.assert_array_equal(local, forest)  # identical ids, not just the same partition
    np.testing.assert_array_equal(sizes, forest_sizes)
    # the dense path over global ids (no sort; taken with n_nodes <= 4 x edges, as here)
    # gives the same forest as the compacting one
    assert n <= 4 * len(src)
    for got, want in zip(spanning_forest(src, dst, n_nodes=n), spanning_forest(src, dst),
                         strict=True):
        np.testing.assert_array_equal(got, want)


def test_spanning_forest_has_one_edge_per_non_root_node():
    src = np.array([5, 6, 7, 100, 100])
    dst = np.array([6, 7, 5, 101, 102])
    child, root = spanning_forest(src, dst)
    assert sorted(child.tolist()) == [6, 7, 101, 102]
    assert dict(zip(child.tolist(), root.tolist(), strict=True)) == {6: 5, 7: 5, 101: 100, 102: 100}


def test_dense_ids_order_by_size_then_smallest_member():
    component = np.array([9, 9, 4, 4, 7, 7, 7, 1])
    cid, sizes, first = dense_cluster_ids(component)
    np.testing.assert_array_equal(sizes, [3, 2, 2, 1])
    np.testing.assert_array_equal(cid, [1, 1, 2, 2, 0, 0, 0, 3])
    np.testing.assert_array_equal(first, [4, 0, 2, 7])


def test_representative_is_highest_score_then_smallest_id():
    cid = np.array([0, 0, 1, 1, 1])
    score = np.array([0.5, 0.9, 0.3, 0.3, 0.1], np.float32)
    np.testing.assert_array_equal(representatives(cid, score, 2), [1, 2])


def test_higher_ranked_is_a_strict_total_order():
    node = np.array([3])
    mask = higher_ranked(node, np.array([0.5]), np.array([[1, 5, 2]]), np.array([[0.5, 0.5, 0.4]]))
    np.testing.assert_array_equal(mask, [[True, False, False]])


def test_unknown_method_is_an_input_error():
    with pytest.raises(InputError, match="unknown method 'nope'"):
        get_method("nope", Config())


# Methods that link on halo actors need the full job flow (gcn-ve: GCN features and a second
# graph; hard-clusters: the re-scored graph); tests/test_gcn_v.py and
# tests/test_hard_clusters.py run them through it with the same invariance checks.
# methods this module can run in-process: not a re-scoring stage, and a halo linker only
# when it reads just the neighbours' rows (ARO), not node features (GCN-E)
# (methods with a stage of their own -- gcn-d, gcn-ds, lgcn -- run in tests/test_gcn_ds.py,
# tests/test_lgcn.py and tests/test_determinism.py through the job)
ROW_METHODS = sorted(name for name, cls in REGISTRY.items()
                     if cls.shape.score not in ("rescore", "stage") and cls.shape.link != "stage"
                     and (cls.shape.link != "halo" or not cls.shape.link_halo_features))


def _save_tiny_model(path, in_dim: int, k: int) -> str:
    """An untrained GCN-V (any confidence must still satisfy the common checks)."""
    import torch

    from ltc_ray.models.gcn_v import GCNV as Net
    from ltc_ray.models.store import save_model

    torch.manual_seed(0)
    save_model(str(path), Net(in_dim, 32), {"k": k, "thresholds": {"tau": 0.6}})
    return str(path)


def _config(name: str, k: int, dim: int, tmp_dir, **params) -> Config:
    """A config for method ``name``; learned methods get a small model."""
    cfg = Config(method=name, knn=KnnConfig(k=k))
    if name == "gcn-v":
        cfg.methods.gcn_v.model = _save_tiny_model(tmp_dir / f"gcnv-{dim}-{k}", dim, k)
    for key, value in params.items():
        setattr(cfg.methods.of(name), key, value)
    return cfg


def _run_in_process(name: str, x, knn_ids, knn_sims, parts: int, tmp_dir, **params):
    """Score, link and merge partition by partition in this process (no Ray)."""
    from ltc_ray.cluster.base import HaloPartition, LinkHaloPartition
    from ltc_ray.graph.adjacency import adjacency_rows, directed_edges
    from ltc_ray.graph.similarity_stats import graph_stats

    method = get_method(name, _config(name, knn_ids.shape[1], x.shape[1], tmp_dir, **params))
    method, _ = method.resolved(graph_stats(knn_ids, knn_sims))  # ``auto`` params, as the job
    n = len(knn_ids)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    inputs = [
        PartitionInput(a, b, knn_ids[a:b], knn_sims[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    if method.shape.score == "halo":
        edges = directed_edges(knn_ids, knn_sims)
        scores = []
        for p in inputs:
            adj, cols = adjacency_rows(p.node_ids, *edges)
            halo = HaloPartition(
                p.start, p.stop, p.knn_ids, p.knn_sims, x[p.start : p.stop], adj, cols, x[cols]
            )
            scores.append(method.score_halo(halo).scores)
        scores = np.concatenate(scores)
    else:
        scores = np.concatenate([method.score(p) for p in inputs])
    if method.shape.link == "whole-graph":  # one call over all rows, as the single task does
        labels = method.cluster_graph(knn_ids, knn_sims,
                                      x if method.shape.whole_graph_features else None)
        cid, _, _, parent = labels_to_clusters(labels, scores)
        return cid, parent, scores
    if method.shape.link == "halo":  # rows-only link actors (ARO): the arrays are the halo
        def rows_of(q):
            return knn_ids[q], knn_sims[q]

        links = [method.link_halo(LinkHaloPartition(p.start, p.stop, p.knn_ids, p.knn_sims,
                                                    None, rows_of), scores) for p in inputs]
    else:
        links = [method.link(p, scores) for p in inputs]
    parent = np.concatenate([lk.parent for lk in links])
    cid, _, _ = merge_edges(n, [spanning_forest(lk.src, lk.dst) for lk in links])
    return cid, parent, scores


@pytest.fixture(scope="module")
def blob_graph():
    x, labels = blobs(n_per=50, n_clusters=12, dim=64, spread=0.4, seed=3)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids, sims = exact_knn(x, 60)  # k > blob size: every node sees its whole blob
    return x, ids, sims, labels


@pytest.mark.parametrize("name", ROW_METHODS)
def test_every_method_recovers_separated_blobs(blob_graph, name, tmp_path):
    x, ids, sims, labels = blob_graph
    threshold = {"knn-cc": {"threshold": 0.6}, "density-peak": {"tau": 0.6}, "gcn-v": {"tau": 0.6},
                 "infomap": {"threshold": 0.6}, "chinese-whispers": {"threshold": 0.6},
                 "knn-dbscan": {"eps": 0.4}, "aro": {"threshold": 1.5},
                 "cdp": {"threshold": 0.6, "max_size": 60}, "hac": {"threshold": 0.4},
                 "kmeans": {"threshold": 0.6}}
    cid, parent, scores = _run_in_process(name, x, ids, sims, 1, tmp_path, **threshold[name])
    assert _same_partition(cid, labels)
    assert pairwise_prf(labels, cid)[2] == 1.0
    assert scores.dtype == np.float32 and parent.dtype == np.int64
    linked = parent >= 0
    assert (cid[parent[linked]] == cid[linked]).all()  # a parent lies in its child's cluster


@pytest.mark.parametrize("name", ROW_METHODS)
def test_every_method_is_partition_invariant_in_process(blob_graph, name, tmp_path):
    x, ids, sims, _ = blob_graph
    ref = _run_in_process(name, x, ids, sims, 1, tmp_path)
    for parts in (2, 7):
        got = _run_in_process(name, x, ids, sims, parts, tmp_path)
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_array_equal(a, b)


def test_density_peak_parents_form_a_forest(blob_graph, tmp_path):
    x, ids, sims, _ = blob_graph
    _, parent, scores = _run_in_process("density-peak", x, ids, sims, 3, tmp_path, tau=0.0)
    linked = np.nonzero(parent >= 0)[0]
    assert (
        (scores[parent[linked]] > scores[linked])
        | ((scores[parent[linked]] == scores[linked]) & (parent[linked] < linked))
    ).all()


def test_partition_ranges_cover_rows():
    ranges = partition_ranges(1000, ClusterConfig(partitions=7), cpus=2)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000 and len(ranges) == 7
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))


@pytest.fixture(scope="module")
def ray_graph(ray_local, tmp_path_factory):
    x, labels = blobs(n_per=40, n_clusters=30, dim=32, spread=2.5, seed=11)
    path = tmp_path_factory.mktemp("cluster") / "f.bin"
    write_bin(path, x, labels)
    info = inspect_features(str(path), dim=32)
    manifest, _ = build_knn_graph(
        info, KnnConfig(k=20, block_rows=300), str(path.parent / "knn"), {"CPU": 2.0}
    )
    return manifest, info


@pytest.mark.parametrize("name", ROW_METHODS)
def test_every_method_is_partition_invariant_on_ray(ray_graph, name, tmp_path):
    manifest, info = ray_graph
    method = get_method(name, _config(name, 20, 32, tmp_path))
    results = []
    # both merges, and the forest merge at the most partitions
    for parts, merge in [(1, "local"), (2, "local"), (7, "forest")]:
        cfg = _config(name, 20, 32, tmp_path)
        cfg.cluster = ClusterConfig(partitions=parts, merge=merge)
        refs = Run.on_graph(manifest, info, cfg, str(tmp_path / f"work-{parts}")).cluster(method)
        cid = ray_get(refs.cluster_id)
        parent = np.concatenate(ray_get(refs.parents))
        score = np.concatenate(ray_get(refs.scores))
        sizes, reps = ray_get(refs.summary)
        results.append((cid, parent, score, sizes, reps))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    cid, _, _, sizes, reps = results[0]
    assert (np.diff(sizes) <= 0).all() and sizes.sum() == len(cid)
    np.testing.assert_array_equal(cid[reps], np.arange(len(sizes)))
