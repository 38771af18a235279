"""``ltc-ray export-knn`` (jobs/export_knn.py): export a run's kNN graph as a
learn-to-cluster ``faiss_k_<k>.npz``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ltc_ray.cli.args import EXIT_OK, _Parser, _storage_options, add_storage_options
from ltc_ray.graph.knn_graph import export_ltc_npz


def export_parser() -> argparse.ArgumentParser:
    """``export-knn``'s flags."""
    p = _Parser(prog="export_knn",
                description="Export a run's kNN graph as a learn-to-cluster faiss_k_<k>.npz.")
    p.add_argument("--work-dir", required=True, help="a run's work area (holds knn/manifest.json)")
    p.add_argument("--output", required=True,
                   help="npz URI to write: a new path outside --work-dir; an export also "
                   "writes <output>.ltc-ray.json, the marker that says ltc-ray wrote it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output, but only a kNN export ltc-ray wrote: "
                   "its <output>.ltc-ray.json marker must still match the file's size, "
                   "modification time and (object stores) ETag; any other file is refused, "
                   "flag or not")
    add_storage_options(p)
    return p


def export_main(argv: Sequence[str]) -> int:
    """``export-knn``: the work area's kNN graph written as one npz (and its marker)."""
    args = export_parser().parse_args(argv)
    n, k = export_ltc_npz(args.work_dir, args.output, _storage_options(args.storage_options),
                          overwrite=args.overwrite)
    print(f"wrote {n} x {k} kNN lists to {args.output}")
    return EXIT_OK

