"""``ltc-ray cluster`` (jobs/cluster.py): cluster embeddings on Ray, or ``--dry-run``: print
the plan for this cluster and input without computing anything."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ltc_ray.cli.args import (
    EXIT_OK,
    _add_input_args,
    _add_run_args,
    _config,
    _Parser,
    _resolve_inputs,
    _resources,
    _storage_options,
)
from ltc_ray.errors import InputError, storage_errors
from ltc_ray.io.features import DEFAULT_BIN_DIM, feature_format, inspect_features
from ltc_ray.metrics.report import metrics_table
from ltc_ray.report.html import write_report


def cluster_parser() -> argparse.ArgumentParser:
    """``cluster``'s flags: input, run, output, method/model and ``--dry-run`` planning."""
    p = _Parser(
        prog="cluster",
        description="Cluster embeddings on Ray: kNN -> per-node links -> global merge -> "
        "Parquet. Joins the cluster in RAY_ADDRESS (ray job submit) or starts a local Ray.",
    )
    _add_input_args(p, "labels (.meta) to score the result; --part finds them itself")
    _add_run_args(p, "<output>.work")
    p.add_argument("--output", help="output URI (default: runs/<input>-<method>)")
    p.add_argument("--method", help="clustering method (default: the --model's method, e.g. "
                   "hard-clusters; without a model, the config's: aro, every parameter "
                   "derived from the data)")
    p.add_argument("--model", help="model directory for learned methods (jobs/train.py output; "
                   "its method is used unless --method says otherwise)")
    p.add_argument("--overwrite", action="store_true", help="replace a completed output")
    p.add_argument("--report", action="store_true", help="at the end, write the run's "
                   "overview as one static HTML file, <output>/report.html (ltc-ray report)")
    plan = p.add_argument_group("planning (--dry-run: print the plan, compute and write nothing)")
    plan.add_argument("--dry-run", action="store_true",
                      help="print input size, kNN layout, partitions, per-worker memory and "
                      "expected stage times for this cluster, then exit")
    plan.add_argument("--resources", metavar="JSON",
                      help='plan for a hypothetical cluster, e.g. \'{"CPU": 64, "GPU": 8, '
                      '"gpu_free_bytes": 80e9}\' (default: the cluster\'s own, read from Ray, '
                      "with one GPU worker's free memory measured)")
    plan.add_argument("--rows", type=int,
                      help="plan a hypothetical corpus of this many rows (with --dim; no input)")
    return p



def cluster_dry_run(args: argparse.Namespace) -> int:
    """``--dry-run``: the plan from file headers (or ``--rows``/``--dim``) and the cluster's
    resources; Ray is started only to read those, and nothing is written anywhere."""
    from ltc_ray.pipeline.plan import format_plan, make_plan  # after --help: faiss, Ray

    cfg = _config(args)
    resources = _resources(args.resources)
    if args.rows is not None:
        if args.rows < 2:
            raise InputError("--rows", f"must be at least 2, got {args.rows}")
        if args.part is not None or args.features:
            raise InputError("--rows", "plans a hypothetical corpus: drop --part/--features")
        n, dim, source, hypothetical = args.rows, cfg.dim, "hypothetical corpus (--rows)", True
    else:
        features, _, _, _ = _resolve_inputs(args)
        so = _storage_options(args.storage_options)
        with storage_errors(features):
            fmt = feature_format(features)
            dim = cfg.dim if fmt == "bin" or cfg.dim != DEFAULT_BIN_DIM else None
            info = inspect_features(features, dim, so)  # headers only
        n, dim, source, hypothetical = info.n_rows, info.dim, features, False
    if resources is None:
        import ray

        from ltc_ray.pipeline.knn_stage import measure_gpu_free_bytes
        from ltc_ray.runtime import init_ray

        started = not ray.is_initialized()
        resources = dict(init_ray(args.num_cpus))
        if resources.get("GPU") and cfg.knn.gpu == "auto":  # the layout's GPU budget
            resources["gpu_free_bytes"] = measure_gpu_free_bytes(resources) or 0.0
        if started:
            ray.shutdown()
    print(format_plan(make_plan(n, dim, cfg, resources, source=source,
                                hypothetical=hypothetical)))
    return EXIT_OK


def cluster_main(argv: Sequence[str]) -> int:
    """``cluster``: the cheap checks, then the job on Ray; prints the result's summary."""
    args = cluster_parser().parse_args(argv)
    if args.dry_run:
        if args.report:
            raise InputError("--report", "writes a finished run's report; --dry-run runs "
                             "nothing")
        return cluster_dry_run(args)
    for flag, value in (("--resources", args.resources), ("--rows", args.rows)):
        if value is not None:
            raise InputError(flag, "only applies with --dry-run")
    features, labels, knn, name = _resolve_inputs(args)
    cfg = _config(args)
    from ltc_ray.pipeline import JobSpec, run_job  # after the cheap checks: imports Ray

    output = args.output or f"runs/{name}-{cfg.method}"
    if args.part is not None and not args.knn and cfg.knn.k != 80:  # the part's own file
        knn = knn.replace("faiss_k_80.npz", f"faiss_k_{cfg.knn.k}.npz")
    spec = JobSpec(
        features=features, labels=labels, knn=knn, output=output, config=cfg,
        work_dir=args.work_dir, overwrite=args.overwrite, num_cpus=args.num_cpus,
        storage_options=_storage_options(args.storage_options), name=name,
    )
    record = run_job(spec)
    _print_result(record, output)
    if args.report:  # after the commit: the report reads the result as any reader does
        print(f"report: {write_report(output, spec.storage_options)}")
    return EXIT_OK


def _print_result(record: dict, output: str) -> None:
    lines = [f"{record['method']} on {record['name']}: {record['n_samples']} samples -> "
             f"{record['n_clusters']} clusters in {record['wall_seconds']:.1f} s"]
    metrics = record.get("metrics")
    if metrics:
        lines.append(metrics_table({record["method"]: metrics}))
    lines.append(f"output: {output}/clusters/*.parquet (+ cluster_summary.parquet, run.json)")
    print("\n".join(lines))

