"""The one protocol every clustering method follows, and the registry of methods.

A method declares what it needs in ONE typed place, its :class:`Shape`: how its per-node
scores are computed (from its own kNN rows, from a one-hop halo of features on partition
actors, or by a re-scoring stage it runs itself), how it links (per partition from its own
rows, per partition with a halo of neighbours' rows and features, or over the whole graph
in one task), which graph it links on (the scored graph, a second kNN over the node
features its score stage emits, or a second kNN over the input features with its own k),
its params and its tunable threshold. The pipeline compiles the shape once into stages
(``pipeline.executor``); it never reads an attribute the shape does not declare, never
compares method names, and never imports a method's internals.

The hooks a shape calls (scikit-learn style; each returns plain arrays, testable without
Ray):

=================  ============================================================
shape              hook the method implements
=================  ============================================================
score "rows"       ``score(part: PartitionInput) -> (n,) float32``
score "halo"       ``score_halo(part: HaloPartition) -> ScoreOutput``
score "rescore"    ``rescore_graph(ctx: RescoreContext) -> RescoreOutput``
score "stage"      ``stage_scores(ctx: RescoreContext) -> StageOutput`` (its own stage:
                   e.g. proposals scored on actors; files under ``ctx.out_dir``)
link "rows"        ``link(part: PartitionInput, scores (N,)) -> LinkResult``
link "halo"        ``link_halo(part: LinkHaloPartition, scores, context) -> LinkResult``
link "whole-graph" ``cluster_graph(knn_ids, knn_sims, features) -> labels (N,)``
link "stage"       ``stage_links(ctx: LinkStageContext) -> LinkStageOutput`` (its own
                   distributed link step; the global merge follows as for any link)
link_reduce        ``link_context(scores (N,)) -> value`` passed to every ``link_halo``
=================  ============================================================

A method is registered with :func:`register`; its params dataclass (fields declared with
:func:`ltc_ray.params.param`, so ranges and choices are validated by the config loader) is
the class attribute ``Params``. Construction is cheap (no I/O); :meth:`ClusterMethod.load`
reads a model, once, before any work.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from ltc_ray.errors import InputError
from ltc_ray.graph.ranking import first_true, higher_ranked  # noqa: F401 (re-exported)
from ltc_ray.graph.similarity_stats import SimilarityStats, derive
from ltc_ray.params import Auto, auto_fields
from ltc_ray.plan_model import PlanContext, PlanStage, shape_stages

ScoreShape = Literal["rows", "halo", "rescore", "stage"]
LinkShape = Literal["rows", "halo", "whole-graph", "stage"]
LinkGraph = Literal["scored", "node-features", "input"]

# hooks each shape needs (checked when a method is registered and when it is compiled)
SCORE_HOOKS = {"rows": "score", "halo": "score_halo", "rescore": "rescore_graph",
               "stage": "stage_scores"}
LINK_HOOKS = {"rows": "link", "halo": "link_halo", "whole-graph": "cluster_graph",
              "stage": "stage_links"}


@dataclass(frozen=True)
class Tunable:
    """The threshold ``jobs/tune.py`` searches on a labelled split: ``param`` over
    ``[low, high]`` in steps of ``step``."""

    param: str
    low: float
    high: float
    step: float


@dataclass(frozen=True)
class Shape:
    """How the pipeline runs a method (see the module docstring for the hooks)."""

    score: ScoreShape = "rows"
    link: LinkShape = "rows"
    # the graph the link step reads: the one scoring ran on (the input kNN graph, or the
    # graph a "rescore" stage wrote), a second kNN over the node features the halo score
    # stage emits, or a second kNN over the input features with ``link_k`` neighbours
    link_graph: LinkGraph = "scored"
    link_k: int | None = None  # k of a second graph (None: the config's knn.k)
    # a "halo" score (ScoreOutput) or a "rescore" stage (RescoreOutput) also emits node
    # features (written as parts under the context's ``feature_dir``)
    node_features: bool = False
    # link "halo": the actors also serve the neighbours' node features (else only rows)
    link_halo_features: bool = False
    link_reduce: bool = False  # link "halo": ``link_context`` over all scores first
    whole_graph_features: bool = False  # link "whole-graph": the feature matrix too
    # link "halo" without features: the neighbours' rows are fetched at once up to this
    # many bytes, else per block of anchors (memory bounded, same results)
    halo_bytes: int | None = None
    # the params fields the score depends on (a rerun reuses stored scores when only other
    # fields change, e.g. a link threshold); None = all of them (always safe)
    score_params: tuple[str, ...] | None = None
    uses_model: bool = False  # params.model names a model directory (its hash is a key)
    tunable: Tunable | None = None
    # ``cluster.attach_singletons: auto``: None = on for label-free methods, off for learned
    # ones; a method whose domain-shift results say otherwise sets it (map-equation: on)
    attach_singletons: bool | None = None


@dataclass
class PartitionInput:
    """Rows ``[start, stop)`` of the kNN graph: ``knn_ids (n, k)``, ``knn_sims (n, k) float32``,
    sorted by similarity descending with self at rank 0."""

    start: int
    stop: int
    knn_ids: np.ndarray
    knn_sims: np.ndarray

    @property
    def node_ids(self) -> np.ndarray:
        return np.arange(self.start, self.stop, dtype=np.int64)


@dataclass
class HaloPartition:
    """What a "halo" scorer sees for owned rows ``[start, stop)``: ``adj (n, m)`` float32 CSR
    holds the owned rows of the row-normalised adjacency over columns ``cols (m,)`` (sorted
    global ids, owned and halo); ``x_cols (m, d)`` their features; ``x (n, d)`` the owned
    features; ``device`` the torch device Ray assigned to the actor ("cpu" or "cuda")."""

    start: int
    stop: int
    knn_ids: np.ndarray
    knn_sims: np.ndarray
    x: np.ndarray
    adj: Any
    cols: np.ndarray
    x_cols: np.ndarray
    device: str = "cpu"


@dataclass
class LinkHaloPartition:
    """Owned rows ``[start, stop)`` of the link graph plus lookups serving the node
    features (``feats_of``; None when the shape does not ask for them) and the kNN rows
    (``rows_of``) of any node in the owned rows' neighbourhood."""

    start: int
    stop: int
    knn_ids: np.ndarray
    knn_sims: np.ndarray
    feats_of: Any
    rows_of: Any


