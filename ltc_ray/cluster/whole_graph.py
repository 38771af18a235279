"""The hook for methods that cluster the whole kNN graph in one process.

Infomap, Chinese whispers, HAC, kNN-DBSCAN, approximate rank-order and CDP need the
whole graph at once (a label moves along any path; a merge changes every neighbour's
linkage). Such a method subclasses :class:`WholeGraphMethod` (shape link "whole-graph") and
implements ``cluster_graph(knn_ids, knn_sims, features) -> labels (N,)``. The executor
(``pipeline.executor``) then:

1. scores every partition as usual (``score`` = mean cosine to the 10 nearest
   neighbours, the same density as knn-cc), in parallel;
2. runs ONE Ray task that reads all kNN rows from the graph files (never the driver;
   the driver holds only refs), calls ``cluster_graph`` and turns the labels into
   dense cluster ids, the summary and a ``parent`` per node with
   :func:`labels_to_clusters` (parent = the cluster's representative, i.e. its
   highest-score member, and -1 for the representative itself);
3. writes the same Parquet parts, summary and metrics as every other method.

Memory bound of that one task (N rows, k neighbours, E = N*(k-1) directed edges):
the kNN rows take 8 bytes per edge (int32 id + float32 similarity; 12 with int64
ids) and are held twice while the per-block files are concatenated; the symmetric
sparse graph a method builds takes at most 2*E entries of 8 bytes (int32 index +
float32 weight) plus int64 temporaries while it is built. Budget about 64 bytes
per kNN edge plus the method's own structures (Infomap: roughly another 50-100
bytes per kept undirected link inside the C++ library): MS1M part1 (584K x 80, 46M
edges) needs ~3 GB on one worker, the 5.21M x 80 benchmark (412M edges) ~26 GB.
These methods are inherently single-process and say so; everything around them
(kNN, scoring, writing) stays distributed.
"""

from __future__ import annotations

import abc

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from ltc_ray.cluster.base import ClusterMethod, PartitionInput, Shape, Tunable, neighbor_density
from ltc_ray.cluster.components import dense_cluster_ids, representatives

SCORE_NEIGHBORS = 10


def whole_graph_shape(tunable: Tunable | None, whole_graph_features: bool = False) -> Shape:
    """The shape of a whole-graph method: the neighbour-density score, one link task."""
    return Shape(score="rows", link="whole-graph", score_params=(), tunable=tunable,
                 whole_graph_features=whole_graph_features)


class WholeGraphMethod(ClusterMethod, abc.ABC):
    """A method run on the whole kNN graph in one Ray task (see the module docstring)."""

    shape = whole_graph_shape(None)

    def score(self, part: PartitionInput) -> np.ndarray:
        return neighbor_density(part.knn_sims, SCORE_NEIGHBORS)

    @abc.abstractmethod
    def cluster_graph(self, knn_ids: np.ndarray, knn_sims: np.ndarray,
                      features: np.ndarray | None = None) -> np.ndarray:
        """Labels ``(N,)`` (any integers; equal label = same cluster) for the whole graph;
        ``features (N, D)`` only for a shape with ``whole_graph_features``."""


def labels_to_clusters(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dense ids (larger clusters first), sizes, representatives (highest score, then
    smallest id) and ``parent`` (the representative; -1 for it and for singletons)."""
    cluster_id, sizes, _ = dense_cluster_ids(np.asarray(labels, dtype=np.int64))
    reps = representatives(cluster_id, scores, len(sizes))
    parent = reps[cluster_id].astype(np.int64)
    parent[reps] = -1
    return cluster_id, sizes, reps, parent


def knn_edges(
    knn_ids: np.ndarray, knn_sims: np.ndarray, threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed kNN edges ``(src, dst, sim)`` without self loops and padding (id < 0),
    keeping ``sim >= threshold`` when one is given."""
    n, k = knn_ids.shape
    ids = knn_ids[:, 1:]
    sims = knn_sims[:, 1:]
    rows = np.arange(n, dtype=np.int64)[:, None]
    keep = (ids >= 0) & (ids != rows)
    if threshold is not None:
        keep &= sims >= threshold
    r, c = np.nonzero(keep)
    return r.astype(np.int64), ids[r, c].astype(np.int64), sims[r, c].astype(np.float32)


def symmetric_graph(n: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> sp.csr_matrix:
    """Undirected weighted graph: ``A[i, j] = max`` over both directions, sorted indices."""
    a = sp.csr_matrix((w.astype(np.float32), (src, dst)), shape=(n, n))
    a = a.maximum(a.T).tocsr()
    a.sort_indices()
    return a


def components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected-component label per node ``(n,) int64`` (edges undirected)."""
    if len(src) == 0:
        return np.arange(n, dtype=np.int64)
    g = sp.csr_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    return connected_components(g, directed=True, connection="weak")[1].astype(np.int64)


def row_argmax(m: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty row of a CSR matrix with sorted indices: ``(rows, col, value)`` of its
    largest entry, ties to the smallest column (vectorised, no per-row loop)."""
    counts = np.diff(m.indptr)
    rows = np.flatnonzero(counts > 0)
    if len(rows) == 0:
        return rows, rows, np.empty(0, m.dtype)
    row_of = np.repeat(np.arange(m.shape[0]), counts)
    rowmax = np.full(m.shape[0], -np.inf, dtype=np.float64)
    rowmax[rows] = np.maximum.reduceat(m.data, m.indptr[rows])
    hits = np.flatnonzero(m.data >= rowmax[row_of])
    first = np.r_[True, row_of[hits[1:]] != row_of[hits[:-1]]]
    hits = hits[first]
    return row_of[hits], m.indices[hits].astype(np.int64), m.data[hits]
