"""Metrics as a markdown table (the job's summary, tune's grid, the demo's results) and the
label-free cluster-size distribution every run reports."""

from __future__ import annotations

import numpy as np


def metrics_table(rows: dict[str, dict], seconds: dict[str, float] | None = None) -> str:
    """A markdown table of metrics, one row per method."""
    cols = ["pairwise_precision", "pairwise_recall", "pairwise_f", "bcubed_precision",
            "bcubed_recall", "bcubed_f", "nmi"]
    head = "| method | P_pair | R_pair | F_pair | P_bcubed | R_bcubed | F_bcubed | NMI | clusters |"
    if seconds:
        head += " wall s |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in rows.items():
        cells = [f"{100 * m[c]:.2f}" for c in cols] + [str(m["n_clusters"])]
        if seconds:
            cells.append(f"{seconds[name]:.1f}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


SIZE_QUANTILES = (0.5, 0.9, 0.99)


def size_distribution(sizes) -> dict:
    """Label-free shape of a clustering from its cluster sizes ``(C,)``: how many
    clusters and samples, the singletons (count and share of samples: over-splitting
    shows here first), the share of samples in clusters of at least 2, 5 and 20, and
    size quantiles over samples (the size of the cluster a random sample is in) and
    over clusters."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n = int(sizes.sum())
    if n == 0:
        return {"n_clusters": 0, "n_samples": 0}
    ordered = np.sort(sizes)
    by_sample = np.repeat(ordered, ordered) if n <= 50_000_000 else None

    def q(values, p):
        return int(values[min(len(values) - 1, int(np.floor(p * len(values))))])

    out = {
        "n_clusters": int(len(sizes)),
        "n_samples": n,
        "singletons": int(np.count_nonzero(sizes == 1)),
        "singleton_share": round(float(np.count_nonzero(sizes == 1)) / n, 4),
        "share_in_size_ge": {str(m): round(float(sizes[sizes >= m].sum()) / n, 4)
                             for m in (2, 5, 20)},
        "cluster_size_quantiles": {str(p): q(ordered, p) for p in SIZE_QUANTILES},
        "max_size": int(ordered[-1]),
    }
    if by_sample is not None:
        out["sample_cluster_size_quantiles"] = {str(p): q(by_sample, p) for p in SIZE_QUANTILES}
    return out


def size_line(dist: dict) -> str:
    """One log line of :func:`size_distribution`."""
    if not dist.get("n_samples"):
        return "no samples"
    qs = dist["cluster_size_quantiles"]
    return (f"{dist['n_clusters']} clusters; singletons {dist['singletons']} "
            f"({100 * dist['singleton_share']:.1f}% of samples); cluster size median "
            f"{qs['0.5']}, p90 {qs['0.9']}, p99 {qs['0.99']}, max {dist['max_size']}")
