"""Clustering methods (one protocol, a registry) and the global merge.

Every built-in method is one module or subpackage here, registered by the import below
(adding a method: one new module plus one line in this import; see README "Adding a
method")."""

from ltc_ray.cluster import (  # noqa: F401  (register the methods)
    aro,
    baselines,
    density_peak,
    gcn_ds,
    gcn_v,
    gcn_ve,
    hard_clusters,
    knn_cc,
    lgcn,
    map_equation,
    pse_gcn,
)
from ltc_ray.cluster.base import (
    REGISTRY,
    ClusterMethod,
    HaloPartition,
    LinkHaloPartition,
    LinkResult,
    LinkStageContext,
    LinkStageOutput,
    PartitionInput,
    RescoreContext,
    RescoreOutput,
    ScoreOutput,
    Shape,
    StageOutput,
    Tunable,
    get_method,
    method_class,
    method_names,
    register,
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
    "HaloPartition",
    "LinkHaloPartition",
    "LinkResult",
    "LinkStageContext",
    "LinkStageOutput",
    "PartitionInput",
    "RescoreContext",
    "RescoreOutput",
    "ScoreOutput",
    "Shape",
    "StageOutput",
    "Tunable",
    "dense_cluster_ids",
    "get_method",
    "merge_edges",
    "method_class",
    "method_names",
    "register",
    "representatives",
    "spanning_forest",
]
