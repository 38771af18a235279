"""The bad-input matrix (docs/bad-inputs.md): every case runs a real job, as
``python jobs/<job>.py ARGS`` would, and must exit 2 with ONE stderr line naming the file or
flag and the problem, before Ray starts (the single line proves it: a started job logs
more), without a traceback, without writing anything at the output location and without
touching any other file.

The cases of this module are the first ones; each ``tests/_bad_<area>.py`` module adds
its own (``CASES``) with the files they need (``make_data``), see :data:`AREAS`.

How the cases run (a process per case cost 1-3 s of imports each, minutes in all): most run
one after another in two runner processes (tests/_bad_runner.py), which import
``ltc_ray.cli`` once and then run each case through the script itself (``runpy`` of
``jobs/<job>.py``: its ``sys.exit(run_verb(verb, argv))``) with the case's argv, cwd and
whole environment, its stdout and stderr captured at the file-descriptor level, and the
state a fresh process starts with restored before each case (loggers, so ``run_verb``
installs its handler anew; warning filters and "already warned" registries; the secrets
``ltc_ray.redact`` registered). Each in-runner case's result is what a fresh process prints:
the runner's start-up output (interpreter start, ``import ltc_ray.cli``: normally nothing)
followed by the case's own. A case that leaves state behind (Ray initialised, a thread still
running, a changed umask or signal handler) stops its runner; that case and the rest of its
batch then run as subprocesses. Module-level caches of ltc_ray that survive between cases
are pure functions of their arguments (``config._methods_type``/``_hints``, the process
umask in ``io.fs.current_umask``, which a case never changes: checked) and cannot change a
later case's result.

Cases marked ``fresh`` (``Case.fresh``, its reason) run as real subprocesses, concurrently
with the runners:

* object storage (``FRESH_STORAGE``: ``s3-*``): botocore, s3fs and fsspec read the AWS_*
  variables and cache sessions, credentials and filesystem instances, with an event-loop
  thread (``fsspecIO``) that outlives the case, per process;
* one canary per job (``FRESH_CANARY``): interpreter start, the script's import and the lazy
  imports of the job's deeper checks (torch, pyarrow, ...) in a process of its own, so that
  noise printed only by a first import is seen per job as a user would see it (in a runner
  only the first case to trigger an import would show it).

Every case with ``env`` must be ``fresh``. Equivalence was checked case by case when this
was introduced: (exit code, stdout, stderr) identical to one process per case for every case
that runs in a runner.
"""

from __future__ import annotations

import json
import locale
import os
import re
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import _bad_files
import _bad_outputs
import _bad_params
import _bad_readers
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _bad_common import (
    FRESH_CANARY,
    FRESH_STORAGE,
    S3_NO_CREDENTIALS,
    S3_UNREACHABLE,
    TRAIN,
    Case,
    D,
    K,
    N,
    _cluster,
)
from _data import blobs, write_bin
from conftest import PYTHON, REPO

DOC = REPO / "docs" / "bad-inputs.md"
RUNNER = Path(__file__).with_name("_bad_runner.py")
RUNNERS = 2  # runner processes (the suite's machine has 2 cores)
CASE_TIMEOUT = 120  # seconds a case may take (a subprocess's timeout; the runner's alarm)
RUNNER_CASE_SECONDS = 20  # a runner's whole timeout: CASE_TIMEOUT + this per case
# The matrix reads best one case per entry.
# fmt: off

