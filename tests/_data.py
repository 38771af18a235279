"""Small data made by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def blobs(n_per: int, n_clusters: int, dim: int, spread: float, seed: int):
    """Well-separated unit-vector blobs: features (n, dim) float32 and labels (n,)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    labels = np.repeat(np.arange(n_clusters), n_per)
    rng.shuffle(labels)
    noise = spread * rng.standard_normal((len(labels), dim))
    x = (centres[labels] + noise) / np.sqrt(dim)
    return x.astype(np.float32), labels.astype(np.int64)


def write_bin(path: Path, x: np.ndarray, labels: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(x, dtype="<f4").tofile(path)
    if labels is not None:
        path.with_suffix(".meta").write_text("\n".join(map(str, labels.tolist())) + "\n")
