"""What every verb shares: a parser whose bad arguments exit 2, the input and run flags,
the inputs from ``--part`` or ``--features``, and the job's Config (defaults, ``--config``,
``--set``, then the flags that are config keys)."""

from __future__ import annotations

import argparse
import json
import os

from ltc_ray.cluster import REGISTRY
from ltc_ray.config import Config, check_flag, check_method_name, load_config, validate
from ltc_ray.errors import InputError, storage_errors
from ltc_ray.io.fs import STORAGE_OPTIONS_ENV, uri_exists
from ltc_ray.io.layout import part_name, part_paths
from ltc_ray.redact import register_storage_options

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises InputError instead of exiting, so all bad input maps to 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if len(message) > 200:  # argparse echoes values whole: never print unbounded input
            message = message[:199] + "…"
        raise InputError(self.prog, message)


def _json_object(flag: str, text: str, what: str = "a JSON object") -> dict:
    """A flag's JSON value, which must be an object (InputError naming ``flag``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InputError(flag, "is not valid JSON") from None
    if not isinstance(value, dict):
        raise InputError(flag, f"must be {what}")
    return value


def _storage_options(text: str | None) -> dict | None:
    """``--storage-options`` parsed (or, without the flag, ``$LTC_RAY_STORAGE_OPTIONS``, which
    keeps credentials out of the process list and shell history), its secrets registered
    for redaction."""
    flag = "--storage-options"
    if not text:
        text, flag = os.environ.get(STORAGE_OPTIONS_ENV), STORAGE_OPTIONS_ENV
    if not text:
        return None
    value = _json_object(flag, text)
    register_storage_options(value)  # its secrets are masked in every message and log line
    return value


def add_storage_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--storage-options``, the same flag (and environment fallback) on every verb."""
    p.add_argument("--storage-options", metavar="JSON",
                   help="fsspec storage options as JSON (endpoint, region, ...); default "
                   f"${STORAGE_OPTIONS_ENV}, which keeps credentials out of the process list")


def _add_input_args(p: argparse.ArgumentParser, labels_help: str) -> None:
    src = p.add_argument_group("input (either --part or --features)")
    src.add_argument("--part", type=int, help="MS1M benchmark part: 0 (train), 1, 3, 5, 7 or 9")
    src.add_argument("--data-root", default="data",
                     help="root of the learn-to-cluster layout used by --part (default: data)")
    src.add_argument("--features", help="feature file URI: .bin, .npy or .parquet")
    src.add_argument("--labels", help=labels_help)
    src.add_argument("--dim", type=int, help="feature dimension of a .bin file (default 256)")
    add_storage_options(src)


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


def _config(args: argparse.Namespace) -> Config:
    """The job's Config: defaults, --config, --set, then the flags that are config keys
    (--dim, --method, --model), validated. --method and --model are taken verbatim (not
    parsed as YAML: a model path holding '#' or '~' stays that path)."""
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
        for name, cls in REGISTRY.items():
            if cls.shape.uses_model:
                cfg.methods.of(name).model = model
    validate(cfg)
    if model and not method and cfg.method == Config().method:
        # --model without --method (nor a method in --config/--set): the model's own method
        from ltc_ray.cluster.model_dirs import method_of_model  # torch: not at CLI import

        cfg.method = method_of_model(model, _storage_options(args.storage_options))
    return cfg



def _resources(text: str | None) -> dict | None:
    """``--resources``: a JSON object of non-negative counts, as floats."""
    if not text:
        return None
    counts = 'a JSON object of counts, e.g. {"CPU": 64}'
    value = _json_object("--resources", text, counts)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
               for v in value.values()):
        raise InputError("--resources", f"must be {counts}")
    return {str(k): float(v) for k, v in value.items()}

