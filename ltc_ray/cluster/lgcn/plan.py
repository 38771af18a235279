"""L-GCN's memory model in a dry-run plan (docs/memory.md): the pivot-scoring actors
and the propagation rounds of :mod:`.stage`."""

from __future__ import annotations

from typing import Any

from ltc_ray.plan_model import Estimate, PlanContext, PlanStage, rate_key

SETTLE_BYTES_PER_ROW = 1 + 16 + 16 + 24  # as gcn_ds.plan: flags, labels, forests, scipy
PAIR_BYTES = 8 + 8 + 4 + 8  # a pooled pair (int64 ends, float32 weight) and its sort key


def plan_stages(method: Any, ctx: PlanContext) -> list[PlanStage]:
    hop1, hop2 = method.hops()
    n, k, d = ctx.rows_per_partition, ctx.k, ctx.dim
    chunk = min(n, method.params.chunk_rows)
    nodes = 1 + hop1 * (hop2 + 1)  # an instance subgraph's nodes, at most
    reach = min(ctx.n, chunk * nodes)  # one chunk's three-hop neighbourhood
    slots = method.params.batch_size * nodes
    widths = getattr(getattr(method, "net", None), "state", None)
    hidden = 512 if widths is None else max(v.shape[-1] for v in widths.values() if v.ndim == 2)
    score = PlanStage(
        "score (L-GCN pivot subgraphs on partition actors)", "an actor per partition "
        "scores its pivots' subgraphs chunk by chunk, fetching three hops of rows and "
        "features, and writes its rows of the re-scored graph", "score_actor",
        ctx.partitions,
        Estimate(ctx.worker_baseline, {
            "own kNN rows + features": n * (k * 8 + d * 4),
            "one chunk's neighbourhood (features + rows)": reach * (d * 4 + k * 8),
            "forward batch (dense subgraphs)": slots * (nodes + d + 3 * hidden) * 4,
            "re-scored rows": n * (hop1 + 1) * 12,
        }), n, *ctx.timed(rate_key(method, "score")))
    link = PlanStage(
        "link (dynamic-threshold propagation)", "edge tasks pool each pair's two "
        "directions per partition; rounds of star forests settled in ONE task",
        "settle_task", 1,
        Estimate(ctx.worker_baseline, {
            "staying flags + labels + forests (per row)": ctx.n * SETTLE_BYTES_PER_ROW,
            "pairs still in play at the hand-over": 4_000_000 * PAIR_BYTES,
        }), ctx.n, None, "rounds: until every component fits; no measured rate",
        merges=False)
    return [score, link]
