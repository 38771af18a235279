"""Clustering quality against ground-truth labels (pairwise F, BCubed F, NMI).

Pure functions over (N,) integer label arrays; exact, O(N log N), no pairs
materialised. ``evaluate`` returns the flat dict written to ``metrics.json``.
"""

from ltc_ray.metrics.report import metrics_table, size_distribution, size_line
from ltc_ray.metrics.scores import (
    Contingency,
    bcubed_prf,
    contingency,
    evaluate,
    nmi,
    pairwise_prf,
)

__all__ = [
    "Contingency",
    "bcubed_prf",
    "contingency",
    "evaluate",
    "metrics_table",
    "size_distribution",
    "size_line",
    "nmi",
    "pairwise_prf",
]
