"""A trained model as a directory on any fsspec URI: ``weights.pt`` + ``model.json``.

``weights.pt`` is ``torch.save`` of the state dict (tensors only) and is read back with
``torch.load(weights_only=True)``, so a weights file can never run code. ``model.json`` records
what the model needs to be applied correctly (method, in_dim, hidden or dims, k, thresholds)
and where it came from (training data fingerprint, train config, metrics, versions). It is
written after the weights, so a directory with ``model.json`` is complete. GCN-V models use
:func:`save_model`/:func:`load_model`, GCN-E models :func:`save_gcn_e`/:func:`load_gcn_e`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import platform
import zipfile
from typing import Any

import numpy as np
import torch

import ltc_ray
from ltc_ray.errors import InputError, storage_errors
from ltc_ray.io.fs import (
    join_uri,
    list_known_tree,
    open_uri,
    uri_exists,
    url_to_fs,
    write_bytes_atomic,
)
from ltc_ray.io.lock import LOCK
from ltc_ray.models.edge_scorer import EdgeScorer, ScorerShape
from ltc_ray.models.gcn_e import GCNE
from ltc_ray.models.gcn_v import GCNV

__all__ = [
    "MODEL_JSON",
    "WEIGHTS",
    "check_model_location",
    "data_fingerprint",
    "load_edge_scorer",
    "load_gcn_e",
    "load_model",
    "load_net",
    "add_model_meta",
    "read_model_meta",
    "save_edge_scorer",
    "save_gcn_e",
    "save_model",
    "save_net",
]

WEIGHTS = "weights.pt"
MODEL_JSON = "model.json"
METHOD = "gcn-v"
METHOD_E = "gcn-e"
METHOD_HC = "hard-clusters"
METHOD_ME = "map-equation"  # the same edge scorer, carrying the map equation's keep rule
SCORER_KEYS = ("in_dim", "d_model", "heads", "ffn", "layers", "k")
FORMAT_VERSION = 1


def data_fingerprint(
    features_uri: str, n_rows: int, dim: int, labels: np.ndarray | None = None
) -> dict:
    """What the model was trained on: the feature URI, its shape and a sha256 of the labels
    (as little-endian int64), enough to tell two training sets apart."""
    out: dict[str, Any] = {"features": str(features_uri), "n_rows": int(n_rows), "dim": int(dim)}
    if labels is not None:
        data = np.ascontiguousarray(labels, dtype="<i8").tobytes()
        out["labels_sha256"] = hashlib.sha256(data).hexdigest()
    return out


def _versions() -> dict:
    import scipy

    return {
        "ltc_ray": ltc_ray.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }


def save_model(uri: str, model: GCNV, meta: dict, storage_options: dict | None = None) -> None:
    """Write ``model`` and ``meta`` to the directory ``uri`` (created when local).

    ``meta`` must hold ``k`` (the kNN size the model was trained with) and may hold
    ``thresholds`` (e.g. ``{"tau": 0.65}``), ``data`` (:func:`data_fingerprint`), ``train``
    (the train config as a dict), ``metrics``; ``method``, ``in_dim``, ``hidden`` and
    ``versions`` are filled in from the model. Everything must be JSON-serialisable.
    """
    _write(
        uri,
        model,
        meta,
        {"method": METHOD, "in_dim": model.in_dim, "hidden": model.hidden},
        storage_options,
    )


def save_gcn_e(uri: str, model: GCNE, meta: dict, storage_options: dict | None = None) -> None:
    """Write a GCN-E ``model`` and ``meta`` to the directory ``uri``, as :func:`save_model`
    does (``meta`` must hold ``k``, the kNN size on GCN-V features, e.g. 160); ``method``
    ("gcn-e"), ``in_dim``, ``dims`` and ``versions`` are filled in from the model."""
    _write(
        uri,
        model,
        meta,
        {"method": METHOD_E, "in_dim": model.in_dim, "dims": list(model.dims)},
        storage_options,
    )


def save_edge_scorer(uri: str, model: EdgeScorer, meta: dict,
                     storage_options: dict | None = None, method: str = METHOD_HC) -> None:
    """Write an edge scorer and ``meta`` to the directory ``uri``, as :func:`save_model`
    does; the architecture (:class:`ScorerShape`) is filled in. ``method``: the method whose
    thresholds ``meta`` carries (hard-clusters, map-equation), checked when loaded."""
    shape = model.shape
    arch = {"method": method, **{key: getattr(shape, key) for key in SCORER_KEYS},
            "dropout": shape.dropout}
    _write(uri, model, {**meta, "k": shape.k}, arch, storage_options)


def load_edge_scorer(
    uri: str,
    expected_dim: int | None = None,
    expected_k: int | None = None,
    storage_options: dict | None = None,
    method: str = METHOD_HC,
) -> tuple[EdgeScorer, dict]:
    """The edge scorer of ``method`` (hard-clusters, map-equation) in directory ``uri``
    (eval mode, CPU) and its ``model.json``, with the checks of :func:`load_model`."""
    meta = _checked_meta(uri, method, None, expected_dim, expected_k, storage_options)
    try:
        shape = ScorerShape(**{key: meta[key] for key in SCORER_KEYS},
                            dropout=float(meta.get("dropout", 0.0)))
    except (TypeError, ValueError) as exc:
        raise InputError(uri, f"invalid {MODEL_JSON}: {exc}") from None
    model = EdgeScorer(shape)
    _load_weights(uri, model, f"{method} edge scorer ({shape})", storage_options)
    return model, meta


# models written by :func:`save_net`: method -> (module, class) (imported when loaded)
NETS = {"gcn-d": ("ltc_ray.models.gcn_ds", "GCND"), "gcn-s": ("ltc_ray.models.gcn_ds", "GCNS"),
        "lgcn": ("ltc_ray.models.lgcn", "LGCN"), "pse-gcn": ("ltc_ray.models.pse_gcn", "PSEGCN")}


def save_net(uri: str, model: torch.nn.Module, method: str, meta: dict,
             storage_options: dict | None = None) -> None:
    """Write a model of :data:`NETS` (``in_dim`` and the layer widths ``dims`` from the
    model) and ``meta`` to the directory ``uri``, as :func:`save_model` does."""
    if method not in NETS:
        raise ValueError(f"unknown model kind {method!r}")
    arch = {"method": method, "in_dim": int(model.in_dim), "dims": [int(d) for d in model.dims]}
    if hasattr(model, "center"):  # gcn-d/gcn-s: centred features, member structure columns
        arch["center"] = bool(model.center)
        arch["structure"] = bool(model.structure)
    _write(uri, model, meta, arch, storage_options)


def load_net(uri: str, method: str, expected_dim: int | None = None,
             expected_k: int | None = None, storage_options: dict | None = None
             ) -> tuple[torch.nn.Module, dict]:
    """A model of :data:`NETS` in directory ``uri`` (eval mode, CPU) and its
    ``model.json``, with the checks of :func:`load_model`."""
    import importlib

    meta = _checked_meta(uri, method, None, expected_dim, expected_k, storage_options)
    module, name = NETS[method]
    cls = getattr(importlib.import_module(module), name)
    try:
        model = cls(meta["in_dim"], tuple(meta["dims"]))
    except (TypeError, ValueError) as exc:
        raise InputError(uri, f"invalid {MODEL_JSON}: {exc}") from None
    if hasattr(model, "center"):
        model.center = meta.get("center") is True
        model.structure = meta.get("structure") is True
    _load_weights(uri, model, f"{method} (in_dim {meta['in_dim']}, dims {meta['dims']})",
                  storage_options)
    return model, meta


def read_model_meta(uri: str, storage_options: dict | None = None) -> dict | None:
    """``model.json`` of the model directory ``uri`` (validated), or None when it has none."""
    with storage_errors(uri):
        if not uri_exists(join_uri(uri, MODEL_JSON), storage_options):
            return None
        return _read_meta(join_uri(uri, MODEL_JSON), storage_options)


def _model_files() -> set[str]:
    """Every file a model directory written by jobs/train.py may hold."""
    return {f"{sub}{name}" for sub in ("", "gcn-v/", "gcn-e/") for name in (WEIGHTS, MODEL_JSON)}


def check_model_location(uri: str, overwrite: bool,
                         storage_options: dict | None = None) -> list[str]:
    """Refuse a model output that is a file, holds anything but an earlier model's files
    (whatever the flags), or holds a model (without ``overwrite``). Returns the earlier
    model's files (relative paths), the only ones a new model may replace or remove."""
    fs, path = url_to_fs(uri, storage_options)
    path = path.rstrip("/")
    if fs.isfile(path):
        raise InputError(uri, "model output path is a file; expected a directory")
    if not fs.isdir(path):
        return []
    foreign, files = list_known_tree(fs, path, {WEIGHTS, MODEL_JSON, "gcn-v", "gcn-e", LOCK})
    files -= {LOCK}
    foreign = foreign or sorted(files - _model_files())
    if foreign:
        raise InputError(uri, f"holds files that are not an ltc-ray model (e.g. "
                         f"'{foreign[0][:80]}'); refusing to write there whatever the flags: "
                         "choose a new (or empty) model directory")
    if any(f.endswith(MODEL_JSON) for f in files) and not overwrite:
        raise InputError(uri, "already holds a model; pass --overwrite to replace it")
    return sorted(files)


