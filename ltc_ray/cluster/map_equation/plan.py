"""map-equation's memory model in a dry-run plan: hard-clusters' edge actors (the
re-scoring stage), the TPDi link actors keeping edges, then the map equation's tasks
(:mod:`ltc_ray.cluster.map_equation_stage`)."""

from __future__ import annotations

from typing import Any

from ltc_ray.cluster.hard_clusters.algorithm import TPDI_BLOCK
from ltc_ray.cluster.hard_clusters.plan import edge_actor_stage
from ltc_ray.plan_model import Estimate, PlanContext, PlanStage


def link_actor_memory(n_part: int, halo: int, k: int, top: int, chunk: int,
                      base: int) -> Estimate:
    """RSS of one map-equation link actor owning ``n_part`` re-scored rows:

    - its rows (int32 ids + float32 p as read, int64 ids) n·k·16;
    - per chunk of ``chunk`` anchors, the rows of their neighbours, fetched and looked up,
      3·min(chunk·k, n+h)·k·8, their TPDi (float64) chunk·k·8 and a TPDi block of
      ``TPDI_BLOCK`` anchors' k × k lookups at ≈ 100 B per entry;
    - the kept edges (int64 src/dst + float64 overlap) n·top·24, twice while concatenated,
      and the rows it serves to the other actors (its own, already counted)."""
    return Estimate(base, {
        "re-scored rows": n_part * k * 16,
        "one chunk: neighbours' rows (fetched, looked up)": 3 * min(chunk * k, n_part + halo)
        * k * 8,
        "one chunk: TPDi": min(chunk, n_part) * k * 8 + TPDI_BLOCK * k * k * 100,
        "kept edges": 2 * n_part * top * 24,
    })


def plan_stages(method: Any, ctx: PlanContext) -> list[PlanStage]:
    """hard-clusters' edge actors, link actors (TPDi + the keep rule), then the map
    equation, sized for ``max_neighbours`` kept edges per row (an upper bound: tau keeps
    fewer)."""
    from ltc_ray.cluster.map_equation_stage import plan_stages as plan_map_equation  # (Ray)

    n_part = ctx.rows_per_partition
    _, top = method.keep_rule()
    top = min(top, ctx.k - 1)
    link = PlanStage("link: TPDi + keep rule", "link actors, one per partition, serving "
                     "the neighbours' re-scored rows; TPDi per chunk of anchors, edges with "
                     f"TPDi < tau among each row's first {top} kept", "link_actor",
                     ctx.partitions, link_actor_memory(n_part, ctx.halo_rows, ctx.k, top,
                                                       method.params.chunk_rows,
                                                       ctx.worker_baseline), n_part)
    return [edge_actor_stage(method, ctx),
            *plan_map_equation(ctx, method.budget(), ctx.n * top, f"at most {top} per row, "
                               f"N·{top}", "TPDi < tau", edge_stage=link)]
