"""Exact clustering scores from the sparse contingency table.

Definitions follow learn-to-cluster ``evaluation/metrics.py`` (reference §8):
every predicted label, singletons included, is a cluster; a_g = true class
sizes, b_l = predicted cluster sizes, n_gl = |g ∩ l|. All scores are sums over
the non-zero cells of the contingency table, so each costs O(N log N) time and
O(N) memory whatever the cluster sizes. (The reference BCubed loops over classes
with set intersections and is quadratic when one predicted cluster is huge.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ltc_ray.errors import InputError

__all__ = [
    "Contingency",
    "bcubed_prf",
    "contingency",
    "evaluate",
    "nmi",
    "pairwise_prf",
]


@dataclass(frozen=True)
class Contingency:
    """Sparse contingency table: true classes (rows) x predicted clusters (columns).

    Only non-zero cells are stored, sorted by (class, cluster); all arrays int64.

    - ``classes``: (G,) original true label of each row, ascending.
    - ``clusters``: (L,) original predicted label of each column, ascending.
    - ``class_sizes``: (G,) a_g.  ``cluster_sizes``: (L,) b_l.
    - ``cell_class``, ``cell_cluster``: (nnz,) row / column index of each cell.
    - ``cell_count``: (nnz,) n_gl >= 1; sums to ``n_samples``.
    """

    n_samples: int
    classes: np.ndarray
    clusters: np.ndarray
    class_sizes: np.ndarray
    cluster_sizes: np.ndarray
    cell_class: np.ndarray
    cell_cluster: np.ndarray
    cell_count: np.ndarray

    @property
    def n_classes(self) -> int:
        return int(self.classes.size)

    @property
    def n_clusters(self) -> int:
        return int(self.clusters.size)


def _as_labels(labels: npt.ArrayLike, name: str) -> np.ndarray:
    """Validate one label vector and return it as (N,) int64."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise InputError("labels", f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise InputError("labels", f"{name} is empty")
    if arr.dtype.kind not in "iu":
        raise InputError("labels", f"{name} must be integers, got dtype {arr.dtype}")
    # uint64 -> int64 wraps, but injectively, so the partition is unchanged.
    return arr.astype(np.int64, copy=False)


def _dense_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map (N,) int64 labels to dense codes 0..K-1 in ascending label order.

    Returns (values (K,) int64, codes (N,) int64). Labels in a compact range
    (the usual case: .meta files and our own outputs are 0..C-1) take an O(N)
    bincount path; anything else (negative, huge, sparse) is sorted.
    """
    lo, hi = int(x.min()), int(x.max())
    if hi - lo <= 2 * x.size + 1024:
        shifted = x - lo
        present = np.bincount(shifted, minlength=hi - lo + 1) > 0
        code_of = np.cumsum(present, dtype=np.int64) - 1
        return np.flatnonzero(present).astype(np.int64) + lo, code_of[shifted]
    values, codes = np.unique(x, return_inverse=True)
    return values.astype(np.int64, copy=False), codes.reshape(-1).astype(np.int64, copy=False)


def contingency(labels_true: npt.ArrayLike, labels_pred: npt.ArrayLike) -> Contingency:
    """Sparse contingency table of two (N,) integer labelings, in O(N log N).

    Labels may be any int64 values (negative, huge, non-contiguous); only the
    partition they induce matters. Raises :class:`InputError` unless both are
    1-D integer arrays of the same length >= 1.
    """
    t = _as_labels(labels_true, "labels_true")
    p = _as_labels(labels_pred, "labels_pred")
    if t.size != p.size:
        raise InputError("labels", f"labels_true has {t.size} entries but labels_pred has {p.size}")
    n = int(t.size)
    classes, g = _dense_codes(t)
    clusters, k = _dense_codes(p)
    n_clusters = clusters.size
    # One combined key per sample; G * L <= N**2 fits int64 for N < 3e9.
    key = g * n_clusters + k
    cells, cell_count = _count_keys(key, classes.size * n_clusters)
    cell_class = cells // n_clusters
    return Contingency(
        n_samples=n,
        classes=classes,
        clusters=clusters,
        class_sizes=np.bincount(g, minlength=classes.size).astype(np.int64, copy=False),
        cluster_sizes=np.bincount(k, minlength=n_clusters).astype(np.int64, copy=False),
        cell_class=cell_class,
        cell_cluster=cells - cell_class * n_clusters,
        cell_count=cell_count.astype(np.int64, copy=False),
    )


def _count_keys(key: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of (N,) int64 ``key`` in [0, n_keys) and their counts, ascending."""
    if n_keys <= 2 * key.size + 1024:
        counts = np.bincount(key, minlength=n_keys)
        cells = np.flatnonzero(counts)
        return cells.astype(np.int64, copy=False), counts[cells]
    cells, counts = np.unique(key, return_counts=True)
    return cells, counts


def _safe_ratio(num: int, den: int) -> float:
    """num/den with 0/0 := 1 (no pairs to get wrong)."""
    return 1.0 if den == 0 else num / den


