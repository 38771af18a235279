"""Typed job configuration: YAML files plus ``--set key=value`` overrides.

A config is a tree of dataclasses validated once, at the edge: an unknown key,
a value of the wrong type or an out-of-range value is an :class:`InputError`
naming the key, raised before any expensive work starts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ltc_ray.errors import InputError


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


def _yaml_name(name: str) -> str:
    return name.replace("_", "-") if name in _DASHED_METHODS else name


_DASHED_METHODS = ("knn_cc", "density_peak", "gcn_v", "gcn_ve", "hard_clusters",
                   "chinese_whispers", "knn_dbscan")


def _to_yaml_names(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {_yaml_name(k): _to_yaml_names(v) for k, v in tree.items()}
    return tree


def _field_for(cls: type, key: str, where: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    name = key.replace("-", "_")
    if name not in fields:
        known = ", ".join(sorted(_yaml_name(f) for f in fields))
        raise InputError(where, f"unknown config key '{key}' (known here: {known})")
    return fields[name]


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared scalar type (``X | None``: null,
    "none" or "model" mean None — e.g. "use the threshold the model was tuned with")."""
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
        raise InputError(where, f"expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise InputError(where, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if "e" in value.lower() else int(value)
            except ValueError:
                pass
        raise InputError(where, f"expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise InputError(where, f"expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (dict, list)):
            raise InputError(where, f"expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {typ!r}")


def _apply(obj: Any, tree: dict, where: str, prefix: str = "") -> None:
    if not isinstance(tree, dict):
        raise InputError(where, f"expected a mapping at '{prefix or '<top>'}', got {tree!r}")
    hints = typing.get_type_hints(type(obj))
    for key, value in tree.items():
        f = _field_for(type(obj), str(key), f"{where} [{prefix}{key}]")
        typ = hints[f.name]
        path = f"{prefix}{key}"
        if dataclasses.is_dataclass(typ):
            _apply(getattr(obj, f.name), value, where, path + ".")
        else:
            setattr(obj, f.name, _coerce(value, typ, f"{where} [{path}]"))


def set_key(cfg: Config, dotted: str, raw_value: str, where: str = "--set") -> None:
    """Apply one ``key.sub=value`` override (value parsed as YAML scalar)."""
    try:
        value = yaml.safe_load(raw_value) if raw_value != "" else ""
    except yaml.YAMLError:
        value = raw_value
    parts = dotted.split(".")
    tree: Any = value
    for part in reversed(parts):
        tree = {part: tree}
    _apply(cfg, tree, where)


def validate(cfg: Config) -> Config:
    """Range and choice checks that need no data."""
    for dotted, choices in _CHOICES.items():
        value = _get(cfg, dotted)
        if value not in choices:
            allowed = ", ".join(choices)
            raise InputError(f"config {dotted}", f"must be one of {allowed}, got {value!r}")
    positive = {
        "dim": cfg.dim,
        "knn.k": cfg.knn.k,
        "knn.block_rows": cfg.knn.block_rows,
        "knn.cpus_per_actor": cfg.knn.cpus_per_actor,
        "knn.nprobe": cfg.knn.nprobe,
        "cluster.partition_rows": cfg.cluster.partition_rows,
        "methods.density-peak.neighbors": cfg.methods.density_peak.neighbors,
        "methods.gcn-v.batch_rows": cfg.methods.gcn_v.batch_rows,
        "methods.gcn-ve.batch_rows": cfg.methods.gcn_ve.batch_rows,
        "methods.gcn-ve.batch_size": cfg.methods.gcn_ve.batch_size,
        "methods.hard-clusters.density_k": cfg.methods.hard_clusters.density_k,
        "methods.hard-clusters.density_sigma": cfg.methods.hard_clusters.density_sigma,
        "methods.hard-clusters.eps": cfg.methods.hard_clusters.eps,
        "methods.hard-clusters.max_iter": cfg.methods.hard_clusters.max_iter,
        "methods.hard-clusters.tpdi_sigma": cfg.methods.hard_clusters.tpdi_sigma,
        "methods.hard-clusters.batch_size": cfg.methods.hard_clusters.batch_size,
        "methods.hard-clusters.halo_bytes": cfg.methods.hard_clusters.halo_bytes,
        "methods.infomap.trials": cfg.methods.infomap.trials,
        "methods.chinese-whispers.iterations": cfg.methods.chinese_whispers.iterations,
        "methods.knn-dbscan.eps": cfg.methods.knn_dbscan.eps,
        "methods.knn-dbscan.min_samples": cfg.methods.knn_dbscan.min_samples,
        "methods.aro.neighbors": cfg.methods.aro.neighbors,
        "methods.cdp.max_size": cfg.methods.cdp.max_size,
        "methods.cdp.step": cfg.methods.cdp.step,
        "methods.hac.max_rounds": cfg.methods.hac.max_rounds,
        "methods.kmeans.niter": cfg.methods.kmeans.niter,
        "methods.kmeans.nredo": cfg.methods.kmeans.nredo,
    }
    for key, value in positive.items():
        if value <= 0:
            raise InputError(f"config {key}", f"must be positive, got {value}")
    non_negative = {
        "seed": cfg.seed,
        "knn.shards": cfg.knn.shards,
        "knn.nlist": cfg.knn.nlist,
        "knn.max_in_flight": cfg.knn.max_in_flight,
        "knn.recall_sample": cfg.knn.recall_sample,
        "cluster.partitions": cfg.cluster.partitions,
        "methods.kmeans.n_clusters": cfg.methods.kmeans.n_clusters,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise InputError(f"config {key}", f"must be >= 0, got {value}")
    if cfg.knn.k < 2:
        raise InputError("config knn.k", f"must be >= 2 (self + 1 neighbour), got {cfg.knn.k}")
    if cfg.knn.backend == "torch" and cfg.knn.index != "flat":
        raise InputError("config knn.backend", "torch searches exactly; it needs knn.index flat")
    for key in ("methods.knn-cc.threshold", "methods.density-peak.tau", "methods.gcn-v.tau",
                "methods.gcn-v.tau2", "methods.gcn-ve.tau", "methods.infomap.threshold",
                "methods.chinese-whispers.threshold", "methods.cdp.threshold",
                "methods.hac.threshold", "methods.kmeans.threshold"):
        value = _get(cfg, key)
        if value is not None and not -1.0 <= value <= 1.0:
            raise InputError(f"config {key}", f"is a cosine similarity in [-1, 1], got {value}")
    damping = cfg.methods.hard_clusters.damping
    if not 0.0 <= damping < 1.0:
        raise InputError("config methods.hard-clusters.damping",
                         f"must be in [0, 1), got {damping}")
    tau_hc = cfg.methods.hard_clusters.tau
    if tau_hc is not None and not 0.0 <= tau_hc <= 2.0:
        raise InputError("config methods.hard-clusters.tau",
                         f"is a TPDi distance threshold in [0, 2], got {tau_hc}")
    rho = cfg.methods.gcn_ve.rho
    if rho is not None and not 0.0 <= rho <= 1.0:
        raise InputError("config methods.gcn-ve.rho", f"is a share in [0, 1], got {rho}")
    return cfg


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part.replace("-", "_"))
    return obj


def load_config(
    path: str | None = None, overrides: typing.Sequence[str] = (), base: Config | None = None
) -> Config:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides, then validation."""
    cfg = base if base is not None else Config()
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                tree = yaml.safe_load(fh)
        except FileNotFoundError:
            raise InputError(path, "config file not found") from None
        except yaml.YAMLError as exc:
            raise InputError(path, f"not valid YAML ({exc.__class__.__name__})") from None
        if tree is not None:
            _apply(cfg, tree, path)
    for item in overrides:
        if "=" not in item:
            raise InputError("--set", f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        set_key(cfg, key.strip(), value.strip())
    return validate(cfg)


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. a saved run.json)."""
    cfg = Config()
    _apply(cfg, tree, "config")
    return validate(cfg)

