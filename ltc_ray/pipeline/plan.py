"""Dry-run planning: the per-stage memory model and expected stage times, without doing
any work (``cluster --dry-run``).

The memory model (bytes, derived from the code; see docs/memory.md) predicts the peak
resident set of each kind of process as a measured baseline (interpreter + numpy + faiss +
torch + ray imports) plus terms linear in the rows that process holds. The benchmark
harness (``benchmarks/run.py``) checks it against measured peak RSS; stage rates measured
by the harness live in ``benchmarks/rates.json`` and turn work into expected seconds.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ltc_ray.config import Config, KnnConfig
from ltc_ray.knn.search import RESCORE_CHUNK, TIE_MARGIN, default_nlist

RATES_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "rates.json"

# Used only when no rates file exists (a fresh checkout without benchmarks/): measured
# once on the 2-core development machine, see benchmarks/rates.json for the real record.
FALLBACK_BASELINE = {"driver": 330 * 2**20, "worker": 260 * 2**20}
# faiss' blocked GEMM scratch (bs_x * bs_y float32 = 4096 * 1024 * 4) per search call
FAISS_GEMM_SCRATCH = 4096 * 1024 * 4
# hypothetical corpora above this many rows are planned with IVF (exact kNN is quadratic)
APPROX_ROWS = 20_000_000
GCN_HIDDEN = 512  # GCN-V's hidden width in the paper setting (models.gcn_v.GCNV default)
# adjacency_rows temporaries per directed edge that are alive at the actor's peak: fitted to
# the cpu-scale suite's measured peaks at 117K-234K rows (110 B were alive in an isolated
# call, but the peak is one phase, not every temporary at once; 110 over-predicted by 41 %)
ADJ_BYTES_PER_EDGE = 30
# the edge scorer's peak over its batches / the bytes of one batch's tensors: measured
# 340 MiB above the pre-scoring RSS over 78 batches of 256 anchors (k=80, D=256, d=128,
# FFN 512) against 230 MiB of tensors; torch's freed blocks are not all returned at once
SCORER_SLACK = 1.5


def load_rates(path: str | os.PathLike | None = None) -> dict:
    """The rates record written by ``benchmarks/run.py --rates``; {} when absent."""
    p = Path(path) if path else RATES_FILE
    if not p.exists():
        return {}
    return json.loads(p.read_text())


def baselines(rates: dict) -> dict[str, int]:
    """Measured import baselines: ``driver`` and ``worker`` (a Ray worker with faiss/torch)."""
    got = rates.get("baseline_rss_bytes") or {}
    return {key: int(got.get(key, FALLBACK_BASELINE[key])) for key in FALLBACK_BASELINE}


# ---------------------------------------------------------------- memory model
@dataclass
class Estimate:
    """A predicted peak RSS: ``total`` bytes = ``baseline`` + the sum of ``terms``."""

    baseline: int
    terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(self.baseline + sum(self.terms.values()))

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "terms": dict(self.terms), "total": self.total}


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

    - shard: ``xb`` float32 N_s·D·4 (kept for the exact re-scoring);
    - index: faiss' own copy, N_s·D·4 (+ 8 per id for IVF lists); 0 on a GPU (device memory);
    - read: ``read_features`` holds the raw rows and the normalised copy at once, so the
      peak while loading is 2·N_s·D·4 (the index does not exist yet: max, not sum);
    - block: one query block B·D·4 and, per candidate (B·(k+m) of them), 64 bytes alive at
      once: faiss' int64 ids, the shifted global ids (8), the re-scored sims (4), then
      ``merge_topk``'s concatenation (12), sort keys (12), order (8) and outputs (12);
    - rescore: a 512-row chunk of gathered candidates, float32 then float64:
      512·(k+m)·D·(4+8); plus faiss' 16 MiB GEMM scratch.
    """
    km = k + TIE_MARGIN
    shard = n_shard * dim * 4
    idx = 0 if on_gpu else n_shard * dim * 4 + (8 * n_shard if index == "ivf" else 0)
    b = min(block_rows, max(n_rows or n_shard, 1))
    block = b * dim * 4 + b * km * 64
    rescore = RESCORE_CHUNK * km * dim * 12 + FAISS_GEMM_SCRATCH
    return Estimate(
        base,
        {
            "shard+index (max with read 2x)": max(shard + idx, 2 * shard),
            "query block": block,
            "rescore chunk": rescore,
        },
    )


def knn_gpu_memory(n_shard: int, dim: int, k: int, block_rows: int, index: str) -> int:
    """Device bytes of a GPU shard: vectors (+ int64 ids for IVF), one query block and its
    (k+m) candidates (int64 ids + float32 sims); faiss' tiling scratch is not counted."""
    vec = n_shard * dim * 4 + (8 * n_shard if index == "ivf" else 0)
    return int(vec + block_rows * dim * 4 + block_rows * (k + TIE_MARGIN) * 12)


