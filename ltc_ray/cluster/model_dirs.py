"""Which registered method a model directory is for, from its ``model.json`` and the
sub-directories each method's trained model writes (``ClusterMethod.model_dirs``): a
``--model`` without ``--method`` runs the model's own method."""

from __future__ import annotations

from ltc_ray.cluster.base import REGISTRY
from ltc_ray.errors import InputError, storage_errors
from ltc_ray.io.fs import join_uri, uri_exists
from ltc_ray.models.store import MODEL_JSON, read_model_meta


def method_of_model(uri: str, storage_options: dict | None = None) -> str:
    """The method whose trained model directory ``uri`` is; InputError naming ``uri``
    otherwise (missing, not a model, or a part that cannot cluster alone)."""
    meta = read_model_meta(uri, storage_options)
    if meta is not None:
        kind = meta["method"]
        cls = REGISTRY.get(kind)
        if cls is not None and cls.model_dirs == ("",):
            return kind
        owners = sorted(name for name, c in REGISTRY.items()
                        if f"{kind}/" in c.model_dirs)
        if owners:
            parts = " and ".join(REGISTRY[owners[0]].model_dirs)
            raise InputError(uri, f"a {kind} model alone cannot cluster; pass the {owners[0]} "
                                  f"directory that holds {parts}")
        raise InputError(uri, f"model.json names {kind!r}, which no registered method uses")
    with storage_errors(uri):
        for name, cls in sorted(REGISTRY.items()):
            if cls.model_dirs != ("",) and all(
                    uri_exists(join_uri(uri, sub, MODEL_JSON), storage_options)
                    for sub in cls.model_dirs):
                return name
        if not uri_exists(uri, storage_options):
            raise InputError(uri, "model directory not found")
    raise InputError(uri, f"not a model directory (no {MODEL_JSON}; train one with "
                          f"jobs/train.py)")
