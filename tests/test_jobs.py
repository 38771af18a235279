"""The jobs end to end: subprocess runs of jobs/*.py, the output contract, bad input,
precomputed-kNN reuse, tuning, determinism across shards/partitions, `ray job submit`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from _data import blobs, write_bin
from conftest import PYTHON, REPO

from ltc_ray.cli import main
from ltc_ray.io.knn_files import write_ltc_knn
from ltc_ray.io.labels import read_labels
from ltc_ray.io.output import read_clusters
from ltc_ray.knn import exact_knn
from ltc_ray.metrics import evaluate

METRIC_KEYS = {
    "pairwise_precision",
    "pairwise_recall",
    "pairwise_f",
    "bcubed_precision",
    "bcubed_recall",
    "bcubed_f",
    "nmi",
    "n_samples",
    "n_clusters",
}


def run_job(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _cluster_ids(output: Path) -> np.ndarray:
    return read_clusters(str(output)).column("cluster_id").to_numpy()


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "out"
    proc = run_job(
        "jobs/cluster.py",
        "--part",
        "1",
        "--data-root",
        str(synthetic_root),
        "--method",
        "density-peak",
        "--output",
        str(out),
        "--num-cpus",
        "2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_cluster_job_writes_the_output_contract(finished_run, synthetic_root):
    out, proc = finished_run
    labels = read_labels(str(synthetic_root / "labels" / "part1_test.meta"))
    n = len(labels)
    assert 9000 < n < 11000
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["rows"] == n
    files = {f["path"]: f["rows"] for f in success["files"]}
    assert "cluster_summary.parquet" in files
    parts = sorted(p.relative_to(out).as_posix() for p in (out / "clusters").glob("part-*.parquet"))
    assert parts == sorted(p for p in files if p.startswith("clusters/"))
    table = pq.read_table(out / "clusters").sort_by("sample_id")
    assert table.schema.names[:4] == ["sample_id", "cluster_id", "score", "parent"]
    assert [str(t) for t in table.schema.types[:4]] == ["int64", "int64", "float", "int64"]
    sample_id = table.column("sample_id").to_numpy()
    cid = table.column("cluster_id").to_numpy()
    parent = table.column("parent").to_numpy()
    np.testing.assert_array_equal(sample_id, np.arange(n))
    sizes = np.bincount(cid)
    assert cid.min() == 0 and (sizes > 0).all() and (np.diff(sizes) <= 0).all()
    assert ((parent == -1) | ((parent >= 0) & (parent < n))).all()
    assert (cid[parent[parent >= 0]] == cid[parent >= 0]).all()
    summary = pq.read_table(out / "cluster_summary.parquet")
    np.testing.assert_array_equal(summary.column("size").to_numpy(), sizes)
    np.testing.assert_array_equal(
        cid[summary.column("representative").to_numpy()], np.arange(len(sizes))
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    expected = evaluate(labels, cid)
    assert metrics["pairwise_f"] == pytest.approx(expected["pairwise_f"])
    assert 0.2 < metrics["pairwise_f"] <= 1.0
    run = json.loads((out / "run.json").read_text())
    assert run["n_samples"] == n and run["dim"] == 256 and run["method"] == "density-peak"
    for stage in ("plan", "knn", "score", "link", "merge", "write"):
        assert run["stages"][stage]["seconds"] >= 0
        assert run["stages"][stage]["worker_peak_rss_bytes"] > 0
    assert run["driver_peak_rss_bytes"] > 0 and "ray" in run["versions"]
    assert run["config"]["knn"]["k"] == 80
    assert "F_pair" in proc.stdout and str(out) in proc.stdout
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no temp files left


def test_completed_output_is_not_overwritten(finished_run, synthetic_root):
    out, _ = finished_run
    before = (out / "_SUCCESS").read_text()
    proc = run_job(
        "jobs/cluster.py", "--part", "1", "--data-root", str(synthetic_root), "--output", str(out)
    )
    assert proc.returncode == 2
    assert "--overwrite" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (out / "_SUCCESS").read_text() == before


def test_evaluate_job_and_refusal_without_success(finished_run, synthetic_root, tmp_path):
    out, _ = finished_run
    labels = synthetic_root / "labels" / "part1_test.meta"
    proc = run_job(
        "jobs/evaluate.py",
        "--pred",
        str(out),
        "--labels",
        str(labels),
        "--json",
        str(tmp_path / "m.json"),
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "m.json").read_text())
    want = json.loads((out / "metrics.json").read_text())
    assert got["pairwise_f"] == pytest.approx(want["pairwise_f"])
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "_SUCCESS").unlink()
    proc = run_job("jobs/evaluate.py", "--pred", str(broken), "--labels", str(labels))
    assert proc.returncode == 2 and "_SUCCESS" in proc.stderr


def test_help_of_every_job():
    for job in ("cluster", "make_synthetic", "evaluate", "tune", "export_knn"):
        proc = run_job(f"jobs/{job}.py", "--help", timeout=60)
        assert proc.returncode == 0 and "usage:" in proc.stdout, job
    proc = subprocess.run(
        [str(Path(PYTHON).parent / "ltc-ray"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "cluster" in proc.stdout


# ------------------------------------------------------------------ bad input
@pytest.fixture()
def good_set(tmp_path):
    x, labels = blobs(n_per=20, n_clusters=10, dim=16, spread=0.5, seed=0)
    path = tmp_path / "f.bin"
    write_bin(path, x, labels)
    return path, x, labels


def _bad_input(capsys, tmp_path, *args) -> str:
    out = tmp_path / "out"
    code = main(["cluster", "--set", "knn.k=10", *args, "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert not (out / "_SUCCESS").exists() and not out.exists()
    error_lines = [line for line in err if line.startswith("error:")]
    assert len(error_lines) == 1, err
    return error_lines[0]


def test_truncated_bin_exits_2(tmp_path, good_set, capsys):
    path, _, _ = good_set
    path.write_bytes(path.read_bytes()[:-6])
    line = _bad_input(capsys, tmp_path, "--features", str(path), "--dim", "16")
    assert str(path) in line and "multiple" in line


def test_wrong_dim_exits_2(tmp_path, good_set, capsys):
    path, _, _ = good_set
    line = _bad_input(capsys, tmp_path, "--features", str(path), "--dim", "24")
    assert str(path) in line and "--dim" in line


def test_empty_and_missing_files_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert "empty" in _bad_input(capsys, tmp_path, "--features", str(empty))
    assert "not found" in _bad_input(capsys, tmp_path, "--features", str(tmp_path / "nope.bin"))


def test_label_count_mismatch_exits_2(ray_local, tmp_path, good_set, capsys):
    path, _, labels = good_set
    short = tmp_path / "short.meta"
    short.write_text("\n".join(map(str, labels[:-3])) + "\n")
    line = _bad_input(
        capsys, tmp_path, "--features", str(path), "--dim", "16", "--labels", str(short)
    )
    assert str(short) in line and "197" in line and "200" in line


def test_nan_rows_exit_2(ray_local, tmp_path, good_set, capsys):
    path, x, labels = good_set
    x = x.copy()
    x[123, 5] = np.nan
    write_bin(path, x, labels)
    line = _bad_input(capsys, tmp_path, "--features", str(path), "--dim", "16")
    assert str(path) in line and "row 123" in line


def test_k_not_below_n_and_unknown_method_exit_2(tmp_path, good_set, capsys):
    path, _, _ = good_set
    line = _bad_input(
        capsys, tmp_path, "--features", str(path), "--dim", "16", "--set", "knn.k=200"
    )
    assert "knn.k" in line and "200" in line
    line = _bad_input(capsys, tmp_path, "--features", str(path), "--dim", "16", "--method", "magic")
    assert "unknown method 'magic'" in line
    line = _bad_input(capsys, tmp_path, "--features", str(path), "--set", "knn.bogus=1")
    assert "unknown config key 'bogus'" in line


def test_bad_input_in_a_subprocess_exits_2_before_work(tmp_path, good_set):
    path, _, _ = good_set
    path.write_bytes(path.read_bytes()[:-4])
    out = tmp_path / "out"
    proc = run_job(
        "jobs/cluster.py", "--features", str(path), "--dim", "16", "--output", str(out), timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path}")
    assert not out.exists()


# ------------------------------------------------------------------ reuse, tuning, determinism
def test_precomputed_ltc_knn_is_reused(ray_local, tmp_path, capsys):
    x, labels = blobs(n_per=30, n_clusters=20, dim=16, spread=0.5, seed=4)
    root = tmp_path / "data"
    write_bin(root / "features" / "part1_test.bin", x)
    (root / "labels").mkdir()
    (root / "labels" / "part1_test.meta").write_text("\n".join(map(str, labels)) + "\n")
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ids, sims = exact_knn(xn, 20)
    write_ltc_knn(str(root / "knns" / "part1_test" / "faiss_k_20.npz"), len(x), 20, [(ids, sims)])
    common = [
        "--part",
        "1",
        "--data-root",
        str(root),
        "--dim",
        "16",
        "--set",
        "knn.k=20",
        "--method",
        "knn-cc",
        "--set",
        "methods.knn-cc.threshold=0.6",
    ]
    assert main(["cluster", *common, "--output", str(tmp_path / "a")]) == 0
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["knn_source"] == "imported"
    assert (
        main(["cluster", *common, "--set", "knn.reuse=false", "--output", str(tmp_path / "b")]) == 0
    )
    assert json.loads((tmp_path / "b" / "run.json").read_text())["knn_source"] == "computed"
    np.testing.assert_array_equal(_cluster_ids(tmp_path / "a"), _cluster_ids(tmp_path / "b"))
    # an explicit --knn wins over the part's own file (here: moved away, so only --knn has it)
    moved = tmp_path / "elsewhere.npz"
    (root / "knns" / "part1_test" / "faiss_k_20.npz").rename(moved)
    assert main(["cluster", *common, "--knn", str(moved), "--output", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "run.json").read_text())["knn_source"] == "imported"
    np.testing.assert_array_equal(_cluster_ids(tmp_path / "a"), _cluster_ids(tmp_path / "c"))
    capsys.readouterr()
    assert main(["cluster", *common, "--knn", str(tmp_path / "missing.npz"),
                 "--output", str(tmp_path / "d")]) == 2
    assert "kNN file not found (--knn)" in capsys.readouterr().err


def test_tune_writes_a_config_used_on_test(ray_local, synthetic_root, tmp_path, capsys):
    cfg_path = tmp_path / "tuned.yaml"
    code = main(
        [
            "tune",
            "--part",
            "0",
            "--data-root",
            str(synthetic_root),
            "--method",
            "knn-cc",
            "--grid",
            "0.4:0.8:0.02",
            "--work-dir",
            str(tmp_path / "w"),
            "--output-config",
            str(cfg_path),
        ]
    )
    assert code == 0, capsys.readouterr().err
    tuned = yaml.safe_load(cfg_path.read_text())
    best = tuned["methods"]["knn-cc"]["threshold"]
    assert tuned["method"] == "knn-cc" and 0.4 <= best <= 0.8
    stdout = capsys.readouterr().out
    assert f"threshold = {best:.4f}" in stdout
    out = tmp_path / "test-run"
    assert (
        main(
            [
                "cluster",
                "--part",
                "1",
                "--data-root",
                str(synthetic_root),
                "--config",
                str(cfg_path),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["methods"]["knn-cc"]["threshold"] == best
    capsys.readouterr()


def test_same_clusters_whatever_shards_partitions_and_workers(
    ray_local, synthetic_root, tmp_path, capsys
):
    runs = {
        "one": [
            "--set",
            "knn.mode=replicate",
            "--set",
            "cluster.partitions=1",
            "--set",
            "cluster.merge=local",
            "--set",
            "knn.block_rows=100000",
        ],
        "many": [
            "--set",
            "knn.mode=shard",
            "--set",
            "knn.shards=3",
            "--set",
            "cluster.partitions=5",
            "--set",
            "cluster.merge=forest",
            "--set",
            "knn.block_rows=1500",
        ],
    }
    results = {}
    for name, flags in runs.items():
        out = tmp_path / name
        code = main(
            [
                "cluster",
                "--part",
                "1",
                "--data-root",
                str(synthetic_root),
                "--method",
                "density-peak",
                "--output",
                str(out),
                *flags,
            ]
        )
        assert code == 0, capsys.readouterr().err
        table = read_clusters(str(out))
        results[name] = {c: table.column(c).to_numpy() for c in ("cluster_id", "score", "parent")}
    for column in ("cluster_id", "score", "parent"):
        np.testing.assert_array_equal(results["one"][column], results["many"][column])


def test_export_knn_round_trips_to_ltc_npz(finished_run, tmp_path):
    out, _ = finished_run
    npz = tmp_path / "faiss_k_80.npz"
    proc = run_job(
        "jobs/export_knn.py", "--work-dir", f"{out}.work", "--output", str(npz), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    data = np.load(npz)["data"]
    assert data.shape[1:] == (2, 80) and data.dtype == np.float64
    np.testing.assert_array_equal(data[:, 0, 0], np.arange(len(data)))
    assert (np.diff(data[:, 1, :], axis=1) >= -1e-6).all()  # sorted by distance


# ------------------------------------------------------------------ ray job submit
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_cluster(temp_dir: str) -> None:
    """Stop only the cluster started under ``temp_dir`` (``ray stop`` would also kill the
    test session's own local Ray)."""
    import psutil

    victims = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                victims.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in victims:
        proc.terminate()
    _, alive = psutil.wait_procs(victims, timeout=15)
    for proc in alive:
        proc.kill()


def test_ray_job_submit_on_a_started_cluster(tmp_path):
    x, labels = blobs(n_per=40, n_clusters=25, dim=32, spread=0.5, seed=9)
    path = tmp_path / "feats.bin"
    write_bin(path, x, labels)
    out = tmp_path / "out"
    ray_bin = str(Path(PYTHON).parent / "ray")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # the job's `python` must be the interpreter that has the project installed
        "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    dash = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ltcray", dir="/tmp")  # short: unix socket paths
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--num-cpus",
            "2",
            "--port",
            str(_free_port()),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            # every listening port explicit: the test session's own Ray holds the defaults
            *[
                arg
                for flag in (
                    "--ray-client-server-port",
                    "--dashboard-agent-listen-port",
                    "--dashboard-agent-grpc-port",
                    "--metrics-export-port",
                    "--runtime-env-agent-port",
                    "--node-manager-port",
                    "--object-manager-port",
                )
                for arg in (flag, str(_free_port()))
            ],
            "--disable-usage-stats",
            "--temp-dir",
            temp_dir,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        runtime_env = json.dumps({"excludes": [".venv", ".git", "runs", "data", "*.egg-info"]})
        deadline = time.time() + 150
        while True:  # the job server answers a little after `ray start` returns
            submit = subprocess.run(
                [
                    ray_bin,
                    "job",
                    "submit",
                    "--address",
                    f"http://127.0.0.1:{dash}",
                    "--working-dir",
                    ".",
                    "--runtime-env-json",
                    runtime_env,
                    "--",
                    "python",
                    "jobs/cluster.py",
                    "--features",
                    str(path),
                    "--dim",
                    "32",
                    "--labels",
                    str(path.with_suffix(".meta")),
                    "--method",
                    "knn-cc",
                    "--set",
                    "knn.k=20",
                    "--set",
                    "methods.knn-cc.threshold=0.6",
                    "--output",
                    str(out),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
                env=env,
            )
            if submit.returncode == 0 or time.time() > deadline or "SUCCEEDED" in submit.stdout:
                break
            said = submit.stdout + submit.stderr
            if "Connection" not in said and "No available agent" not in said:
                break
            time.sleep(3)
        assert submit.returncode == 0, (submit.stdout[-3000:], submit.stderr[-3000:])
        assert "joining the Ray cluster" in submit.stdout + submit.stderr
        table = pq.read_table(out / "clusters")
        assert table.num_rows == len(x)
        assert json.loads((out / "metrics.json").read_text())["pairwise_f"] > 0.99
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
