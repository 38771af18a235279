"""A trained torch module as it travels to Ray workers: its weights only (CPU tensors),
rebuilt into the module once per worker -- what every learned method ships."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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
