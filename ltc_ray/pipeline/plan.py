"""Dry-run planning: the per-stage memory model and expected stage times, without doing
any work (``cluster --dry-run``).

The memory model (bytes, derived from the code; see docs/memory.md) predicts the peak
resident set of each kind of process as a measured baseline (interpreter + numpy + faiss +
torch + ray imports) plus terms linear in the rows that process holds. The generic parts
are here: the kNN layout and actors, the driver and the merge. A method's own stages come
from the method (``ClusterMethod.plan``: derived from its shape, or its own memory model),
never from its name. The benchmark harness (``benchmarks/run.py``) checks the model
against measured peak RSS; the stage rates it measures ship as package data
(``ltc_ray/data/rates.json``) and turn work into expected seconds.
"""

from __future__ import annotations

import math

from ltc_ray.cluster import get_method
from ltc_ray.config import Config, KnnConfig
from ltc_ray.knn.search import TIE_MARGIN, default_nlist
from ltc_ray.pipeline.cluster_stage import partition_ranges
from ltc_ray.pipeline.knn_stage import plan_knn_layout, task_slots
from ltc_ray.plan_model import (
    DENSE_IDS_BYTES_PER_ROW,
    Estimate,
    PlanContext,
    PlanStage,
    baselines,
    halo_rows,
    load_rates,
)

# faiss' blocked GEMM scratch (bs_x * bs_y float32 = 4096 * 1024 * 4) per search call
FAISS_GEMM_SCRATCH = 4096 * 1024 * 4
# hypothetical corpora above this many rows are planned with IVF (exact kNN is quadratic)
APPROX_ROWS = 20_000_000


# ---------------------------------------------------------------- memory model
def knn_actor_memory(
    n_shard: int,
    dim: int,
    k: int,
    block_rows: int,
    base: int,
    index: str = "flat",
    on_gpu: bool = False,
    n_rows: int | None = None,
) -> Estimate:
    """Host RSS of one kNN shard actor holding ``n_shard`` of the job's ``n_rows`` rows
    (query blocks are min(block_rows, n_rows) rows whatever the shard size).

    - shard: ``xb`` float32 N_s·D·4 (kept for the per-pair re-scoring);
    - index: faiss' own copy, N_s·D·4 (+ 8 per id for IVF lists); 0 on a GPU (device memory);
    - read: ``read_features`` holds the raw rows and the normalised copy at once, so the
      peak while loading is 2·N_s·D·4 (the index does not exist yet: max, not sum);
    - block: one query block B·D·4 and, per candidate (B·(k+m) of them), 64 bytes alive at
      once: faiss' int64 ids, the shifted global ids (8), the re-scored sims (4), then
      ``merge_topk``'s concatenation (12), sort keys (12), order (8) and outputs (12);
    - faiss' 16 MiB GEMM scratch (the per-pair re-scoring reads rows in place).
    """
    km = k + TIE_MARGIN
    shard = n_shard * dim * 4
    idx = 0 if on_gpu else n_shard * dim * 4 + (8 * n_shard if index == "ivf" else 0)
    b = min(block_rows, max(n_rows or n_shard, 1))
    block = b * dim * 4 + b * km * 64
    return Estimate(
        base,
        {
            "shard+index (max with read 2x)": max(shard + idx, 2 * shard),
            "query block": block,
            "faiss scratch": FAISS_GEMM_SCRATCH,
        },
    )


def knn_gpu_memory(n_shard: int, dim: int, k: int, block_rows: int, index: str) -> int:
    """Device bytes of a GPU shard: vectors (+ int64 ids for IVF), one query block and its
    (k+m) candidates (int64 ids + float32 sims); faiss' tiling scratch is not counted."""
    vec = n_shard * dim * 4 + (8 * n_shard if index == "ivf" else 0)
    return int(vec + block_rows * dim * 4 + block_rows * (k + TIE_MARGIN) * 12)


def merge_memory(n: int, edges: int, base: int) -> Estimate:
    """RSS of the merge task over ``edges`` forest edges (≤ N) for N nodes.

    - edges: int64 (child, root) lists and their concatenation, 2·E·16;
    - graph: scipy COO (int32 row/col + int8 data) and CSR (indices + int8 data, int32
      indptr), E·9 + E·5 + N·4, then the connected-components labels N·4 (+ int64 copy N·8);
    - dense ids: ``np.unique`` (sorted copy, index, inverse, counts) ≈ N·32, ranks and
      cluster ids N·16; the representatives read N float32 scores, N·4 (+ a sort N·8).
    """
    return Estimate(
        base,
        {
            "edge lists": 2 * edges * 16,
            "sparse graph + labels": edges * 14 + n * 16,
            "dense ids + representatives": n * DENSE_IDS_BYTES_PER_ROW,
        },
    )


def driver_memory(n: int, base: int) -> Estimate:
    """The driver holds the plan, object refs and the cluster sizes/representatives (C ≤ N
    int64 each); it never reads features or the N·k graph."""
    return Estimate(base, {"cluster summary": 16 * n})


