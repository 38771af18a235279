"""Bad-input cases: readers of outputs (evaluate.py, read_clusters) and export_knn.

``make_data`` writes one real, valid result (``readers-valid``: two cluster parts, the
summary, ``run.json`` and a ``_SUCCESS`` manifest in the ``ltc-ray-output/1`` format,
written here rather than by the job's commit) and copies it once per case, each copy
damaged or tampered with in one way; plus a kNN graph work area for ``export_knn``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _bad_common import Case, N

ROWS = N // 2  # rows per cluster part (two parts)
PART0, PART1 = "clusters/part-00000.parquet", "clusters/part-00001.parquet"


def _evaluate(pred: str, *args: str) -> tuple[str, ...]:
    return ("--pred", f"{{d}}/{pred}", "--labels", "{d}/good.meta", *args)


def _export(output: str, *args: str, work: str = "readers-work") -> tuple[str, ...]:
    return ("--work-dir", f"{{d}}/{work}", "--output", output, *args)


def _bad_path(name: str) -> Case:
    return Case(name, _evaluate(name), "is not a relative path inside the output",
                f"{{d}}/{name}/_SUCCESS", job="evaluate")


# fmt: off
CASES: list[Case] = [
    # --- the _SUCCESS manifest
    _bad_path("readers-path-dotdot"),
    _bad_path("readers-path-absolute"),
    _bad_path("readers-path-scheme"),
    _bad_path("readers-path-backslash"),
    Case("readers-path-twice", _evaluate("readers-path-twice"),
         f"lists {PART0} twice", "{d}/readers-path-twice/_SUCCESS", job="evaluate"),
    Case("readers-success-not-json", _evaluate("readers-success-not-json"),
         "is not valid JSON", "{d}/readers-success-not-json/_SUCCESS", job="evaluate"),
    Case("readers-success-directory", _evaluate("readers-success-directory"),
         "is a directory, not the JSON manifest", "{d}/readers-success-directory/_SUCCESS",
         job="evaluate"),
    Case("readers-success-not-object", _evaluate("readers-success-not-object"),
         "is JSON but not an object (a list)", "{d}/readers-success-not-object/_SUCCESS",
         job="evaluate"),
    Case("readers-success-no-files", _evaluate("readers-success-no-files"),
         "has no 'files' list", "{d}/readers-success-no-files/_SUCCESS", job="evaluate"),
    Case("readers-success-rows-string", _evaluate("readers-success-rows-string"),
         f"files[1].rows ({PART0}) is not a non-negative integer",
         "{d}/readers-success-rows-string/_SUCCESS", job="evaluate"),
    Case("readers-success-format", _evaluate("readers-success-format"),
         "has format 'ltc-ray-output/9'", "{d}/readers-success-format/_SUCCESS",
         job="evaluate"),
    Case("readers-success-total", _evaluate("readers-success-total"),
         f"says rows={N + 1} but its cluster parts list {N} rows",
         "{d}/readers-success-total/_SUCCESS", job="evaluate"),
    # --- the listed files
    Case("readers-part-deleted", _evaluate("readers-part-deleted"),
         "is listed in _SUCCESS but missing", f"{{d}}/readers-part-deleted/{PART1}",
         job="evaluate"),
    Case("readers-part-symlink", _evaluate("readers-part-symlink"),
         "resolves outside the output (a symbolic link)", f"{{d}}/readers-part-symlink/{PART1}",
         job="evaluate"),
    Case("readers-part-rows-removed", _evaluate("readers-part-rows-removed"),
         "bytes but _SUCCESS lists", f"{{d}}/readers-part-rows-removed/{PART1}",
         job="evaluate"),
    Case("readers-part-rows-old-manifest", _evaluate("readers-part-rows-old-manifest"),
         f"has {ROWS - 10} rows but _SUCCESS lists {ROWS}",
         f"{{d}}/readers-part-rows-old-manifest/{PART1}", job="evaluate"),
    Case("readers-part-not-parquet", _evaluate("readers-part-not-parquet"),
         "not a readable Parquet file", f"{{d}}/readers-part-not-parquet/{PART1}",
         job="evaluate"),
    Case("readers-part-no-column", _evaluate("readers-part-no-column"),
         "has no column 'cluster_id'", f"{{d}}/readers-part-no-column/{PART1}", job="evaluate"),
    Case("readers-part-column-type", _evaluate("readers-part-column-type"),
         "column 'cluster_id' has type double, expected int64",
         f"{{d}}/readers-part-column-type/{PART1}", job="evaluate"),
    Case("readers-sample-id-twice", _evaluate("readers-sample-id-twice"),
         f"sample_id 5 appears 2 times in the result (sample_ids must be 0..{N - 1}, each once)",
         f"{{d}}/readers-sample-id-twice/{PART1}", job="evaluate"),
    Case("readers-sample-id-range", _evaluate("readers-sample-id-range"),
         f"sample_id {N + 50} is outside 0..{N - 1}", f"{{d}}/readers-sample-id-range/{PART1}",
         job="evaluate"),
    Case("readers-cluster-id-negative", _evaluate("readers-cluster-id-negative"),
         "cluster_id -3 is negative", f"{{d}}/readers-cluster-id-negative/{PART0}",
         job="evaluate"),
    Case("readers-labels-disagree", _evaluate("readers-labels-disagree"),
         f"has {N - 10} cluster rows but", "{d}/readers-labels-disagree", job="evaluate"),
    # --- evaluate --json
    Case("readers-json-in-result", _evaluate("readers-valid", "--json",
                                             "{d}/readers-valid/scores.json"),
         "lies inside the --pred result", "{d}/readers-valid/scores.json", job="evaluate"),
    Case("readers-json-foreign", _evaluate("readers-valid", "--json", "{d}/readers-notes.json"),
         "already exists and is not a metrics file evaluate wrote",
         "{d}/readers-notes.json", job="evaluate"),
    # --- export_knn
    Case("readers-export-existing", _export("{d}/readers-features.npy"),
         "already exists; refusing to overwrite it: choose a new path",
         "{d}/readers-features.npy", job="export_knn"),
    Case("readers-export-overwrite-foreign",
         _export("{d}/readers-features.npy", "--overwrite"),
         "already exists and is not a kNN export ltc-ray wrote", "{d}/readers-features.npy",
         job="export_knn"),
    Case("readers-export-overwrite-changed",
         _export("{d}/readers-changed.npz", "--overwrite"),
         "already exists and is not a kNN export ltc-ray wrote", "{d}/readers-changed.npz",
         job="export_knn"),
    Case("readers-export-in-work-dir",
         _export("{d}/readers-work/knn/block-000000.npz", "--overwrite"),
         "overlaps the work directory", "{d}/readers-work/knn/block-000000.npz",
         job="export_knn"),
    Case("readers-export-manifest-damaged", _export("{out}", work="readers-work-damaged"),
         "is not valid JSON; the kNN graph's manifest is damaged",
         "{d}/readers-work-damaged/knn/manifest.json", job="export_knn"),
    Case("readers-export-block-mismatch", _export("{out}", work="readers-work-short-block"),
         "rows from row 0 with k=10; the manifest says",
         "{d}/readers-work-short-block/knn/block-000000.npz", job="export_knn"),
]
# fmt: on


def write_manifest(out: Path, new_format: bool = True, **changes) -> dict:
    """A ``_SUCCESS`` manifest describing the files now under ``out``: every file (new
    format, with bytes) or only the Parquet files (the older format); ``changes`` are
    applied last. Written by the test itself, not by the job's commit."""
    files = []
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "_SUCCESS"):
        rel = path.relative_to(out).as_posix()
        parquet = rel.endswith(".parquet")
        if not (new_format or parquet):
            continue
        try:
            rows = pq.read_metadata(path).num_rows if parquet else None
        except Exception:  # a damaged part: the rows the run once wrote
            rows = ROWS
        files.append({"path": rel, "rows": rows, **({"bytes": path.stat().st_size}
                                                     if new_format else {})})
    manifest = {"run_id": "20260101T000000Z-test", "committed_at": "2026-01-01T00:00:00Z",
                "files": files,
                "rows": sum(f["rows"] for f in files if f["path"].startswith("clusters/"))}
    if new_format:
        manifest["format"] = "ltc-ray-output/1"
    manifest.update(changes)
    (out / "_SUCCESS").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_result(out: Path, labels: np.ndarray, new_format: bool = True) -> None:
    """A valid result over ``len(labels)`` samples in two parts (the second part's rows in
    reverse order: readers must not assume sorted parts), clustered as ``labels``."""
    from ltc_ray.io.output import write_cluster_part, write_json, write_summary

    n = len(labels)
    halves = (np.arange(0, n // 2), np.arange(n // 2, n)[::-1])
    for i, sample_id in enumerate(halves):
        write_cluster_part(str(out / f"clusters/part-{i:05d}.parquet"), sample_id,
                           labels[sample_id], np.full(len(sample_id), 0.5), sample_id - 1)
    sizes = np.bincount(labels)
    write_summary(str(out / "cluster_summary.parquet"), sizes, np.zeros(len(sizes), np.int64))
    write_json(str(out / "run.json"), {"method": "knn-cc", "n_samples": n})
    write_manifest(out, new_format)


def _part(out: Path, rel: str) -> pa.Table:
    return pq.read_table(out / rel)


def _set(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values))


def _tampered(d: Path, name: str) -> Path:
    """A copy of the valid result, _SUCCESS included, for one case to damage."""
    out = d / name
    shutil.copytree(d / "readers-valid", out)
    return out


def _edit_manifest(out: Path, edit) -> None:
    manifest = json.loads((out / "_SUCCESS").read_text())
    edit(manifest)
    (out / "_SUCCESS").write_text(json.dumps(manifest, indent=2) + "\n")


def _knn_work(work: Path) -> None:
    """A kNN graph work area as a run leaves it: blocks of 64 rows and manifest.json."""
    from ltc_ray.graph.knn_graph import KnnManifest, save_manifest
    from ltc_ray.io.knn_files import save_knn_block

    k, block_rows = 10, 64
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.arange(N)[:, None], rng.integers(0, N, (N, k - 1))], axis=1)
    sims = np.sort(rng.uniform(0, 1, (N, k)).astype(np.float32), axis=1)[:, ::-1]
    manifest = KnnManifest(directory=str(work / "knn"), n_rows=N, k=k, block_rows=block_rows,
                           source="computed")
    for b in range(manifest.n_blocks):
        lo, hi = manifest.block_range(b)
        save_knn_block(manifest.block_uri(b), ids[lo:hi].astype(np.int32), sims[lo:hi], lo)
    save_manifest(manifest)