CASES = [
    # --- features: .bin
    Case("dim-wrong", ("--features", "{d}/good.bin", "--dim", "24"),
         "is not a multiple of 4 * D = 96 bytes", "{d}/good.bin"),
    Case("dim-zero", ("--features", "{d}/good.bin", "--dim", "0"),
         "must be a positive integer, got 0", "--dim"),
    Case("dim-negative", ("--features", "{d}/good.bin", "--dim", "-16"),
         "must be a positive integer, got -16", "--dim"),
    Case("dim-not-integer", ("--features", "{d}/good.bin", "--dim", "16.5"),
         "invalid int value: '16.5'", "--dim"),
    Case("bin-truncated", ("--features", "{d}/truncated.bin", "--dim", str(D)),
         "is not a multiple of 4 * D = 64 bytes", "{d}/truncated.bin"),
    Case("bin-empty", ("--features", "{d}/empty.bin"), "feature file is empty", "{d}/empty.bin"),
    Case("features-missing", ("--features", "{d}/nope.bin"), "feature file not found",
         "{d}/nope.bin"),
    Case("features-directory", ("--features", "{d}/folder.bin"), "feature file is a directory",
         "{d}/folder.bin"),
    Case("features-unknown-format", ("--features", "{d}/features.csv"),
         "unsupported feature format", "{d}/features.csv"),
    Case("rows-nan", _cluster(features="{d}/nan.bin"), "row 7 contains NaN or Inf",
         "{d}/nan.bin"),
    Case("rows-inf", _cluster(features="{d}/inf.bin"), "row 11 contains NaN or Inf",
         "{d}/inf.bin"),
    Case("rows-zero", _cluster(features="{d}/zero.bin"), "row 42 has zero norm", "{d}/zero.bin"),
    Case("n-one", ("--features", "{d}/one.bin", "--dim", str(D)),
         "need at least 2 samples, found 1", "{d}/one.bin"),
    Case("k-not-below-n", _cluster(k=N),
         f"k={N} must be smaller than the number of samples ({N} in {{d}}/good.bin)", "knn.k"),
    # --- labels
    Case("labels-short", _cluster("--labels", "{d}/short.meta"),
         f"has {N - 3} labels but the features have {N} rows", "{d}/short.meta"),
    Case("labels-long", _cluster("--labels", "{d}/long.meta"),
         f"has {N + 3} labels but the features have {N} rows", "{d}/long.meta"),
    Case("labels-not-integer", _cluster("--labels", "{d}/words.meta"),
         "line 17 is not an integer: 'abc'", "{d}/words.meta"),
    Case("labels-empty", _cluster("--labels", "{d}/empty.meta"), "labels file is empty",
         "{d}/empty.meta"),
    Case("labels-missing", _cluster("--labels", "{d}/nope.meta"), "label file not found",
         "{d}/nope.meta"),
    # --- features: .npy
    Case("npy-pickle", ("--features", "{d}/pickle.npy"), "pickled arrays are refused",
         "{d}/pickle.npy"),
    Case("npy-1d", ("--features", "{d}/flat.npy"), "expected a 2-D (N, D) array",
         "{d}/flat.npy"),
    Case("npy-int-dtype", ("--features", "{d}/ints.npy"), "dtype int64 not supported",
         "{d}/ints.npy"),
    Case("npy-truncated", ("--features", "{d}/truncated.npy"), "truncated: header says",
         "{d}/truncated.npy"),
    Case("npy-not-npy", ("--features", "{d}/text.npy"), "not a .npy file (bad magic bytes)",
         "{d}/text.npy"),
    Case("npy-dim-mismatch", ("--features", "{d}/good.npy", "--dim", "8"),
         "features have D = 16 but dim 8 was given", "{d}/good.npy"),
    # --- features: Parquet
    Case("parquet-duplicate-ids", ("--features", "{d}/dup-ids.parquet", "--set", f"knn.k={K}"),
         "id 5 appears more than once", "{d}/dup-ids.parquet"),
    Case("parquet-int-embedding", ("--features", "{d}/int-embedding.parquet"),
         "column 'embedding' has type list<", "{d}/int-embedding.parquet"),
    Case("parquet-string-id", ("--features", "{d}/string-id.parquet"),
         "column 'id' has type string, expected an integer type", "{d}/string-id.parquet"),
    Case("parquet-no-embedding", ("--features", "{d}/no-embedding.parquet"),
         "no column 'embedding' (columns: vec)", "{d}/no-embedding.parquet"),
    Case("parquet-ragged-row", ("--features", "{d}/ragged.parquet", "--set", f"knn.k={K}"),
         f"row 3 has {D - 1} values, expected D = {D}", "{d}/ragged.parquet"),
    Case("parquet-not-parquet", ("--features", "{d}/text.parquet"),
         "not a readable Parquet file", "{d}/text.parquet"),
    # --- precomputed kNN (--knn)
    Case("knn-pickle", _cluster("--knn", "{d}/pickle.npz"), "pickled arrays are refused",
         "{d}/pickle.npz"),
    Case("knn-wrong-rows", _cluster("--knn", "{d}/rows100.npz"),
         f"kNN file has 100 rows but the features have {N}", "{d}/rows100.npz"),
    Case("knn-small-k", _cluster("--knn", "{d}/k5.npz"),
         f"kNN file has k=5 neighbours, config asks for knn.k={K}", "{d}/k5.npz"),
    Case("knn-missing", _cluster("--knn", "{d}/nope.npz"), "kNN file not found",
         "{d}/nope.npz"),
    # --- method and config
    Case("method-unknown", _cluster("--method", "magic"), "unknown method 'magic'", "--method"),
    Case("config-unknown-key", _cluster("--set", "knn.bogus=1"), "unknown config key 'bogus'",
         "--set"),
    Case("config-wrong-type", _cluster("--set", "knn.k=ten"), "expected an integer, got 'ten'",
         "knn.k"),
    Case("config-out-of-range", _cluster("--set", "methods.knn-cc.threshold=1.5"),
         "is a cosine similarity in [-1, 1], got 1.5", "methods.knn-cc.threshold"),
    Case("config-bad-choice", _cluster("--set", "knn.index=hnsw"),
         "must be one of flat, ivf, got 'hnsw'", "knn.index"),
    Case("config-negative-seed", _cluster("--set", "seed=-1"), "must be >= 0, got -1", "seed"),
    Case("config-file-missing", _cluster("--config", "{d}/nope.yaml"), "config file not found",
         "{d}/nope.yaml"),
    Case("config-not-yaml", _cluster("--config", "{d}/broken.yaml"), "not valid YAML",
         "{d}/broken.yaml"),
    Case("config-not-mapping", _cluster("--config", "{d}/list.yaml"),
         "expected a mapping at '<top>'", "{d}/list.yaml"),
    Case("set-without-value", _cluster("--set", "knn.k"), "expected key=value, got 'knn.k'",
         "--set"),
    # --- models
    Case("model-not-given", _cluster("--method", "gcn-v"),
         "gcn-v needs a model trained by jobs/train.py", "--model"),
    Case("model-missing", _cluster("--method", "gcn-v", "--model", "{d}/no-model"),
         "model directory not found", "{d}/no-model"),
    Case("model-other-dim", _cluster("--method", "gcn-v", "--model", "{d}/model-d8"),
         f"model was trained for dim 8, the features ({{d}}/good.bin) have {D}",
         "{d}/model-d8"),
    Case("model-other-k", _cluster("--method", "gcn-v", "--model", "{d}/model-d16", k=20),
         f"model was trained with k={K}, the kNN graph has k=20", "{d}/model-d16"),
    Case("model-json-corrupt", _cluster("--method", "gcn-v", "--model", "{d}/model-bad-json"),
         "invalid model.json", "{d}/model-bad-json/model.json"),
    Case("model-weights-corrupt",
         _cluster("--method", "gcn-v", "--model", "{d}/model-bad-weights"),
         "cannot read weights: not a torch.save archive", "{d}/model-bad-weights/weights.pt"),
    Case("model-weights-pickle", _cluster("--method", "gcn-v", "--model", "{d}/model-pickle"),
         "cannot read weights: refused to unpickle", "{d}/model-pickle/weights.pt",
         fresh=FRESH_CANARY),
    Case("model-threshold-nan", _cluster("--method", "gcn-v", "--model", "{d}/model-nan-tau"),
         "invalid model.json: thresholds must be finite numbers", "{d}/model-nan-tau"),
    Case("flag-value-huge", _cluster("--num-cpus", "9" * 5000), "…", "cluster"),
    Case("hc-model-not-given", _cluster("--method", "hard-clusters"),
         "hard-clusters needs a model trained by jobs/train.py --method hard-clusters",
         "--model"),
    Case("hc-model-is-gcn-v",
         _cluster("--method", "hard-clusters", "--model", "{d}/model-d16"),
         "model is a 'gcn-v' model, expected 'hard-clusters'", "{d}/model-d16"),
    # --- map-equation (issue 20)
    Case("me-model-not-given", _cluster("--method", "map-equation"),
         "map-equation needs a model trained by jobs/train.py --method map-equation",
         "--model"),
    Case("me-model-is-gcn-v",
         _cluster("--method", "map-equation", "--model", "{d}/model-d16"),
         "model is a 'gcn-v' model, expected 'map-equation'", "{d}/model-d16"),
    Case("me-piece-nodes-one", _cluster("--set", "methods.map-equation.max_piece_nodes=1"),
         "must be >= 2", "config methods.map-equation.max_piece_nodes"),
    # --- gcn-d / gcn-ds / lgcn (issue 17)
    Case("gcn-ds-model-not-given", _cluster("--method", "gcn-ds"),
         "gcn-ds needs a model trained by jobs/train.py --method gcn-ds", "--model"),
    Case("gcn-d-model-no-proposals",
         _cluster("--method", "gcn-d", "--model", "{d}/model-gcn-d-none"),
         "model.json has no proposal settings", "{d}/model-gcn-d-none"),
    Case("gcn-d-model-bad-proposal",
         _cluster("--method", "gcn-d", "--model", "{d}/model-gcn-d-bad"),
         "bad proposal setting", "{d}/model-gcn-d-bad"),
    Case("gcn-ds-segment-range", _cluster("--method", "gcn-ds", "--set",
                                          "methods.gcn-ds.segment_low=2"),
         "is a share in [0, 1], got 2", "methods.gcn-ds.segment_low"),
    Case("gcn-d-preset-unknown", _cluster("--method", "gcn-d", "--set",
                                          "methods.gcn-d.proposals=5"),
         "must be one of", "methods.gcn-d.proposals"),
    Case("lgcn-step-zero", _cluster("--method", "lgcn", "--set", "methods.lgcn.step=0"),
         "is a step in (0, 1], got 0", "methods.lgcn.step"),
    Case("lgcn-model-is-gcn-d", _cluster("--method", "lgcn", "--model", "{d}/model-gcn-d-bad"),
         "model is a 'gcn-d' model, expected 'lgcn'", "{d}/model-gcn-d-bad"),
    Case("lgcn-model-bad-hop", _cluster("--method", "lgcn", "--model", "{d}/model-lgcn-hop"),
         "invalid model.json: hop1 must be a positive int", "{d}/model-lgcn-hop"),
    # --- pse-gcn (issue 18)
    Case("pse-gcn-model-not-given", _cluster("--method", "pse-gcn"),
         "pse-gcn needs a model trained by jobs/train.py --method pse-gcn", "--model"),
    Case("pse-gcn-tau-range", _cluster("--method", "pse-gcn", "--set", "methods.pse-gcn.tau=2"),
         "is a cosine threshold in [-1, 1], got 2", "methods.pse-gcn.tau"),
    Case("pse-gcn-model-is-lgcn",
         _cluster("--method", "pse-gcn", "--model", "{d}/model-lgcn-hop"),
         "model is a 'lgcn' model, expected 'pse-gcn'", "{d}/model-lgcn-hop"),
    Case("pse-gcn-model-bad-hop",
         _cluster("--method", "pse-gcn", "--model", "{d}/model-pse-hop"),
         "invalid model.json: hop2 must be a positive int", "{d}/model-pse-hop"),
    Case("pse-gcn-model-bad-rerank",
         _cluster("--method", "pse-gcn", "--model", "{d}/model-pse-rerank"),
         "invalid model.json: rerank must map k1, k2, expand, top to positive ints",
         "{d}/model-pse-rerank"),
    Case("pse-gcn-model-tau-range",
         _cluster("--method", "pse-gcn", "--model", "{d}/model-pse-tau"),
         "invalid model.json: thresholds.tau must be a cosine in [-1, 1]", "{d}/model-pse-tau"),
    Case("train-pse-gcn-folds-one",
         (*TRAIN, "--output", "{out}", "--method", "pse-gcn", "--tune-folds", "1"),
         "must be 0 or at least 2, got 1", "--tune-folds", job="train"),
    Case("train-proposals-unknown",
         (*TRAIN, "--output", "{out}", "--method", "gcn-ds", "--proposals", "7"),
         "invalid choice: '7'", "--proposals", job="train"),
    # --- output location
    Case("output-is-file", _cluster("--output", "{d}/a-file"), "output path is a file",
         "{d}/a-file"),
    Case("output-complete", _cluster("--output", "{d}/finished"),
         "already holds a completed result (_SUCCESS); pass --overwrite", "{d}/finished"),
    Case("output-foreign", _cluster("--output", "{d}/someone-elses"),
         "output directory holds files ltc-ray did not write (e.g. 'thesis.tex')",
         "{d}/someone-elses"),
    # --- flags, storage
    Case("storage-options-not-json", _cluster("--storage-options", "region=eu-west-1"),
         "is not valid JSON", "--storage-options"),
    Case("storage-options-not-object", _cluster("--storage-options", "[1, 2]"),
         "must be a JSON object", "--storage-options"),
    Case("part-unknown", ("--part", "4", "--data-root", "{d}"),
         "no such benchmark part 4; choose one of 0, 1, 3, 5, 7, 9", "--part"),
    Case("part-and-features", ("--part", "1", "--features", "{d}/good.bin"),
         "give either --part or --features, not both", "--part"),
    Case("part-missing-data", ("--part", "1", "--data-root", "{d}/no-data"),
         "feature file not found", "{d}/no-data/features/part1_test.bin"),
    Case("no-input", ("--method", "knn-cc"), "an input is required", "--features"),
    Case("unknown-flag", _cluster("--colour", "blue"), "unrecognized arguments: --colour",
         "--colour"),
    Case("num-cpus-zero", _cluster("--num-cpus", "0"), "must be a positive integer, got 0",
         "--num-cpus"),
    Case("s3-unreachable", ("--features", "s3://bucket/emb.bin", "--dim", str(D)),
         "cannot access storage (EndpointConnectionError", "s3://bucket/emb.bin",
         env=S3_UNREACHABLE, fresh=FRESH_STORAGE),
    Case("s3-no-credentials", ("--features", "s3://bucket/emb.bin", "--dim", str(D)),
         "cannot access storage (NoCredentialsError", "s3://bucket/emb.bin",
         env=S3_NO_CREDENTIALS, fresh=FRESH_STORAGE),
    Case("s3-output-unreachable", _cluster("--output", "s3://bucket/runs/x"),
         "cannot access storage (EndpointConnectionError", "s3://bucket/runs/x",
         env=S3_UNREACHABLE, fresh=FRESH_STORAGE),
    Case("s3-model-unreachable", _cluster("--method", "gcn-v", "--model", "s3://bucket/model"),
         "cannot access storage (EndpointConnectionError", "s3://bucket/model",
         env=S3_UNREACHABLE, fresh=FRESH_STORAGE),
    # --- the other jobs
    Case("train-no-labels", ("--method", "gcn-v", "--features", "{d}/good.bin", "--dim", str(D),
                             "--output", "{out}"),
         "training needs labels", "--labels", job="train"),
    Case("train-epochs-zero", (*TRAIN, "--epochs", "0", "--output", "{out}"),
         "must be positive, got 0", "--epochs", job="train"),
    Case("train-untrainable", (*TRAIN, "--method", "knn-cc", "--output", "{out}"),
         "cannot train 'knn-cc'", "--method", job="train"),
    Case("train-output-is-file", (*TRAIN, "--output", "{d}/a-file"),
         "model output path is a file", "{d}/a-file", job="train", fresh=FRESH_CANARY),
    Case("tune-bad-grid", ("--method", "knn-cc", "--features", "{d}/good.bin", "--labels",
                           "{d}/good.meta", "--dim", str(D), "--grid", "0.8:0.4:0.1",
                           "--output-config", "{out}"),
         "expected LOW:HIGH:STEP with STEP > 0", "--grid", job="tune", fresh=FRESH_CANARY),
    Case("evaluate-no-success", ("--pred", "{d}/unfinished", "--labels", "{d}/good.meta"),
         "no _SUCCESS marker", "{d}/unfinished", job="evaluate", fresh=FRESH_CANARY),
    Case("synthetic-bad-parts", ("--data-root", "{out}", "--parts", "1,x"),
         "expected a comma list of integers", "--parts", job="make_synthetic",
         fresh=FRESH_CANARY),
    Case("export-no-graph", ("--work-dir", "{d}/no-work", "--output", "{out}"),
         "no complete kNN graph here", "{d}/no-work", job="export_knn", fresh=FRESH_CANARY),
]
# fmt: on
AREAS = (_bad_params, _bad_files, _bad_readers, _bad_outputs)
CASES += [case for area in AREAS for case in area.CASES]


