"""GCN-V (Yang et al., CVPR 2020): a one-layer GCN that regresses each node's confidence.

H = ReLU([X ‖ ÂX] W + b), conf = Linear -> PReLU -> Linear(H). The aggregate ÂX is computed
outside the module (:func:`aggregate`, scipy), so the same forward serves whole-graph training,
whole-graph inference and partitioned inference, where a partition computes its owned rows of
ÂX from its halo. Parameter names follow learn-to-cluster (``conv1.*``, ``classifier.*``).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

__all__ = ["GCNV", "ROW_BLOCK", "aggregate", "as_tensor", "predict"]

# predict() pads every batch to a multiple of this many rows: CPU GEMM kernels round a row
# differently when the batch height is odd or tiny, and padding keeps a row's result
# independent of the batch it lands in.
ROW_BLOCK = 64


class GraphConvConcat(nn.Module):
    """ReLU([x ‖ agg] W + b) with W ``(2 * in_dim, out_dim)`` Xavier-uniform and b = 0."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2 * in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: Tensor, agg: Tensor) -> Tensor:
        return torch.relu(torch.cat([x, agg], dim=1) @ self.weight + self.bias)


class GCNV(nn.Module):
    """The GCN-V vertex-confidence model over ``in_dim``-d features with a ``hidden``-d layer."""

    def __init__(self, in_dim: int = 256, hidden: int = 512):
        super().__init__()
        if in_dim < 1 or hidden < 1:
            raise ValueError(f"in_dim ({in_dim}) and hidden ({hidden}) must be positive")
        self.in_dim = int(in_dim)
        self.hidden = int(hidden)
        self.conv1 = GraphConvConcat(self.in_dim, self.hidden)
        self.classifier = nn.Sequential(
            nn.Linear(self.hidden, self.hidden), nn.PReLU(self.hidden), nn.Linear(self.hidden, 1)
        )

    def forward(self, x: Tensor, agg: Tensor) -> tuple[Tensor, Tensor]:
        """``x (t, in_dim)`` target features and ``agg (t, in_dim)`` their rows of ÂX ->
        ``(conf (t,), hidden (t, hidden))``."""
        h = self.conv1(x, agg)
        return self.classifier(h).squeeze(1), h


def aggregate(adj_rows: sp.csr_matrix, x_cols: np.ndarray) -> np.ndarray:
    """Rows of ÂX: ``(t, d) float32`` = ``adj_rows (t, m)`` @ ``x_cols (m, d)``.

    scipy's CSR product adds each row's entries in stored (global column) order, single-threaded,
    so a row's result does not depend on the other rows or on the partitioning.
    """
    adj_rows = sp.csr_matrix(adj_rows, dtype=np.float32)
    x_cols = np.ascontiguousarray(x_cols, dtype=np.float32)
    if x_cols.ndim != 2 or adj_rows.shape[1] != len(x_cols):
        raise ValueError(f"adjacency {adj_rows.shape} does not match features {x_cols.shape}")
    return np.ascontiguousarray(adj_rows @ x_cols, dtype=np.float32)


def as_tensor(a: np.ndarray) -> Tensor:
    """A float32 CPU tensor sharing ``a``'s memory when possible (read-only arrays included:
    the callers here never write to it)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(a)


@torch.no_grad()
def predict(
    model: GCNV,
    x_rows: np.ndarray,
    agg_rows: np.ndarray,
    batch_rows: int = 65536,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Confidences ``(t,) float32`` and hidden features ``(t, hidden) float32`` of ``t`` rows.

    ``x_rows``/``agg_rows`` ``(t, in_dim)``. Runs in eval mode without autograd, ``batch_rows``
    rows at a time (memory ≈ batch_rows · (2·in_dim + 3·hidden) · 4 bytes on top of the
    outputs); each batch is zero-padded to a multiple of :data:`ROW_BLOCK` rows so the result
    is bitwise independent of ``batch_rows`` and of where a row sits in its batch.
    ``device`` runs the batches there (e.g. ``"cuda"`` on a GPU worker); the model is moved
    there for the call and back afterwards.
    """
    if x_rows.ndim != 2 or x_rows.shape != agg_rows.shape or x_rows.shape[1] != model.in_dim:
        raise ValueError(
            f"x {x_rows.shape} and agg {agg_rows.shape} must both be (t, {model.in_dim})"
        )
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")
    t = len(x_rows)
    conf = np.empty(t, dtype=np.float32)
    hidden = np.empty((t, model.hidden), dtype=np.float32)
    was_training = model.training
    home = next(model.parameters()).device
    model.eval()
    model.to(device)
    try:
        for lo in range(0, t, batch_rows):
            hi = min(lo + batch_rows, t)
            padded = -(-(hi - lo) // ROW_BLOCK) * ROW_BLOCK
            xb = torch.zeros(padded, model.in_dim)
            ab = torch.zeros(padded, model.in_dim)
            xb[: hi - lo] = as_tensor(x_rows[lo:hi])
            ab[: hi - lo] = as_tensor(agg_rows[lo:hi])
            c, h = model(xb.to(device), ab.to(device))
            conf[lo:hi] = c[: hi - lo].cpu().numpy()
            hidden[lo:hi] = h[: hi - lo].cpu().numpy()
    finally:
        model.to(home)
        model.train(was_training)
    return conf, hidden
