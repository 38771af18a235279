"""Folder export (the image-clustering-browser layout) and the names of a run's samples:
exact file trees on hand-made outputs, names from text and Parquet, nested re-cluster
exports, refusals, the streaming bound, an S3 round trip and the CLI's exit codes."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PYTHON, REPO

import ltc_ray.export.folders as folders
from ltc_ray.cli import main
from ltc_ray.errors import InputError
from ltc_ray.export import cluster_folder, export_folders
from ltc_ray.io.fs import join_uri
from ltc_ray.io.names import SampleNames
from ltc_ray.io.output import (
    RUN,
    SUMMARY,
    commit,
    part_file,
    write_cluster_part,
    write_json,
    write_summary,
)

WHEN = datetime(2020, 12, 25, 17, 4, 23)
RUN_NAME = "20201225-170423-d10-c5"
# ten samples, ids already size-ranked: 0 (4 members), 1 (3), then singletons 2, 3, 4
CLUSTER_OF = np.array([0, 1, 0, 2, 1, 0, 3, 1, 0, 4])
NAMES = [f"img/a{i}.jpg" for i in range(10)]


def make_output(out: Path | str, cluster_of: np.ndarray, features: str,
                part_ranges: list[np.ndarray] | None = None, so: dict | None = None) -> str:
    """A finished output the way the cluster job commits one (staging, then _SUCCESS)."""
    out = str(out)
    staging = out.rstrip("/") + ".staging"
    n = len(cluster_of)
    sizes = np.bincount(cluster_of)
    if part_ranges is None:
        part_ranges = np.array_split(np.arange(n), 3)
    part_rows = {}
    for i, sid in enumerate(part_ranges):
        rel = part_file(i)
        part_rows[rel] = write_cluster_part(join_uri(staging, rel), sid, cluster_of[sid],
                                            np.ones(len(sid)), sid, storage_options=so)
    reps = np.array([int(np.flatnonzero(cluster_of == c)[0]) for c in range(len(sizes))])
    part_rows[SUMMARY] = write_summary(join_uri(staging, SUMMARY), sizes, reps, so)
    write_json(join_uri(staging, RUN), {"features": features, "n_samples": n,
                                        "n_clusters": len(sizes), "method": "test"}, so)
    commit(staging, out, part_rows, "test-run", so)
    return out


def write_names(path: Path, names: list[str], end: str = "") -> str:
    path.write_text("\n".join(names) + end, encoding="utf-8")
    return str(path)


def write_embeddings(folder: Path, names: list[str], ids=None, images_root: str | None = None,
                     row_group_size: int = 3) -> str:
    """An embedding job's output: embeddings.parquet (id, path, embedding) + report.json."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(names)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * 4, np.float32)), 4)
    table = pa.table({"id": pa.array(np.arange(n) if ids is None else ids, pa.int64()),
                      "path": pa.array(names, pa.string()), "embedding": emb})
    pq.write_table(table, folder / "embeddings.parquet", row_group_size=row_group_size)
    if images_root is not None:
        (folder / "report.json").write_text(json.dumps(
            {"kind": "ltc-ray-embeddings", "images_root": images_root, "n_embedded": n}))
    return str(folder / "embeddings.parquet")


