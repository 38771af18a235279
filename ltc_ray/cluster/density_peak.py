"""``density-peak``: link each node to its nearest denser neighbour (GCN-V style linking
with an unsupervised density in place of the learned confidence)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltc_ray.cluster.base import (
    ClusterMethod,
    LinkResult,
    PartitionInput,
    Shape,
    Tunable,
    first_true,
    higher_ranked,
    neighbor_density,
    register,
)
from ltc_ray.params import AUTO, COSINE, NEIGHBOURS, Auto, Range, param


def link_to_nearest_higher(
    part: PartitionInput, scores: np.ndarray, tau: float
) -> LinkResult:
    """Parent = the most similar neighbour that outranks the node (score, then smaller id);
    the edge is kept only when its similarity is strictly above ``tau``.

    Shared by every confidence-based method (density-peak here, GCN-V later).
    """
    ids = part.knn_ids[:, 1:].astype(np.int64)
    sims = part.knn_sims[:, 1:]
    node_ids = part.node_ids
    valid = (ids >= 0) & (ids != node_ids[:, None])
    safe = np.where(valid, ids, 0)
    outranks = higher_ranked(node_ids, scores[node_ids], ids, scores[safe]) & valid
    col, has = first_true(outranks)
    rows = np.arange(len(ids))
    linked = has & (sims[rows, col] > tau)
    parent = np.where(linked, ids[rows, col], -1)
    keep = parent >= 0
    return LinkResult(parent=parent, src=node_ids[keep], dst=parent[keep])


@dataclass
class DensityPeakParams:
    """Score = mean similarity to the first ``neighbors`` neighbours (self excluded; capped
    at k - 1); link each node to its nearest neighbour of strictly higher score when
    sim > tau."""

    neighbors: int = param(10, valid=Range(1, NEIGHBOURS))
    # auto: from this graph's similarities (graph/similarity_stats.py; fit: domain_shift.py)
    tau: float | str = param(AUTO, valid=COSINE, auto=Auto(0.86, "far:0.5", "r1:0.5"))


@register
class DensityPeak(ClusterMethod):
    name = "density-peak"
    Params = DensityPeakParams
    shape = Shape(score_params=("neighbors",), tunable=Tunable("tau", 0.30, 0.95, 0.01))

    def score(self, part: PartitionInput) -> np.ndarray:
        return neighbor_density(part.knn_sims, self.params.neighbors)

    def link(self, part: PartitionInput, scores: np.ndarray) -> LinkResult:
        return link_to_nearest_higher(part, scores, self.params.tau)
