"""Ground-truth labels in the learn-to-cluster ``.meta`` format: one integer per line.

Line ``i`` (1-based in messages) is the label of feature row ``i - 1``.
"""

from __future__ import annotations

import numpy as np

from ltc_ray.errors import InputError
from ltc_ray.io.fs import require_file, write_bytes_atomic

__all__ = ["read_labels", "write_labels"]


def _first_bad_line(uri: str, data: bytes) -> InputError:
    """Describe the first line that is not exactly one int64 (error path only)."""
    lines = data.rstrip().split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        text = raw.strip()
        shown = raw.rstrip(b"\r").decode("utf-8", errors="replace")
        if not text:
            return InputError(uri, f"line {lineno} is empty")
        try:
            value = int(text)
        except ValueError:
            return InputError(uri, f"line {lineno} is not an integer: {shown!r}")
        if not -(2**63) <= value < 2**63:
            return InputError(uri, f"line {lineno} is outside the int64 range: {shown!r}")
    return InputError(uri, "could not parse labels")  # not reached for inputs that failed


def read_labels(
    uri: str, expected_rows: int | None = None, storage_options: dict | None = None
) -> np.ndarray:
    """Labels ``(n,) int64`` from a ``.meta`` file (negative labels allowed).

    ``expected_rows`` is the feature row count; a different label count is an input
    error, caught before any expensive stage runs.
    """
    fs, path = require_file(uri, "labels file", storage_options)
    data = fs.cat_file(path)
    body = data.rstrip()
    if not body.strip():
        raise InputError(uri, "labels file is empty")
    n_lines = body.count(b"\n") + 1
    try:
        tokens = body.split()
        if len(tokens) != n_lines:  # a blank line in the middle, or two values on one line
            raise ValueError
        labels = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        raise _first_bad_line(uri, data) from None
    if expected_rows is not None and labels.shape[0] != expected_rows:
        raise InputError(
            uri, f"has {labels.shape[0]} labels but the features have {expected_rows} rows"
        )
    return labels


def write_labels(uri: str, labels: np.ndarray, storage_options: dict | None = None) -> None:
    """Write ``(n,)`` integer labels as a ``.meta`` file, one per line, atomically."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    text = "\n".join(map(str, labels.tolist()))
    write_bytes_atomic(uri, (text + "\n").encode() if labels.size else b"", storage_options)
