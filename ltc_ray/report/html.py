"""A finished run's overview as one static, self-contained HTML page.

Why static: a user who ran a job on a cluster wants to look at its result without
starting a server: the page has its CSS inline, the plots as inline SVG
(:mod:`ltc_ray.report.plots`), no script and no external URL, so it opens from any disk
or bucket download. Every value from the run is escaped.
"""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any

from ltc_ray.errors import InputError
from ltc_ray.io.fs import join_uri, url_to_fs, write_bytes_atomic
from ltc_ray.io.output import REPORT, REPORT_TAG, overlaps
from ltc_ray.report.overview import run_overview
from ltc_ray.report.plots import format_bytes, overview_svgs

__all__ = ["GENERATOR", "REPORT_NAME", "render_report", "report_uri", "write_report"]

REPORT_NAME = REPORT  # ``ltc-ray report OUTPUT`` writes OUTPUT/report.html
GENERATOR = "ltc-ray report"  # the page's <meta name="generator">: "ltc-ray wrote this file"
_MARKER = REPORT_TAG  # an --overwrite run removes a report carrying it (ltc_ray.io.output)
assert _MARKER == f'<meta name="generator" content="{GENERATOR}">'.encode()

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;
background:#fafafa;line-height:1.4}
main{max-width:1080px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:1.5em;margin:.4em 0 .1em}h2{font-size:1.15em;margin:1.6em 0 .5em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#666;font-size:.9em;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.card .v{font-size:1.35em;font-weight:600}.card .k{color:#666;font-size:.8em}
table{border-collapse:collapse;background:#fff;font-size:.9em;margin:6px 0}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f0f0f0}
.plots{display:flex;flex-wrap:wrap;gap:12px}
.plot{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}
.plot svg{max-width:100%;height:auto}
.warn{background:#fff4e5;border:1px solid #f5c27a;border-radius:6px;padding:8px 12px;
margin:8px 0}
.muted{color:#888}
footer{color:#888;font-size:.8em;margin-top:32px}
"""

_METRICS = (("pairwise_precision", "pairwise P"), ("pairwise_recall", "pairwise R"),
            ("pairwise_f", "pairwise F"), ("bcubed_precision", "BCubed P"),
            ("bcubed_recall", "BCubed R"), ("bcubed_f", "BCubed F"), ("nmi", "NMI"))


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 0) -> str:
    """A number with thousands separators; ``-`` for None/NaN."""
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return _e(value)


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{100 * value:.2f}%"


def _value(value: Any) -> str:
    """A parameter value as text (JSON for lists/dicts)."""
    if isinstance(value, dict | list):
        return _e(json.dumps(value, sort_keys=True))
    if isinstance(value, float):
        return _e(f"{value:g}")
    return _e("null" if value is None else value)


def _card(key: str, value: str) -> str:
    return f'<div class="card"><div class="v">{value}</div><div class="k">{_e(key)}</div></div>'


def _table(head: list[tuple[str, bool]], rows: list[list[str]]) -> str:
    """A table; ``head`` is (title, numeric); cells are already escaped."""
    num_cls = ' class="n"'
    ths = "".join(f"<th{num_cls if num else ''}>{_e(t)}</th>" for t, num in head)
    body = []
    for row in rows:
        tds = "".join(f"<td{num_cls if head[i][1] else ''}>{c}</td>"
                      for i, c in enumerate(row))
        body.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{ths}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _headline(ov: dict) -> str:
    summary = ov.get("size_summary") or {}
    metrics = ov.get("metrics") or {}
    cards = [_card("samples", _num(ov.get("n_samples"))),
             _card("clusters", _num(ov.get("n_clusters"))),
             _card("singletons", _num(summary.get("singletons"))),
             _card("largest cluster", _num(summary.get("max_size")))]
    if "pairwise_f" in metrics:
        cards.append(_card("pairwise F", _pct(metrics["pairwise_f"])))
    if "bcubed_f" in metrics:
        cards.append(_card("BCubed F", _pct(metrics["bcubed_f"])))
    wall = ov.get("wall_seconds")
    cards.append(_card("wall time", f"{wall:,.1f} s" if isinstance(wall, int | float) else "-"))
    cards.append(_card("driver peak memory", _e(format_bytes(ov.get("driver_peak_rss_bytes")))))
    return f'<div class="cards">{"".join(cards)}</div>'


def _metrics(ov: dict) -> str:
    metrics = ov.get("metrics")
    if not metrics:
        return ('<p class="muted">No labels were given to this run: no quality metrics '
                "(score it with <code>ltc-ray evaluate</code>).</p>")
    cols = [(label, key) for key, label in _METRICS if key in metrics]
    head = [(label, True) for label, _ in cols] + [("classes", True), ("clusters", True)]
    row = [_pct(metrics[key]) for _, key in cols]
    row += [_num(metrics.get("n_classes")), _num(metrics.get("n_clusters"))]
    return _table(head, [row])


def _stages(ov: dict) -> str:
    rows = []
    for st in ov.get("stages") or []:
        rate = st.get("rows_per_s")
        rows.append([_e(st.get("name")), _num(float(st.get("seconds") or 0.0), 2),
                     _num(st.get("rows")), "-" if rate is None else _num(float(rate), 0),
                     _e(format_bytes(st.get("peak_rss_bytes"))),
                     "reused" if st.get("skipped") else ""])
    head = [("stage", False), ("seconds", True), ("rows", True), ("rows/s", True),
            ("peak memory", True), ("", False)]
    return _table(head, rows)


def _sizes(ov: dict) -> str:
    s = ov.get("size_summary") or {}
    rows = [["clusters", _num(s.get("n_clusters"))],
            ["samples", _num(s.get("n_samples"))],
            ["singletons", f"{_num(s.get('singletons'))} ({_pct(s.get('singleton_share'))} "
                           "of samples)"],
            ["largest cluster", _num(s.get("max_size"))]]
    for key, what in (("cluster_size_quantiles", "cluster size, quantile over clusters"),
                      ("sample_cluster_size_quantiles",
                       "size of a sample's cluster, quantile over samples")):
        for q, v in (s.get(key) or {}).items():
            rows.append([_e(f"{what} {q}"), _num(v)])
    shares = s.get("share_in_size_ge") or {}
    for m, share in sorted(shares.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        rows.append([_e(f"samples in clusters of size >= {m}"), _pct(share)])
    bins = ov.get("sizes") or {}
    edges, counts = bins.get("edges") or [], bins.get("counts") or []
    bin_rows = []
    for i, c in enumerate(counts):
        lo, hi = edges[i], edges[i + 1] - 1
        bin_rows.append([_e(str(lo) if hi <= lo else f"{lo}-{hi}"), _num(c)])
    return (_table([("", False), ("value", True)], rows)
            + _table([("cluster size", False), ("clusters", True)], bin_rows))


def _parameters(ov: dict) -> str:
    derived = ov.get("derived_parameters") or {}
    rows = []
    for name, value in (ov.get("parameters") or {}).items():
        entry = derived.get(name)
        how = _e(f"auto: {entry.get('rule', '')}") if isinstance(entry, dict) else ""
        rows.append([_e(name), _value(value), how])
    out = _table([("parameter", False), ("value", False), ("how", False)], rows)
    sim = ov.get("similarity")
    if sim and sim.get("thresholds"):
        th = [[_e(t["name"]), _e(f"{t['value']:.3f}"), _e(t.get("source", ""))]
              for t in sim["thresholds"]]
        out += ("<p>Similarity thresholds marked on the plot:</p>"
                + _table([("threshold", False), ("value", True), ("from", False)], th))
    return out


def _inputs(ov: dict) -> str:
    rows = [["output", _e(ov.get("output"))], ["features", _e(ov.get("features"))],
            ["labels", _e(ov.get("labels") or "-")], ["dimension", _num(ov.get("dim"))],
            ["run id", _e(ov.get("run_id"))], ["committed", _e(ov.get("committed_at"))]]
    sim = ov.get("similarity") or {}
    if sim.get("k"):
        rows.append(["kNN", _e(f"k = {sim['k']}, {_num(sim.get('edge_count'))} pairs; median "
                               f"similarity at rank 1 {sim['anchors'].get('near')}, at rank "
                               f"{sim.get('far_rank')} {sim['anchors'].get('far')}")])
    if ov.get("knn_recall") is not None:
        rows.append(["kNN recall", _e(ov["knn_recall"])])
    parent = ov.get("parent")
    if isinstance(parent, dict):
        rows.append(["re-cluster of", _e(f"cluster {parent.get('cluster_id')} of run "
                                         f"{parent.get('run')}")])
    return _table([("", False), ("", False)], rows)


def render_report(overview: dict) -> str:
    """One self-contained HTML page of :func:`~ltc_ray.report.overview.run_overview`."""
    ov = overview
    svgs = overview_svgs(ov)
    title = f"{ov.get('method') or 'run'} on {ov.get('name') or ov.get('output') or ''}"
    plots = "".join(f'<div class="plot" id="plot-{key}">{svg}</div>'
                    for key, svg in svgs.items() if svg)
    if svgs.get("similarity") is None:
        plots += ('<div class="plot muted" id="plot-similarity">This run computed no kNN '
                  "similarity statistics (every parameter was set by hand).</div>")
    warnings = "".join(f'<div class="warn">{_e(w)}</div>' for w in ov.get("warnings") or [])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        _MARKER.decode(),
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)} - ltc-ray report</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="sub">{_e(ov.get("output"))}</div>',
        _headline(ov), warnings,
        "<h2>Quality</h2>", _metrics(ov),
        "<h2>Plots</h2>", f'<div class="plots">{plots}</div>',
        "<h2>Stages</h2>", _stages(ov),
        "<h2>Cluster sizes</h2>", _sizes(ov),
        "<h2>Parameters</h2>", _parameters(ov),
        "<h2>Run</h2>", _inputs(ov),
        f"<footer>Written by {_e(GENERATOR)} from run.json, cluster_summary.parquet and "
        "_SUCCESS of the output.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def report_uri(output_uri: str) -> str:
    """Where ``ltc-ray report OUTPUT`` writes by default: ``OUTPUT/report.html``."""
    return join_uri(output_uri, REPORT_NAME)


def _check_target(uri: str, output_uri: str, storage_options: dict | None) -> None:
    """Write a new file or replace a report this module wrote (its generator meta tag);
    never a user's file, and never another file inside the result."""
    default = report_uri(output_uri)
    if overlaps(uri, output_uri, storage_options) and not overlaps(uri, default,
                                                                    storage_options):
        raise InputError(uri, f"lies inside the result; the report goes to {default} (the "
                         "default) or outside it (--to)")
    fs, path = url_to_fs(uri, storage_options)
    path = path.rstrip("/")
    if fs.isdir(path):
        raise InputError(uri, "is a directory; --to names the HTML file to write")
    if not fs.exists(path):
        return
    with fs.open(path, "rb") as fh:
        head = fh.read(4096)
    if _MARKER not in head:
        raise InputError(uri, "already exists and is not a report ltc-ray wrote; refusing "
                         "to overwrite it: choose a new path (--to)")


def write_report(output_uri: str, storage_options: dict | None = None, *,
                 to: str | None = None) -> str:
    """Render the overview of a finished run and write it atomically (default
    ``OUTPUT/report.html``; ``to``: another file); returns the report's URI."""
    target = to or report_uri(output_uri)
    overview = run_overview(output_uri, storage_options)  # refuses an unfinished run first
    _check_target(target, output_uri, storage_options)
    write_bytes_atomic(target, render_report(overview).encode("utf-8"), storage_options)
    return target
