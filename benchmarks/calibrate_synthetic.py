"""Calibrate the synthetic MS1M benchmark: is it as hard as the real one, and is it cheap?

Generates part0_train and part1_test at ``--scale`` into a temporary directory,
builds the exact kNN graph (faiss IndexFlatIP, k=80 incl. self) and prints:
best thresholded kNN-CC pairwise F (with its threshold, P, R), the same with the
threshold picked on part0_train, a perfect kNN-edge oracle, the density-peak
baseline, and mean intra/inter-identity cosine. Then it measures generation time
and peak RSS (in fresh subprocesses) for part9 at a tiny scale and for part1 at
``--memory-scale``. Targets: kNN-CC F in 0.55-0.75, oracle F > 0.99.

    python benchmarks/calibrate_synthetic.py --scale 0.05 --seed 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ltc_ray.synthetic import SyntheticParams, make_benchmark

THRESHOLDS = np.round(np.arange(0.30, 0.951, 0.01), 2)


def pairwise_prf(labels_true: np.ndarray, labels_pred: np.ndarray) -> tuple[float, float, float]:
    """Pairwise P/R/F from the sparse contingency (learn-to-cluster §8), ordered pairs."""
    n = len(labels_true)
    _, true_codes = np.unique(labels_true, return_inverse=True)
    _, pred_codes = np.unique(labels_pred, return_inverse=True)
    key = true_codes.astype(np.int64) * (int(pred_codes.max()) + 1) + pred_codes
    _, cell = np.unique(key, return_counts=True)
    tk = int((cell.astype(np.int64) ** 2).sum()) - n
    pk = int((np.bincount(pred_codes).astype(np.int64) ** 2).sum()) - n
    qk = int((np.bincount(true_codes).astype(np.int64) ** 2).sum()) - n
    precision = tk / pk if pk else 1.0
    recall = tk / qk if qk else 1.0
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f


def components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected-component label per node, ``(n,) int32``, of the undirected edges src-dst."""
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n)).tocsr()
    return connected_components(graph, directed=False)[1]


def exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine kNN incl. self: ids ``(n, k) int64``, sims ``(n, k) float32``, descending."""
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, ids = index.search(x, k)
    return ids, sims


def knn_cc_sweep(knn_ids, knn_sims, labels, thresholds=THRESHOLDS) -> list[tuple]:
    """(t, P, R, F) of connected components over kNN edges with cosine >= t, per t."""
    n, k = knn_ids.shape
    rows = np.repeat(np.arange(n), k)
    cols, sims = knn_ids.ravel(), knn_sims.ravel()
    valid = cols >= 0
    rows, cols, sims = rows[valid], cols[valid], sims[valid]
    out = []
    for t in thresholds:
        keep = sims >= t
        out.append((float(t), *pairwise_prf(labels, components(n, rows[keep], cols[keep]))))
    return out


def oracle(knn_ids, labels) -> tuple[float, float, float]:
    """Pairwise P/R/F keeping exactly the kNN edges whose endpoints share a label."""
    n, k = knn_ids.shape
    rows = np.repeat(np.arange(n), k)
    cols = knn_ids.ravel()
    keep = (cols >= 0) & (labels[rows] == labels[np.maximum(cols, 0)])
    return pairwise_prf(labels, components(n, rows[keep], cols[keep]))


def density_peak_sweep(knn_ids, knn_sims, labels, n_density=10, thresholds=THRESHOLDS):
    """(tau, P, R, F) of density-peak linking per tau.

    score = mean similarity to the first ``n_density`` neighbours (self excluded);
    each node links to its nearest neighbour of strictly higher score when sim > tau.
    """
    n = len(knn_ids)
    score = knn_sims[:, 1 : n_density + 1].mean(axis=1)
    higher = score[np.maximum(knn_ids, 0)] > score[:, None]
    higher &= (knn_ids >= 0) & (knn_ids != np.arange(n)[:, None])
    has_parent = higher.any(axis=1)
    first = higher.argmax(axis=1)
    parent = knn_ids[np.arange(n), first]
    parent_sim = knn_sims[np.arange(n), first]
    nodes = np.arange(n)
    out = []
    for tau in thresholds:
        keep = has_parent & (parent_sim > tau)
        out.append((float(tau), *pairwise_prf(labels, components(n, nodes[keep], parent[keep]))))
    return out


def mean_cosines(x: np.ndarray, labels: np.ndarray, n_pairs: int, seed: int) -> tuple[float, float]:
    """Mean cosine of random same-identity pairs and of random different-identity pairs."""
    rng = np.random.default_rng(seed)
    _, group_of, size = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(group_of, kind="stable")
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    # same identity: pick a sample, then another sample of its identity
    i = rng.integers(len(x), size=n_pairs)
    group = group_of[i]
    j = order[start[group] + rng.integers(size[group] - 1)]
    j = np.where(j == i, order[start[group] + size[group] - 1], j)
    intra = np.einsum("ij,ij->i", x[i], x[j]).mean()
    a, b = rng.integers(len(x), size=(2, n_pairs))
    diff = labels[a] != labels[b]
    inter = np.einsum("ij,ij->i", x[a[diff]], x[b[diff]]).mean()
    return float(intra), float(inter)


def load(info: dict, dim: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.fromfile(info["features"], dtype="<f4").reshape(-1, dim)
    y = np.loadtxt(info["labels"], dtype=np.int64)
    return np.ascontiguousarray(x), y


_MEASURE = """
import json, resource, sys, tempfile, time, psutil
from ltc_ray.synthetic import make_benchmark
parts, scale, seed = json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
rss_before = psutil.Process().memory_info().rss
with tempfile.TemporaryDirectory() as root:
    t0 = time.perf_counter()
    out = make_benchmark(root, parts=parts, scale=scale, seed=seed, progress=False)
    elapsed = time.perf_counter() - t0