def _write(
    uri: str, model: torch.nn.Module, meta: dict, arch: dict, storage_options: dict | None
) -> None:
    k = meta.get("k")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"meta must record the kNN size k as a positive int, got {k!r}")
    for key, value in arch.items():
        if key in meta and meta[key] != value:
            raise ValueError(f"meta[{key!r}] = {meta[key]!r} but the model has {value!r}")
    record = {
        **meta,
        "k": int(k),
        **arch,
        "format": FORMAT_VERSION,
        "versions": _versions(),
    }
    text = json.dumps(record, indent=2, sort_keys=True).encode()
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(join_uri(uri, WEIGHTS), buf.getvalue(), storage_options)
    write_bytes_atomic(join_uri(uri, MODEL_JSON), text, storage_options)


def add_model_meta(uri: str, updates: dict, storage_options: dict | None = None) -> None:
    """Add keys to the ``model.json`` of the model directory ``uri`` (e.g. the train job's
    evaluation, known only once the model is saved); atomic, the weights untouched."""
    record = {**_read_meta(join_uri(uri, MODEL_JSON), storage_options), **updates}
    write_bytes_atomic(join_uri(uri, MODEL_JSON),
                       json.dumps(record, indent=2, sort_keys=True).encode(), storage_options)


def _read(uri: str, what: str, storage_options: dict | None) -> bytes:
    with storage_errors(uri):  # endpoint or credentials: one line, not a traceback
        if not uri_exists(uri, storage_options):
            raise InputError(uri, f"{what} not found")
        with open_uri(uri, "rb", storage_options) as fh:
            return fh.read()