class _Evil:
    """Unpickling this creates a directory: proof that a refused pickle never ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parquet(path: Path, x: np.ndarray, ids=None, ragged_row: int | None = None) -> None:
    rows = [list(r) for r in x]
    if ragged_row is not None:
        rows[ragged_row] = rows[ragged_row][:-1]
    cols = {"embedding": pa.array(rows, type=pa.list_(pa.float32()))}
    if ids is not None:
        cols["id"] = pa.array(ids)
    pq.write_table(pa.table(cols), path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _make_data(tmp_path_factory.mktemp("bad-inputs"))


def _make_data(d: Path) -> Path:
    """Every case's files in ``d`` (and the snapshot test_no_case_touched_any_file
    compares against)."""
    x, labels = blobs(n_per=N // 10, n_clusters=10, dim=D, spread=0.5, seed=0)
    write_bin(d / "good.bin", x, labels)  # also good.meta
    raw = (d / "good.bin").read_bytes()
    (d / "truncated.bin").write_bytes(raw[:-6])
    (d / "empty.bin").write_bytes(b"")
    write_bin(d / "one.bin", x[:1])
    (d / "folder.bin").mkdir()
    (d / "features.csv").write_text("1,2,3\n")
    for name, row, value in (("nan", 7, np.nan), ("inf", 11, np.inf), ("zero", 42, None)):
        bad = x.copy()
        if value is None:
            bad[row] = 0.0
        else:
            bad[row, 3] = value
        write_bin(d / f"{name}.bin", bad)
    lines = list(map(str, labels.tolist()))
    (d / "short.meta").write_text("\n".join(lines[:-3]) + "\n")
    (d / "long.meta").write_text("\n".join(lines + ["1", "2", "3"]) + "\n")
    (d / "words.meta").write_text("\n".join(lines[:16] + ["abc"] + lines[17:]) + "\n")
    (d / "empty.meta").write_text("")
    np.save(d / "good.npy", x)
    np.save(
        d / "pickle.npy", np.array([_Evil(d / "pwned-npy")] * 2, dtype=object), allow_pickle=True
    )
    np.save(d / "flat.npy", x.ravel())
    np.save(d / "ints.npy", np.ones((N, D), dtype=np.int64))
    (d / "truncated.npy").write_bytes((d / "good.npy").read_bytes()[:-100])
    (d / "text.npy").write_text("hello, not an array\n")
    ids = np.arange(N, dtype=np.int64)
    ids[9] = 5
    _parquet(d / "dup-ids.parquet", x, ids)
    pq.write_table(
        pa.table({"embedding": pa.array([[1, 2], [3, 4]], pa.list_(pa.int32()))}),
        d / "int-embedding.parquet",
    )
    _parquet(d / "string-id.parquet", x, [str(i) for i in range(N)])
    pq.write_table(pa.table({"vec": pa.array([[1.0], [2.0]])}), d / "no-embedding.parquet")
    _parquet(d / "ragged.parquet", x, ragged_row=3)
    (d / "text.parquet").write_text("not parquet at all\n")
    ragged_knn = np.empty((N, 2), dtype=object)
    for i in range(N):
        ragged_knn[i] = [_Evil(d / "pwned-npz"), np.zeros(3)]
    np.savez(d / "pickle.npz", data=ragged_knn)
    np.savez(d / "rows100.npz", data=np.zeros((100, 2, K)))
    np.savez(d / "k5.npz", data=np.zeros((N, 2, 5)))
    (d / "broken.yaml").write_text("knn: [1, 2\n")
    (d / "list.yaml").write_text("- knn\n- k\n")
    _models(d)
    (d / "a-file").write_text("I am a file\n")
    (d / "finished").mkdir()
    (d / "finished" / "_SUCCESS").write_text('{"run_id": "r", "files": [], "rows": 0}\n')
    (d / "someone-elses").mkdir()
    (d / "someone-elses" / "thesis.tex").write_text("\\documentclass{article}\n")
    (d / "no-data").mkdir()
    (d / "unfinished" / "clusters").mkdir(parents=True)
    (d / "no-work").mkdir()
    for area in AREAS:
        area.make_data(d)
    _DATA_BEFORE["snapshot"] = _snapshot(d)
    return d


_DATA_BEFORE: dict = {}  # the data directory as the cases found it


def _models(d: Path) -> None:
    import torch

    from ltc_ray.models.gcn_v import GCNV
    from ltc_ray.models.store import save_model

    save_model(str(d / "model-d8"), GCNV(8, 4), {"k": K, "thresholds": {"tau": 0.6}})
    save_model(str(d / "model-d16"), GCNV(D, 4), {"k": K, "thresholds": {"tau": 0.6}})
    bad_json = d / "model-bad-json"
    save_model(str(bad_json), GCNV(D, 4), {"k": K})
    (bad_json / "model.json").write_text('{"method": "gcn-v", "in_dim": ')
    bad_weights = d / "model-bad-weights"
    save_model(str(bad_weights), GCNV(D, 4), {"k": K})
    (bad_weights / "weights.pt").write_bytes(b"\x00garbage" * 64)
    nan_tau = d / "model-nan-tau"
    save_model(str(nan_tau), GCNV(D, 4), {"k": K, "thresholds": {"tau": 0.6}})
    text = (nan_tau / "model.json").read_text()
    (nan_tau / "model.json").write_text(text.replace('"tau": 0.6', '"tau": NaN'))
    from ltc_ray.models.gcn_ds import GCND
    from ltc_ray.models.lgcn import LGCN
    from ltc_ray.models.store import save_net

    save_net(str(d / "model-gcn-d-none"), GCND(D, (4, 4)), "gcn-d", {"k": K})
    save_net(str(d / "model-gcn-d-bad"), GCND(D, (4, 4)), "gcn-d",
             {"k": K, "proposals": [{"k": K, "th": 5.0}]})
    save_net(str(d / "model-lgcn-hop"), LGCN(D, (4, 4, 4, 4)), "lgcn",
             {"k": K, "hop1": 0, "hop2": 2, "active": 2})
    from ltc_ray.models.pse_gcn import PSEGCN

    pse_meta = {"k": K, "rerank": {"k1": K, "k2": 2, "expand": 2, "top": K}, "hop1": 2,
                "hop2": 2, "local_k": 2, "thresholds": {"tau": 0.5}}
    save_net(str(d / "model-pse-hop"), PSEGCN(D, (4, 4)), "pse-gcn", {**pse_meta, "hop2": -1})
    save_net(str(d / "model-pse-rerank"), PSEGCN(D, (4, 4)), "pse-gcn",
             {**pse_meta, "rerank": {"k1": "80"}})
    save_net(str(d / "model-pse-tau"), PSEGCN(D, (4, 4)), "pse-gcn",
             {**pse_meta, "thresholds": {"tau": 3.0}})
    pickled = d / "model-pickle"
    save_model(str(pickled), GCNV(D, 4), {"k": K})
    state = dict(GCNV(D, 4).state_dict())
    state["payload"] = _Evil(d / "pwned-pt")
    torch.save(state, pickled / "weights.pt")


def _snapshot(path: Path):
    """Everything at a location: None, a file's bytes, or a directory's files and bytes."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {
        p.relative_to(path).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
    }


