"""GCN-D and GCN-S (Yang et al., CVPR 2019): score and clean cluster proposals.

A proposal is a set of samples (CSR: ``offsets (P+1,)``, ``members (M,)`` sorted ascending
inside each proposal). Its graph is the kNN edges whose two endpoints are both members, weight
1 (learn-to-cluster's ``wo_weight=True``), symmetrised, plus I, row-normalised. GCN-D regresses
the proposal's IoU (or IoP) with its majority ground-truth cluster from max-pooled node
features; GCN-S marks which members share a seed member's identity (the seed is a 0/1 input
column). Features and kNN rows come from callables (``feats_of``/``rows_of``) so a partition
actor can serve them from its halo; everything here is array code over a batch of proposals.

Determinism: inference groups proposals by padded size (size rounded up to
:data:`~ltc_ray.models.gcn_e.SLOT_BLOCK`) and pads each batch so batch x slots is a multiple of
:data:`~ltc_ray.models.gcn_v.ROW_BLOCK`, as GCN-E does: a proposal's result is then bitwise
independent of the batch it lands in and of the other proposals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltc_ray.models.gcn_e import SLOT_BLOCK, _index_in, masked_inputs
from ltc_ray.models.gcn_v import ROW_BLOCK, as_tensor

__all__ = [
    "GCND",
    "GCNS",
    "MAX_SLOTS",
    "proposal_batch",
    "proposal_targets",
    "score_proposals",
    "seed_positions",
    "segment_proposals",
    "segment_targets",
]

# Inference caps a forward at this many padded slots (batch x slots); memory per forward
# ≈ MAX_SLOTS · (4·S + 3·d + 2·max(dims)) · 4 bytes: 0.75 GB measured at peak for 500-member
# proposals (S = 504) and 256-d features, far less for small ones (the S x S adjacency
# dominates).
MAX_SLOTS = 65536

# _links() looks (proposal, id) pairs up in a dense table up to this many cells (8 bytes each),
# with a binary search beyond.
_TABLE_CELLS = 1 << 22

FeatsOf = Callable[[np.ndarray], np.ndarray]
RowsOf = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------- model


class BatchedGraphConvNoBias(nn.Module):
    """ReLU(A X W) over a padded batch: x ``(B, S, in)``, A ``(B, S, S)``, W Xavier-uniform
    (as GCN-E here; learn-to-cluster draws U(±1/√out)).

    The product is taken in the cheaper order for the layer's widths (A (X W) when it narrows,
    (A X) W otherwise); the order is fixed per layer, so it never depends on the batch."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        b, s, n_in = x.shape
        n_out = self.weight.shape[1]
        if n_out < n_in:
            h = (x.reshape(b * s, n_in) @ self.weight).reshape(b, s, n_out)
            out = torch.bmm(adj, h)
        else:
            out = (torch.bmm(adj, x).reshape(b * s, n_in) @ self.weight).reshape(b, s, n_out)
        return torch.relu_(out)


