"""Time ltc_ray.metrics at MS1M part9 scale against a scipy.sparse reference.

Labels are synthetic: 77,157 long-tailed classes over 5.21M samples; the
prediction is a noisy copy (splits, merges, singletons, moved samples) with
30% of all samples in one giant cluster — the case where learn-to-cluster's
BCubed loop is quadratic. The reference is the usual contingency-matrix
implementation (np.unique + scipy.sparse.coo_matrix, as in learn-to-cluster's
pairwise F and scikit-learn's NMI), each metric building its own matrix.
Prints seconds per metric, totals, the reference/ours ratio and the largest
disagreement between the two.

    python benchmarks/bench_metrics.py [--n 5206761] [--classes 77157] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from ltc_ray.metrics import bcubed_prf, evaluate, nmi, pairwise_prf

# ---------------------------------------------------------------- synthetic labels


def make_labels(
    n: int, n_classes: int, seed: int, sparse_ids: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(true, pred) (n,) int64 labelings; see module docstring."""
    rng = np.random.default_rng(seed)
    n_classes = min(n_classes, n)
    weights = rng.lognormal(0.0, 1.0, n_classes)  # long-tailed class sizes, each >= 1
    sizes = 1 + np.floor(weights / weights.sum() * (n - n_classes)).astype(np.int64)
    sizes[np.argsort(-weights)[: n - int(sizes.sum())]] += 1
    true = rng.permutation(np.repeat(np.arange(n_classes, dtype=np.int64), sizes))

    merge_into = np.arange(n_classes, dtype=np.int64)  # 5% of classes merged into another
    merged = rng.random(n_classes) < 0.05
    merge_into[merged] = rng.integers(0, n_classes, int(merged.sum()))
    pred = merge_into[true] * 4
    u = rng.random(n)
    pred += np.where(u < 0.15, rng.integers(1, 4, n), 0)  # 15% split off into sub-clusters
    moved = (u >= 0.15) & (u < 0.20)  # 5% moved to a random cluster
    pred[moved] = rng.integers(0, 4 * n_classes, int(moved.sum()))
    single = (u >= 0.20) & (u < 0.25)  # 5% singletons
    pred[single] = 4 * n_classes + np.arange(int(single.sum()))
    pred[(u >= 0.25) & (u < 0.55)] = -1  # 30% in one giant cluster
    if sparse_ids:  # force the sort path: negative, huge, non-contiguous ids
        true = true * 1_000_003 - 10**12
        pred = pred * 999_983 + 10**13
    return true, pred


# ---------------------------------------------------------------- reference


def _ref_contingency(t: np.ndarray, p: np.ndarray) -> sp.csr_matrix:
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    shape = (int(ti.max()) + 1, int(pi.max()) + 1)
    m = sp.coo_matrix((np.ones(t.size, dtype=np.int64), (ti, pi)), shape=shape).tocsr()
    m.sum_duplicates()
    return m


