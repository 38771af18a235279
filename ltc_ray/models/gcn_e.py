"""GCN-E (Yang et al., CVPR 2020): choose each confident node's parent among its candidates.

For node i the candidates S_i are its kNN neighbours that outrank it (confidence descending,
then id ascending: :func:`ltc_ray.graph.ranking.higher_ranked`), in kNN order. A node with one
candidate, or below the top-rho confidence share, links to the first (nearest) one; otherwise
a 4-layer GCN over the candidate subgraph (features H_j − H_i, adjacency the GCN-V Â restricted
to S_i and re-normalised) scores how likely each candidate shares i's identity, and i links to
the best. Everything here is array code over a batch of centres; the caller serves features
and kNN rows of any global id (``feats_of``/``rows_of``) from its partition plus halo, so a
partition needs the candidates' rows: a 2-hop neighbourhood of its nodes.

Parameter names follow learn-to-cluster (``conv1..conv4.*``, ``classifier.*``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ltc_ray.graph.ranking import higher_ranked
from ltc_ray.models.gcn_v import ROW_BLOCK, GraphConvConcat, as_tensor

__all__ = [
    "GCNE",
    "SLOT_BLOCK",
    "candidate_scores",
    "candidate_table",
    "choose_parents",
    "confidence_quantile",
    "subgraph_batch",
]

# candidate_scores() pads a centre's subgraph to a multiple of this many slots, fixed by the
# centre's own candidate count, and its batch so that batch x slots is a multiple of ROW_BLOCK:
# a centre's result then never depends on the batch it lands in or on the other nodes. 8 keeps
# both paddings small (measured at rho 0.2: 21% more slots than candidates vs 47% with 16).
SLOT_BLOCK = 8

FeatsOf = Callable[[np.ndarray], np.ndarray]
RowsOf = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class BatchedGraphConv(GraphConvConcat):
    """GCN-V's ReLU([x ‖ A x] W + b) over a padded batch: x ``(B, S, in)``, A ``(B, S, S)``.

    Computed as x W_top + (A x) W_bottom + b on ``(B·S, ·)`` rows, without materialising the
    concatenation (a quarter of the CPU time of a forward otherwise)."""

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        b, s, n_in = x.shape
        agg = torch.bmm(adj, x).reshape(b * s, n_in)
        out = torch.addmm(self.bias, x.reshape(b * s, n_in), self.weight[:n_in])
        out = out.addmm_(agg, self.weight[n_in:])
        return torch.relu_(out).reshape(b, s, -1)


def add_four_layers(net: nn.Module, in_dim: int, dims: Sequence[int]) -> None:
    """Give ``net`` (GCN-E, L-GCN) its ``in_dim``, ``dims``, the 4 concat GraphConv layers
    ``conv1..conv4`` and the 2-class head ``classifier``, widths checked."""
    dims = tuple(int(d) for d in dims)
    if in_dim < 1 or len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"in_dim ({in_dim}) and 4 layer widths ({dims}) must be positive")
    net.in_dim = int(in_dim)
    net.dims = dims
    widths = (net.in_dim, *dims)
    net.conv1 = BatchedGraphConv(widths[0], widths[1])
    net.conv2 = BatchedGraphConv(widths[1], widths[2])
    net.conv3 = BatchedGraphConv(widths[2], widths[3])
    net.conv4 = BatchedGraphConv(widths[3], widths[4])
    net.classifier = nn.Sequential(
        nn.Linear(widths[-1], widths[-1]), nn.PReLU(widths[-1]), nn.Linear(widths[-1], 2)
    )


def masked_inputs(net: nn.Module, x: Tensor, adj: Tensor, mask: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``(h, adj, keep (B, S, 1))`` of a padded batch after checking its shapes against
    ``net.in_dim``: padded features and their adjacency rows and columns zeroed, so
    whatever they hold (even NaN) never reaches a real slot."""
    if x.ndim != 3 or x.shape[-1] != net.in_dim:
        raise ValueError(f"x {tuple(x.shape)} must be (B, S, {net.in_dim})")
    b, s, _ = x.shape
    if adj.shape != (b, s, s) or mask.shape != (b, s):
        raise ValueError(f"adj {tuple(adj.shape)} / mask {tuple(mask.shape)} do not fit x")
    keep = mask.to(torch.bool).unsqueeze(-1)
    adj = torch.where(keep & keep.transpose(1, 2), adj, 0.0)
    return torch.where(keep, x, 0.0), adj, keep


