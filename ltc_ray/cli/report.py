"""``ltc-ray report OUTPUT``: a finished run's overview as one static HTML file (plots
inline, no server, no script), by default ``OUTPUT/report.html``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ltc_ray.cli.args import EXIT_OK, _Parser, _storage_options, add_storage_options
from ltc_ray.report.html import write_report


def report_parser() -> argparse.ArgumentParser:
    """The verb's flags."""
    p = _Parser(prog="report", description="Write a finished run's overview (sizes, kNN "
                "similarities with the thresholds used, stage times and memory, metrics) as "
                "one static HTML file.")
    p.add_argument("output", metavar="OUTPUT", help="output URI of a finished run (has _SUCCESS)")
    p.add_argument("--to", metavar="FILE", help="write the page here instead of "
                   "OUTPUT/report.html (a new file, or a report ltc-ray wrote)")
    add_storage_options(p)
    return p


def report_main(argv: Sequence[str]) -> int:
    """``report``: read the run's overview (an unfinished run is refused), write the page."""
    args = report_parser().parse_args(argv)
    so = _storage_options(args.storage_options)

    print(f"report: {write_report(args.output, so, to=args.to)}")
    return EXIT_OK
