"""GCN-E's link rule for one partition, shared by the method's link stage
(:mod:`ltc_ray.cluster.gcn_ve`) and its trainer's out-of-fold scoring (:mod:`.train`);
its own module so that the trainer imports it without importing the method."""

from __future__ import annotations

import numpy as np

from ltc_ray.cluster.base import LinkHaloPartition, LinkResult

EDGE_K = 160  # GCN-E's candidate kNN size (learn-to-cluster's setting)


def gcn_e_links(model, part: LinkHaloPartition, scores: np.ndarray, threshold: float,
                tau: float, batch_size: int) -> LinkResult:
    """Parents of the owned nodes by GCN-E (top-rho) or nearest-higher.

    Candidates are the higher-confidence neighbours whose cosine is above ``tau``, so every
    chosen edge is kept; for a node outside the top-rho share this is exactly GCN-V's
    rule (the nearest higher neighbour, kept when its cosine > tau). ``threshold`` is the
    global confidence quantile: nodes at or above it use the model.
    """
    from ltc_ray.models.gcn_e import choose_parents

    node_ids = np.arange(part.start, part.stop, dtype=np.int64)
    ids = part.knn_ids.astype(np.int64)
    conf_nodes = scores[node_ids]
    # a neighbour at or below tau can never be a kept parent: take it out of the candidates
    conf_nbrs = np.where(part.knn_sims > tau, scores[np.where(ids >= 0, ids, 0)], -np.inf)
    use_model = conf_nodes >= threshold
    parent = choose_parents(model, node_ids, conf_nodes, ids, part.knn_sims, conf_nbrs,
                            use_model, part.feats_of, part.rows_of, batch_size=batch_size)
    keep = parent >= 0
    return LinkResult(parent=parent, src=node_ids[keep], dst=parent[keep])
