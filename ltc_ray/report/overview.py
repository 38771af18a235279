"""A finished run's overview: the numbers the report page and the web browser show.

Why one function: ``ltc-ray report`` (a static HTML file) and ``ltc-ray serve`` (the web
page) show the same overview, so both read it from here. It reads only small things:
the ``_SUCCESS`` manifest (an unfinished run is refused), ``run.json`` and the ``size``
column of ``cluster_summary.parquet`` (O(#clusters), never the per-sample parts).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ltc_ray.config import RANGES
from ltc_ray.errors import InputError, brief
from ltc_ray.io.fs import join_uri, url_to_fs
from ltc_ray.io.output import METRICS, RUN, SUMMARY, read_success
from ltc_ray.metrics.report import size_distribution
from ltc_ray.params import COSINE

__all__ = ["STAGE_ORDER", "log2_size_histogram", "run_overview", "similarity_thresholds"]

# the pipeline's stages in the order they run (run.json sorts its keys); stages not
# listed here (a method's own, a later addition) follow in their run.json order
STAGE_ORDER = ("plan", "knn", "graph_stats", "score", "knn_features", "link", "attach",
               "merge", "write", "metrics")
_JSON_MAX_BYTES = 64 << 20  # run.json is a few kB; refuse anything near this


def _read_json(uri: str, storage_options: dict | None) -> Any:
    """A JSON file of the result, or InputError naming it (missing, too big, not JSON)."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        with fs.open(path, "rb") as fh:
            raw = fh.read(_JSON_MAX_BYTES + 1)
    except FileNotFoundError:
        raise InputError(uri, "missing; the result is incomplete or was changed") from None
    if len(raw) > _JSON_MAX_BYTES:
        raise InputError(uri, f"is larger than {_JSON_MAX_BYTES >> 20} MiB; not a file "
                         "ltc-ray wrote")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise InputError(uri, "is not valid JSON; the result is damaged") from None


def _read_sizes(uri: str, storage_options: dict | None) -> np.ndarray:
    """The ``size`` column of ``cluster_summary.parquet`` (int64, every value >= 1)."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        with fs.open(path, "rb") as fh:
            parquet = pq.ParquetFile(fh)
            if "size" not in parquet.schema_arrow.names:
                raise InputError(uri, "has no column 'size'; not the summary ltc-ray wrote")
            column = parquet.read(columns=["size"]).column("size")
    except FileNotFoundError:
        raise InputError(uri, "missing; the result is incomplete or was changed") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(uri, "not a readable Parquet file (damaged or not Parquet)") from None
    if not pa.types.is_integer(column.type) or column.null_count:
        raise InputError(uri, f"column 'size' must be integers without nulls, got {column.type}")
    sizes = column.to_numpy().astype(np.int64)
    if len(sizes) and int(sizes.min()) < 1:
        raise InputError(uri, f"column 'size' holds {int(sizes.min())}; sizes are >= 1")
    return sizes


def log2_size_histogram(sizes: np.ndarray) -> dict:
    """Clusters per size bin ``[2^i, 2^(i+1))``: ``{"edges": [1, 2, 4, ...], "counts"}``
    (``len(edges) == len(counts) + 1``; the last edge is above the largest size)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) == 0:
        return {"edges": [1], "counts": []}
    # floor(log2(size)) exactly, for any int64 (float log2 is corrected by one step)
    exp = np.floor(np.log2(sizes.astype(np.float64))).astype(np.int64)
    exp -= (np.left_shift(np.int64(1), exp) > sizes).astype(np.int64)
    exp += (np.left_shift(np.int64(1), exp + 1) <= sizes).astype(np.int64)
    counts = np.bincount(exp)
    return {"edges": [1 << i for i in range(len(counts) + 1)],
            "counts": [int(c) for c in counts]}


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _cosine_keys(method: str) -> set[str]:
    """The run's method's parameters that are cosine similarities (declared with the
    COSINE range), by their config names; empty when the method is unknown here."""
    prefix = f"methods.{method}."
    return {key[len(prefix):] for key, rng in RANGES.items()
            if key.startswith(prefix) and rng == COSINE}


