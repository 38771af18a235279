"""benchmarks/domain_shift.py end to end on its hidden ``--tiny`` setting (one small
ms1m-like setting, knn-cc, a coarse grid): the default / tuned / best cells, the report
tables and the rule fit agree with what the library's own runs and tune produced."""

from __future__ import annotations

import json
import re

from conftest import load_benchmark

from ltc_ray.cluster import method_class
from ltc_ray.params import field_autos


def test_tiny_run_reports_consistent_cells(ray_local, tmp_path, capsys):
    bench = load_benchmark("domain_shift")
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = bench.main(["--tiny", "--methods", "knn-cc", "--grid", "0.3:0.95:0.05", "--fit",
                       "--root", str(tmp_path / "root"), "--json", str(out_json),
                       "--markdown", str(out_md)])
    assert code == 0
    result = json.loads(out_json.read_text())
    cell = result["results"]["ms1m-like-tiny"]["knn-cc"]
    default, tuned, best = cell["default"], cell["tuned"], cell["best"]
    # every auto parameter was derived on the test graph, the attach step included
    assert {"knn-cc.threshold", "cluster.attach_threshold"} <= set(default["derived"])
    assert default["cluster_sizes"]["n_samples"] == default["n_samples"]
    # tuned: the train-tuned value, applied to test by the job's own stages
    assert tuned["param"] == "threshold" and 0.3 <= tuned["value"] <= 0.95
    assert (tmp_path / "root" / "configs" / "ms1m-like-tiny.knn-cc.train.yaml").exists()
    # best: the maximum of the test curve; where tune tried the tuned value on test too,
    # the test run scored exactly what tune saw there (one executor)
    test_curve = {row[0]: row[1] for row in best["curve"]}
    assert best["pairwise_f_test"] == max(test_curve.values())
    assert "reference only" in best["note"]
    if tuned["value"] in test_curve:
        assert abs(test_curve[tuned["value"]] - tuned["test"]["pairwise_f"]) < 1e-9
    # the kNN graph of each split was built once and reused by tune's trials
    assert (tmp_path / "root" / "work" / "ms1m-like-tiny" / "test" / "knn").exists()
    # --fit re-derives the declared rule's value exactly as the run did
    fit = result["fit"]["methods"]["knn-cc"]
    declared = field_autos(method_class("knn-cc").Params)["threshold"].alpha
    assert fit["derived_matches"] and fit["declared_alpha"] == declared
    # the report's table cells are "default / tuned / best" in percent
    row = f"| knn-cc | {100 * default['pairwise_f']:.1f} / " \
          f"{100 * tuned['test']['pairwise_f']:.1f} / {100 * best['pairwise_f_test']:.1f} |"
    report = out_md.read_text()
    assert row in report and row in capsys.readouterr().out
    assert re.search(r"Best worst case: \*\*knn-cc\*\*", report)
