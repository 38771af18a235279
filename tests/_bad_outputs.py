"""Bad-input cases: output locations: ownership, overlap with inputs, locks, other writing jobs."""

from __future__ import annotations

from pathlib import Path

from _bad_common import Case

# fmt: off
CASES: list[Case] = [
]
# fmt: on


def make_data(d: Path) -> None:
    """The files these cases need, written into the shared data directory ``d``."""
