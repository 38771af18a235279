"""benchmarks/gpu_check.py: its CPU smoke run end to end (the same code paths the GPU run
takes, tiny sizes), the no-GPU exit, the peak table and the exactness checker itself."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO, load_benchmark

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(SCRIPT), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_cpu_smoke_run_measures_everything_and_is_exact_without_faiss(tmp_path):
    """One run covers every step, with faiss hidden: the GPU machine may lack it
    (``ltc_ray.knn``'s __init__ needs it, the torch index does not)."""
    shadow = tmp_path / "no_faiss"
    shadow.mkdir()
    (shadow / "faiss.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'faiss'\", name='faiss')\n")
    out = tmp_path / "r.json"
    proc = _run("--device", "cpu", "--sizes", "3000", "--k", "10", "--json", str(out),
                env={"PYTHONPATH": str(shadow)})
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["ray_imported"] is False and r["env"]["device"] == "cpu"
    knn = r["knn"]
    assert [e["precision_requested"] for e in knn] == ["fp16", "bf16"]
    for e in knn:
        assert e["status"] == "ok" and e["size"] == 3000 and e["search_k"] == 18
        assert e["queries_searched"] == 3000 and e["extrapolated"] is False
        assert e["rows_per_s"] > 0 and e["tflops"] > 0 and e["pct_peak"] > 0 and e["build_s"] >= 0
        assert e["full_search_s"] == pytest.approx(e["search_s"])
    assert r["peak"]["source"] == "measured" and r["peak"]["measured_matmul_tflops"] > 0
    assert r["correctness_passed"] is True
    assert [(c["precision"], c["queries"]) for c in r["correctness"]] == [
        ("fp16", 256), ("bf16", 256)]
    for c in r["correctness"]:
        assert c["equal_rows"] == 256 and c["equal_share"] == 1.0 and c["failed_rows"] == 0
        assert 0 <= c["max_sim_abs_diff"] < 1e-5
    models = {(m["model"], m.get("shape")): m for m in r["models"]}
    assert models[("gcn-v", None)]["forward_s_per_1m"] > 0
    assert models[("gcn-v", None)]["predict_s_per_1m"] > 0
    assert models[("gcn-v", None)]["aggregate_cpu_s_per_1m"] > 0
    for shape in ("default", "reference"):
        m = models[("edge-scorer", shape)]
        assert m["forward_s_per_1m_anchors"] > 0 and m["edge_probabilities_s_per_1m_anchors"] > 0
        assert m["forward_s_per_1m_edges"] == pytest.approx(m["forward_s_per_1m_anchors"] / 10,
                                                            rel=1e-3)
    assert r["imports"]["ltc_ray.knn.torch_index"].startswith("module file")
    assert r["env"]["faiss"] is None and r["faiss_gpu"] == "not installed"
    assert "| torch | 3,000 | fp16 |" in proc.stdout and "PASS" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_cuda_it_exits_2_with_one_line():
    proc = _run("--json", os.devnull)
    assert proc.returncode == 2
    no_cuda = load_benchmark("gpu_check").NO_CUDA
    assert proc.stderr.strip().splitlines() == [no_cuda] and proc.stdout == ""


def test_peak_table_matches_device_names():
    bench = load_benchmark("gpu_check")
    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H200": 989.0, "NVIDIA H100 PCIe": 756.0,
             "NVIDIA H100 NVL": None, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA L40S": 362.0,
             "NVIDIA L40": None, "NVIDIA A10": 125.0, "NVIDIA A10G": None, "NVIDIA L4": 121.0,
             "Tesla V100-SXM2-16GB": 125.0, "NVIDIA GeForce RTX 4090": 165.0}
    assert {n: bench.table_peak(n) for n in names} == names


def test_exactness_checker_orders_ties_by_id_and_flags_a_wrong_neighbour(tmp_path):
    bench = load_benchmark("gpu_check")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    x[200:260] = x[0]  # exact duplicates: float64 ties at the top of row 0's list
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = np.array([0, 5, 399])
    ids, sims = bench.exact_topk(x, q, k=7, chunk=97)  # chunks split the tie group
    s = x[q].astype(np.float64) @ x.astype(np.float64).T
    full = np.stack([np.lexsort((np.arange(400), -row))[:7] for row in s])
    assert (ids == full).all() and ids[0].tolist() == [0, 200, 201, 202, 203, 204, 205]
    assert np.allclose(sims, np.take_along_axis(s, full, axis=1))

    args = bench.parse_args(["--device", "cpu", "--sizes", "400", "--k", "7",
                             "--json", str(tmp_path / "r.json")])
    run = bench.Check(args, torch)
    cand = np.concatenate([full, np.full((3, 2), -1)], axis=1)
    cand[0, :7] = cand[0, :7][::-1]  # any order among exact ties: re-sorted, still equal
    run.compare(x, q, (ids, sims), np.zeros(cand.shape, np.float32), cand, 400, "fp16")
    wrong = cand.copy()
    wrong[2, 3] = np.argsort(s[2])[0]  # the least similar row instead of a true neighbour
    run.compare(x, q, (ids, sims), np.zeros(cand.shape, np.float32), wrong, 400, "fp16")
    tie = cand.copy()
    tie[0, 6] = 259  # another exact duplicate of row 0 instead of row 0 itself: a tie, not an error
    run.compare(x, q, (ids, sims), np.zeros(cand.shape, np.float32), tie, 400, "bf16")
    ok, bad, tied = run.report["correctness"]
    assert ok["passed"] and ok["equal_rows"] == 3 and ok["tie_rows"] == 0
    assert not bad["passed"] and bad["failed_rows"] == 1 and run.failed
    assert tied["passed"] and tied["equal_rows"] == 2 and tied["tie_rows"] == 1