def _env(case: Case) -> dict:
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "TQDM_DISABLE": "1",
    }
    env.pop("RAY_ADDRESS", None)
    if case.env:  # object storage that fails fast: a closed local port, one attempt
        env.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{_closed_port()}",
            AWS_MAX_ATTEMPTS="1",
            AWS_RETRY_MODE="standard",
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        )
        for key, value in case.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
    return env


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    fill: dict  # the placeholders' values
    output: Path | None  # the local output location (None: a URI)
    before: object  # _snapshot of the output before and after the run
    after: object


@dataclass
class _Job:
    """A case made concrete: the command line, where and how it runs, its output's state."""

    case: Case
    argv: list[str]  # [PYTHON, jobs/<job>.py, *args]
    cwd: Path
    env: dict
    fill: dict
    output: Path | None
    before: object


def _job(case: Case, data: Path, tmp: Path) -> _Job:
    out = tmp / "out"
    fill = {"d": str(data), "out": str(out)}
    args = [a.format(**fill) for a in case.args]
    if case.job == "cluster" and "--output" not in args:
        args += ["--output", str(out)]
    flag = next((f for f in ("--output", "--output-config") if f in args), None)
    target = args[args.index(flag) + 1] if flag else str(out)
    cwd = Path(case.cwd.format(**fill)) if case.cwd else REPO
    output = None if "://" in target else cwd / target
    argv = [PYTHON, str(REPO / "jobs" / f"{case.job}.py"), *args]
    before = _snapshot(output) if output else None
    return _Job(case, argv, cwd, _env(case), fill, output, before)


