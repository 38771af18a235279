"""Training GCN-D (proposal IoU/IoP regression) and GCN-S (seeded member segmentation).

Both train on labelled proposals (CSR ``offsets``/``members``) whose features and kNN rows come
from ``feats_of``/``rows_of`` (:mod:`ltc_ray.models.gcn_ds`); each batch's padded input is
rebuilt per step from those callables, never stored. GCN-D regresses
:func:`~ltc_ray.models.gcn_ds.proposal_targets` with MSE; GCN-S draws a random seed member per
proposal per epoch and minimises the NLL of :func:`~ltc_ray.models.gcn_ds.segment_targets`
over the real member slots.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ltc_ray.models.gcn_ds import (
    GCND,
    GCNS,
    SLOT_BLOCK,
    STRUCTURE_COLUMNS,
    FeatsOf,
    RowsOf,
    _build,
    _check_csr,
    _round_up,
    proposal_targets,
    segment_targets,
)
from ltc_ray.models.gcn_v import as_tensor
from ltc_ray.models.train import _torch_threads

__all__ = ["TrainDConfig", "TrainSConfig", "train_gcn_d", "train_gcn_s"]

log = logging.getLogger("ltc_ray")

# Batches are formed from shuffled windows of this many batches, sorted by size inside a
# window, so a batch pads to similar sizes while the order stays random (as in train_e).
SORT_WINDOW = 32


@dataclass
class TrainSConfig:
    """How GCN-S is trained (and, with a target, GCN-D: :class:`TrainDConfig`).

    Adam (lr 3e-3, L2 weight decay 1e-5) over mini-batches of ``batch_size`` proposals replaces
    learn-to-cluster's SGD (lr 0.01, momentum 0.9, wd 1e-4, 30 epochs, batch 32; GCN-S: batch
    1 with 32-step accumulation): Adam needs no learning-rate schedule and gets somewhere in
    the few hundred steps a CPU budget allows. A batch also holds at most ``max_slots``
    padded slots (batch x padded size), which bounds a step's memory at
    ≈ max_slots · (S + d + 6·max(dims)) · 4 bytes; ``threads`` 0 keeps torch's thread count.
    GCN-S draws a fresh random seed member per proposal per epoch from
    ``np.random.default_rng(seed)``.

    Cost is ≈ 0.85 MFLOP per member slot and epoch at the default dims: on 20K proposals of
    sizes 3..300 (log-uniform, 1.29M slots, 256-d features) one epoch took 32 s (GCN-D) and
    35 s (GCN-S) of CPU time on one thread (backward ~40%, forward ~35%, building batches
    ~15%). Small proposal sets need more epochs (the trainer, ``cluster.gcn_ds.train``, sizes
    them by a step budget).
    """

    epochs: int = 1
    lr: float = 3e-3
    weight_decay: float = 1e-5
    batch_size: int = 64
    max_slots: int = 16384
    seed: int = 0
    threads: int = 0
    dims: tuple[int, ...] = (512, 64)
    dropout: float = 0.5
    center: bool = True  # features minus the proposal's mean (models.gcn_ds._ProposalGCN)
    structure: bool = True  # each member's kNN row against the proposal (gcn_ds._structure)

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass
class TrainDConfig(TrainSConfig):
    """How GCN-D is trained: :class:`TrainSConfig` plus ``target``, the regressed quantity
    ("iou" or "iop")."""

    target: str = "iou"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target not in ("iou", "iop"):
            raise ValueError(f"bad training config {self}: target must be 'iou' or 'iop'")


def _check_common(cfg: TrainDConfig | TrainSConfig) -> None:
    cfg.dims = tuple(int(d) for d in cfg.dims)
    if cfg.epochs < 0 or cfg.lr <= 0 or cfg.weight_decay < 0 or cfg.batch_size < 1:
        raise ValueError(f"bad training config {cfg}")
    if cfg.max_slots < 1 or cfg.threads < 0 or not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"bad training config {cfg}")
    if not cfg.dims or min(cfg.dims) < 1:
        raise ValueError(f"bad training config {cfg}: dims must be positive widths")


def _batches(
    sizes: np.ndarray, batch_size: int, max_slots: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled batches of proposal indices of similar sizes (see SORT_WINDOW), each at most
    ``batch_size`` proposals and ``max_slots`` padded slots (one proposal at least)."""
    perm = rng.permutation(len(sizes))
    padded = _round_up(sizes, SLOT_BLOCK)
    out = []
    window = batch_size * SORT_WINDOW
    for lo in range(0, len(perm), window):
        chunk = perm[lo : lo + window]
        chunk = chunk[np.argsort(padded[chunk], kind="stable")]
        i = 0
        while i < len(chunk):
            step = min(batch_size, len(chunk) - i)
            while step > 1 and step * int(padded[chunk[i + step - 1]]) > max_slots:
                step = max(1, min(step - 1, max_slots // int(padded[chunk[i + step - 1]])))
            out.append(chunk[i : i + step])
            i += step
    return [out[i] for i in rng.permutation(len(out))]


def _prepare(offsets, members, labels, feats_of, adj_k):
    """Checked inputs and the feature width (one ``feats_of`` call on one id)."""
    if adj_k < 1:
        raise ValueError(f"adj_k must be positive, got {adj_k}")
    offsets, members = _check_csr(offsets, members)
    labels = np.asarray(labels).reshape(-1)
    if len(offsets) < 2:
        raise ValueError("no proposal to train on")
    if int(members.max()) >= len(labels):
        raise ValueError(f"member id {int(members.max())} has no label ({len(labels)} labels)")
    probe = np.asarray(feats_of(members[:1]), dtype=np.float32)
    if probe.ndim != 2 or len(probe) != 1:
        raise ValueError(f"feats_of returned {probe.shape} for 1 id")
    return offsets, members, labels, probe.shape[1]


def _train(
    name: str,
    model: GCND | GCNS,
    offsets: np.ndarray,
    members: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    adj_k: int,
    cfg: TrainDConfig | TrainSConfig,
    step: Callable,
    progress: bool,
) -> list[dict]:
    """The epoch loop shared by GCN-D and GCN-S. ``step(rng) -> (batch_fn, seeds)`` is called
    once per epoch: ``batch_fn(rows, x, adj, mask) -> (loss, n_items, n_right)`` and ``seeds``
    the epoch's seed positions ``(P,)`` (None for GCN-D)."""
    sizes = np.diff(offsets)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    history: list[dict] = []
    log.info(
        "%s: training %d epochs on %d proposals (%d member slots, sizes %d..%d)",
        name,
        cfg.epochs,
        len(sizes),
        int(sizes.sum()),
        int(sizes.min()),
        int(sizes.max()),
    )
    model.train()
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"train {name}", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        batch_fn, seeds = step(rng)
        total_loss, total_items, total_right = 0.0, 0, 0
        for rows in _batches(sizes, cfg.batch_size, cfg.max_slots, rng):
            s = int(_round_up(int(sizes[rows].max()), SLOT_BLOCK))
            seed = None if seeds is None else seeds[rows]
            x, adj, mask, _ = _build(offsets, members, rows, feats_of, rows_of, adj_k, s, seed,
                                     model.structure)
            opt.zero_grad(set_to_none=True)
            loss, items, right = batch_fn(rows, as_tensor(x), as_tensor(adj), mask)
            loss.backward()
            opt.step()
            total_loss += float(loss.detach()) * items
            total_items += items
            total_right += right
        mean_loss = total_loss / total_items
        if not math.isfinite(mean_loss):
            raise RuntimeError(f"{name} training diverged at epoch {epoch} (loss {mean_loss})")
        entry = {"epoch": epoch, "loss": mean_loss, "seconds": time.perf_counter() - t0}
        if seeds is not None:
            entry["accuracy"] = total_right / total_items
        history.append(entry)
        bar.set_postfix(loss=f"{mean_loss:.5f}")
        log.info(
            "%s: epoch %d/%d loss %.6f (%.1f s)",
            name,
            epoch,
            cfg.epochs,
            mean_loss,
            entry["seconds"],
        )
    model.eval()
    return history


def train_gcn_d(
    offsets: np.ndarray,
    members: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    labels: np.ndarray,
    cfg: TrainDConfig,
    adj_k: int = 80,
    progress: bool = True,
) -> tuple[GCND, list[dict]]:
    """Train GCN-D on proposals ``offsets (P+1,)``/``members (M,)`` with ``labels (N,)`` by
    global id: MSE between the score and ``proposal_targets(..., cfg.target)``. Returns the
    model (eval mode) and one history entry per epoch, ``{"epoch", "loss", "seconds"}`` with
    loss the mean squared error over the epoch's proposals, measured before each step.

    The head starts at the best constant guess (weight 0, bias = the mean target) instead of a
    random linear map of the max-pooled features, whose scale put the first outputs ~0.5 off:
    from there, held-out correlation at a few epochs went from negative to ~0.65 (measured on
    the test suite's synthetic proposals, 30 epochs).

    Seeded and reproducible for a given thread count: weights and dropout from
    ``torch.manual_seed(cfg.seed)`` (the global RNG state is restored afterwards), batch order
    from ``np.random.default_rng(cfg.seed)``.
    """
    offsets, members, labels, d = _prepare(offsets, members, labels, feats_of, adj_k)
    target = torch.from_numpy(proposal_targets(offsets, members, labels, cfg.target))
    with _torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GCND(d + STRUCTURE_COLUMNS * cfg.structure, cfg.dims, cfg.dropout)
        model.center, model.structure = cfg.center, cfg.structure
        with torch.no_grad():  # start at the best constant guess (see the docstring)
            model.classifier.weight.zero_()
            model.classifier.bias.fill_(float(target.mean()))
        if cfg.epochs == 0:
            model.eval()
            return model, []

        def batch_fn(rows, x, adj, mask):
            y = target[torch.from_numpy(rows)]
            loss = F.mse_loss(model(x, adj, torch.from_numpy(mask)), y)
            return loss, len(rows), 0

        history = _train(
            "gcn-d",
            model,
            offsets,
            members,
            feats_of,
            rows_of,
            adj_k,
            cfg,
            lambda rng: (batch_fn, None),
            progress,
        )
    return model, history


def train_gcn_s(
    offsets: np.ndarray,
    members: np.ndarray,
    feats_of: FeatsOf,
    rows_of: RowsOf,
    labels: np.ndarray,
    cfg: TrainSConfig,
    adj_k: int = 80,
    progress: bool = True,
) -> tuple[GCNS, list[dict]]:
    """Train GCN-S on labelled proposals (as :func:`train_gcn_d`): each epoch draws one random
    seed member per proposal and minimises the mean NLL over real member slots of
    ``segment_targets``. History entries ``{"epoch", "loss", "accuracy", "seconds"}``
    (accuracy: share of member slots classified right, before each step). Seeded and
    reproducible for a given thread count, as :func:`train_gcn_d`.
    """
    offsets, members, labels, d = _prepare(offsets, members, labels, feats_of, adj_k)
    sizes = np.diff(offsets)
    with _torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GCNS(d + 1 + STRUCTURE_COLUMNS * cfg.structure, cfg.dims, cfg.dropout)
        model.center, model.structure = cfg.center, cfg.structure
        if cfg.epochs == 0:
            model.eval()
            return model, []

        def step(rng: np.random.Generator):
            seeds = np.minimum((rng.random(len(sizes)) * sizes).astype(np.int64), sizes - 1)
            same = segment_targets(offsets, members, labels, seeds)

            def batch_fn(rows, x, adj, mask):
                owner, slot = np.nonzero(mask)
                y = torch.from_numpy(same[offsets[rows][owner] + slot])
                mt = torch.from_numpy(mask)
                logp = model(x, adj, mt)[mt]
                loss = F.nll_loss(logp, y)
                right = int((logp.detach().argmax(dim=1) == y).sum())
                return loss, len(y), right

            return batch_fn, seeds

        history = _train(
            "gcn-s", model, offsets, members, feats_of, rows_of, adj_k, cfg, step, progress
        )
    return model, history
