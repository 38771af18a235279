"""The learn-to-cluster data layout, so existing MS1M data directories work unchanged.

``<root>/features/<name>.bin``, ``<root>/labels/<name>.meta`` and
``<root>/knns/<name>/faiss_k_80.npz``, where ``<name>`` is ``part0_train`` or
``partN_test``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ltc_ray.errors import InputError
from ltc_ray.io.fs import join_uri

__all__ = ["BENCHMARK_PARTS", "PartPaths", "knn_path", "part_name", "part_paths"]

BENCHMARK_PARTS = (0, 1, 3, 5, 7, 9)


@dataclass(frozen=True)
class PartPaths:
    """URIs of one benchmark part's features, labels and precomputed kNN."""

    features: str
    labels: str
    knn: str


def part_name(part: int | str) -> str:
    """``"part0_train"`` for part 0, ``"partN_test"`` for the test parts 1, 3, 5, 7, 9."""
    if isinstance(part, str) and part.strip().isdigit():
        part = int(part)
    if isinstance(part, bool) or part not in BENCHMARK_PARTS:
        choices = ", ".join(map(str, BENCHMARK_PARTS))
        raise InputError("--part", f"no such benchmark part {part}; choose one of {choices}")
    return "part0_train" if part == 0 else f"part{part}_test"


def knn_path(data_root: str, name: str, k: int = 80, method: str = "faiss") -> str:
    """``<root>/knns/<name>/<method>_k_<k>.npz`` as written by learn-to-cluster."""
    return join_uri(data_root, "knns", name, f"{method}_k_{k}.npz")


def part_paths(data_root: str, part: int | str) -> PartPaths:
    """Paths of benchmark ``part`` under ``data_root`` (local path or any fsspec URI)."""
    name = part_name(part)
    return PartPaths(
        features=join_uri(data_root, "features", f"{name}.bin"),
        labels=join_uri(data_root, "labels", f"{name}.meta"),
        knn=knn_path(data_root, name),
    )
