"""L-GCN (Wang et al., CVPR 2019, "Linkage-based Face Clustering via GCN"): for each pivot,
P(its kNN neighbour has the pivot's identity) from a GCN over an instance pivot subgraph.

The IPS of pivot p: hop1 = the first ``hop1`` neighbours of p's kNN row, hop2 = the first
``hop2`` neighbours of each hop1 node, nodes = unique({p} ∪ hop1 ∪ hop2) with features
f(node) − f(p); a node links to those of its first ``active`` neighbours that are inside the
IPS, the links are symmetrised and row-normalised (binary, no self loops, as
learn-to-cluster's ``lgcn/feeder``). "Neighbours" of a node are always its kNN row from rank 1
on (rank 0 is the node itself by the project's kNN convention), empty (-1) slots and the
node's own id dropped. The model scores the hop1 slots only, so its output is aligned with
the pivot's kNN row: hop1 slot j is row column j + 1.

Everything is array code over a batch of pivots; the caller serves features and kNN rows of
any global id (``feats_of``/``rows_of``) from its partition plus halo, so a partition needs
the rows of its pivots' hop1 and hop2 nodes (3 hops of the kNN graph around its pivots).

Parameter names follow learn-to-cluster's ``lgcn/models/gcn.py`` (``bn0``, ``conv1..conv4``,
``classifier``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ltc_ray.models.gcn_e import (
    SLOT_BLOCK,
    FeatsOf,
    RowsOf,
    add_four_layers,
    masked_inputs,
)
from ltc_ray.models.gcn_v import ROW_BLOCK, as_tensor

__all__ = ["LGCN", "edge_probabilities", "ips_batch", "ips_sizes", "resolve_hop1"]

# edge_probabilities() builds the node sets of this many pivots at a time to learn their
# subgraph sizes (and so their padded-size buckets) before batching them.
SIZE_CHUNK = 4096


class LGCN(nn.Module):
    """The L-GCN edge model: BatchNorm1d(in_dim, affine=False) on the real nodes' features,
    4 concat-mean GraphConv layers ``in_dim -> dims[0] -> .. -> dims[3]``, then on the hop1
    slots Linear(dims[3], dims[3]) -> PReLU -> Linear(2) and log-softmax."""

    def __init__(self, in_dim: int = 256, dims: Sequence[int] = (512, 512, 256, 256)):
        super().__init__()
        add_four_layers(self, in_dim, dims)
        self.bn0 = nn.BatchNorm1d(self.in_dim, affine=False)

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor, hop1_slot: Tensor) -> Tensor:
        """``x (B, S, in_dim)``, row-normalised ``adj (B, S, S)``, ``mask (B, S) bool`` (real
        nodes), ``hop1_slot (B, H) int64`` (each hop1 node's slot, -1 = none) ->
        log-probabilities ``(B, H, 2)``; class 1 = "hop1 node has the pivot's identity".

        Batch norm sees real nodes only (in training mode its statistics are theirs; in eval
        mode it uses the running statistics, so a node's result does not depend on its batch).
        Padded slots' features and adjacency are zeroed first, so whatever they hold never
        reaches a real slot; outputs at ``hop1_slot == -1`` are meaningless."""
        h, adj, keep = masked_inputs(self, x, adj, mask)
        b = x.shape[0]
        if hop1_slot.ndim != 2 or hop1_slot.shape[0] != b:
            raise ValueError(f"hop1_slot {tuple(hop1_slot.shape)} must be ({b}, H)")
        keep = keep.squeeze(-1)
        h[keep] = self.bn0(h[keep])
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            h = conv(h, adj)  # padded rows stay finite and their adjacency columns are 0
        n_hop1 = hop1_slot.shape[1]
        slot = hop1_slot.clamp(min=0).to(device=h.device, dtype=torch.long)
        rows = h[torch.arange(b, device=h.device).unsqueeze(1), slot].reshape(b * n_hop1, -1)
        # The head runs on a multiple of ROW_BLOCK rows (see gcn_v.ROW_BLOCK) so a slot's
        # result does not depend on how many pivots share the batch.
        padded = -(-(b * n_hop1) // ROW_BLOCK) * ROW_BLOCK
        if padded > b * n_hop1:
            rows = torch.cat([rows, rows.new_zeros(padded - b * n_hop1, rows.shape[1])])
        logits = self.classifier(rows)[: b * n_hop1].reshape(b, n_hop1, 2)
        return torch.log_softmax(logits, dim=-1)


def resolve_hop1(hop1: int | None, k: int) -> int:
    """``hop1`` (None = the whole row but self, ``k - 1``), checked against the row width."""
    hop1 = k - 1 if hop1 is None else int(hop1)
    if not 1 <= hop1 <= k - 1:
        raise ValueError(f"hop1 must be in [1, k - 1 = {k - 1}], got {hop1}")
    return hop1


def _neighbours(rows: np.ndarray, own: np.ndarray, m: int) -> np.ndarray:
    """Columns ``1 .. m`` of kNN rows ``(n, k)`` as int64, -1 where empty or the row's own
    id ``own (n,)``: a node's first ``m`` neighbours, self excluded."""
    nb = np.asarray(rows)[:, 1 : 1 + m].astype(np.int64)
    return np.where((nb >= 0) & (nb != own[:, None]), nb, -1)


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` for 1-D int arrays by sorting (numpy 2's hash-based unique is ~4x
    slower here)."""
    a = np.sort(a, kind="stable")
    return a[np.r_[True, a[1:] != a[:-1]]] if len(a) else a


def _fetch_rows(rows_of: RowsOf, ids: np.ndarray) -> np.ndarray:
    """The kNN id rows of ``ids`` from ``rows_of`` (similarities are not used: L-GCN's
    adjacency is binary)."""
    if len(ids) == 0:
        return np.zeros((0, 1), dtype=np.int64)
    got = rows_of(ids)[0]
    got = np.asarray(got)
    if got.ndim != 2 or len(got) != len(ids):
        raise ValueError(f"rows_of returned {got.shape} for {len(ids)} ids")
    return got


@dataclass
class _Nodes:
    """The node sets of a batch of IPSs: one entry per (pivot, node) pair, sorted by
    ``key = owner * base + node`` (so by pivot, then node id), with the node's ``slot``
    inside its pivot's subgraph."""

    key: np.ndarray  # (E,) int64, sorted, unique
    owner: np.ndarray  # (E,) int64, pivot index in the batch
    node: np.ndarray  # (E,) int64, global id
    slot: np.ndarray  # (E,) int64
    count: np.ndarray  # (B,) int64 nodes per pivot
    base: int
    hop1_ids: np.ndarray  # (B, hop1) int64, -1 = none
    hop1_uniq: np.ndarray  # sorted unique hop1 ids of the batch
    hop1_rows: np.ndarray  # (len(hop1_uniq), k) their kNN id rows

    def find(self, owner: np.ndarray, node: np.ndarray) -> np.ndarray:
        """Index into the pairs of ``(owner, node)`` (same shapes), -1 when absent."""
        node = np.asarray(node, dtype=np.int64)
        valid = (node >= 0) & (node < self.base)  # larger ids would alias the next pivot
        key = np.asarray(owner, dtype=np.int64) * self.base + np.where(valid, node, 0)
        pos = np.minimum(np.searchsorted(self.key, key), max(len(self.key) - 1, 0))
        hit = valid & (self.key[pos] == key) if len(self.key) else np.zeros_like(valid)
        return np.where(hit, pos, -1)


def _ips_nodes(
    pivots: np.ndarray, knn_rows: np.ndarray, rows_of: RowsOf, hop1: int, hop2: int
) -> _Nodes:
    """Node sets of the IPSs of ``pivots`` (one ``rows_of`` call, for the hop1 nodes)."""
    b = len(pivots)
    h1 = _neighbours(knn_rows, pivots, hop1)  # (B, hop1)
    u1 = _sorted_unique(h1[h1 >= 0])
    r1 = _fetch_rows(rows_of, u1)
    owners = [np.arange(b, dtype=np.int64)]
    nodes = [pivots]
    have1 = h1 >= 0
    if have1.any():
        at = np.searchsorted(u1, h1[have1])
        owner1 = np.nonzero(have1)[0]
        owners.append(owner1)
        nodes.append(h1[have1])
        if hop2 > 0:
            h2 = _neighbours(r1, u1, hop2)[at]  # (#hop1 nodes, hop2)
            r, c = np.nonzero(h2 >= 0)
            owners.append(owner1[r])
            nodes.append(h2[r, c])
    owner = np.concatenate(owners)
    node = np.concatenate(nodes)
    base = int(node.max()) + 1 if len(node) else 1
    key = _sorted_unique(owner * base + node)
    owner, node = key // base, key % base
    count = np.bincount(owner, minlength=b).astype(np.int64)
    start = np.cumsum(count) - count
    slot = np.arange(len(key), dtype=np.int64) - start[owner]
    return _Nodes(key, owner, node, slot, count, base, h1, u1, r1)


def _check_inputs(pivots, knn_rows, hop1, hop2, active=1):
    pivots = np.asarray(pivots, dtype=np.int64).reshape(-1)
    knn_rows = np.asarray(knn_rows)
    if knn_rows.ndim != 2 or len(knn_rows) != len(pivots):
        raise ValueError(f"knn_rows {knn_rows.shape} must be ({len(pivots)}, k)")
    if np.any(pivots < 0):
        raise ValueError("pivot ids must be non-negative")
    hop1 = resolve_hop1(hop1, knn_rows.shape[1])
    if hop2 < 0 or active < 0:
        raise ValueError(f"hop2 ({hop2}) and active ({active}) must be >= 0")
    return pivots, knn_rows, hop1


def ips_sizes(
    pivots: np.ndarray,
    knn_rows: np.ndarray,
    rows_of: RowsOf,
    hop1: int | None = None,
    hop2: int = 10,
) -> np.ndarray:
    """Number of nodes ``(n,) int64`` of each pivot's IPS (for batching pivots of similar
    size); one ``rows_of`` call."""
    pivots, knn_rows, hop1 = _check_inputs(pivots, knn_rows, hop1, hop2)
    return _ips_nodes(pivots, knn_rows, rows_of, hop1, int(hop2)).count


def ips_batch(
    pivots: np.ndarray,
    knn_rows: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    hop1: int | None = None,
    hop2: int = 10,
    active: int = 10,
    slot_block: int = SLOT_BLOCK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The padded L-GCN input of ``B`` pivots.

    ``pivots (B,)`` global ids, ``knn_rows (B, k)`` their kNN id rows (self at rank 0),
    ``feats_of(ids) -> (m, d)`` and ``rows_of(ids) -> (knn_ids (m, k), knn_sims (m, k))``
    serve any id. Returns ``x (B, S, d) float32`` = f(node) − f(pivot) (0 on padding),
    ``adj (B, S, S) float32`` (binary links from each node to those of its first
    ``active`` neighbours that lie inside the IPS, symmetrised, row-normalised, no self
    loops; 0 on padding), ``mask (B, S) bool`` and
    ``hop1_slot (B, hop1) int64`` (slot of the pivot's row column j + 1, -1 where that column
    is empty). S = the largest node count rounded up to ``slot_block``. Nodes sit in id order.

    Calls: ``rows_of`` at most twice (the hop1 nodes' rows; then the rows of the nodes that
    are neither a pivot nor a hop1 node, for the adjacency), ``feats_of`` once.
    Memory ≈ B·S·(d + S)·4 bytes.
    """
    pivots, knn_rows, hop1 = _check_inputs(pivots, knn_rows, hop1, hop2, active)
    if slot_block < 1:
        raise ValueError(f"slot_block must be positive, got {slot_block}")
    hop2, active = int(hop2), int(active)
    b = len(pivots)
    ns = _ips_nodes(pivots, knn_rows, rows_of, hop1, hop2)
    s = -(-int(ns.count.max(initial=0)) // slot_block) * slot_block
    mask = np.arange(s)[None, :] < ns.count[:, None]

    uniq, inv = np.unique(ns.node, return_inverse=True)
    feats = np.asarray(feats_of(uniq), dtype=np.float32)
    if feats.ndim != 2 or len(feats) != len(uniq):
        raise ValueError(f"feats_of returned {feats.shape} for {len(uniq)} ids")
    d = feats.shape[1]
    x = np.zeros((b, s, d), dtype=np.float32)
    pivot_feats = feats[np.searchsorted(uniq, pivots)]
    x[ns.owner, ns.slot] = feats[inv] - pivot_feats[ns.owner]

    # Each node's first `active` neighbours: rows already at hand for the pivots and the
    # hop1 nodes, one rows_of call for the rest (the hop2-only nodes).
    links = np.full((len(uniq), active), -1, dtype=np.int64)
    todo = np.ones(len(uniq), dtype=bool)
    if active > 0:
        p_at, p_first = np.unique(np.searchsorted(uniq, pivots), return_index=True)
        nb = _neighbours(knn_rows[p_first], pivots[p_first], active)
        links[p_at, : nb.shape[1]] = nb
        todo[p_at] = False
        if len(ns.hop1_uniq):
            h_at = np.searchsorted(uniq, ns.hop1_uniq)
            nb = _neighbours(ns.hop1_rows, ns.hop1_uniq, active)
            links[h_at, : nb.shape[1]] = nb
            todo[h_at] = False
        rest = np.flatnonzero(todo)
        if len(rest):
            nb = _neighbours(_fetch_rows(rows_of, uniq[rest]), uniq[rest], active)
            links[rest, : nb.shape[1]] = nb
    # Links as flat (pivot, row, col) cells, both directions, deduplicated; each row then
    # gets 1 / its degree. Sparse all the way: no dense pass over the (B, S, S) array.
    target = ns.find(ns.owner[:, None], links[inv])  # (E, active) pair index, -1 = outside
    r, c = np.nonzero(target >= 0)
    own, src, dst = ns.owner[r], ns.slot[r], ns.slot[target[r, c]]
    row = np.concatenate([own * s + src, own * s + dst])
    cell = _sorted_unique(row * s + np.concatenate([dst, src]))
    degree = np.bincount(cell // s, minlength=b * s).astype(np.float32)
    adj = np.zeros((b, s, s), dtype=np.float32)
    adj.reshape(-1)[cell] = 1.0 / degree[cell // s]

    at = ns.find(np.arange(b)[:, None], ns.hop1_ids)
    hop1_slot = np.where(at >= 0, ns.slot[np.maximum(at, 0)], -1).astype(np.int64)
    return x, adj, mask, hop1_slot


@torch.no_grad()
def edge_probabilities(
    model: LGCN,
    pivots: np.ndarray,
    knn_ids: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    hop1: int | None = None,
    hop2: int = 10,
    active: int = 10,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """P(same identity as the pivot) ``(n, hop1) float32`` of each pivot's kNN row columns
    ``1 .. hop1`` (``knn_ids (n, k)``, self at rank 0); 0 where a column is empty (-1).

    Pivots run grouped by padded subgraph size (node count rounded up to
    :data:`~ltc_ray.models.gcn_e.SLOT_BLOCK`), at most ``batch_size`` per forward, each batch
    zero-padded so batch x slots is a multiple of :data:`~ltc_ray.models.gcn_v.ROW_BLOCK`,
    in eval mode (batch norm on running statistics): a pivot's result does not depend on
    ``batch_size`` or on the other pivots. Memory per batch ≈
    batch_size · S · (d + S + 3·max(dims)) · 4 bytes, S ≤ 1 + hop1·(hop2 + 1).
    ``device`` runs the forwards there; the model is moved there for the call and back.
    """
    pivots, knn_ids, hop1 = _check_inputs(pivots, knn_ids, hop1, hop2, active)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(pivots)
    out = np.zeros((n, hop1), dtype=np.float32)
    if n == 0:
        return out
    size = np.concatenate([
        ips_sizes(pivots[lo : lo + SIZE_CHUNK], knn_ids[lo : lo + SIZE_CHUNK], rows_of,
                  hop1, hop2)
        for lo in range(0, n, SIZE_CHUNK)
    ])
    bucket = -(-size // SLOT_BLOCK) * SLOT_BLOCK
    order = np.argsort(bucket, kind="stable")
    bucket = bucket[order]
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    bounds = np.r_[starts, n]
    batches = [
        order[lo : min(lo + batch_size, hi)]
        for a, hi in zip(bounds[:-1], bounds[1:], strict=True)
        for lo in range(a, hi, batch_size)
    ]
    was_training = model.training
    home = next(model.parameters()).device
    model.eval()
    model.to(device)
    try:
        for rows in tqdm(batches, desc="l-gcn", unit="batch", disable=not progress):
            x, adj, mask, slot = ips_batch(
                pivots[rows], knn_ids[rows], feats_of, rows_of, hop1, hop2, active
            )
            b, s = mask.shape
            step = ROW_BLOCK // math.gcd(s, ROW_BLOCK)  # batch x slots a multiple of ROW_BLOCK
            padded = -(-b // step) * step
            xb = torch.zeros(padded, s, model.in_dim)
            ab = torch.zeros(padded, s, s)
            mb = torch.zeros(padded, s, dtype=torch.bool)
            sb = torch.full((padded, hop1), -1, dtype=torch.long)
            xb[:b], ab[:b], mb[:b] = as_tensor(x), as_tensor(adj), torch.from_numpy(mask)
            sb[:b] = torch.from_numpy(slot)
            logp = model(xb.to(device), ab.to(device), mb.to(device), sb.to(device))
            prob = logp[:b, :, 1].exp().float().cpu().numpy()
            out[rows] = np.where(slot >= 0, prob, 0.0)
    finally:
        model.to(home)
        model.train(was_training)
    return out
