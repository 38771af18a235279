"""Data safety of the writing jobs (issue 13), on real jobs: ``--overwrite`` removes only
the files an earlier result listed, an interrupted commit is finished by the rerun, one
writer per output (a real second job is refused while the first runs; a killed job's lock
is taken over), outputs follow the user's umask, make_synthetic and train replace only
their own files. The refusals themselves are cases of tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from _data import blobs, write_bin
from conftest import PYTHON, REPO
from fsspec.implementations.local import LocalFileSystem

from ltc_ray.cli import main
from ltc_ray.errors import InputError
from ltc_ray.io.output import COMMITTING, MANIFEST_FORMAT, SUCCESS, read_clusters
from ltc_ray.runtime import DELAY_ENV

ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> Path:
    x, labels = blobs(n_per=20, n_clusters=10, dim=16, spread=0.5, seed=3)
    path = tmp_path_factory.mktemp("safety") / "x.bin"
    write_bin(path, x, labels)
    return path


def _args(feats: Path, out: Path, *flags: str) -> list[str]:
    return ["cluster", "--features", str(feats), "--dim", "16", "--set", "knn.k=10",
            "--method", "knn-cc", "--output", str(out), *flags]


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _manifest(out: Path) -> dict:
    return json.loads((out / SUCCESS).read_text())


def test_overwrite_removes_only_the_files_the_result_listed(ray_local, feats, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(feats, out)) == 0
    manifest = _manifest(out)
    assert manifest["format"] == MANIFEST_FORMAT
    listed = {entry["path"] for entry in manifest["files"]}
    assert set(_files(out)) == listed | {SUCCESS}  # every file is listed, nothing else left
    assert {"run.json", "cluster_summary.parquet", "clusters/part-00000.parquet"} <= listed
    sizes = {entry["path"]: entry["bytes"] for entry in manifest["files"]}
    assert all(sizes[p] == (out / p).stat().st_size for p in listed)
    # an older result with one more part than the new run writes: the part goes
    stale = out / "clusters" / "part-00042.parquet"
    stale.write_bytes((out / "clusters" / "part-00000.parquet").read_bytes())
    manifest["files"].append({"path": "clusters/part-00042.parquet", "rows": 1, "bytes": 1})
    (out / SUCCESS).write_text(json.dumps(manifest))
    assert main(_args(feats, out, "--overwrite")) == 0
    assert not stale.exists()
    assert set(_files(out)) == {e["path"] for e in _manifest(out)["files"]} | {SUCCESS}
    # an older manifest format (no "format", run.json not listed) is still recognised
    old = _manifest(out)
    old.pop("format")
    old["files"] = [e for e in old["files"] if e["path"] != "run.json"]
    (out / SUCCESS).write_text(json.dumps(old))
    assert main(_args(feats, out, "--overwrite")) == 0
    # a user's file beside the result: refused, nothing at all changes
    (out / "notes.txt").write_text("mine\n")
    before = _files(out)
    capsys.readouterr()
    assert main(_args(feats, out, "--overwrite")) == 2
    assert "holds files ltc-ray did not write (e.g. 'notes.txt')" in capsys.readouterr().err
    assert _files(out) == before
    # a forged manifest cannot adopt a user's file: only names ltc-ray writes count
    (out / "notes.txt").rename(out / "clusters" / "notes.txt")
    forged = _manifest(out)
    forged["files"].append({"path": "clusters/notes.txt", "rows": None, "bytes": 5})
    (out / SUCCESS).write_text(json.dumps(forged))
    before = _files(out)
    assert main(_args(feats, out, "--overwrite")) == 2
    assert "(e.g. 'clusters/notes.txt')" in capsys.readouterr().err
    assert _files(out) == before


def test_a_commit_killed_midway_is_finished_by_the_rerun(ray_local, feats, tmp_path, capsys,
                                                         monkeypatch):
    """The commit dies after moving one file: no _SUCCESS vouches for the mix, and the same
    command run again (no --overwrite) recognises the location as its own and completes."""
    clean = tmp_path / "clean"
    assert main(_args(feats, clean)) == 0
    out = tmp_path / "out"
    assert main(_args(feats, out, "--set", "methods.knn-cc.threshold=0.9")) == 0  # older
    real_mv, moved = LocalFileSystem.mv, []

    def dying_mv(self, src, dst, **kwargs):
        if moved:
            raise OSError("disk pulled out")
        moved.append(dst)
        return real_mv(self, src, dst, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "mv", dying_mv)
    assert main(_args(feats, out, "--overwrite")) == 1
    monkeypatch.setattr(LocalFileSystem, "mv", real_mv)
    assert moved and not (out / SUCCESS).exists() and (out / COMMITTING).exists()
    assert main(_args(feats, out)) == 0  # its own half-committed result: no flag needed
    assert not (out / COMMITTING).exists()
    assert set(_files(out)) == {e["path"] for e in _manifest(out)["files"]} | {SUCCESS}
    assert read_clusters(str(out)).equals(read_clusters(str(clean)))


def _launch(args: list[str], log: Path, env: dict | None = None,
            umask: int | None = None) -> subprocess.Popen:
    """``jobs/cluster.py`` as a subprocess with its own local Ray."""
    full_env = {**os.environ, **ENV, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    with open(log, "w") as fh:
        return subprocess.Popen(
            [PYTHON, "jobs/cluster.py", *args[1:], "--num-cpus", "2"], cwd=REPO, stdout=fh,
            stderr=subprocess.STDOUT, env=full_env,
            preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
        )


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(feats, tmp_path):
    out = tmp_path / "out"
    first = _launch(_args(feats, out), tmp_path / "first.log", env={DELAY_ENV: "knn:4"})
    try:
        deadline = time.time() + 120
        while not (out / "_LOCK").exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the first job never took the lock"
            time.sleep(0.1)
        second = subprocess.run(
            [PYTHON, "jobs/cluster.py", *_args(feats, out)[1:]], cwd=REPO, capture_output=True,
            text=True, timeout=120, env={**os.environ, **ENV})
        assert second.returncode == 2, second.stderr[-3000:]
        assert "another job is writing to this output" in second.stderr
        assert str(first.pid) in second.stderr
        assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert not (out / "_LOCK").exists()
    assert _manifest(out)["rows"] == 200  # the first job's result, whole


def test_a_killed_jobs_lock_is_taken_over(ray_local, feats, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([PYTHON, "-c", "pass"])
    dead.wait()
    lease = {"run_id": "killed", "host": socket.gethostname(), "pid": dead.pid,
             "started": time.time(), "heartbeat": time.time()}
    (out / "_LOCK").write_text(json.dumps(lease))
    assert main(_args(feats, out)) == 0
    assert not (out / "_LOCK").exists()
    # another host's lease: live while it beats, stale once its heartbeat is old
    other = {**lease, "host": "some-other-host", "pid": 1}
    (out / "_LOCK").write_text(json.dumps(other))
    capsys.readouterr()
    assert main(_args(feats, out, "--overwrite")) == 2
    assert "another job is writing to this output (run killed" in capsys.readouterr().err
    (out / "_LOCK").write_text(json.dumps({**other, "heartbeat": time.time() - 3600}))
    assert main(_args(feats, out, "--overwrite")) == 0
    assert not (out / "_LOCK").exists()


def test_outputs_follow_the_users_umask(feats, tmp_path):
    out = tmp_path / "out"
    job = _launch(_args(feats, out), tmp_path / "job.log", umask=0o027)
    assert job.wait(timeout=240) == 0, (tmp_path / "job.log").read_text()[-3000:]
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777
             for p in out.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o640}, modes


def test_make_synthetic_replaces_only_its_own_unchanged_files(tmp_path):
    from ltc_ray.synthetic import make_benchmark

    root = tmp_path / "data"
    first = make_benchmark(str(root), parts=(1,), scale=0.0005, seed=0, progress=False)
    features = Path(first["part1_test"]["features"])
    with pytest.raises(InputError, match="already exists .* pass --overwrite"):
        make_benchmark(str(root), parts=(1,), scale=0.0005, seed=1, progress=False)
    again = make_benchmark(str(root), parts=(1,), scale=0.0005, seed=1, progress=False,
                           overwrite=True)
    assert Path(again["part1_test"]["features"]) == features
    user = root / "features" / "part3_test.bin"  # the user's own file beside ours
    user.write_bytes(b"\x00" * 64)
    before = features.read_bytes()
    with pytest.raises(InputError, match="was not written by make_synthetic"):
        make_benchmark(str(root), parts=(1, 3), scale=0.0005, seed=1, progress=False,
                       overwrite=True)
    assert user.read_bytes() == b"\x00" * 64 and features.read_bytes() == before


def test_a_model_directory_holds_only_model_files(tmp_path):
    from ltc_ray.models.store import check_model_location

    model = tmp_path / "model"
    assert check_model_location(str(model), overwrite=False) == []
    (model / "gcn-v").mkdir(parents=True)
    for rel in ("weights.pt", "model.json", "gcn-v/weights.pt", "gcn-v/model.json"):
        (model / rel).write_text("{}")
    with pytest.raises(InputError, match="already holds a model; pass --overwrite"):
        check_model_location(str(model), overwrite=False)
    assert check_model_location(str(model), overwrite=True) == [
        "gcn-v/model.json", "gcn-v/weights.pt", "model.json", "weights.pt"]
    (model / "gcn-v" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an ltc-ray model .e.g. 'gcn-v/notes.txt'"):
        check_model_location(str(model), overwrite=True)
