"""``ltc-ray make-synthetic`` (jobs/make_synthetic.py): write the MS1M-shaped synthetic
benchmark in the learn-to-cluster layout."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ltc_ray.cli.args import EXIT_OK, _Parser
from ltc_ray.errors import InputError
from ltc_ray.synthetic import make_benchmark


def synthetic_parser() -> argparse.ArgumentParser:
    """``make-synthetic``'s flags."""
    p = _Parser(prog="make_synthetic",
                description="Write the MS1M-shaped synthetic benchmark (learn-to-cluster layout).")
    p.add_argument("--data-root", default="data", help="where to write (default: data)")
    p.add_argument("--parts", default="0,1", help="comma list from 0,1,3,5,7,9 (default: 0,1)")
    p.add_argument("--scale", type=float, default=0.01,
                   help="fraction of MS1M identities/samples (1.0 = 5.21M at part9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier make_synthetic run under --data-root "
                   "(files it did not write are never replaced)")
    return p


def synthetic_main(argv: Sequence[str]) -> int:
    """``make-synthetic``: write the benchmark's parts, one line per part."""
    args = synthetic_parser().parse_args(argv)
    try:
        parts = [int(p) for p in args.parts.split(",") if p.strip()]
    except ValueError:
        raise InputError(
            "--parts", f"expected a comma list of integers, got {args.parts!r}"
        ) from None
    written = make_benchmark(args.data_root, parts, args.scale, args.seed, args.dim,
                             overwrite=args.overwrite)
    for name, info in written.items():
        print(f"{name}: {info['n_samples']} samples, {info['n_ids']} identities -> "
              f"{info['features']}")
    return EXIT_OK

