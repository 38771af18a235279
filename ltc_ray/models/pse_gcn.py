"""PSE-GCN (Li et al. 2024, "Progressive structure enhancement GCN for face clustering"):
per-node embeddings from a GCN over the node's subgraph, whose graph is rebuilt twice from
learned structure features (dynamic graph construction, DGC blocks).

The subgraph of node i: V(i) = {i} ∪ its first ``hop1`` neighbours in the RE-RANKED kNN graph
∪ the first ``hop2`` re-ranked neighbours of each of those (centre first, the others in
ascending id order). Its local adjacency comes from the ORIGINAL kNN graph: u-v linked when
one is among the other's first ``local_k`` neighbours, weight = the larger cosine of the two
directions (negative -> 0), diagonal 1, row-normalised. "Neighbours" of a node are its row
from rank 1 on (rank 0 is the node itself by the project's kNN convention), empty (-1) slots
and the node's own id dropped.

The model's output for the centre (slot 0) is the node's embedding; training pulls same-label
nodes of a subgraph together with a hard-triplet loss (:func:`hard_triplet_loss`). As in
:mod:`ltc_ray.models.lgcn`, everything is array code over a batch of centres, and the caller
serves features and rows of any global id (``feats_of``/``rows_of``/``rerank_of``) from its
partition plus halo: a partition needs the re-ranked rows of its centres and their hop1 nodes,
and the features and original kNN rows of every subgraph node.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ltc_ray.models.gcn_e import BatchedGraphConv, FeatsOf, RowsOf, masked_inputs
from ltc_ray.models.gcn_e import subgraph_batch as _gcn_e_subgraph_batch
from ltc_ray.models.gcn_v import as_tensor
from ltc_ray.models.lgcn import _ips_nodes, _sorted_unique

__all__ = [
    "CUT",
    "PSEGCN",
    "bucket_sizes",
    "dynamic_adjacency",
    "embed_nodes",
    "hard_triplet_loss",
    "hardest_pairs",
    "max_nodes",
    "subgraph_batch",
    "subgraph_nodes",
]

# The DGC blocks keep a learned edge only when its structure features' cosine reaches this
# (the reference's cut).
CUT = 0.5
# embed_nodes() builds the node sets of this many centres at a time.
CENTRE_CHUNK = 4096
# Smallest padded subgraph size of embed_nodes().
MIN_BUCKET = 8


def _masked_bn(bn: nn.BatchNorm1d, h: Tensor, keep: Tensor) -> Tensor:
    """``bn`` over the rows of ``h (.., C)`` where ``keep`` (h's leading dims, bool): batch
    statistics (training) are the real nodes' only; other rows come out 0."""
    return torch.zeros_like(h).index_put((keep,), bn(h[keep]))


def dynamic_adjacency(s: Tensor, s_all: Tensor, pair: Tensor) -> Tensor:
    """The DGC graph: rows ``s (B, R, C)`` against ``s_all (B, S, C)`` (L2-normalised
    structure features), ``(s s_allᵀ) ⊙ pair`` with entries below :data:`CUT` set to 0, each
    row divided by (its sum + 1e-5). ``pair (B, R, S)`` bool = both nodes real."""
    a = torch.bmm(s, s_all.transpose(1, 2))
    a = torch.where(pair & (a >= CUT), a, 0.0)
    return a / (a.sum(dim=-1, keepdim=True) + 1e-5)


class PSEGCN(nn.Module):
    """The PSE-GCN embedding model over ``in_dim``-d features; ``dims = (H, O)`` = hidden and
    output widths (the reference: 512, 512).

    GraphConv(x, A) = ReLU([x ‖ A x] W + b). With x = BN0(x): x_res = Up(x), s0 = trans1(x);
    block 1: s1 = L2norm(Linear(BN(GraphConv(s0, A_local)))), A1 = DGC(s1),
    x1 = classifier1(GraphConv(trans_x(x), A1)) + x_res; block 2: s2 = L2norm(Linear(BN(
    GraphConv(trans2(x1), A_local)))), A2 = DGC(s2), x2 = classifier2(GraphConv(x1, A2)) + x1;
    out = L2norm(fuse([x2 ‖ x1 ‖ s0])). Every batch norm sees the real nodes only.
    """

    def __init__(self, in_dim: int = 256, dims: Sequence[int] = (128, 512)):
        super().__init__()
        dims = tuple(int(d) for d in dims)
        if in_dim < 1 or len(dims) != 2 or min(dims) < 1:
            raise ValueError(f"in_dim ({in_dim}) and dims (H, O) ({dims}) must be positive")
        self.in_dim = int(in_dim)
        self.dims = dims
        d, h, o = self.in_dim, dims[0], dims[1]
        self.bn0 = nn.BatchNorm1d(d)
        self.up = nn.Linear(d, h)
        self.trans1 = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, h))
        # block 1
        self.conv_s1 = BatchedGraphConv(h, h)
        self.bn_s1 = nn.BatchNorm1d(h)
        self.lin_s1 = nn.Linear(h, h)
        self.trans_x = nn.Linear(d, h)
        self.conv_x1 = BatchedGraphConv(h, h)
        self.bn_x1 = nn.BatchNorm1d(h)
        self.classifier1 = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, h))
        # block 2
        self.trans2 = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, h))
        self.conv_s2 = BatchedGraphConv(h, h)
        self.bn_s2 = nn.BatchNorm1d(h)
        self.lin_s2 = nn.Linear(h, h)
        self.conv_x2 = BatchedGraphConv(h, h)
        self.bn_x2 = nn.BatchNorm1d(h)
        self.classifier2 = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, h))
        self.fuse = nn.Linear(3 * h, o)

    def _trunk(self, x: Tensor, adj_local: Tensor, mask: Tensor):
        """Everything every node needs: ``(s0, x1, s2, A1, keep (B, S), pair (B, S, S))``."""
        h, adj, keep = masked_inputs(self, x, adj_local, mask)
        keep = keep.squeeze(-1)
        pair = keep[:, :, None] & keep[:, None, :]
        h = _masked_bn(self.bn0, h, keep)
        x_res = self.up(h)
        s0 = self.trans1(h)
        s1 = F.normalize(self.lin_s1(_masked_bn(self.bn_s1, self.conv_s1(s0, adj), keep)), dim=-1)
        a1 = dynamic_adjacency(s1, s1, pair)
        g1 = _masked_bn(self.bn_x1, self.conv_x1(self.trans_x(h), a1), keep)
        x1 = self.classifier1(g1) + x_res
        g2 = self.conv_s2(self.trans2(x1), adj)
        s2 = F.normalize(self.lin_s2(_masked_bn(self.bn_s2, g2, keep)), dim=-1)
        return s0, x1, s2, a1, keep, pair

    def forward(self, x: Tensor, adj_local: Tensor, mask: Tensor) -> Tensor:
        """``x (B, S, in_dim)``, row-normalised ``adj_local (B, S, S)``, ``mask (B, S) bool``
        (real nodes) -> L2-normalised embeddings ``(B, S, O)`` of every node (training).

        Padded slots' features and adjacency are zeroed first and the dynamic graphs link
        real nodes only, so whatever padding holds never reaches a real slot; in eval mode
        (batch norm on running statistics) a real node's output does not depend on padding.
        Padded slots' outputs are meaningless."""
        s0, x1, s2, _, keep, pair = self._trunk(x, adj_local, mask)
        a2 = dynamic_adjacency(s2, s2, pair)
        x2 = self.classifier2(_masked_bn(self.bn_x2, self.conv_x2(x1, a2), keep)) + x1
        return F.normalize(self.fuse(torch.cat([x2, x1, s0], dim=-1)), dim=-1)

    def embed_centres(self, x: Tensor, adj_local: Tensor, mask: Tensor) -> Tensor:
        """``forward(x, adj_local, mask)[:, 0]`` (``(B, O)``, the centres' embeddings) without
        block 2's feature branch and the fusion on the other nodes: only A2's centre row is
        built. Equal to the forward's up to float rounding in eval mode (in training mode
        block 2's last batch norm would see the centres only)."""
        s0, x1, s2, _, keep, pair = self._trunk(x, adj_local, mask)
        a2 = dynamic_adjacency(s2[:, :1], s2, pair[:, :1])  # (B, 1, S)
        c = x1[:, 0]
        agg = torch.bmm(a2, x1)[:, 0]
        n_in = c.shape[1]
        conv = self.conv_x2
        g = torch.addmm(conv.bias, c, conv.weight[:n_in]).addmm_(agg, conv.weight[n_in:])
        x2 = self.classifier2(_masked_bn(self.bn_x2, torch.relu_(g), keep[:, 0])) + c
        return F.normalize(self.fuse(torch.cat([x2, c, s0[:, 0]], dim=-1)), dim=-1)

    def structure(self, x: Tensor, adj_local: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The two dynamic graphs ``(A1, A2)``, each ``(B, S, S)`` (for inspection)."""
        _, _, s2, a1, _, pair = self._trunk(x, adj_local, mask)
        return a1, dynamic_adjacency(s2, s2, pair)


def max_nodes(hop1: int, hop2: int) -> int:
    """The largest subgraph: ``1 + hop1 + hop1 * hop2`` nodes."""
    return 1 + hop1 + hop1 * hop2


def _check_hops(hop1: int, hop2: int) -> tuple[int, int]:
    hop1, hop2 = int(hop1), int(hop2)
    if hop1 < 1 or hop2 < 0:
        raise ValueError(f"hop1 ({hop1}) must be >= 1 and hop2 ({hop2}) >= 0")
    return hop1, hop2


def subgraph_nodes(
    centres: np.ndarray, rerank_of: RowsOf, hop1: int, hop2: int
) -> tuple[np.ndarray, np.ndarray]:
    """The node sets of the subgraphs of ``centres (b,)``: ``(nodes (b, S_max) int64`` padded
    with -1, ``sizes (b,) int64)``, S_max = :func:`max_nodes`; the centre in slot 0, then the
    others in ascending id order. ``rerank_of(sorted unique ids) -> (ids rows, sims rows)``
    serves the re-ranked graph (self first, -1 = empty); called twice: for the centres, then
    for their hop1 nodes."""
    centres = np.asarray(centres, dtype=np.int64).reshape(-1)
    hop1, hop2 = _check_hops(hop1, hop2)
    s_max = max_nodes(hop1, hop2)
    b = len(centres)
    if b == 0:
        return np.full((0, s_max), -1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if centres.min() < 0:
        raise ValueError("centre ids must be non-negative")
    uc = _sorted_unique(centres)
    rows = np.asarray(rerank_of(uc)[0])
    if rows.ndim != 2 or len(rows) != len(uc):
        raise ValueError(f"rerank_of returned {rows.shape} for {len(uc)} ids")
    ns = _ips_nodes(centres, rows[np.searchsorted(uc, centres)], rerank_of, hop1, hop2)
    # Pairs come sorted by (centre, node id): the centre moves to slot 0, the nodes below
    # it shift up one slot.
    at_centre = ns.find(np.arange(b), centres)  # every centre is in its own set
    centre_slot = ns.slot[at_centre]
    slot = np.where(ns.slot < centre_slot[ns.owner], ns.slot + 1, ns.slot)
    slot[at_centre] = 0
    nodes = np.full((b, s_max), -1, dtype=np.int64)
    nodes[ns.owner, slot] = ns.node
    return nodes, ns.count.astype(np.int64)


def subgraph_batch(
    nodes: np.ndarray, feats_of: FeatsOf, rows_of: RowsOf, local_k: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The padded PSE-GCN input of ``nodes (b, S)`` (global ids, real ones first, -1 padded;
    e.g. :func:`subgraph_nodes`' output, possibly cut to fewer columns).

    ``feats_of(ids) -> (m, d)`` and ``rows_of(ids) -> (knn_ids (m, k), knn_sims (m, k))``
    (the ORIGINAL kNN graph) serve the subgraph nodes, each called on sorted unique ids
    (``feats_of`` also once on one node, for the feature width).
    Returns ``x (b, S, d) float32`` (the nodes' features, 0 on padding), ``adj (b, S, S)
    float32`` (u-v weighted by max(sim(u→v), sim(v→u)) over each node's first ``local_k``
    neighbours inside the subgraph, negative sims dropped, diagonal 1, row-normalised; 0 on
    padding) and ``mask (b, S) bool``. Memory ≈ b·S·(d + S)·4 bytes.
    """
    nodes = np.asarray(nodes, dtype=np.int64)
    if nodes.ndim != 2:
        raise ValueError(f"nodes {nodes.shape} must be (b, S)")
    if local_k < 0:
        raise ValueError(f"local_k must be >= 0, got {local_k}")
    real = nodes >= 0
    count = real.sum(axis=1)
    if not (real == (np.arange(nodes.shape[1])[None, :] < count[:, None])).all():
        raise ValueError("nodes must hold their real ids first, then -1 padding")
    # The feature width, from one real node (GCN-E's builder subtracts a centre feature:
    # zeros here, so x is the features themselves, exactly).
    first = nodes[real][:1]
    d = np.asarray(feats_of(first)).reshape(len(first), -1).shape[1] if len(first) else 0

    def top_rows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids_rows, sims_rows = rows_of(ids)
        return np.asarray(ids_rows)[:, : local_k + 1], np.asarray(sims_rows)[:, : local_k + 1]

    return _gcn_e_subgraph_batch(
        nodes, count, np.zeros((len(nodes), d), np.float32), feats_of, top_rows
    )


def bucket_sizes(sizes: np.ndarray, s_max: int) -> np.ndarray:
    """Padded subgraph size of each of ``sizes``: the smallest rung of the ladder
    8, 12, 16, 24, 32, 48, .. (powers of two and their 1.5x) that holds it, capped at
    ``s_max``. Fixed per size, so a centre's padded shape never depends on its batch."""
    sizes = np.asarray(sizes, dtype=np.int64)
    top = max(int(s_max), MIN_BUCKET)
    rungs = [MIN_BUCKET]
    while rungs[-1] < top:
        p = rungs[-1]
        rungs.append(p * 3 // 2 if p & (p - 1) == 0 else p * 4 // 3)
    ladder = np.minimum(np.array(rungs, dtype=np.int64), int(s_max))
    return ladder[np.minimum(np.searchsorted(ladder, sizes), len(ladder) - 1)]


@torch.no_grad()
def embed_nodes(
    net: PSEGCN,
    centres: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    rerank_of: RowsOf,
    hop1: int,
    hop2: int,
    local_k: int = 10,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """PSE-GCN embeddings ``(b, O) float32`` of ``centres (b,)`` (eval mode, no grad).

    Centres are taken :data:`CENTRE_CHUNK` at a time, grouped by padded subgraph size
    (:func:`bucket_sizes`), and every forward is padded to the fixed shape
    ``(batch_size, bucket)``: a centre's embedding does not depend on the other centres of
    the call. Only subgraph nodes are asked of ``feats_of``/``rows_of``/``rerank_of``.
    Memory per batch ≈ batch_size · S · (d + 6·S + 8·H) · 4 bytes, S ≤ :func:`max_nodes`.
    ``device`` runs the forwards there; the model is moved there for the call and back.
    """
    centres = np.asarray(centres, dtype=np.int64).reshape(-1)
    hop1, hop2 = _check_hops(hop1, hop2)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out = np.zeros((len(centres), net.dims[1]), dtype=np.float32)
    if len(centres) == 0:
        return out
    s_max = max_nodes(hop1, hop2)
    was_training = net.training
    home = next(net.parameters()).device
    net.eval()
    net.to(device)
    try:
        chunks = range(0, len(centres), CENTRE_CHUNK)
        for lo in tqdm(chunks, desc="pse-gcn", unit="chunk", disable=not progress):
            nodes, sizes = subgraph_nodes(centres[lo : lo + CENTRE_CHUNK], rerank_of, hop1, hop2)
            bucket = bucket_sizes(sizes, s_max)
            order = np.argsort(bucket, kind="stable")
            for s in np.unique(bucket):
                group = order[bucket[order] == s]
                for a in range(0, len(group), batch_size):
                    rows = group[a : a + batch_size]
                    block = np.full((batch_size, int(s)), -1, dtype=np.int64)
                    block[: len(rows)] = nodes[rows, : int(s)]
                    x, adj, mask = subgraph_batch(block, feats_of, rows_of, local_k)
                    emb = net.embed_centres(
                        as_tensor(x).to(device), as_tensor(adj).to(device),
                        torch.from_numpy(mask).to(device),
                    )
                    out[lo + rows] = emb[: len(rows)].float().cpu().numpy()
    finally:
        net.to(home)
        net.train(was_training)
    return out


def hardest_pairs(
    emb: Tensor, labels: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """For every slot of ``emb (B, S, O)``: ``(cos to its hardest positive, cos to its hardest
    negative, valid)``, each ``(B, S)``. Hardest positive = the same-label real node of its
    subgraph with the smallest cosine (itself included), hardest negative = the
    different-label real node with the largest; ``valid`` = a real node with a negative."""
    e = F.normalize(emb, dim=-1)
    cos = torch.bmm(e, e.transpose(1, 2))
    keep = mask.to(torch.bool)
    pair = keep[:, :, None] & keep[:, None, :]
    same = labels[:, :, None] == labels[:, None, :]
    pos = torch.where(pair & same, cos, torch.inf).amin(dim=-1)
    neg_mask = pair & ~same
    neg = torch.where(neg_mask, cos, -torch.inf).amax(dim=-1)
    valid = keep & neg_mask.any(dim=-1)
    return pos, neg, valid


def hard_triplet_loss(emb: Tensor, labels: Tensor, mask: Tensor, a: float = 0.9) -> Tensor:
    """The reference's hard-triplet loss over subgraphs: every real node with a negative in
    its subgraph is an anchor (see :func:`hardest_pairs`); mean over anchors of
    ``relu(cos_n − cos_p + (2a − 1)) + relu(cos_n − 0.1) + relu(a − cos_p)``. 0 (still
    differentiable) when no anchor has a negative. Labels are compared within a subgraph
    only: no N x N label matrix."""
    pos, neg, valid = hardest_pairs(emb, labels, mask)
    if not bool(valid.any()):
        return emb.sum() * 0.0
    p, n = pos[valid], neg[valid]
    return (
        F.relu(n - p + (2 * a - 1)).mean() + F.relu(n - 0.1).mean() + F.relu(a - p).mean()
    )
