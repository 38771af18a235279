"""The training job: kNN on a labelled split, then the method's own trainer
(``ClusterMethod.trainer``: e.g. :mod:`ltc_ray.cluster.gcn_v.train`) in Ray workers, then
the trained model evaluated on the split by the job's own stages (the executor).

The workers (not the driver) hold the split's features and graph. Each trainer picks its
linking thresholds on the same training split, so the model directory carries every
threshold it needs and test labels are never looked at.
"""

from __future__ import annotations

import copy
import logging

from ltc_ray.cluster import REGISTRY, get_method, method_class
from ltc_ray.cluster.training import TrainContext
from ltc_ray.config import Config
from ltc_ray.errors import InputError, storage_errors
from ltc_ray.io.fs import join_uri, url_to_fs
from ltc_ray.io.lock import sole_writer
from ltc_ray.io.output import check_output_disjoint
from ltc_ray.models.store import MODEL_JSON, WEIGHTS, add_model_meta, check_model_location
from ltc_ray.pipeline.executor import Run
from ltc_ray.pipeline.job import JobSpec, evaluate_task, read_labels_task, start_run
from ltc_ray.pipeline.knn_stage import build_knn_graph
from ltc_ray.runtime import new_run_id, ray_get

log = logging.getLogger("ltc_ray")


def evaluate_model(run: Run, method: str, model: str, labels: str) -> dict:
    """The trained model at ``model`` run by the job's own stages (the executor) on the
    split ``run`` holds, scored against its labels: exactly what ``cluster`` would give
    there (in-sample)."""
    fs, path = url_to_fs(model, run.so)
    fs.invalidate_cache(path)  # workers wrote the model: the driver's listings are stale
    config = copy.deepcopy(run.config)
    config.method = method
    config.methods.of(method).model = model
    refs = run.cluster(get_method(method, config, run.so))
    labels_ref = read_labels_task.remote(labels, run.info.n_rows, run.so)
    metrics = ray_get(evaluate_task.remote(labels_ref, refs.cluster_id))
    log.info("%s run by the job's stages on its training split: pairwise F %.4f, BCubed F "
             "%.4f, %d clusters", method, metrics["pairwise_f"], metrics["bcubed_f"],
             metrics["n_clusters"])
    return metrics


def trainable_methods() -> list[str]:
    """The registered methods with a trainer."""
    return sorted(name for name, cls in REGISTRY.items() if cls.trainer is not None)


def train(
    method: str,
    features: str,
    labels: str,
    output: str,
    config: Config,
    options: dict | None = None,
    knn: str | None = None,
    work_dir: str | None = None,
    overwrite: bool = False,
    num_cpus: int | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Train ``method`` on a labelled split and write the model directory to ``output``;
    ``options`` are the train job's flags (epochs, lr, batch_rows, hidden, tune_folds,
    edge_epochs, rho: None = the method's default), turned into the method's training
    config (and refused, naming the flag) by its trainer before any work."""
    cls = method_class(method) if method in REGISTRY else None
    if cls is None or cls.trainer is None:
        raise InputError("--method", f"cannot train '{method}'; trainable: "
                         f"{', '.join(trainable_methods())}")
    train_config = cls.trainer.train_config(dict(options or {}), config.seed)
    spec = JobSpec(features=features, labels=labels, knn=knn, output=output, config=config,
                   work_dir=work_dir or output.rstrip("/") + ".work", num_cpus=num_cpus,
                   storage_options=storage_options)
    with storage_errors(output):
        check_output_disjoint(output, {
            "feature file": features, "label file": labels, "kNN file": knn,
            "work directory (--work-dir)": spec.resolved_work_dir}, storage_options)
        check_model_location(output, overwrite, storage_options)
    with sole_writer(output, new_run_id(), storage_options,
                     lambda: check_model_location(output, overwrite, storage_options)
                     ) as (lock, old_files):  # fmt: skip
        run = start_run(spec)
        resources, seed = run.resources, config.seed

        def build_graph(info, knn_config, directory):
            return build_knn_graph(info, knn_config, directory, resources, seed)[0]

        ctx = TrainContext(info=run.info, graph=run.graph, labels=labels, output=output,
                           config=config, train_config=train_config,
                           cpus=max(1, int(resources.get("CPU", 1))),
                           work_dir=spec.resolved_work_dir, stages=run.stages,
                           build_graph=build_graph)
        meta = cls.trainer.train(ctx)
        lock.ensure_held()
        with run.stages.stage("evaluate", rows=run.info.n_rows):
            meta["job_train_metrics"] = evaluate_model(run, method, output, labels)
        # the training graph's similarity profile: a run on unlike data warns (issue 15)
        meta["graph_stats"] = run.similarity().summary()
        for sub in cls.model_dirs:  # (listings refreshed by evaluate_model)
            add_model_meta(join_uri(output, sub) if sub else output,
                           {"job_train_metrics": meta["job_train_metrics"],
                            "graph_stats": meta["graph_stats"]}, storage_options)
        meta["stages"] = run.stages.to_dict()
        written = {f"{sub}{name}" for sub in cls.model_dirs for name in (WEIGHTS, MODEL_JSON)}
        for rel in sorted(set(old_files) - written):  # an earlier model's leftovers only
            _, path = url_to_fs(join_uri(output, rel), storage_options)
            url_to_fs(output, storage_options)[0].rm(path)
        return meta
