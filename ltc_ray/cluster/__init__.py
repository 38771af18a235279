"""Clustering methods (one protocol, a registry) and the global merge."""

from ltc_ray.cluster import (  # noqa: F401  (register the methods)
    baselines,
    density_peak,
    gcn_v,
    gcn_ve,
    hard_clusters,
    knn_cc,
)
from ltc_ray.cluster.base import (
    REGISTRY,
    ClusterMethod,
    LinkResult,
    PartitionInput,
    get_method,
    method_names,
)
from ltc_ray.cluster.components import (
    dense_cluster_ids,
    merge_edges,
    representatives,
    spanning_forest,
)

__all__ = [
    "REGISTRY",
    "ClusterMethod",
    "LinkResult",
    "PartitionInput",
    "dense_cluster_ids",
    "get_method",
    "merge_edges",
    "method_names",
    "representatives",
    "spanning_forest",
]
