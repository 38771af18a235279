"""Bad-input cases: input files (precomputed kNN contents, Parquet, .npy headers, internal formats)."""

from __future__ import annotations

from pathlib import Path

from _bad_common import Case

# fmt: off
CASES: list[Case] = [
]
# fmt: on


def make_data(d: Path) -> None:
    """The files these cases need, written into the shared data directory ``d``."""
