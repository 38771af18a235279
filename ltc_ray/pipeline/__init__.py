"""Ray scheduling of the stages (the only package that knows about Ray)."""

from ltc_ray.pipeline.job import JobSpec, run_job

__all__ = ["JobSpec", "run_job"]
