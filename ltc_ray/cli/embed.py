"""``ltc-ray embed`` (jobs/embed.py): images -> ``OUT/embeddings.parquet`` with a
user-supplied TorchScript or ONNX model, on Ray Data. Joins the cluster in RAY_ADDRESS
(``ray job submit``) or starts a local Ray with ``--num-cpus``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ltc_ray.cli.args import EXIT_OK, _Parser, _storage_options, add_storage_options
from ltc_ray.embed import EMBEDDINGS, EmbedSpec, run_embed
from ltc_ray.errors import InputError


def embed_parser() -> argparse.ArgumentParser:
    """``embed``'s flags."""
    p = _Parser(
        prog="embed",
        description="Embed images with a user-supplied model on Ray Data: OUT/embeddings.parquet "
        "(id, path, embedding), OUT/failed.parquet (path, error), OUT/report.json, OUT/_SUCCESS. "
        "Rerunning the same command reuses the chunks already computed under OUT/_work.",
    )
    p.add_argument("--input", required=True,
                   help="a folder URI (images listed recursively; other files are listed as "
                   "failed), a list file (.txt/.lst: one path per line, relative to the list "
                   "file's folder unless a URI or absolute), or a .parquet file with a column "
                   "of paths")
    p.add_argument("--model", required=True,
                   help="TorchScript (.pt/.ts/...) or ONNX (.onnx, needs ltc-ray[onnx]) model URI")
    p.add_argument("--model-config", metavar="SIDECAR",
                   help="preprocessing sidecar (YAML/JSON: size [h, w], mean, std, resize, "
                   "color; default: <model>.yaml/.json or <model-stem>.yaml/.json)")
    p.add_argument("--output", required=True, help="output folder URI")
    p.add_argument("--path-column", default="path",
                   help="column of paths in a Parquet --input (default: path)")
    p.add_argument("--images-root",
                   help="what relative paths of a list/Parquet input are relative to "
                   "(default: the input file's folder)")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="images per chunk: the unit of work, of resume and of a row group "
                   "(default: 1024)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per model call (default: 256)")
    p.add_argument("--actors", type=int,
                   help="model actors (default: one per GPU; without GPUs, CPUs / 4, at least 1)")
    p.add_argument("--actor-cpus", type=float, default=1.0,
                   help="CPUs (torch/onnxruntime threads) per model actor (default: 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one GPU per actor when the Ray cluster has GPUs (default)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace finished embeddings at --output")
    p.add_argument("--no-commit", action="store_true",
                   help="compute the chunk parts under OUT/_work and stop before writing the "
                   "output (staged runs, tests); the same command without it commits, "
                   "reusing the parts")
    add_storage_options(p)
    return p


def embed_main(argv: Sequence[str]) -> int:
    """``embed``: the cheap checks, then the job; prints a one-paragraph summary."""
    args = embed_parser().parse_args(argv)
    spec = EmbedSpec(
        input=args.input, model=args.model, output=args.output, model_config=args.model_config,
        path_column=args.path_column, images_root=args.images_root, chunk_size=args.chunk_size,
        batch_size=args.batch_size, actors=args.actors, actor_cpus=args.actor_cpus,
        device=args.device, num_cpus=args.num_cpus, overwrite=args.overwrite,
        commit=not args.no_commit, storage_options=_storage_options(args.storage_options),
    )
    if spec.num_cpus is not None and spec.num_cpus < 1:
        raise InputError("--num-cpus", f"must be a positive integer, got {spec.num_cpus}")
    report = run_embed(spec)
    if not report["committed"]:
        print(f"computed {report['computed_chunks']} chunk(s), reused "
              f"{report['reused_chunks']}, under {args.output}/_work (not committed: "
              "rerun without --no-commit)")
        return EXIT_OK
    rate = report["images_per_s"]
    print(f"embedded {report['n_embedded']} of {report['n_listed']} images "
          f"({report['n_failed']} failed, see failed.parquet) in {report['seconds']:.1f} s"
          + (f" ({rate:.0f} images/s)" if rate else "")
          + f"; {report['reused_chunks']}/{report['chunks']} chunks reused\n"
          f"output: {args.output}/{EMBEDDINGS} (D={report['dim']}); cluster it with "
          f"ltc-ray cluster --features {args.output}/{EMBEDDINGS}")
    return EXIT_OK