class GCNE(nn.Module):
    """The GCN-E edge model: 4 concat GraphConv layers ``in_dim -> dims[0] -> .. -> dims[3]``,
    then Linear -> PReLU -> Linear(2) and log-softmax per candidate."""

    def __init__(self, in_dim: int = 512, dims: Sequence[int] = (512, 512, 256, 256)):
        super().__init__()
        add_four_layers(self, in_dim, dims)

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor) -> Tensor:
        """``x (B, S, in_dim)``, row-normalised ``adj (B, S, S)``, ``mask (B, S) bool`` (real
        slots) -> log-probabilities ``(B, S, 2)``; class 1 = "candidate has the centre's
        identity". Padded features and their adjacency rows and columns are zeroed first, so
        whatever they hold (even NaN) never reaches a real slot; their outputs are meaningless."""
        h, adj, _ = masked_inputs(self, x, adj, mask)
        b, s, _ = x.shape
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            h = conv(h, adj)  # padded rows stay finite and their adjacency columns are 0
        # PReLU's per-channel weights act on dim 1, so the head runs on (B·S, C) rows.
        logits = self.classifier(h.reshape(b * s, -1)).reshape(b, s, 2)
        return torch.log_softmax(logits, dim=-1)


def confidence_quantile(conf: np.ndarray, rho: float) -> float:
    """The confidence of the least confident node in the top ``rho`` share (``round(rho·N)``
    nodes): a node is in the share when ``conf >= threshold`` (ties at the threshold all
    count in). ``+inf`` when the share is empty, ``-inf`` when it is everything."""
    conf = np.asarray(conf).reshape(-1)
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    n = len(conf)
    n_top = min(n, int(round(rho * n)))
    if n_top == 0:
        return float("inf")
    if n_top == n:
        return float("-inf")
    return float(np.partition(conf, n - n_top)[n - n_top])