# ---------------------------------------------------------------- the plan
def _knn_seconds(
    n: int, dim: int, knn: KnnConfig, n_shards: int, rates: dict, cpus: float, gpus: float
) -> tuple[float | None, str]:
    """Expected kNN seconds and the arithmetic behind it."""
    r = {**rates.get("from_jobs", {}), **rates.get("rates", {})}
    if knn.index == "ivf":
        n_s = math.ceil(n / n_shards)
        nlist = knn.nlist or default_nlist(n_s)
        probe = min(knn.nprobe, nlist)
        per_query = n_shards * (nlist + probe * n_s / nlist) * 2 * dim
        flops = n * per_query
        how = (
            f"IVF: N·S·(nlist + nprobe·N_s/nlist)·2D = {n:.3g}·{n_shards}·({nlist} + "
            f"{probe}·{n_s / nlist:.0f})·{2 * dim} = {flops:.3g} FLOP"
        )
    else:
        flops = 2.0 * n * n * dim
        how = f"exact: 2·N²·D = 2·{n:.3g}²·{dim} = {flops:.3g} FLOP"
    if gpus > 0:
        key = "gpu_ivf_flops_per_gpu_s" if knn.index == "ivf" else "gpu_flat_flops_per_gpu_s"
        rate = rates.get("assumed", {}).get(key)
        if not rate:
            return None, how + " (no GPU rate)"
        return flops / (rate * gpus), how + f" / ({rate:.3g} FLOP/s/GPU assumed · {gpus:g} GPU)"
    rate = r.get("knn_flat_flops_per_cpu_s")
    if not rate:
        return None, how + " (no measured rate)"
    if knn.index == "ivf":  # IVF scans are memory-bound: measured flat rate / assumed penalty
        rate = rate / rates.get("assumed", {}).get("ivf_cpu_penalty", 2.0)
    return flops / (rate * cpus), how + f" / ({rate:.3g} FLOP/s/CPU measured · {cpus:g} CPU)"


def method_memory(stages: list[PlanStage]) -> dict[str, PlanStage]:
    """The method's stages by their worker's memory-line name (made unique by the stage's
    name should two stages name the same worker)."""
    out: dict[str, PlanStage] = {}
    for stage in stages:
        name = stage.worker if stage.worker not in out else f"{stage.worker} ({stage.name})"
        out[name] = stage
    return out


def make_plan(
    n: int,
    dim: int,
    cfg: Config,
    resources: dict,
    rates: dict | None = None,
    source: str = "",
    hypothetical: bool = False,
) -> dict:
    """The plan for ``n`` rows of ``dim`` on a cluster with ``resources``: kNN layout,
    partitions, the method's stages (``ClusterMethod.plan``, its model not loaded),
    per-worker memory and expected stage seconds (None without a rate)."""
    rates = load_rates() if rates is None else rates
    base = baselines(rates)
    cpus = max(float(resources.get("CPU", 1.0)), 1.0)
    gpus = float(resources.get("GPU", 0)) if cfg.knn.gpu == "auto" else 0.0
    knn = cfg.knn
    notes = []
    if hypothetical and knn.index == "flat" and n > APPROX_ROWS:
        knn = KnnConfig(**{**knn.__dict__, "index": "ivf"})
        notes.append(
            f"N > {APPROX_ROWS:,}: planned with IVF (approximate, recall measured); "
            "exact kNN is quadratic"
        )
    layout = plan_knn_layout(n, dim, knn, resources)
    slots = task_slots(layout, knn, n, dim)  # small flat base: search tasks, not actors
    n_shard = max(hi - lo for lo, hi in layout.shard_ranges)
    on_gpu = layout.gpus_per_actor > 0
    k = knn.k
    ranges = partition_ranges(n, cfg.cluster, cpus)
    n_part = max(hi - lo for lo, hi in ranges)
    halo = halo_rows(n, n_part, k)
    method = get_method(cfg.method, cfg, load=False)  # a dry run reads no model
    ctx = PlanContext(n=n, dim=dim, k=k, partitions=len(ranges), rows_per_partition=n_part,
                      halo_rows=halo, worker_baseline=base["worker"], rates=rates,
                      cpus=cpus, gpus=gpus, cfg=cfg)
    stages = method_memory(method.plan(ctx))
    merged = any(stage.merges for stage in stages.values())
    mem = {
        "driver": driver_memory(n, base["driver"]),
        "knn_actor": knn_actor_memory(
            n_shard, dim, k, knn.block_rows, base["knn_worker"], knn.index, on_gpu, n
        ),
        **{name: stage.memory for name, stage in stages.items()},
        **({} if merged else {"merge": merge_memory(n, n, base["worker"])}),
    }
    held = {"driver": n, "knn_actor": n_shard, "merge": n,
            **{name: stage.rows_held for name, stage in stages.items()}}
    gpu_mem = knn_gpu_memory(n_shard, dim, k, knn.block_rows, knn.index) if on_gpu else None
    r = {**rates.get("from_jobs", {}), **rates.get("rates", {})}
    knn_s, knn_how = _knn_seconds(n, dim, knn, len(layout.shard_ranges), rates, cpus, gpus)
    times = {"knn": knn_s, **{stage.name: stage.seconds for stage in stages.values()}}
    how = {"knn": knn_how, **{stage.name: stage.how for stage in stages.values()}}
    for stage, key in (() if merged else (("merge", "merge_rows_per_s"),)) + (
            ("metrics", "metrics_rows_per_s"),):
        rate = r.get(key)
        times[stage] = n / rate if rate else None
        how[stage] = f"N / ({rate:.3g} rows/s · 1)" if rate else "no measured rate"
    if method.shape.link_graph != "scored":
        notes.append(
            "the link step runs on a second kNN graph ("
            + ("over the node features the score stage emits"
               if method.shape.link_graph == "node-features" else
               "over the input features, k="
               + str(method.shape.link_k or "the model's"))
            + "): a kNN stage like the first, not in the memory lines above")
    return {
        "source": source,
        "hypothetical": hypothetical,
        "n_rows": n,
        "dim": dim,
        "input_bytes": n * dim * 4,
        "method": cfg.method,
        "resources": {"CPU": cpus, "GPU": gpus},
        "knn": {
            "index": knn.index,
            "k": k,
            "mode": "tasks" if slots else layout.mode,
            "shards": slots or layout.n_actors,
            "rows_per_shard": n_shard,
            "threads_per_actor": (max(1, cpus // slots) if slots
                                  else layout.threads_per_actor),
            "gpus_per_actor": layout.gpus_per_actor,
            "nlist": (knn.nlist or default_nlist(n_shard)) if knn.index == "ivf" else None,
            "nprobe": knn.nprobe if knn.index == "ivf" else None,
            "gpu_bytes_per_actor": gpu_mem,
        },
        "partitions": {"count": len(ranges), "rows_per_partition": n_part, "halo_rows_max": halo},
        "stages": [stage.to_dict() for stage in stages.values()],
        "memory": {name: est.to_dict() for name, est in mem.items()},
        "memory_bytes_per_sample": {name: est.total / held[name] for name, est in mem.items()},
        "expected_seconds": times,
        "arithmetic": how,
        "rates_from": rates.get("machine", {}).get("description", "no rates file"),
        "notes": notes,
    }


def _gb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e9:,.2f} GB"


