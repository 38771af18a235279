"""A finished run's overview (numbers, plots) and its static HTML report.

``run_overview`` reads the overview (the web page's ``/api/overview`` serves the same),
``overview_svgs`` draws its plots as inline SVG, ``write_report`` writes the page
(``ltc-ray report OUTPUT``, ``jobs/cluster.py --report``).
"""

from ltc_ray.report.html import REPORT_NAME, render_report, report_uri, write_report
from ltc_ray.report.overview import run_overview
from ltc_ray.report.plots import (
    overview_svgs,
    similarity_histogram_svg,
    size_histogram_svg,
    stage_bars_svg,
)

__all__ = ["REPORT_NAME", "overview_svgs", "render_report", "report_uri", "run_overview",
           "similarity_histogram_svg", "size_histogram_svg", "stage_bars_svg", "write_report"]