def make_data(d: Path) -> None:
    """The files these cases need, written into the shared data directory ``d``."""
    labels = np.loadtxt(d / "good.meta", dtype=np.int64)
    valid = d / "readers-valid"
    write_result(valid, labels)
    rows = json.loads((valid / "_SUCCESS").read_text())["files"]
    index = {f["path"]: i for i, f in enumerate(rows)}

    # --- paths in _SUCCESS that lead outside the result: another run's part file
    other = d / "readers-other-run"
    write_result(other, np.zeros(N, dtype=np.int64))
    for name, path in (
        ("readers-path-dotdot", f"clusters/../../readers-other-run/{PART1}"),
        ("readers-path-absolute", str(other / PART1)),
        ("readers-path-scheme", f"file://{other / PART1}"),
        ("readers-path-backslash", "clusters\\..\\..\\readers-other-run\\" + PART1[9:]),
    ):
        _edit_manifest(_tampered(d, name),
                       lambda m, path=path: m["files"][index[PART1]].update(path=path))
    _edit_manifest(_tampered(d, "readers-path-twice"),
                   lambda m: m["files"].append(dict(m["files"][index[PART0]])))

    # --- a _SUCCESS that is not a manifest
    (_tampered(d, "readers-success-not-json") / "_SUCCESS").write_text('{"files": [')
    out = _tampered(d, "readers-success-directory")
    (out / "_SUCCESS").unlink()
    (out / "_SUCCESS").mkdir()
    (_tampered(d, "readers-success-not-object") / "_SUCCESS").write_text("[1, 2]\n")
    _edit_manifest(_tampered(d, "readers-success-no-files"), lambda m: m.pop("files"))
    _edit_manifest(_tampered(d, "readers-success-rows-string"),
                   lambda m: m["files"][index[PART0]].update(rows=str(ROWS)))
    _edit_manifest(_tampered(d, "readers-success-format"),
                   lambda m: m.update(format="ltc-ray-output/9"))
    _edit_manifest(_tampered(d, "readers-success-total"), lambda m: m.update(rows=N + 1))

    # --- listed files deleted, replaced or rewritten
    (_tampered(d, "readers-part-deleted") / PART1).unlink()
    out = _tampered(d, "readers-part-symlink")
    (out / PART1).unlink()
    os.symlink(other / PART1, out / PART1)
    for name in ("readers-part-rows-removed", "readers-part-rows-old-manifest"):
        out = _tampered(d, name)
        pq.write_table(_part(out, PART1).slice(10), out / PART1)
    write_manifest(d / "readers-part-rows-old-manifest", new_format=False, rows=N,
                   files=[{"path": PART0, "rows": ROWS}, {"path": PART1, "rows": ROWS}])
    # the next ones come with a manifest that agrees with the damaged files (as a tamperer
    # or a hand-edit would leave it), so that the damage itself is what gets reported
    out = _tampered(d, "readers-part-not-parquet")
    (out / PART1).write_text("sample_id,cluster_id\n0,0\n")
    write_manifest(out)
    out = _tampered(d, "readers-part-no-column")
    pq.write_table(_part(out, PART1).drop_columns(["cluster_id"]), out / PART1)
    write_manifest(out)
    out = _tampered(d, "readers-part-column-type")
    table = _part(out, PART1)
    pq.write_table(_set(table, "cluster_id", table.column("cluster_id").to_numpy() * 1.0),
                   out / PART1)
    write_manifest(out)
    out = _tampered(d, "readers-sample-id-twice")
    table = _part(out, PART1)
    sample_id = table.column("sample_id").to_numpy().copy()
    sample_id[sample_id == N - 1] = 5  # 5 also in part 0; N - 1 gone
    pq.write_table(_set(table, "sample_id", sample_id), out / PART1)
    write_manifest(out)
    out = _tampered(d, "readers-sample-id-range")
    sample_id[sample_id == 5] = N + 50
    pq.write_table(_set(table, "sample_id", sample_id), out / PART1)
    write_manifest(out)
    out = _tampered(d, "readers-cluster-id-negative")
    table = _part(out, PART0)
    cluster_id = table.column("cluster_id").to_numpy().copy()
    cluster_id[7] = -3
    pq.write_table(_set(table, "cluster_id", cluster_id), out / PART0)
    write_manifest(out)
    # rows removed consistently (ids 0..N-11 renumbered): a smaller, valid result that
    # does not belong to these labels
    out = d / "readers-labels-disagree"
    write_result(out, labels[: N - 10])

    # --- evaluate --json
    (d / "readers-notes.json").write_text('{"todo": "call Ana"}\n')

    # --- export_knn: a graph to export; files that are not ours at the output
    _knn_work(d / "readers-work")
    np.save(d / "readers-features.npy", np.ones((N, 16), dtype=np.float32))
    # an export ltc-ray wrote, then replaced by the user's own file: the marker is stale
    (d / "readers-changed.npz").write_bytes(b"PK\x03\x04 the user's own archive")
    (d / "readers-changed.npz.ltc-ray.json").write_text(json.dumps(
        {"format": "ltc-ray-knn-export/1", "bytes": 11852,
         "modified": "2026-01-01T00:00:00+00:00", "n_rows": N, "k": 10}))
    _knn_work(d / "readers-work-damaged")
    (d / "readers-work-damaged/knn/manifest.json").write_text('{"n_rows": 200, "k": ')
    _knn_work(d / "readers-work-short-block")
    from ltc_ray.io.knn_files import load_knn_block, save_knn_block

    block = str(d / "readers-work-short-block/knn/block-000000.npz")
    ids, sims, start = load_knn_block(block)
    save_knn_block(block, ids[:-4], sims[:-4], start)
