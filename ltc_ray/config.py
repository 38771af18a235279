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
from dataclasses import dataclass, field
from typing import Any

import yaml

from ltc_ray.errors import ECHO_CHARS, InputError, brief


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


@dataclass
class KnnCCParams:
    """Keep kNN edges with similarity >= threshold; clusters = connected components."""

    threshold: float = 0.70  # tuned on synthetic part0_train (jobs/tune.py), see README


@dataclass
class DensityPeakParams:
    """Score = mean similarity to the first ``neighbors`` neighbours (self excluded; capped
    at k - 1);
    link each node to its nearest neighbour of strictly higher score when sim > tau."""

    neighbors: int = 10
    tau: float = 0.64  # tuned on synthetic part0_train (jobs/tune.py), see README


@dataclass
class GCNVParams:
    """GCN-V: a trained model's confidence, then density-peak-style linking."""

    model: str = ""  # model directory written by jobs/train.py (required; --model URI)
    tau: float | None = None  # link when cosine > tau; None = the tau tuned with the model
    # link on a new kNN of the GCN's own 512-d features (the paper's pass, threshold tau2);
    # off by default: on the synthetic benchmark it scores better on train, worse on test
    feature_pass: bool = False
    tau2: float | None = None  # threshold of the feature pass; None = tuned with the model
    batch_rows: int = 65536  # inference rows per forward pass inside a partition


@dataclass
class GCNVEParams:
    """GCN-V + GCN-E: a model directory from ``jobs/train.py --method gcn-ve``."""

    model: str = ""  # directory holding gcn-v/ and gcn-e/ (required; --model URI)
    rho: float | None = None  # share of most confident nodes that use GCN-E; None = trained
    tau: float | None = None  # keep a parent edge when cosine (GCN features) > tau
    batch_rows: int = 65536  # GCN-V inference rows per forward pass
    batch_size: int = 256  # GCN-E candidate subgraphs per forward pass


@dataclass
class HardClustersParams:
    """hard-clusters (Chen et al. 2022): a model directory from ``jobs/train.py --method
    hard-clusters`` (edge scorer), NDDE density and TPDi-distance density-peak linking."""

    model: str = ""  # edge scorer directory (required; --model URI)
    tau: float | None = None  # keep a parent edge when TPDi < tau; None = recorded with model
    density: str = "approximate"  # NDDE: approximate (one step) | iterative (diffusion)
    density_k: int = 20  # neighbours in the NDDE transition rows (self included)
    density_sigma: float = 0.5  # NDDE softmax temperature on d' = 1 - p
    damping: float = 0.1  # iterative NDDE: rho <- d rho + (1 - d) P^T rho
    eps: float = 0.05  # iterative NDDE: stop when ||delta rho||_1 < eps
    max_iter: int = 100  # iterative NDDE: iterations at most
    tpdi_sigma: float = 0.05  # TPDi softmax temperature on d'
    batch_size: int = 256  # anchors per edge-scorer forward pass (each pass is padded to it)
    # halo an edge or link actor fetches at once (features; re-scored rows); a larger halo
    # (rows in random order at scale: the whole corpus) is fetched per chunk of rows
    # instead, with more requests and the same results
    halo_bytes: int = 1 << 28


@dataclass
class InfomapParams:
    """Infomap on the kNN graph with edges of cosine >= threshold, weighted by cosine
    (two-level, undirected, seeded by ``seed``); one process, see cluster/whole_graph.py."""

    threshold: float = 0.59  # tuned on synthetic part0_train (jobs/tune.py), see README
    trials: int = 2  # Infomap trials (the best partition is kept)


@dataclass
class ChineseWhispersParams:
    """Chinese whispers on the kNN graph with edges of cosine >= threshold (cosine-weighted
    votes, a seeded random half of the nodes updated per round)."""

    threshold: float = 0.54  # tuned on synthetic part0_train (jobs/tune.py), see README
    iterations: int = 20  # rounds at most (stops early when no label would change)


@dataclass
class KnnDBSCANParams:
    """DBSCAN on the kNN cosine-distance graph: core = >= min_samples points (self included)
    within eps in the kNN row; border points join their nearest core; noise = singletons."""

    eps: float = 0.29  # tuned on synthetic part0_train (jobs/tune.py), see README
    min_samples: int = 4


@dataclass
class AROParams:
    """Approximate rank-order (Otto et al.) over each node's top ``neighbors`` list; link
    pairs with rank-order distance <= threshold, clusters = connected components."""

    threshold: float = 1.25  # tuned on synthetic part0_train (jobs/tune.py), see README
    neighbors: int = 20  # list length m (capped at k); cost O(N m^2)