def _secs(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s >= 86400:
        return f"{s:,.0f} s ({s / 86400:.1f} days)"
    if s >= 3600:
        return f"{s:,.0f} s ({s / 3600:.1f} h)"
    return f"{s:,.1f} s"


def format_plan(plan: dict) -> str:
    """Human-readable plan (what ``cluster --dry-run`` prints)."""
    kn, parts, res = plan["knn"], plan["partitions"], plan["resources"]
    lines = [
        f"DRY RUN: nothing is computed or written ({plan['source']})",
        f"input: N={plan['n_rows']:,} rows x D={plan['dim']} "
        f"({_gb(plan['input_bytes'])} float32), method={plan['method']}",
        f"cluster: {res['CPU']:g} CPU, {res['GPU']:g} GPU",
        f"knn: index={kn['index']} k={kn['k']} mode={kn['mode']} shards={kn['shards']} "
        f"({kn['rows_per_shard']:,} rows each, {kn['threads_per_actor']} thread(s)"
        + (f", {kn['gpus_per_actor']:.3g} GPU" if kn["gpus_per_actor"] else "")
        + ")"
        + (f" nlist={kn['nlist']} nprobe={kn['nprobe']}" if kn["index"] == "ivf" else ""),
        f"partitions: {parts['count']} x {parts['rows_per_partition']:,} rows "
        f"(halo <= {parts['halo_rows_max']:,} rows)",
        f"{plan['method']} stages:",
    ]
    for st in plan["stages"]:
        tasks = f"{st['tasks']:,} task{'s' if st['tasks'] != 1 else ''}"
        lines.append(f"  {st['name']:<28} {tasks:>12}  {st['runs']} [{st['worker']}]")
    lines.append("memory per worker (peak RSS, model in docs/memory.md):")
    for name, est in plan["memory"].items():
        per = plan["memory_bytes_per_sample"][name]
        lines.append(
            f"  {name:<16} {_gb(est['total']):>12}  "
            f"(baseline {_gb(est['baseline'])} + "
            + ", ".join(f"{t} {_gb(v)}" for t, v in est["terms"].items())
            + f"; {per:,.0f} B/row held)"
        )
    if kn["gpu_bytes_per_actor"]:
        lines.append(f"  knn GPU memory   {_gb(kn['gpu_bytes_per_actor']):>12}  per shard actor")
    lines.append(f"expected stage times (rates: {plan['rates_from']}):")
    for stage, s in plan["expected_seconds"].items():
        lines.append(f"  {stage:<28} {_secs(s):>20}   {plan['arithmetic'][stage]}")
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


__all__ = [
    "Estimate",
    "baselines",
    "driver_memory",
    "format_plan",
    "knn_actor_memory",
    "knn_gpu_memory",
    "load_rates",
    "make_plan",
    "merge_memory",
]
