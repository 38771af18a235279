"""The ``ltc-ray`` command line: one verb per script in ``jobs/``.

Exit codes: 0 success, 2 bad arguments or bad input (one line on stderr naming the
file or flag and the problem), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from ltc_ray.errors import InputError, WorkFileError, brief, storage_errors
from ltc_ray.redact import RedactingFormatter, redact, register_storage_options

log = logging.getLogger("ltc_ray")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises InputError instead of exiting, so all bad input maps to 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if len(message) > 200:  # argparse echoes values whole: never print unbounded input
            message = message[:199] + "…"
        raise InputError(self.prog, message)


def _storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InputError("--storage-options", "is not valid JSON") from None
    if not isinstance(value, dict):
        raise InputError("--storage-options", "must be a JSON object")
    register_storage_options(value)  # its secrets are masked in every message and log line
    return value


def _add_input_args(p: argparse.ArgumentParser, labels_help: str) -> None:
    src = p.add_argument_group("input (either --part or --features)")
    src.add_argument("--part", type=int, help="MS1M benchmark part: 0 (train), 1, 3, 5, 7 or 9")
    src.add_argument("--data-root", default="data",
                     help="root of the learn-to-cluster layout used by --part (default: data)")
    src.add_argument("--features", help="feature file URI: .bin, .npy or .parquet")
    src.add_argument("--labels", help=labels_help)
    src.add_argument("--dim", type=int, help="feature dimension of a .bin file (default 256)")
    src.add_argument("--storage-options", metavar="JSON",
                     help="fsspec storage options as JSON (endpoint, region, ...)")


def _add_run_args(p: argparse.ArgumentParser, work_dir_default: str) -> None:
    """Flags every job over a split shares: kNN reuse, config, overrides, work area, CPUs."""
    p.add_argument("--knn", help="precomputed learn-to-cluster faiss_k_<k>.npz to reuse "
                   "(with --part, default: the part's knns/<part>/faiss_k_<k>.npz if present)")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set knn.k=40 (repeatable)")
    p.add_argument("--work-dir", help=f"work area for the kNN graph (default: {work_dir_default})")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")


def _resolve_inputs(args: argparse.Namespace) -> tuple[str, str | None, str | None, str]:
    """(features, labels, precomputed knn, name) from --part or --features."""
    from ltc_ray.io.fs import uri_exists
    from ltc_ray.io.layout import part_name, part_paths

    so = _storage_options(args.storage_options)
    if args.part is not None and args.features:
        raise InputError("--part", "give either --part or --features, not both")
    if args.part is None and not args.features:
        raise InputError("--features", "an input is required: --part N or --features URI")
    knn = getattr(args, "knn", None)
    if knn:  # a file named on the command line must exist (--part's own is optional)
        with storage_errors(knn):
            if not uri_exists(knn, so):
                raise InputError(knn, "kNN file not found (--knn)")
    if args.part is not None:
        name = part_name(args.part)
        paths = part_paths(args.data_root, args.part)
        labels = args.labels
        if labels is None:
            with storage_errors(paths.labels):
                if uri_exists(paths.labels, so):
                    labels = paths.labels
        return paths.features, labels, knn or paths.knn, name  # --knn wins over the part's
    name = args.features.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return args.features, args.labels, knn, name


def _config(args: argparse.Namespace):
    """The job's Config: defaults, --config, --set, then the flags that are config keys
    (--dim, --method, --model), validated. --method and --model are taken verbatim (not
    parsed as YAML: a model path holding '#' or '~' stays that path)."""
    from ltc_ray.config import Config, check_flag, check_method_name, load_config, validate

    overrides = list(args.set or [])
    for flag, value in (("--dim", args.dim), ("--num-cpus", getattr(args, "num_cpus", None))):
        if value is not None and value <= 0:
            raise InputError(flag, f"must be a positive integer, got {value}")
        check_flag(flag, value)
    if args.dim is not None:
        overrides.append(f"dim={args.dim}")
    method, model = getattr(args, "method", None), getattr(args, "model", None)
    if method:
        check_method_name("--method", method)
    cfg = load_config(args.config, overrides)
    if method:
        cfg.method = method
    if model:  # whichever learned method runs reads its own key
        for params in (cfg.methods.gcn_v, cfg.methods.gcn_ve, cfg.methods.hard_clusters):
            params.model = model
    validate(cfg)
    if model and not method and cfg.method == Config().method:
        # --model without --method (nor a method in --config/--set): the model's own method
        from ltc_ray.models.store import model_method

        cfg.method = model_method(model, _storage_options(args.storage_options))
    return cfg


# ---------------------------------------------------------------- cluster
def cluster_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cluster",
        description="Cluster embeddings on Ray: kNN -> per-node links -> global merge -> "
        "Parquet. Joins the cluster in RAY_ADDRESS (ray job submit) or starts a local Ray.",
    )
    _add_input_args(p, "labels (.meta) to score the result; --part finds them itself")
    _add_run_args(p, "<output>.work")
    p.add_argument("--output", help="output URI (default: runs/<input>-<method>)")
    p.add_argument("--method", help="clustering method (default: the --model's method, e.g. "
                   "hard-clusters; without a model, the config's: density-peak)")
    p.add_argument("--model", help="model directory for learned methods (jobs/train.py output; "
                   "its method is used unless --method says otherwise)")
    p.add_argument("--overwrite", action="store_true", help="replace a completed output")
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


def _resources(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InputError("--resources", "is not valid JSON") from None
    if not isinstance(value, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
        for v in value.values()
    ):
        raise InputError("--resources", 'must be a JSON object of counts, e.g. {"CPU": 64}')
    return {str(k): float(v) for k, v in value.items()}


def cluster_dry_run(args: argparse.Namespace) -> int:
    """``--dry-run``: the plan from file headers (or ``--rows``/``--dim``) and the cluster's
    resources; Ray is started only to read those, and nothing is written anywhere."""
    from ltc_ray.pipeline.plan import format_plan, make_plan

    cfg = _config(args)
    resources = _resources(args.resources)
    if args.rows is not None:
        if args.rows < 2:
            raise InputError("--rows", f"must be at least 2, got {args.rows}")
        if args.part is not None or args.features:
            raise InputError("--rows", "plans a hypothetical corpus: drop --part/--features")
        n, dim, source, hypothetical = args.rows, cfg.dim, "hypothetical corpus (--rows)", True
    else:
        from ltc_ray.io.features import DEFAULT_BIN_DIM, feature_format, inspect_features

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
        from ltc_ray.pipeline.runtime import init_ray

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
    args = cluster_parser().parse_args(argv)
    if args.dry_run:
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
    return EXIT_OK


def _print_result(record: dict, output: str) -> None:
    lines = [f"{record['method']} on {record['name']}: {record['n_samples']} samples -> "
             f"{record['n_clusters']} clusters in {record['wall_seconds']:.1f} s"]
    metrics = record.get("metrics")
    if metrics:
        lines.append(metrics_table({record["method"]: metrics}))
    lines.append(f"output: {output}/clusters/*.parquet (+ cluster_summary.parquet, run.json)")
    print("\n".join(lines))


def metrics_table(rows: dict[str, dict], seconds: dict[str, float] | None = None) -> str:
    """A markdown table of metrics, one row per method."""
    cols = ["pairwise_precision", "pairwise_recall", "pairwise_f", "bcubed_precision",
            "bcubed_recall", "bcubed_f", "nmi"]
    head = "| method | P_pair | R_pair | F_pair | P_bcubed | R_bcubed | F_bcubed | NMI | clusters |"
    if seconds:
        head += " wall s |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in rows.items():
        cells = [f"{100 * m[c]:.2f}" for c in cols] + [str(m["n_clusters"])]
        if seconds:
            cells.append(f"{seconds[name]:.1f}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------- make-synthetic
def synthetic_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="make_synthetic",
                description="Write the MS1M-shaped synthetic benchmark (learn-to-cluster layout).")
    p.add_argument("--data-root", default="data", help="where to write (default: data)")
    p.add_argument("--parts", default="0,1", help="comma list from 0,1,3,5,7,9 (default: 0,1)")
    p.add_argument("--scale", type=float, default=0.01,
                   help="fraction of MS1M identities/samples (1.0 = 5.21M at part9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier make_synthetic run under --data-root "
                   "(files it did not write are never replaced)")
    return p


def synthetic_main(argv: Sequence[str]) -> int:
    from ltc_ray.synthetic import make_benchmark

    args = synthetic_parser().parse_args(argv)
    try:
        parts = [int(p) for p in args.parts.split(",") if p.strip()]
    except ValueError:
        raise InputError(
            "--parts", f"expected a comma list of integers, got {args.parts!r}"
        ) from None
    written = make_benchmark(args.data_root, parts, args.scale, args.seed, args.dim,
                             overwrite=args.overwrite)
    for name, info in written.items():
        print(f"{name}: {info['n_samples']} samples, {info['n_ids']} identities -> "
              f"{info['features']}")
    return EXIT_OK


# ---------------------------------------------------------------- evaluate
def evaluate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evaluate", description="Score a finished clustering output against labels.")
    p.add_argument("--pred", required=True, help="output URI of a finished run (has _SUCCESS)")
    p.add_argument("--labels", required=True, help="labels (.meta), one integer per line")
    p.add_argument("--json", help="also write the metrics to this file (a new path, or a "
                   "metrics file evaluate wrote; never inside a result directory)")
    p.add_argument("--storage-options", metavar="JSON")
    return p


def evaluate_main(argv: Sequence[str]) -> int:
    import numpy as np

    from ltc_ray.io.fs import url_to_fs
    from ltc_ray.io.labels import read_labels
    from ltc_ray.io.output import SUCCESS, overlaps, read_clusters, write_json
    from ltc_ray.metrics import evaluate

    def check_metrics_target(uri: str, pred: str, so: dict | None) -> None:
        """``--json`` writes a new file or replaces a metrics file evaluate wrote (a JSON
        object with exactly the metric keys); never a user's file, and never a file inside
        a result directory, which holds only what its run wrote."""
        if overlaps(uri, pred, so):
            raise InputError(uri, "lies inside the --pred result, which holds only the files "
                             "its run wrote; choose a path outside it (--json)")
        fs, path = url_to_fs(uri, so)
        path = path.rstrip("/")
        if "/" in path and fs.exists(f"{path.rsplit('/', 1)[0]}/{SUCCESS}"):
            raise InputError(uri, "lies inside an ltc-ray result (its directory has _SUCCESS); "
                             "choose a path outside it (--json)")
        if fs.isdir(path):
            raise InputError(uri, "is a directory; --json names the file to write")
        if not fs.exists(path):
            return
        keys = set(evaluate(np.zeros(2, np.int64), np.zeros(2, np.int64)))  # the metric keys
        try:
            with fs.open(path, "rb") as fh:
                existing = json.loads(fh.read(1 << 20))
            ours = isinstance(existing, dict) and set(existing) == keys
        except (ValueError, RecursionError):  # not JSON, not UTF-8, longer than 1 MiB
            ours = False
        if not ours:
            raise InputError(uri, "already exists and is not a metrics file evaluate wrote; "
                             "refusing to overwrite it: choose a new path (--json)")

    args = evaluate_parser().parse_args(argv)
    so = _storage_options(args.storage_options)
    if args.json:
        check_metrics_target(args.json, args.pred, so)
    table = read_clusters(args.pred, so)  # checked against its _SUCCESS manifest
    labels = read_labels(args.labels, storage_options=so)
    if len(labels) != table.num_rows:  # before computing on two arrays that disagree
        raise InputError(args.pred, f"has {table.num_rows} cluster rows but "
                         f"{brief(args.labels)} has {len(labels)} labels; score a result "
                         "against the labels of the features it clustered")
    metrics = evaluate(labels, table.column("cluster_id").to_numpy())
    print(metrics_table({args.pred: metrics}))
    if args.json:
        write_json(args.json, metrics, so)
    return EXIT_OK


# ---------------------------------------------------------------- tune
def tune_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tune",
        description="Grid-search a method's threshold on a LABELLED split (train, e.g. --part 0) "
        "and write a config file to use on test splits.",
    )
    _add_input_args(p, "labels (.meta); --part finds them itself")
    p.add_argument("--method", required=True)
    p.add_argument("--metric", default="pairwise_f", choices=["pairwise_f", "bcubed_f", "nmi"])
    p.add_argument("--grid", metavar="LOW:HIGH:STEP",
                   help="values to try (default per method); each must be valid for the tuned "
                   "key, STEP >= 1e-6, at most 1000 values")
    p.add_argument("--output-config", required=True, help="YAML file to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a config an earlier tune wrote (any other file is refused)")
    _add_run_args(p, "runs/tune-<input>.work")
    return p


def tune_main(argv: Sequence[str]) -> int:
    from ltc_ray.pipeline.tune import parse_grid, tune

    args = tune_parser().parse_args(argv)
    grid = None if args.grid is None else parse_grid(args.grid)  # vs. the key: in tune()
    features, labels, knn, name = _resolve_inputs(args)
    if labels is None:
        raise InputError("--labels", "tuning needs labels (a labelled training split)")
    cfg = _config(args)
    result = tune(
        features=features, labels=labels, knn=knn, config=cfg, metric=args.metric, grid=grid,
        work_dir=args.work_dir or f"runs/tune-{name}.work", num_cpus=args.num_cpus,
        storage_options=_storage_options(args.storage_options), output_config=args.output_config,
        overwrite=args.overwrite,
    )
    print(result["table"])
    print(f"best {result['param']} = {result['best_value']:.4f} "
          f"({args.metric} {100 * result['best_score']:.2f}) -> {args.output_config}")
    return EXIT_OK


# ---------------------------------------------------------------- train
def train_parser() -> argparse.ArgumentParser:
    from ltc_ray.config import float_flag, int_flag

    p = _Parser(
        prog="train",
        description="Train a learned method on a LABELLED split (e.g. --part 0) and write a model "
        "directory (weights + model.json with the thresholds tuned on that split).",
    )
    _add_input_args(p, "labels (.meta); --part finds them itself")
    p.add_argument("--method", default="hard-clusters",
                   help="hard-clusters (edge scorer; the default), gcn-v or gcn-ve (GCN-V, "
                   "then GCN-E)")
    p.add_argument("--output", required=True, help="model directory URI to write")
    p.add_argument("--edge-epochs", type=int_flag,
                   help="gcn-ve: GCN-E training epochs (default 2)")
    p.add_argument("--rho", type=float_flag, default=0.2,
                   help="gcn-ve: share of most confident nodes that use GCN-E (default 0.2)")
    p.add_argument("--epochs", type=int_flag, help="training epochs (1 to 10000)")
    p.add_argument("--lr", type=float_flag, help="learning rate, in (0, 1]")
    p.add_argument("--batch-rows", type=int_flag,
                   help="gcn-v: mini-batch rows (0 = full graph when it fits, else mini-batches)"
                   "; hard-clusters: anchors per step (default 256)")
    p.add_argument("--hidden", type=int_flag, help="hidden width (default 512)")
    p.add_argument("--tune-folds", type=int_flag,
                   help="hard-clusters: identity folds of the out-of-fold TPDi threshold search "
                   "(default 2; 0 keeps the paper's 0.7)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model")
    _add_run_args(p, "<output>.work")
    return p


def train_main(argv: Sequence[str]) -> int:
    from ltc_ray.config import check_flag
    from ltc_ray.io.fs import url_to_fs

    args = train_parser().parse_args(argv)
    for flag in ("--epochs", "--edge-epochs", "--lr", "--rho", "--batch-rows", "--hidden",
                 "--tune-folds"):  # finite and in range (config.FLAG_RANGES), before any work
        check_flag(flag, getattr(args, flag[2:].replace("-", "_")))
    features, labels, knn, _ = _resolve_inputs(args)
    if labels is None:
        raise InputError("--labels", "training needs labels (a labelled split)")
    cfg = _config(argparse.Namespace(**{**vars(args), "method": None}))
    with storage_errors(args.output):
        fs, path = url_to_fs(args.output, _storage_options(args.storage_options))
        if fs.isfile(path):
            raise InputError(args.output, "model output path is a file; expected a directory")
    from ltc_ray.models.train import TrainConfig  # after the cheap checks: imports torch
    from ltc_ray.pipeline.train import train

    if args.method == "hard-clusters":
        return _train_hard_clusters(args, features, labels, knn, cfg)

    train_cfg = TrainConfig(seed=cfg.seed)
    for flag in ("epochs", "lr", "batch_rows", "hidden"):  # ranges checked above
        value = getattr(args, flag)
        if value is not None:
            setattr(train_cfg, flag, value)
    edge_cfg = None
    if args.method == "gcn-ve":
        from ltc_ray.models.train_e import TrainEConfig

        edge_cfg = TrainEConfig(seed=cfg.seed)
        if args.edge_epochs is not None:
            edge_cfg.epochs = args.edge_epochs
    meta = train(args.method, features, labels, args.output, cfg, train_cfg, knn=knn,
                 work_dir=args.work_dir, overwrite=args.overwrite, num_cpus=args.num_cpus,
                 storage_options=_storage_options(args.storage_options), edge_cfg=edge_cfg,
                 rho=args.rho)
    m = meta["train_metrics"]
    print(f"gcn-v trained on {features}: tau={meta['thresholds']['tau']:.2f}, "
          f"train pairwise F {100 * m['pairwise_f']:.2f}, BCubed F {100 * m['bcubed_f']:.2f}")
    if "gcn_e" in meta:
        e = meta["gcn_e"]
        print(f"gcn-e trained: rho={e['rho']:.2f}, tau={e['thresholds']['tau']:.2f}, train "
              f"pairwise F {100 * e['train_metrics']['pairwise_f']:.2f}")
    print(f"model: {args.output}")
    return EXIT_OK


def _train_hard_clusters(args, features: str, labels: str, knn: str | None, cfg) -> int:
    from ltc_ray.models.train_hc import EdgeTrainConfig
    from ltc_ray.pipeline.train import train

    edge_cfg = EdgeTrainConfig(seed=cfg.seed)  # flag ranges: checked by train_main
    for flag, attr in (("epochs", "epochs"), ("lr", "lr"), ("batch_rows", "batch_size")):
        value = getattr(args, flag)
        if value is not None:
            if value <= 0:  # gcn-v's batch_rows 0 (full graph) has no meaning here
                raise InputError(f"--{flag.replace('_', '-')}", f"must be positive, got {value}")
            setattr(edge_cfg, attr, value)
    if args.tune_folds is not None:
        if args.tune_folds < 0 or args.tune_folds == 1:
            raise InputError("--tune-folds", f"must be 0 or at least 2, got {args.tune_folds}")
        edge_cfg.tune_folds = args.tune_folds
    if args.hidden is not None:
        if args.hidden <= 0 or args.hidden % edge_cfg.shape["heads"]:
            raise InputError("--hidden", f"must be a positive multiple of "
                             f"{edge_cfg.shape['heads']} (attention heads), got {args.hidden}")
        edge_cfg.shape["d_model"] = args.hidden
    meta = train(args.method, features, labels, args.output, cfg, None, knn=knn,
                 work_dir=args.work_dir, overwrite=args.overwrite, num_cpus=args.num_cpus,
                 storage_options=_storage_options(args.storage_options), edge_cfg=edge_cfg)
    m = meta["train_metrics"]
    print(f"hard-clusters edge scorer trained on {features}: tau={meta['thresholds']['tau']:.2f}, "
          f"train pairwise F {100 * m['pairwise_f']:.2f}, BCubed F {100 * m['bcubed_f']:.2f}")
    print(f"model: {args.output}")
    return EXIT_OK


# ---------------------------------------------------------------- export-knn
def export_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="export_knn",
                description="Export a run's kNN graph as a learn-to-cluster faiss_k_<k>.npz.")
    p.add_argument("--work-dir", required=True, help="a run's work area (holds knn/manifest.json)")
    p.add_argument("--output", required=True,
                   help="npz URI to write: a new path outside --work-dir; an export also "
                   "writes <output>.ltc-ray.json, the marker that says ltc-ray wrote it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output, but only a kNN export ltc-ray wrote: "
                   "its <output>.ltc-ray.json marker must still match the file's size, "
                   "modification time and (object stores) ETag; any other file is refused, "
                   "flag or not")
    p.add_argument("--storage-options", metavar="JSON")
    return p


def export_main(argv: Sequence[str]) -> int:
    from ltc_ray.graph.knn_graph import export_ltc_npz

    args = export_parser().parse_args(argv)
    n, k = export_ltc_npz(args.work_dir, args.output, _storage_options(args.storage_options),
                          overwrite=args.overwrite)
    print(f"wrote {n} x {k} kNN lists to {args.output}")
    return EXIT_OK


VERBS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "cluster": (cluster_main, "cluster embeddings (jobs/cluster.py)"),
    "make-synthetic": (synthetic_main, "write the synthetic benchmark (jobs/make_synthetic.py)"),
    "evaluate": (evaluate_main, "score an output against labels (jobs/evaluate.py)"),
    "tune": (tune_main, "pick a method's threshold on a labelled split (jobs/tune.py)"),
    "train": (train_main, "train a learned method on a labelled split (jobs/train.py)"),
    "export-knn": (export_main, "export a kNN graph as faiss_k_<k>.npz (jobs/export_knn.py)"),
    "demo": (lambda argv: _demo(argv), "synthetic data -> tune -> cluster -> table (jobs/demo.py)"),
}


def _demo(argv: Sequence[str]) -> int:
    from ltc_ray.demo import demo_main

    return demo_main(argv)


def run_verb(verb: str, argv: Sequence[str]) -> int:
    """Run one verb with logging and the exit-code contract."""
    if not log.handlers:  # our own progress lines only; libraries stay at WARNING
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    func = VERBS[verb][0]
    try:
        return func(argv)
    except InputError as exc:
        print(redact(f"error: {exc.where}: {exc.problem}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the job boundary: report and exit 1
        from ltc_ray.pipeline.runtime import unwrap_ray_error

        cause = unwrap_ray_error(exc)
        if isinstance(cause, InputError):
            print(redact(f"error: {cause.where}: {cause.problem}"), file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(cause, WorkFileError):  # the run's own file: rerunning heals it
            print(redact(f"failed: {cause}"), file=sys.stderr)
            return EXIT_FAILED
        log.exception("job failed")
        print(redact(f"failed: {type(cause).__name__}: {cause}"), file=sys.stderr)
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        lines = ["usage: ltc-ray VERB [options]   (ltc-ray VERB --help for a verb's options)", ""]
        lines += [f"  {verb:<15} {help_}" for verb, (_, help_) in VERBS.items()]
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown verb '{argv[0]}'\n" + "\n".join(lines), file=sys.stderr)
            return EXIT_BAD_INPUT
        print("\n".join(lines))
        return EXIT_OK if argv else EXIT_BAD_INPUT
    return run_verb(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
