"""Typed job configuration: YAML files plus ``--set key=value`` overrides.

A config is a tree of dataclasses validated once, at the edge: an unknown key,
a value of the wrong type or an out-of-range value is an :class:`InputError`
naming the key, raised before any expensive work starts. Every numeric key has a
range (:data:`RANGES`: NaN and infinities are never valid, sizes and counts are bounded),
and YAML anchors/aliases are refused (a few hundred bytes of nested aliases expand to
gigabytes), so what reaches ``run.json`` is always finite and sane.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ltc_ray.cluster import REGISTRY
from ltc_ray.errors import InputError, brief
from ltc_ray.params import (
    AUTO,
    COSINE,
    NEIGHBOURS,
    ROWS,
    SHARE,
    WORKERS,
    Auto,
    Range,
    field_autos,
    field_choices,
    field_ranges,
    param,
)
from ltc_ray.params import shown as shown  # re-exported: the loader's echo of user values

# the attach step's cut: below knn-cc's (alpha 0.5 vs 0.72), as a singleton's best link is
# usually weaker than links inside a cluster (fit: benchmarks/domain_shift.py)
ATTACH_RULE = Auto(0.5, "far:0.5", "r1:0.5")


@dataclass
class KnnConfig:
    """How the kNN graph is built (see ``ltc_ray.knn``)."""

    k: int = 80  # neighbours per row, self included at rank 0
    index: str = "flat"  # flat (exact) | ivf (approximate, recall reported)
    nlist: int = 0  # IVF lists; 0 = min(4096, 8 * sqrt(N)) per shard
    nprobe: int = 32  # IVF lists probed per query
    mode: str = "auto"  # auto | shard | replicate
    shards: int = 0  # database shards (shard mode); 0 = from cluster resources and memory
    shard_max_bytes: float = 4e9  # auto mode: replicate while N*D*4 fits, else shard at this size
    cpus_per_actor: int = 8  # CPU threads per search actor when replicating on CPUs
    block_rows: int = 16384  # query rows per streamed block (also the kNN file granularity)
    max_in_flight: int = 0  # query blocks in flight; 0 = 2 per actor
    recall_sample: int = 1000  # queries checked against exact search when approximate
    gpu: str = "auto"  # auto (use GPUs when the cluster has them) | never
    # exact search engine: auto = torch on GPU workers (tensor cores, certified exact),
    # faiss on CPUs | faiss | torch; IVF always uses faiss
    backend: str = "auto"
    precision: str = "auto"  # torch candidates: auto (fp16 GPU, fp32 CPU) | fp32 | fp16 | bf16
    reuse: bool = True  # reuse a precomputed learn-to-cluster faiss_k_<k>.npz when present


def _params_of(self, name: str) -> Any:
    """The params of method ``name`` (its YAML name, e.g. "knn-cc")."""
    return getattr(self, name.replace("-", "_"))


@functools.cache
def _methods_type(methods: tuple[tuple[str, type], ...]) -> type:
    """A dataclass with one params field per registered method (its YAML name with
    underscores), so the loader validates and prints them like any other section."""
    fields = [(name.replace("-", "_"), params, field(default_factory=params))
              for name, params in methods]
    return dataclasses.make_dataclass("MethodsConfig", fields, namespace={"of": _params_of})


def methods_config_type() -> type:
    """The MethodsConfig dataclass of the methods registered now (a method registered
    later, e.g. a plugin or a test's toy method, gets a section in configs made after)."""
    return _methods_type(tuple((name, cls.Params) for name, cls in sorted(REGISTRY.items())))


@dataclass
class ClusterConfig:
    """Partitioning of the per-node work and the global merge."""

    partitions: int = 0  # 0 = ceil(N / partition_rows), at least one per CPU
    partition_rows: int = 262144
    merge: str = "auto"  # auto | local (one scipy pass over all edges) | forest
    merge_local_max_edges: int = 20_000_000  # auto: local below this many edges, else forest
    # attach each singleton to the cluster of its most similar neighbour in a larger cluster
    # when their cosine >= attach_threshold: on | off | auto (on for label-free methods, off
    # for learned ones, whose thresholds were tuned without it)
    attach_singletons: str = "auto"
    attach_threshold: float | str = param(AUTO, valid=COSINE, auto=ATTACH_RULE)


@dataclass
class Config:
    method: str = "aro"  # best worst case over the domain-shift benchmark (README)
    seed: int = 0
    dim: int = 256  # feature dim of .bin inputs (npy/parquet carry their own)
    knn: KnnConfig = field(default_factory=KnnConfig)
    methods: Any = field(default_factory=lambda: methods_config_type()())
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_yaml_names(dataclasses.asdict(self))


_STATIC_CHOICES = {
    "knn.index": ("flat", "ivf"),
    "knn.mode": ("auto", "shard", "replicate"),
    "knn.gpu": ("auto", "never"),
    "knn.backend": ("auto", "faiss", "torch"),
    "knn.precision": ("auto", "fp32", "fp16", "bf16"),
    "cluster.merge": ("auto", "local", "forest"),
    "cluster.attach_singletons": ("auto", "on", "off"),
}

MAX_CONFIG_BYTES = 256 * 1024  # a config file is a few kB; refuse anything near a MiB
MAX_INT = 1 << 62  # no integer key may exceed this, whatever its own range says
_METHOD_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


# Every numeric key of Config outside ``methods`` (YAML names), its valid values; a
# method's keys come from its Params fields (``ltc_ray.params.param``). test_config checks
# that every int/float field has a range (:data:`RANGES`).
_STATIC_RANGES: dict[str, Range] = {
    "seed": Range(0, (1 << 31) - 2, why_high="faiss and Infomap take 32-bit seeds"),
    "dim": Range(1, 65536),
    "knn.k": Range(2, NEIGHBOURS, why_low="self + 1 neighbour"),
    "knn.nlist": Range(0, 1 << 20),
    "knn.nprobe": Range(1, 1 << 20),
    "knn.shards": Range(0, WORKERS),
    "knn.shard_max_bytes": Range(1 << 20, 1 << 50,
                                 why_low="1 MiB: smaller shards would start an actor per "
                                         "handful of rows"),
    "knn.cpus_per_actor": Range(1, WORKERS),
    "knn.block_rows": Range(1, ROWS),
    "knn.max_in_flight": Range(0, WORKERS),
    "knn.recall_sample": Range(0, 1 << 20),
    "cluster.partitions": Range(0, 1 << 16),
    "cluster.partition_rows": Range(1, 1 << 31),
    "cluster.merge_local_max_edges": Range(0, 1 << 40),
    "cluster.attach_threshold": COSINE,
}



class _MethodKeys(Mapping):
    """``static`` plus every registered method's ``methods.<name>.<field>`` entries, read
    from its Params fields by ``of`` (:func:`ltc_ray.params.field_ranges` / choices)."""

    def __init__(self, static: dict, of) -> None:
        self.static, self.of = static, of

    def _all(self) -> dict:
        out = dict(self.static)
        for name, cls in sorted(REGISTRY.items()):
            out.update({f"methods.{name}.{key}": value
                        for key, value in self.of(cls.Params).items()})
        return out

    def __getitem__(self, key: str):
        return self._all()[key]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


RANGES: Mapping[str, Range] = _MethodKeys(_STATIC_RANGES, field_ranges)
# keys that may be ``auto`` (derived from the data at run time), with their rules
AUTOS: Mapping[str, Auto] = _MethodKeys({"cluster.attach_threshold": ATTACH_RULE}, field_autos)
_CHOICES: Mapping[str, tuple[str, ...]] = _MethodKeys(_STATIC_CHOICES, field_choices)

# Numeric command-line flags of the jobs (cli.py), checked the same way.
FLAG_RANGES: dict[str, Range] = {
    "--dim": _STATIC_RANGES["dim"],
    "--num-cpus": Range(1, 1 << 16),
    "--epochs": Range(1, 10_000),
    "--edge-epochs": Range(1, 10_000),
    "--lr": Range(0.0, 1.0, low_open=True, what="a learning rate"),
    "--rho": SHARE,
    "--batch-rows": Range(0, ROWS),
    "--hidden": Range(1, 8192),
    "--tune-folds": Range(0, 100),
}


def int_flag(text: str) -> int:
    """argparse ``type`` for an integer flag: like ``int`` but the refusal echoes at most
    :data:`ECHO_CHARS` characters of the value (argparse echoes it whole)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {shown(text)}") from None


def float_flag(text: str) -> float:
    """argparse ``type`` for a number flag (the range, finiteness included, is checked
    after parsing by :func:`check_flag`, naming the flag)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {shown(text)}") from None


def check_flag(flag: str, value: float | None) -> None:
    """Refuse a numeric flag outside :data:`FLAG_RANGES` (None: not given)."""
    FLAG_RANGES[flag].check(flag, value)


def _yaml_name(name: str) -> str:
    """A methods section's YAML name (``knn_cc`` -> ``knn-cc``); other keys unchanged."""
    dashed = name.replace("_", "-")
    return dashed if dashed in REGISTRY else name


def _to_yaml_names(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {_yaml_name(k): _to_yaml_names(v) for k, v in tree.items()}
    return tree


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def numeric_fields(obj: Any = None, prefix: str = "") -> list[tuple[str, type, Any]]:
    """``(yaml key, int or float, value)`` of every numeric field under ``obj`` (default:
    a fresh :class:`Config`), nested dataclasses included; bools are not numbers here."""
    obj = Config() if obj is None else obj
    out = []
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        typ = hints[f.name]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        base = args[0] if args else typ
        value = getattr(obj, f.name)
        key = f"{prefix}{_yaml_name(f.name)}"
        if dataclasses.is_dataclass(value):
            out += numeric_fields(value, key + ".")
        elif base in (int, float):
            out.append((key, base, value))
    return out


class _RefusedYAML(Exception):
    """YAML that parses but is refused before it is built (aliases, duplicate keys)."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases (nested aliases are the "billion
    laughs" bomb: a few hundred bytes that expand to gigabytes once printed or walked)
    and without duplicate keys (the later one silently winning hides a typo)."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _RefusedYAML(f"YAML anchors and aliases (&name, *name) are not supported "
                               f"(line {event.start_mark.line + 1}); write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise _RefusedYAML(f"duplicate key {shown(key_node.value)} "
                                       f"(line {key_node.start_mark.line + 1})")
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, where: str) -> Any:
    """Parse ``text`` with :class:`_StrictLoader`; refused constructs and nesting too deep
    for the parser are :class:`InputError`; other parse errors propagate (the caller
    decides: a config file is refused, a ``--set`` value falls back to a plain string)."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _RefusedYAML as exc:
        raise InputError(where, str(exc)) from None
    except RecursionError:
        raise InputError(where, "YAML nested too deeply") from None


def _field_for(cls: type, key: str, where: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    name = key.replace("-", "_")
    if name not in fields:
        known = ", ".join(sorted(_yaml_name(f) for f in fields))
        raise InputError(where, f"unknown config key {shown(key)} (known here: {known})")
    return fields[name]


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared scalar type (``X | None``: null,
    "none" or "model" mean None — e.g. "use the threshold the model was tuned with").
    Numbers must be finite, integers integral and at most :data:`MAX_INT`."""
    args = typing.get_args(typ)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "model")):
            return None
        (typ,) = [a for a in args if a is not type(None)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise InputError(where, f"expected true/false, got {shown(value)}")
    if typ is int:
        number = _integer(value)
        if number is None:
            raise InputError(where, f"expected an integer, got {shown(value)}")
        if abs(number) > MAX_INT:
            raise InputError(where, f"integer too large (at most {MAX_INT}), got {shown(value)}")
        return number
    if typ is float:
        number = _float(value)
        if number is None:
            raise InputError(where, f"expected a number, got {shown(value)}")
        if not math.isfinite(number):
            raise InputError(where, f"must be a finite number, got {shown(value)}")
        return number
    if typ is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare on/off/yes/no as a boolean
            return "on" if value else "off"
        if isinstance(value, (dict, list)):
            raise InputError(where, f"expected a string, got {shown(value)}")
        return str(value)
    raise TypeError(f"unsupported config type {typ!r}")


def _float(value: Any) -> float | None:
    """``value`` as a float (inf for an integer too large for one); None: not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            return math.copysign(math.inf, value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _integer(value: Any) -> int | None:
    """``value`` as an int: an int, or an integral finite float / numeric string
    ("80", "1e6", "1_000"); None otherwise (2.5, "1e400", "nan", true)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    number = _float(value)
    if number is None or not math.isfinite(number) or not number.is_integer():
        return None
    return int(number)


def _apply(obj: Any, tree: dict, where: str, prefix: str = "") -> None:
    if tree is None and prefix:  # an empty section ("knn:" with every key commented out)
        return
    if not isinstance(tree, dict):
        raise InputError(where, f"expected a mapping at '{prefix.rstrip('.') or '<top>'}', "
                                f"got {shown(tree)}")
    hints = _hints(type(obj))
    for key, value in tree.items():
        key_text = str(key)
        f = _field_for(type(obj), key_text, f"{where} [{prefix}{brief(key_text)}]")
        typ = hints[f.name]
        path = f"{prefix}{key_text}"
        if dataclasses.is_dataclass(getattr(obj, f.name)):
            _apply(getattr(obj, f.name), value, where, path + ".")
        elif "auto" in f.metadata and isinstance(value, str) and value.strip().lower() == AUTO:
            setattr(obj, f.name, AUTO)  # derived from the data at run time
        else:
            setattr(obj, f.name, _coerce(_without_str(value, typ, f, f"{where} [{path}]"),
                                         _auto_value_type(typ) if "auto" in f.metadata
                                         else typ, f"{where} [{path}]"))


def _auto_value_type(typ: Any) -> Any:
    """The type of an ``auto``-capable field's explicit values: its hint without ``str``
    (``float | str`` -> float, ``float | str | None`` -> ``float | None``)."""
    args = tuple(a for a in typing.get_args(typ) if a is not str)
    if not args:
        return typ
    return args[0] if len(args) == 1 else args[0] | None


def _without_str(value: Any, typ: Any, f: dataclasses.Field, where: str) -> Any:
    """An ``auto``-capable field refuses any other word with a message that names
    ``auto`` (the plain type check would only say "expected a number")."""
    if "auto" not in f.metadata or not isinstance(value, str) or _float(value) is not None:
        return value
    if type(None) in typing.get_args(typ) and value.lower() in ("none", "null", "model"):
        return value
    raise InputError(where, f"expected a number or 'auto', got {shown(value)}")


def set_key(cfg: Config, dotted: str, raw_value: str, where: str = "--set") -> None:
    """Apply one ``key.sub=value`` override (value parsed as a YAML scalar; text YAML
    cannot parse stays a plain string)."""
    value: Any = raw_value
    if raw_value != "":
        try:
            value = _load_yaml(raw_value, f"{where} [{brief(dotted)}]")
        except InputError:
            raise
        except (yaml.YAMLError, ValueError):  # ValueError: an integer too long for int()
            value = raw_value
    parts = dotted.split(".")
    tree: Any = value
    for part in reversed(parts):
        tree = {part: tree}
    _apply(cfg, tree, where)


def check_method_name(where: str, name: Any) -> None:
    """Refuse what cannot be a method name (lower-case letters, digits, '-' and '_'; at
    most 64 characters) before it is echoed in longer messages; the registry then
    refuses an unknown name with the list of known ones."""
    if not isinstance(name, str) or not _METHOD_NAME.fullmatch(name):
        raise InputError(where, f"is not a method name, got {shown(name)}")


def validate(cfg: Config) -> Config:
    """Range and choice checks that need no data: every numeric key against
    :data:`RANGES` (NaN and infinities refused everywhere), every choice key."""
    check_method_name("config method", cfg.method)
    for dotted, choices in _CHOICES.items():
        value = _get(cfg, dotted)
        if value not in choices:
            allowed = ", ".join(choices)
            raise InputError(f"config {dotted}", f"must be one of {allowed}, got {shown(value)}")
    for key, typ, value in numeric_fields(cfg):
        if value is None or (value == AUTO and key in AUTOS):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                typ is int and not isinstance(value, int)):
            expected = "an integer" if typ is int else "a number"
            raise InputError(f"config {key}", f"expected {expected}, got {shown(value)}")
        RANGES[key].check(f"config {key}", value)
    if cfg.knn.backend == "torch" and cfg.knn.index != "flat":
        raise InputError("config knn.backend", "torch searches exactly; it needs knn.index flat")
    return cfg


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part.replace("-", "_"))
    return obj


def _read_config_file(path: str) -> str:
    """The text of a local config file: one line naming the file for a missing file, a
    directory, an unreadable, oversized or non-UTF-8 one."""
    where = brief(path, 1024)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise InputError(where, "config file not found") from None
    except IsADirectoryError:
        raise InputError(where, "config file is a directory; expected a YAML file") from None
    except PermissionError:
        raise InputError(where, "cannot read config file (permission denied)") from None
    except OSError as exc:
        raise InputError(where, f"cannot read config file ({exc.strerror or type(exc).__name__})"
                         ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise InputError(where, f"config file is larger than {MAX_CONFIG_BYTES // 1024} KiB "
                                "(a config is a few kB of YAML)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(where, f"config file is not UTF-8 text (byte {exc.start} is "
                                f"0x{data[exc.start]:02x})") from None


def load_config(
    path: str | None = None, overrides: typing.Sequence[str] = (), base: Config | None = None
) -> Config:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides, then validation."""
    cfg = base if base is not None else Config()
    if path:
        text = _read_config_file(path)
        where = brief(path, 1024)
        try:
            tree = _load_yaml(text, where)
        except InputError:
            raise
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer too long
            raise InputError(where, f"not valid YAML ({exc.__class__.__name__})") from None
        if tree is not None:
            _apply(cfg, tree, where)
    for item in overrides:
        if "=" not in item:
            raise InputError("--set", f"expected key=value, got {shown(item)}")
        key, value = item.split("=", 1)
        set_key(cfg, key.strip(), value.strip())
    return validate(cfg)


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. a saved run.json)."""
    cfg = Config()
    _apply(cfg, tree, "config")
    return validate(cfg)