def _done(job: _Job, proc: subprocess.CompletedProcess) -> Run:
    return Run(proc, job.fill, job.output, job.before,
               _snapshot(job.output) if job.output else None)


def _run_subprocess(job: _Job) -> Run:
    """The case as its own ``python jobs/<job>.py`` process."""
    proc = subprocess.run(job.argv, cwd=job.cwd, capture_output=True, text=True,
                          timeout=CASE_TIMEOUT, env=job.env)
    return _done(job, proc)


def _text(raw: bytes) -> str:
    """Bytes as ``subprocess.run(text=True)`` decodes a child's output."""
    encoding = "utf-8" if sys.flags.utf8_mode else locale.getencoding()
    return raw.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")


def _run_in_runner(jobs: list[_Job], work: Path) -> dict[str, Run]:
    """``jobs`` one after another in one tests/_bad_runner.py process (see the module
    docstring); any case the runner did not finish cleanly runs as a subprocess instead."""
    work.mkdir(parents=True, exist_ok=True)
    spec = [{"id": j.case.id, "script": j.argv[1], "args": j.argv[2:], "cwd": str(j.cwd),
             "env": j.env} for j in jobs]
    (work / "cases.json").write_text(json.dumps(spec))
    runner = [PYTHON, str(RUNNER), str(work / "cases.json"), str(work)]
    try:
        proc = subprocess.run(runner, cwd=REPO, capture_output=True, text=True,
                              env=_env(Case("runner", (), "", "")),
                              timeout=CASE_TIMEOUT + RUNNER_CASE_SECONDS * len(jobs))
    except subprocess.TimeoutExpired as exc:
        raise subprocess.TimeoutExpired(runner, exc.timeout) from None
    results = work / "results.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()] \
        if results.exists() else []
    done = {r["id"]: r for r in records}
    runs = {}
    for job in jobs:
        record = done.get(job.case.id)
        if record is None or "leak" in record:  # the runner stopped: a real process
            if proc.returncode not in (0, 3) or record is not None:
                warnings.warn(f"bad-input runner stopped at {job.case.id} (exit "
                              f"{proc.returncode}, {record}): {proc.stderr[-2000:]}",
                              stacklevel=1)
            runs[job.case.id] = _run_subprocess(job)
            continue
        if record.get("timeout"):
            raise subprocess.TimeoutExpired(job.argv, CASE_TIMEOUT)
        # what a fresh process prints first: the interpreter's start (the runner's own
        # output, normally nothing), then `import ltc_ray.cli`; then the case's own output
        out, err = (
            start + _text((work / f"startup{ext}").read_bytes()
                          + (work / f"{job.case.id}{ext}").read_bytes())
            for start, ext in ((proc.stdout, ".out"), (proc.stderr, ".err"))
        )
        runs[job.case.id] = _done(job, subprocess.CompletedProcess(job.argv, record["rc"],
                                                                   out, err))
    return runs


