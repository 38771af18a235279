"""A trained torch module as it travels to Ray workers: its weights only (CPU tensors),
rebuilt into the module once per worker -- what every learned method ships."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ltc_ray.errors import InputError


class ShippedNet:
    """``build()`` makes the empty module (a picklable callable, e.g.
    ``functools.partial(GCNE, hidden, dims)``); the weights of ``net`` are kept as CPU
    tensors. Pickling drops the built module, so a worker rebuilds it on first use."""

    def __init__(self, net: Any, build: Callable[[], Any]):
        self.state = {key: value.detach().cpu() for key, value in net.state_dict().items()}
        self.build = build
        self._net = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_net": None}

    def get(self) -> Any:
        """The module in eval mode, built on first use in this process."""
        if self._net is None:
            net = self.build()
            net.load_state_dict(self.state)
            net.eval()
            self._net = net
        return self._net


def load_trained_net(method: str, model_uri: str, storage_options: dict | None = None
                     ) -> tuple[ShippedNet, dict]:
    """The model ``jobs/train.py --method <method>`` wrote at ``model_uri`` (a kind of
    :data:`ltc_ray.models.store.NETS` named like the method), ready to ship to workers,
    and its model.json; no model given is an InputError naming the flag."""
    import functools
    import importlib

    from ltc_ray.models.store import NETS, load_net

    if not model_uri:
        raise InputError("--model", f"{method} needs a model trained by jobs/train.py "
                                    f"--method {method}")
    model, meta = load_net(model_uri, method, storage_options=storage_options)
    module, name = NETS[method]
    cls = getattr(importlib.import_module(module), name)
    return ShippedNet(model, functools.partial(cls, model.in_dim, model.dims)), meta
