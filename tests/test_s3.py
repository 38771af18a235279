"""The jobs end to end on object storage: a real moto S3 server on 127.0.0.1, data uploaded
there, `jobs/cluster.py` / `jobs/train.py` / `jobs/evaluate.py` as subprocesses with
`s3://` inputs and outputs, results read back with pyarrow over s3fs (one S3 client
stack for everything), credentials that never leak, and a storage failure mid-run."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import PYTHON, REPO, require

# the dev extras: skipped without them, except in CI (CI set), where a missing one fails
moto_server = require("moto.server")
s3fs = require("s3fs")

BUCKET = "ltc"
KEY_ID = "testing"
SECRET = "moto-fake-secret-Zq81xW"  # fake, but distinctive enough to search outputs for
REGION = "us-east-1"
DIM = 64
K = 20
ANSI = re.compile(r"\x1b\[[0-9;]*m")
AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)


class _Requests(logging.Handler):
    """The moto server's access log (werkzeug): one line per request."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _start_server() -> tuple[moto_server.ThreadedMotoServer, str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def _stop_server(server: moto_server.ThreadedMotoServer) -> None:
    """Stop serving and close the listening socket, so clients are refused at once
    (``stop`` alone leaves the socket open and connections hang in its backlog)."""
    server.stop()
    server._server.server_close()


