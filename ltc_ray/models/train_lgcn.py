"""Training L-GCN on a labelled split: per-hop1-slot NLL of "same identity as the pivot".

Each step takes ``batch_size`` pivots, builds their instance pivot subgraphs
(:func:`ltc_ray.models.lgcn.ips_batch`) from the in-memory split and scores their hop1 slots
against 1[label(hop1 node) == label(pivot)]; empty (-1) kNN slots are ignored. Each epoch
draws a fresh random subset of ``max_pivots`` pivots, so an epoch's cost is bounded however
large the split is. Subgraphs are rebuilt per batch, never stored.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ltc_ray.models.gcn_v import as_tensor
from ltc_ray.models.lgcn import LGCN, ips_batch, ips_sizes, resolve_hop1
from ltc_ray.models.train import _torch_threads

__all__ = ["TrainLConfig", "train_lgcn"]

log = logging.getLogger("ltc_ray")

# Batches are formed from shuffled windows of this many batches, sorted by subgraph size
# inside a window, so a batch pads to similar sizes while the order stays random.
SORT_WINDOW = 16


@dataclass
class TrainLConfig:
    """How L-GCN is trained.

    The reference's optimiser: SGD, lr 0.01, L2 weight decay 1e-4, batch 16 pivots, 4 epochs
    (momentum 0.9 as in learn-to-cluster's other trainers), run there over every pivot with
    hop1 200, hop2 10 for ~27 GPU-hours. Adam (lr 1e-3, 3e-3) at the same budget fitted the
    training identities as fast but ranked held-out identities' edges worse (AUC 0.77-0.82
    vs 0.85 on a synthetic 30K-row split), so SGD stays. The other defaults are sized to
    finish in under a minute on 2 CPU cores for 30K rows, k 80, d 256: each epoch draws
    ``max_pivots`` 8192 random pivots, hop1 40, hop2 5, widths (128, 128, 64, 64): ~33 s
    on one thread, about 1,000 pivots/s. The reference shapes (``hop1=None`` = k − 1, ``hop2=10``,
    ``dims=(512, 512, 256, 256)``) train about 15x slower per pivot. ``max_pivots`` None uses
    every pivot each epoch. ``threads`` defaults to 1: the per-batch matrices are small
    (S ≈ 50 nodes), and on a 2-core machine shared with other work two torch threads made
    every op ~40x slower (OpenMP barriers waiting on a descheduled thread); 0 keeps torch's
    thread count.
    """

    epochs: int = 4
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 16
    seed: int = 0
    threads: int = 1
    dims: tuple[int, ...] = (128, 128, 64, 64)
    hop1: int | None = 40
    hop2: int = 5
    active: int = 10
    max_pivots: int | None = 8192

    def __post_init__(self) -> None:
        self.dims = tuple(int(d) for d in self.dims)
        if self.epochs < 0 or not self.lr > 0 or self.weight_decay < 0 or self.batch_size < 1:
            raise ValueError(f"bad training config {self}")
        if not 0 <= self.momentum < 1 or self.threads < 0 or self.hop2 < 0 or self.active < 0:
            raise ValueError(f"bad training config {self}")
        if self.hop1 is not None and self.hop1 < 1:
            raise ValueError(f"bad training config {self}: hop1 must be >= 1 or None")
        if self.max_pivots is not None and self.max_pivots < 1:
            raise ValueError(f"bad training config {self}: max_pivots must be >= 1 or None")
        if len(self.dims) != 4 or min(self.dims) < 1:
            raise ValueError(f"bad training config {self}: dims must be 4 positive widths")


def _batches(pivots: np.ndarray, size: np.ndarray, batch: int, rng: np.random.Generator):
    """Batches of the (already shuffled) ``pivots``, each of similar subgraph ``size``
    (see SORT_WINDOW), in random order."""
    out = []
    window = batch * SORT_WINDOW
    for lo in range(0, len(pivots), window):
        chunk = np.argsort(size[lo : lo + window], kind="stable") + lo
        out.extend(chunk[i : i + batch] for i in range(0, len(chunk), batch))
    return [pivots[out[i]] for i in rng.permutation(len(out))]


def train_lgcn(
    x: np.ndarray,
    knn_ids: np.ndarray,
    labels: np.ndarray,
    cfg: TrainLConfig,
    progress: bool = True,
) -> tuple[LGCN, list[dict]]:
    """Train L-GCN on ``x (N, d) float32`` (L2-normalised features), their kNN rows
    ``knn_ids (N, k)`` (self at rank 0, -1 = none) and ``labels (N,)``. Returns the model
    (eval mode) and one history entry per epoch: ``{"epoch", "pivots", "loss", "accuracy",
    "seconds"}`` with loss the mean NLL and accuracy the share of correctly classified hop1
    slots over the epoch, both measured before each step.

    Seeded and reproducible for a given thread count (bitwise with ``threads=1``): weights
    from ``torch.manual_seed(cfg.seed)`` (the global RNG state is restored afterwards), pivot
    draws and batch order from ``np.random.default_rng(cfg.seed)``. Pivots with no neighbour
    among their first hop1 columns are never drawn. Memory ≈ the inputs + one batch:
    ``batch_size · S · (d + S + 6·max(dims)) · 4`` bytes, S ≤ 1 + hop1·(hop2 + 1).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    knn_ids = np.asarray(knn_ids)
    labels = np.asarray(labels)
    n = len(x)
    if x.ndim != 2 or labels.shape != (n,):
        raise ValueError(f"x {x.shape} and labels {labels.shape} must have N rows")
    if knn_ids.ndim != 2 or len(knn_ids) != n:
        raise ValueError(f"knn_ids {knn_ids.shape} must be ({n}, k)")
    if n and int(knn_ids.max()) >= n:
        raise ValueError(f"knn_ids refer to node {int(knn_ids.max())} but x has {n} rows")
    hop1 = resolve_hop1(cfg.hop1, knn_ids.shape[1])
    d = x.shape[1]
    history: list[dict] = []
    with _torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LGCN(d, cfg.dims)
        if cfg.epochs == 0:
            model.eval()
            return model, history
        cols = knn_ids[:, 1 : 1 + hop1]
        pool = np.flatnonzero(((cols >= 0) & (cols != np.arange(n)[:, None])).any(axis=1))
        if len(pool) == 0:
            raise ValueError("no training pivot: no row has a neighbour")
        per_epoch = len(pool) if cfg.max_pivots is None else min(cfg.max_pivots, len(pool))

        def feats_of(ids: np.ndarray) -> np.ndarray:
            return x[ids]

        def rows_of(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return knn_ids[ids], knn_ids[ids]  # the similarities are not used

        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        rng = np.random.default_rng(cfg.seed)
        log.info("l-gcn: training %d epochs on %d of %d pivots per epoch (hop1 %d, hop2 %d)",
                 cfg.epochs, per_epoch, len(pool), hop1, cfg.hop2)
        model.train()
        bar = tqdm(range(1, cfg.epochs + 1), desc="train l-gcn", unit="epoch", disable=not progress)
        for epoch in bar:
            t0 = time.perf_counter()
            chosen = rng.permutation(pool)[:per_epoch]
            size = ips_sizes(chosen, knn_ids[chosen], rows_of, hop1, cfg.hop2)
            total_loss, total_right, total_slots = 0.0, 0, 0
            for piv in _batches(chosen, size, cfg.batch_size, rng):
                xb, adj, mask, slot = ips_batch(
                    piv, knn_ids[piv], feats_of, rows_of, hop1, cfg.hop2, cfg.active
                )
                nbr = knn_ids[piv, 1 : 1 + hop1].astype(np.int64)
                valid = slot >= 0
                target = labels[np.where(valid, nbr, 0)] == labels[piv][:, None]
                vt = torch.from_numpy(valid)
                yt = torch.from_numpy(target[valid].astype(np.int64))
                opt.zero_grad(set_to_none=True)
                logp = model(as_tensor(xb), as_tensor(adj), torch.from_numpy(mask),
                             torch.from_numpy(slot))[vt]
                loss = torch.nn.functional.nll_loss(logp, yt)
                loss.backward()
                opt.step()
                slots = len(yt)
                total_loss += float(loss.detach()) * slots
                total_right += int((logp.detach().argmax(dim=1) == yt).sum())
                total_slots += slots
            mean_loss = total_loss / max(total_slots, 1)
            if not math.isfinite(mean_loss):
                raise RuntimeError(f"l-gcn training diverged at epoch {epoch} (loss {mean_loss})")
            accuracy = total_right / max(total_slots, 1)
            seconds = time.perf_counter() - t0
            history.append({"epoch": epoch, "pivots": int(per_epoch), "loss": mean_loss,
                            "accuracy": accuracy, "seconds": seconds})
            bar.set_postfix(loss=f"{mean_loss:.5f}", acc=f"{accuracy:.3f}")
            log.info("l-gcn: epoch %d/%d loss %.6f accuracy %.4f (%.1f s)",
                     epoch, cfg.epochs, mean_loss, accuracy, seconds)
        model.eval()
    return model, history