try:  # VmHWM is this process's own peak; ru_maxrss can carry the parent's over fork+exec
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rows = sum(v["n_samples"] for v in out.values())
print(json.dumps({"seconds": elapsed, "peak_rss": peak, "rss_before": rss_before, "rows": rows}))
"""


def measure_generation(parts: list[int], scale: float, seed: int) -> dict:
    """Generation wall time and peak RSS of make_benchmark in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(parts), str(scale), str(seed)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def difficulty_trend(scale: float, seed: int, k: int, dim: int, params: SyntheticParams) -> dict:
    """Best kNN-CC F and oracle F of part1..part9 at a small scale: harder as N grows?"""
    trend = {}
    with tempfile.TemporaryDirectory() as root:
        written = make_benchmark(
            root, (1, 3, 5, 7, 9), scale=scale, seed=seed, dim=dim, params=params, progress=False
        )
        for name, info in written.items():
            x, y = load(info, dim)
            knn_ids, knn_sims = exact_knn(x, k)
            trend[name] = {
                "n": len(y),
                "cc_best": best(knn_cc_sweep(knn_ids, knn_sims, y)),
                "oracle": oracle(knn_ids, y),
            }
    return trend


def best(rows: list[tuple]) -> tuple:
    return max(rows, key=lambda r: r[3])


