"""``ltc-ray evaluate`` (jobs/evaluate.py): score a finished clustering output against
labels, optionally writing the metrics as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np

from ltc_ray.cli.args import EXIT_OK, _Parser, _storage_options, add_storage_options
from ltc_ray.errors import InputError, brief
from ltc_ray.io.fs import url_to_fs
from ltc_ray.io.labels import read_labels
from ltc_ray.io.output import SUCCESS, overlaps, read_clusters, write_json
from ltc_ray.metrics import evaluate
from ltc_ray.metrics.report import metrics_table


def evaluate_parser() -> argparse.ArgumentParser:
    """``evaluate``'s flags."""
    p = _Parser(prog="evaluate", description="Score a finished clustering output against labels.")
    p.add_argument("--pred", required=True, help="output URI of a finished run (has _SUCCESS)")
    p.add_argument("--labels", required=True, help="labels (.meta), one integer per line")
    p.add_argument("--json", help="also write the metrics to this file (a new path, or a "
                   "metrics file evaluate wrote; never inside a result directory)")
    add_storage_options(p)
    return p


def _check_metrics_target(uri: str, pred: str, so: dict | None) -> None:
    """``--json`` writes a new file or replaces a metrics file evaluate wrote (a JSON
    object with exactly the metric keys); never a user's file, and never a file inside
    a result directory, which holds only what its run wrote."""
    if overlaps(uri, pred, so):
        raise InputError(uri, "lies inside the --pred result, which holds only the files "
                         "its run wrote; choose a path outside it (--json)")
    fs, path = url_to_fs(uri, so)
    path = path.rstrip("/")
    if "/" in path and fs.exists(f"{path.rsplit('/', 1)[0]}/{SUCCESS}"):
        raise InputError(uri, "lies inside an ltc-ray result (its directory has _SUCCESS); "
                         "choose a path outside it (--json)")
    if fs.isdir(path):
        raise InputError(uri, "is a directory; --json names the file to write")
    if not fs.exists(path):
        return
    keys = set(evaluate(np.zeros(2, np.int64), np.zeros(2, np.int64)))  # the metric keys
    try:
        with fs.open(path, "rb") as fh:
            existing = json.loads(fh.read(1 << 20))
        ours = isinstance(existing, dict) and set(existing) == keys
    except (ValueError, RecursionError):  # not JSON, not UTF-8, longer than 1 MiB
        ours = False
    if not ours:
        raise InputError(uri, "already exists and is not a metrics file evaluate wrote; "
                         "refusing to overwrite it: choose a new path (--json)")


def evaluate_main(argv: Sequence[str]) -> int:
    """``evaluate``: the result (checked against its manifest) scored against the labels."""
    args = evaluate_parser().parse_args(argv)
    so = _storage_options(args.storage_options)
    if args.json:
        _check_metrics_target(args.json, args.pred, so)
    table = read_clusters(args.pred, so)  # checked against its _SUCCESS manifest
    labels = read_labels(args.labels, storage_options=so)
    if len(labels) != table.num_rows:  # before computing on two arrays that disagree
        raise InputError(args.pred, f"has {table.num_rows} cluster rows but "
                         f"{brief(args.labels)} has {len(labels)} labels; score a result "
                         "against the labels of the features it clustered")
    metrics = evaluate(labels, table.column("cluster_id").to_numpy())
    print(metrics_table({args.pred: metrics}))
    if args.json:
        write_json(args.json, metrics, so)
    return EXIT_OK

