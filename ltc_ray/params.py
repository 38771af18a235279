"""Valid values of numeric settings, and the field helper method parameters declare with.

A method's parameters are a dataclass in the method's own module; each numeric field says
its valid range (and a string field its choices) through :func:`param`, so the config
loader validates every method's keys the same way without knowing the method.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ltc_ray.errors import ECHO_CHARS, InputError, brief


def shown(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, for echoing user input in a message
    (a multi-megabyte ``--set`` value or YAML scalar must not become a multi-megabyte line)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    if isinstance(value, (dict, list)) and len(value) > limit:
        kind = "mapping" if isinstance(value, dict) else "list"
        return f"<a {kind} of {len(value)} entries>"
    text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    return brief(text, limit)



@dataclass(frozen=True)
class Range:
    """The valid values of one numeric config key or flag: ``low``/``high`` (None: no
    bound), each inclusive unless ``*_open``. ``what`` names the quantity ("a cosine
    similarity"): the message then gives the whole interval; ``why_low``/``why_high``
    say why that bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    what: str = ""
    why_low: str = ""
    why_high: str = ""

    def problem(self, value: float) -> str | None:
        """Why ``value`` is not valid (None when it is)."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {shown(value)}"
        low, high = self.low, self.high
        too_low = low is not None and (value <= low if self.low_open else value < low)
        too_high = high is not None and (value >= high if self.high_open else value > high)
        if not (too_low or too_high):
            return None
        why = self.why_low if too_low else self.why_high
        note = f" ({why})" if why else ""
        if self.what:
            return f"is {self.what} in {self.interval()}{note}, got {shown(value)}"
        if too_low:
            positive = (self.low == 0 and self.low_open) or (
                self.low == 1 and isinstance(value, int) and not self.low_open)
            bound = "must be positive" if positive else (
                f"must be {'>' if self.low_open else '>='} {_num(self.low)}")
        else:
            bound = f"must be {'<' if self.high_open else '<='} {_num(self.high)}"
        return f"{bound}{note}, got {shown(value)}"

    def interval(self) -> str:
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else _num(self.low)
        return f"{left}{low}, {_num(self.high)}{right}"

    def check(self, where: str, value: float | None) -> None:
        """Raise :class:`InputError` naming ``where`` when ``value`` is out of range."""
        if value is None:
            return
        problem = self.problem(value)
        if problem is not None:
            raise InputError(where, problem)


def _num(x: float | None) -> str:
    if x is None:
        return "inf"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


COSINE = Range(-1.0, 1.0, what="a cosine similarity")
SHARE = Range(0.0, 1.0, what="a share")
POSITIVE = Range(0, None, low_open=True)
SIGMA = Range(1e-6, 1e6, what="a softmax temperature")
WORKERS = 4096  # actors, shards, CPUs per actor: more than any cluster has
NEIGHBOURS = 4096  # kNN lists longer than this do not fit in memory at scale
ROWS = 1 << 24  # rows per batch/block: 16M rows of the smallest payload are GBs
ROUNDS = 100_000  # iterations/rounds: more would run for days


AUTO = "auto"  # a parameter value: derive it from the data (ltc_ray.graph.similarity_stats)


@dataclass(frozen=True)
class Auto:
    """The label-free rule of an ``auto`` parameter: ``low + alpha * (high - low)``
    between two anchors of the kNN similarity distribution, each ``"<statistic>:<q>"``
    (a quantile of a statistic of :mod:`ltc_ray.graph.similarity_stats`). ``kind``:
    "similarity" (the value itself), "distance" (``1 -`` it), "scale" (``alpha *
    (high - low)``, a step on the similarity scale). ``clip``: the value's bounds."""

    alpha: float
    low: str = "far:0.5"
    high: str = "r1:0.5"
    kind: str = "similarity"
    clip: tuple[float, float] = (-1.0, 1.0)

    def describe(self) -> str:
        if self.kind == "scale":
            return f"{self.alpha:g} * ({self.high} - {self.low})"
        core = f"{self.low} + {self.alpha:g} * ({self.high} - {self.low})"
        return f"1 - ({core})" if self.kind == "distance" else core


def param(default: Any = dataclasses.MISSING, *, valid: Range | None = None,
          choices: tuple[str, ...] | None = None, default_factory: Any = dataclasses.MISSING,
          auto: Auto | None = None) -> Any:
    """A params dataclass field with its valid range (numbers) or choices (strings);
    ``auto``: the rule that derives the value when it is :data:`AUTO`."""
    metadata: dict[str, Any] = {}
    if valid is not None:
        metadata["range"] = valid
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if auto is not None:
        metadata["auto"] = auto
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata=metadata)


def field_autos(cls: type) -> dict[str, Auto]:
    """``{field: Auto}`` of the fields of a params dataclass that may be ``auto``."""
    return {f.name: f.metadata["auto"] for f in dataclasses.fields(cls)
            if "auto" in f.metadata}


def auto_fields(params: Any) -> dict[str, Auto]:
    """The fields of a params instance whose value is :data:`AUTO` now, with their rules."""
    return {name: rule for name, rule in field_autos(type(params)).items()
            if getattr(params, name) == AUTO}


def field_ranges(cls: type) -> dict[str, Range]:
    """``{field: Range}`` of a params dataclass (fields declared with ``param(valid=...)``)."""
    return {f.name: f.metadata["range"] for f in dataclasses.fields(cls)
            if "range" in f.metadata}


def field_choices(cls: type) -> dict[str, tuple[str, ...]]:
    """``{field: choices}`` of a params dataclass."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(cls)
            if "choices" in f.metadata}
