"""Metrics as a markdown table (the job's summary, tune's grid, the demo's results)."""

from __future__ import annotations


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
