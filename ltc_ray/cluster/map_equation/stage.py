"""map-equation's link stage on Ray: partition actors serving the re-scored rows compute
each row's TPDi over its one-hop halo (fetched per chunk of ``chunk_rows`` anchors, so an
actor's memory is bounded whatever the row order) and keep edges by the rule; then the map
equation per connected component (:mod:`ltc_ray.cluster.map_equation_stage`)."""

from __future__ import annotations

import numpy as np
import ray

from ltc_ray.cluster.map_equation import kept_edges
from ltc_ray.cluster.map_equation_stage import map_equation_stage
from ltc_ray.runtime import peak_rss_bytes, wait_all


def _keep_job(actor, fetch, method, tau: float, top: int) -> tuple:
    """On a partition actor: ``((src, dst, overlap), stats)`` of its rows' kept edges."""
    ids = actor.knn_ids.astype(np.int64)
    prob = actor.knn_sims
    n = len(ids)
    chunk = max(1, int(method.params.chunk_rows))
    node_ids = np.arange(actor.start, actor.stop, dtype=np.int64)
    parts, halo = [], 0
    for lo in range(0, n, chunk):
        rows = ids[lo:lo + chunk]
        needed = np.unique(rows[rows >= 0])
        halo += int(np.count_nonzero((needed < actor.start) | (needed >= actor.stop)))
        _, rows_of = fetch(needed, features=False)
        dist = method.row_distances(rows, prob[lo:lo + chunk], rows_of)
        parts.append(kept_edges(node_ids[lo:lo + chunk], rows, dist, tau, top))
    src, dst, w = (np.concatenate(x) for x in zip(*parts, strict=True))
    return (src, dst, w), {"rows": n, "halo": halo, "kept_edges": int(len(src)),
                           "peak_rss": peak_rss_bytes()}


def map_equation_links(method, ctx, tau: float, top: int) -> tuple[list, list, dict]:
    """(parent refs, merge-edge refs, stats) over the re-scored graph ``ctx.graph`` (a
    :class:`~ltc_ray.cluster.base.LinkStageContext`)."""
    actors, bounds = ctx.tools.start_actors(None, ctx.graph, ctx.ranges, ctx.cpus)
    method_ref = ray.put(method)
    try:
        pairs = [a.run.options(num_returns=2).remote(_keep_job, actors, bounds, i, method_ref,
                                                     tau, top)
                 for i, a in enumerate(actors)]
        stats = wait_all([p[1] for p in pairs], f"link ({method.name})", "partition")
        edges = [p[0] for p in pairs]
        ray.wait(edges, num_returns=len(edges))  # the results outlive the actors
    finally:
        for actor in actors:
            ray.kill(actor)
    parents, merge, me_stats = map_equation_stage(ctx.graph.n_rows, edges, ctx.ranges,
                                                  method.budget(), ctx.cpus)
    return parents, merge, {**me_stats, "halo_rows": sum(s["halo"] for s in stats),
                            "kept_edges": sum(s["kept_edges"] for s in stats),
                            "actor_peak_rss_bytes": [s["peak_rss"] for s in stats]}
