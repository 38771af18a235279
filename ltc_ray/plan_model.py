"""The vocabulary of a dry-run plan, shared by the planner (``pipeline.plan``) and the
methods (``ClusterMethod.plan``): a predicted peak RSS (:class:`Estimate`), what a method's
plan is given (:class:`PlanContext`) and returns (:class:`PlanStage`), the measured rates
(package data ``ltc_ray/data/rates.json``, so an installed ltc-ray plans with them) and the
default stages of each shape (:func:`shape_stages`).

A bottom layer: it imports nothing from ltc_ray, so the cluster layer and the pipeline
both build on it. The default stages read only a method's ``name`` and ``shape``: a new
method is planned from its :class:`~ltc_ray.cluster.base.Shape` with no edit anywhere
else, and overrides ``plan`` only when it has a memory model of its own (GCN-V's
inference actor, hard-clusters' edge and link actors). The formulas are in
docs/memory.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

RATES_RESOURCE = "data/rates.json"  # inside the ltc_ray package (benchmarks/run.py --rates)
# Used only when the rates record lacks baselines: measured once on the 2-core development
# machine; ltc_ray/data/rates.json holds the real record.
FALLBACK_BASELINE = {"driver": 330 * 2**20, "worker": 260 * 2**20}
# a whole-graph task's budget per directed kNN edge: the rows (int32 id + float32 sim),
# held twice while the block files are concatenated, the symmetric sparse graph (2 entries
# of int32 index + float32 weight) and its int64 temporaries (cluster/whole_graph.py)
WHOLE_GRAPH_BYTES_PER_EDGE = 64
# a per-partition link task per directed edge of its rows: int64 neighbour ids and their
# clipped copy (16), masks (3), np.nonzero's int64 rows/cols (16) and the int64 src/dst
# edges it returns (16), rounded up: an upper bound (a threshold keeps fewer edges)
LINK_BYTES_PER_EDGE = 56
# the merge's dense ids and representatives per row (see pipeline.plan.merge_memory)
DENSE_IDS_BYTES_PER_ROW = 60


# ---------------------------------------------------------------- rates
def load_rates(path: str | os.PathLike | None = None) -> dict:
    """The rates record written by ``benchmarks/run.py --rates`` (``path``, else the one
    shipped in the package, found with importlib.resources); {} when absent."""
    if path:
        p = Path(path)
        return json.loads(p.read_text()) if p.exists() else {}
    resource = resources.files("ltc_ray").joinpath(RATES_RESOURCE)
    return json.loads(resource.read_text()) if resource.is_file() else {}


def baselines(rates: dict) -> dict[str, int]:
    """Measured import baselines: ``driver``, ``worker`` (a Ray worker with faiss and
    torch: model actors) and ``knn_worker`` (a kNN actor: faiss, no torch; the worker's
    when a rates file predates it)."""
    got = rates.get("baseline_rss_bytes") or {}
    out = {key: int(got.get(key, FALLBACK_BASELINE[key])) for key in FALLBACK_BASELINE}
    out["knn_worker"] = int(got.get("knn_worker", out["worker"]))
    return out


def halo_rows(n: int, n_part: int, k: int) -> int:
    """Upper bound on a partition's halo: its rows' neighbours owned elsewhere."""
    return int(min(n - n_part, n_part * (k - 1)))


# ---------------------------------------------------------------- plan types
@dataclass
class Estimate:
    """A predicted peak RSS: ``total`` bytes = ``baseline`` + the sum of named ``terms``."""

    baseline: int
    terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(self.baseline + sum(self.terms.values()))

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "terms": dict(self.terms), "total": self.total}


@dataclass(frozen=True)
class PlanContext:
    """What a method's plan sees: ``n`` rows of ``dim``, the kNN graph's ``k``, the
    partitions (``partitions`` of at most ``rows_per_partition`` rows, whose one-hop halo
    is at most ``halo_rows``), a Ray worker's measured import baseline, the rates record,
    the cluster's CPUs/GPUs and the config."""

    n: int
    dim: int
    k: int
    partitions: int
    rows_per_partition: int
    halo_rows: int
    worker_baseline: int
    rates: dict = field(default_factory=dict)
    cpus: float = 1.0
    gpus: float = 0.0
    cfg: Any = None

    @property
    def parallel(self) -> float:
        """Partitions that run at once (one CPU each)."""
        return float(min(self.cpus, self.partitions))

    def rate(self, key: str) -> float | None:
        """A measured rate: the harness' (``rates``) over those taken from jobs."""
        merged = {**self.rates.get("from_jobs", {}), **self.rates.get("rates", {})}
        value = merged.get(key)
        return float(value) if value else None

    def timed(self, key: str, workers: float | None = None) -> tuple[float | None, str]:
        """Expected seconds of a stage over all N rows at rate ``key`` (rows/s per worker)
        on ``workers`` (default: :attr:`parallel`), and the arithmetic behind it."""
        workers = self.parallel if workers is None else workers
        rate = self.rate(key)
        if not rate:
            return None, f"no measured rate ({key})"
        return self.n / (rate * workers), f"N / ({rate:.3g} rows/s · {workers:g})"


