"""The kNN graph artifact and graph helpers shared by methods."""

from ltc_ray.graph.knn_graph import (
    KnnManifest,
    block_file,
    export_ltc_npz,
    load_manifest,
    read_knn_rows,
    save_manifest,
)

__all__ = [
    "KnnManifest",
    "block_file",
    "export_ltc_npz",
    "load_manifest",
    "read_knn_rows",
    "save_manifest",
]