def at(rows: list[tuple], t: float) -> tuple:
    return min(rows, key=lambda r: abs(r[0] - t))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=80)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tiny-scale", type=float, default=0.002, help="scale of the part9 timing")
    ap.add_argument("--memory-scale", type=float, default=1.0, help="scale of the part1 RSS run")
    ap.add_argument("--skip-memory", action="store_true", help="skip the subprocess measurements")
    ap.add_argument(
        "--trend-scale",
        type=float,
        default=0.01,
        help="scale of the part1..part9 difficulty trend (0 skips it)",
    )
    ap.add_argument("--params", default="{}", help="JSON overrides of SyntheticParams fields")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args(argv)
    overrides = {
        key: tuple(v) if isinstance(v, list) else v for key, v in json.loads(args.params).items()
    }
    params = SyntheticParams(**overrides)

    results: dict = {"scale": args.scale, "seed": args.seed, "params": overrides}
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        written = make_benchmark(
            root, (0, 1), scale=args.scale, seed=args.seed, dim=args.dim, params=params
        )
        results["generate_s"] = time.perf_counter() - t0
        sweeps = {}
        for name, info in written.items():
            x, y = load(info, args.dim)
            t0 = time.perf_counter()
            knn_ids, knn_sims = exact_knn(x, args.k)
            knn_s = time.perf_counter() - t0
            cc = knn_cc_sweep(knn_ids, knn_sims, y)
            dp = density_peak_sweep(knn_ids, knn_sims, y)
            sweeps[name] = cc
            intra, inter = mean_cosines(x, y, 200_000, args.seed)
            results[name] = {
                "n": len(y),
                "ids": len(np.unique(y)),
                "knn_s": knn_s,
                "cc_best": best(cc),
                "oracle": oracle(knn_ids, y),
                "dp_best": best(dp),
                "intra_cos": intra,
                "inter_cos": inter,
            }
        t_train = best(sweeps["part0_train"])[0]
        results["part1_test"]["cc_at_train_t"] = at(sweeps["part1_test"], t_train)

    if args.trend_scale > 0:
        results["trend"] = difficulty_trend(args.trend_scale, args.seed, args.k, args.dim, params)
    if not args.skip_memory:
        results["gen_part9_tiny"] = measure_generation([9], args.tiny_scale, args.seed)
        results["gen_part1_mem"] = measure_generation([1], args.memory_scale, args.seed)
    print_table(results, args)
    if args.json:
        print(json.dumps(results, default=float))
    return results


def print_table(r: dict, args: argparse.Namespace) -> None:
    def prf(row):
        return f"{row[3]:.4f} (P {row[1]:.3f} R {row[2]:.3f})"

    print(f"\nsynthetic MS1M calibration: scale {r['scale']}, seed {r['seed']}, k {args.k}")
    print(f"generation of part0_train + part1_test: {r['generate_s']:.1f} s")
    header = f"{'':34s}{'part0_train':>30s}{'part1_test':>30s}"
    print(header)
    print("-" * len(header))
    a, b = r["part0_train"], r["part1_test"]
    lines = [
        ("samples / identities", f"{a['n']} / {a['ids']}", f"{b['n']} / {b['ids']}"),
        ("exact kNN time (s)", f"{a['knn_s']:.1f}", f"{b['knn_s']:.1f}"),
        ("mean intra-identity cosine", f"{a['intra_cos']:.3f}", f"{b['intra_cos']:.3f}"),
        ("mean inter-identity cosine", f"{a['inter_cos']:.3f}", f"{b['inter_cos']:.3f}"),
        ("kNN-CC best F", prf(a["cc_best"]), prf(b["cc_best"])),
        ("kNN-CC best threshold", f"{a['cc_best'][0]:.2f}", f"{b['cc_best'][0]:.2f}"),
        ("kNN-CC at part0's threshold", "", prf(b["cc_at_train_t"])),
        ("density-peak best F", prf(a["dp_best"]), prf(b["dp_best"])),
        ("density-peak best tau", f"{a['dp_best'][0]:.2f}", f"{b['dp_best'][0]:.2f}"),
        ("oracle kNN edges F", prf((0, *a["oracle"])), prf((0, *b["oracle"]))),
    ]
    for label, left, right in lines:
        print(f"{label:34s}{left:>30s}{right:>30s}")
    if "trend" in r:
        print(
            f"\ndifficulty trend at scale {args.trend_scale} "
            "(real MS1M KNN-DBSCAN F: 67.9 63.4 52.5 45.2 44.9)"
        )
        for name, t in r["trend"].items():
            print(
                f"  {name:12s} n={t['n']:7d}  kNN-CC best F {prf(t['cc_best'])} "
                f"t={t['cc_best'][0]:.2f}  oracle F {t['oracle'][2]:.4f}"
            )
    print()
    for key, what in (("gen_part9_tiny", "part9_test"), ("gen_part1_mem", "part1_test")):
        if key in r:
            m = r[key]
            scale = args.tiny_scale if key == "gen_part9_tiny" else args.memory_scale
            rate = m["rows"] / m["seconds"]
            print(
                f"generate {what} at scale {scale}: {m['rows']} rows in {m['seconds']:.1f} s "
                f"({rate:,.0f} rows/s), peak RSS {m['peak_rss'] / 2**20:.0f} MiB "
                f"(after imports {m['rss_before'] / 2**20:.0f} MiB)"
            )


if __name__ == "__main__":
    main()
