"""``knn-cc``: connected components of the kNN edges with similarity >= threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltc_ray.cluster.base import (
    ClusterMethod,
    LinkResult,
    PartitionInput,
    Shape,
    Tunable,
    nearest_higher_kept,
    neighbor_density,
    register,
)
from ltc_ray.params import AUTO, COSINE, Auto, param

SCORE_NEIGHBORS = 10


@dataclass
class KnnCCParams:
    """Keep kNN edges with similarity >= threshold; clusters = connected components."""

    # auto: from this graph's similarities (graph/similarity_stats.py; fit: domain_shift.py)
    threshold: float | str = param(AUTO, valid=COSINE, auto=Auto(0.91, "far:0.5", "r1:0.5"))


@register
class KnnCC(ClusterMethod):
    """Edges (i, j) of the kNN graph with sim >= ``threshold`` are merged.

    ``score`` is the mean similarity to the first 10 neighbours; ``parent`` is the
    most similar kept neighbour that outranks the node by score (a tree towards
    each cluster's densest members), -1 when there is none.
    """

    name = "knn-cc"
    Params = KnnCCParams
    # the score is a fixed neighbour density
    shape = Shape(score_params=(), tunable=Tunable("threshold", 0.30, 0.95, 0.01))

    def score(self, part: PartitionInput) -> np.ndarray:
        return neighbor_density(part.knn_sims, SCORE_NEIGHBORS)

    def link(self, part: PartitionInput, scores: np.ndarray) -> LinkResult:
        ids = part.knn_ids[:, 1:].astype(np.int64)
        sims = part.knn_sims[:, 1:]
        node_ids = part.node_ids
        kept = (sims >= self.params.threshold) & (ids >= 0) & (ids != node_ids[:, None])
        parent = nearest_higher_kept(node_ids, ids, kept, scores)
        rows, cols = np.nonzero(kept)
        return LinkResult(parent=parent, src=node_ids[rows], dst=ids[rows, cols])
