"""Connected components over link edges, without one process holding all N*k edges.

Each partition reduces its own edges to a *star forest* (every node of a local
component points at the component's smallest node): at most one edge per node
it touches, with the same connectivity. The global step runs connected
components over the union of those forests (O(N) edges). A single scipy pass
over all raw edges is the small-data path; both give identical labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components


def _components(n_nodes: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component label per node ``(n_nodes,) int64`` (arbitrary but valid labels)."""
    if len(src) == 0:
        return np.arange(n_nodes, dtype=np.int64)
    graph = sp.coo_matrix(
        (np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n_nodes, n_nodes)
    ).tocsr()
    _, labels = connected_components(graph, directed=True, connection="weak")
    return labels.astype(np.int64)


def spanning_forest(
    src: np.ndarray, dst: np.ndarray, n_nodes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reduce edges ``(e,)`` over global node ids to a star forest with the same components.

    Returns ``(child, root)`` int64 arrays, one entry per non-root node touched by
    an edge, in ascending child order; ``root`` is the smallest node id of the child's
    local component. With ``n_nodes`` (the global node count) and at least
    ``n_nodes / 2`` edge endpoints, components run over the global ids directly
    (O(N + E), no sort); otherwise the touched nodes are compacted first (a sort of
    the 2E endpoints, so a partition's memory stays O(its edges)).
    """
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    if len(src) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if n_nodes is not None and n_nodes <= 4 * len(src):
        labels = _components(n_nodes, src, dst)
        nodes = np.arange(n_nodes, dtype=np.int64)
        root_of_label = np.full(int(labels.max()) + 1, n_nodes, dtype=np.int64)
        np.minimum.at(root_of_label, labels, nodes)
        roots = root_of_label[labels]
        keep = roots != nodes  # untouched nodes are their own (singleton) roots
        return nodes[keep], roots[keep]
    nodes, inverse = np.unique(np.concatenate([src, dst]), return_inverse=True)
    local = _components(len(nodes), inverse[: len(src)], inverse[len(src) :])
    # nodes are sorted, so the first occurrence of each label is its smallest node
    _, first = np.unique(local, return_index=True)
    root_of_label = np.empty(local.max() + 1, dtype=np.int64)
    root_of_label[local[first]] = nodes[first]
    roots = root_of_label[local]
    keep = roots != nodes
    return nodes[keep], roots[keep]


def dense_cluster_ids(component: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relabel components to dense ids 0..C-1, larger clusters first.

    Ties in size are broken by the smallest sample id in the cluster, so ids do
    not depend on partitioning or worker count. Returns ``(cluster_id (n,) int64,
    sizes (C,) int64, first_member (C,) int64)``.
    """
    uniq, first, inverse, counts = np.unique(
        component, return_index=True, return_inverse=True, return_counts=True
    )
    order = np.lexsort((first, -counts))  # size descending, then smallest member
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[order] = np.arange(len(uniq), dtype=np.int64)
    return rank[inverse.reshape(-1)], counts[order].astype(np.int64), first[order].astype(np.int64)


def merge_edges(
    n_nodes: int, edge_lists: Sequence[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global step: components over the union of edge lists (raw edges or forests).

    Returns :func:`dense_cluster_ids` of the result.
    """
    if edge_lists:
        src = np.concatenate([np.asarray(e[0], dtype=np.int64) for e in edge_lists])
        dst = np.concatenate([np.asarray(e[1], dtype=np.int64) for e in edge_lists])
    else:
        src = dst = np.empty(0, np.int64)
    return dense_cluster_ids(_components(n_nodes, src, dst))


def representatives(
    cluster_id: np.ndarray, score: np.ndarray, n_clusters: int
) -> np.ndarray:
    """Per cluster, the member with the highest score (ties: smallest sample id)."""
    order = np.lexsort((np.arange(len(cluster_id)), -score.astype(np.float64), cluster_id))
    sorted_clusters = cluster_id[order]
    starts = np.searchsorted(sorted_clusters, np.arange(n_clusters))
    return order[starts].astype(np.int64)


def stars_to_label(label: np.ndarray, lo: int, hi: int
                   ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Rows ``[lo, hi)`` of a per-node ``label`` that names a member of the node's cluster
    (e.g. its smallest): ``parent`` (-1 for the named member itself) and the merge edges
    ``(node, label)``, stars the global merge turns into exactly those clusters."""
    node = np.arange(lo, hi, dtype=np.int64)
    root = label[lo:hi]
    parent = np.where(root != node, root, -1)
    link = parent >= 0
    return parent, (node[link], parent[link])

