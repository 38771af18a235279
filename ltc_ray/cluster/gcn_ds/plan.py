"""GCN-D/GCN-S's memory model in a dry-run plan (docs/memory.md): the proposal rounds,
the scoring actors and the de-overlap tasks of :mod:`.stage`."""

from __future__ import annotations

from typing import Any

from ltc_ray.plan_model import (
    LINK_BYTES_PER_EDGE,
    Estimate,
    PlanContext,
    PlanStage,
    rate_key,
)

# the settle task per row: staying flags, two label copies, the forests' edges (16 B)
# and scipy's components over them (CSR + labels, about 24 B)
SETTLE_BYTES_PER_ROW = 1 + 16 + 16 + 24
FORWARD_SLOTS = 65536  # slots (proposals x padded size) per forward pass (models.gcn_ds)
MAX_PADDED = 512  # the largest padded proposal (iteration-1 proposals hold up to 500)
BY_NODE_BYTES = 8 + 4 + 4  # de-overlap per sample and setting: proposal id, score, keep


def plan_stages(method: Any, ctx: PlanContext) -> list[PlanStage]:
    """Proposals, scoring, de-overlap (the merge follows as for every method)."""
    settings = method.proposal_settings()
    s = len(settings)
    n, k, d = ctx.rows_per_partition, ctx.k, ctx.dim
    widths = getattr(getattr(method, "d_net", None), "state", None)
    hidden = 512 if widths is None else max(v.shape[-1] for v in widths.values()
                                            if v.ndim == 2)
    seconds, how = ctx.timed(rate_key(method, "score"))
    proposals = PlanStage(
        f"proposals ({s} settings)", "per setting: edge tasks over each partition's rows, "
        "then rounds of star forests settled in ONE task (size-constrained components); "
        "iteration-1 settings add a super-vertex shuffle and kNN", "settle_task", 1,
        Estimate(ctx.worker_baseline, {
            "staying flags + labels + forests (per row)": ctx.n * SETTLE_BYTES_PER_ROW,
            "one setting's proposal table (members + offsets)": ctx.n * 16,
        }), ctx.n, None, "rounds: at most 100 per setting; no measured rate")
    # the members of the proposals an actor owns: at most a partition's worth per setting
    needed = min(ctx.n, max(1, s) * n)
    score = PlanStage(
        "score (GCN-D" + ("/GCN-S" if getattr(method, "segments", False) else "")
        + " on partition actors)", "an actor per partition scores the proposals whose "
        "smallest member it owns, fetching the members' features and rows", "score_actor",
        ctx.partitions,
        Estimate(ctx.worker_baseline, {
            "own kNN rows + features": n * (k * 8 + d * 4),
            "members' features + rows (<= a partition per setting)": needed * (d * 4 + k * 8),
            "proposal tables of every setting (shared memory)": s * ctx.n * 16,
            "forward batch": FORWARD_SLOTS * (MAX_PADDED + d + 6 * hidden) * 4,
        }), n, seconds, how)
    deoverlap = PlanStage(
        "link (de-overlap)", "per setting a task spreads proposal ids, scores and keep "
        "probabilities over the samples; per partition each sample takes its best "
        "proposal", "deoverlap_task", ctx.partitions,
        Estimate(ctx.worker_baseline, {
            "per-sample proposals of every setting (shared memory)": s * ctx.n * BY_NODE_BYTES,
            "own rows x settings + choice": n * s * (BY_NODE_BYTES + 8),
            "edges": n * LINK_BYTES_PER_EDGE // 4,
        }), n, *ctx.timed(rate_key(method, "link")))
    return [proposals, score, deoverlap]