def inference_actor_memory(
    n_part: int,
    halo: int,
    dim: int,
    k: int,
    base: int,
    hidden: int = GCN_HIDDEN,
    batch_rows: int = 65536,
) -> Estimate:
    """RSS of one GCN-V partition actor owning ``n_part`` rows with ``halo`` extra rows.

    - graph: its kNN rows (int32 ids + float32 sims) n·k·8 and its directed edges
      (int64 src, dst + float32 sim) n·(k-1)·20;
    - features: own rows n·D·4, the gathered columns (n+h)·D·4 and ÂX n·D·4;
    - adjacency: out- and in-edges (≈ 2·n·(k-1) directed edges) received and concatenated
      (20 B each) plus ``adjacency_rows``' ≈ 110 B per edge of temporaries;
    - forward: one batch of min(n, batch)·(2·D + 3·H)·4 and the outputs n·(H+1)·4.
    """
    e = 2 * n_part * (k - 1)
    t = min(n_part, batch_rows)
    return Estimate(
        base,
        {
            "graph rows + own edges": n_part * k * 8 + n_part * (k - 1) * 20,
            "features (own, halo cols, agg)": (3 * n_part + halo) * dim * 4,
            "adjacency edges + temporaries": e * (20 + ADJ_BYTES_PER_EDGE),
            "forward batch + outputs": t * (2 * dim + 3 * hidden) * 4 + n_part * (hidden + 1) * 4,
        },
    )


def edge_actor_memory(
    n_part: int,
    halo: int,
    dim: int,
    k: int,
    base: int,
    scorer: tuple[int, int, int] = (128, 4, 512),
    batch: int = 256,
    density_k: int = 20,
    halo_bytes: int = 1 << 28,
) -> Estimate:
    """RSS of one hard-clusters edge actor (``pipeline/rescore.py``) owning ``n_part`` rows
    whose neighbours include ``halo`` rows owned elsewhere. The phases' terms are summed
    (an upper bound: not all are alive at once, which covers allocator slack).

    - kNN rows: int32 as read, int64 for the scorer, n·k·12;
    - features: own rows n·D·4, the gathered rows (own + halo) (n+h)·D·4, and the halo
      twice more: as fetched (object-store pages) and as served to the other actors, whose
      halos are this actor's rows (on average as many as it fetches), 2·h·D·4. When the
      halo exceeds ``halo_bytes`` it is fetched per chunk of c rows
      (:func:`~ltc_ray.cluster.hard_clusters.halo_chunk_rows`): n·D·4 + 3·c·k·D·4;
    - probabilities n·k·4 and the re-sort (argsort order, ids, keys) n·k·24;
    - one scorer batch: batch·k tokens of (D + 8·d_model + 2·FFN) floats, and the
      attention scores batch·heads·k²·8 (``scorer`` = (d_model, heads, FFN), the
      ``ScorerShape`` defaults), times :data:`SCORER_SLACK` (measured);
    - the NDDE transition edges, its own and those pulled into its range: 2·n·m·24.
    """
    from ltc_ray.cluster.hard_clusters import halo_chunk_rows

    d_model, heads, ffn = scorer
    tokens = batch * k
    chunk = halo_chunk_rows(n_part, halo, k, dim, halo_bytes, batch)
    if chunk >= n_part:
        feats = (2 * n_part + 3 * halo) * dim * 4
    else:
        feats = (n_part + 3 * min(chunk * k, n_part + halo)) * dim * 4
    return Estimate(
        base,
        {
            "kNN rows (int32 + int64)": n_part * k * 12,
            "features (own, gathered, halo fetched + served)": feats,
            "probabilities + re-sort": n_part * k * 28,
            "scorer batch": int(SCORER_SLACK * (tokens * (dim + 8 * d_model + 2 * ffn) * 4
                                                + batch * heads * k * k * 8)),
            "NDDE transition edges": 2 * n_part * density_k * 24,
        },
    )


def link_actor_memory(n_part: int, halo: int, n: int, k: int, base: int,
                      block: int = 512, halo_bytes: int | None = 1 << 28) -> Estimate:
    """RSS of one TPDi link actor (``LinkActor`` without features) owning ``n_part``
    re-scored rows whose neighbours include ``halo`` rows owned elsewhere.

    - rows: its own re-scored rows (int32 ids + float32 p) n·k·8, the int64 neighbour ids
      and their unique sort n·k·16, and the rows of own + halo nodes (n+h)·k·8, the halo
      twice more (fetched, and served to the other actors) 2·h·k·8. When the halo's rows
      exceed ``halo_bytes`` they are fetched per TPDi block instead: 3·min(block·k, n+h)·k·8;
    - the densities of all N rows (fetched + concatenated) N·8;
    - TPDi, then linking (the larger phase): Q and the (n, k) float64 distances n·k·16 plus
      a block of ``block`` anchors' k × k lookups at ≈ 100 B per entry, or the linking's
      sorted copies and masks, ≈ 53 B per (row, neighbour).
    """
    from ltc_ray.cluster.hard_clusters import halo_fits

    if halo_fits(halo, k * 8, halo_bytes):
        rows = (n_part + 3 * halo) * k * 8
    else:
        rows = 3 * min(block * k, n_part + halo) * k * 8
    return Estimate(
        base,
        {
            "re-scored rows (own, ids, unique)": n_part * k * 24,
            "rows of own + halo nodes, halo fetched + served": rows,
            "densities of all rows": n * 8,
            "TPDi / linking": max(n_part * k * 16 + block * k * k * 100, n_part * k * 53),
        },
    )


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
            "dense ids + representatives": n * 60,
        },
    )