def similarity_thresholds(run: dict) -> list[dict]:
    """Every similarity cut the run used or derived, labelled: each derived parameter of
    kind "similarity" (a "distance" one as ``1 - value``), then the method's own cosine
    parameters set to a number, and the singleton-attach cut when that step ran."""
    out: list[dict] = []
    seen: set[str] = set()
    derived = run.get("derived_parameters") or {}
    for name in sorted(derived):
        entry = derived[name]
        if not isinstance(entry, dict) or not _is_number(entry.get("value")):
            continue
        kind = entry.get("kind")
        if kind == "similarity":
            out.append({"name": name, "value": float(entry["value"]), "source": "derived"})
        elif kind == "distance":
            out.append({"name": f"{name} (1 - distance)",
                        "value": round(1.0 - float(entry["value"]), 6), "source": "derived"})
        else:
            continue
        seen.add(name)
    config = run.get("config") or {}
    method = str(run.get("method") or config.get("method") or "")
    params = ((config.get("methods") or {}).get(method) or {}) if method else {}
    if isinstance(params, dict):
        for key in sorted(_cosine_keys(method)):
            name = f"{method}.{key}"
            if name not in seen and _is_number(params.get(key)):
                out.append({"name": name, "value": float(params[key]), "source": "config"})
                seen.add(name)
    cluster = config.get("cluster") or {}
    attach = cluster.get("attach_threshold")
    if ("cluster.attach_threshold" not in seen and _is_number(attach)
            and "attach" in (run.get("stages") or {})):
        out.append({"name": "cluster.attach_threshold", "value": float(attach),
                    "source": "config"})
    return out


def _stages(run: dict) -> list[dict]:
    """Stages in pipeline order: seconds, rows/s, peak memory (the largest of the
    worker's and every actor's peak RSS; None when none was measured)."""
    stages = run.get("stages") or {}
    names = [n for n in STAGE_ORDER if n in stages]
    names += [n for n in stages if n not in STAGE_ORDER]
    out = []
    for name in names:
        rec = stages[name] if isinstance(stages[name], dict) else {}
        peaks = [rec.get("worker_peak_rss_bytes")]
        actors = rec.get("actor_peak_rss_bytes")
        peaks += actors if isinstance(actors, list) else [actors]  # a list, or one figure
        peaks = [int(p) for p in peaks if _is_number(p) and p > 0]
        seconds = rec.get("seconds")
        rate = rec.get("rows_per_s")
        out.append({
            "name": str(name),
            "seconds": float(seconds) if _is_number(seconds) else 0.0,
            "peak_rss_bytes": max(peaks) if peaks else None,
            "rows_per_s": float(rate) if _is_number(rate) else None,
            "rows": int(rec["rows"]) if _is_number(rec.get("rows")) else None,
            "skipped": bool(rec.get("skipped", False)),
        })
    return out


def _similarity(run: dict) -> dict | None:
    """The kNN-similarity distribution (coarse histograms, or only the rank quantiles of
    a run written before run.json kept histograms) with the thresholds marked; None when
    the run computed no similarity statistics (every parameter pinned, no model)."""
    sim = run.get("similarity")
    if not isinstance(sim, dict):
        return None
    far_rank = sim.get("far_rank")
    quantiles = sim.get("rank_quantiles") or {}
    out: dict[str, Any] = {
        "edges": None, "all": None, "r1": None, "far": None,
        "k": sim.get("k"), "far_rank": far_rank, "edge_count": sim.get("edges"),
        "anchors": {"near": sim.get("near"), "far": sim.get("far")},
        "quantiles_at": sim.get("quantiles_at"),
        "quantiles": {"all": quantiles.get("all"), "r1": quantiles.get("r1"),
                      "far": quantiles.get(f"r{far_rank}")},
        "thresholds": similarity_thresholds(run),
    }
    hist = sim.get("histogram")
    if isinstance(hist, dict) and isinstance(hist.get("bins"), int) and hist["bins"] > 0:
        bins, lo, hi = hist["bins"], float(hist.get("lo", -1.0)), float(hist.get("hi", 1.0))
        out["edges"] = [round(lo + (hi - lo) * i / bins, 6) for i in range(bins + 1)]
        for name in ("all", "r1", "far"):
            counts = hist.get(name)
            if isinstance(counts, list) and len(counts) == bins:
                out[name] = [int(c) for c in counts]
    return out