class _ProposalGCN(nn.Module):
    """The shared body: GraphConv (no bias) -> ReLU -> node dropout, ``in_dim -> dims[0] ->
    ..``, and the ``classifier`` head."""

    _drop_last = True
    extra_inputs = 0  # trailing input columns that are not features (GCN-S: the seed mask)
    # centre the features on the proposal's mean before the first layer (our choice, not
    # the reference's: a proposal's purity no longer depends on where its identity sits)
    center = False
    # the features are followed by STRUCTURE_COLUMNS per member (our choice, see _structure)
    structure = False

    def __init__(self, in_dim: int, dims: Sequence[int], n_out: int, dropout: float):
        super().__init__()
        dims = tuple(int(d) for d in dims)
        if in_dim < 1 or not dims or min(dims) < 1:
            raise ValueError(f"in_dim ({in_dim}) and layer widths ({dims}) must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_dim = int(in_dim)
        self.dims = dims
        self.dropout = float(dropout)
        widths = (self.in_dim, *dims)
        self.convs = nn.ModuleList(
            BatchedGraphConvNoBias(widths[i], widths[i + 1]) for i in range(len(dims))
        )
        self.classifier = nn.Linear(dims[-1], n_out)

    def _body(self, x: Tensor, adj: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Node features ``(B, S, dims[-1])`` (exactly 0 on padded slots) and ``keep (B, S, 1)``.
        Padded features and their adjacency rows and columns are zeroed first, so whatever
        they hold (even NaN) never reaches a real slot; without a bias they stay 0."""
        h, adj, keep = masked_inputs(self, x, adj, mask)
        b, s, _ = x.shape
        if self.center:  # features minus the proposal's mean (seed, structure columns kept)
            width = self.in_dim - self.extra_inputs - STRUCTURE_COLUMNS * self.structure
            count = keep.sum(dim=1, keepdim=True).clamp(min=1)
            mean = h[..., :width].sum(dim=1, keepdim=True) / count
            h = torch.cat([torch.where(keep, h[..., :width] - mean, 0.0), h[..., width:]], -1)
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            h = conv(h, adj)
            if self.training and self.dropout > 0 and (i < last or self._drop_last):
                # learn-to-cluster's Dropout2d on (B, S, C) zeroes whole node rows: one draw
                # per node, not per value (elementwise dropout was a step's slowest op).
                h = h * F.dropout(h.new_ones(b, s, 1), self.dropout, True)
        return h, keep

    def _head(self, rows: Tensor) -> Tensor:
        """The classifier on ``(n, C)`` rows, zero-padded to a multiple of ROW_BLOCK rows so a
        row's result never depends on how many rows share the GEMM."""
        n = rows.shape[0]
        pad = -n % ROW_BLOCK
        if pad:
            rows = F.pad(rows, (0, 0, 0, pad))
        return self.classifier(rows)[:n]


class GCND(_ProposalGCN):
    """GCN-D: ``in_dim -> dims`` GraphConvs, max-pool over the real slots, Linear(dims[-1], 1):
    the proposal's predicted IoU (or IoP, whichever it was trained on).

    Unlike learn-to-cluster, the last layer has no dropout: dropout's 1/(1-p) rescaling keeps
    means but not maxima, so max-pooled features were ~2x larger in training than at test
    and the scores came out shifted (held-out MSE above the constant predictor's, measured)."""

    _drop_last = False

    def __init__(self, in_dim: int = 256, dims: Sequence[int] = (512, 64), dropout: float = 0.5):
        super().__init__(in_dim, dims, 1, dropout)

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor) -> Tensor:
        """``x (B, S, in_dim)``, row-normalised ``adj (B, S, S)``, ``mask (B, S) bool`` ->
        ``(B,)`` scores; a row without real slots scores the bias alone."""
        h, keep = self._body(x, adj, mask)
        pooled = h.masked_fill(~keep, float("-inf")).amax(dim=1)
        pooled = torch.where(keep.any(dim=1), pooled, 0.0)
        return self._head(pooled).squeeze(1)


class GCNS(_ProposalGCN):
    """GCN-S: the GCN-D body over features + a seed column (``in_dim`` = d + 1), no pooling,
    per-slot Linear(dims[-1], 2) and log-softmax; class 1 = "same identity as the seed".
    Dropout follows every layer, as in learn-to-cluster (the per-slot head is linear)."""

    extra_inputs = 1

    _drop_last = True
    extra_inputs = 0  # trailing input columns that are not features (GCN-S: the seed mask)
    # centre the features on the proposal's mean before the first layer (our choice, not
    # the reference's: a proposal's purity no longer depends on where its identity sits)
    center = False
    # the features are followed by STRUCTURE_COLUMNS per member (our choice, see _structure)
    structure = False

    def __init__(self, in_dim: int = 257, dims: Sequence[int] = (512, 64), dropout: float = 0.5):
        super().__init__(in_dim, dims, 2, dropout)

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor) -> Tensor:
        """``x (B, S, in_dim)`` (last column the seed mask), ``adj (B, S, S)``, ``mask (B, S)``
        -> log-probabilities ``(B, S, 2)``; padded slots' outputs are meaningless."""
        h, _ = self._body(x, adj, mask)
        b, s, c = h.shape
        return torch.log_softmax(self._head(h.reshape(b * s, c)), dim=-1).reshape(b, s, 2)