def driver_memory(n: int, base: int) -> Estimate:
    """The driver holds the plan, object refs and the cluster sizes/representatives (C ≤ N
    int64 each); it never reads features or the N·k graph."""
    return Estimate(base, {"cluster summary": 16 * n})


def halo_rows(n: int, n_part: int, k: int) -> int:
    """Upper bound on a partition's halo: its rows' neighbours owned elsewhere."""
    return int(min(n - n_part, n_part * (k - 1)))


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
    partitions, per-worker memory and expected stage seconds (None without a rate)."""
    from ltc_ray.pipeline.cluster_stage import partition_ranges
    from ltc_ray.pipeline.knn_stage import plan_knn_layout

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
    n_shard = max(hi - lo for lo, hi in layout.shard_ranges)
    on_gpu = layout.gpus_per_actor > 0
    k = knn.k
    ranges = partition_ranges(n, cfg.cluster, cpus)
    n_part = max(hi - lo for lo, hi in ranges)
    halo = halo_rows(n, n_part, k)
    mem = {
        "driver": driver_memory(n, base["driver"]),
        "knn_actor": knn_actor_memory(
            n_shard, dim, k, knn.block_rows, base["worker"], knn.index, on_gpu, n
        ),
        **(
            {
                "edge_actor": edge_actor_memory(
                    n_part, halo, dim, k, base["worker"],
                    batch=cfg.methods.hard_clusters.batch_size,
                    density_k=cfg.methods.hard_clusters.density_k,
                    halo_bytes=cfg.methods.hard_clusters.halo_bytes,
                ),
                "link_actor": link_actor_memory(
                    n_part, halo, n, k, base["worker"],
                    halo_bytes=cfg.methods.hard_clusters.halo_bytes,
                ),
            }
            if cfg.method == "hard-clusters"
            else {"inference_actor": inference_actor_memory(n_part, halo, dim, k, base["worker"])}
        ),
        "merge": merge_memory(n, n, base["worker"]),
    }
    gpu_mem = knn_gpu_memory(n_shard, dim, k, knn.block_rows, knn.index) if on_gpu else None
    r = {**rates.get("from_jobs", {}), **rates.get("rates", {})}
    knn_s, knn_how = _knn_seconds(n, dim, knn, len(layout.shard_ranges), rates, cpus, gpus)
    parallel = min(cpus, len(ranges))
    times = {"knn": knn_s}
    how = {"knn": knn_how}
    per_method = (
        (("score (edge scorer + NDDE)", "hard_clusters_score_rows_per_cpu_s", parallel),
         ("link (TPDi)", "hard_clusters_link_rows_per_cpu_s", parallel))
        if cfg.method == "hard-clusters" else
        (("score (gcn-v inference)", "gcn_v_rows_per_cpu_s", parallel),))
    for stage, key, workers in (
        *per_method,
        ("merge", "merge_rows_per_s", 1.0),
        ("metrics", "metrics_rows_per_s", 1.0),
    ):
        rate = r.get(key)
        times[stage] = n / (rate * workers) if rate else None
        how[stage] = f"N / ({rate:.3g} rows/s · {workers:g})" if rate else "no measured rate"
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
            "mode": layout.mode,
            "shards": layout.n_actors,
            "rows_per_shard": n_shard,
            "threads_per_actor": layout.threads_per_actor,
            "gpus_per_actor": layout.gpus_per_actor,
            "nlist": (knn.nlist or default_nlist(n_shard)) if knn.index == "ivf" else None,
            "nprobe": knn.nprobe if knn.index == "ivf" else None,
            "gpu_bytes_per_actor": gpu_mem,
        },
        "partitions": {"count": len(ranges), "rows_per_partition": n_part, "halo_rows_max": halo},
        "memory": {name: est.to_dict() for name, est in mem.items()},
        "memory_bytes_per_sample": {
            "driver": mem["driver"].total / n,
            "knn_actor": mem["knn_actor"].total / n_shard,
            **{
                name: mem[name].total / n_part
                for name in ("inference_actor", "edge_actor", "link_actor")
                if name in mem
            },
            "merge": mem["merge"].total / n,
        },
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
        "memory per worker (peak RSS, model in docs/memory.md):",
    ]
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
        lines.append(f"  {stage:<24} {_secs(s):>24}   {plan['arithmetic'][stage]}")
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


__all__ = [
    "Estimate",
    "edge_actor_memory",
    "format_plan",
    "inference_actor_memory",
    "link_actor_memory",
    "knn_actor_memory",
    "load_rates",
    "make_plan",
    "merge_memory",
]