@dataclass
class ScoreOutput:
    """A "halo" scorer's result: ``scores (n,) float32`` and, when the shape declares
    ``node_features``, the owned nodes' features ``(n, width) float32``."""

    scores: np.ndarray
    node_features: np.ndarray | None = None


@dataclass
class StageTools:
    """The pipeline's machinery a method's own stage ("rescore", "stage") may use, handed
    in so that a method never imports the pipeline:

    - ``start_actors(info | None, graph, ranges, cpus, gpus) -> (actors, bounds)``: one
      partition actor per range serving its kNN rows (and features with ``info``);
      ``actor.run.remote(job, actors, bounds, index, *args)`` runs
      ``job(actor, fetch, *args)`` there, ``fetch(sorted ids) -> (feats_of, rows_of)``
      fetching any nodes from their owners; kill the actors when done;
    - ``build_graph(info, knn_config, directory) -> KnnManifest``: a sharded kNN graph;
    - ``save_array(uri, *part_refs) -> ref (bytes, sha256)``: parts concatenated, saved;
    - ``load_array(uri, sha256 | None) -> ref``: a saved array (checked), in a worker;
    - ``slice_rows(ref, lo, hi) -> ref``.
    """

    start_actors: Any = None
    build_graph: Any = None
    save_array: Any = None
    load_array: Any = None
    slice_rows: Any = None


@dataclass
class RescoreContext:
    """What a "rescore" or "stage" score stage gets: the inputs, the graph, the
    partitions, the cluster's CPUs/GPUs, where to write (the re-scored graph, blocks =
    partitions; or the stage's own files) and what a second kNN it builds needs."""

    features: Any  # io.features.FeatureInfo
    graph: Any  # graph.knn_graph.KnnManifest
    ranges: list[tuple[int, int]]
    cpus: float
    gpus: float
    out_dir: str
    knn_config: Any = None  # config.KnnConfig of the run
    resources: dict = field(default_factory=dict)  # the cluster's resources (Ray)
    seed: int = 0
    tools: StageTools = field(default_factory=StageTools)
    # where a "rescore" stage whose shape emits ``node_features`` writes them
    # (:func:`ltc_ray.io.features.write_feature_part`, one part per partition)
    feature_dir: str | None = None


@dataclass
class RescoreOutput:
    """Per-partition score refs, the re-scored graph (its manifest, saved), stats
    (``actor_peak_rss_bytes`` a list, the rest recorded as is) and, when the shape emits
    ``node_features``, the parts written under ``feature_dir`` and their width."""

    scores: list
    graph: Any
    stats: dict = field(default_factory=dict)
    feature_parts: list | None = None
    feature_width: int = 0