# ---------------------------------------------------------------- proposals as arrays


def _check_csr(offsets: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``offsets``/``members`` as int64 after checking the CSR layout: offsets start at 0, end
    at M, every proposal has a member, ids are >= 0 and strictly ascending inside a proposal."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
    members = np.asarray(members, dtype=np.int64).reshape(-1)
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(members):
        raise ValueError(f"offsets must run from 0 to len(members) = {len(members)}")
    sizes = np.diff(offsets)
    if np.any(sizes < 1):
        raise ValueError("every proposal needs at least one member")
    if len(members) and int(members.min()) < 0:
        raise ValueError("member ids must be >= 0")
    step = np.diff(members)
    inner = np.ones(len(step), dtype=bool)
    inner[offsets[1:-1] - 1] = False  # the step from one proposal's last to the next's first
    if np.any(step[inner] <= 0):
        raise ValueError("members must be unique and sorted ascending inside each proposal")
    return offsets, members


def _round_up(n: np.ndarray | int, block: int) -> np.ndarray | int:
    return -(-n // block) * block


def _layout(offsets: np.ndarray, members: np.ndarray, proposal_idx: np.ndarray):
    """Per member occurrence of the chosen proposals: ``(owner, slot, ids, sizes)`` with owner
    the row in the batch and slot the position inside the proposal."""
    starts = offsets[proposal_idx]
    sizes = offsets[proposal_idx + 1] - starts
    owner = np.repeat(np.arange(len(proposal_idx)), sizes)
    first = np.cumsum(sizes) - sizes  # each row's first occurrence
    slot = np.arange(len(owner)) - first[owner]
    return owner, slot, members[starts[owner] + slot], sizes


STRUCTURE_COLUMNS = 3  # a member's share of neighbours inside, their mean cosine, best outside


def _links(
    owner: np.ndarray,
    slot: np.ndarray,
    ids: np.ndarray,
    b: int,
    s: int,
    rows_of: RowsOf,
    adj_k: int,
    structure: bool = False,
):
    """Boolean ``(b, s, s)`` graph of the proposals (in-proposal kNN edges among the first
    ``adj_k`` columns, symmetrised, with self loops on real slots), plus ``uniq``/``inv`` (the
    batch's distinct ids and each occurrence's index in them). One ``rows_of`` call."""
    uniq, inv = np.unique(ids, return_inverse=True)
    link = np.zeros((b, s, s), dtype=bool)
    if len(uniq) == 0:
        return (link, uniq, inv, np.zeros((0, STRUCTURE_COLUMNS), np.float32)) if structure \
            else (link, uniq, inv)
    nbr_ids, nbr_sims = rows_of(uniq)
    nbr_ids = np.asarray(nbr_ids)
    if nbr_ids.ndim != 2 or len(nbr_ids) != len(uniq):
        raise ValueError(f"rows_of returned {nbr_ids.shape} for {len(uniq)} ids")
    nbr = nbr_ids[:, :adj_k]
    # An occurrence's key is (row, index of its id in uniq): strictly ascending because
    # members are sorted inside a proposal. Neighbour l of occurrence j is in j's proposal
    # iff the key (row of j, index of l) is among them.
    n_u = len(uniq)
    key = owner * n_u + inv
    if np.any(np.diff(key) <= 0):
        raise ValueError("members must be unique and sorted ascending inside each proposal")
    to_u = _index_in(uniq, nbr)[inv]  # (m, k'), -1: the id is in no proposal of the batch
    if b * n_u <= _TABLE_CELLS:  # a dense (row, id) -> occurrence table
        table = np.full(b * n_u + 1, -1, dtype=np.int64)  # the last cell answers "absent"
        table[key] = np.arange(len(key))
        at = table[np.where(to_u >= 0, owner[:, None] * n_u + to_u, b * n_u)]
        hit = at >= 0
    else:
        query = owner[:, None] * n_u + to_u
        at = np.minimum(np.searchsorted(key, query), len(key) - 1)
        hit = (to_u >= 0) & (key[at] == query)
    hit &= to_u != inv[:, None]
    r, c = np.nonzero(hit)
    link[owner[r], slot[r], slot[at[r, c]]] = True
    link |= link.transpose(0, 2, 1)
    link[owner, slot, slot] = True
    if not structure:
        return link, uniq, inv
    return link, uniq, inv, _structure(nbr[inv], np.asarray(nbr_sims)[:, :adj_k][inv], ids, hit)


def _structure(nbr: np.ndarray, sims: np.ndarray, ids: np.ndarray, inside: np.ndarray
               ) -> np.ndarray:
    """Per member occurrence, how its kNN row sits with the proposal (our addition to
    learn-to-cluster's inputs, which see only the edges inside): the share of its
    neighbours inside, their mean cosine, and the best cosine to a neighbour outside
    (a proposal that leaves out part of its identity has members with close outsiders).
    ``(m, STRUCTURE_COLUMNS) float32``."""
    valid = (nbr >= 0) & (nbr != ids[:, None])
    inside = inside & valid
    n_valid = np.maximum(valid.sum(axis=1), 1)
    n_in = inside.sum(axis=1)
    sims = sims.astype(np.float32)
    mean_in = np.where(n_in > 0, (sims * inside).sum(axis=1) / np.maximum(n_in, 1), 0.0)
    out = np.where(valid & ~inside, sims, -1.0)
    best_out = out.max(axis=1) if out.shape[1] else np.full(len(nbr), -1.0)
    return np.stack([n_in / n_valid, mean_in, best_out], axis=1).astype(np.float32)


def _normalise(link: np.ndarray) -> np.ndarray:
    """Row-normalised float32 adjacency of a boolean graph (rows without entries stay 0)."""
    adj = link.astype(np.float32)
    degree = link.sum(axis=2, dtype=np.int64).astype(np.float32)
    degree[degree == 0] = 1.0
    adj /= degree[:, :, None]
    return adj


def _seed_slots(link: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The slot with the most in-proposal neighbours in each row (ties: the first = the
    smallest id, as members are sorted); padded slots never win."""
    degree = link.sum(axis=2, dtype=np.int64)
    degree[np.arange(link.shape[1])[None, :] >= sizes[:, None]] = -1
    return np.argmax(degree, axis=1).astype(np.int64)


def _build(
    offsets: np.ndarray,
    members: np.ndarray,
    proposal_idx: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    adj_k: int,
    s: int,
    seed: np.ndarray | str | None,
    structure: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x, adj, mask`` of proposals padded to ``s`` slots and the seed slots used (``seed``
    an array of positions, ``"auto"`` for :func:`seed_positions`' rule, None for GCN-D);
    with ``structure`` the features are followed by :func:`_structure`'s columns."""
    owner, slot, ids, sizes = _layout(offsets, members, proposal_idx)
    b = len(proposal_idx)
    got = _links(owner, slot, ids, b, s, rows_of, adj_k, structure)
    link, uniq, inv = got[:3]
    feats = np.asarray(feats_of(uniq), dtype=np.float32)
    if feats.ndim != 2 or len(feats) != len(uniq):
        raise ValueError(f"feats_of returned {feats.shape} for {len(uniq)} ids")
    d = feats.shape[1]
    extra = STRUCTURE_COLUMNS if structure else 0
    x = np.zeros((b, s, d + extra + (seed is not None)), dtype=np.float32)
    x[owner, slot, :d] = feats[inv]
    if structure:
        x[owner, slot, d : d + extra] = got[3]
    d += extra
    mask = np.arange(s)[None, :] < sizes[:, None]
    seeds = np.zeros(0, dtype=np.int64)
    if seed is not None:
        seeds = _seed_slots(link, sizes) if isinstance(seed, str) else seed
        x[np.arange(b), seeds, d] = 1.0
    return x, _normalise(link), mask, seeds


def proposal_batch(
    offsets: np.ndarray,
    members: np.ndarray,
    proposal_idx: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    adj_k: int = 80,
    seed_pos: np.ndarray | None = None,
    slot_block: int = SLOT_BLOCK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The padded model input of proposals ``proposal_idx (b,)``.

    ``feats_of(ids) -> (m, d)`` features, ``rows_of(ids) -> (knn_ids (m, k), knn_sims)`` kNN
    rows (self first, -1 empty), each called once on the batch's distinct ids. Returns
    ``x (b, S, d) float32`` (``d + 1`` with ``seed_pos``: the last column is 1 at each
    proposal's seed, ``seed_pos (b,)`` positions inside the proposals), ``adj (b, S, S)
    float32`` (see the module docstring; only the first ``adj_k`` kNN columns count) and
    ``mask (b, S) bool``; S = the largest size rounded up to ``slot_block``, padding all 0.
    Memory ≈ b·S·(d + S)·4 bytes plus b·S·adj_k·40 bytes of index work.
    """
    proposal_idx = np.asarray(proposal_idx, dtype=np.int64).reshape(-1)
    offsets = np.asarray(offsets, dtype=np.int64)
    members = np.asarray(members, dtype=np.int64)
    n_prop = len(offsets) - 1
    if len(proposal_idx) and (proposal_idx.min() < 0 or proposal_idx.max() >= n_prop):
        raise ValueError(f"proposal_idx must be in [0, {n_prop})")
    if adj_k < 1 or slot_block < 1:
        raise ValueError(f"adj_k ({adj_k}) and slot_block ({slot_block}) must be positive")
    sizes = offsets[proposal_idx + 1] - offsets[proposal_idx]
    if np.any(sizes < 1):
        raise ValueError("every proposal needs at least one member")
    if seed_pos is not None:
        seed_pos = np.asarray(seed_pos, dtype=np.int64).reshape(-1)
        if len(seed_pos) != len(proposal_idx) or np.any((seed_pos < 0) | (seed_pos >= sizes)):
            raise ValueError("seed_pos must hold one position inside each chosen proposal")
    s = int(_round_up(int(sizes.max()), slot_block)) if len(sizes) else 0
    x, adj, mask, _ = _build(offsets, members, proposal_idx, feats_of, rows_of, adj_k, s, seed_pos)
    return x, adj, mask


# ---------------------------------------------------------------- targets and seeds


def proposal_targets(
    offsets: np.ndarray, members: np.ndarray, labels: np.ndarray, kind: str = "iou"
) -> np.ndarray:
    """GCN-D's target per proposal ``(P,) float32``: with G the whole ground-truth cluster of
    the proposal's majority label (ties: the smallest label), ``"iou"`` = |P ∩ G| / |P ∪ G|,
    ``"iop"`` = |P ∩ G| / |P|. ``labels (N,)`` by global id; every value (-1 too) is a label."""
    if kind not in ("iou", "iop"):
        raise ValueError(f"kind must be 'iou' or 'iop', got {kind!r}")
    offsets, members = _check_csr(offsets, members)
    labels = np.asarray(labels).reshape(-1)
    n_prop = len(offsets) - 1
    if n_prop == 0:
        return np.zeros(0, dtype=np.float32)
    if int(members.max()) >= len(labels):
        raise ValueError(f"member id {int(members.max())} has no label ({len(labels)} labels)")
    _, code, label_size = np.unique(labels, return_inverse=True, return_counts=True)
    n_codes = len(label_size)
    sizes = np.diff(offsets)
    owner = np.repeat(np.arange(n_prop, dtype=np.int64), sizes)
    pair, count = np.unique(owner * n_codes + code[members], return_counts=True)
    p_owner, p_code = pair // n_codes, pair % n_codes
    # Per proposal: the largest count first, then the smallest label (codes follow labels).
    order = np.lexsort((p_code, -count, p_owner))
    best = order[np.r_[True, p_owner[order][1:] != p_owner[order][:-1]]]
    inter = count[best].astype(np.float64)  # one per proposal, in proposal order
    if kind == "iop":
        return (inter / sizes).astype(np.float32)
    union = sizes + label_size[p_code[best]] - inter
    return (inter / union).astype(np.float32)


def segment_targets(
    offsets: np.ndarray, members: np.ndarray, labels: np.ndarray, seed_pos: np.ndarray
) -> np.ndarray:
    """GCN-S's target per member occurrence ``(M,) int64``: 1 where the member's label equals
    its proposal's seed member's label (``seed_pos (P,)`` positions inside the proposals)."""
    offsets, members = _check_csr(offsets, members)
    labels = np.asarray(labels).reshape(-1)
    sizes = np.diff(offsets)
    seed_pos = np.asarray(seed_pos, dtype=np.int64).reshape(-1)
    if len(seed_pos) != len(sizes) or np.any((seed_pos < 0) | (seed_pos >= sizes)):
        raise ValueError("seed_pos must hold one position inside each proposal")
    if len(members) and int(members.max()) >= len(labels):
        raise ValueError(f"member id {int(members.max())} has no label ({len(labels)} labels)")
    seed_label = labels[members[offsets[:-1] + seed_pos]]
    return (labels[members] == np.repeat(seed_label, sizes)).astype(np.int64)


def _size_batches(
    sizes: np.ndarray, batch_size: int, max_slots: int = MAX_SLOTS
) -> list[tuple[np.ndarray, int]]:
    """Inference batches ``(proposal indices, S)``: proposals grouped by padded size S (size
    rounded up to SLOT_BLOCK), at most ``batch_size`` and ``max_slots // S`` (>= 1) a batch.
    A proposal's S depends on its own size only, which keeps its result batch-independent."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(sizes) == 0:
        return []
    padded = _round_up(sizes, SLOT_BLOCK)
    order = np.argsort(padded, kind="stable")
    padded = padded[order]
    bounds = np.r_[np.flatnonzero(np.r_[True, padded[1:] != padded[:-1]]), len(order)]
    out = []
    for a, hi in zip(bounds[:-1], bounds[1:], strict=True):
        s = int(padded[a])
        step = max(1, min(batch_size, max_slots // s))
        out.extend((order[lo : min(lo + step, hi)], s) for lo in range(a, hi, step))
    return out


def seed_positions(
    offsets: np.ndarray, members: np.ndarray, rows_of: RowsOf, adj_k: int = 80
) -> np.ndarray:
    """The test-time seed of each proposal ``(P,) int64`` (a position inside it): the member
    with the most in-proposal neighbours in the proposal's symmetrised kNN graph (first
    ``adj_k`` columns), ties to the first (smallest id).

    Our choice: learn-to-cluster seeds GCN-S with a random node in training; at test time its
    ``use_max_degree_seed`` option (argmax of the adjacency's row sums) is this same rule. The
    best-connected member is the likeliest to sit inside the proposal's dominant identity, and
    the rule is deterministic.
    """
    offsets, members = _check_csr(offsets, members)
    if adj_k < 1:
        raise ValueError(f"adj_k must be positive, got {adj_k}")
    sizes = np.diff(offsets)
    seeds = np.zeros(len(sizes), dtype=np.int64)
    for rows, s in _size_batches(sizes, len(sizes) or 1):
        owner, slot, ids, sz = _layout(offsets, members, rows)
        link, _, _ = _links(owner, slot, ids, len(rows), s, rows_of, adj_k)
        seeds[rows] = _seed_slots(link, sz)
    return seeds


# ---------------------------------------------------------------- inference


def _run_batches(
    model: _ProposalGCN,
    offsets: np.ndarray,
    members: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    adj_k: int,
    batch_size: int,
    device: str | torch.device,
    seed: str | None,
):
    """Yield ``(rows, output, mask, seeds)`` per size batch, the model in eval mode on
    ``device`` (moved back afterwards); each batch zero-padded so batch x slots is a multiple
    of ROW_BLOCK."""
    if adj_k < 1:
        raise ValueError(f"adj_k must be positive, got {adj_k}")
    sizes = np.diff(offsets)
    was_training = model.training
    home = next(model.parameters()).device
    model.eval()
    model.to(device)
    try:
        for rows, s in _size_batches(sizes, batch_size):
            x, adj, mask, seeds = _build(offsets, members, rows, feats_of, rows_of, adj_k, s, seed,
                                         model.structure)
            if x.shape[2] != model.in_dim:
                raise ValueError(f"inputs have {x.shape[2]} columns, the model {model.in_dim}")
            b = len(rows)
            padded = _round_up(b, ROW_BLOCK // math.gcd(s, ROW_BLOCK))
            xb = torch.zeros(padded, s, x.shape[2])
            ab = torch.zeros(padded, s, s)
            mb = torch.zeros(padded, s, dtype=torch.bool)
            xb[:b], ab[:b], mb[:b] = as_tensor(x), as_tensor(adj), torch.from_numpy(mask)
            out = model(xb.to(device), ab.to(device), mb.to(device))[:b].cpu().numpy()
            yield rows, out, mask, seeds
    finally:
        model.to(home)
        model.train(was_training)


@torch.no_grad()
def score_proposals(
    model: GCND,
    offsets: np.ndarray,
    members: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    adj_k: int = 80,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """GCN-D's score of every proposal ``(P,) float32`` (predicted IoU or IoP).

    Proposals run grouped by padded size, at most ``batch_size`` and :data:`MAX_SLOTS` slots a
    forward, results scattered back: bitwise independent of ``batch_size`` and of the other
    proposals. One ``feats_of`` and one ``rows_of`` call per batch.
    """
    offsets, members = _check_csr(offsets, members)
    scores = np.empty(len(offsets) - 1, dtype=np.float32)
    for rows, out, _, _ in _run_batches(
        model, offsets, members, feats_of, rows_of, adj_k, batch_size, device, None
    ):
        scores[rows] = out
    return scores


@torch.no_grad()
def segment_proposals(
    model: GCNS,
    offsets: np.ndarray,
    members: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    adj_k: int = 80,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """GCN-S's ``keep_prob (M,) float32``: per member occurrence, the probability that it
    shares its proposal's seed's identity; the seed (:func:`seed_positions`' rule, computed
    from the same batch's graph) gets 1.0. Batching and determinism as in
    :func:`score_proposals`."""
    offsets, members = _check_csr(offsets, members)
    keep = np.empty(len(members), dtype=np.float32)
    for rows, out, mask, seeds in _run_batches(
        model, offsets, members, feats_of, rows_of, adj_k, batch_size, device, "auto"
    ):
        prob = np.exp(out[:, :, 1])
        prob[np.arange(len(rows)), seeds] = 1.0
        owner, slot = np.nonzero(mask)  # (row, slot) in member order of each proposal
        keep[offsets[rows][owner] + slot] = prob[owner, slot]
    return keep
