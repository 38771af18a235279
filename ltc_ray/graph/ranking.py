"""The strict total order every parent-linking rule follows (score descending, then id
ascending): a node links only to a neighbour that outranks it, so links never form a
cycle. Base layer: the methods (``ltc_ray.cluster``) and the models (GCN-E's candidates)
both rank by it."""

from __future__ import annotations

import numpy as np


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


def sorted_positions(needed: np.ndarray, query) -> np.ndarray:
    """Positions of ``query`` ids in the sorted distinct ``needed``; an id outside it is a
    KeyError (a worker asked for a node it never fetched)."""
    query = np.asarray(query, dtype=np.int64)
    pos = np.searchsorted(needed, query)
    if (pos >= len(needed)).any() or (needed[np.minimum(pos, len(needed) - 1)] != query).any():
        raise KeyError("a node outside the fetched neighbourhood was requested")
    return pos