@dataclass
class StageOutput:
    """A "stage" scorer's result: per-partition node-score refs, the files under its
    ``out_dir`` the link step reads (recorded with their sha256, so a damaged one is
    computed again), small JSON ``meta`` handed to the link step (also on reuse) and
    stats (``actor_peak_rss_bytes`` a list, the rest recorded as is)."""

    scores: list
    artifacts: list[str]
    meta: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


@dataclass
class LinkStageContext:
    """What a "stage" linker gets: the inputs, the graph, the partitions, the score refs,
    the cluster's CPUs/GPUs, the score stage's directory and ``meta`` (a "stage" scorer)
    and the storage options of the run's files."""

    features: Any
    graph: Any
    ranges: list[tuple[int, int]]
    scores: list
    cpus: float
    gpus: float
    score_dir: str | None = None
    score_meta: dict = field(default_factory=dict)
    storage_options: dict | None = None
    score_digests: dict = field(default_factory=dict)  # sha256 by file of the score stage
    tools: StageTools = field(default_factory=StageTools)


@dataclass
class LinkStageOutput:
    """Per-partition refs to ``parent (n,) int64`` and merge edges ``(src, dst)``, and
    stats recorded with the link stage."""

    parents: list
    edges: list
    stats: dict = field(default_factory=dict)


@dataclass
class LinkResult:
    """``parent (n,) int64`` per owned node (-1: root) and merge edges ``src, dst (e,) int64``."""

    parent: np.ndarray
    src: np.ndarray
    dst: np.ndarray


