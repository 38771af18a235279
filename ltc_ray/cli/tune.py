"""``ltc-ray tune`` (jobs/tune.py): grid-search a method's threshold on a labelled split
and write the config to use on test splits."""

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
from ltc_ray.errors import InputError


def tune_parser() -> argparse.ArgumentParser:
    """``tune``'s flags."""
    p = _Parser(
        prog="tune",
        description="Grid-search a method's threshold on a LABELLED split (train, e.g. --part 0) "
        "and write a config file to use on test splits.",
    )
    _add_input_args(p, "labels (.meta); --part finds them itself")
    p.add_argument("--method", required=True)
    p.add_argument("--model", help="model directory of a learned method (jobs/train.py output): "
                   "tuning its link threshold, the rest of the model as trained")
    p.add_argument("--metric", default="pairwise_f", choices=["pairwise_f", "bcubed_f", "nmi"])
    p.add_argument("--grid", metavar="LOW:HIGH:STEP",
                   help="values to try (default per method); each must be valid for the tuned "
                   "key, STEP >= 1e-6, at most 1000 values")
    p.add_argument("--output-config", required=True, help="YAML file to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a config an earlier tune wrote (any other file is refused)")
    _add_run_args(p, "runs/tune-<input>.work")
    return p


def tune_main(argv: Sequence[str]) -> int:
    """``tune``: the grid on the labelled split, the best value written as a config."""
    args = tune_parser().parse_args(argv)
    from ltc_ray.pipeline.tune import parse_grid, tune  # after --help: imports faiss, Ray

    grid = None if args.grid is None else parse_grid(args.grid)  # vs. the key: in tune()
    features, labels, knn, name = _resolve_inputs(args)
    if labels is None:
        raise InputError("--labels", "tuning needs labels (a labelled training split)")
    cfg = _config(args)
    result = tune(
        features=features, labels=labels, knn=knn, config=cfg, metric=args.metric, grid=grid,
        work_dir=args.work_dir or f"runs/tune-{name}.work", num_cpus=args.num_cpus,
        storage_options=_storage_options(args.storage_options), output_config=args.output_config,
        overwrite=args.overwrite,
    )
    print(result["table"])
    print(f"best {result['param']} = {result['best_value']:.4f} "
          f"({args.metric} {100 * result['best_score']:.2f}) -> {args.output_config}")
    return EXIT_OK

