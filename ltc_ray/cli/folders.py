"""``ltc-ray export-folders`` (jobs/export_folders.py): a finished output written as the
image-clustering-browser folder layout of ``img_names.txt`` files."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime

from ltc_ray.cli.args import EXIT_OK, _Parser, _storage_options, add_storage_options
from ltc_ray.errors import InputError
from ltc_ray.export.folders import export_folders

_LAYOUT = """\
layout written under --root:
  ROOT/img_names.txt                           every name, line i = sample_id i (written
                                               when absent; when present it must list the
                                               same names, in any order)
  ROOT/<YYYYmmdd-HHMMSS>-d<N>-c<K>/NNN/img_names.txt
                                               one folder per cluster of size >= 2; NNN is
                                               the cluster_id = size rank (000 = largest)
  ROOT/<run>/etc/img_names.txt                 every singleton
N = samples, K = clusters (singletons included). Names are newline-joined with no final
newline, as the seed writes them. For a re-clustering of cluster NNN, pass
--root ROOT/<run>/NNN: the nested run is written inside that cluster's folder.
Names come from the run's input when it is Parquet with a 'path' column (ltc-ray embed's
embeddings.parquet), else from --names. An existing run folder is never replaced.
"""


def folders_parser() -> argparse.ArgumentParser:
    """``export-folders``' flags."""
    p = _Parser(prog="export_folders",
                description="Write a finished ltc-ray output as folders of img_names.txt\n"
                "files (the image-clustering-browser layout), one part at a time.",
                epilog=_LAYOUT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", metavar="RESULT",
                   help="a finished ltc-ray output (a folder holding _SUCCESS)")
    p.add_argument("--root", required=True,
                   help="folder (local or fsspec URI) to write the layout under")
    p.add_argument("--names", metavar="FILE",
                   help="text file of names, one a line, line i = sample_id i (default: the "
                   "'path' column of the run's Parquet input)")
    p.add_argument("--timestamp", metavar="YYYYmmdd-HHMMSS",
                   help="the run folder's time stamp (default: now, local time)")
    add_storage_options(p)
    return p


def _timestamp(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.strptime(text, "%Y%m%d-%H%M%S")
    except ValueError:
        raise InputError("--timestamp", f"'{text[:40]}' is not YYYYmmdd-HHMMSS "
                         "(e.g. 20201225-170423)") from None


def folders_main(argv: Sequence[str]) -> int:
    """``export-folders``: prints the run folder written."""
    args = folders_parser().parse_args(argv)
    so = _storage_options(args.storage_options)
    when = _timestamp(args.timestamp)

    run = export_folders(args.result, args.root, names_uri=args.names, storage_options=so,
                         when=when)
    print(run)
    return EXIT_OK
