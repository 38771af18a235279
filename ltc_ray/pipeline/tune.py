"""Pick a method's link threshold on a labelled split (train only, never test labels).

Each candidate value runs the method through the job's own stage executor
(:class:`~ltc_ray.pipeline.executor.Run`), so tuning sees exactly what the job will do
(second graphs, halo linkers and all); the stage store reuses every stage whose keys do
not change with the threshold (the kNN graph, the scores, a second graph), so a trial
re-runs only link + merge + evaluation. A coarse pass over the range is followed by a
fine pass around the best coarse value.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import yaml

from ltc_ray.cluster import get_method
from ltc_ray.config import Config, set_key, shown, validate
from ltc_ray.errors import InputError, storage_errors
from ltc_ray.io.fs import url_to_fs, write_bytes_atomic
from ltc_ray.metrics import metrics_table
from ltc_ray.pipeline.job import JobSpec, evaluate_task, read_labels_task, start_run
from ltc_ray.runtime import ray_get

log = logging.getLogger("ltc_ray")
COARSE_FACTOR = 5
MAX_GRID_VALUES = 1000  # a grid's values (the coarse pass runs a fifth of them, + 9 fine)
MIN_GRID_STEP = 1e-6  # values are rounded to 6 decimals: a smaller step repeats them


def _values(low: float, high: float, step: float) -> list[float]:
    count = int(np.floor((high - low) / step + 1e-9)) + 1
    return [round(low + i * step, 6) for i in range(count)]


def parse_grid(text: str) -> tuple[float, float, float]:
    """``LOW:HIGH:STEP`` as three finite numbers with STEP >= 1e-6 and HIGH >= LOW, and
    at most :data:`MAX_GRID_VALUES` values; anything else is an :class:`InputError`
    naming ``--grid``."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        grid = tuple(float(v) for v in parts)
    except ValueError:
        raise InputError(
            "--grid", f"expected LOW:HIGH:STEP with STEP > 0, got {shown(text)}") from None
    check_grid(grid, shown(text))
    return grid  # type: ignore[return-value]


def check_grid(grid: tuple[float, float, float], text: str | None = None) -> None:
    """Refuse a grid that is not finite, not increasing, too fine or too long."""
    low, high, step = grid
    text = text or f"'{low:g}:{high:g}:{step:g}'"
    if not all(np.isfinite(v) for v in grid):
        raise InputError("--grid", f"LOW, HIGH and STEP must be finite numbers, got {text}")
    if step <= 0 or high < low:
        raise InputError("--grid", f"expected LOW:HIGH:STEP with STEP > 0, got {text}")
    if step < MIN_GRID_STEP:
        raise InputError("--grid", f"STEP must be at least {MIN_GRID_STEP:g} (values are "
                                   f"rounded to 6 decimals), got {step:g}")
    count = (high - low) / step + 1
    if count > MAX_GRID_VALUES:
        raise InputError("--grid", f"has {count:.3g} values, more than the {MAX_GRID_VALUES} "
                                   "allowed; use a larger STEP or a narrower range")


def grid_values(config: Config, key: str, grid: tuple[float, float, float]) -> list[float]:
    """The grid's values, each checked against ``key``'s valid range by applying it to a
    copy of ``config`` (so a tuned config always loads again), before any work starts."""
    check_grid(grid)
    values = _values(*grid)
    probe = copy.deepcopy(config)
    for value in values:
        try:
            set_key(probe, key, repr(float(value)))
            validate(probe)
        except InputError as exc:
            raise InputError("--grid", f"value {value:g} is not a valid {key}: "
                                       f"{exc.problem}") from None
    return values


TUNED_HEADER = "# tuned by jobs/tune.py"  # the first line of every config tune writes


def check_output_config(uri: str, overwrite: bool, storage_options: dict | None = None) -> None:
    """A tuned config replaces only an earlier tuned config (its first line says so), and
    only with ``overwrite``: any other file at ``--output-config`` is the user's."""
    fs, path = url_to_fs(uri, storage_options)
    if fs.isdir(path):
        raise InputError(uri, "is a directory; --output-config names the YAML file to write")
    if not fs.exists(path):
        return
    if fs.cat_file(path, start=0, end=len(TUNED_HEADER)) != TUNED_HEADER.encode():
        raise InputError(uri, "exists and was not written by jobs/tune.py; refusing to replace "
                         "it whatever the flags: choose a new path (--output-config)")
    if not overwrite:
        raise InputError(uri, "already holds a tuned config; pass --overwrite to replace it")


def tune(
    features: str,
    labels: str,
    config: Config,
    output_config: str,
    knn: str | None = None,
    metric: str = "pairwise_f",
    grid: tuple[float, float, float] | None = None,
    work_dir: str = "runs/tune.work",
    num_cpus: int | None = None,
    storage_options: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Grid-search ``config.method``'s tunable threshold (its shape's ``tunable``); write
    the best config as YAML."""
    with storage_errors(output_config):
        check_output_config(output_config, overwrite, storage_options)
    method = get_method(config.method, config, storage_options)  # unknown -> InputError
    tunable = method.shape.tunable
    if tunable is None:
        trained = (" (its model carries the threshold jobs/train.py tuned)"
                   if method.shape.uses_model else "")
        raise InputError("--method", f"'{config.method}' has no threshold to tune{trained}")
    param, low, high, step = tunable.param, tunable.low, tunable.high, tunable.step
    if grid is not None:
        low, high, step = grid
    key = f"methods.{method.name}.{param}"
    grid_values(config, key, (low, high, step))  # every value valid, before Ray starts
    spec = JobSpec(features=features, labels=labels, knn=knn, output=work_dir + "/unused",
                   config=config, work_dir=work_dir, num_cpus=num_cpus,
                   storage_options=storage_options)
    run = start_run(spec)
    labels_ref = read_labels_task.remote(labels, run.info.n_rows, storage_options)
    results: dict[float, dict] = {}

    def trial(value: float) -> dict:
        if value in results:
            return results[value]
        set_key(config, key, repr(float(value)))
        refs = run.cluster(get_method(config.method, config, storage_options))
        results[value] = ray_get(evaluate_task.remote(labels_ref, refs.cluster_id))
        log.info("tune %s=%.4f: %s %.4f (%d clusters)", key, value, metric,
                 results[value][metric], results[value]["n_clusters"])
        return results[value]

    coarse = _values(low, high, step * COARSE_FACTOR)
    for v in coarse:
        trial(v)
    best = max(coarse, key=lambda v: results[v][metric])
    fine = [v for v in _values(best - step * (COARSE_FACTOR - 1), best + step * (COARSE_FACTOR - 1),
                               step) if low - 1e-9 <= v <= high + 1e-9]
    for v in fine:
        trial(v)
    best = max(sorted(results), key=lambda v: results[v][metric])
    set_key(config, key, repr(float(best)))
    tuned = {
        "method": config.method,
        "knn": {"k": config.knn.k},
        "methods": {method.name: {param: float(best)}},
    }
    header = (f"{TUNED_HEADER} on {features} (labels {labels}): "
              f"best {metric} = {results[best][metric]:.4f}\n")
    write_bytes_atomic(output_config, (header + yaml.safe_dump(tuned, sort_keys=False)).encode(),
                       storage_options)
    table = metrics_table({f"{param}={v:g}": results[v] for v in sorted(results)})
    return {"param": param, "best_value": best, "best_score": results[best][metric],
            "results": {v: results[v] for v in sorted(results)}, "table": table}
