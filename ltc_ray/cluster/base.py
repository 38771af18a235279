"""The one protocol every clustering method follows, and the registry of methods.

A method sees one partition at a time (its rows of the kNN graph) and answers
two questions, scikit-learn style: ``score`` (a per-node density/confidence)
and ``link`` (given every node's score, which edges to merge and which parent
each owned node picked). The pipeline owns scheduling, halos and the merge, so
a method is plain array code that is easy to test without Ray.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ltc_ray.errors import InputError


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
class LinkResult:
    """``parent (n,) int64`` per owned node (-1: root) and merge edges ``src, dst (e,) int64``."""

    parent: np.ndarray
    src: np.ndarray
    dst: np.ndarray


class ClusterMethod(abc.ABC):
    """Base class of all methods; subclasses register themselves by ``name``."""

    name: ClassVar[str]
    params_key: ClassVar[str]  # attribute of ``Config.methods`` holding the params dataclass
    # The threshold ``jobs/tune.py`` searches on a labelled split: (param, low, high, step).
    tunable: ClassVar[tuple[str, float, float, float] | None] = None
    # Halo methods (graph models) score with ``score_halo`` on partition actors that fetch
    # their neighbours' features and reverse edges; the others use ``score`` on their rows.
    needs_halo: ClassVar[bool] = False
    # Methods whose link needs neighbours' features and kNN rows (GCN-E) link with
    # ``link_halo`` on actors over the feature graph instead of ``link`` in tasks.
    needs_link_halo: ClassVar[bool] = False
    # ... and whether those link actors also serve the neighbours' features (GCN-E does;
    # TPDi needs only the rows)
    link_features: ClassVar[bool] = True
    # Whole-graph methods (``cluster.whole_graph.WholeGraphMethod``) cluster all kNN rows
    # in one Ray task with ``cluster_graph`` instead of linking per partition.
    whole_graph: ClassVar[bool] = False
    # Methods that re-score the kNN graph with a model before linking (hard-clusters) run
    # the pipeline's rescore stage (``pipeline.rescore``) instead of ``score``: ``rescore``
    # re-sorts a partition's rows, ``transition_edges`` gives its density contributions.
    rescores_graph: ClassVar[bool] = False
    # The params fields ``score`` depends on (resumable runs reuse stored scores when only
    # other fields change, e.g. a link threshold); None = all of them (always safe).
    score_params: ClassVar[tuple[str, ...] | None] = None
    # fsspec options for the method's own files (a model on object storage); set by
    # ``get_method`` before ``__init__`` runs, so every subclass's loader can use it
    storage_options: dict | None = None
    seed: int = 0  # ``Config.seed``, set by ``get_method`` like ``storage_options``

    def __init__(self, params: Any, k: int):
        self.params = params
        self.k = k

    def check_inputs(self, dim: int, where: str) -> None:  # noqa: B027 - optional hook
        """Refuse inputs the method cannot use (e.g. a model trained for another dim)."""

    def score(self, part: PartitionInput) -> np.ndarray:
        """Per-node score ``(n,) float32`` from the partition's own rows."""
        raise NotImplementedError(f"{self.name} scores with score_halo")

    def score_halo(self, part: Any) -> np.ndarray:
        """Per-node score from a ``pipeline.halo.HaloPartition`` (features + adjacency rows)."""
        raise NotImplementedError(f"{self.name} scores from its own rows")

    @abc.abstractmethod
    def link(self, part: PartitionInput, scores: np.ndarray) -> LinkResult:
        """Parents and merge edges of the owned nodes; ``scores (N,)`` covers all nodes."""


REGISTRY: dict[str, type[ClusterMethod]] = {}


def register(cls: type[ClusterMethod]) -> type[ClusterMethod]:
    REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(REGISTRY)


def get_method(name: str, config: Any, storage_options: dict | None = None) -> ClusterMethod:
    """Instantiate method ``name`` with its parameters from ``config.methods``;
    ``storage_options`` reach the method's model loading (``--model s3://...``)."""
    if name not in REGISTRY:
        choices = ", ".join(method_names())
        raise InputError("--method", f"unknown method '{name}'; choose one of {choices}")
    cls = REGISTRY[name]
    method = cls.__new__(cls)
    method.storage_options = storage_options
    method.seed = int(getattr(config, "seed", 0))  # seeded methods (Infomap, CW) use it
    method.__init__(getattr(config.methods, cls.params_key), config.knn.k)
    return method


def neighbor_density(knn_sims: np.ndarray, m: int) -> np.ndarray:
    """Mean similarity to the first ``m`` neighbours, self (rank 0) excluded: ``(n,) float32``."""
    m = min(m, knn_sims.shape[1] - 1)
    return knn_sims[:, 1 : m + 1].astype(np.float64).mean(axis=1).astype(np.float32)


def higher_ranked(
    node_ids: np.ndarray, node_scores: np.ndarray, nbr_ids: np.ndarray, nbr_scores: np.ndarray
) -> np.ndarray:
    """``(n, m) bool``: neighbour outranks the node in the strict total order
    (score descending, then id ascending), so parent links never form cycles."""
    mine = node_scores[:, None]
    return (nbr_scores > mine) | ((nbr_scores == mine) & (nbr_ids < node_ids[:, None]))


def first_true(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column of the first True per row and whether any exists."""
    return mask.argmax(axis=1), mask.any(axis=1)
