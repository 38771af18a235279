"""MS1M-shaped labelled synthetic data in the learn-to-cluster layout (demos, tests, benchmarks)."""

from ltc_ray.synthetic.generator import (
    SHUFFLE_ROWS,
    SyntheticParams,
    base_part_sizes,
    benchmark_sizes,
    identity_samples,
    identity_sizes,
    iter_base_part,
    make_benchmark,
    part_name,
    sample_identity_sizes,
)

__all__ = [
    "SHUFFLE_ROWS",
    "SyntheticParams",
    "base_part_sizes",
    "benchmark_sizes",
    "identity_samples",
    "identity_sizes",
    "iter_base_part",
    "make_benchmark",
    "part_name",
    "sample_identity_sizes",
]
