"""hard-clusters' memory model in a dry-run plan: its edge actors (the re-scoring stage,
:mod:`.rescore`) and its TPDi link actors (docs/memory.md)."""

from __future__ import annotations

from typing import Any

from ltc_ray.cluster.base import halo_fits
from ltc_ray.cluster.hard_clusters.algorithm import TPDI_BLOCK, halo_chunk_rows
from ltc_ray.plan_model import Estimate, PlanContext, PlanStage

# the edge scorer's peak over its batches / the bytes of one batch's tensors: measured
# 340 MiB above the pre-scoring RSS over 78 batches of 256 anchors (k=80, D=256, d=128,
# FFN 512) against 230 MiB of tensors; torch's freed blocks are not all returned at once
SCORER_SLACK = 1.5
DEFAULT_SCORER = (128, 4, 512)  # (d_model, heads, FFN): the ScorerShape defaults
# per-stage rates measured from jobs' run.json (rates.json "from_jobs")
SCORE_RATE_KEY = "hard_clusters_score_rows_per_cpu_s"
LINK_RATE_KEY = "hard_clusters_link_rows_per_cpu_s"


def edge_actor_memory(
    n_part: int,
    halo: int,
    dim: int,
    k: int,
    base: int,
    scorer: tuple[int, int, int] = DEFAULT_SCORER,
    batch: int = 256,
    density_k: int = 20,
    halo_bytes: int = 1 << 28,
) -> Estimate:
    """RSS of one hard-clusters edge actor (:mod:`.rescore`) owning ``n_part`` rows
    whose neighbours include ``halo`` rows owned elsewhere. The phases' terms are summed
    (an upper bound: not all are alive at once, which covers allocator slack).

    - kNN rows: int32 as read, int64 for the scorer, n·k·12;
    - features: own rows n·D·4, the gathered rows (own + halo) (n+h)·D·4, and the halo
      twice more: as fetched (object-store pages) and as served to the other actors, whose
      halos are this actor's rows (on average as many as it fetches), 2·h·D·4. When the
      halo exceeds ``halo_bytes`` it is fetched per chunk of c rows
      (:func:`~ltc_ray.cluster.hard_clusters.algorithm.halo_chunk_rows`): n·D·4 + 3·c·k·D·4;
    - probabilities n·k·4 and the re-sort (argsort order, ids, keys) n·k·24;
    - one scorer batch: batch·k tokens of (D + 8·d_model + 2·FFN) floats, and the
      attention scores batch·heads·k²·8 (``scorer`` = (d_model, heads, FFN), the
      ``ScorerShape`` defaults), times :data:`SCORER_SLACK` (measured);
    - the NDDE transition edges, its own and those pulled into its range: 2·n·m·24.
    """
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
                      block: int = TPDI_BLOCK, halo_bytes: int | None = 1 << 28) -> Estimate:
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


def edge_actor_stage(method: Any, ctx: PlanContext) -> PlanStage:
    """The re-scoring stage's edge actors (the scorer's width from the loaded model, else
    the ``ScorerShape`` defaults); hard-clusters' rate (map-equation runs the same stage)."""
    p = method.params
    shape = getattr(method, "scorer_shape", None)
    scorer = (shape.d_model, shape.heads, shape.ffn) if shape is not None else DEFAULT_SCORER
    n_part, halo = ctx.rows_per_partition, ctx.halo_rows
    score_s, score_how = ctx.timed(SCORE_RATE_KEY)
    return PlanStage("score (edge scorer + NDDE)", "edge actors, one per partition: edge "
                     "scorer over the halo's features, NDDE density, a re-sorted graph",
                     "edge_actor", ctx.partitions,
                     edge_actor_memory(n_part, halo, ctx.dim, ctx.k, ctx.worker_baseline,
                                       scorer, p.batch_size, p.density_k, p.halo_bytes),
                     n_part, score_s, score_how)


def plan_stages(method: Any, ctx: PlanContext) -> list[PlanStage]:
    """The re-scoring stage's edge actors and the TPDi link actors."""
    p = method.params
    n_part, halo = ctx.rows_per_partition, ctx.halo_rows
    base = ctx.worker_baseline
    link_s, link_how = ctx.timed(LINK_RATE_KEY)
    return [
        edge_actor_stage(method, ctx),
        PlanStage("link (TPDi)", "link actors, one per partition, serving the neighbours' "
                  "re-scored rows", "link_actor", ctx.partitions,
                  link_actor_memory(n_part, halo, ctx.n, ctx.k, base,
                                    halo_bytes=p.halo_bytes),
                  n_part, link_s, link_how),
    ]
