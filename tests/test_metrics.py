"""Metrics against brute-force definitions (pairs, per-sample BCubed, explicit entropies)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from ltc_ray.errors import InputError
from ltc_ray.metrics import bcubed_prf, contingency, evaluate, nmi, pairwise_prf

SEEDS = range(20)
METRIC_KEYS = (
    "pairwise_precision",
    "pairwise_recall",
    "pairwise_f",
    "bcubed_precision",
    "bcubed_recall",
    "bcubed_f",
    "nmi",
)


# ---------------------------------------------------------------- brute force


def _f(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def brute_pairwise(t: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    """Count ordered pairs i != j directly from the N x N same-label matrices."""
    off = ~np.eye(t.size, dtype=bool)
    same_t = (t[:, None] == t[None, :]) & off
    same_p = (p[:, None] == p[None, :]) & off
    tk = int(np.sum(same_t & same_p))
    pk, qk = int(same_p.sum()), int(same_t.sum())
    prec = 1.0 if pk == 0 else tk / pk
    rec = 1.0 if qk == 0 else tk / qk
    return prec, rec, _f(prec, rec)


def brute_bcubed(t: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    """Per-sample BCubed: share of i's cluster (class) that shares i's class (cluster)."""
    tl, pl = t.tolist(), p.tolist()
    prec = rec = 0.0
    for i in range(len(tl)):
        in_cluster = [j for j in range(len(tl)) if pl[j] == pl[i]]
        in_class = [j for j in range(len(tl)) if tl[j] == tl[i]]
        both = sum(1 for j in in_cluster if tl[j] == tl[i])
        prec += both / len(in_cluster)
        rec += both / len(in_class)
    prec, rec = prec / len(tl), rec / len(tl)
    return prec, rec, _f(prec, rec)


def brute_nmi(t: np.ndarray, p: np.ndarray) -> float:
    """I / ((H_t + H_p) / 2) from probability tables with math.log."""
    n = t.size
    ct, cp = Counter(t.tolist()), Counter(p.tolist())
    joint = Counter(zip(t.tolist(), p.tolist(), strict=True))
    if len(ct) == 1 and len(cp) == 1:
        return 1.0
    h_t = -sum(c / n * math.log(c / n) for c in ct.values())
    h_p = -sum(c / n * math.log(c / n) for c in cp.values())
    mi = sum(c / n * math.log((c / n) / ((ct[a] / n) * (cp[b] / n))) for (a, b), c in joint.items())
    return max(mi, 0.0) / ((h_t + h_p) / 2)


def brute_all(t: np.ndarray, p: np.ndarray) -> dict[str, float]:
    vals = (*brute_pairwise(t, p), *brute_bcubed(t, p), brute_nmi(t, p))
    return dict(zip(METRIC_KEYS, vals, strict=True))


# ---------------------------------------------------------------- labelings


def random_case(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A (true, pred) pair of (N,) int64 labelings, N <= 300, of a named shape."""
    n = int(rng.integers(1, 301))
    t = rng.integers(0, max(1, n // int(rng.integers(1, 20))), n)
    if kind == "noisy":  # prediction = truth with some splits, merges and moves
        p = t * 3 + (rng.random(n) < 0.2) * rng.integers(1, 3, n)
        moved = rng.random(n) < 0.1
        p[moved] = rng.integers(0, 3 * int(t.max()) + 3, int(moved.sum()))
    elif kind == "random":
        p = rng.integers(0, int(rng.integers(1, n + 1)), n)
    elif kind == "giant":  # 30-60% of samples in one predicted cluster
        p = t.copy()
        p[rng.random(n) < rng.uniform(0.3, 0.6)] = -7
    elif kind == "singletons":
        p = rng.permutation(n)
    elif kind == "single":
        p = np.full(n, 42)
    elif kind == "huge":  # negative and huge label values on both sides
        t = t * 10**12 - 5 * 10**11
        p = rng.integers(-(10**15), 10**15, n) // 10**14 * 10**12
    else:
        raise AssertionError(kind)
    return t.astype(np.int64), p.astype(np.int64)


KINDS = ("noisy", "random", "giant", "singletons", "single", "huge")


def assert_close(got: dict, want: dict) -> None:
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_brute_force(kind: str, seed: int) -> None:
    t, p = random_case(np.random.default_rng([seed, KINDS.index(kind)]), kind)
    got = evaluate(t, p)
    assert_close(got, brute_all(t, p))
    assert got["n_samples"] == t.size
    assert got["n_classes"] == np.unique(t).size
    assert got["n_clusters"] == np.unique(p).size
    # the single-metric functions agree with evaluate
    assert pairwise_prf(t, p) == (
        got["pairwise_precision"],
        got["pairwise_recall"],
        got["pairwise_f"],
    )
    assert bcubed_prf(t, p) == (got["bcubed_precision"], got["bcubed_recall"], got["bcubed_f"])
    assert nmi(t, p) == got["nmi"]


@pytest.mark.parametrize("seed", SEEDS)
def test_contingency_matches_counter(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for kind in KINDS:
        t, p = random_case(rng, kind)
        c = contingency(t, p)
        joint = Counter(zip(t.tolist(), p.tolist(), strict=True))
        cells = {
            (int(c.classes[g]), int(c.clusters[k])): int(n)
            for g, k, n in zip(c.cell_class, c.cell_cluster, c.cell_count, strict=True)
        }
        assert cells == joint
        assert len(cells) == c.cell_count.size  # no duplicate cells
        assert dict(zip(c.classes.tolist(), c.class_sizes.tolist(), strict=True)) == Counter(
            t.tolist()
        )
        assert dict(zip(c.clusters.tolist(), c.cluster_sizes.tolist(), strict=True)) == Counter(
            p.tolist()
        )
        order = np.lexsort((c.cell_cluster, c.cell_class))
        assert np.array_equal(order, np.arange(order.size))  # sorted by (class, cluster)
        for arr in (c.class_sizes, c.cluster_sizes, c.cell_class, c.cell_cluster, c.cell_count):
            assert arr.dtype == np.int64


@pytest.mark.parametrize("seed", SEEDS)
def test_invariant_to_label_names_and_sample_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t, p = random_case(rng, "noisy")
    base = evaluate(t, p)
    # rename labels through random injective maps, into negative/huge values
    ut, it = np.unique(t, return_inverse=True)
    up, ip = np.unique(p, return_inverse=True)
    new_t = rng.choice(np.arange(-(10**12), 10**12, 10**6), ut.size, replace=False)[it]
    new_p = rng.permutation(up.size)[ip]
    assert_close(evaluate(new_t, new_p), base)
    # shuffle samples
    perm = rng.permutation(t.size)
    assert_close(evaluate(t[perm], p[perm]), base)
    # swapping the roles swaps precision and recall; NMI is symmetric
    swapped = evaluate(p, t)
    for kind in ("pairwise", "bcubed"):
        assert swapped[f"{kind}_precision"] == pytest.approx(base[f"{kind}_recall"], rel=1e-12)
        assert swapped[f"{kind}_recall"] == pytest.approx(base[f"{kind}_precision"], rel=1e-12)
    assert swapped["nmi"] == pytest.approx(base["nmi"], rel=1e-12)


def test_compact_and_sparse_label_paths_agree() -> None:
    """Small non-negative labels take the bincount path, offset ones the sort path."""
    rng = np.random.default_rng(123)
    t = rng.integers(0, 40, 5000)
    p = np.where(rng.random(5000) < 0.3, 0, t * 2 + rng.integers(0, 2, 5000))
    a = evaluate(t, p)
    b = evaluate(t * 7919 + 10**12, p * (-(10**9)) - 1)
    assert_close(b, a)
    ca, cb = contingency(t, p), contingency(t + 10**12, p - 10**12)
    assert np.array_equal(ca.cell_count, cb.cell_count)
    assert np.array_equal(ca.classes + 10**12, cb.classes)


def test_identical_partitions_score_one() -> None:
    rng = np.random.default_rng(5)
    t = rng.integers(0, 50, 2000)
    p = rng.permutation(100)[t] - 10**12  # same partition, different names
    for v in (evaluate(t, p)[k] for k in METRIC_KEYS):
        assert v == pytest.approx(1.0, abs=1e-12)


def test_edge_cases() -> None:
    # N = 1
    assert evaluate([3], [-3])["pairwise_f"] == 1.0
    # everything singleton on both sides: no pairs at all -> P = R = 1
    n = np.arange(10)
    assert pairwise_prf(n, n[::-1]) == (1.0, 1.0, 1.0)
    # singleton predictions, grouped truth: P = 1 by definition, R = 0, F = 0
    assert pairwise_prf(np.zeros(10, int), n) == (1.0, 0.0, 0.0)
    # one predicted cluster vs grouped truth: NMI is 0
    assert nmi(n % 3, np.zeros(10, int)) == 0.0
    assert nmi(np.zeros(10, int), np.ones(10, int)) == 1.0
    # uint64 labels beyond int64 still define the right partition
    big = np.array([2**64 - 1, 2**64 - 1, 5, 5], dtype=np.uint64)
    assert evaluate(big, [0, 0, 1, 1])["nmi"] == pytest.approx(1.0)
    assert evaluate(big, [0, 1, 1, 1])["n_classes"] == 2


@pytest.mark.parametrize(
    ("t", "p", "problem"),
    [
        ([], [], "empty"),
        ([0, 1], [0], "entries"),
        ([[0, 1]], [[0, 1]], "1-D"),
        ([0.0, 1.0], [0, 1], "integers"),
        ([0, 1], [True, False], "integers"),
        (["a", "b"], [0, 1], "integers"),
        ([0, 10**30], [0, 1], "integers"),
    ],
)
def test_bad_input_raises_input_error(t: list, p: list, problem: str) -> None:
    for fn in (contingency, pairwise_prf, bcubed_prf, nmi, evaluate):
        with pytest.raises(InputError, match=problem) as exc:
            fn(t, p)
        assert exc.value.where == "labels"
