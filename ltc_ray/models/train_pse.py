"""Training PSE-GCN on a labelled split: hard-triplet loss over each centre's subgraph.

Each step takes ``batch_size`` centres, builds their subgraphs
(:func:`ltc_ray.models.pse_gcn.subgraph_nodes` on the re-ranked graph,
:func:`~ltc_ray.models.pse_gcn.subgraph_batch` on the original kNN graph) from the in-memory
split, embeds every node of every subgraph and applies
:func:`~ltc_ray.models.pse_gcn.hard_triplet_loss` with the nodes' labels. Subgraphs are
rebuilt per window of batches, never stored for the whole split.
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
from ltc_ray.models.pse_gcn import (
    PSEGCN,
    hard_triplet_loss,
    hardest_pairs,
    subgraph_batch,
    subgraph_nodes,
)
from ltc_ray.models.train import _torch_threads
from ltc_ray.models.train_lgcn import SORT_WINDOW

__all__ = ["TrainPSEConfig", "train_pse_gcn"]

log = logging.getLogger("ltc_ray")

# The learning rate is multiplied by 0.1 at these fractions of the optimiser steps (the
# reference's schedule).
LR_MILESTONES = (0.4, 0.6, 0.8)


@dataclass
class TrainPSEConfig:
    """How PSE-GCN is trained.

    The reference's optimiser: SGD, lr 0.01, momentum 0.9, weight decay 1e-4, LR x0.1 at 40,
    60 and 80 % of the steps, widths (512, 512), hop1 79, hop2 10 (at most 870 nodes a
    subgraph), each training subgraph filled with nearest-identity members. The defaults
    here keep the subgraphs and the fill (64 nodes from the 8 nearest identities) and are
    sized for 2 CPU cores in width (``hidden`` 128, ``out_dim`` 512) and steps (measured
    at synthetic scale 0.05: hop1 30 / hop2 5 scored 67.4 pairwise F on part1, 79 / 10
    73.6, with the fill 81.1, at each one's best tau). ``epochs`` None trains ``steps``
    optimiser steps over shuffled passes of the split (the last pass cut short); an int
    trains that many full passes.
    ``threads`` defaults to 1 (as L-GCN's trainer: two torch threads on a shared 2-core
    machine were much slower); 0 keeps torch's thread count.
    """

    epochs: int | None = None
    steps: int = 1500
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    hidden: int = 128
    out_dim: int = 512
    hop1: int = 79
    hop2: int = 10
    local_k: int = 10
    # the reference fills every training subgraph with members of the identities whose
    # centres are nearest the centre's (hard negatives): this many extra nodes per
    # subgraph, drawn from the ``fill_classes`` nearest identities (0: no fill)
    fill: int = 64
    fill_classes: int = 8
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 0:
            raise ValueError(f"bad training config {self}: epochs must be >= 0 or None")
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"bad training config {self}")
        if not 0 <= self.momentum < 1 or self.threads < 0 or self.hidden < 1 or self.out_dim < 1:
            raise ValueError(f"bad training config {self}")
        if self.fill < 0 or self.fill_classes < 1:
            raise ValueError(f"bad training config {self}: fill >= 0, fill_classes >= 1")
        if self.hop1 < 1 or self.hop2 < 0 or self.local_k < 0:
            raise ValueError(f"bad training config {self}: hop1 >= 1, hop2/local_k >= 0")

    def total_steps(self, n_rows: int) -> int:
        """Optimiser steps on a split of ``n_rows`` nodes."""
        if self.epochs is None:
            return self.steps if n_rows else 0
        return self.epochs * -(-n_rows // self.batch_size)


def _check(x, knn_ids, knn_sims, rerank_ids, rerank_sims, labels):
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    labels = np.asarray(labels).astype(np.int64)
    if x.ndim != 2 or labels.shape != (n,):
        raise ValueError(f"x {x.shape} and labels {labels.shape} must have N rows")
    out = [x]
    for name, ids, sims in (("knn", knn_ids, knn_sims), ("rerank", rerank_ids, rerank_sims)):
        ids, sims = np.asarray(ids), np.asarray(sims, dtype=np.float32)
        if ids.ndim != 2 or len(ids) != n or sims.shape != ids.shape:
            raise ValueError(f"{name} ids {ids.shape} / sims {sims.shape} must be ({n}, k)")
        if n and int(ids.max()) >= n:
            raise ValueError(f"{name} ids refer to node {int(ids.max())} but x has {n} rows")
        out += [ids, sims]
    return (*out, labels)


class NearestClassFill:
    """Hard negatives for training subgraphs, as the reference fills its subgraphs: members
    of the identities whose mean features are nearest the centre's identity's (an exact
    search over the identities' means, never an N x N label matrix)."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, classes: int):
        from ltc_ray.knn.search import exact_knn

        uniq, inverse = np.unique(labels, return_inverse=True)
        self.inverse = inverse.reshape(-1)
        counts = np.bincount(self.inverse, minlength=len(uniq))
        means = np.zeros((len(uniq), x.shape[1]), dtype=np.float64)
        np.add.at(means, self.inverse, x)
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        m = min(classes + 1, len(uniq))
        near, _ = exact_knn(means.astype(np.float32), m)
        near = np.asarray(near, dtype=np.int64)
        # each identity's nearest others: its own column moved last, then dropped
        own = near == np.arange(len(uniq))[:, None]
        near = np.take_along_axis(near, np.argsort(own, axis=1, kind="stable"), axis=1)
        self.near = near[:, : m - 1]
        self.order = np.argsort(self.inverse, kind="stable")
        self.start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.count = counts

    def draw(self, centres: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        """``(b, size)`` nodes of the centres' nearest other identities (-1 where none)."""
        b = len(centres)
        if size == 0 or self.near.shape[1] == 0:
            return np.full((b, size), -1, dtype=np.int64)
        near = self.near[self.inverse[centres]]
        pick = near[np.arange(b)[:, None], rng.integers(0, near.shape[1], (b, size))]
        ok = pick >= 0
        cls = np.maximum(pick, 0)
        member = self.start[cls] + (rng.random((b, size)) * self.count[cls]).astype(np.int64)
        return np.where(ok, self.order[member], -1)


def _with_fill(block: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """The subgraph rows with the fill appended: fill nodes already in the subgraph and
    repeats dropped, real nodes first, -1 after (``(b, s + f)`` comparisons: a training
    batch only)."""
    member = (fill[:, :, None] == np.where(block >= 0, block, -2)[:, None, :]).any(axis=2)
    repeat = np.tril(fill[:, :, None] == fill[:, None, :], -1).any(axis=2)
    kept = np.where((fill >= 0) & ~member & ~repeat, fill, -1)
    out = np.concatenate([block, kept], axis=1)
    order = np.argsort(out < 0, axis=1, kind="stable")
    return np.take_along_axis(out, order, axis=1)


def train_pse_gcn(
    x: np.ndarray,
    knn_ids: np.ndarray,
    knn_sims: np.ndarray,
    rerank_ids: np.ndarray,
    rerank_sims: np.ndarray,
    labels: np.ndarray,
    cfg: TrainPSEConfig,
    progress: bool = False,
) -> tuple[PSEGCN, list[dict]]:
    """Train PSE-GCN on ``x (N, d) float32`` (L2-normalised features), the kNN graph
    ``knn_ids/knn_sims (N, k)`` (self at rank 0, -1 = none; the local adjacency), the
    re-ranked graph ``rerank_ids/rerank_sims (N, kr)`` (the subgraphs' node sets; the
    kNN graph itself will do) and ``labels (N,)``.

    Returns the model (eval mode) and one history entry per pass:
    ``{"epoch", "centres", "steps", "loss", "separated", "lr", "seconds"}``; loss is the mean
    batch loss and separated the share of anchors whose hardest positive is closer than
    their hardest negative, both measured before each step. Seeded and reproducible for a
    given thread count: weights from ``torch.manual_seed(cfg.seed)`` (the global RNG state is
    restored afterwards), centre order from ``np.random.default_rng(cfg.seed)``. Memory ≈ the
    inputs + one batch: ``batch_size · S · (d + 8·S + 30·H + 3·O) · 4`` bytes,
    S ≤ 1 + hop1·(hop2 + 1).
    """
    x, knn_ids, knn_sims, rerank_ids, rerank_sims, labels = _check(
        x, knn_ids, knn_sims, rerank_ids, rerank_sims, labels
    )
    n, d = x.shape
    total = cfg.total_steps(n)
    history: list[dict] = []
    with _torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = PSEGCN(d, (cfg.hidden, cfg.out_dim))
        if total == 0:
            model.eval()
            return model, history

        def feats_of(ids: np.ndarray) -> np.ndarray:
            return x[ids]

        def rows_of(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return knn_ids[ids], knn_sims[ids]

        def rerank_of(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return rerank_ids[ids], rerank_sims[ids]

        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        milestones = sorted({max(1, round(f * total)) for f in LR_MILESTONES})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
        rng = np.random.default_rng(cfg.seed)
        filler = NearestClassFill(x, labels, cfg.fill_classes) if cfg.fill else None
        log.info("pse-gcn: training %d steps of %d centres on %d rows (hop1 %d, hop2 %d)",
                 total, cfg.batch_size, n, cfg.hop1, cfg.hop2)
        model.train()
        bar = tqdm(total=total, desc="train pse-gcn", unit="step", disable=not progress)
        step, epoch = 0, 0
        while step < total:
            epoch += 1
            t0 = time.perf_counter()
            order = rng.permutation(n)
            budget = min(total - step, -(-n // cfg.batch_size))
            order = order[: budget * cfg.batch_size]
            total_loss, right, anchors, steps_here = 0.0, 0, 0, 0
            window = cfg.batch_size * SORT_WINDOW
            for lo in range(0, len(order), window):
                # A window's subgraphs at once; batches of similar size, in random order.
                nodes, sizes = subgraph_nodes(order[lo : lo + window], rerank_of,
                                              cfg.hop1, cfg.hop2)
                by_size = np.argsort(sizes, kind="stable")
                batches = [by_size[i : i + cfg.batch_size]
                           for i in range(0, len(by_size), cfg.batch_size)]
                for j in rng.permutation(len(batches)):
                    rows = batches[j]
                    s = int(sizes[rows].max())
                    block = nodes[rows, :s]
                    if filler is not None:
                        block = _with_fill(block, filler.draw(order[lo : lo + window][rows],
                                                              cfg.fill, rng))
                        block = block[:, : int((block >= 0).sum(axis=1).max())]
                    xb, adj, mask = subgraph_batch(block, feats_of, rows_of, cfg.local_k)
                    if mask.sum() < 2:  # batch norm needs two real nodes (isolated centres)
                        continue
                    lab = torch.from_numpy(np.where(block >= 0, labels[np.maximum(block, 0)], -1))
                    mt = torch.from_numpy(mask)
                    opt.zero_grad(set_to_none=True)
                    emb = model(as_tensor(xb), as_tensor(adj), mt)
                    loss = hard_triplet_loss(emb, lab, mt)
                    loss.backward()
                    opt.step()
                    sched.step()
                    with torch.no_grad():
                        pos, neg, valid = hardest_pairs(emb.detach(), lab, mt)
                    right += int((pos > neg)[valid].sum())
                    anchors += int(valid.sum())
                    total_loss += float(loss.detach())
                    steps_here += 1
                    bar.update(1)
            if steps_here == 0:
                raise ValueError("no training batch: every subgraph is a lone node")
            step += steps_here
            mean_loss = total_loss / max(steps_here, 1)
            if not math.isfinite(mean_loss):
                raise RuntimeError(f"pse-gcn training diverged at pass {epoch} (loss {mean_loss})")
            separated = right / max(anchors, 1)
            seconds = time.perf_counter() - t0
            history.append({"epoch": epoch, "centres": int(len(order)), "steps": steps_here,
                            "loss": mean_loss, "separated": separated,
                            "lr": float(opt.param_groups[0]["lr"]), "seconds": seconds})
            bar.set_postfix(loss=f"{mean_loss:.4f}", sep=f"{separated:.3f}")
            log.info("pse-gcn: pass %d (%d steps) loss %.5f separated %.4f (%.1f s)",
                     epoch, steps_here, mean_loss, separated, seconds)
        bar.close()
        model.eval()
    return model, history
