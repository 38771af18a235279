"""Ray helpers every layer uses: starting or joining Ray, resources, waiting on tasks with
progress, stage bookkeeping, halo fetches from actors, the worker's device."""

from __future__ import annotations

import logging
import os
import re
import resource
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

log = logging.getLogger("ltc_ray")

# Loopback-only local clusters, and one auth mode for `ray start` and the job CLI
# (Ray >= 2.59 enables token auth on local clusters by default).
LOCAL_ENV_DEFAULTS = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def new_run_id() -> str:
    """A run's id: UTC start time plus a random suffix (sortable, unique across drivers);
    names its staging prefix, its output lock and its ``_SUCCESS``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def init_ray(num_cpus: int | None = None) -> dict[str, float]:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else
    start a local Ray; returns the cluster's resources."""
    if not ray.is_initialized():
        for key, value in LOCAL_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if os.environ.get("RAY_ADDRESS"):
            log.info("joining the Ray cluster at RAY_ADDRESS")
            ray.init(log_to_driver=True)
        else:
            log.info("starting a local Ray (no RAY_ADDRESS set)")
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return dict(ray.cluster_resources())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image, in bytes.

    Linux: ``VmHWM`` from /proc/self/status, which starts afresh at exec; ``ru_maxrss``
    keeps the high-water mark of the process that forked it (a large driver or raylet
    would inflate a small worker's figure). Elsewhere ``ru_maxrss`` (KiB on Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


class WorkerTraceback(Exception):
    """Where a Ray task failed, as its worker formatted it (the RayTaskError's text). It is
    the ``__cause__`` of the exception :func:`ray_get` re-raises, so the log of a failed
    job shows the worker's frames, not only the driver's ``ray.get``."""


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The user's own exception inside a Ray task error (so an InputError raised in a
    worker reaches the CLI as a plain InputError with its one-line message)."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, BaseException):
        return unwrap_ray_error(cause)
    return exc


def ray_get(refs: Any) -> Any:
    """``ray.get`` that re-raises the user's own exception type, chained to a
    :class:`WorkerTraceback` holding the worker's traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = unwrap_ray_error(exc)
        if cause is exc:
            raise
        text = _ANSI_COLOUR.sub("", str(exc)).strip()  # Ray colours the task's name
        raise cause from WorkerTraceback(text)


def wait_all(refs: list, desc: str, unit: str = "task", total_rows: int | None = None) -> list:
    """Wait for ``refs`` with a progress bar; results in the order of ``refs``."""
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit=unit, leave=False, disable=None) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray_get(done)  # surface failures as soon as they happen
            bar.update(len(done))
    return ray_get(list(refs))


@dataclass
class StageRecord:
    name: str
    seconds: float = 0.0
    rows: int = 0
    worker_peak_rss_bytes: int = 0
    skipped: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "seconds": round(self.seconds, 3),
            "rows": self.rows,
            "rows_per_s": round(self.rows / self.seconds, 1) if self.seconds > 0 else None,
            "worker_peak_rss_bytes": self.worker_peak_rss_bytes,
        }
        if self.skipped:
            out["skipped"] = True
        out.update(self.extra)
        return out


class StageLog:
    """Logs start/end/wall time of each stage and keeps the numbers for run.json."""

    def __init__(self) -> None:
        self.stages: dict[str, StageRecord] = {}

    @contextmanager
    def stage(self, name: str, rows: int = 0) -> Iterator[StageRecord]:
        record = StageRecord(name=name, rows=rows)
        log.info("stage %s: start", name)
        t0 = time.perf_counter()
        yield record
        record.seconds = time.perf_counter() - t0
        self.stages[name] = record
        log.info("stage %s: done in %.2f s", name, record.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {name: rec.to_dict() for name, rec in self.stages.items()}


def set_torch_threads(threads: int) -> None:
    """Give torch in this worker its share of CPUs (a Ray actor's ``num_cpus``)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the model methods
        return
    torch.set_num_threads(max(1, int(threads)))


def worker_device() -> str:
    """The torch device of this Ray worker: "cuda" only when Ray assigned it a GPU (a
    worker on a GPU machine that asked for none must not take one behind Ray's back)."""
    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"


DELAY_ENV = "LTC_RAY_TEST_STAGE_DELAY"


def delay_for_tests(stage: str) -> None:
    """TEST-ONLY hook: sleep when ``LTC_RAY_TEST_STAGE_DELAY`` names ``stage``.

    The value is ``stage:seconds[,stage:seconds]`` (e.g. ``knn:2.0``); workers of that
    stage sleep that long per unit of work, so a failure test can SIGKILL a worker or the
    driver mid-stage on tiny data. Unset (the default) it does nothing.
    """
    spec = os.environ.get(DELAY_ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, seconds = item.partition(":")
        if name.strip() == stage:
            time.sleep(float(seconds or 0))


def gather_rows(x: np.ndarray, start: int, cols: np.ndarray, actors: list,
                    bounds: np.ndarray, index: int, method: str = "rows") -> np.ndarray:
    """Rows of ``x`` (features, or any per-node array) for global ids ``cols``, in order:
    partition ``index``'s own from ``x`` (its rows from ``start``), the halo's from their
    owners' ``method`` (e.g. ``rows``)."""
    owner = np.searchsorted(bounds, cols, side="right") - 1
    out = np.empty((len(cols), *x.shape[1:]), dtype=x.dtype)
    mine = owner == index
    out[mine] = x[cols[mine] - start]
    wanted = [(p, np.nonzero(owner == p)[0]) for p in np.unique(owner[~mine])]
    fetched = ray.get([getattr(actors[p], method).remote(cols[pos]) for p, pos in wanted])
    for (_, pos), rows in zip(wanted, fetched, strict=True):
        out[pos] = rows
    return out
