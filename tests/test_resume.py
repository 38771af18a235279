"""Resumable stages and failure survival (issue 4, items 3 and 4), on real Ray processes.

- a rerun in the same work area reuses every completed stage and writes identical bytes;
  changing a config key recomputes exactly the stages that depend on it;
- SIGKILL of a kNN shard actor's worker mid-kNN, and of a GCN-V partition actor's worker
  mid-inference: the job (a subprocess with its own local Ray) restarts the actor, retries
  its calls and writes the same clusters as an undisturbed run;
- SIGKILL of the driver mid-link: rerunning the same command reuses plan, kNN and score,
  recomputes only link onwards, and gives the same clusters.

The kills land mid-stage thanks to the test-only ``LTC_RAY_TEST_STAGE_DELAY`` hook
(``ltc_ray.pipeline.stages.delay_for_tests``), which slows the named stage's workers down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from _data import blobs, write_bin
from _models import tiny_gcn_v
from conftest import PYTHON, REPO

from ltc_ray.cli import main
from ltc_ray.io.output import read_clusters
from ltc_ray.pipeline.stages import DELAY_ENV

K = 10
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> Path:
    x, labels = blobs(n_per=30, n_clusters=20, dim=32, spread=0.5, seed=9)
    path = tmp_path_factory.mktemp("resume") / "feats.bin"
    write_bin(path, x, labels)
    return path


def _args(feats: Path, method: str, out: Path, work: Path, *flags: str) -> list[str]:
    return [
        "--features", str(feats),
        "--dim", "32",
        "--labels", str(feats.with_suffix(".meta")),
        "--method", method,
        "--set", f"knn.k={K}",
        *flags,
        "--output", str(out),
        "--work-dir", str(work),
    ]  # fmt: skip


def _in_process(capsys, *args: str) -> dict:
    """One run in this process (the session's local Ray); returns run.json."""
    code = main(["cluster", *args])
    assert code == 0, capsys.readouterr().err
    out = Path(args[args.index("--output") + 1])
    return json.loads((out / "run.json").read_text())


def _clusters(out: Path) -> dict[str, np.ndarray]:
    table = read_clusters(str(out))
    return {c: table.column(c).to_numpy() for c in ("cluster_id", "parent", "score")}


def _assert_same(a: dict, b: dict) -> None:
    for column in ("cluster_id", "parent", "score"):
        np.testing.assert_array_equal(a[column], b[column], err_msg=column)


def _output_bytes(out: Path) -> dict[str, bytes]:
    files = sorted((out / "clusters").glob("*.parquet")) + [out / "cluster_summary.parquet"]
    return {p.name: p.read_bytes() for p in files}


# ------------------------------------------------------------------ reuse and invalidation
def test_stages_are_reused_and_invalidated_by_their_keys(ray_local, feats, tmp_path, capsys):
    work = tmp_path / "w"

    def run(name: str, method: str, *flags: str, work_dir: Path = work) -> dict:
        return _in_process(capsys, *_args(feats, method, tmp_path / name, work_dir, *flags))

    first = run("a", "knn-cc")
    assert first["reused_stages"] == []
    assert set(first["stage_fingerprints"]) == {"plan", "knn", "score", "link"}
    for stage in ("plan", "knn", "score", "link", "write"):
        marker = json.loads((work / "stages" / stage / "_DONE").read_text())
        assert marker["fingerprint"] == (first["stage_fingerprints"].get(stage) or
                                         marker["fingerprint"])  # fmt: skip
    # the same command again: everything reused, byte-identical cluster files
    again = run("b", "knn-cc")
    assert again["reused_stages"] == ["plan", "knn", "score", "link"]
    assert again["stages"]["knn"]["skipped"] and again["stages"]["link"]["skipped"]
    assert again["stage_fingerprints"] == first["stage_fingerprints"]
    assert _output_bytes(tmp_path / "b") == _output_bytes(tmp_path / "a")
    assert again["metrics"] == first["metrics"]
    # a stage whose artifact is gone is computed again (its marker alone proves nothing)
    (work / "stages" / "score" / "scores.npy").unlink()
    lost = run("b2", "knn-cc")
    assert lost["reused_stages"] == ["plan", "knn", "link"]
    assert _output_bytes(tmp_path / "b2") == _output_bytes(tmp_path / "a")
    # other labels: the input scan is redone, the graph and everything after it is not
    labels = tmp_path / "labels-copy.meta"
    labels.write_bytes(feats.with_suffix(".meta").read_bytes())
    relabelled = run("b3", "knn-cc", "--labels", str(labels))  # (the last --labels wins)
    assert relabelled["reused_stages"] == ["knn", "score", "link"]
    assert relabelled["metrics"] == first["metrics"]
    # a link threshold: kNN and scores reused, linking redone; equal to a run from scratch
    # (back to the first labels: the scan runs again, one result per stage is kept)
    low = run("c", "knn-cc", "--set", "methods.knn-cc.threshold=0.55")
    assert low["reused_stages"] == ["knn", "score"]
    assert low["stage_fingerprints"]["link"] != first["stage_fingerprints"]["link"]
    fresh = run("c-fresh", "knn-cc", "--set", "methods.knn-cc.threshold=0.55",
                work_dir=tmp_path / "fresh")  # fmt: skip
    assert fresh["reused_stages"] == []
    _assert_same(_clusters(tmp_path / "c"), _clusters(tmp_path / "c-fresh"))
    # knn.k: every stage after the input scan is redone
    k12 = run("d", "knn-cc", "--set", "knn.k=12")
    assert k12["reused_stages"] == ["plan"]
    # density-peak: tau is a link key, neighbors a score key
    dp = run("e", "density-peak", "--set", "knn.k=12")
    assert dp["reused_stages"] == ["plan", "knn"]
    assert run("f", "density-peak", "--set", "knn.k=12", "--set", "methods.density-peak.tau=0.5")[
        "reused_stages"
    ] == ["plan", "knn", "score"]
    neighbors = run("g", "density-peak", "--set", "knn.k=12",
                    "--set", "methods.density-peak.neighbors=5")  # fmt: skip
    assert neighbors["reused_stages"] == ["plan", "knn"]
    # a learned method: the model's content is part of the score fingerprint (one slot per
    # stage: the k=10 graph was replaced by the k=12 one, so kNN is built again here)
    model = tmp_path / "model"
    tiny_gcn_v(model, 32, K, seed=0)
    assert run("h", "gcn-v", "--model", str(model))["reused_stages"] == ["plan"]
    assert run("i", "gcn-v", "--model", str(model))["reused_stages"] == [
        "plan", "knn", "score", "link"
    ]  # fmt: skip
    tiny_gcn_v(model, 32, K, seed=1)  # retrained into the same directory
    assert run("j", "gcn-v", "--model", str(model))["reused_stages"] == ["plan", "knn"]


# ------------------------------------------------------------------ killing processes
def _launch(args: list[str], log: Path, delay: str | None) -> subprocess.Popen:
    """``jobs/cluster.py`` as a subprocess starting its own local Ray (2 CPUs)."""
    env = {**os.environ, **ENV}
    env.pop("RAY_ADDRESS", None)
    env.pop(DELAY_ENV, None)
    if delay:
        env[DELAY_ENV] = delay
    with open(log, "w") as fh:
        return subprocess.Popen(
            [PYTHON, "jobs/cluster.py", *args, "--num-cpus", "2"],
            cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


def _ray_workers(job: subprocess.Popen, name: str) -> list[psutil.Process]:
    """This job's Ray worker processes running actor class ``name`` (descendants of the
    job's driver only: other Ray clusters on the machine are never touched)."""
    found = []
    try:
        children = psutil.Process(job.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for child in children:
        try:
            if child.cmdline() and child.cmdline()[0].startswith(f"ray::{name}"):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _wait_for(predicate, what: str, timeout: float = 120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _reap(processes: list[psutil.Process]) -> None:
    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(processes, timeout=15)


def _kill_worker_mid_stage(job, log: Path, actor: str, stage: str) -> None:
    """SIGKILL one of ``actor``'s worker processes while ``stage`` runs; check that Ray
    started a replacement (an actor restart, not just a failed call)."""
    try:
        _wait_for(lambda: f"stage {stage}: start" in log.read_text(), f"stage {stage}")
        _wait_for(lambda: _ray_workers(job, actor), f"a {actor} worker")
        time.sleep(1.0)  # well inside the (delayed) stage
        victims = _ray_workers(job, actor)  # every live one: a new pid must be a restart
        victim = victims[0]
        os.kill(victim.pid, signal.SIGKILL)
        assert f"stage {stage}: done" not in log.read_text(), "the kill came too late"
        victim.wait(timeout=10)
        old = {p.pid for p in victims}
        _wait_for(
            lambda: [p for p in _ray_workers(job, actor) if p.pid not in old] or job.poll(),
            f"a restarted {actor}",
        )
        assert job.wait(timeout=240) == 0, log.read_text()[-4000:]
    finally:
        if job.poll() is None:
            rest = psutil.Process(job.pid).children(recursive=True)
            job.kill()
            _reap(rest)


def test_knn_worker_killed_mid_stage(ray_local, feats, tmp_path, capsys):
    flags = ("--set", "knn.mode=shard", "--set", "knn.shards=2", "--set", "knn.block_rows=100")
    _in_process(capsys, *_args(feats, "knn-cc", tmp_path / "ref", tmp_path / "ref.w", *flags))
    log = tmp_path / "job.log"
    job = _launch(_args(feats, "knn-cc", tmp_path / "out", tmp_path / "w", *flags), log, "knn:0.5")
    _kill_worker_mid_stage(job, log, "KnnShardActor", "knn")
    _assert_same(_clusters(tmp_path / "ref"), _clusters(tmp_path / "out"))


def test_gcn_v_worker_killed_mid_inference(ray_local, feats, tmp_path, capsys):
    model = tiny_gcn_v(tmp_path / "model", 32, K)
    flags = ("--model", model, "--set", "cluster.partitions=3")
    _in_process(capsys, *_args(feats, "gcn-v", tmp_path / "ref", tmp_path / "ref.w", *flags))
    log = tmp_path / "job.log"
    job = _launch(_args(feats, "gcn-v", tmp_path / "out", tmp_path / "w", *flags), log, "score:2")
    _kill_worker_mid_stage(job, log, "PartitionActor", "score")
    _assert_same(_clusters(tmp_path / "ref"), _clusters(tmp_path / "out"))


def test_driver_killed_mid_run_resumes(ray_local, feats, tmp_path, capsys):
    flags = ("--set", "cluster.partitions=2")
    _in_process(capsys, *_args(feats, "knn-cc", tmp_path / "ref", tmp_path / "ref.w", *flags))
    args = _args(feats, "knn-cc", tmp_path / "out", tmp_path / "w", *flags)
    log = tmp_path / "job.log"
    job = _launch(args, log, "link:3")
    try:
        _wait_for(lambda: "stage link: start" in log.read_text(), "stage link")
        time.sleep(0.5)
        ray_processes = psutil.Process(job.pid).children(recursive=True)
        job.send_signal(signal.SIGKILL)
        assert job.wait(timeout=10) == -signal.SIGKILL
    finally:
        if job.poll() is None:
            job.kill()
    _reap(ray_processes)  # Ray's own fate-sharing usually got there first
    said = log.read_text()
    assert "stage score: done" in said and "stage link: done" not in said
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert not (tmp_path / "w" / "stages" / "link" / "_DONE").exists()
    # the same command again, now undisturbed
    log2 = tmp_path / "job2.log"
    again = _launch(args, log2, None)
    assert again.wait(timeout=240) == 0, log2.read_text()[-4000:]
    said = log2.read_text()
    for stage in ("plan", "knn", "score"):
        assert f"stage {stage}: reusing completed result" in said
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["reused_stages"] == ["plan", "knn", "score"]
    assert "skipped" not in run["stages"]["link"]
    _assert_same(_clusters(tmp_path / "ref"), _clusters(tmp_path / "out"))
