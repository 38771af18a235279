"""L-GCN in the job: the re-scored graph and the dynamic-threshold propagation, resumed
with a new max_size; the pooled probabilities' propagation equals the single-process
definition."""

from __future__ import annotations

import json

import numpy as np
from _data import blobs, write_bin
from _models import tiny_lgcn

from ltc_ray.cli import main
from ltc_ray.graph.constrained import constrained_components
from ltc_ray.io.output import read_clusters

K = 10


def _job(path, model, out, work, *sets):
    args = ["cluster", "--features", str(path), "--dim", "16", "--method", "lgcn", "--model",
            str(model), "--set", f"knn.k={K}", "--output", str(out), "--work-dir", str(work)]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    return json.loads((out / "run.json").read_text())


def test_propagation_on_the_rescored_graph_and_resume(ray_local, tmp_path):
    from ltc_ray.graph.knn_graph import load_manifest, read_knn_rows

    x, labels = blobs(n_per=20, n_clusters=12, dim=16, spread=0.6, seed=2)
    write_bin(tmp_path / "x.bin", x, labels)
    model = tiny_lgcn(tmp_path / "model", 16, K)
    work = tmp_path / "work"
    first = _job(tmp_path / "x.bin", model, tmp_path / "a", work, "cluster.partitions=2")
    graph = load_manifest(str(work / "knn-rescored"))
    assert graph.k == 9  # self + the model's hop1 (8): the re-scored rows
    ids, prob = read_knn_rows(graph, 0, graph.n_rows)
    assert (ids[:, 0] == np.arange(len(ids))).all() and (prob[:, 0] == 1).all()
    assert np.all(np.diff(prob[:, 1:], axis=1) <= 0)  # neighbours by probability
    # the job's clusters are the single-process propagation of the pooled probabilities
    src = np.repeat(np.arange(len(ids)), ids.shape[1] - 1)
    dst, w = ids[:, 1:].ravel().astype(np.int64), prob[:, 1:].ravel().astype(np.float64)
    keep = dst >= 0
    src, dst, w = src[keep], dst[keep], w[keep]
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    pairs, inverse = np.unique(np.c_[lo, hi], axis=0, return_inverse=True)
    pooled = (np.bincount(inverse.ravel(), w) / np.bincount(inverse.ravel())).astype(np.float32)
    label, _ = constrained_components(len(ids), pairs[:, 0], pairs[:, 1], pooled, 60, 0.02)
    got = read_clusters(str(tmp_path / "a")).column("cluster_id").to_numpy()
    _, want = np.unique(label, return_inverse=True)
    assert len(np.unique(got)) == len(np.unique(want)) == first["n_clusters"]
    assert (np.unique(np.c_[got, want], axis=0).shape[0]) == first["n_clusters"]
    # a new max_size reuses the probabilities and only propagates again
    again = _job(tmp_path / "x.bin", model, tmp_path / "b", work, "cluster.partitions=2",
                 "methods.lgcn.max_size=5")
    assert {"plan", "knn", "score"} <= set(again["reused_stages"])
    assert "link" not in again["reused_stages"]
    sizes = np.bincount(read_clusters(str(tmp_path / "b")).column("cluster_id").to_numpy())
    assert sizes.max() <= 5 < np.bincount(got).max()


def test_train_job_writes_a_model_with_its_subgraph_shape(ray_local, tmp_path):
    """``train --method lgcn`` writes the subgraph shape and the propagation settings the
    job then uses; its in-sample link accuracy is recorded per epoch."""
    x, labels = blobs(n_per=20, n_clusters=12, dim=16, spread=0.6, seed=3)
    write_bin(tmp_path / "x.bin", x, labels)
    (tmp_path / "x.meta").write_text("\n".join(map(str, labels.tolist())) + "\n")
    model = tmp_path / "model"
    assert main(["train", "--method", "lgcn", "--features", str(tmp_path / "x.bin"),
                 "--labels", str(tmp_path / "x.meta"), "--dim", "16", "--set", f"knn.k={K}",
                 "--epochs", "1", "--hidden", "16", "--output", str(model)]) == 0
    meta = json.loads((model / "model.json").read_text())
    assert meta["method"] == "lgcn" and meta["hop1"] == K - 1  # capped at the graph's k
    assert meta["thresholds"] == {"max_size": 300, "step": 0.6}
    assert len(meta["history"]) == 1 and 0 <= meta["history"][0]["accuracy"] <= 1
    run = _job(tmp_path / "x.bin", model, tmp_path / "out", tmp_path / "work")
    assert run["stages"]["link"]["max_size"] == 300
