"""Resumable stages and failure survival (issue 4, items 3 and 4), on real Ray processes.

- a rerun in the same work area reuses every completed stage and writes identical bytes;
  changing a config key recomputes exactly the stages that depend on it;
- SIGKILL of a kNN shard actor's worker mid-kNN, and of a GCN-V partition actor's worker
  mid-inference: the job (a subprocess with its own local Ray) restarts the actor, retries
  its calls and writes the same clusters as an undisturbed run;
- SIGKILL of the driver mid-link: rerunning the same command reuses plan, kNN and score,
  recomputes only link onwards, and gives the same clusters;
- inputs are keyed by their version everywhere (issue 13): a ``--knn`` file replaced in
  place (same size and mtime) is imported again, a small input's version is its content
  hash, and deleting ``stages/knn/_DONE`` recomputes the kNN;
- resume heals (issue 13): after deleting, truncating or flipping bytes of random work
  files (stage arrays, ``_DONE`` markers, kNN blocks and manifests, the re-scored and
  feature-pass graphs, node features), the same command recomputes exactly the stage that
  owned the damaged file and gives the clean run's clusters; damage found while loading is
  a WorkFileError (not bad input) that drops the marker vouching for the file.

The kills land mid-stage thanks to the test-only ``LTC_RAY_TEST_STAGE_DELAY`` hook
(``ltc_ray.pipeline.stages.delay_for_tests``), which slows the named stage's workers down.
"""

from __future__ import annotations

import hashlib
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
from _models import tiny_gcn_v, tiny_hard_clusters
from conftest import PYTHON, REPO

from ltc_ray.cli import main
from ltc_ray.errors import InputError
from ltc_ray.io.knn_files import WorkFileError, load_knn_block, save_knn_block
from ltc_ray.io.output import read_clusters
from ltc_ray.pipeline.stages import (
    SMALL_INPUT_BYTES,
    StageStore,
    load_array,
    load_npy,
    save_npy,
    uri_version,
)
from ltc_ray.runtime import DELAY_ENV

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


