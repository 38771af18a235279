"""The hard-clusters edge scorer (Chen et al., ECCV 2022): P(same identity) for each of an
anchor's k neighbours, from a transformer over those k neighbours' features.

An anchor's token sequence is its kNN row's features in rank order (rank 0 is normally the
anchor itself). One post-norm encoder layer (DETR style: a sinusoidal encoding of the
neighbour rank is added to queries and keys only) lets the k tokens attend to EACH OTHER;
the reference implementation builds ``nn.MultiheadAttention`` without ``batch_first`` and
so attends across the anchors of a batch instead, which makes a prediction depend on its
batch. A pair head maps ``[H_0 ‖ H_j]`` to one logit per neighbour.

Inference pads every batch to the same number of anchors, so an anchor's probabilities
never depend on how many anchors share its batch or which partition computed them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ltc_ray.models.gcn_v import ROW_BLOCK

__all__ = ["EdgeScorer", "ScorerShape", "edge_probabilities", "resort_rows", "token_batch"]

FeatsOf = Callable[[np.ndarray], np.ndarray]


@dataclass
class ScorerShape:
    """Architecture of an :class:`EdgeScorer`. The reference is d_model = feature dim (256),
    8 heads, FFN 2048; the default here is 4x cheaper per token (d_model 128, FFN 512),
    which trains in minutes on CPUs and scored as well on the synthetic benchmark."""

    in_dim: int = 256
    d_model: int = 128
    heads: int = 4
    ffn: int = 512
    layers: int = 1
    dropout: float = 0.2
    k: int = 80

    def __post_init__(self) -> None:
        for name in ("in_dim", "d_model", "heads", "ffn", "layers", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"scorer {name} must be a positive int, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def rank_encoding(length: int, dim: int) -> Tensor:
    """Sinusoidal encoding of positions ``0..length-1`` (Vaswani et al.), ``(length, dim)``."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    enc = torch.zeros(length, dim)
    enc[:, 0::2] = torch.sin(pos * freq)
    enc[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return enc


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; the position enters queries and keys only."""

    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, ffn)
        self.linear2 = nn.Linear(ffn, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, pad: Tensor | None) -> Tensor:
        qk = src + pos
        attended, _ = self.attn(qk, qk, src, key_padding_mask=pad, need_weights=False)
        src = self.norm1(src + self.dropout(attended))
        hidden = self.linear2(self.dropout(torch.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(hidden))


class EdgeScorer(nn.Module):
    """``forward(tokens (B, k, in_dim), pad (B, k) bool or None) -> logits (B, k)``."""

    def __init__(self, shape: ScorerShape):
        super().__init__()
        self.shape = shape
        d = shape.d_model
        self.project = nn.Identity() if shape.in_dim == d else nn.Linear(shape.in_dim, d)
        self.register_buffer("pos", rank_encoding(shape.k, d), persistent=False)
        self.layers = nn.ModuleList(
            EncoderLayer(d, shape.heads, shape.ffn, shape.dropout) for _ in range(shape.layers))
        self.pair = nn.Sequential(
            nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, d // 2), nn.ReLU(), nn.Linear(d // 2, 1))

    def forward(self, tokens: Tensor, pad: Tensor | None = None) -> Tensor:
        h = self.project(tokens)
        pos = self.pos[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, pos, pad)
        anchor = h[:, :1].expand_as(h)
        return self.pair(torch.cat([anchor, h], dim=-1)).squeeze(-1)


def token_batch(knn_ids: np.ndarray, feats_of: FeatsOf) -> tuple[np.ndarray, np.ndarray]:
    """Tokens ``(B, k, D) float32`` for kNN rows ``knn_ids (B, k)`` and the padding mask
    ``(B, k)`` (True where a row has no neighbour, id -1: a zero token that is never
    attended to)."""
    ids = np.asarray(knn_ids, dtype=np.int64)
    pad = ids < 0
    feats = feats_of(np.where(pad, ids[:, :1], ids).ravel())
    tokens = np.asarray(feats, dtype=np.float32).reshape(*ids.shape, -1)
    tokens[pad] = 0.0
    return tokens, pad


@torch.no_grad()
def edge_probabilities(model: EdgeScorer, knn_ids: np.ndarray, feats_of: FeatsOf,
                       batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """P(same identity as the anchor) ``(n, k) float32`` for every kNN row; 0 for padding.

    Every forward pass sees the same number of anchors (``batch_size`` rounded up so that
    anchors x k is a multiple of :data:`~ltc_ray.models.gcn_v.ROW_BLOCK` GEMM rows; the last
    batch is padded with copies of its first row) and always a padding mask, so a row's
    result does not depend on its batch or its neighbours in it."""
    model = model.to(device).eval()
    n, k = knn_ids.shape
    unit = ROW_BLOCK // math.gcd(k, ROW_BLOCK)
    batch_size = -(-max(1, batch_size) // unit) * unit
    out = np.zeros(knn_ids.shape, dtype=np.float32)
    for lo in range(0, n, batch_size):
        rows = knn_ids[lo: lo + batch_size]
        real = len(rows)
        if real < batch_size:
            rows = np.concatenate([rows, np.repeat(rows[:1], batch_size - real, axis=0)])
        tokens, pad = token_batch(rows, feats_of)
        logits = model(torch.from_numpy(tokens).to(device), torch.from_numpy(pad).to(device))
        prob = torch.sigmoid(logits).float().cpu().numpy()[:real]
        prob[pad[:real]] = 0.0
        out[lo: lo + real] = prob
    return out


def resort_rows(knn_ids: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row re-sorted by the model's distance d' = 1 - p (p descending; ties keep the
    kNN rank order; padding last): ``(ids, p)``."""
    key = np.where(knn_ids >= 0, prob, -1.0)
    order = np.argsort(-key, axis=1, kind="stable")
    return (np.take_along_axis(knn_ids, order, axis=1),
            np.take_along_axis(prob, order, axis=1).astype(np.float32))
