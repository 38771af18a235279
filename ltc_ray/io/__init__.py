"""Data layer: features, labels and kNN files on any fsspec URI, read by range.

Nothing here knows about Ray; workers call these functions on their own row ranges.
"""

from ltc_ray.io.features import (
    DEFAULT_BIN_DIM,
    FEATURE_FORMATS,
    FeatureInfo,
    check_unique_ids,
    feature_format,
    inspect_features,
    read_features,
    read_ids,
    scan_features,
    validate_rows,
)
from ltc_ray.io.fs import (
    file_size,
    is_local_fs,
    join_uri,
    open_uri,
    read_bytes_range,
    require_file,
    uri_exists,
    url_to_fs,
    write_bytes_atomic,
)
from ltc_ray.io.knn_files import (
    id_dtype_for,
    inspect_ltc_knn,
    iter_ltc_knn,
    load_knn_block,
    save_knn_block,
    validate_knn,
    write_ltc_knn,
)
from ltc_ray.io.labels import read_labels, write_labels
from ltc_ray.io.layout import BENCHMARK_PARTS, PartPaths, knn_path, part_name, part_paths

__all__ = [
    "BENCHMARK_PARTS",
    "DEFAULT_BIN_DIM",
    "FEATURE_FORMATS",
    "FeatureInfo",
    "PartPaths",
    "check_unique_ids",
    "feature_format",
    "file_size",
    "id_dtype_for",
    "inspect_features",
    "inspect_ltc_knn",
    "is_local_fs",
    "iter_ltc_knn",
    "join_uri",
    "knn_path",
    "load_knn_block",
    "open_uri",
    "part_name",
    "part_paths",
    "read_bytes_range",
    "read_features",
    "read_ids",
    "read_labels",
    "require_file",
    "save_knn_block",
    "scan_features",
    "uri_exists",
    "url_to_fs",
    "validate_knn",
    "validate_rows",
    "write_bytes_atomic",
    "write_labels",
    "write_ltc_knn",
]
