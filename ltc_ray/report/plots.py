"""The overview's plots as inline SVG strings, written by hand.

Why hand-written: the report is one self-contained file and the web page has no build
step, so the plots need no plotting library, no JavaScript and no external asset. Every
text is escaped (:func:`html.escape`: run names and paths come from the user) and every
number is formatted with a fixed precision, so the same overview gives the same bytes.
Each plot is a standalone ``<svg>`` (it also parses as XML): bars are
``<rect class="bar ...">``, threshold marks ``<line class="threshold">``, and each bar
has a ``<title>`` (a tooltip in browsers, without script).
"""

from __future__ import annotations

import math
from html import escape

__all__ = ["format_bytes", "overview_svgs", "similarity_histogram_svg", "size_histogram_svg",
           "stage_bars_svg"]

WIDTH, HEIGHT = 640, 280
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 44  # plot area margins
FONT = 'font-family="system-ui, sans-serif" font-size="11"'
COLORS = {"bar": "#4c78a8", "all": "#9ecae9", "r1": "#e45756", "far": "#54a24b",
          "axis": "#444", "grid": "#ddd", "threshold": "#7b3294", "text": "#222",
          "memory": "#f58518"}


def _f(x: float) -> str:
    """A coordinate: two decimals, no trailing zeros (deterministic, compact)."""
    text = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _t(value: object) -> str:
    return escape(str(value), quote=True)


def format_bytes(n: float | None) -> str:
    """``1.5 GiB``-style size (``-`` for None/0)."""
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def _count(n: float) -> str:
    """A tick label for a count: 1, 10, 100, 1k, 10k, 1M, ..."""
    n = int(n)
    for div, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def _svg(width: int, height: int, label: str, body: list[str]) -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="ltc-plot" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{_t(label)}" {FONT}>')
    return "\n".join([head, f"<title>{_t(label)}</title>", *body, "</svg>"])


