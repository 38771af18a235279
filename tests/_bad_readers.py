"""Bad-input cases: readers of outputs (evaluate.py, read_clusters) and export_knn."""

from __future__ import annotations

from pathlib import Path

from _bad_common import Case

# fmt: off
CASES: list[Case] = [
]
# fmt: on


def make_data(d: Path) -> None:
    """The files these cases need, written into the shared data directory ``d``."""