@dataclass
class CDPParams:
    """CDP-style linkage: components of edges with cosine >= threshold, re-cut with the
    threshold raised by ``step`` while larger than ``max_size``."""

    threshold: float = 0.68  # tuned on synthetic part0_train (jobs/tune.py), see README
    max_size: int = 300
    step: float = 0.05


@dataclass
class HACParams:
    """Average-linkage HAC on the kNN graph (missing pairs = similarity 0), merging while
    the average cosine is >= threshold (distance 1 - threshold)."""

    threshold: float = 0.21  # tuned on synthetic part0_train (jobs/tune.py), see README
    max_rounds: int = 1000  # reciprocal-pair merge rounds at most


@dataclass
class KMeansParams:
    """Spherical faiss k-means on the features; K and the starting centroids from the
    components of kNN edges with cosine >= threshold, unless n_clusters > 0."""

    threshold: float = 0.71  # tuned on synthetic part0_train (jobs/tune.py), see README
    n_clusters: int = 0  # > 0: fixed K with seeded random init (nredo restarts)
    niter: int = 20
    nredo: int = 3


@dataclass
class MethodsConfig:
    knn_cc: KnnCCParams = field(default_factory=KnnCCParams)
    density_peak: DensityPeakParams = field(default_factory=DensityPeakParams)
    gcn_v: GCNVParams = field(default_factory=GCNVParams)
    gcn_ve: GCNVEParams = field(default_factory=GCNVEParams)
    hard_clusters: HardClustersParams = field(default_factory=HardClustersParams)
    infomap: InfomapParams = field(default_factory=InfomapParams)
    chinese_whispers: ChineseWhispersParams = field(default_factory=ChineseWhispersParams)
    knn_dbscan: KnnDBSCANParams = field(default_factory=KnnDBSCANParams)
    aro: AROParams = field(default_factory=AROParams)
    cdp: CDPParams = field(default_factory=CDPParams)
    hac: HACParams = field(default_factory=HACParams)
    kmeans: KMeansParams = field(default_factory=KMeansParams)


@dataclass
class ClusterConfig:
    """Partitioning of the per-node work and the global merge."""

    partitions: int = 0  # 0 = ceil(N / partition_rows), at least one per CPU
    partition_rows: int = 262144
    merge: str = "auto"  # auto | local (one scipy pass over all edges) | forest
    merge_local_max_edges: int = 20_000_000  # auto: local below this many edges, else forest


