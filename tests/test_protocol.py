"""The method protocol end to end: a toy method registered HERE, in the test module (no
library file edited), runs through the clustering job, resume, tune, ``--dry-run`` and
the determinism checks every built-in method passes; and the registry refuses a method
whose declared shape it does not implement.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import ray
from _data import blobs, write_bin
from test_determinism import _run

from ltc_ray.cli import main
from ltc_ray.cluster import REGISTRY, merge_edges
from ltc_ray.cluster.base import (
    ClusterMethod,
    LinkResult,
    PartitionInput,
    Shape,
    Tunable,
    neighbor_density,
    register,
)
from ltc_ray.io.output import read_clusters
from ltc_ray.knn import exact_knn
from ltc_ray.params import COSINE, Range, param

NAME = "toy-mutual"


@dataclass
class ToyParams:
    """Keep an edge only when both ends list each other among their first ``m`` neighbours
    with similarity >= ``threshold``."""

    threshold: float = param(0.5, valid=COSINE)
    m: int = param(5, valid=Range(1, 100))


class ToyMutual(ClusterMethod):
    """Mutual-neighbour components: a method no built-in implements, row-shaped."""

    name = NAME
    Params = ToyParams
    shape = Shape(score_params=(), tunable=Tunable("threshold", 0.2, 0.9, 0.05))

    def score(self, part: PartitionInput) -> np.ndarray:
        return neighbor_density(part.knn_sims, 5)

    def link(self, part: PartitionInput, scores: np.ndarray) -> LinkResult:
        # an edge i -> j is kept when j is in i's first m with sim >= threshold; the merge
        # sees both directions, so an edge kept one way is kept (no cross-partition lookup)
        m = min(self.params.m, part.knn_ids.shape[1] - 1)
        ids = part.knn_ids[:, 1: m + 1].astype(np.int64)
        kept = (part.knn_sims[:, 1: m + 1] >= self.params.threshold) & (ids >= 0)
        rows, cols = np.nonzero(kept)
        src, dst = part.node_ids[rows], ids[rows, cols]
        return LinkResult(parent=np.full(len(part.knn_ids), -1, np.int64), src=src, dst=dst)


@pytest.fixture(scope="module")
def toy(ray_local):
    """ToyMutual in the registry for this module only; its module shipped to Ray workers by
    value (a test module is not importable there)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    register(ToyMutual)
    yield ToyMutual
    REGISTRY.pop(NAME, None)
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def blob_file(tmp_path_factory):
    x, labels = blobs(n_per=30, n_clusters=20, dim=32, spread=0.5, seed=9)
    path = tmp_path_factory.mktemp("toy") / "feats.bin"
    write_bin(path, x, labels)
    return path, x, labels


def _reference(x: np.ndarray, k: int, threshold: float, m: int) -> np.ndarray:
    """The toy's definition over the whole graph in one process."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ids, sims = exact_knn(xn.astype(np.float32), k)
    method = ToyMutual(ToyParams(threshold, m), k)
    result = method.link(PartitionInput(0, len(x), ids, sims), method.score(
        PartitionInput(0, len(x), ids, sims)))
    return merge_edges(len(x), [(result.src, result.dst)])[0]


def test_a_method_missing_a_hook_of_its_shape_is_refused():
    @dataclass
    class P:
        threshold: float = 0.5

    class Broken(ClusterMethod):
        name = "broken"
        Params = P
        shape = Shape(link="whole-graph")  # declares whole-graph, implements no cluster_graph

        def score(self, part):
            return neighbor_density(part.knn_sims, 3)

    with pytest.raises(TypeError, match="cluster_graph"):
        register(Broken)
    assert "broken" not in REGISTRY


def test_toy_method_runs_through_cluster_resume_and_determinism(toy, blob_file, tmp_path,
                                                                capsys):
    path, x, _ = blob_file
    runs = {}
    for layout in ("one", "many"):
        run, cols = _run(path, NAME, ["--set", f"methods.{NAME}.threshold=0.45"], layout,
                         tmp_path / layout, tmp_path / f"{layout}.work", capsys)
        assert run["method"] == NAME and run["reused_stages"] == []
        runs[layout] = cols
    np.testing.assert_array_equal(runs["one"]["cluster_id"], runs["many"]["cluster_id"])
    ref = _reference(x, 10, 0.45, 5)
    got = runs["one"]["cluster_id"]
    # the same partition of the samples as the one-process definition
    pairs = np.unique(np.stack([ref, got]), axis=1).shape[1]
    assert pairs == len(np.unique(ref)) == len(np.unique(got))
    assert 2 <= len(np.unique(got)) < len(got) // 2
    # resume: the same command reuses every stage; a new threshold re-links only
    run, _ = _run(path, NAME, ["--set", f"methods.{NAME}.threshold=0.45"], "many",
                  tmp_path / "again", tmp_path / "many.work", capsys)
    assert sorted(run["reused_stages"]) == ["knn", "link", "plan", "score"]
    run, cols = _run(path, NAME, ["--set", f"methods.{NAME}.threshold=0.99"], "many",
                     tmp_path / "relinked", tmp_path / "many.work", capsys)
    assert sorted(run["reused_stages"]) == ["knn", "plan", "score"]
    assert len(np.unique(cols["cluster_id"])) > len(np.unique(got))  # a stricter cut
    assert run["config"]["methods"][NAME]["threshold"] == 0.99


def test_toy_method_tunes_and_plans(toy, blob_file, tmp_path, capsys):
    path, _, _ = blob_file
    labels = path.with_suffix(".meta")
    out_cfg = tmp_path / "toy.yaml"
    code = main(["tune", "--features", str(path), "--dim", "32", "--labels", str(labels),
                 "--method", NAME, "--set", "knn.k=10", "--grid", "0.3:0.6:0.1",
                 "--output-config", str(out_cfg), "--work-dir", str(tmp_path / "tune.work")])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    best = float(printed.split("best threshold = ")[1].split()[0])
    assert f"methods:\n  {NAME}:\n    threshold: {best}" in out_cfg.read_text()
    # the job with the tuned config scores what tune reported for that value
    code = main(["cluster", "--features", str(path), "--dim", "32", "--labels", str(labels),
                 "--config", str(out_cfg), "--output", str(tmp_path / "tuned"),
                 "--work-dir", str(tmp_path / "tune.work")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    reported = float(printed.split("(pairwise_f ")[1].split(")")[0])
    assert abs(100 * metrics["pairwise_f"] - reported) < 0.006
    assert len(read_clusters(str(tmp_path / "tuned"))) == 600
    # --dry-run plans it from its shape
    code = main(["cluster", "--dry-run", "--features", str(path), "--dim", "32",
                 "--method", NAME, "--set", "knn.k=10"])
    assert code == 0, capsys.readouterr().err
    plan = capsys.readouterr().out
    assert f"method={NAME}" in plan and "link" in plan