def _parameters(run: dict) -> dict:
    """The method's parameters as run: an ``auto`` one replaced by the value derived
    for it, plus the kNN size and every other derived value (e.g. the attach cut)."""
    config = run.get("config") or {}
    method = str(run.get("method") or config.get("method") or "")
    derived = run.get("derived_parameters") or {}
    out: dict[str, Any] = {}
    params = (config.get("methods") or {}).get(method) or {}
    for key in sorted(params if isinstance(params, dict) else {}):
        name = f"{method}.{key}"
        entry = derived.get(name)
        out[name] = entry["value"] if isinstance(entry, dict) and "value" in entry \
            else params[key]
    for name in sorted(derived):
        entry = derived[name]
        if name not in out and isinstance(entry, dict) and "value" in entry:
            out[name] = entry["value"]
    knn = config.get("knn") or {}
    for key in ("k", "index"):
        if key in knn:
            out[f"knn.{key}"] = knn[key]
    return out


def run_overview(output_uri: str, storage_options: dict | None = None) -> dict:
    """The overview of a finished run (see the module docstring): headline numbers,
    metrics, stages, cluster sizes per log2 bin, the similarity histogram with its
    thresholds, the parameters. An unfinished or damaged result is an InputError."""
    manifest = read_success(output_uri, storage_options)
    run = _read_json(join_uri(output_uri, RUN), storage_options)
    if not isinstance(run, dict):
        raise InputError(join_uri(output_uri, RUN), "is not a JSON object; the result is "
                         "damaged")
    sizes = _read_sizes(join_uri(output_uri, SUMMARY), storage_options)
    n_clusters = run.get("n_clusters")
    if _is_number(n_clusters) and int(n_clusters) != len(sizes):
        raise InputError(join_uri(output_uri, SUMMARY), f"has {len(sizes)} clusters but "
                         f"run.json says {brief(n_clusters)}; the result was changed")
    size_summary = run.get("cluster_sizes")
    if not isinstance(size_summary, dict):

        size_summary = size_distribution(sizes)
    metrics = run.get("metrics")
    listed = {entry["path"] for entry in manifest["files"]}
    if not isinstance(metrics, dict) and METRICS in listed:
        metrics = _read_json(join_uri(output_uri, METRICS), storage_options)
    warnings = [str(w) for w in (run.get("shift_warnings") or [])]
    sim = run.get("similarity")
    if isinstance(sim, dict) and sim.get("warning"):
        warnings.append(str(sim["warning"]))
    return {
        "output": output_uri,
        "name": run.get("name"),
        "method": run.get("method"),
        "run_id": run.get("run_id"),
        "committed_at": manifest.get("committed_at"),
        "features": run.get("features"),
        "labels": run.get("labels"),
        "n_samples": run.get("n_samples", int(sizes.sum())),
        "n_clusters": len(sizes),
        "dim": run.get("dim"),
        "wall_seconds": run.get("wall_seconds"),
        "driver_peak_rss_bytes": run.get("driver_peak_rss_bytes"),
        "knn_recall": run.get("knn_recall"),
        "parent": run.get("parent"),
        "metrics": metrics if isinstance(metrics, dict) else None,
        "stages": _stages(run),
        "sizes": log2_size_histogram(sizes),
        "size_summary": size_summary,
        "similarity": _similarity(run),
        "parameters": _parameters(run),
        "derived_parameters": run.get("derived_parameters") or {},
        "warnings": warnings,
    }