def _run_all(cases: list[Case], data: Path, tmp: Callable[[str], Path],
             runners: int = RUNNERS) -> dict[str, Run]:
    """Every case: the ``fresh`` ones as their own subprocesses, the others split over
    ``runners`` runner processes, all concurrently."""
    for case in cases:
        assert case.fresh or not case.env, f"{case.id}: a case with env must be fresh"
    jobs = [_job(c, data, tmp(c.id)) for c in cases]
    fresh = [j for j in jobs if j.case.fresh]
    shared = [j for j in jobs if not j.case.fresh]
    batches = [shared[i::runners] for i in range(runners) if shared[i::runners]]
    with ThreadPoolExecutor(max_workers=len(batches) + max(2, os.cpu_count() or 2)) as pool:
        futures = [pool.submit(_run_in_runner, b, tmp(f"runner-{i}")) for i, b in
                   enumerate(batches)]
        singles = {j.case.id: pool.submit(_run_subprocess, j) for j in fresh}
        runs = {k: v for f in futures for k, v in f.result().items()}
        runs.update({case_id: f.result() for case_id, f in singles.items()})
    return {c.id: runs[c.id] for c in cases}


@pytest.fixture(scope="module")
def runs(request, data: Path, tmp_path_factory) -> dict[str, Run]:
    """The selected cases, run concurrently: most in two runner processes, the ``fresh``
    ones as their own subprocesses (each is 1-3 s of imports)."""
    here = Path(__file__)
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if Path(item.path) == here and hasattr(item, "callspec") and "case" in item.callspec.params
    ]
    return _run_all(selected, data, tmp_path_factory.mktemp)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line_before_work(case: Case, runs: dict[str, Run], data):
    run = runs[case.id]
    stderr = run.proc.stderr
    lines = stderr.strip().splitlines()
    assert run.proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr  # one line: also proves no Ray and no stage started
    assert lines[0].startswith("error: "), lines[0]
    assert case.message.format(**run.fill) in lines[0]
    assert case.where.format(**run.fill) in lines[0]
    if run.output is not None:
        assert run.after == run.before  # nothing written, nothing removed
        assert not Path(f"{run.output}.work").exists()
        if run.before is None:
            assert not run.output.exists()
    assert not list(data.glob("pwned-*"))  # no pickle ever ran


