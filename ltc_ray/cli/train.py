"""``ltc-ray train`` (jobs/train.py): train a learned method on a labelled split and write
a model directory."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ltc_ray.cli.args import (
    EXIT_OK,
    _add_input_args,
    _add_run_args,
    _config,
    _Parser,
    _resolve_inputs,
    _storage_options,
)
from ltc_ray.cluster import method_class
from ltc_ray.config import check_flag, float_flag, int_flag
from ltc_ray.errors import InputError, storage_errors
from ltc_ray.io.fs import url_to_fs


def train_parser() -> argparse.ArgumentParser:
    """``train``'s flags; the numeric ones are range-checked by ``ltc_ray.config``."""

    p = _Parser(
        prog="train",
        description="Train a learned method on a LABELLED split (e.g. --part 0) and write a model "
        "directory (weights + model.json with the thresholds tuned on that split).",
    )
    _add_input_args(p, "labels (.meta); --part finds them itself")
    p.add_argument("--method", default="hard-clusters",
                   help="hard-clusters (edge scorer; the default), gcn-v, gcn-ve (GCN-V, "
                   "then GCN-E), gcn-d (proposal scores), gcn-ds (GCN-D + GCN-S), lgcn "
                   "(L-GCN linkage), pse-gcn (re-ranked graph + DGC embeddings) or map-equation "
                   "(edge scorer + the map equation's keep rule)")
    p.add_argument("--output", required=True, help="model directory URI to write")
    p.add_argument("--edge-epochs", type=int_flag,
                   help="gcn-ve: GCN-E training epochs (default 2)")
    p.add_argument("--rho", type=float_flag, default=0.2,
                   help="gcn-ve: share of most confident nodes that use GCN-E (default 0.2)")
    p.add_argument("--epochs", type=int_flag, help="training epochs (1 to 10000)")
    p.add_argument("--lr", type=float_flag, help="learning rate, in (0, 1]")
    p.add_argument("--batch-rows", type=int_flag,
                   help="gcn-v: mini-batch rows (0 = full graph when it fits, else mini-batches)"
                   "; hard-clusters, map-equation: anchors per step (default 256)")
    p.add_argument("--hidden", type=int_flag,
                   help="hidden width (default 512; pse-gcn 128, lgcn 128)")
    p.add_argument("--tune-folds", type=int_flag,
                   help="hard-clusters, pse-gcn, map-equation: identity folds of the out-of-fold "
                   "threshold search (default 2; 0 keeps the paper's 0.7 / 0.87, or p >= 0.5)")
    p.add_argument("--proposals", choices=("2", "8", "20"),
                   help="gcn-d, gcn-ds: learn-to-cluster's proposal settings to train on and "
                   "carry (default 8: iteration 0 at two cuts + six super-vertex settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model")
    _add_run_args(p, "<output>.work")
    return p


def train_main(argv: Sequence[str]) -> int:
    """``train``: flags and inputs checked, then the method's trainer on Ray."""

    args = train_parser().parse_args(argv)
    for flag in ("--epochs", "--edge-epochs", "--lr", "--rho", "--batch-rows", "--hidden",
                 "--tune-folds"):  # finite and in range (config.FLAG_RANGES), before any work
        check_flag(flag, getattr(args, flag[2:].replace("-", "_")))
    features, labels, knn, _ = _resolve_inputs(args)
    if labels is None:
        raise InputError("--labels", "training needs labels (a labelled split)")
    cfg = _config(argparse.Namespace(**{**vars(args), "method": None}))
    with storage_errors(args.output):
        fs, path = url_to_fs(args.output, _storage_options(args.storage_options))
        if fs.isfile(path):
            raise InputError(args.output, "model output path is a file; expected a directory")
    from ltc_ray.pipeline.train import train

    options = {flag: getattr(args, flag) for flag in (
        "epochs", "lr", "batch_rows", "hidden", "tune_folds", "edge_epochs", "rho",
        "proposals")}
    meta = train(args.method, features, labels, args.output, cfg, options, knn=knn,
                 work_dir=args.work_dir, overwrite=args.overwrite, num_cpus=args.num_cpus,
                 storage_options=_storage_options(args.storage_options))
    print("\n".join(method_class(args.method).trainer.summary(meta, features)))
    m = meta["job_train_metrics"]
    print(f"the job's stages on the training split (in-sample): pairwise F "
          f"{100 * m['pairwise_f']:.2f}, BCubed F {100 * m['bcubed_f']:.2f}, "
          f"{m['n_clusters']} clusters")
    print(f"model: {args.output}")
    return EXIT_OK