@dataclass
class Config:
    method: str = "density-peak"
    seed: int = 0
    dim: int = 256  # feature dim of .bin inputs (npy/parquet carry their own)
    knn: KnnConfig = field(default_factory=KnnConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_yaml_names(dataclasses.asdict(self))


_CHOICES = {
    "knn.index": ("flat", "ivf"),
    "knn.mode": ("auto", "shard", "replicate"),
    "knn.gpu": ("auto", "never"),
    "knn.backend": ("auto", "faiss", "torch"),
    "knn.precision": ("auto", "fp32", "fp16", "bf16"),
    "cluster.merge": ("auto", "local", "forest"),
    "methods.hard-clusters.density": ("approximate", "iterative"),
}

MAX_CONFIG_BYTES = 256 * 1024  # a config file is a few kB; refuse anything near a MiB
MAX_INT = 1 << 62  # no integer key may exceed this, whatever its own range says
_METHOD_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


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


_COSINE = Range(-1.0, 1.0, what="a cosine similarity")
_SHARE = Range(0.0, 1.0, what="a share")
_POSITIVE = Range(0, None, low_open=True)
_SIGMA = Range(1e-6, 1e6, what="a softmax temperature")
_WORKERS = 4096  # actors, shards, CPUs per actor: more than any cluster has
_NEIGHBOURS = 4096  # kNN lists longer than this do not fit in memory at scale
_ROWS = 1 << 24  # rows per batch/block: 16M rows of the smallest payload are GBs
_ROUNDS = 100_000  # iterations/rounds: more would run for days

# Every numeric key of Config (YAML names), its valid values. test_config checks that
# every int/float field of every dataclass above has an entry.
RANGES: dict[str, Range] = {
    "seed": Range(0, (1 << 31) - 2, why_high="faiss and Infomap take 32-bit seeds"),
    "dim": Range(1, 65536),
    "knn.k": Range(2, _NEIGHBOURS, why_low="self + 1 neighbour"),
    "knn.nlist": Range(0, 1 << 20),
    "knn.nprobe": Range(1, 1 << 20),
    "knn.shards": Range(0, _WORKERS),
    "knn.shard_max_bytes": Range(1 << 20, 1 << 50,
                                 why_low="1 MiB: smaller shards would start an actor per "
                                         "handful of rows"),
    "knn.cpus_per_actor": Range(1, _WORKERS),
    "knn.block_rows": Range(1, _ROWS),
    "knn.max_in_flight": Range(0, _WORKERS),
    "knn.recall_sample": Range(0, 1 << 20),
    "methods.knn-cc.threshold": _COSINE,
    "methods.density-peak.neighbors": Range(1, _NEIGHBOURS),
    "methods.density-peak.tau": _COSINE,
    "methods.gcn-v.tau": _COSINE,
    "methods.gcn-v.tau2": _COSINE,
    "methods.gcn-v.batch_rows": Range(1, _ROWS),
    "methods.gcn-ve.rho": _SHARE,
    "methods.gcn-ve.tau": _COSINE,
    "methods.gcn-ve.batch_rows": Range(1, _ROWS),
    "methods.gcn-ve.batch_size": Range(1, 1 << 16),
    "methods.hard-clusters.tau": Range(0.0, 2.0, what="a TPDi distance threshold"),
    "methods.hard-clusters.density_k": Range(1, _NEIGHBOURS),
    "methods.hard-clusters.density_sigma": _SIGMA,
    "methods.hard-clusters.damping": Range(0.0, 1.0, high_open=True, what="a damping factor"),
    "methods.hard-clusters.eps": _POSITIVE,
    "methods.hard-clusters.max_iter": Range(1, _ROUNDS),
    "methods.hard-clusters.tpdi_sigma": _SIGMA,
    "methods.hard-clusters.batch_size": Range(1, 1 << 16),
    "methods.hard-clusters.halo_bytes": Range(1, 1 << 50),
    "methods.infomap.threshold": _COSINE,
    "methods.infomap.trials": Range(1, 1000),
    "methods.chinese-whispers.threshold": _COSINE,
    "methods.chinese-whispers.iterations": Range(1, _ROUNDS),
    "methods.knn-dbscan.eps": Range(0.0, 2.0, low_open=True, what="a cosine distance"),
    "methods.knn-dbscan.min_samples": Range(1, 1 << 16),
    "methods.aro.threshold": Range(0.0, None, what="a rank-order distance"),
    "methods.aro.neighbors": Range(1, _NEIGHBOURS),
    "methods.cdp.threshold": _COSINE,
    "methods.cdp.max_size": Range(1, 1 << 40),
    "methods.cdp.step": Range(1e-4, 2.0, why_low="a smaller step re-cuts the graph up to "
                                                 "2/step times"),
    "methods.hac.threshold": _COSINE,
    "methods.hac.max_rounds": Range(1, _ROUNDS),
    "methods.kmeans.threshold": _COSINE,
    "methods.kmeans.n_clusters": Range(0, _ROWS),
    "methods.kmeans.niter": Range(1, 10_000),
    "methods.kmeans.nredo": Range(1, 100),
    "cluster.partitions": Range(0, 1 << 16),
    "cluster.partition_rows": Range(1, 1 << 31),
    "cluster.merge_local_max_edges": Range(0, 1 << 40),
}

# Numeric command-line flags of the jobs (cli.py), checked the same way.
FLAG_RANGES: dict[str, Range] = {
    "--dim": RANGES["dim"],
    "--num-cpus": Range(1, 1 << 16),
    "--epochs": Range(1, 10_000),
    "--edge-epochs": Range(1, 10_000),
    "--lr": Range(0.0, 1.0, low_open=True, what="a learning rate"),
    "--rho": _SHARE,
    "--batch-rows": Range(0, _ROWS),
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
    return name.replace("_", "-") if name in _DASHED_METHODS else name


_DASHED_METHODS = ("knn_cc", "density_peak", "gcn_v", "gcn_ve", "hard_clusters",
                   "chinese_whispers", "knn_dbscan")


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
        if dataclasses.is_dataclass(base):
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
        if dataclasses.is_dataclass(typ):
            _apply(getattr(obj, f.name), value, where, path + ".")
        else:
            setattr(obj, f.name, _coerce(value, typ, f"{where} [{path}]"))


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
        if value is None:
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
