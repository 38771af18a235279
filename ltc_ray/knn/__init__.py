"""kNN search: pure block functions; Ray scheduling lives in ``ltc_ray.pipeline``."""

from ltc_ray.knn.search import (
    build_index,
    default_nlist,
    exact_knn,
    merge_topk,
    put_self_first,
    recall_at_k,
    rescore,
    search_block,
)

__all__ = [
    "build_index",
    "default_nlist",
    "exact_knn",
    "merge_topk",
    "put_self_first",
    "recall_at_k",
    "rescore",
    "search_block",
]
