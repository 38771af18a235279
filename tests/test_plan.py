"""Plans at scale (``cluster --dry-run``), the memory model behind them and the benchmark
harness that checks it."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, REPO

from ltc_ray.cli import main
from ltc_ray.cluster.base import REGISTRY, ClusterMethod, ScoreOutput, Shape, register
from ltc_ray.cluster.gcn_v.plan import inference_actor_memory
from ltc_ray.cluster.hard_clusters.plan import edge_actor_memory, link_actor_memory
from ltc_ray.config import Config
from ltc_ray.knn.search import TIE_MARGIN
from ltc_ray.params import COSINE, param
from ltc_ray.pipeline.plan import (
    baselines,
    format_plan,
    knn_actor_memory,
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
            "--method",
            "density-peak",
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
    # density-peak: a task per partition to score and to link, then the merge
    for stage in ("driver", "knn_actor", "score_task", "link_task", "merge"):
        assert _gb(text, stage) > 0
    assert re.search(r"^\s*score \(rows\)\s+5 tasks\s", text, re.M)
    assert re.search(r"^\s*link \(rows\)\s+5 tasks\s", text, re.M)
    assert "inference_actor" not in text
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
    # 1.2 MB of features: replicated, searched by one task per CPU (no actors)
    assert f"mode=tasks shards={cpus:g} " in text and "1 thread(s)" in text
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
    # the kNN actor line equals the documented formula, computed here from scratch (a kNN
    # actor imports faiss but not torch: its own measured baseline)
    knn_base = baselines(load_rates())["knn_worker"]
    assert knn_base < baselines(load_rates())["worker"]
    base = baselines(load_rates())["worker"]
    n_s, d, k, b = 3_846_154, 256, 80, 16384
    expected = (
        knn_base
        + 2 * n_s * d * 4
        + b * d * 4
        + b * (k + TIE_MARGIN) * 64
        + 4096 * 1024 * 4
    )
    assert _gb(text, "knn_actor") == pytest.approx(expected / 1e9, abs=0.006)
    assert knn_actor_memory(n_s, d, k, b, knn_base, "ivf", True, 10**8).total == expected
    # IVF host copy off the GPU: the same shard on CPUs also holds faiss' copy (+ ids)
    cpu = knn_actor_memory(n_s, d, k, b, knn_base, "ivf", False, 10**8).total
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
    # the memory model holds: every stage the suite measures is predicted within 25 %
    off = {}
    for c in result["memory_checks"]:
        assert c["predicted_bytes"] > 0 and c["measured_bytes"] > 0
        off[c["stage"]] = c["measured_bytes"] / c["predicted_bytes"] - 1
    assert all(abs(v) <= 0.25 for v in off.values()), (
        "measured/predicted - 1 per stage: " + ", ".join(f"{s} {v:+.1%}" for s, v in off.items())
    )


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


def test_dry_run_of_a_whole_graph_method_plans_one_task_at_64_bytes_per_edge(capsys):
    """Chinese whispers clusters the whole graph in ONE task: the plan says so and sizes it
    at the 64 B per kNN edge ``cluster/whole_graph.py`` documents (~26 GB at 5.21M x 80).
    (Infomap runs in pieces: tests/test_map_equation_method.py.)"""
    n, d, k = 5_206_761, 256, 80
    code = main(["cluster", "--dry-run", "--rows", str(n), "--dim", str(d),
                 "--resources", '{"CPU": 64}', "--method", "chinese-whispers"])
    text = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^\s*link \(whole graph\)\s+1 task\s+ONE task holding the whole kNN graph",
                     text, re.M), text
    assert re.search(r"^\s*score \(rows\)\s+64 tasks\s", text, re.M)
    assert not re.search(r"^\s*merge\s", text, re.M)  # the one task also merges
    base = baselines(load_rates())["worker"]
    edges = n * (k - 1)
    expected = base + 64 * edges + n * (8 + 60)
    assert _gb(text, "whole_graph_task") == pytest.approx(expected / 1e9, abs=0.006)
    assert 26e9 < expected < 27.5e9
    plan = make_plan(n, d, Config(method="chinese-whispers"), {"CPU": 64}, hypothetical=True)
    assert plan["memory"]["whole_graph_task"]["terms"]["kNN graph (64 B per edge)"] == 64 * edges
    assert [(s["name"], s["tasks"]) for s in plan["stages"]] == [
        ("score (rows)", 64), ("link (whole graph)", 1)]
    assert "merge" not in plan["expected_seconds"] and "merge" not in plan["memory"]
    # k-means' shape asks for the feature matrix too: N·D·4 more in the same task
    km = make_plan(n, d, Config(method="kmeans"), {"CPU": 64}, hypothetical=True)
    assert (km["memory"]["whole_graph_task"]["total"]
            - plan["memory"]["whole_graph_task"]["total"]) == n * d * 4


def test_density_peak_plans_partition_tasks_and_gcn_v_its_inference_actor():
    """Each method's stages come from the method: density-peak scores and links in a task
    per partition (no inference actor); GCN-V plans its inference actor (the formula from
    docs/memory.md, computed here) without reading a model (none is configured)."""
    n, d, k = 1_000_000, 256, 80
    base = baselines({})["worker"]
    dp = make_plan(n, d, Config(method="density-peak"), {"CPU": 8}, rates={}, hypothetical=True)
    assert set(dp["memory"]) == {"driver", "knn_actor", "score_task", "link_task", "merge"}
    assert [s["name"] for s in dp["stages"]] == ["score (rows)", "link (rows)"]
    n_p = dp["partitions"]["rows_per_partition"]
    assert dp["partitions"]["count"] == 8 and n_p == 125_000
    assert dp["memory"]["score_task"]["total"] == base + n_p * k * 8 + n_p * 4
    assert dp["memory"]["link_task"]["total"] == base + n_p * k * 8 + n * 8 + n_p * (k - 1) * 56
    assert dp["expected_seconds"]["score (rows)"] is None  # no rates given
    cfg = Config(method="gcn-v")
    assert cfg.methods.gcn_v.model == ""  # loading would refuse this: the plan never loads
    gv = make_plan(n, d, cfg, {"CPU": 8}, rates={}, hypothetical=True)
    halo = gv["partitions"]["halo_rows_max"]
    e = 2 * n_p * (k - 1)
    expected = (base + n_p * k * 8 + n_p * (k - 1) * 20 + (3 * n_p + halo) * d * 4 + e * 50
                + min(n_p, 65536) * (2 * d + 3 * 512) * 4 + n_p * 513 * 4)
    assert gv["memory"]["inference_actor"]["total"] == expected
    assert inference_actor_memory(n_p, halo, d, k, base).total == expected
    assert "score_task" not in gv["memory"] and "link_task" in gv["memory"]
    assert "inference_actor" not in dp["memory"]
    rates = {"rates": {"gcn_v_rows_per_cpu_s": 1000.0}}
    timed = make_plan(n, d, cfg, {"CPU": 8}, rates=rates, hypothetical=True)
    assert timed["expected_seconds"]["score (gcn-v inference)"] == pytest.approx(n / 8000)


def test_rates_ship_as_package_data_and_an_installed_package_finds_them(tmp_path):
    """The rates live in the package (``ltc_ray/data/rates.json``, importlib.resources):
    a wheel built from the tree carries them, and its ltc_ray, imported alone (no
    checkout, no site-packages), plans with the same record."""
    import ltc_ray

    shipped = resources.files("ltc_ray").joinpath("data/rates.json")
    assert Path(str(shipped)) == Path(ltc_ray.__file__).parent / "data" / "rates.json"
    record = json.loads(shipped.read_text())
    assert load_rates() == record and record["rates"]["knn_flat_flops_per_cpu_s"] > 0
    assert not (REPO / "benchmarks" / "rates.json").exists()
    src = tmp_path / "src"  # build from a copy: no build/ or egg-info in the checkout
    shutil.copytree(REPO / "ltc_ray", src / "ltc_ray",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([PYTHON, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                    "-w", str(tmp_path / "dist"), str(src)],
                   check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("ltc_ray-*.whl")
    shipped_files = zipfile.ZipFile(wheel).namelist()
    assert "ltc_ray/data/rates.json" in shipped_files
    for page in ("index.html", "app.js", "style.css"):  # the results browser's page
        assert f"ltc_ray/serve/static/{page}" in shipped_files
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = ("import json, ltc_ray\nfrom ltc_ray.plan_model import load_rates\n"
              "print(json.dumps([ltc_ray.__file__, load_rates()]))")
    proc = subprocess.run([PYTHON, "-S", "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    where, got = json.loads(proc.stdout)
    assert Path(where).is_relative_to(site) and got == record


@dataclass
class _ToyParams:
    threshold: float = param(0.5, valid=COSINE)  # ranges declared like any method's


class _Toy(ClusterMethod):
    """A method no planner code knows: every hook a test shape may call, none used here."""

    Params = _ToyParams

    def score(self, part):
        return np.zeros(len(part.knn_ids), np.float32)

    def score_halo(self, part):
        return ScoreOutput(np.zeros(len(part.knn_ids), np.float32))

    def link_halo(self, part, scores, context=None):
        raise NotImplementedError

    def cluster_graph(self, knn_ids, knn_sims, features=None):
        return np.arange(len(knn_ids))


@pytest.mark.parametrize("kind", ["whole-graph", "halo"])
def test_a_new_method_is_planned_from_its_shape(kind, capsys):
    """A method registered here (no edit to the planner) gets the stages, memory and rate
    keys its shape implies, through the CLI's ``--dry-run`` and ``make_plan``."""
    name = f"toy-{kind}"
    shape = (Shape(score="rows", link="whole-graph", whole_graph_features=True)
             if kind == "whole-graph" else
             Shape(score="halo", node_features=True, link="halo", link_graph="node-features",
                   link_halo_features=True, link_k=30))
    register(type(f"Toy{kind.title()}", (_Toy,), {"name": name, "shape": shape}))
    try:
        n, d, k = 100_000, 64, 80
        assert main(["cluster", "--dry-run", "--rows", str(n), "--dim", str(d),
                     "--resources", '{"CPU": 4}', "--method", name]) == 0
        text = capsys.readouterr().out
        assert f"method={name}" in text
        slug = name.replace("-", "_")
        rates = {"rates": {f"{slug}_score_rows_per_cpu_s": 1000.0,
                           f"{slug}_link_rows_per_cpu_s": 700.0,
                           f"{slug}_link_rows_per_s": 500.0}}
        plan = make_plan(n, d, Config(method=name), {"CPU": 4}, rates=rates, hypothetical=True)
        n_p, parts = plan["partitions"]["rows_per_partition"], plan["partitions"]["count"]
        assert parts == 4 and n_p == 25_000
        base = baselines(rates)["worker"]
        seconds = plan["expected_seconds"]
        assert f"{name} stages:" in format_plan(plan)
        if kind == "whole-graph":
            assert re.search(r"^\s*link \(whole graph\)\s+1 task\s", text, re.M)
            assert [s["name"] for s in plan["stages"]] == ["score (rows)", "link (whole graph)"]
            assert plan["memory"]["whole_graph_task"]["total"] == (
                base + n * (k - 1) * 64 + n * d * 4 + n * 68)
            assert plan["memory"]["score_task"]["total"] == base + n_p * k * 8 + n_p * 4
            assert seconds["score (rows)"] == pytest.approx(n / (1000.0 * 4))
            assert seconds["link (whole graph)"] == pytest.approx(n / 500.0)
            assert "merge" not in plan["memory"]
        else:
            assert re.search(r"^\s*link \(halo actors\)\s+4 tasks\s", text, re.M)
            halo = plan["partitions"]["halo_rows_max"]
            assert plan["memory"]["score_actor"]["total"] == (
                base + n_p * k * 8 + (2 * n_p + halo) * d * 4 + n_p * 4 + n_p * d * 4)
            h30 = min(n - n_p, n_p * 29)  # the link graph's own k = 30
            assert plan["memory"]["link_actor"]["total"] == (
                base + (n_p + 3 * h30) * 30 * 8 + (n_p + 3 * h30) * d * 4 + n * 8
                + n_p * 29 * 56)
            assert seconds["link (halo actors)"] == pytest.approx(n / (700.0 * 4))
            assert "merge" in plan["memory"]
            assert any("second kNN graph" in note for note in plan["notes"])
    finally:
        REGISTRY.pop(name, None)
    assert name not in REGISTRY