class lazy_module:  # noqa: N801 - used like a module attribute
    """A class attribute naming a module that is imported on first access: a trainer
    imports Ray and torch, and the CLI's input checks (every method's class is loaded for
    the config) must stay fast."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj: object, owner: type) -> Any:
        import importlib

        return importlib.import_module(self.name)


class ClusterMethod:
    """Base class of all methods; a subclass sets ``name``, ``Params`` and ``shape`` (or
    overrides :meth:`compile_shape` when the shape depends on params) and implements the
    hooks its shape calls."""

    name: ClassVar[str]
    Params: ClassVar[type]  # the params dataclass (``config.methods.<name>``)
    shape: ClassVar[Shape] = Shape()
    # learned methods: the module ``jobs/train.py`` runs, with ``train_config(options: dict,
    # seed) -> config`` (the train flags, refused with InputError) and ``train(ctx:
    # cluster.training.TrainContext) -> meta`` (writes the model directory ctx.output)
    # (a :class:`lazy_module`, so that checking inputs never imports Ray or torch)
    trainer: ClassVar[Any] = None
    # the sub-directories of a model directory holding weights + model.json ("" = itself)
    model_dirs: ClassVar[tuple[str, ...]] = ("",)

    def __init__(self, params: Any, k: int, seed: int = 0,
                 storage_options: dict | None = None):
        self.params = params
        self.k = k
        self.seed = seed  # ``Config.seed``: seeded methods (Infomap, CW) use it
        self.storage_options = storage_options  # for the method's own files (a model)
        self.shape = self.compile_shape()
        check_hooks(type(self), self.shape)

    def compile_shape(self) -> Shape:
        """The shape of this instance (params may change it: GCN-V's feature pass)."""
        return type(self).shape

    def load(self) -> None:  # noqa: B027 - optional hook
        """Read what the method needs before work starts (a model); errors are InputError."""

    def check_inputs(self, dim: int, where: str) -> None:  # noqa: B027 - optional hook
        """Refuse inputs the method cannot use (e.g. a model trained for another dim)."""

    def with_params(self, **values: Any) -> ClusterMethod:
        """A copy with some params replaced (an ``auto`` value once derived); a loaded
        model is shared, not read again."""
        new = copy.copy(self)
        new.params = dataclasses.replace(self.params, **values)
        return new

    def derive_params(self, stats: SimilarityStats, fields: dict[str, Auto]
                      ) -> dict[str, tuple[Any, dict]]:
        """``{field: (value, basis)}`` for the ``auto`` params ``fields`` on a graph's
        similarity ``stats``: each field's own rule (:func:`derive`); a method whose
        rules depend on each other (ARO: the threshold on the list length) overrides."""
        return {name: derive(rule, stats) for name, rule in fields.items()}

    def resolved(self, stats: SimilarityStats) -> tuple[ClusterMethod, dict[str, dict]]:
        """This method with every ``auto`` param derived on ``stats`` and, per derived
        field, ``{"value", "rule", ...the anchors}`` (what run.json records)."""
        rules = auto_fields(self.params)
        if not rules:
            return self, {}
        values, record = {}, {}
        for name, (value, basis) in self.derive_params(stats, rules).items():
            values[name] = value
            record[name] = {"value": value, **basis,
                            "rule": basis.get("rule") or rules[name].describe()}
        return self.with_params(**values), record

    def training_graph(self) -> dict | None:
        """The similarity summary of the graph a loaded model was trained on
        (``graph_stats`` in its model.json), for the shift check; None: no model or an
        older model without one."""
        meta = getattr(self, "meta", None)
        stats = meta.get("graph_stats") if isinstance(meta, dict) else None
        return stats if isinstance(stats, dict) else None

    def model_uri(self) -> str | None:
        """The model directory the params name (shapes with ``uses_model``), else None."""
        return (self.params.model or None) if self.shape.uses_model else None

    def plan(self, ctx: PlanContext) -> list[PlanStage]:
        """The method's stages in a dry-run plan (what runs, per-worker memory, expected
        seconds), derived from its shape; a method with a memory model of its own overrides
        it. Called without :meth:`load`: model metadata falls back to defaults."""
        return shape_stages(self, ctx)


REGISTRY: dict[str, type[ClusterMethod]] = {}


def check_hooks(cls: type, shape: Shape) -> None:
    """Refuse a method class that lacks a hook its shape calls."""
    needed = [SCORE_HOOKS[shape.score], LINK_HOOKS[shape.link]]
    if shape.link_reduce:
        needed.append("link_context")
    missing = [hook for hook in needed if not callable(getattr(cls, hook, None))]
    if missing:
        raise TypeError(f"method {cls.__name__} declares {shape} but lacks {missing}")


def register(cls: type[ClusterMethod]) -> type[ClusterMethod]:
    """Add a method to the registry (checks its name, params dataclass and hooks)."""
    if not dataclasses.is_dataclass(getattr(cls, "Params", None)):
        raise TypeError(f"method {cls.__name__} needs a Params dataclass")
    check_hooks(cls, cls.shape)
    REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(REGISTRY)


def method_class(name: str) -> type[ClusterMethod]:
    """The registered class of ``name``; an unknown name is an InputError listing them."""
    if name not in REGISTRY:
        choices = ", ".join(method_names())
        raise InputError("--method", f"unknown method '{name}'; choose one of {choices}")
    return REGISTRY[name]


def get_method(name: str, config: Any, storage_options: dict | None = None,
               load: bool = True) -> ClusterMethod:
    """Method ``name`` with its params from ``config.methods`` (its model read when
    ``load``); ``storage_options`` reach the method's own files (``--model s3://...``)."""
    cls = method_class(name)
    method = cls(config.methods.of(name), config.knn.k, seed=int(config.seed),
                 storage_options=storage_options)
    if load:
        method.load()
    return method


def halo_fits(halo_rows: int, row_bytes: int, halo_bytes: int | None) -> bool:
    """Whether an actor fetches its whole halo at once (``halo_bytes`` None: always);
    otherwise it fetches per chunk of rows (edge actors) or per block of anchors (link
    actors) -- the meaning of :attr:`Shape.halo_bytes`."""
    return halo_bytes is None or halo_rows * row_bytes <= halo_bytes


def neighbor_density(knn_sims: np.ndarray, m: int) -> np.ndarray:
    """Mean similarity to the first ``m`` neighbours, self (rank 0) excluded: ``(n,) float32``."""
    m = min(m, knn_sims.shape[1] - 1)
    return knn_sims[:, 1 : m + 1].astype(np.float64).mean(axis=1).astype(np.float32)


def nearest_higher_kept(node_ids: np.ndarray, ids: np.ndarray, kept: np.ndarray,
                        scores: np.ndarray) -> np.ndarray:
    """Per row, the first (most similar) neighbour among the ``kept`` cells ``(n, m)`` of
    ``ids`` that outranks the row's node (score, then smaller id); -1 when none: the
    ``parent`` of the edge-keeping methods (knn-cc, aro), a tree towards dense members."""
    safe = np.where(ids >= 0, ids, 0)
    outranks = higher_ranked(node_ids, scores[node_ids], ids, scores[safe]) & kept
    col, has = first_true(outranks)
    return np.where(has, ids[np.arange(len(ids)), col], -1)