@dataclass
class PlanStage:
    """One stage of a method in the plan: ``name`` (e.g. "link (TPDi)"), what ``runs``,
    on how many ``tasks`` (tasks or actors; 1 = a single process), the per-worker
    ``memory`` under the name ``worker``, the rows that worker owns (``rows_held``, for
    bytes per row), expected ``seconds`` (None without a rate) and ``how`` they follow.
    ``merges``: the stage also does the global merge (no separate merge task)."""

    name: str
    runs: str
    worker: str
    tasks: int
    memory: Estimate
    rows_held: int
    seconds: float | None = None
    how: str = "no measured rate"
    merges: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "runs": self.runs, "worker": self.worker,
                "tasks": self.tasks, "rows_held": self.rows_held, "merges": self.merges}


# ---------------------------------------------------------------- default stages by shape
def rate_key(method: Any, stage: str, per_cpu: bool = True) -> str:
    """The rates-file key of a method's stage by convention:
    ``<name>_<stage>_rows_per_cpu_s`` (``_rows_per_s`` for a single task)."""
    slug = method.name.replace("-", "_")
    return f"{slug}_{stage}_rows_per_{'cpu_s' if per_cpu else 's'}"


def rows_score_stage(ctx: PlanContext, key: str | None = None) -> PlanStage:
    """score "rows": a task per partition over its kNN rows (int32 ids + float32 sims,
    n·k·8) returning n float32 scores."""
    n, k = ctx.rows_per_partition, ctx.k
    seconds, how = ctx.timed(key) if key else (None, "no measured rate")
    return PlanStage(
        "score (rows)", "a task per partition over its kNN rows", "score_task",
        ctx.partitions,
        Estimate(ctx.worker_baseline, {"kNN rows": n * k * 8, "scores": n * 4}),
        n, seconds, how)


def halo_score_stage(ctx: PlanContext, node_features: bool = False,
                     key: str | None = None, name: str = "score (halo actors)",
                     worker: str = "score_actor") -> PlanStage:
    """score "halo" (and a method's own "rescore" stage, unless it models its actors):
    a partition actor with its kNN rows n·k·8, its own features n·D·4, the gathered own +
    halo rows (n+h)·D·4 and the scores n·4 (+ node features n·D·4 when it emits them;
    their width assumed D)."""
    n, h, d, k = ctx.rows_per_partition, ctx.halo_rows, ctx.dim, ctx.k
    terms = {"kNN rows": n * k * 8, "features (own, gathered own + halo)": (2 * n + h) * d * 4,
             "scores": n * 4}
    if node_features:
        terms["node features"] = n * d * 4
    seconds, how = ctx.timed(key) if key else (None, "no measured rate")
    return PlanStage(name, "partition actors serving the one-hop halo", worker,
                     ctx.partitions, Estimate(ctx.worker_baseline, terms), n, seconds, how)


def rows_link_stage(ctx: PlanContext, key: str | None = None) -> PlanStage:
    """link "rows": a task per partition over its kNN rows n·k·8 with all N scores
    (fetched + concatenated, N·8), its temporaries and edges n·(k−1)·56."""
    n, k = ctx.rows_per_partition, ctx.k
    seconds, how = ctx.timed(key) if key else (None, "no measured rate")
    return PlanStage(
        "link (rows)", "a task per partition over its kNN rows", "link_task", ctx.partitions,
        Estimate(ctx.worker_baseline, {
            "kNN rows": n * k * 8,
            "scores of all rows": ctx.n * 8,
            "link temporaries + edges": n * (k - 1) * LINK_BYTES_PER_EDGE,
        }), n, seconds, how)


