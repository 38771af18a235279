"""PSE-GCN's memory model in a dry-run plan (docs/memory.md): the re-ranking and
embedding phases on partition actors (:mod:`.stage`) and the link actors on the
embeddings' kNN graph.

The reference builds three dense 801 x 801 float32 tensors and 801 x 256 features per node
(about 8.5 MB per node, 44 TB at 5.21M) and keeps one row of the result; here a node's
subgraph is one padded slot of a forward batch (``S_max`` nodes: S² adjacency + S·D
features + the activations of ``hidden`` width), and a chunk of centres' neighbourhood is
fetched at once."""

from __future__ import annotations

from typing import Any

from ltc_ray.plan_model import Estimate, PlanContext, PlanStage, halo_link_stage, rate_key

# a re-ranked candidate pair in flight (phase 3): int64 ids of both ends, the float64
# Jaccard and the sort keys; the R* sets kept per row (int64 members) at this mean size
PAIR_BYTES = 8 + 8 + 8 + 16
RSTAR_MEAN = 160  # members of R*(i) assumed per row (k1 = 80: measured 60-120 on MS1M-shaped data)


def subgraph_bytes(method: Any, dim: int) -> int:
    """Bytes of one padded subgraph in a forward batch: adjacency, local adjacency and mask
    S², features S·D and about 12 activations of width ``hidden`` (float32), where
    S = 1 + hop1 + hop1·hop2 (the reference's design: ~8.5 MB per node at S = 801)."""
    hop1, hop2, _ = method.subgraph_shape()
    s = 1 + hop1 + hop1 * hop2
    hidden, out = _widths(method)
    return int(4 * (3 * s * s + s * dim + 12 * s * hidden) + 4 * out)


def _widths(method: Any) -> tuple[int, int]:
    net = getattr(method, "net", None)
    dims = getattr(getattr(net, "build", None), "args", (None, (128, 512)))[1]
    return int(dims[0]), int(dims[1])


def plan_stages(method: Any, ctx: PlanContext) -> list[PlanStage]:
    hop1, hop2, _ = method.subgraph_shape()
    rr = method.rerank_shape()
    n, k, d = ctx.rows_per_partition, ctx.k, ctx.dim
    chunk = min(n, method.params.chunk_rows)
    s = 1 + hop1 + hop1 * hop2
    _, out = _widths(method)
    candidates = rr["k1"] * (1 + rr["expand"])
    reach = min(ctx.n, chunk * s)  # one chunk's subgraph nodes, at most
    score = PlanStage(
        "score (PSE-GCN: re-rank + DGC embeddings on partition actors)",
        "an actor per partition: reciprocal sets, expanded sets and Jaccard re-ranking "
        "over the two-hop halo, then every node's subgraph embedded chunk by chunk",
        "score_actor", ctx.partitions,
        Estimate(ctx.worker_baseline, {
            "own kNN rows + features": n * (k * 8 + d * 4),
            "kept: R* sets + re-ranked rows": n * (RSTAR_MEAN * 8 + rr["top"] * 12),
            "one chunk's one-hop rows (re-ranking)": min(ctx.n, chunk * k) * k * 8,
            "one chunk's candidate pairs + their R* sets":
                chunk * candidates * PAIR_BYTES + min(ctx.n, chunk * candidates)
                * RSTAR_MEAN * 8,
            "one chunk's subgraph nodes (features + rows)": reach * (d * 4 + k * 8),
            "forward batch (padded subgraphs)":
                method.params.batch_size * subgraph_bytes(method, d),
            "embeddings": n * out * 4,
        }), n, *ctx.timed(rate_key(method, "score")))
    link = halo_link_stage(ctx, key=rate_key(method, "link"),
                           name="link (confidence peaks on the embeddings' kNN graph)")
    return [score, link]
