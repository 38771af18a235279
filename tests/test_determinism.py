"""Every registered method gives the same clusters for one vs many kNN shards, partitions
and workers (whole-graph methods: kNN shards only, see LAYOUTS), each computed from
scratch with the same seed, and again when a run resumes in a finished work area (issue 4,
item 6). Two from-scratch runs that must agree bit for
bit also catch run-to-run nondeterminism, so no third, same-layout rerun is made.

Parametrized over the registry, so a newly registered method is covered automatically
(tests/_models.py must be taught to make its model if it needs one).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _data import blobs, write_bin
from _models import model_flags

from ltc_ray.cli import main
from ltc_ray.cluster import REGISTRY
from ltc_ray.io.output import read_clusters

K = 10
LAYOUTS = {
    # one kNN actor holding the whole base, one partition, one scipy merge pass
    "one": {
        "knn.mode": "replicate",
        "knn.block_rows": 100000,
        "cluster.partitions": 1,
        "cluster.merge": "local",
    },
    # two database shards, three partition actors/tasks, per-partition star forests
    "many": {
        "knn.mode": "shard",
        "knn.shards": 2,
        "knn.block_rows": 150,
        "cluster.partitions": 3,
        "cluster.merge": "forest",
    },
    # for whole-graph methods: ONE task links all rows, so partitions and the merge cannot
    # change their clusters and a 1-vs-3 partition case would be vacuous (their per-row
    # score is partitioned as knn-cc's is, covered there); only the kNN graph's layout
    # varies, which still can change what they see
    "shards": {
        "knn.mode": "shard",
        "knn.shards": 2,
        "knn.block_rows": 150,
        "cluster.partitions": 1,
        "cluster.merge": "local",
    },
}


@pytest.fixture(scope="module")
def blob_file(tmp_path_factory):
    x, labels = blobs(n_per=30, n_clusters=20, dim=32, spread=0.5, seed=9)
    path = tmp_path_factory.mktemp("det") / "feats.bin"
    write_bin(path, x, labels)
    return path


def _run(path, method, flags, layout, out, work, capsys):
    sets = [arg for key, value in LAYOUTS[layout].items() for arg in ("--set", f"{key}={value}")]
    code = main(
        [
            "cluster",
            "--features", str(path),
            "--dim", "32",
            "--method", method,
            "--set", f"knn.k={K}",
            "--set", "seed=7",
            *sets,
            *flags,
            "--output", str(out),
            "--work-dir", str(work),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    table = read_clusters(str(out))
    return run, {c: table.column(c).to_numpy() for c in ("cluster_id", "parent", "score")}


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_same_clusters_for_one_vs_many_and_reruns(ray_local, blob_file, method, tmp_path, capsys):
    flags = model_flags(method, tmp_path, 32, K)
    whole_graph = REGISTRY[method].shape.link == "whole-graph"
    many = "shards" if whole_graph else "many"
    runs = {}
    for name, layout in [("one", "one"), ("many", many)]:
        # a fresh work area each time: every stage is computed again, nothing is reused
        run, cols = _run(blob_file, method, flags, layout, tmp_path / name,
                         tmp_path / f"{name}.work", capsys)  # fmt: skip
        assert run["reused_stages"] == []
        runs[name] = (run, cols)
    run = runs["many"][0]
    assert run["stages"]["knn"]["n_actors"] == 2
    assert run["stages"]["score"]["partitions"] == (1 if whole_graph else 3)
    assert runs["one"][0]["stages"]["score"]["partitions"] == 1
    ref = runs["one"][1]
    n_clusters = len(np.unique(ref["cluster_id"]))
    assert 2 <= n_clusters <= len(ref["cluster_id"]) // 2  # a real clustering, not a trivial one
    for column in ("cluster_id", "parent", "score"):
        np.testing.assert_array_equal(ref[column], runs["many"][1][column], err_msg="many")
    # same graph and same stage fingerprints whatever the layout (layout is not an input)
    fingerprints = runs["one"][0]["stage_fingerprints"]
    assert fingerprints == runs["many"][0]["stage_fingerprints"]
    # resuming in a finished work area reuses every stage (knn_features too) to the same end
    run, cols = _run(blob_file, method, flags, many, tmp_path / "resumed", tmp_path / "one.work",
                     capsys)  # fmt: skip
    assert sorted(run["reused_stages"]) == sorted(fingerprints)
    for column in ("cluster_id", "parent", "score"):
        np.testing.assert_array_equal(ref[column], cols[column], err_msg="resumed")
