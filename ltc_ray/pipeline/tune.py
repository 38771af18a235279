"""Pick a method's link threshold on a labelled split (train only, never test labels).

The kNN graph and the per-node scores are computed once; each candidate value
re-runs only link + merge + evaluation on Ray. A coarse pass over the range is
followed by a fine pass around the best coarse value.
"""

from __future__ import annotations

import logging

import numpy as np
import yaml

from ltc_ray.cluster import REGISTRY, get_method
from ltc_ray.config import Config, set_key
from ltc_ray.errors import InputError
from ltc_ray.io.fs import open_uri
from ltc_ray.pipeline.cluster_stage import run_cluster_stage
from ltc_ray.pipeline.job import JobSpec, evaluate_task, inputs_and_graph, read_labels_task
from ltc_ray.pipeline.runtime import StageLog, ray_get

log = logging.getLogger("ltc_ray")
COARSE_FACTOR = 5


def _values(low: float, high: float, step: float) -> list[float]:
    count = int(np.floor((high - low) / step + 1e-9)) + 1
    return [round(low + i * step, 6) for i in range(count)]


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
) -> dict:
    """Grid-search ``config.method``'s tunable threshold; write the best config as YAML."""
    cls = REGISTRY.get(config.method)
    get_method(config.method, config, storage_options)  # unknown method -> InputError
    if cls.tunable is None:
        trained = " (jobs/train.py tunes its threshold)" if cls.rescores_graph else ""
        raise InputError("--method", f"'{config.method}' has no threshold to tune{trained}")
    param, low, high, step = cls.tunable
    if grid is not None:
        low, high, step = grid
    spec = JobSpec(features=features, labels=labels, knn=knn, output=work_dir + "/unused",
                   config=config, work_dir=work_dir, num_cpus=num_cpus,
                   storage_options=storage_options)
    info, resources, _, manifest = inputs_and_graph(spec)
    labels_ref = read_labels_task.remote(labels, info.n_rows, storage_options)
    cpus = float(resources.get("CPU", 1))
    key = f"methods.{cls.name}.{param}"
    results: dict[float, dict] = {}
    scores = None

    def trial(value: float) -> dict:
        nonlocal scores
        if value in results:
            return results[value]
        set_key(config, key, repr(float(value)))
        method = get_method(config.method, config, storage_options)
        refs = run_cluster_stage(method, manifest, config.cluster, cpus, storage_options,
                                 StageLog(), scores=scores, info=info)
        scores = refs.scores
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
        "methods": {cls.name: {param: float(best)}},
    }
    header = (f"# tuned by jobs/tune.py on {features} (labels {labels}): "
              f"best {metric} = {results[best][metric]:.4f}\n")
    with open_uri(output_config, "w", storage_options) as fh:
        fh.write(header + yaml.safe_dump(tuned, sort_keys=False))
    from ltc_ray.cli import metrics_table

    table = metrics_table({f"{param}={v:g}": results[v] for v in sorted(results)})
    return {"param": param, "best_value": best, "best_score": results[best][metric],
            "results": {v: results[v] for v in sorted(results)}, "table": table}
