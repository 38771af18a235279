"""Shared fixtures: a real local Ray (2 CPUs, loopback only) and small data made here."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

# Loopback-only local Ray, token auth off for tests (the job CLI must agree).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The MS1M-shaped benchmark at a small scale: part0_train and part1_test (~10K each)."""
    from ltc_ray.synthetic import make_benchmark

    root = tmp_path_factory.mktemp("synthetic")
    make_benchmark(str(root), parts=(0, 1), scale=0.017, seed=0, progress=False)
    return root


def require(module: str, extra: str = "dev"):
    """``module`` imported for a test. Without it the test skips with the extra to install,
    except in CI (``CI`` set, as CI services do): there a missing dev dependency fails the
    run, so the tests it carries cannot silently drop out."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        reason = f"{module} is not installed ({exc}); install it with pip install -e '.[{extra}]'"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI is set and {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