def _fs(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(
        key=KEY_ID,
        secret=SECRET,
        endpoint_url=endpoint,
        client_kwargs={"region_name": REGION},
        skip_instance_cache=True,
    )


def _clean_env() -> dict[str, str]:
    """This process's environment without any AWS setting (and no ~/.aws files)."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS}
    env.update(
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def _aws_env(endpoint: str) -> dict[str, str]:
    """Credentials and endpoint the standard way botocore reads them: env variables."""
    return {
        **_clean_env(),
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": REGION,
    }


def _job(
    script: str, *args: str, env: dict[str, str], timeout: int = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, f"jobs/{script}.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


class S3:
    """The module's S3 server, its s3fs filesystem and the uploaded dataset."""

    def __init__(
        self, server, endpoint: str, fs: s3fs.S3FileSystem, n: dict[str, int], requests: _Requests
    ) -> None:
        self.server, self.endpoint, self.fs, self.n, self.requests = (
            server,
            endpoint,
            fs,
            n,
            requests,
        )
        self.env = _aws_env(endpoint)
        self.data = f"s3://{BUCKET}/data"

    def cluster(
        self, output: str, *args: str, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        return _job(
            "cluster",
            "--part",
            "1",
            "--data-root",
            self.data,
            "--dim",
            str(DIM),
            "--set",
            f"knn.k={K}",
            "--num-cpus",
            "2",
            "--output",
            output,
            *args,
            env=self.env if env is None else env,
        )

    def no_secret_anywhere(self, *texts: str) -> None:
        """The secret is in no text given and in no object of the bucket."""
        for text in texts:
            assert SECRET not in text
        for path in self.fs.find(BUCKET):
            assert SECRET.encode() not in self.fs.cat_file(path), path


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from ltc_ray.synthetic import make_benchmark

    requests = _Requests()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(requests)
    werkzeug.setLevel(logging.INFO)
    werkzeug.propagate = False
    server, endpoint = _start_server()
    fs = _fs(endpoint)
    fs.call_s3("create_bucket", Bucket=BUCKET)
    local = tmp_path_factory.mktemp("s3data")
    written = make_benchmark(str(local), parts=(0, 1), scale=0.004, seed=5, dim=DIM, progress=False)
    fs.put(f"{local}/", f"{BUCKET}/data/", recursive=True)
    n = {name: info["n_samples"] for name, info in written.items()}
    yield S3(server, endpoint, fs, n, requests)
    _stop_server(server)
    werkzeug.removeHandler(requests)


def _read_output(fs: s3fs.S3FileSystem, out: str):
    """(_SUCCESS manifest, clusters table sorted by sample_id, summary, run.json) of an
    output, read back with pyarrow over s3fs."""
    manifest = json.loads(fs.cat_file(f"{out}/_SUCCESS"))
    table = pq.read_table(f"{out}/clusters", filesystem=fs).sort_by("sample_id")
    summary = pq.read_table(f"{out}/cluster_summary.parquet", filesystem=fs)
    run = json.loads(fs.cat_file(f"{out}/run.json"))
    return manifest, table, summary, run


def _check_output(fs: s3fs.S3FileSystem, out: str, n: int, method: str) -> dict:
    manifest, table, summary, run = _read_output(fs, out)
    assert manifest["rows"] == n
    listed = {f["path"]: f["rows"] for f in manifest["files"]}
    parts = sorted(p.split(f"{out}/", 1)[1] for p in fs.ls(f"{out}/clusters", detail=False))
    assert parts == sorted(p for p in listed if p.startswith("clusters/"))
    for rel in parts:
        assert pq.read_metadata(f"{out}/{rel}", filesystem=fs).num_rows == listed[rel]
    assert table.schema.names == ["sample_id", "cluster_id", "score", "parent"]
    assert [str(t) for t in table.schema.types] == ["int64", "int64", "float", "int64"]
    np.testing.assert_array_equal(table.column("sample_id").to_numpy(), np.arange(n))
    cid = table.column("cluster_id").to_numpy()
    sizes = np.bincount(cid)
    np.testing.assert_array_equal(summary.column("size").to_numpy(), sizes)
    assert listed["cluster_summary.parquet"] == len(sizes)
    metrics = json.loads(fs.cat_file(f"{out}/metrics.json"))
    assert 0.2 < metrics["pairwise_f"] <= 1.0 and metrics["n_samples"] == n
    assert run["method"] == method and run["n_samples"] == n and run["dim"] == DIM
    assert run["features"] == f"s3://{BUCKET}/data/features/part1_test.bin"
    assert not fs.exists(f"{out}.work/staging") or not fs.ls(f"{out}.work/staging")
    return metrics


def _options(endpoint: str) -> dict:
    """The same settings as ``--storage-options`` JSON (s3fs keyword arguments)."""
    return {
        "key": KEY_ID,
        "secret": SECRET,
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": REGION},
    }


@pytest.fixture(scope="module")
def knn_cc_run(s3):
    """knn-cc over S3, endpoint and credentials from the AWS_* variables (which the local
    Ray's workers inherit from the driver)."""
    out = f"{BUCKET}/runs/knn-cc"
    first = len(s3.requests.lines)
    t0 = time.perf_counter()
    proc = s3.cluster(f"s3://{out}", "--method", "knn-cc", "--set", "knn.block_rows=1000")
    wall = time.perf_counter() - t0
    requests = [ANSI.sub("", line) for line in s3.requests.lines[first:]]
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"knn-cc on s3: {wall:.1f} s wall")
    return out, proc, requests


def test_knn_cc_job_on_s3_with_env_credentials(s3, knn_cc_run):
    out, proc, requests = knn_cc_run
    _check_output(s3.fs, out, s3.n["part1_test"], "knn-cc")
    assert f"s3://{out}" in proc.stdout
    s3.no_secret_anywhere(proc.stdout, proc.stderr)
    # the feature file is only ever fetched by ranged GETs (206), never whole (200):
    # the validation chunk, then the kNN actor's rows block by block (3 blocks)
    gets = [line for line in requests if '"GET /ltc/data/features/part1_test.bin ' in line]
    assert len(gets) >= 3 and all('" 206 ' in line for line in gets), gets


def test_evaluate_reads_s3_and_refuses_an_output_without_success(s3, knn_cc_run):
    from ltc_ray.errors import InputError
    from ltc_ray.io.output import read_clusters

    out, _, _ = knn_cc_run
    labels = f"s3://{BUCKET}/data/labels/part1_test.meta"
    proc = _job(
        "evaluate",
        "--pred",
        f"s3://{out}",
        "--labels",
        labels,
        "--json",
        f"s3://{BUCKET}/eval/metrics.json",
        env=s3.env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(s3.fs.cat_file(f"{BUCKET}/eval/metrics.json"))
    want = json.loads(s3.fs.cat_file(f"{out}/metrics.json"))
    assert got["pairwise_f"] == pytest.approx(want["pairwise_f"])
    # the same output without its _SUCCESS: every reader refuses it
    broken = f"{BUCKET}/runs/knn-cc-broken"
    for path in s3.fs.find(out):
        if not path.endswith("/_SUCCESS"):
            s3.fs.copy(path, broken + path[len(out) :])
    assert s3.fs.exists(f"{broken}/clusters/part-00000.parquet")
    proc = _job("evaluate", "--pred", f"s3://{broken}", "--labels", labels, env=s3.env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: s3://{broken}: no _SUCCESS marker: the run did not finish, refusing to read it"
    )
    with pytest.raises(InputError, match="_SUCCESS"):
        read_clusters(f"s3://{broken}", _options(s3.endpoint))
    n = s3.n["part1_test"]
    assert read_clusters(f"s3://{out}", _options(s3.endpoint)).num_rows == n


def test_reading_an_output_with_pandas_as_the_readme_shows(s3, knn_cc_run):
    """The README's pandas snippet, with this server's storage options."""
    import fsspec

    pd = require("pandas")

    out, _, _ = knn_cc_run
    out = f"s3://{out}"
    storage_options = _options(s3.endpoint)
    # --- README snippet ---
    with fsspec.open(f"{out}/_SUCCESS", **storage_options) as f:  # absent: run not finished
        manifest = json.load(f)
    df = pd.read_parquet(f"{out}/clusters/", storage_options=storage_options)
    sizes = df.groupby("cluster_id").size().sort_values(ascending=False)
    # ---
    assert len(df) == manifest["rows"] == s3.n["part1_test"]
    assert list(df.columns) == ["sample_id", "cluster_id", "score", "parent"]
    assert sizes.index[0] == 0 and sizes.iloc[0] == sizes.max()


@pytest.fixture(scope="module")
def gcn_v_model(s3):
    """jobs/train.py --method gcn-v on part0_train over S3 (AWS_* env credentials)."""
    model = f"{BUCKET}/models/gcn-v"
    proc = _job(
        "train",
        "--method",
        "gcn-v",
        "--part",
        "0",
        "--data-root",
        s3.data,
        "--dim",
        str(DIM),
        "--set",
        f"knn.k={K}",
        "--num-cpus",
        "2",
        "--epochs",
        "8",
        "--hidden",
        "32",
        "--output",
        f"s3://{model}",
        env=s3.env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s3.no_secret_anywhere(proc.stdout, proc.stderr)
    return model


def test_gcn_v_cluster_on_s3_with_storage_options_only(s3, gcn_v_model):
    """gcn-v with its model on S3, endpoint and credentials given ONLY by --storage-options
    (no AWS_* variable anywhere): they reach the model loader and the Ray workers that
    read features and write parts, and are never written out."""
    meta = json.loads(s3.fs.cat_file(f"{gcn_v_model}/model.json"))
    assert meta["method"] == "gcn-v" and meta["in_dim"] == DIM and meta["k"] == K
    assert s3.fs.exists(f"{gcn_v_model}/weights.pt")
    out = f"{BUCKET}/runs/gcn-v"
    t0 = time.perf_counter()
    proc = s3.cluster(
        f"s3://{out}",
        "--method",
        "gcn-v",
        "--model",
        f"s3://{gcn_v_model}",
        "--storage-options",
        json.dumps(_options(s3.endpoint)),
        env=_clean_env(),
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_output(s3.fs, out, s3.n["part1_test"], "gcn-v")
    run = json.loads(s3.fs.cat_file(f"{out}/run.json"))
    assert run["config"]["methods"]["gcn-v"]["model"] == f"s3://{gcn_v_model}"
    assert "storage_options" not in json.dumps(run) and s3.endpoint not in json.dumps(run)
    s3.no_secret_anywhere(proc.stdout, proc.stderr)
    print(f"gcn-v on s3: {wall:.1f} s wall")


def test_a_message_that_would_carry_a_secret_prints_it_masked(s3, capsys):
    """Secrets from --storage-options are masked in the one-line error (here a URI that,
    by mistake, embeds the secret)."""
    from ltc_ray.cli import run_verb

    options = json.dumps(_options(s3.endpoint))
    pred = f"s3://{BUCKET}/{SECRET}/run"
    code = run_verb(
        "evaluate", ["--pred", pred, "--labels", "x.meta", "--storage-options", options]
    )
    err = capsys.readouterr().err
    assert code == 2 and SECRET not in err
    assert (
        err.strip() == f"error: s3://{BUCKET}/***/run: no _SUCCESS marker: the run did not "
        "finish, refusing to read it"
    )


def test_storage_options_from_the_environment_are_masked_too(s3, capsys, monkeypatch):
    """$LTC_RAY_STORAGE_OPTIONS stands in for --storage-options (credentials kept out of
    argv, where ps shows them): the same options reach storage, and the same masking holds."""
    from ltc_ray.cli import run_verb

    monkeypatch.setenv("LTC_RAY_STORAGE_OPTIONS", json.dumps(_options(s3.endpoint)))
    pred = f"s3://{BUCKET}/{SECRET}/run"
    code = run_verb("evaluate", ["--pred", pred, "--labels", "x.meta"])
    err = capsys.readouterr().err
    assert code == 2 and SECRET not in err
    assert err.strip().endswith("no _SUCCESS marker: the run did not finish, refusing to read it")
    monkeypatch.setenv("LTC_RAY_STORAGE_OPTIONS", "[]")
    assert run_verb("evaluate", ["--pred", pred, "--labels", "x.meta"]) == 2
    assert "LTC_RAY_STORAGE_OPTIONS: must be a JSON object" in capsys.readouterr().err


def test_storage_server_stopped_mid_run_fails_without_success(s3):
    """The output's S3 endpoint goes away after the kNN stage started: the job exits 1
    with one line naming the storage error, and no _SUCCESS (nor any output) exists."""
    server, endpoint = _start_server()  # same in-process moto backend, its own port
    out = f"{BUCKET}/runs/stopped"
    cmd = [
        PYTHON,
        "jobs/cluster.py",
        "--part",
        "1",
        "--data-root",
        s3.data,
        "--dim",
        str(DIM),
        "--set",
        f"knn.k={K}",
        "--num-cpus",
        "2",
        "--method",
        "knn-cc",
        "--output",
        f"s3://{out}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_aws_env(endpoint),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        for line in proc.stderr:  # the job's progress log
            seen.append(line)
            if "stage knn: start" in line:
                _stop_server(server)
                break
        else:
            pytest.fail("the job never reached the kNN stage: " + "".join(seen)[-2000:])
        stderr = "".join(seen) + proc.stderr.read()
        stdout = proc.stdout.read()
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        if server._server_ready_event.is_set():
            _stop_server(server)
    assert code == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("failed: ") and "connect" in last.lower(), last
    assert endpoint in last
    print(last)
    s3.fs.invalidate_cache()
    # nothing at the output but, with the storage gone, the lock it could not give back
    # (the next run on this host takes a dead job's lock over)
    assert s3.fs.find(out) in ([], [f"{out}/_LOCK"])
    assert SECRET not in stdout + stderr


def test_commit_on_s3_replaces_an_older_result_file_by_file(s3):
    """``commit`` moves staged files (nested prefixes included) under the output, removes
    an older result first, and writes ``_SUCCESS`` listing exactly the new parts."""
    from ltc_ray.io.output import commit, read_clusters, read_success, write_cluster_part

    so = _options(s3.endpoint)
    out = f"s3://{BUCKET}/commit/out"

    def stage(run: str, parts: int) -> dict[str, int]:
        rows = {}
        for i in range(parts):
            ids = np.arange(i * 5, i * 5 + 5)
            rel = f"clusters/part-{i:05d}.parquet"
            rows[rel] = write_cluster_part(
                f"s3://{BUCKET}/commit/work/staging/{run}/{rel}",
                ids,
                ids,
                ids,
                ids - 1,
                storage_options=so,
            )
        return rows

    commit(f"s3://{BUCKET}/commit/work/staging/a", out, stage("a", 3), "a", so)
    assert read_success(out, so)["rows"] == 15
    commit(f"s3://{BUCKET}/commit/work/staging/b", out, stage("b", 2), "b", so)
    s3.fs.invalidate_cache()
    manifest = read_success(out, so)
    assert manifest["run_id"] == "b" and manifest["rows"] == 10
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.fs.ls(f"{BUCKET}/commit/out/clusters")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert read_clusters(out, so).num_rows == 10
    assert not s3.fs.find(f"{BUCKET}/commit/work/staging")


def test_output_lock_is_exclusive_on_s3(s3):
    """The lease is a conditional put (If-None-Match): of two jobs taking one output's lock
    on object storage, the second is refused naming the first; after a release it is free,
    and a lease whose heartbeat stopped is taken over."""
    import json as json_

    from ltc_ray.errors import InputError
    from ltc_ray.io.lock import OutputLock

    so = _options(s3.endpoint)
    out = f"s3://{BUCKET}/locks/out"
    first = OutputLock(out, "run-a", so)
    first.acquire()
    try:
        with pytest.raises(InputError, match="another job is writing to this output .run run-a"):
            OutputLock(out, "run-b", so).acquire()
        assert first.holds()
    finally:
        first.release()
    s3.fs.invalidate_cache()
    assert not s3.fs.exists(f"{BUCKET}/locks/out/_LOCK")
    second = OutputLock(out, "run-b", so)
    second.acquire()
    second.release()
    # a lease from another host that stopped beating long ago
    s3.fs.pipe_file(f"{BUCKET}/locks/out/_LOCK", json_.dumps(
        {"run_id": "dead", "host": "elsewhere", "pid": 1, "heartbeat": 0}).encode())
    third = OutputLock(out, "run-c", so)
    third.acquire()
    assert third.holds()
    third.release()