def _f_score(precision: float, recall: float) -> float:
    """Harmonic mean; 0 when both are 0."""
    total = precision + recall
    return 0.0 if total == 0 else 2.0 * precision * recall / total


def _pairwise(c: Contingency) -> tuple[float, float, float]:
    n = c.n_samples
    # Integer sums: sum of squares <= N**2, exact in int64 for N < 3e9.
    tk = int(np.dot(c.cell_count, c.cell_count)) - n
    pk = int(np.dot(c.cluster_sizes, c.cluster_sizes)) - n
    qk = int(np.dot(c.class_sizes, c.class_sizes)) - n
    precision, recall = _safe_ratio(tk, pk), _safe_ratio(tk, qk)
    return precision, recall, _f_score(precision, recall)


def _bcubed(c: Contingency) -> tuple[float, float, float]:
    n = c.n_samples
    sq = c.cell_count.astype(np.float64) ** 2
    precision = float(np.sum(sq / c.cluster_sizes[c.cell_cluster])) / n
    recall = float(np.sum(sq / c.class_sizes[c.cell_class])) / n
    return precision, recall, _f_score(precision, recall)


def _entropy(sizes: np.ndarray, n: int) -> float:
    """Shannon entropy (nats) of a partition with (K,) block sizes summing to n."""
    s = sizes.astype(np.float64)
    return math.log(n) - float(np.dot(s, np.log(s))) / n


def _nmi(c: Contingency) -> float:
    if c.n_classes == 1 and c.n_clusters == 1:
        return 1.0
    n = c.n_samples
    log_a = np.log(c.class_sizes.astype(np.float64))
    log_b = np.log(c.cluster_sizes.astype(np.float64))
    cnt = c.cell_count.astype(np.float64)
    # I = sum n_gl/N * log(N n_gl / (a_g b_l))
    terms = np.log(cnt) - log_a[c.cell_class] - log_b[c.cell_cluster]
    mutual_info = math.log(n) + float(np.dot(cnt, terms)) / n
    mean_entropy = 0.5 * (_entropy(c.class_sizes, n) + _entropy(c.cluster_sizes, n))
    if mean_entropy <= 0.0:  # cannot happen unless both are single clusters (handled above)
        return 1.0
    return min(max(mutual_info / mean_entropy, 0.0), 1.0)


def pairwise_prf(
    labels_true: npt.ArrayLike, labels_pred: npt.ArrayLike
) -> tuple[float, float, float]:
    """Pairwise (precision, recall, F) over ordered pairs i != j.

    tk = sum n_gl^2 - N, pk = sum b_l^2 - N, qk = sum a_g^2 - N;
    P = tk/pk, R = tk/qk, F = 2PR/(P+R). Edge cases: P = 1 when pk == 0 (all
    predicted clusters are singletons, so no predicted pair is wrong); R = 1
    when qk == 0 (all true classes are singletons); F = 0 when P + R == 0.
    """
    return _pairwise(contingency(labels_true, labels_pred))


def bcubed_prf(
    labels_true: npt.ArrayLike, labels_pred: npt.ArrayLike
) -> tuple[float, float, float]:
    """BCubed (precision, recall, F), the per-sample average including self.

    P = sum_cells n_gl^2 / b_l / N, R = sum_cells n_gl^2 / a_g / N,
    F = 2PR/(P+R). P and R are always > 0, so no edge cases arise.
    """
    return _bcubed(contingency(labels_true, labels_pred))


def nmi(labels_true: npt.ArrayLike, labels_pred: npt.ArrayLike) -> float:
    """Normalised mutual information with ARITHMETIC-mean normalisation.

    NMI = I(true; pred) / ((H(true) + H(pred)) / 2), natural logs; this is
    scikit-learn's default since 0.22 (before that it was the geometric mean,
    so older published NMI values are not directly comparable). Edge cases:
    both labelings a single cluster -> 1.0; exactly one a single cluster ->
    0.0. The result is clipped to [0, 1] against floating-point rounding.
    Symmetric in its arguments.
    """
    return _nmi(contingency(labels_true, labels_pred))


def evaluate(labels_true: npt.ArrayLike, labels_pred: npt.ArrayLike) -> dict[str, float | int]:
    """All scores from one contingency table, as the flat ``metrics.json`` dict.

    Keys: pairwise_precision, pairwise_recall, pairwise_f, bcubed_precision,
    bcubed_recall, bcubed_f, nmi (floats in 0..1), n_samples, n_clusters
    (predicted), n_classes (true) (ints).
    """
    c = contingency(labels_true, labels_pred)
    pp, pr, pf = _pairwise(c)
    bp, br, bf = _bcubed(c)
    return {
        "pairwise_precision": pp,
        "pairwise_recall": pr,
        "pairwise_f": pf,
        "bcubed_precision": bp,
        "bcubed_recall": br,
        "bcubed_f": bf,
        "nmi": _nmi(c),
        "n_samples": c.n_samples,
        "n_clusters": c.n_clusters,
        "n_classes": c.n_classes,
    }