def test_no_case_touched_any_file(runs: dict[str, Run], data: Path):
    """Besides each case's own output check: not one file of the shared data directory
    (inputs, other outputs, unrelated files) was created, changed or removed."""
    assert _snapshot(data) == _DATA_BEFORE["snapshot"]


def _doc_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.fullmatch(r"`[a-z0-9-]+`", cells[0]):
            rows.append(cells)
    return rows


def test_doc_table_lists_exactly_the_tested_cases():
    rows = _doc_rows()
    doc_ids = [r[0].strip("`") for r in rows]
    assert len(doc_ids) == len(set(doc_ids)), "duplicated rows in docs/bad-inputs.md"
    assert len(CASES) == len({c.id for c in CASES}) >= 150
    assert set(doc_ids) == {c.id for c in CASES}
    messages = {c.id: c.message.replace("{d}/", "") for c in CASES}
    for row in rows:
        case_id, message, code = row[0].strip("`"), row[-2].replace("\\|", "|"), row[-1]
        assert code == "2", case_id
        assert messages[case_id] in message, (case_id, messages[case_id], message)


def test_readme_links_the_table():
    assert "docs/bad-inputs.md" in (REPO / "README.md").read_text()


def test_self_describing_features_need_no_dim(data: Path):
    """`dim` (default 256) is the width of a .bin: a 16-d .npy or Parquet needs no --dim,
    and a --dim that disagrees with the file is refused."""
    from ltc_ray.config import load_config
    from ltc_ray.errors import InputError
    from ltc_ray.pipeline.job import JobSpec, preflight_inputs

    for name in ("good.npy", "ragged.parquet"):
        spec = JobSpec(features=str(data / name), output="unused", config=load_config(None, []))
        if name == "good.npy":
            assert preflight_inputs(spec).info.dim == D
        else:  # read past the header: the scan finds the short row
            with pytest.raises(InputError, match="row 3 has 15 values"):
                preflight_inputs(spec)
    spec = JobSpec(
        features=str(data / "good.npy"), output="unused", config=load_config(None, ["dim=8"])
    )
    with pytest.raises(InputError, match="D = 16 but dim 8"):
        preflight_inputs(spec)


