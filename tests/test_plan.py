"""Plans at scale (``cluster --dry-run``), the memory model behind them and the benchmark
harness that checks it."""

from __future__ import annotations

import json
import math
import re
import subprocess

import pytest
from conftest import PYTHON, REPO

from ltc_ray.cli import main
from ltc_ray.config import Config
from ltc_ray.knn.search import RESCORE_CHUNK, TIE_MARGIN
from ltc_ray.pipeline.plan import (
    baselines,
    edge_actor_memory,
    knn_actor_memory,
    link_actor_memory,
    load_rates,
    make_plan,
)


def _gb(text: str, label: str) -> float:
    m = re.search(rf"^\s*{label}\s+([\d,.]+) GB", text, re.M)
    assert m, f"no {label} line in:\n{text}"
    return float(m.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def part1(tmp_path_factory):
    from ltc_ray.synthetic import make_benchmark

    root = tmp_path_factory.mktemp("plan")
    info = make_benchmark(str(root), parts=(1,), scale=0.002, seed=0, progress=False)
    return root, info["part1_test"]["n_samples"]


def test_dry_run_on_a_real_file_plans_and_writes_nothing(part1, tmp_path, capsys):
    root, n = part1
    out = tmp_path / "out"
    code = main(
        [
            "cluster",
            "--part",
            "1",
            "--data-root",
            str(root),
            "--output",
            str(out),
            "--dry-run",
            "--resources",
            '{"CPU": 4}',
            "--set",
            "knn.shards=3",
            "--set",
            "cluster.partitions=5",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert f"N={n:,} rows x D=256" in text
    assert "mode=shard shards=3" in text and f"({math.ceil(n / 3):,} rows each" in text
    assert "partitions: 5 x" in text and "cluster: 4 CPU, 0 GPU" in text
    for stage in ("driver", "knn_actor", "inference_actor", "merge"):
        assert _gb(text, stage) > 0
    assert not out.exists() and not (tmp_path / "out.work").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dry_run_reads_the_running_clusters_resources(ray_local, part1, tmp_path, capsys):
    root, n = part1
    out = tmp_path / "out"
    code = main(
        [
            "cluster",
            "--features",
            str(root / "features" / "part1_test.bin"),
            "--output",
            str(out),
            "--dry-run",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    cpus = ray_local.cluster_resources()["CPU"]
    assert f"cluster: {cpus:g} CPU" in text and f"N={n:,}" in text
    assert "mode=replicate" in text  # 1.2 MB of features: one replica
    assert not out.exists()


def test_hypothetical_100m_plan_matches_the_memory_model(capsys):
    code = main(
        [
            "cluster",
            "--dry-run",
            "--rows",
            "100000000",
            "--dim",
            "256",
            "--resources",
            '{"CPU": 64, "GPU": 8}',
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "N=100,000,000 rows x D=256" in text and "index=ivf" in text
    # plan_knn_layout: 102.4 GB over shard_max_bytes=4e9 -> 26 shards sharing the 8 GPUs
    assert "mode=shard shards=26 (3,846,154 rows each" in text
    # the kNN actor line equals the documented formula, computed here from scratch
    base = baselines(load_rates())["worker"]
    n_s, d, k, b = 3_846_154, 256, 80, 16384
    expected = (
        base
        + 2 * n_s * d * 4
        + b * d * 4
        + b * (k + TIE_MARGIN) * 64
        + RESCORE_CHUNK * (k + TIE_MARGIN) * d * 12
        + 4096 * 1024 * 4
    )
    assert _gb(text, "knn_actor") == pytest.approx(expected / 1e9, abs=0.006)
    assert knn_actor_memory(n_s, d, k, b, base, "ivf", True, 10**8).total == expected
    # IVF host copy off the GPU: the same shard on CPUs also holds faiss' copy (+ ids)
    cpu = knn_actor_memory(n_s, d, k, b, base, "ivf", False, 10**8).total
    assert cpu - expected == 8 * n_s
    # merge: 125 B/row + baseline; the GPU line holds the shard's vectors and ids
    assert _gb(text, "merge") == pytest.approx(
        (base + 100_000_000 * (32 + 14 + 16 + 60)) / 1e9, abs=0.006
    )
    assert _gb(text, "knn GPU memory") >= n_s * (d * 4 + 8) / 1e9
    plan = make_plan(100_000_000, 256, Config(), {"CPU": 64, "GPU": 8}, hypothetical=True)
    assert plan["knn"]["shards"] == 26 and plan["partitions"]["count"] == 382
    if load_rates().get("assumed"):
        assert plan["expected_seconds"]["knn"] > 0


def test_dry_run_flags_are_refused_where_they_do_not_apply(part1, tmp_path, capsys):
    root, _ = part1
    assert (
        main(
            [
                "cluster",
                "--part",
                "1",
                "--data-root",
                str(root),
                "--rows",
                "10",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--rows: only applies with --dry-run" in capsys.readouterr().err
    assert main(["cluster", "--dry-run", "--rows", "1000", "--resources", '{"CPU": "x"}']) == 2
    assert "--resources: must be a JSON object of counts" in capsys.readouterr().err
    assert main(["cluster", "--dry-run", "--rows", "1000", "--part", "1"]) == 2
    assert "drop --part/--features" in capsys.readouterr().err
    assert main(["cluster", "--dry-run", "--rows", "1000", "--resources", '{"CPU": 1}']) == 0
    assert "N=1,000 rows" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_benchmark_harness_smoke_suite(tmp_path):
    out = tmp_path / "smoke.json"
    subprocess.run(
        [
            PYTHON,
            str(REPO / "benchmarks" / "run.py"),
            "--suite",
            "smoke",
            "--json",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    result = json.loads(out.read_text())
    assert len(result["loadavg_before"]) == 3
    names = [e["name"] for e in result["entries"]]
    assert names == ["knn", "merge", "metrics"]
    for e in result["entries"]:
        assert e["ours_s"] > 0 and e["reference_s"] > 0
        assert e["ratio"] == pytest.approx(e["reference_s"] / e["ours_s"])
        assert e["ours_peak_rss_bytes"] > 0 and e["reference_peak_rss_bytes"] > 0
    by = {e["name"]: e for e in result["entries"]}
    assert by["knn"]["reference_detail"]["agreement"] > 0.99
    assert by["merge"]["reference_detail"]["same_partition"] is True
    assert by["metrics"]["reference_detail"]["max_abs_diff"] < 1e-9
    stages = {c["stage"] for c in result["memory_checks"]}
    assert stages == {"knn_actor", "driver", "merge"}
    for c in result["memory_checks"]:
        assert c["predicted_bytes"] > 0 and c["measured_bytes"] > 0
        assert c["flag"] == (abs(c["measured_bytes"] / c["predicted_bytes"] - 1) > 0.25)


@pytest.mark.parametrize("halo_bytes", [1 << 28, 1 << 40])
def test_hard_clusters_plan_has_edge_and_link_actor_memory(halo_bytes):
    """hard-clusters plans its own actors (documented formulas, computed here from
    scratch), not GCN-V's inference actor. At part9 on 64 CPUs a partition's neighbours
    span the corpus: with the default ``halo_bytes`` the halo is fetched in chunks and
    the actors stay small; with an unbounded one they hold it all."""
    n, d, k = 5_206_761, 256, 80
    cfg = Config(method="hard-clusters")
    cfg.methods.hard_clusters.halo_bytes = halo_bytes
    plan = make_plan(n, d, cfg, {"CPU": 64}, hypothetical=True)
    assert "inference_actor" not in plan["memory"]
    n_part, halo = plan["partitions"]["rows_per_partition"], plan["partitions"]["halo_rows_max"]
    assert halo == n - n_part
    base = baselines(load_rates())["worker"]
    chunked = halo_bytes == 1 << 28
    chunk = max(256, halo_bytes // (k * d * 4))  # rows per fetch: their neighbours fit
    feats = (n_part + 3 * chunk * k) * d * 4 if chunked else (2 * n_part + 3 * halo) * d * 4
    edge = (base + n_part * k * 12 + feats + n_part * k * 28
            + int(1.5 * (256 * k * (d + 8 * 128 + 2 * 512) * 4 + 256 * 4 * k * k * 8))
            + 2 * n_part * 20 * 24)
    rows = 3 * 512 * k * k * 8 if chunked else (n_part + 3 * halo) * k * 8
    link = (base + n_part * k * 24 + rows + n * 8
            + max(n_part * k * 16 + 512 * k * k * 100, n_part * k * 53))
    assert plan["memory"]["edge_actor"]["total"] == edge
    assert plan["memory"]["link_actor"]["total"] == link
    assert edge_actor_memory(n_part, halo, d, k, base, halo_bytes=halo_bytes).total == edge
    assert link_actor_memory(n_part, halo, n, k, base, halo_bytes=halo_bytes).total == link
    if chunked:
        assert edge < 2.5e9 and link < 1.5e9
    else:
        assert edge > 3 * halo * d * 4


def test_hard_clusters_plan_uses_its_measured_stage_rates():
    rates = load_rates()
    plan = make_plan(5_206_761, 256, Config(method="hard-clusters"), {"CPU": 64},
                     hypothetical=True)
    jobs = rates["from_jobs"]
    assert plan["expected_seconds"]["link (TPDi)"] == pytest.approx(
        5_206_761 / (jobs["hard_clusters_link_rows_per_cpu_s"] * 64))
    assert plan["expected_seconds"]["score (edge scorer + NDDE)"] > 0
    assert "score (gcn-v inference)" not in plan["expected_seconds"]


def test_benchmark_harness_case_subset_builds_its_graph_untimed(tmp_path):
    """``--cases merge,hard-clusters --graph-index ivf``: no kNN entry; the cases run on an
    IVF graph built once, untimed (how cpu-scale's large sizes stay affordable on a few
    cores). The hard-clusters case (edge and link actors vs the whole graph in one process)
    reports its stage times and checks the edge- and link-actor memory model."""
    out = tmp_path / "subset.json"
    subprocess.run(
        [PYTHON, str(REPO / "benchmarks" / "run.py"), "--suite", "smoke", "--cases",
         "merge,hard-clusters", "--graph-index", "ivf", "--json", str(out), "--work",
         str(tmp_path / "work")],
        check=True, timeout=300, capture_output=True,
    )
    result = json.loads(out.read_text())
    assert [e["name"] for e in result["entries"]] == ["merge", "hard-clusters"]
    assert result["graph_index"] == "ivf"
    manifest = json.loads((tmp_path / "work" / "knn-0.002" / "manifest.json").read_text())
    assert manifest["index"] == "ivf"
    merge, hc = result["entries"]
    assert merge["reference_detail"]["same_partition"] is True
    assert hc["reference_detail"]["same_partition"] is True  # partitioned = whole graph
    detail = hc["ours_detail"]
    assert set(detail["stages_s"]) == {"score", "link", "merge"}
    assert detail["halo_rows"] > 0 and detail["link_halo_rows"] > 0
    checks = {c["stage"]: c for c in result["memory_checks"]}
    assert {"edge_actor", "link_actor"} <= set(checks)
    assert checks["edge_actor"]["measured_bytes"] == detail["edge_actor_rss"]
    bad = subprocess.run(
        [PYTHON, str(REPO / "benchmarks" / "run.py"), "--suite", "smoke", "--cases", "gcn-v"],
        timeout=60, capture_output=True, text=True,
    )
    assert bad.returncode != 0 and "not in suite smoke" in bad.stderr