def tree(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> text), hidden files included."""
    return {str(p.relative_to(root)): p.read_text(encoding="utf-8")
            for p in sorted(root.rglob("*")) if p.is_file()}


def expected_tree(run: str = RUN_NAME) -> dict[str, str]:
    return {
        "img_names.txt": "\n".join(NAMES),
        f"{run}/000/img_names.txt": "img/a0.jpg\nimg/a2.jpg\nimg/a5.jpg\nimg/a8.jpg",
        f"{run}/001/img_names.txt": "img/a1.jpg\nimg/a4.jpg\nimg/a7.jpg",
        f"{run}/etc/img_names.txt": "img/a3.jpg\nimg/a6.jpg\nimg/a9.jpg",
    }


@pytest.fixture
def text_run(tmp_path) -> tuple[str, str]:
    out = make_output(tmp_path / "run", CLUSTER_OF, "data/features.bin")
    return out, write_names(tmp_path / "names.txt", NAMES)


# -- layout -------------------------------------------------------------------------------

def test_layout_exact_with_a_names_file(text_run, tmp_path):
    out, names = text_run
    run = export_folders(out, str(tmp_path / "folders"), names_uri=names, when=WHEN)
    assert run == str(tmp_path / "folders" / RUN_NAME)
    assert tree(tmp_path / "folders") == expected_tree()  # no staging left, no extra file
    mode = (tmp_path / "folders" / RUN_NAME).stat().st_mode & 0o777
    assert mode == 0o777 & ~_umask()  # the hidden staging folder's 0700 is not kept


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_cluster_folder_numbering():
    assert cluster_folder("s3://b/r", 0, 2) == "s3://b/r/000"
    assert cluster_folder("s3://b/r", 1, 2) == "s3://b/r/001"
    assert cluster_folder("s3://b/r", 2, 2) == "s3://b/r/etc"
    assert cluster_folder("/r", 999, 1000) == "/r/999"
    assert cluster_folder("/r", 7, 1001) == "/r/0007"  # widest id 1000 -> four digits
    assert cluster_folder("/r", 0, 0) == "/r/etc"


def test_names_from_the_embedding_jobs_parquet(tmp_path):
    features = write_embeddings(tmp_path / "emb", NAMES, images_root="s3://pics/set")
    out = make_output(tmp_path / "run", CLUSTER_OF, features)
    names = SampleNames.for_output(out)
    assert (names.n_rows, names.kind, names.source) == (10, "parquet", features)
    assert names.images_root == "s3://pics/set"
    assert names.image_uri("img/a1.jpg") == "s3://pics/set/img/a1.jpg"
    assert names.image_uri("/abs/x.jpg") == "/abs/x.jpg"
    assert names.image_uri("gs://b/x.jpg") == "gs://b/x.jpg"
    assert names.read(2, 8).to_pylist() == NAMES[2:8]  # across row groups of 3
    ids = np.array([9, 0, 4, 4, 1])
    assert names.take(ids) == [NAMES[i] for i in ids]
    export_folders(out, str(tmp_path / "folders"), when=WHEN)
    assert tree(tmp_path / "folders") == expected_tree()


def test_parquet_take_reads_only_the_row_groups_needed(tmp_path, monkeypatch):
    features = write_embeddings(tmp_path / "emb", NAMES, row_group_size=2)  # 5 groups
    names = SampleNames.from_parquet(features, 10)
    asked = []
    real = SampleNames._row_groups
    monkeypatch.setattr(SampleNames, "_row_groups",
                        lambda self, groups: asked.append(list(groups)) or real(self, groups))
    assert names.take(np.array([9, 1, 8])) == [NAMES[9], NAMES[1], NAMES[8]]
    assert names.read(3, 5).to_pylist() == NAMES[3:5]
    assert asked == [[0, 4], [1, 2]]
    assert names.images_root is None  # no report.json beside it


def test_text_names_index(tmp_path):
    path = tmp_path / "n.txt"
    path.write_bytes(b"a\r\nbb\r\nccc\n")  # CRLF, final newline
    names = SampleNames.from_text(str(path), 3)
    assert names.read(0, 3).to_pylist() == ["a", "bb", "ccc"]
    assert names.take(np.array([2, 0, 2])) == ["ccc", "a", "ccc"]
    assert names.images_root is None and names.image_uri("x/y.jpg") == "x/y.jpg"
    with pytest.raises(InputError, match="holds 3 names but the result has 4"):
        SampleNames.from_text(str(path), 4)
    path.write_text("a\n\nb")
    with pytest.raises(InputError, match="line 2 is empty"):
        SampleNames.from_text(str(path), 3)


def test_take_on_text_spans_far_apart(tmp_path, monkeypatch):
    many = [f"n{i:05d}" for i in range(3000)]
    names = SampleNames.from_text(write_names(tmp_path / "n.txt", many), 3000)
    monkeypatch.setattr("ltc_ray.io.names._SPAN_GAP_BYTES", 64)  # forces separate reads
    ids = np.array([2999, 0, 1500, 1, 2998])
    assert names.take(ids) == [many[i] for i in ids]


def test_no_names_is_refused_with_a_hint(text_run):
    out, _ = text_run
    with pytest.raises(InputError, match="pass --names"):
        SampleNames.for_output(out)


# -- streaming ------------------------------------------------------------------------------

def test_names_are_read_one_part_at_a_time(text_run, tmp_path, monkeypatch):
    out, names = text_run
    calls, flushed = [], []
    real, real_flush = SampleNames.read, folders._FolderWriter.flush
    monkeypatch.setattr(SampleNames, "read",
                        lambda self, a, b: calls.append((a, b)) or real(self, a, b))
    monkeypatch.setattr(folders._FolderWriter, "flush", lambda self: flushed.append(
        (self.pending_rows, len(self.pending))) or real_flush(self))
    export_folders(out, str(tmp_path / "f"), names_uri=names, when=WHEN)
    # the root file (one chunk), then one row range per part (3 parts: 4, 3, 3 rows)
    assert calls == [(0, 10), (0, 4), (4, 7), (7, 10)]
    assert flushed == [(10, 3)]  # clusters spanning the three parts: one open per folder
    calls.clear()
    flushed.clear()
    monkeypatch.setattr(folders, "CHUNK_ROWS", 2)
    export_folders(out, str(tmp_path / "g"), names_uri=names, when=WHEN)
    assert max(b - a for a, b in calls) <= 2  # bounded below a part too
    assert max(rows for rows, _ in flushed) <= 2 and len(flushed) >= 5
    assert tree(tmp_path / "g") == expected_tree()


def test_parts_with_scattered_sample_ids_use_take(tmp_path, monkeypatch):
    parts = [np.arange(0, 10, 2), np.arange(1, 10, 2)]  # evens, then odds
    out = make_output(tmp_path / "run", CLUSTER_OF, "x.bin", part_ranges=parts)
    names = write_names(tmp_path / "names.txt", NAMES)
    taken = []
    real = SampleNames.take
    monkeypatch.setattr(SampleNames, "take",
                        lambda self, ids: taken.append(list(ids)) or real(self, ids))
    export_folders(out, str(tmp_path / "f"), names_uri=names, when=WHEN)
    assert taken == [list(range(0, 10, 2)), list(range(1, 10, 2))]
    got, want = tree(tmp_path / "f"), expected_tree()
    assert got.keys() == want.keys()
    for rel in want:  # part by part: evens first inside a folder, the same members
        assert sorted(got[rel].split("\n")) == sorted(want[rel].split("\n"))
    assert got[f"{RUN_NAME}/000/img_names.txt"].split("\n") == [
        "img/a0.jpg", "img/a2.jpg", "img/a8.jpg", "img/a5.jpg"]


# -- nesting and refusals ---------------------------------------------------------------

def test_nested_export_inside_a_cluster_folder(tmp_path):
    features = write_embeddings(tmp_path / "emb", NAMES, images_root="/pics")
    out = make_output(tmp_path / "run", CLUSTER_OF, features)
    run = export_folders(out, str(tmp_path / "folders"), when=WHEN)
    # a re-cluster of cluster 000: its input is the members' subset, here in another order
    members = [8, 0, 5, 2]
    subset = write_embeddings(tmp_path / "sub", [NAMES[i] for i in members],
                              ids=np.array(members))
    rec = make_output(tmp_path / "rec", np.array([0, 1, 0, 2]), subset)
    nested = export_folders(rec, cluster_folder(run, 0, 2),
                            when=datetime(2020, 12, 26, 3, 41, 23))
    assert nested == f"{run}/000/20201226-034123-d4-c3"
    got = tree(tmp_path / "folders")
    want = expected_tree()
    want.update({
        f"{RUN_NAME}/000/20201226-034123-d4-c3/000/img_names.txt": "img/a8.jpg\nimg/a5.jpg",
        f"{RUN_NAME}/000/20201226-034123-d4-c3/etc/img_names.txt": "img/a0.jpg\nimg/a2.jpg",
    })
    assert got == want  # the cluster's own img_names.txt untouched


def test_a_different_root_names_file_is_refused(text_run, tmp_path):
    out, names = text_run
    root = tmp_path / "folders"
    root.mkdir()
    other = NAMES[:9] + ["img/zz.jpg"]
    write_names(root / "img_names.txt", other)
    with pytest.raises(InputError, match="not the same ones"):
        export_folders(out, str(root), names_uri=names, when=WHEN)
    write_names(root / "img_names.txt", NAMES[:9])
    with pytest.raises(InputError, match="lists 9 names"):
        export_folders(out, str(root), names_uri=names, when=WHEN)
    assert sorted(os.listdir(root)) == ["img_names.txt"]  # nothing written, nothing left
    write_names(root / "img_names.txt", NAMES[::-1], end="\n")  # same names: accepted
    export_folders(out, str(root), names_uri=names, when=WHEN)
    assert (root / "img_names.txt").read_text() == "\n".join(NAMES[::-1]) + "\n"


def test_an_existing_run_folder_is_refused(text_run, tmp_path):
    out, names = text_run
    root = tmp_path / "folders"
    export_folders(out, str(root), names_uri=names, when=WHEN)
    (root / RUN_NAME / "000" / "img_names.txt").write_text("user edit")
    with pytest.raises(InputError, match="already exists; refusing"):
        export_folders(out, str(root), names_uri=names, when=WHEN)
    assert (root / RUN_NAME / "000" / "img_names.txt").read_text() == "user edit"
    assert sorted(os.listdir(root)) == [RUN_NAME, "img_names.txt"]


def test_a_name_with_a_line_break_is_refused(tmp_path):
    bad = NAMES[:5] + ["two\nlines"] + NAMES[6:]
    features = write_embeddings(tmp_path / "emb", bad)
    out = make_output(tmp_path / "run", CLUSTER_OF, features)
    with pytest.raises(InputError, match="holds a line break"):
        export_folders(out, str(tmp_path / "f"), when=WHEN)


# -- object storage ---------------------------------------------------------------------------

def test_s3_round_trip(tmp_path):
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        so = {"key": "testing", "secret": "testing", "endpoint_url": f"http://{host}:{port}",
              "client_kwargs": {"region_name": "us-east-1"}}
        fs = s3fs.S3FileSystem(**so)
        fs.call_s3("create_bucket", Bucket="ltcf")
        features = write_embeddings(tmp_path / "emb", NAMES, images_root="s3://ltcf/pics")
        fs.put(str(tmp_path / "emb") + "/", "ltcf/emb/", recursive=True)
        out = make_output("s3://ltcf/run", CLUSTER_OF, "s3://ltcf/emb/embeddings.parquet", so=so)
        names = SampleNames.for_output(out, storage_options=so)
        assert names.images_root == "s3://ltcf/pics" and names.take(np.array([3])) == [NAMES[3]]
        run = export_folders(out, "s3://ltcf/folders", storage_options=so, when=WHEN)
        assert run == f"s3://ltcf/folders/{RUN_NAME}"
        fs.invalidate_cache()
        got = {p[len("ltcf/folders/"):]: fs.cat_file(p).decode()
               for p in fs.find("ltcf/folders")}
        assert got == expected_tree()
        with pytest.raises(InputError, match="already exists"):
            export_folders(out, "s3://ltcf/folders", storage_options=so, when=WHEN)
        assert features  # the local copy was only the upload's source
    finally:
        server.stop()
        server._server.server_close()  # as tests/test_s3.py: refuse late clients at once


# -- command line ------------------------------------------------------------------------------

def test_cli_end_to_end_and_exit_codes(text_run, tmp_path, capsys):
    out, names = text_run
    root = tmp_path / "folders"
    proc = subprocess.run([PYTHON, "jobs/export_folders.py", out, "--root", str(root),
                           "--names", names, "--timestamp", "20201225-170423"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(root / RUN_NAME)
    assert tree(root) == expected_tree()

    def fails(*argv: str) -> str:
        capsys.readouterr()
        assert main(["export-folders", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert "did not finish" in fails(str(tmp_path / "missing"), "--root", str(root))
    unfinished = tmp_path / "unfinished"
    os.makedirs(unfinished / "clusters")
    (unfinished / "run.json").write_text("{}")
    assert "no _SUCCESS" in fails(str(unfinished), "--root", str(root))
    assert "--timestamp" in fails(out, "--root", str(root), "--timestamp", "yesterday")
    assert "--root" in fails(out)
    assert "already exists" in fails(out, "--root", str(root), "--names", names,
                                     "--timestamp", "20201225-170423")
    with pytest.raises(SystemExit) as stop:
        main(["export-folders", "--help"])
    assert stop.value.code == 0
    assert "etc/img_names.txt" in capsys.readouterr().out
