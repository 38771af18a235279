"""Bad-input cases: output locations. A job deletes only what it wrote: a location holding
anything ltc-ray did not write is refused whatever the flags (``--overwrite`` included), an
output overlapping an input or the work directory is refused, a location another job is
writing to is refused, and the other writing jobs (train, make_synthetic) follow the same
rule."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from _bad_common import TRAIN, Case, _cluster
from _data import blobs, write_bin

FOREIGN = "output directory holds files ltc-ray did not write"
NOT_MANIFEST = "that is not an ltc-ray manifest; refusing to replace or remove anything"
SYNTH = ("--parts", "1", "--scale", "0.0005")
TUNE = ("--method", "knn-cc", "--features", "{d}/good.bin", "--labels", "{d}/good.meta",
        "--dim", "16", "--set", "knn.k=10")

# fmt: off
CASES: list[Case] = [
    # the report: inputs and a user's file in the output, with --overwrite
    Case("outputs-overwrite-holds-inputs",
         _cluster("--overwrite", "--labels", "{d}/outputs-s/x.meta", "--output", "{d}/outputs-s",
                  features="{d}/outputs-s/x.bin"),
         "output location overlaps the feature file", "{d}/outputs-s"),
    Case("outputs-overwrite-cwd",
         ("--features", "x.bin", "--dim", "16", "--set", "knn.k=10", "--output", ".",
          "--overwrite"),
         "output location overlaps the feature file (x.bin)", ".: ", cwd="{d}/outputs-s"),
    Case("outputs-overwrite-holds-labels",
         _cluster("--overwrite", "--labels", "{d}/outputs-s/x.meta", "--output", "{d}/outputs-s"),
         "output location overlaps the label file", "{d}/outputs-s"),
    Case("outputs-overwrite-user-files", _cluster("--overwrite", "--output", "{d}/outputs-s"),
         f"{FOREIGN} (e.g. 'thesis.tex'); refusing to touch it whatever the flags",
         "{d}/outputs-s"),
    Case("outputs-overwrite-user-file-beside-result",
         _cluster("--overwrite", "--output", "{d}/outputs-result-plus"),
         f"{FOREIGN} (e.g. 'notes.txt')", "{d}/outputs-result-plus"),
    Case("outputs-overwrite-user-file-in-clusters",
         _cluster("--overwrite", "--output", "{d}/outputs-result-nested"),
         f"{FOREIGN} (e.g. 'clusters/notes.txt')", "{d}/outputs-result-nested"),
    Case("outputs-overwrite-parent-of-input",
         _cluster("--overwrite", "--output", "{d}/outputs-tree",
                  features="{d}/outputs-tree/sub/x.bin"),
         "output location overlaps the feature file", "{d}/outputs-tree"),
    Case("outputs-success-not-json", _cluster("--overwrite", "--output", "{d}/outputs-bad-success"),
         f"holds a _SUCCESS {NOT_MANIFEST}", "{d}/outputs-bad-success"),
    Case("outputs-success-is-directory",
         _cluster("--overwrite", "--output", "{d}/outputs-success-dir"),
         f"holds a _SUCCESS {NOT_MANIFEST}", "{d}/outputs-success-dir"),
    Case("outputs-success-without-files",
         _cluster("--overwrite", "--output", "{d}/outputs-success-nofiles"),
         f"holds a _SUCCESS {NOT_MANIFEST}", "{d}/outputs-success-nofiles"),
    Case("outputs-committing-not-json",
         _cluster("--overwrite", "--output", "{d}/outputs-bad-committing"),
         f"holds a _COMMITTING {NOT_MANIFEST}", "{d}/outputs-bad-committing"),
    Case("outputs-complete-new-format", _cluster("--output", "{d}/outputs-result"),
         "already holds a completed result (_SUCCESS); pass --overwrite to replace it",
         "{d}/outputs-result"),
    # overlaps
    Case("outputs-work-dir-inside-output", _cluster("--work-dir", "{out}/work"),
         "output location overlaps the work directory (--work-dir)", "{out}"),
    Case("outputs-work-dir-is-output", _cluster("--work-dir", "{out}"),
         "output location overlaps the work directory (--work-dir)", "{out}"),
    Case("outputs-output-inside-work-dir",
         _cluster("--output", "{d}/outputs-w/run", "--work-dir", "{d}/outputs-w"),
         "output location overlaps the work directory (--work-dir)", "{d}/outputs-w/run"),
    Case("outputs-output-inside-model",
         _cluster("--method", "gcn-v", "--model", "{d}/model-d16",
                  "--output", "{d}/model-d16/run"),
         "output location overlaps the model", "{d}/model-d16/run"),
    Case("outputs-output-is-features-symlink-dir",
         _cluster("--output", "{d}/outputs-link/run", features="{d}/outputs-link/run/x.bin"),
         "output location overlaps the feature file", "{d}/outputs-link/run"),
    # a location that cannot be created: refused before Ray starts, not after the work
    Case("outputs-parent-is-a-file", _cluster("--output", "{d}/outputs-s/thesis.tex/run"),
         "cannot access storage (NotADirectoryError", "{d}/outputs-s/thesis.tex/run"),
    Case("outputs-cannot-be-created", _cluster("--output", "/proc/ltc-ray-test-output"),
         "cannot access storage (FileNotFoundError", "/proc/ltc-ray-test-output"),
    # one writer per output
    Case("outputs-locked-by-a-running-job", _cluster("--output", "{d}/outputs-locked"),
         "another job is writing to this output (run test-holder", "{d}/outputs-locked"),
    # the other writing jobs
    Case("outputs-train-into-foreign-dir", (*TRAIN, "--output", "{d}/outputs-s"),
         "holds files that are not an ltc-ray model (e.g. 'thesis.tex')", "{d}/outputs-s",
         job="train"),
    Case("outputs-train-overwrite-foreign-dir",
         (*TRAIN, "--output", "{d}/outputs-s", "--overwrite"),
         "holds files that are not an ltc-ray model (e.g. 'thesis.tex')", "{d}/outputs-s",
         job="train"),
    Case("outputs-train-model-exists", (*TRAIN, "--output", "{d}/model-d16"),
         "already holds a model; pass --overwrite to replace it", "{d}/model-d16", job="train"),
    Case("outputs-train-work-dir-inside-output",
         (*TRAIN, "--output", "{out}", "--work-dir", "{out}/work"),
         "output location overlaps the work directory (--work-dir)", "{out}", job="train"),
    Case("outputs-train-locked", (*TRAIN, "--output", "{d}/outputs-locked"),
         "another job is writing to this output (run test-holder", "{d}/outputs-locked",
         job="train"),
    Case("outputs-tune-config-over-user-file",
         (*TUNE, "--output-config", "{d}/outputs-s/thesis.tex"),
         "exists and was not written by jobs/tune.py; refusing to replace it whatever the flags",
         "{d}/outputs-s/thesis.tex", job="tune"),
    Case("outputs-tune-config-over-user-file-overwrite",
         (*TUNE, "--output-config", "{d}/outputs-s/thesis.tex", "--overwrite"),
         "exists and was not written by jobs/tune.py", "{d}/outputs-s/thesis.tex", job="tune"),
    Case("outputs-tune-config-exists", (*TUNE, "--output-config", "{d}/outputs-tuned.yaml"),
         "already holds a tuned config; pass --overwrite to replace it",
         "{d}/outputs-tuned.yaml", job="tune"),
    Case("outputs-tune-config-directory", (*TUNE, "--output-config", "{d}/outputs-s"),
         "is a directory; --output-config names the YAML file to write", "{d}/outputs-s",
         job="tune"),
    Case("outputs-tune-config-is-labels", (*TUNE, "--output-config", "{d}/good.meta",
                                           "--overwrite"),
         "exists and was not written by jobs/tune.py", "{d}/good.meta", job="tune"),
    Case("outputs-synthetic-over-real-data", ("--data-root", "{d}/outputs-real", *SYNTH),
         "exists and was not written by make_synthetic (or changed since); refusing to "
         "replace it whatever the flags", "{d}/outputs-real/features/part1_test.bin",
         job="make_synthetic"),
    Case("outputs-synthetic-over-real-data-overwrite",
         ("--data-root", "{d}/outputs-real", *SYNTH, "--overwrite"),
         "exists and was not written by make_synthetic", "{d}/outputs-real/features/part1_test.bin",
         job="make_synthetic"),
    Case("outputs-synthetic-again-without-overwrite",
         ("--data-root", "{d}/outputs-synthetic", *SYNTH),
         "already exists (an earlier synthetic benchmark); pass --overwrite",
         "{d}/outputs-synthetic/features/part1_test.bin", job="make_synthetic"),
    Case("outputs-synthetic-edited-since",
         ("--data-root", "{d}/outputs-synthetic-edited", *SYNTH, "--overwrite"),
         "exists and was not written by make_synthetic (or changed since)",
         "{d}/outputs-synthetic-edited/labels/part1_test.meta", job="make_synthetic"),
]
# fmt: on


def _result(d: Path, name: str, new_format: bool = True) -> Path:
    """A small committed result (one part, summary, run.json, _SUCCESS) at ``d/name``."""
    from ltc_ray.io.output import MANIFEST_FORMAT, write_cluster_part, write_json, write_summary

    out = d / name
    ids = list(range(6))
    rows = write_cluster_part(str(out / "clusters" / "part-00000.parquet"), ids, ids, ids,
                              [-1] * 6)
    write_summary(str(out / "cluster_summary.parquet"), [1] * 6, ids)
    write_json(str(out / "run.json"), {"run_id": "r"})
    files = [{"path": "clusters/part-00000.parquet", "rows": rows},
             {"path": "cluster_summary.parquet", "rows": 6}]
    manifest = {"run_id": "r", "files": files, "rows": rows}
    if new_format:
        manifest["format"] = MANIFEST_FORMAT
        files.append({"path": "run.json", "rows": None})
    (out / "_SUCCESS").write_text(json.dumps(manifest))
    return out


def make_data(d: Path) -> None:
    """The files these cases need, written into the shared data directory ``d``."""
    from ltc_ray.synthetic import make_benchmark

    x, labels = blobs(n_per=20, n_clusters=10, dim=16, spread=0.5, seed=0)
    write_bin(d / "outputs-s" / "x.bin", x, labels)
    (d / "outputs-s" / "thesis.tex").write_text("\\documentclass{article}\n")
    write_bin(d / "outputs-tree" / "sub" / "x.bin", x)
    _result(d, "outputs-result")
    (_result(d, "outputs-result-plus", new_format=False) / "notes.txt").write_text("mine\n")
    (_result(d, "outputs-result-nested") / "clusters" / "notes.txt").write_text("mine\n")
    (_result(d, "outputs-bad-success") / "_SUCCESS").write_text("not json {")
    bad = _result(d, "outputs-success-dir")
    (bad / "_SUCCESS").unlink()
    (bad / "_SUCCESS").mkdir()
    (_result(d, "outputs-success-nofiles") / "_SUCCESS").write_text('{"rows": 6}')
    (_result(d, "outputs-bad-committing") / "_COMMITTING").write_text("\x00\x01")
    # the feature file lies inside the output, reached through a symlinked directory
    write_bin(d / "outputs-link-target" / "x.bin", x)
    (d / "outputs-link").mkdir()
    os.symlink(d / "outputs-link-target", d / "outputs-link" / "run")
    # a live lease: this process (alive while the cases run), on this host, beating now
    (d / "outputs-locked").mkdir()
    (d / "outputs-locked" / "_LOCK").write_text(json.dumps({
        "run_id": "test-holder", "host": socket.gethostname(), "pid": os.getpid(),
        "started": time.time(), "heartbeat": time.time() + 3600}))
    (d / "outputs-tuned.yaml").write_text("# tuned by jobs/tune.py on x: best 1\nmethod: knn-cc\n")
    write_bin(d / "outputs-real" / "features" / "part1_test.bin", x)
    for name in ("outputs-synthetic", "outputs-synthetic-edited"):
        make_benchmark(str(d / name), parts=(1,), scale=0.0005, seed=0, progress=False)
    meta = d / "outputs-synthetic-edited" / "labels" / "part1_test.meta"
    meta.write_text(meta.read_text().replace("\n", "\n", 1) + "0\n")  # the user edited it