def test_large_input_is_scanned_on_ray_before_the_knn(ray_local, tmp_path: Path, capsys):
    """Above DRIVER_SCAN_MAX_BYTES the rows are scanned by Ray tasks in the plan stage:
    still exit 2 naming the row, still before any kNN file or output is written."""
    from ltc_ray.cli import main
    from ltc_ray.io.features import inspect_features
    from ltc_ray.pipeline.executor import DRIVER_SCAN_MAX_BYTES, Inputs, driver_scans

    n = DRIVER_SCAN_MAX_BYTES // (4 * D) + 1000
    x, _ = blobs(n_per=n // 10, n_clusters=10, dim=D, spread=0.5, seed=1)
    x[-1, 0] = np.nan
    path = tmp_path / "big.bin"
    write_bin(path, x)
    inputs = Inputs(str(path), inspect_features(str(path), D))
    assert driver_scans(inputs) == set()  # the Ray path
    out = tmp_path / "out"
    args = ["--features", str(path), "--dim", str(D), "--set", f"knn.k={K}"]
    code = main(["cluster", *args, "--output", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2
    assert err == [f"error: {path}: row {len(x) - 1} contains NaN or Inf"]
    assert not out.exists()
    assert not (tmp_path / "out.work" / "knn").exists()  # the kNN never started
