"""Out-of-fold GCN-V outputs: the training data GCN-E learns from.

GCN-E reads GCN-V's hidden features and confidences. On the split GCN-V was trained on,
those are in-sample: identities are separated more cleanly than on any unseen split, so a
GCN-E trained there learns that nearly every candidate is right and is overconfident at
inference (measured at synthetic scale 0.05: 99.98 % training accuracy, and on part1 its
choices were worse than the nearest candidate's). Cross-fitting removes the gap: the
identities are split into folds, a GCN-V is trained on all folds but one, and the held-out
fold's features, confidences and kNN graphs come from that model, exactly as a test split's
do. GCN-E then trains on the folds' disjoint graphs side by side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from ltc_ray.graph.adjacency import whole_graph_adjacency
from ltc_ray.knn.search import exact_knn
from ltc_ray.models.edge_scorer import edge_probabilities, resort_rows
from ltc_ray.models.gcn_v import aggregate, predict
from ltc_ray.models.train import TrainConfig, train_gcn_v_on_graph
from ltc_ray.models.train_hc import train_edge_scorer

__all__ = ["OutOfFold", "identity_folds", "out_of_fold_edges", "out_of_fold_gcn_v"]

log = logging.getLogger("ltc_ray")


@dataclass
class OutOfFold:
    """The folds' held-out nodes side by side: row r is training sample ``order[r]``.

    ``hidden (N, h)`` L2-normalised GCN-V features, ``confidence (N,)``, ``labels (N,)`` and
    each fold's own kNN graph of ``edge_k`` neighbours on the input features, ``knn_ids``
    (row indices, never crossing a fold) and ``knn_sims``; ``fold (N,)`` the row's fold.
    """

    order: np.ndarray
    fold: np.ndarray
    hidden: np.ndarray
    confidence: np.ndarray
    labels: np.ndarray
    knn_ids: np.ndarray
    knn_sims: np.ndarray


def identity_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold of each sample ``(N,) int64``: identities dealt to folds in a seeded random
    order, so every sample of an identity lands in the same fold."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    ids, inverse = np.unique(np.asarray(labels), return_inverse=True)
    if len(ids) < folds:
        raise ValueError(f"{len(ids)} identities cannot fill {folds} folds")
    deal = np.random.default_rng(seed).permutation(len(ids)) % folds
    return deal[inverse.reshape(-1)].astype(np.int64)


def _fold_layout(labels: np.ndarray, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Each sample's identity fold, the samples in fold order (the stacked outputs' row
    order) and the smallest fold's size."""
    fold_of = identity_folds(labels, folds, seed)
    order = np.concatenate([np.flatnonzero(fold_of == f) for f in range(folds)])
    return fold_of, order, int(np.bincount(fold_of, minlength=folds).min())


def _graph(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids, sims = exact_knn(x, min(k, len(x) - 1))  # k columns, self first
    return ids.astype(np.int64), sims.astype(np.float32)


def out_of_fold_gcn_v(
    x: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    k: int,
    edge_k: int,
    folds: int = 2,
    progress: bool = False,
) -> OutOfFold:
    """Train one GCN-V per fold on the other folds (``cfg``, graph of ``k`` neighbours) and
    predict the held-out fold on its own graph; also build the held-out fold's ``edge_k``
    graph for GCN-E's candidates (fewer columns when the smallest fold is that small).

    Exact kNN within each fold (faiss flat, in this process): ``folds`` x 2 searches over
    N/folds rows each. Memory ≈ what :func:`train_gcn_v` needs for (1 - 1/folds)·N rows plus
    the outputs, ``N·(hidden + edge_k·3)·4`` bytes.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    labels = np.asarray(labels)
    fold_of, order, smallest = _fold_layout(labels, folds, cfg.seed)
    if smallest < 2:
        raise ValueError(f"a fold of {smallest} sample(s) has no neighbours")
    edge_k = min(edge_k, smallest - 1)  # the folds' graphs are stacked: one width
    pieces = []
    offset = 0
    for f in range(folds):
        train_rows = np.flatnonzero(fold_of != f)
        held = np.flatnonzero(fold_of == f)
        xt = x[train_rows]
        model, history, _ = train_gcn_v_on_graph(xt, *_graph(xt, k), labels[train_rows],
                                                 replace(cfg), progress=progress)
        del xt
        xh = x[held]
        ids, sims = _graph(xh, k)
        conf, hidden = predict(model, xh, aggregate(whole_graph_adjacency(ids, sims), xh))
        hidden /= np.maximum(np.linalg.norm(hidden, axis=1, keepdims=True), 1e-12)
        edge_ids, edge_sims = _graph(xh, edge_k)
        log.info("gcn-e cross-fit: fold %d/%d, GCN-V on %d rows (final loss %.5f), %d held out",
                 f + 1, folds, len(train_rows), history[-1]["loss"] if history else float("nan"),
                 len(held))
        pieces.append((conf, hidden, np.where(edge_ids >= 0, edge_ids + offset, -1), edge_sims))
        offset += len(held)
    return OutOfFold(
        order=order,
        fold=fold_of[order],
        hidden=np.concatenate([p[1] for p in pieces]),
        confidence=np.concatenate([p[0] for p in pieces]),
        labels=labels[order],
        knn_ids=np.concatenate([p[2] for p in pieces]),
        knn_sims=np.concatenate([p[3] for p in pieces]),
    )


def out_of_fold_edges(x: np.ndarray, labels: np.ndarray, cfg, k: int, folds: int = 2,
                      batch_size: int = 256, progress: bool = False
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold hard-clusters edge scores: per identity fold, an edge scorer trained on
    the other folds (``cfg``, an ``EdgeTrainConfig``) re-scores the held-out fold's own
    k-NN graph. Returns ``(order, ids, prob)``: row r is training sample ``order[r]``;
    the folds' re-sorted rows side by side (``ids`` are row indices, never crossing a fold).

    What the TPDi threshold is tuned on: scores an unseen split gets, not the in-sample
    ones (an in-sample scorer is over-confident on its own identities: at synthetic scale
    0.05 the training split's best threshold was 0.8, the test split's 0.4).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    labels = np.asarray(labels)
    fold_of, order, smallest = _fold_layout(labels, folds, cfg.seed)
    k = min(k, smallest - 1)  # the folds' graphs are stacked: one width
    if k < 2:
        raise ValueError(f"a fold of {smallest} sample(s) is too small to cross-fit")
    pieces, offset = [], 0
    for f in range(folds):
        train_rows, held = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
        xt = x[train_rows]
        model, history = train_edge_scorer(xt, _graph(xt, k)[0], labels[train_rows],
                                           replace(cfg), progress=progress)
        del xt
        xh = x[held]
        ids, _ = _graph(xh, k)
        ids, prob = resort_rows(ids, edge_probabilities(model, ids, lambda q, xh=xh: xh[q],
                                                        batch_size))
        log.info("hard-clusters cross-fit: fold %d/%d, scorer on %d rows (final loss %.4f), "
                 "%d held out", f + 1, folds, len(train_rows), history[-1]["loss"], len(held))
        pieces.append((np.where(ids >= 0, ids + offset, -1), prob))
        offset += len(held)
    return (order, np.concatenate([p[0] for p in pieces]),
            np.concatenate([p[1] for p in pieces]))
