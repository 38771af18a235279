"""The job-vs-one-process-script harness (``benchmarks/vs_script.py``) at tiny sizes: it
runs both sides, checks they agree and reports the issue's targets; ``--scaling`` fits a
slope per stage."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
from conftest import PYTHON, REPO, load_benchmark

HARNESS = REPO / "benchmarks" / "vs_script.py"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, str(HARNESS), *args], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_partition_check_tells_relabelled_from_different():
    vs = load_benchmark("vs_script")
    a = np.array([0, 0, 1, 1, 2, 3])
    assert vs.compare_partitions(a, np.array([5, 5, 0, 0, 1, 2]))["same_partition"]
    split = vs.compare_partitions(a, np.array([0, 1, 2, 2, 3, 4]))  # a's cluster 0 split
    assert not split["same_partition"] and split["mismatch_rows"] == 2
    joined = vs.compare_partitions(a, np.array([0, 0, 0, 0, 1, 2]))  # two merged
    assert not joined["same_partition"] and joined["mismatch_rows"] == 4


def test_vs_script_tiny_size(tmp_path):
    out, md = tmp_path / "vs.json", tmp_path / "vs.md"
    proc = _run(["--sizes", "3000", "--repeats", "1", "--k", "10", "--root", str(tmp_path / "r"),
                 "--json", str(out), "--markdown", str(md)])
    assert "N=3,000 ours repeat 1/1" in proc.stderr  # progress lines
    result = json.loads(out.read_text())
    assert result["mode"] == "vs" and result["index"] == "flat"
    (e,) = result["entries"]
    assert e["N"] == 3000 and e["same_partition"] is True and e["mismatch_rows"] == 0
    assert e["n_clusters"]["ours"] == e["n_clusters"]["script"] > 1
    assert e["script_wall_s"] > 0 and e["ours_wall_s"] > 0
    assert e["ratio_ours_over_script"] == pytest.approx(e["ours_wall_s"] / e["script_wall_s"])
    # per-stage / per-phase seconds from run.json and the script's JSON line
    assert {"knn", "link", "merge", "write"} <= set(e["ours_stages_s"])
    assert {"load", "knn", "cut+cc", "write", "total"} <= set(e["script_phases_s"])
    assert e["ours_stages_s"]["knn"] > 0 and e["script_phases_s"]["knn"] > 0
    assert e["knn"]["ours_rows_per_s"] == pytest.approx(3000 / e["ours_stages_s"]["knn"])
    assert e["rss"]["script_peak_bytes"] > 0 and e["rss"]["ours_driver_peak_bytes"] > 0
    assert e["rss"]["ours_worker_peak_bytes"] > 0
    # below 100K only the 2x whole-job target applies
    verdicts = {t["name"]: t["met"] for t in e["targets"]}
    assert verdicts["kNN throughput"] is None and verdicts["merge speed"] is None
    assert verdicts["whole job wall"] == (e["ratio_ours_over_script"] <= 2.0)
    table = md.read_text()
    assert "| 3,000 |" in table and "same partition" in table
    for target in ("<= 1.1x the script", "0.95x single-process faiss", "1.0x scipy",
                   "whole job wall: ours/script <= 2.0"):
        assert target in table


def test_vs_script_scaling_slopes(tmp_path):
    out = tmp_path / "scaling.json"
    _run(["--scaling", "--sizes", "2000,4000", "--repeats", "1", "--index", "flat",
          "--k", "10", "--root", str(tmp_path / "r"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["mode"] == "scaling" and [e["N"] for e in result["entries"]] == [2000, 4000]
    slopes = result["slopes"]
    assert {"knn", "link", "merge", "write", "wall"} <= set(slopes)
    for name, s in slopes.items():
        assert math.isfinite(s["slope"]), name
        assert len(s["seconds"]) == 2 and all(v >= 0 for v in s["seconds"])
        assert s["too_short"] == (max(s["seconds"]) < 0.05)
        if name in ("knn", "wall") or s["too_short"]:
            assert not s["flagged"]
        else:
            assert s["flagged"] == (s["slope"] > 1.1)