# ------------------------------------------------------------------ inputs keyed by version
def test_small_input_rewritten_in_place_gets_a_new_version(tmp_path):
    path = tmp_path / "labels.meta"
    path.write_bytes(b"1\n2\n3\n")
    before, stat = uri_version(str(path)), path.stat()
    with open(path, "r+b") as fh:  # same inode, same size, mtime put back
        fh.write(b"3\n2\n1\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert uri_version(str(path)) != before
    # the version of a small file is its content's hash, whatever its mtime or inode say
    assert uri_version(str(path)) == "sha256:" + hashlib.sha256(b"3\n2\n1\n").hexdigest()[:32]
    big = tmp_path / "big.bin"  # past the content-hash limit: the storage's token, no read
    with open(big, "wb") as fh:
        fh.truncate(SMALL_INPUT_BYTES + 1)
    assert not uri_version(str(big)).startswith("sha256:")
    assert uri_version(str(tmp_path / "absent")) is None and uri_version(None) is None


def _ltc_npz(path: Path, ids: np.ndarray, sims: np.ndarray) -> None:
    """A learn-to-cluster kNN file, uncompressed: any graph of the same N and k has the
    same size, so a replacement can keep size and mtime."""
    data = np.empty((len(ids), 2, ids.shape[1]))
    data[:, 0], data[:, 1] = ids, 1.0 - sims
    np.savez(path, data=data)


def test_knn_file_replaced_in_place_is_imported_again(ray_local, feats, tmp_path, capsys):
    x = np.fromfile(feats, dtype="<f4").reshape(-1, 32).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cos = x @ x.T
    ids = np.argsort(-cos, axis=1, kind="stable")[:, :K]
    knn = tmp_path / "faiss_k_10.npz"
    _ltc_npz(knn, ids, np.take_along_axis(cos, ids, axis=1))
    work = tmp_path / "w"

    def run(name: str, work_dir: Path = work) -> dict:
        return _in_process(capsys, *_args(feats, "knn-cc", tmp_path / name, work_dir,
                                          "--knn", str(knn),  # the cut these counts assume
                                          "--set", "methods.knn-cc.threshold=0.7"))  # fmt: skip

    first = run("a")
    assert first["knn_source"] == "imported" and first["n_clusters"] == 20
    # another graph (a ring: every sample linked to the next ones) over the same N and k,
    # written into the same file: same inode, same size, mtime put back
    n, stat = len(x), knn.stat()
    ring = (np.arange(n)[:, None] + np.arange(K)) % n
    other = tmp_path / "ring.npz"
    _ltc_npz(other, ring, np.tile(np.linspace(1.0, 0.95, K), (n, 1)))
    assert other.stat().st_size == stat.st_size
    with open(knn, "r+b") as fh:
        fh.write(other.read_bytes())
    os.utime(knn, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = run("b")
    assert again["reused_stages"] == ["plan"]  # the graph and all after it: new
    assert again["knn_source"] == "imported" and again["n_clusters"] == 1
    fresh = run("c", tmp_path / "w-fresh")
    assert fresh["reused_stages"] == []
    _assert_same(_clusters(tmp_path / "b"), _clusters(tmp_path / "c"))


def test_deleting_the_knn_marker_recomputes_the_knn(ray_local, feats, tmp_path, capsys):
    work = tmp_path / "w"
    first = _in_process(capsys, *_args(feats, "knn-cc", tmp_path / "a", work))
    (work / "stages" / "knn" / "_DONE").unlink()
    again = _in_process(capsys, *_args(feats, "knn-cc", tmp_path / "b", work))
    assert "knn" not in again["reused_stages"] and not again["stages"]["knn"].get("skipped")
    assert again["stages"]["knn"]["search_seconds"] >= 0  # it searched
    assert again["reused_stages"] == ["plan", "score", "link"]  # same graph: same keys after
    assert again["stage_fingerprints"] == first["stage_fingerprints"]
    assert _output_bytes(tmp_path / "b") == _output_bytes(tmp_path / "a")


# ------------------------------------------------------------------ resume heals
DAMAGES = ("delete", "truncate", "flip")
STAGE_ORDER = ("plan", "knn", "score", "knn_features", "link")


def _damage(path: Path, how: str) -> None:
    """Delete, truncate to half, or flip 4 bytes in the middle keeping the size."""
    data = bytearray(path.read_bytes())
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        mid = len(data) // 2
        data[mid: mid + 4] = bytes(b ^ 0xFF for b in data[mid: mid + 4])
        path.write_bytes(data)


def _owner(rel: Path) -> str | None:
    """The stage whose marker vouches for a work file (None: nothing reads it back)."""
    top = rel.parts[0]
    if top == "stages":
        return None if rel.parts[1] == "write" else rel.parts[1]
    if top.startswith(("knn-features-", "knn-input-")):
        return "knn_features"
    return {"knn": "knn", "knn-rescored": "score", "node-features": "score"}[top]


def _work_files(work: Path) -> list[Path]:
    return sorted(p.relative_to(work) for p in work.rglob("*") if p.is_file())


def _check_heals(capsys, feats, tmp_path, method: str, flags: tuple, pick) -> None:
    """A clean run, then for each round of ``[(work file, damage), ...]`` that
    ``pick(work files)`` returns: damage them, rerun the same command, and expect exit 0,
    the clean run's clusters, and only the stages that owned the files recomputed."""
    work = tmp_path / "w"
    clean = _in_process(capsys, *_args(feats, method, tmp_path / "clean", work, *flags))
    expected = _clusters(tmp_path / "clean")
    all_stages = [s for s in STAGE_ORDER if s in clean["stage_fingerprints"]]
    files = _work_files(work)
    for i, damages in enumerate(pick(files)):
        for rel, how in damages:
            _damage(work / rel, how)
        out = tmp_path / f"rerun-{i}"
        run = _in_process(capsys, *_args(feats, method, out, work, *flags))
        owners = {_owner(rel) for rel, _ in damages}
        assert run["reused_stages"] == [s for s in all_stages if s not in owners], damages
        _assert_same(expected, _clusters(out))
        assert _work_files(work) == files, damages  # healed: every file is back


def test_random_work_file_damage_heals(ray_local, feats, tmp_path, capsys):
    """knn-cc: every work file of a complete run (stage arrays, every _DONE marker, the kNN
    blocks and manifest), in a random order, each deleted, truncated or flipped."""
    rng = np.random.default_rng(13)

    def pick(files: list[Path]) -> list[list[tuple[Path, str]]]:
        assert {f.parts[0] for f in files} == {"knn", "stages"} and len(files) >= 12
        hows = rng.permutation(np.resize(DAMAGES, len(files)))
        return [[(files[i], str(how))] for i, how in zip(rng.permutation(len(files)), hows,
                                                          strict=True)]  # fmt: skip

    _check_heals(capsys, feats, tmp_path, "knn-cc", (), pick)


@pytest.mark.parametrize("method", ["gcn-v-feature-pass", "hard-clusters"])
def test_damaged_second_graph_or_node_features_heal(method, ray_local, feats, tmp_path, capsys):
    """The graphs a method writes besides the kNN: GCN-V's node features and its
    feature-pass kNN graph, hard-clusters' re-scored graph. (Two files damaged in one
    rerun, to keep the learned methods' runs few.)"""
    rng = np.random.default_rng(14)
    if method == "hard-clusters":
        flags = ("--model", tiny_hard_clusters(tmp_path / "model", 32, K))
        graphs = ("knn-rescored",)
    else:
        flags = ("--model", tiny_gcn_v(tmp_path / "model", 32, K),
                 "--set", "methods.gcn-v.feature_pass=true")  # fmt: skip
        graphs = (f"knn-features-k{K}", "node-features")

    def pick(files: list[Path]) -> list[list[tuple[Path, str]]]:
        own = [[f for f in files if f.parts[0] == graph] for graph in graphs]
        assert all(own), files
        if len(own) == 1:  # two files of the one graph
            chosen = [own[0][i] for i in rng.choice(len(own[0]), size=2, replace=False)]
        else:  # one file of each: both stages heal in the same rerun
            chosen = [group[int(rng.integers(len(group)))] for group in own]
        hows = rng.choice(DAMAGES, size=2, replace=False)
        return [[(f, str(how)) for f, how in zip(chosen, hows, strict=True)]]

    cli_method = "gcn-v" if method.startswith("gcn-v") else method
    _check_heals(capsys, feats, tmp_path, cli_method, flags, pick)


def test_damage_found_while_loading_is_a_work_file_error(ray_local, tmp_path):
    """The backstop behind the resume checks: a file damaged after them."""
    store = StageStore(str(tmp_path / "w"))
    uri = store.uri("link", "cluster_id.npy")
    size, sha = save_npy(uri, np.arange(100))
    store.finish("link", "fp", {}, artifacts={uri: (size, sha)})
    assert store.completed("link", "fp")["artifacts"][uri] == {"bytes": size, "sha256": sha}
    _damage(Path(uri), "flip")
    with pytest.raises(WorkFileError, match="damaged work file .* rerun the same command") as err:
        load_npy(uri, sha256=sha)
    assert not isinstance(err.value, InputError)  # exit 1, never "bad input" (exit 2)
    # a reused stage whose load fails drops its marker, so it is computed again
    assert not store.loads_intact("link", [load_array.remote(uri, None, sha)])
    assert store.completed("link", "fp") is None
    # a kNN block: unreadable is a WorkFileError; a reader that blames "the input" for a
    # file under the work directory is turned into one, and the owning marker is dropped
    block = str(tmp_path / "w" / "knn" / "block-000000.npz")
    digest = save_knn_block(block, np.zeros((4, 2), np.int32), np.ones((4, 2)), 0)
    store.finish("knn", "fp", {}, artifacts={block: digest})
    _damage(Path(block), "truncate")
    with pytest.raises(WorkFileError, match="not a readable kNN block"):
        load_knn_block(block)
    with pytest.raises(WorkFileError, match="truncated"), store.heals():
        raise InputError(block, "file is truncated")
    assert not (tmp_path / "w" / "stages" / "knn" / "_DONE").exists()
    user_file = str(tmp_path / "feats.bin")  # the user's own input stays an InputError
    with pytest.raises(InputError, match="bad rows"), store.heals():
        raise InputError(user_file, "bad rows")