def candidate_table(
    node_ids: np.ndarray,
    knn_ids: np.ndarray,
    conf_of_nodes: np.ndarray,
    conf_of_neighbours: np.ndarray,
    max_candidates: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each node's candidates: the kNN neighbours that outrank it, in kNN order.

    ``node_ids (n,)``, ``knn_ids (n, k)`` (-1 = empty slot), ``conf_of_nodes (n,)``,
    ``conf_of_neighbours (n, k)`` (the neighbours' confidences; any value on empty slots).
    Returns ``cand (n, S) int64`` global ids padded with -1, S = the largest count (at most
    ``max_candidates``), and ``count (n,) int64``. Keeping the first ``max_candidates`` keeps
    the most similar ones.
    """
    node_ids = np.asarray(node_ids, dtype=np.int64)
    knn_ids = np.asarray(knn_ids)
    n = len(node_ids)
    if knn_ids.ndim != 2 or len(knn_ids) != n or np.shape(conf_of_neighbours) != knn_ids.shape:
        raise ValueError(
            f"knn_ids {knn_ids.shape} and conf_of_neighbours {np.shape(conf_of_neighbours)} "
            f"must be (n, k) with n = {n} nodes"
        )
    if np.shape(conf_of_nodes) != (n,):
        raise ValueError(f"conf_of_nodes {np.shape(conf_of_nodes)} must be ({n},)")
    if max_candidates is not None and max_candidates < 1:
        raise ValueError(f"max_candidates must be positive, got {max_candidates}")
    ids = knn_ids.astype(np.int64, copy=False)
    outranks = higher_ranked(
        node_ids, np.asarray(conf_of_nodes), ids, np.asarray(conf_of_neighbours)
    ) & (ids >= 0)
    slot = np.cumsum(outranks, axis=1, dtype=np.int64) - 1  # position among the candidates
    count = outranks.sum(axis=1, dtype=np.int64)
    if max_candidates is not None:
        outranks &= slot < max_candidates
        np.minimum(count, max_candidates, out=count)
    width = int(count.max()) if n else 0
    cand = np.full((n, width), -1, dtype=np.int64)
    rows, cols = np.nonzero(outranks)
    cand[rows, slot[rows, cols]] = ids[rows, cols]
    return cand, count


def subgraph_batch(
    cand: np.ndarray,
    count: np.ndarray,
    centre_feats: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The padded GCN-E input of ``b`` centres.

    ``cand (b, S)`` candidate ids (-1 padded, real ones first), ``count (b,)``,
    ``centre_feats (b, d)`` = H of each centre; ``feats_of(ids) -> (m, d)`` and
    ``rows_of(ids) -> (knn_ids (m, k), knn_sims (m, k))`` serve any candidate id. Returns
    ``x (b, S, d) float32`` = H[cand] − H[centre] (0 on padding), ``adj (b, S, S) float32`` =
    row-normalised (max(S, Sᵀ) + I) on the candidates, S_jl = cos(j, l) for l in kNN(j), self,
    empty and negative entries dropped (0 on padding), and ``mask (b, S) bool``.
    Memory ≈ b·S·(d + S)·4 bytes plus the candidates' kNN rows.
    """
    cand = np.asarray(cand, dtype=np.int64)
    count = np.asarray(count, dtype=np.int64)
    centre_feats = np.asarray(centre_feats, dtype=np.float32)
    if cand.ndim != 2 or count.shape != (len(cand),) or centre_feats.ndim != 2:
        raise ValueError(f"cand {cand.shape}, count {count.shape}, centre_feats must be 2-D/1-D")
    b, s = cand.shape
    d = centre_feats.shape[1]
    if len(centre_feats) != b or (b and int(count.max()) > s):
        raise ValueError(f"centre_feats {centre_feats.shape} / count do not fit cand {cand.shape}")
    mask = np.arange(s)[None, :] < count[:, None]
    x = np.zeros((b, s, d), dtype=np.float32)
    adj = np.zeros((b, s, s), dtype=np.float32)
    if not mask.any():
        return x, adj, mask
    owner, slot = np.nonzero(mask)  # one entry per real candidate, ordered by (centre, slot)
    ids = cand[owner, slot]
    uniq, inv = np.unique(ids, return_inverse=True)
    feats = np.asarray(feats_of(uniq), dtype=np.float32)
    if feats.shape != (len(uniq), d):
        raise ValueError(f"feats_of returned {feats.shape}, expected ({len(uniq)}, {d})")
    x[owner, slot] = feats[inv] - centre_feats[owner]

    nbr_ids, nbr_sims = rows_of(uniq)
    nbr_ids = np.asarray(nbr_ids, dtype=np.int64)
    nbr_sims = np.asarray(nbr_sims, dtype=np.float32)
    if nbr_ids.ndim != 2 or len(nbr_ids) != len(uniq) or nbr_sims.shape != nbr_ids.shape:
        raise ValueError(f"rows_of returned {nbr_ids.shape}/{nbr_sims.shape} for {len(uniq)} ids")
    # Every edge j -> l of a candidate's kNN row, looked up among the same centre's
    # candidates: l -> its index u among the batch's candidate ids, then (centre, u) -> slot.
    to_u = _index_in(uniq, nbr_ids)[inv]  # (m, k), -1 when l is nobody's candidate
    slot_of = np.full((b, len(uniq)), -1, dtype=np.int32)
    slot_of[owner, inv] = slot
    to_slot = np.where(to_u >= 0, slot_of[owner[:, None], np.maximum(to_u, 0)], -1)
    sims = nbr_sims[inv]
    r, c = np.nonzero((to_slot >= 0) & (sims >= 0) & (to_u != inv[:, None]))
    flat = (owner[r] * s + slot[r]) * s + to_slot[r, c]
    np.maximum.at(adj.reshape(-1), flat, sims[r, c])  # max over repeated entries

    np.maximum(adj, adj.transpose(0, 2, 1), out=adj)
    adj[owner, slot, slot] = 1.0
    degree = adj.sum(axis=2, dtype=np.float64)
    degree[degree <= 0] = 1.0
    adj /= degree[:, :, None].astype(np.float32)
    return x, adj, mask


def _index_in(sorted_ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Index of each ``query`` id in ``sorted_ids`` (unique), -1 when absent or negative:
    a lookup table when ids are small enough, else a binary search."""
    top = int(sorted_ids[-1]) if len(sorted_ids) else -1
    if top + 1 <= 4 * query.size + 2**22:
        table = np.full(top + 2, -1, dtype=np.int64)  # the extra last cell answers "absent"
        table[sorted_ids] = np.arange(len(sorted_ids))
        return table[np.where((query >= 0) & (query <= top), query, top + 1)]
    pos = np.minimum(np.searchsorted(sorted_ids, query), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == query, pos, -1)


def _bucket(count: np.ndarray) -> np.ndarray:
    """Padded subgraph size of each centre: its count rounded up to :data:`SLOT_BLOCK`."""
    return -(-count // SLOT_BLOCK) * SLOT_BLOCK


@torch.no_grad()
def candidate_scores(
    model: GCNE,
    centre_ids: np.ndarray,
    cand: np.ndarray,
    count: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """GCN-E's ``log p(same identity)`` of every candidate: ``(n, S) float32``, -inf on
    padding, for centres ``centre_ids (n,)`` with ``cand (n, S)``/``count (n,)`` from
    :func:`candidate_table` (``feats_of``/``rows_of`` as in :func:`subgraph_batch`).

    Centres run grouped by padded size (count rounded up to :data:`SLOT_BLOCK`), at most
    ``batch_size`` per forward, each batch zero-padded so batch x slots is a multiple of
    ``ROW_BLOCK``: a centre's scores are bitwise independent of ``batch_size`` and of the
    other centres. Memory per batch ≈ batch_size · S · (d + S + 4·max(dims)) · 4 bytes.
    """
    centre_ids = np.asarray(centre_ids, dtype=np.int64)
    cand = np.asarray(cand, dtype=np.int64)
    count = np.asarray(count, dtype=np.int64)
    n = len(centre_ids)
    if cand.ndim != 2 or len(cand) != n or count.shape != (n,):
        raise ValueError(f"cand {cand.shape} and count {count.shape} must have {n} rows")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    scores = np.full(cand.shape, -np.inf, dtype=np.float32)
    run = np.flatnonzero(count > 0)
    if len(run) == 0:
        return scores
    size = _bucket(count[run])
    order = np.argsort(size, kind="stable")
    run, size = run[order], size[order]
    starts = np.flatnonzero(np.r_[True, size[1:] != size[:-1]])
    bounds = np.r_[starts, len(run)]
    batches = [
        (run[lo : min(lo + batch_size, hi)], int(size[lo]))
        for a, hi in zip(bounds[:-1], bounds[1:], strict=True)
        for lo in range(a, hi, batch_size)
    ]
    was_training = model.training
    model.eval()
    try:
        for rows, s in tqdm(batches, desc="gcn-e", unit="batch", disable=not progress):
            width = min(s, cand.shape[1])
            slots = np.full((len(rows), s), -1, dtype=np.int64)
            slots[:, :width] = cand[rows, :width]
            x, adj, mask = subgraph_batch(
                slots, count[rows], feats_of(centre_ids[rows]), feats_of, rows_of
            )
            b = len(rows)
            step = ROW_BLOCK // math.gcd(s, ROW_BLOCK)  # batch x slots a multiple of ROW_BLOCK
            padded = -(-b // step) * step
            xb = torch.zeros(padded, s, model.in_dim)
            ab = torch.zeros(padded, s, s)
            mb = torch.zeros(padded, s, dtype=torch.bool)
            xb[:b], ab[:b], mb[:b] = as_tensor(x), as_tensor(adj), torch.from_numpy(mask)
            out = model(xb, ab, mb)[:b, :width, 1].numpy()
            scores[rows, :width] = np.where(mask[:, :width], out, -np.inf)
    finally:
        model.train(was_training)
    return scores


def choose_parents(
    model: GCNE,
    node_ids: np.ndarray,
    conf_nodes: np.ndarray,
    knn_ids: np.ndarray,
    knn_sims: np.ndarray,
    conf_of_neighbours: np.ndarray,
    use_model: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    batch_size: int = 256,
    max_candidates: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """GCN-E parents ``(n,) int64`` of ``node_ids (n,)`` (-1: root, no candidate).

    ``knn_ids``/``knn_sims`` ``(n, k)`` are the nodes' kNN rows (sims only checked for shape:
    candidates keep the row order), ``conf_nodes (n,)`` and ``conf_of_neighbours (n, k)``
    the confidences, ``use_model (n,) bool`` marks the top-rho nodes (the model runs where
    that holds and there are at least 2 candidates; elsewhere the nearest candidate wins).
    ``feats_of``/``rows_of`` serve H rows and kNN rows of any id (see :func:`subgraph_batch`).
    A parent always outranks its child, so parents form a forest. Deterministic and bitwise
    independent of ``batch_size`` and of the other nodes (:func:`candidate_scores`); ties in
    the model's score go to the earlier (more similar) candidate.
    """
    node_ids = np.asarray(node_ids, dtype=np.int64)
    n = len(node_ids)
    if np.shape(knn_sims) != np.shape(knn_ids) or np.shape(use_model) != (n,):
        raise ValueError(
            f"knn_sims {np.shape(knn_sims)} must match knn_ids {np.shape(knn_ids)} and "
            f"use_model {np.shape(use_model)} must be ({n},)"
        )
    cand, count = candidate_table(node_ids, knn_ids, conf_nodes, conf_of_neighbours, max_candidates)
    parent = np.full(n, -1, dtype=np.int64)
    has = count > 0
    parent[has] = cand[has, 0]
    run = np.flatnonzero(np.asarray(use_model, dtype=bool) & (count > 1))
    if len(run):
        scores = candidate_scores(
            model, node_ids[run], cand[run], count[run], feats_of, rows_of, batch_size, progress
        )
        parent[run] = cand[run, np.argmax(scores, axis=1)]
    return parent