def _f(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def ref_pairwise(t: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    m = _ref_contingency(t, p)
    n = t.size
    tk = int(np.dot(m.data, m.data)) - n
    a, b = np.asarray(m.sum(axis=1)).ravel(), np.asarray(m.sum(axis=0)).ravel()
    pk, qk = int(np.dot(b, b)) - n, int(np.dot(a, a)) - n
    prec = 1.0 if pk == 0 else tk / pk
    rec = 1.0 if qk == 0 else tk / qk
    return prec, rec, _f(prec, rec)


def ref_bcubed(t: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    m = _ref_contingency(t, p).astype(np.float64)
    n = t.size
    a, b = np.asarray(m.sum(axis=1)).ravel(), np.asarray(m.sum(axis=0)).ravel()
    sq = m.multiply(m).tocsr()
    prec = float((sq @ (1.0 / b)).sum()) / n
    rec = float((1.0 / a) @ np.asarray(sq.sum(axis=1)).ravel()) / n
    return prec, rec, _f(prec, rec)


def ref_nmi(t: np.ndarray, p: np.ndarray) -> float:
    m = _ref_contingency(t, p)
    n = t.size
    if m.shape == (1, 1):
        return 1.0
    rows, cols, vals = sp.find(m)
    a, b = np.asarray(m.sum(axis=1)).ravel(), np.asarray(m.sum(axis=0)).ravel()
    vals = vals.astype(np.float64)
    outer = a[rows].astype(np.float64) * b[cols].astype(np.float64)
    mi = float(np.sum(vals / n * (np.log(vals) + math.log(n) - np.log(outer))))
    h_t = -float(np.sum(a / n * np.log(a / n)))
    h_p = -float(np.sum(b / n * np.log(b / n)))
    return max(mi, 0.0) / ((h_t + h_p) / 2)


# ---------------------------------------------------------------- timing


def _best_time(fn: Callable, repeat: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5_206_761, help="samples (default: MS1M part9)")
    ap.add_argument("--classes", type=int, default=77_157, help="true classes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs per timing")
    ap.add_argument("--sparse-ids", action="store_true", help="negative/huge label ids")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    true, pred = make_labels(args.n, args.classes, args.seed, args.sparse_ids)
    gen_s = time.perf_counter() - t0

    ours_fns = {
        "pairwise": lambda: pairwise_prf(true, pred),
        "bcubed": lambda: bcubed_prf(true, pred),
        "nmi": lambda: nmi(true, pred),
    }
    ref_fns = {
        "pairwise": lambda: ref_pairwise(true, pred),
        "bcubed": lambda: ref_bcubed(true, pred),
        "nmi": lambda: ref_nmi(true, pred),
    }
    rows, max_diff = {}, 0.0
    for name in ours_fns:
        s_ours, v_ours = _best_time(ours_fns[name], args.repeat)
        s_ref, v_ref = _best_time(ref_fns[name], args.repeat)
        diff = float(np.max(np.abs(np.atleast_1d(v_ours) - np.atleast_1d(v_ref))))
        max_diff = max(max_diff, diff)
        rows[name] = {"ours_s": s_ours, "reference_s": s_ref, "ratio": s_ref / s_ours}
    s_eval, scores = _best_time(lambda: evaluate(true, pred), args.repeat)
    ours_total = sum(r["ours_s"] for r in rows.values())
    ref_total = sum(r["reference_s"] for r in rows.values())
    result = {
        "n_samples": int(true.size),
        "n_classes": scores["n_classes"],
        "n_clusters": scores["n_clusters"],
        "largest_cluster_share": float(np.unique(pred, return_counts=True)[1].max() / true.size),
        "sparse_ids": args.sparse_ids,
        "repeat": args.repeat,
        "generate_s": gen_s,
        "metrics": rows,
        "ours_total_s": ours_total,
        "reference_total_s": ref_total,
        "ratio_total": ref_total / ours_total,
        "evaluate_s": s_eval,
        "max_abs_diff_vs_reference": max_diff,
        "scores": scores,
    }

    print(
        f"N={result['n_samples']:,} classes={result['n_classes']:,} "
        f"clusters={result['n_clusters']:,} largest={result['largest_cluster_share']:.0%} "
        f"sparse_ids={args.sparse_ids} "
        f"(labels generated in {gen_s:.1f} s)"
    )
    print(f"{'metric':<10}{'ours s':>10}{'reference s':>14}{'ref/ours':>10}")
    for name, r in rows.items():
        print(f"{name:<10}{r['ours_s']:>10.3f}{r['reference_s']:>14.3f}{r['ratio']:>10.2f}")
    print(f"{'total':<10}{ours_total:>10.3f}{ref_total:>14.3f}{ref_total / ours_total:>10.2f}")
    print(f"evaluate() (one shared contingency): {s_eval:.3f} s")
    print(f"max |ours - reference| over all scores: {max_diff:.2e}")
    print(
        "scores: "
        + ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in scores.items()
        )
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if max_diff > 1e-9:
        raise SystemExit(f"ltc_ray.metrics disagrees with the reference by {max_diff:.2e}")
    return result


if __name__ == "__main__":
    main()