def _read_meta(uri: str, storage_options: dict | None) -> dict:
    raw = _read(uri, MODEL_JSON, storage_options)
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(uri, f"invalid {MODEL_JSON}: {exc}") from exc
    if not isinstance(meta, dict):
        raise InputError(uri, f"invalid {MODEL_JSON}: expected an object")
    # GCN-V records its width as ``hidden``, GCN-E its four widths as ``dims``.
    sizes = {METHOD_E: ("in_dim", "k"), METHOD_HC: SCORER_KEYS, METHOD_ME: SCORER_KEYS,
             **dict.fromkeys(NETS, ("in_dim", "k"))}.get(
        meta.get("method"), ("in_dim", "hidden", "k"))
    for key in sizes:
        value = meta.get(key)
        if not _positive_int(value):
            raise InputError(uri, f"invalid {MODEL_JSON}: {key} must be a positive int")
    if not isinstance(meta.get("method"), str) or len(meta["method"]) > 40:
        raise InputError(uri, f"invalid {MODEL_JSON}: method must be a short string")
    thresholds = meta.get("thresholds", {})
    if not isinstance(thresholds, dict) or not all(
        value is None or (isinstance(value, int | float) and not isinstance(value, bool)
                          and math.isfinite(value)) for value in thresholds.values()):
        # a NaN threshold (a diverged training, a crafted file) would make every sample a
        # singleton without a word
        raise InputError(uri, f"invalid {MODEL_JSON}: thresholds must be finite numbers")
    if meta["method"] == METHOD_E:
        dims = meta.get("dims")
        if not isinstance(dims, list) or len(dims) != 4 or not all(map(_positive_int, dims)):
            raise InputError(uri, f"invalid {MODEL_JSON}: dims must be 4 positive ints")
    if meta["method"] in NETS:
        dims = meta.get("dims")
        if not isinstance(dims, list) or not 1 <= len(dims) <= 8 or not all(
                map(_positive_int, dims)):
            raise InputError(uri, f"invalid {MODEL_JSON}: dims must be positive ints")
    return meta


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def load_model(
    uri: str,
    expected_dim: int | None = None,
    expected_k: int | None = None,
    method: str | None = None,
    storage_options: dict | None = None,
) -> tuple[GCNV, dict]:
    """The model in directory ``uri`` (eval mode, CPU) and its ``model.json``.

    Checks, each an :class:`InputError` naming the URI: the directory and both files exist,
    ``model.json`` is valid, the method matches ``method`` (and is gcn-v), the model's feature
    dim and k match ``expected_dim``/``expected_k``, and the weights load with
    ``weights_only=True`` and fit the architecture exactly.
    """
    meta = _checked_meta(uri, METHOD, method, expected_dim, expected_k, storage_options)
    model = GCNV(meta["in_dim"], meta["hidden"])
    _load_weights(
        uri, model, f"gcn-v (in_dim {meta['in_dim']}, hidden {meta['hidden']})", storage_options
    )
    return model, meta