def halo_link_stage(ctx: PlanContext, k: int | None = None, width: int | None = None,
                    key: str | None = None, name: str = "link (halo actors)") -> PlanStage:
    """link "halo": a link actor owning n rows of the link graph (``k`` neighbours) whose
    neighbours include h rows owned elsewhere: own + halo rows (n+3h)·k·8 (the halo as
    read, fetched and served), the same for their node features of ``width`` (None: no
    features), all N scores N·8 and its temporaries and edges n·(k−1)·56."""
    n = ctx.rows_per_partition
    k = k or ctx.k
    h = halo_rows(ctx.n, n, k)
    terms = {"rows of own + halo nodes, halo fetched + served": (n + 3 * h) * k * 8}
    if width:
        terms["features of own + halo nodes"] = (n + 3 * h) * width * 4
    terms["scores of all rows"] = ctx.n * 8
    terms["link temporaries + edges"] = n * (k - 1) * LINK_BYTES_PER_EDGE
    seconds, how = ctx.timed(key) if key else (None, "no measured rate")
    return PlanStage(name, "link actors serving the neighbours' rows"
                     + (" and features" if width else ""), "link_actor", ctx.partitions,
                     Estimate(ctx.worker_baseline, terms), n, seconds, how)


def whole_graph_stage(ctx: PlanContext, features: bool = False,
                      key: str | None = None) -> PlanStage:
    """link "whole-graph": ONE task holding the whole kNN graph, 64 B per directed edge
    N·(k−1)·64 (+ the feature matrix N·D·4 when the shape asks for it), all scores N·8 and
    the clusters' dense ids and representatives N·60; the method's own structures come on
    top (Infomap: another 50-100 B per kept link inside its C++ library)."""
    n, k = ctx.n, ctx.k
    terms = {f"kNN graph ({WHOLE_GRAPH_BYTES_PER_EDGE} B per edge)":
             n * (k - 1) * WHOLE_GRAPH_BYTES_PER_EDGE}
    if features:
        terms["feature matrix"] = n * ctx.dim * 4
    terms["scores + dense ids + representatives"] = n * (8 + DENSE_IDS_BYTES_PER_ROW)
    seconds, how = ctx.timed(key, 1.0) if key else (None, "no measured rate")
    return PlanStage("link (whole graph)", "ONE task holding the whole kNN graph "
                     "(single process; it also merges)", "whole_graph_task", 1,
                     Estimate(ctx.worker_baseline, terms), n, seconds, how, merges=True)


def default_score_stage(method: Any, ctx: PlanContext) -> PlanStage:
    """The score stage a method's shape implies (rates key by :func:`rate_key`)."""
    shape = method.shape
    if shape.score == "rows":
        return rows_score_stage(ctx, rate_key(method, "score"))
    if shape.score == "halo":
        return halo_score_stage(ctx, shape.node_features, rate_key(method, "score"))
    return halo_score_stage(ctx, key=rate_key(method, "score"),
                            name="score (the method's re-scoring stage)",
                            worker="rescore_actor")


def default_link_stage(method: Any, ctx: PlanContext) -> PlanStage:
    """The link stage a method's shape implies (rates key by :func:`rate_key`)."""
    shape = method.shape
    if shape.link == "whole-graph":
        return whole_graph_stage(ctx, shape.whole_graph_features,
                                 rate_key(method, "link", per_cpu=False))
    if shape.link == "halo":
        return halo_link_stage(ctx, shape.link_k,
                               ctx.dim if shape.link_halo_features else None,
                               rate_key(method, "link"))
    return rows_link_stage(ctx, rate_key(method, "link"))


def shape_stages(method: Any, ctx: PlanContext) -> list[PlanStage]:
    """The default plan of a method: its shape's score and link stages."""
    return [default_score_stage(method, ctx), default_link_stage(method, ctx)]


__all__ = [
    "Estimate",
    "PlanContext",
    "PlanStage",
    "baselines",
    "default_link_stage",
    "default_score_stage",
    "halo_link_stage",
    "halo_rows",
    "halo_score_stage",
    "load_rates",
    "rate_key",
    "rows_link_stage",
    "rows_score_stage",
    "shape_stages",
    "whole_graph_stage",
]
