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


def sphere_faces(n_ids: int, per: int, dim: int, seed: int, noise: float = 0.9):
    """Unit features of ``n_ids`` identities x ``per`` samples: Gaussian clusters around unit
    centres, noisy enough that kNN rows mix identities (features (n, dim) float32, labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_ids), per)
    x = centres[labels] + noise * rng.standard_normal((len(labels), dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)


def write_bin(path: Path, x: np.ndarray, labels: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(x, dtype="<f4").tofile(path)
    if labels is not None:
        path.with_suffix(".meta").write_text("\n".join(map(str, labels.tolist())) + "\n")


def random_knn(
    n: int, k: int, seed: int | np.random.Generator, low: float = -0.4
) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric kNN graph with negative similarities (down to ``low``) and a few empty
    (-1) slots: ``(n, k) int32`` ids and ``(n, k) float32`` sims, descending, self at rank 0.
    ``seed`` may be a generator the caller keeps drawing from afterwards."""
    rng = np.random.default_rng(seed)
    ids = np.empty((n, k), dtype=np.int32)
    sims = np.empty((n, k), dtype=np.float32)
    for i in range(n):
        others = rng.choice(np.delete(np.arange(n), i), size=k - 1, replace=False)
        s = np.sort(rng.uniform(low, 1.0, size=k - 1).astype(np.float32))[::-1]
        ids[i] = np.concatenate([[i], others])
        sims[i] = np.concatenate([[1.0], s])
    empty = rng.random((n, k)) < 0.05
    empty[:, 0] = False
    ids[empty], sims[empty] = -1, -np.inf
    return ids, sims