def load_gcn_e(
    uri: str,
    expected_dim: int | None = None,
    expected_k: int | None = None,
    storage_options: dict | None = None,
) -> tuple[GCNE, dict]:
    """The GCN-E model in directory ``uri`` (eval mode, CPU) and its ``model.json``, with the
    checks of :func:`load_model`: ``expected_dim`` is the GCN-V feature width the model reads
    and ``expected_k`` the kNN size on those features."""
    meta = _checked_meta(uri, METHOD_E, None, expected_dim, expected_k, storage_options)
    model = GCNE(meta["in_dim"], meta["dims"])
    _load_weights(
        uri, model, f"gcn-e (in_dim {meta['in_dim']}, dims {meta['dims']})", storage_options
    )
    return model, meta


def _checked_meta(
    uri: str,
    kind: str,
    method: str | None,
    expected_dim: int | None,
    expected_k: int | None,
    storage_options: dict | None,
) -> dict:
    """``model.json`` of directory ``uri`` after checking method, dim and k."""
    with storage_errors(uri):
        if not uri_exists(uri, storage_options):
            raise InputError(uri, "model directory not found")
    meta = _read_meta(join_uri(uri, MODEL_JSON), storage_options)
    if method is not None and meta["method"] != method:
        raise InputError(uri, f"model is a {meta['method']!r} model, not {method!r}")
    if meta["method"] != kind:
        raise InputError(uri, f"model is a {meta['method']!r} model, expected {kind!r}")
    if expected_dim is not None and meta["in_dim"] != expected_dim:
        raise InputError(
            uri, f"model was trained for dim {meta['in_dim']}, the features have {expected_dim}"
        )
    if expected_k is not None and meta["k"] != expected_k:
        raise InputError(
            uri, f"model was trained with k={meta['k']}, the kNN graph has k={expected_k}"
        )
    return meta


def _torch_error(exc: Exception) -> str:
    """torch.load's multi-line message as one line: what was refused, not the advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
        detail = [line for line in lines if not line.startswith(advice)]
        return "refused to unpickle (weights_only=True): " + " ".join(detail or lines[-1:])
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _load_weights(
    uri: str, model: torch.nn.Module, describe: str, storage_options: dict | None
) -> None:
    """Fill ``model`` from ``uri/weights.pt`` (``weights_only``), refusing any key or shape
    that does not fit it exactly; leaves the model in eval mode."""
    weights_uri = join_uri(uri, WEIGHTS)
    raw = _read(weights_uri, WEIGHTS, storage_options)
    if not zipfile.is_zipfile(io.BytesIO(raw)):  # torch.save writes a zip archive
        raise InputError(
            weights_uri, "cannot read weights: not a torch.save archive (corrupted or truncated)"
        )
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad or unsafe files
        raise InputError(weights_uri, f"cannot read weights: {_torch_error(exc)}") from None
    expected = model.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(weights_uri, "weights are not a state dict of tensors")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{name} {tuple(state[name].shape)} != {tuple(t.shape)}"
        for name, t in expected.items()
        if name in state and state[name].shape != t.shape
    ]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if unexpected:
            problems.append(f"unexpected {unexpected}")
        if wrong:
            problems.append("wrong shapes: " + ", ".join(wrong))
        raise InputError(weights_uri, f"weights do not fit {describe}: " + "; ".join(problems))
    model.load_state_dict({name: t.to(torch.float32) for name, t in state.items()})
    model.eval()