def _text(x: float, y: float, text: object, anchor: str = "middle", cls: str = "",
          extra: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return (f'<text{klass} x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}" '
            f'fill="{COLORS["text"]}"{extra}>{_t(text)}</text>')


def _axes(x0: float, y0: float, x1: float, y1: float) -> list[str]:
    return [f'<line class="axis" x1="{_f(x0)}" y1="{_f(y0)}" x2="{_f(x1)}" y2="{_f(y0)}" '
            f'stroke="{COLORS["axis"]}"/>',
            f'<line class="axis" x1="{_f(x0)}" y1="{_f(y0)}" x2="{_f(x0)}" y2="{_f(y1)}" '
            f'stroke="{COLORS["axis"]}"/>']


def _empty(label: str, message: str) -> str:
    return _svg(WIDTH, 60, label, [_text(WIDTH / 2, 34, message)])


# ------------------------------------------------------------------ cluster sizes
def size_histogram_svg(overview: dict) -> str:
    """Clusters per log2 size bin on log-log axes: x the cluster size (bins 1, 2-3, 4-7,
    ...), y the number of clusters (log; the axis starts at 0.5 so a count of 1 shows)."""
    label = "Cluster sizes (clusters per size bin, log-log)"
    sizes = overview.get("sizes") or {}
    edges, counts = list(sizes.get("edges") or []), list(sizes.get("counts") or [])
    if not counts or not any(counts):
        return _empty(label, "no clusters")
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    n_bins = len(counts)
    top = max(1, math.ceil(math.log10(max(counts)) + 1e-9))  # decades up to 10^top
    floor = math.log10(0.5)

    def xs(i: float) -> float:  # bin i's left edge (log2 of the size, linear on screen)
        return x0 + (x1 - x0) * i / n_bins

    def ys(c: float) -> float:
        return y0 - (y0 - y1) * (math.log10(c) - floor) / (top - floor)

    body = [_text(WIDTH / 2, 16, label, cls="plot-title", extra=' font-weight="bold"')]
    for d in range(top + 1):  # horizontal grid and y ticks at powers of ten
        y = ys(10**d)
        body.append(f'<line class="grid" x1="{_f(x0)}" y1="{_f(y)}" x2="{_f(x1)}" '
                    f'y2="{_f(y)}" stroke="{COLORS["grid"]}"/>')
        body.append(_text(x0 - 6, y + 4, _count(10**d), anchor="end", cls="tick"))
    step = 1 if n_bins <= 12 else 2
    for i in range(0, n_bins + 1, step):  # x ticks at the bin edges (powers of two)
        body.append(_text(xs(i), y0 + 14, _count(edges[i]) if i < len(edges) else "",
                          cls="tick"))
    gap = 0.08 * (x1 - x0) / n_bins
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        lo = edges[i] if i < len(edges) else 2**i
        hi = (edges[i + 1] if i + 1 < len(edges) else 2 * lo) - 1
        span = f"size {lo}" if hi <= lo else f"sizes {lo}-{hi}"
        y = ys(c)
        body.append(
            f'<rect class="bar" x="{_f(xs(i) + gap)}" y="{_f(y)}" '
            f'width="{_f(xs(i + 1) - xs(i) - 2 * gap)}" height="{_f(y0 - y)}" '
            f'fill="{COLORS["bar"]}"><title>{_t(f"{span}: {c} clusters")}</title></rect>')
    body += _axes(x0, y0, x1, y1)
    body.append(_text((x0 + x1) / 2, HEIGHT - 8, "cluster size (log2 bins)", cls="axis-label"))
    body.append(_text(14, (y0 + y1) / 2, "clusters (log)", cls="axis-label",
                      extra=f' transform="rotate(-90 14 {_f((y0 + y1) / 2)})"'))
    return _svg(WIDTH, HEIGHT, label, body)


# ------------------------------------------------------------------ kNN similarities
def _threshold_marks(thresholds: list[dict], xs, lo: float, hi: float, y0: float,
                     y1: float) -> list[str]:
    """A vertical line per threshold, its label staggered so near ones stay readable."""
    out = []
    for j, th in enumerate(thresholds):
        v = float(th["value"])
        if not lo <= v <= hi:
            continue
        x = xs(v)
        name = f"{th['name']} = {v:.3f}"
        out.append(f'<line class="threshold" x1="{_f(x)}" y1="{_f(y0)}" x2="{_f(x)}" '
                   f'y2="{_f(y1)}" stroke="{COLORS["threshold"]}" stroke-dasharray="4 3">'
                   f'<title>{_t(name)}</title></line>')
        anchor = "end" if x > (xs(lo) + xs(hi)) / 2 else "start"
        dx = -3 if anchor == "end" else 3
        out.append(_text(x + dx, y1 + 10 + 12 * (j % 4), name, anchor=anchor,
                         cls="threshold-label", extra=' fill-opacity="0.9"'))
    return out


def _legend(items: list[tuple[str, str]], x: float, y: float) -> list[str]:
    out = []
    for i, (name, color) in enumerate(items):
        yy = y + 14 * i
        out.append(f'<rect class="legend" x="{_f(x)}" y="{_f(yy - 8)}" width="10" '
                   f'height="10" fill="{color}"/>')
        out.append(_text(x + 14, yy + 1, name, anchor="start", cls="legend-label"))
    return out


def similarity_histogram_svg(overview: dict) -> str | None:
    """The kNN-similarity distribution: every rank (bars) and rank 1 and the far rank
    (step lines), each as a share of its own pairs per bin, with a dashed vertical line
    per threshold the run used or derived; from a run that kept only rank quantiles,
    their boxes (p10-p90 whiskers, p25-p75 box, median). None when the run has no
    similarity statistics."""
    sim = overview.get("similarity")
    if not isinstance(sim, dict):
        return None
    if sim.get("edges") and sim.get("all"):
        return _similarity_bars(sim)
    return _similarity_quantiles(sim)


def _similarity_bars(sim: dict) -> str:
    label = "kNN similarities (share of pairs per bin)"
    edges = [float(e) for e in sim["edges"]]
    series = {name: sim.get(name) for name in ("all", "r1", "far")}
    totals = {n: sum(c) for n, c in series.items() if c}
    shares = {n: [c / totals[n] for c in series[n]] for n in totals if totals[n]}
    if "all" not in shares:
        return _empty(label, "no kNN pairs")
    thresholds = sim.get("thresholds") or []
    # the x range: the bins that hold pairs (and every threshold), padded by one bin
    used = [i for i in range(len(edges) - 1) if any(s[i] for s in shares.values())]
    first, last = used[0], used[-1] + 1
    values = [float(t["value"]) for t in thresholds]
    width = edges[1] - edges[0]
    lo = max(edges[0], min([edges[first] - width, *values]))
    hi = min(edges[-1], max([edges[last] + width, *values]))
    ymax = max(max(s) for s in shares.values())
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT - 110, HEIGHT - BOTTOM, TOP + 20

    def xs(v: float) -> float:
        return x0 + (x1 - x0) * (v - lo) / (hi - lo)

    def ys(s: float) -> float:
        return y0 - (y0 - y1) * s / ymax

    body = [_text(WIDTH / 2, 16, label, cls="plot-title", extra=' font-weight="bold"')]
    for q in range(5):  # y grid at quarters of the largest share
        y = ys(ymax * q / 4)
        body.append(f'<line class="grid" x1="{_f(x0)}" y1="{_f(y)}" x2="{_f(x1)}" '
                    f'y2="{_f(y)}" stroke="{COLORS["grid"]}"/>')
        body.append(_text(x0 - 6, y + 4, f"{100 * ymax * q / 4:.1f}%", anchor="end",
                          cls="tick"))
    tick = 0.1 if hi - lo > 0.5 else 0.05
    v = math.ceil(lo / tick - 1e-9) * tick
    while v <= hi + 1e-9:
        body.append(_text(xs(v), y0 + 14, f"{v:.2f}", cls="tick"))
        v += tick
    for i in range(first, last):
        s = shares["all"][i]
        if s <= 0:
            continue
        y = ys(s)
        tip = f"[{edges[i]:.2f}, {edges[i + 1]:.2f}): {series['all'][i]} pairs"
        body.append(
            f'<rect class="bar all" x="{_f(xs(edges[i]))}" y="{_f(y)}" '
            f'width="{_f(xs(edges[i + 1]) - xs(edges[i]))}" height="{_f(y0 - y)}" '
            f'fill="{COLORS["all"]}"><title>{_t(tip)}</title></rect>')
    for name in ("r1", "far"):
        if name not in shares:
            continue
        pts = []
        for i in range(first, last):
            y = ys(shares[name][i])
            pts += [f"{_f(xs(edges[i]))},{_f(y)}", f"{_f(xs(edges[i + 1]))},{_f(y)}"]
        body.append(f'<polyline class="series {name}" points="{" ".join(pts)}" fill="none" '
                    f'stroke="{COLORS[name]}" stroke-width="1.5"/>')
    body += _threshold_marks(thresholds, xs, lo, hi, y0, y1 - 20)
    body += _axes(x0, y0, x1, y1 - 20)
    far_rank = sim.get("far_rank")
    legend = [("every rank", COLORS["all"]), ("rank 1", COLORS["r1"])]
    if "far" in shares:
        legend.append((f"rank {far_rank}" if far_rank else "far rank", COLORS["far"]))
    body += _legend(legend, x1 + 14, y1)
    body.append(_text((x0 + x1) / 2, HEIGHT - 8, "cosine similarity to the neighbour",
                      cls="axis-label"))
    return _svg(WIDTH, HEIGHT, label, body)


def _similarity_quantiles(sim: dict) -> str | None:
    label = "kNN similarities (rank quantiles)"
    at = sim.get("quantiles_at") or []
    qs = {n: q for n, q in (sim.get("quantiles") or {}).items()
          if isinstance(q, list) and len(q) == len(at) == 5}
    if not qs:
        return None
    thresholds = sim.get("thresholds") or []
    values = [v for q in qs.values() for v in q] + [float(t["value"]) for t in thresholds]
    lo, hi = max(-1.0, min(values) - 0.05), min(1.0, max(values) + 0.05)
    rows = [n for n in ("all", "r1", "far") if n in qs]
    height = TOP + 40 + 34 * len(rows) + BOTTOM
    x0, x1, y0 = LEFT + 40, WIDTH - RIGHT, height - BOTTOM

    def xs(v: float) -> float:
        return x0 + (x1 - x0) * (v - lo) / (hi - lo)

    far_rank = sim.get("far_rank")
    names = {"all": "every rank", "r1": "rank 1",
             "far": f"rank {far_rank}" if far_rank else "far rank"}
    body = [_text(WIDTH / 2, 16, label, cls="plot-title", extra=' font-weight="bold"')]
    for j, name in enumerate(rows):
        p10, p25, p50, p75, p90 = (float(v) for v in qs[name])
        yc = TOP + 52 + 34 * j
        color = COLORS[name]
        body.append(_text(x0 - 6, yc + 4, names[name], anchor="end", cls="tick"))
        body.append(f'<line class="whisker" x1="{_f(xs(p10))}" y1="{_f(yc)}" '
                    f'x2="{_f(xs(p90))}" y2="{_f(yc)}" stroke="{color}"/>')
        tip = (f"{names[name]}: p10 {p10:.3f}, p25 {p25:.3f}, median {p50:.3f}, "
               f"p75 {p75:.3f}, p90 {p90:.3f}")
        body.append(f'<rect class="bar box {name}" x="{_f(xs(p25))}" y="{_f(yc - 9)}" '
                    f'width="{_f(xs(p75) - xs(p25))}" height="18" fill="{color}" '
                    f'fill-opacity="0.6"><title>{_t(tip)}</title></rect>')
        body.append(f'<line class="median" x1="{_f(xs(p50))}" y1="{_f(yc - 9)}" '
                    f'x2="{_f(xs(p50))}" y2="{_f(yc + 9)}" stroke="{COLORS["axis"]}" '
                    f'stroke-width="2"/>')
    tick = 0.1 if hi - lo > 0.5 else 0.05
    v = math.ceil(lo / tick - 1e-9) * tick
    while v <= hi + 1e-9:
        body.append(_text(xs(v), y0 + 14, f"{v:.2f}", cls="tick"))
        v += tick
    body += _threshold_marks(thresholds, xs, lo, hi, y0, TOP + 10)
    body += _axes(x0, y0, x1, TOP + 10)
    body.append(_text((x0 + x1) / 2, height - 8, "cosine similarity to the neighbour "
                      "(this run kept quantiles only)", cls="axis-label"))
    return _svg(WIDTH, height, label, body)


# ------------------------------------------------------------------ stages
def stage_bars_svg(overview: dict) -> str:
    """One horizontal bar per stage (wall seconds, linear), annotated with its seconds
    and peak memory (the largest worker or actor RSS); skipped stages (reused from an
    earlier run) are drawn hollow."""
    label = "Stages (wall seconds; peak worker memory)"
    stages = overview.get("stages") or []
    if not stages:
        return _empty(label, "no stages recorded")
    row = 22
    height = TOP + 10 + row * len(stages) + 8
    x0, x1 = LEFT + 36, WIDTH - RIGHT - 170
    smax = max(max(float(s.get("seconds") or 0.0) for s in stages), 1e-3)
    body = [_text(WIDTH / 2, 16, label, cls="plot-title", extra=' font-weight="bold"')]
    for j, st in enumerate(stages):
        y = TOP + 10 + row * j
        sec = float(st.get("seconds") or 0.0)
        w = max(1.0, (x1 - x0) * sec / smax)
        skipped = bool(st.get("skipped"))
        fill = "none" if skipped else COLORS["bar"]
        note = f"{sec:.2f} s"
        peak = st.get("peak_rss_bytes")
        if peak:
            note += f" · peak {format_bytes(peak)}"
        if skipped:
            note += " (reused)"
        body.append(_text(x0 - 6, y + 12, st.get("name", ""), anchor="end", cls="tick"))
        body.append(f'<rect class="bar stage" x="{_f(x0)}" y="{_f(y + 2)}" width="{_f(w)}" '
                    f'height="{row - 6}" fill="{fill}" stroke="{COLORS["bar"]}">'
                    f'<title>{_t(st.get("name", "") + ": " + note)}</title></rect>')
        body.append(_text(x0 + w + 6, y + 12, note, anchor="start", cls="stage-note"))
    body += _axes(x0, TOP + 10 + row * len(stages), x0, TOP + 6)[1:]
    return _svg(WIDTH, height, label, body)


def overview_svgs(overview: dict) -> dict[str, str | None]:
    """``{"sizes", "similarity", "stages"}``: the three plots of an overview."""
    return {"sizes": size_histogram_svg(overview),
            "similarity": similarity_histogram_svg(overview),
            "stages": stage_bars_svg(overview)}
