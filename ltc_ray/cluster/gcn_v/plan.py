"""GCN-V's memory model in a dry-run plan: the inference actor (``PartitionActor`` in
``pipeline/halo.py``) that GCN-V and GCN-V+E score with (docs/memory.md)."""

from __future__ import annotations

from typing import Any

from ltc_ray.plan_model import Estimate, PlanContext, PlanStage

GCN_HIDDEN = 512  # GCN-V's hidden width in the paper setting (models.gcn_v.GCNV default)
# adjacency_rows temporaries per directed edge that are alive at the actor's peak: fitted to
# the cpu-scale suite's measured peaks at 117K-234K rows (110 B were alive in an isolated
# call, but the peak is one phase, not every temporary at once; 110 over-predicted by 41 %)
ADJ_BYTES_PER_EDGE = 30
RATE_KEY = "gcn_v_rows_per_cpu_s"  # measured by benchmarks/run.py's gcn-v case


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
      (20 B each) plus ``adjacency_rows``' temporaries alive at the peak (30 B each);
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


def hidden_width(method: Any) -> int:
    """The loaded model's hidden width; :data:`GCN_HIDDEN` when no model was loaded."""
    inference = getattr(method, "inference", None)
    return int(inference.hidden) if inference is not None else GCN_HIDDEN


def inference_stage(method: Any, ctx: PlanContext) -> PlanStage:
    """The score stage of a GCN-V-based method: an inference actor per partition."""
    n = ctx.rows_per_partition
    seconds, how = ctx.timed(RATE_KEY)
    return PlanStage(
        "score (gcn-v inference)", "GCN-V inference actors, one per partition, with the "
        "one-hop halo", "inference_actor", ctx.partitions,
        inference_actor_memory(n, ctx.halo_rows, ctx.dim, ctx.k, ctx.worker_baseline,
                               hidden_width(method), method.params.batch_rows),
        n, seconds, how)
