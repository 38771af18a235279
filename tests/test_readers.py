"""Readers of results (read_clusters, evaluate.py) and export_knn: valid results of both
manifest formats still read and score; paths leading out of a result are refused; reading
and exiting at once never aborts; an export replaces only an export ltc-ray wrote.
The bad inputs themselves are cases of tests/test_bad_inputs.py (tests/_bad_readers.py)."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from _bad_readers import PART1, _knn_work, write_manifest, write_result
from conftest import PYTHON, REPO

from ltc_ray.cli import run_verb
from ltc_ray.errors import InputError
from ltc_ray.io.output import read_clusters

N = 200


@pytest.fixture
def labels(tmp_path: Path) -> np.ndarray:
    y = np.random.default_rng(0).integers(0, 12, N)
    (tmp_path / "y.meta").write_text("\n".join(map(str, y.tolist())) + "\n")
    return y


@pytest.mark.parametrize("new_format", [True, False], ids=["manifest-v1", "manifest-old"])
def test_evaluate_scores_a_valid_result(tmp_path, labels, capsys, new_format):
    """Both manifest formats (the older one lists Parquet files only, without bytes) read
    back in sample_id order and score 100 against their own labels; ``--json`` writes the
    metrics and a second run replaces that file (evaluate wrote it)."""
    out = tmp_path / "result"
    write_result(out, labels, new_format=new_format)
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert ("format" in manifest) == new_format
    assert any(f["path"] == "run.json" for f in manifest["files"]) == new_format

    table = read_clusters(str(out))
    assert table.column("sample_id").to_pylist() == list(range(N))  # part 1 was reversed
    assert np.array_equal(table.column("cluster_id").to_numpy(), labels)
    assert table.column_names == ["sample_id", "cluster_id", "score", "parent"]

    metrics = tmp_path / "metrics.json"
    args = ["--pred", str(out), "--labels", str(tmp_path / "y.meta"), "--json", str(metrics)]
    assert run_verb("evaluate", args) == 0
    printed = capsys.readouterr().out
    assert "| 100.00 | 100.00 | 100.00 |" in printed and str(out) in printed
    first = json.loads(metrics.read_text())
    assert first["pairwise_f"] == 1.0 and first["n_samples"] == N
    metrics.write_text(json.dumps({**first, "nmi": 0.5}))  # an older run's metrics
    assert run_verb("evaluate", args) == 0
    assert json.loads(metrics.read_text()) == first


def test_the_optional_id_column_reads_and_must_be_in_every_part(tmp_path, labels):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "result"
    write_result(out, labels)
    for part in sorted((out / "clusters").iterdir()):
        table = pq.read_table(part)
        ids = table.column("sample_id").to_numpy() * 10 + 7
        pq.write_table(table.append_column("id", pa.array(ids)), part)
    write_manifest(out)
    table = read_clusters(str(out))
    assert table.column("id").to_pylist() == [i * 10 + 7 for i in range(N)]
    pq.write_table(pq.read_table(out / PART1).drop_columns(["id"]), out / PART1)
    write_manifest(out)
    with pytest.raises(InputError, match="column 'id' is in some cluster parts only"):
        read_clusters(str(out))


@pytest.mark.parametrize(
    "path",
    ["../result/clusters/part-00001.parquet", "clusters/../../x.parquet", "/etc/passwd",
     "s3://bucket/run/clusters/part-00000.parquet", "file:clusters/p.parquet",
     "clusters\\part-00001.parquet", "clusters/./part-00001.parquet", "clusters//p.parquet",
     "~/clusters/p.parquet", "clusters/%2e%2e/p.parquet", "clusters/", "", None, 7,
     "clusters/p\x00.parquet", "C:/clusters/p.parquet"],
)
def test_a_listed_path_leading_anywhere_else_is_refused(tmp_path, labels, path):
    out = tmp_path / "result"
    write_result(out, labels)
    manifest = json.loads((out / "_SUCCESS").read_text())
    manifest["files"][-2]["path"] = path  # clusters/part-00001.parquet
    (out / "_SUCCESS").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="is not a relative path inside the output") as exc:
        read_clusters(str(out))
    assert exc.value.where == str(out / "_SUCCESS")
    assert len(exc.value.problem) < 200  # the echoed path is cut


def test_reading_never_leaves_arrow_io_work_behind(tmp_path, labels, monkeypatch):
    """pq.read_table (the dataset reader) leaves pre-buffering work on Arrow's IO threads
    after it returns: a process exiting right after, as evaluate does on an error, aborted
    with SIGABRT ("terminate called without an active exception") in up to 3 runs of 10
    on a loaded machine (apache/arrow#33975). The readers use the synchronous
    ParquetFile.read instead: with read_table unusable, a result still reads."""
    import pyarrow.parquet as pq

    out = tmp_path / "result"
    write_result(out, labels)

    def refuse(*args, **kwargs):
        raise AssertionError("pq.read_table leaves work on Arrow's IO threads")

    monkeypatch.setattr(pq, "read_table", refuse)
    assert read_clusters(str(out)).num_rows == N


def test_evaluate_on_rows_removed_exits_2_every_time(tmp_path, labels):
    """The issue's reproduction: a result with rows removed (its manifest rewritten to
    match), scored against the full labels; each run reads every part and exits at once.
    Every run must exit 2 with the one line (a rate, not a proof: see the test above)."""
    out = tmp_path / "result"
    write_result(out, labels[: N - 10])
    args = ["--pred", str(out), "--labels", str(tmp_path / "y.meta")]

    def run(_):
        return subprocess.run([PYTHON, str(REPO / "jobs" / "evaluate.py"), *args],
                              capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(run, range(6)))
    assert [p.returncode for p in procs] == [2] * 6, [p.stderr[-300:] for p in procs]
    assert {p.stderr for p in procs} == {
        f"error: {out}: has {N - 10} cluster rows but {tmp_path / 'y.meta'} has {N} labels; "
        "score a result against the labels of the features it clustered\n"}


def test_evaluate_refuses_json_inside_any_result(tmp_path, labels, capsys):
    pred, other = tmp_path / "pred", tmp_path / "other"
    write_result(pred, labels)
    write_result(other, labels)
    target = other / "metrics-again.json"
    args = ["--pred", str(pred), "--labels", str(tmp_path / "y.meta"), "--json", str(target)]
    assert run_verb("evaluate", args) == 2
    assert "lies inside an ltc-ray result" in capsys.readouterr().err
    assert not target.exists()


def _export(work: Path, output: Path, *flags: str) -> int:
    return run_verb("export-knn", ["--work-dir", str(work), "--output", str(output), *flags])


def test_export_replaces_only_an_export_it_wrote(tmp_path, capsys):
    from ltc_ray.graph.knn_graph import load_manifest, read_knn_rows

    work = tmp_path / "run.work"
    _knn_work(work)
    graph = load_manifest(str(work / "knn"))
    ids, sims = read_knn_rows(graph, 0, N)
    output = tmp_path / "faiss_k_10.npz"
    marker = Path(f"{output}.ltc-ray.json")

    assert _export(work, output) == 0
    with np.load(output, allow_pickle=False) as z:
        data = z["data"]
    assert data.shape == (N, 2, 10)
    assert np.array_equal(data[:, 0, :], ids)
    assert np.allclose(1.0 - data[:, 1, :], sims, atol=1e-6)
    stamp = json.loads(marker.read_text())
    assert stamp["bytes"] == output.stat().st_size and stamp["k"] == 10

    assert _export(work, output) == 2  # exists: refused without --overwrite
    assert "already exists; refusing to overwrite it" in capsys.readouterr().err
    assert _export(work, output, "--overwrite") == 0  # our own export: replaced
    assert json.loads(marker.read_text())["bytes"] == output.stat().st_size

    output.write_bytes(b"the user's own file, saved over the export\n")
    for flags in ((), ("--overwrite",)):
        assert _export(work, output, *flags) == 2
        assert output.read_bytes() == b"the user's own file, saved over the export\n"
    assert "is not a kNN export ltc-ray wrote" in capsys.readouterr().err

    # a marker-looking file that is not ours is never replaced either
    other = tmp_path / "new.npz"
    Path(f"{other}.ltc-ray.json").write_text("my notes\n")
    assert _export(work, other) == 2
    assert "is not an ltc-ray export marker" in capsys.readouterr().err
    assert not other.exists() and Path(f"{other}.ltc-ray.json").read_text() == "my notes\n"
