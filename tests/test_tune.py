"""``jobs/tune.py`` for every method with a tunable threshold (the learned ones with their
second graphs and halo linkers included, and GCN-V's feature pass, which tunes tau2): the
tuned config, run by the clustering job, scores exactly what tune reported for that value
-- tune and the job run the same stages (one executor)."""

from __future__ import annotations

import json

import pytest
import yaml
from _data import blobs, write_bin
from _models import model_flags

from ltc_ray.cli import main
from ltc_ray.cluster import REGISTRY, get_method
from ltc_ray.config import Config, KnnConfig

K = 10
CASES = sorted(name for name, cls in REGISTRY.items() if cls.shape.tunable is not None)
CASES.append("gcn-v+feature-pass")


@pytest.fixture(scope="module")
def blob_file(tmp_path_factory):
    x, labels = blobs(n_per=30, n_clusters=20, dim=32, spread=0.6, seed=4)
    path = tmp_path_factory.mktemp("tune") / "feats.bin"
    write_bin(path, x, labels)
    return path


def test_every_tunable_method_is_covered():
    assert {"knn-cc", "density-peak", "gcn-v", "gcn-ve", "infomap"} <= set(CASES)
    assert "hard-clusters" not in CASES  # its threshold is tuned out of fold by train.py


@pytest.mark.parametrize("case", CASES)
def test_tuned_config_scores_what_tune_reported(ray_local, blob_file, case, tmp_path, capsys):
    method = case.split("+")[0]
    flags = model_flags(method, tmp_path, 32, K)
    if case.endswith("feature-pass"):
        flags += ["--set", "methods.gcn-v.feature_pass=true"]
    # the parameter the job's link step reads (the feature pass links with tau2)
    probe = Config(method=method, knn=KnnConfig(k=K))
    if case.endswith("feature-pass"):
        probe.methods.gcn_v.feature_pass = True
        probe.methods.gcn_v.model = flags[1]
    tunable = get_method(method, probe, load=False).shape.tunable
    low = round(tunable.low + 4 * tunable.step, 6)
    grid = f"{low}:{round(low + 2 * tunable.step, 6)}:{tunable.step}"
    labels = blob_file.with_suffix(".meta")
    out_cfg = tmp_path / "tuned.yaml"
    work = str(tmp_path / "work")
    common = ["--features", str(blob_file), "--dim", "32", "--labels", str(labels),
              "--set", f"knn.k={K}", *flags, "--work-dir", work]
    code = main(["tune", "--method", method, *common, "--grid", grid,
                 "--output-config", str(out_cfg)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count(f"| {tunable.param}=") == 3  # every grid value was tried
    tuned = yaml.safe_load(out_cfg.read_text())
    best = tuned["methods"][method][tunable.param]
    assert f"best {tunable.param} = {best:.4f}" in printed
    reported = float(printed.split("(pairwise_f ")[1].split(")")[0])
    code = main(["cluster", "--method", method, *common, "--config", str(out_cfg),
                 "--output", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["methods"][method][tunable.param] == best
    # the kNN graph and the scores came from tune's work area: tune ran the same stages
    assert {"knn", "score"} <= set(run["reused_stages"])
    assert abs(100 * run["metrics"]["pairwise_f"] - reported) < 0.006
