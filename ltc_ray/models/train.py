"""Training GCN-V on a labelled graph: MSE between predicted and ``s_nbr`` confidence.

Training is cheap because X and Â are constant, so ÂX is computed once (one sparse product)
and every step is a dense MLP over rows of [X ‖ ÂX]: for a one-layer GCN a mini-batch of rows
needs no neighbour sampling and gives exactly the full-graph forward for those rows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ltc_ray.graph.adjacency import whole_graph_adjacency
from ltc_ray.models.gcn_v import GCNV, aggregate, as_tensor
from ltc_ray.models.targets import confidence_target

__all__ = ["DEFAULT_BATCH_ROWS", "TrainConfig", "train_gcn_v", "train_gcn_v_on_graph"]

log = logging.getLogger("ltc_ray")

DEFAULT_BATCH_ROWS = 65536


@dataclass
class TrainConfig:
    """How GCN-V is trained.

    Adam (lr 1e-3, L2 weight decay 1e-5) replaces learn-to-cluster's SGD (lr 0.1, momentum 0.9,
    80,000 full-graph steps): it converges in tens of epochs. ``batch_rows`` 0 picks one
    full-graph step per epoch when N <= ``full_graph_max_rows``, else mini-batches of
    :data:`DEFAULT_BATCH_ROWS` rows; ``threads`` 0 keeps torch's thread count.
    """

    hidden: int = 512
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_rows: int = 0
    full_graph_max_rows: int = 200_000
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.epochs < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"bad training config {self}")
        if self.batch_rows < 0 or self.full_graph_max_rows < 0 or self.threads < 0:
            raise ValueError(f"bad training config {self}")

    def rows_per_step(self, n_rows: int) -> int:
        """Rows in one optimiser step for a graph of ``n_rows`` nodes."""
        if self.batch_rows > 0:
            return min(self.batch_rows, n_rows)
        return n_rows if n_rows <= self.full_graph_max_rows else DEFAULT_BATCH_ROWS


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_gcn_v(
    x: np.ndarray,
    adj: sp.csr_matrix | None,
    target: np.ndarray,
    cfg: TrainConfig,
    progress: bool = True,
    log_every: int = 1,
    agg: np.ndarray | None = None,
) -> tuple[GCNV, list[dict]]:
    """Train GCN-V on ``x (N, d) float32`` (L2-normalised), Â ``adj (N, N)`` and the target
    ``(N,) float32``; returns the model and one history entry per epoch
    (``{"epoch", "loss", "seconds"}``, loss = mean MSE over the epoch's steps, before each step).
    ``agg`` is ÂX when the caller already has it (computed here otherwise).

    Seeded and reproducible: weights from ``torch.manual_seed(cfg.seed)`` (global RNG state is
    restored afterwards), row shuffles from ``np.random.default_rng(cfg.seed)``.

    Memory ≈ X + ÂX + Â + one step: ``4·N·d`` + ``4·N·d`` + ``8·nnz + 8·N`` (Â is the caller's)
    + ``B · (4·d + 6·hidden) · 4`` bytes (the batch, activations and their gradients; B = rows
    per step). Measured at part0 size (N = 576,494, d = 256, k = 80, nnz 82M, B = 65,536):
    0.6 + 0.6 + 0.7 GB + ~1 GB, peak RSS 3.0 GB, ~16-20 s per epoch on 2 CPU cores. A
    full-graph step at that N would need ~9 GB of activations, hence ``full_graph_max_rows``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    target = np.ascontiguousarray(target, dtype=np.float32)
    adj_ok = adj.shape == (len(x), len(x)) if adj is not None else agg is not None
    if x.ndim != 2 or not adj_ok or target.shape != (len(x),):
        raise ValueError(
            f"x {x.shape}, adj {adj.shape} and target {target.shape} must be (N, d), (N, N), (N,)"
        )
    if not np.all(np.isfinite(target)):
        raise ValueError("target has non-finite values")
    n, d = x.shape
    step_rows = cfg.rows_per_step(n)
    full_graph = step_rows >= n
    history: list[dict] = []
    with _torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GCNV(d, cfg.hidden)
        if cfg.epochs == 0 or n == 0:
            return model, history
        if agg is None:
            start = time.perf_counter()
            agg = aggregate(adj, x)  # ÂX: constant, so computed once for all epochs
            log.info("gcn-v: ÂX for %d rows in %.1f s", n, time.perf_counter() - start)
        xt, at, yt = as_tensor(x), as_tensor(agg), torch.from_numpy(target)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        rng = np.random.default_rng(cfg.seed)
        mode = "full graph" if full_graph else f"batches of {step_rows}"
        log.info("gcn-v: training %d epochs on %d x %d (%s)", cfg.epochs, n, d, mode)
        model.train()
        bar = tqdm(range(1, cfg.epochs + 1), desc="train gcn-v", unit="epoch", disable=not progress)
        for epoch in bar:
            t0 = time.perf_counter()
            if full_graph:
                batches = [None]
            else:
                perm = rng.permutation(n)
                batches = [np.sort(perm[i : i + step_rows]) for i in range(0, n, step_rows)]
            total = 0.0
            for rows in batches:
                if rows is None:
                    xb, ab, yb = xt, at, yt
                else:
                    idx = torch.from_numpy(rows)
                    xb, ab, yb = xt[idx], at[idx], yt[idx]
                opt.zero_grad(set_to_none=True)
                conf, _ = model(xb, ab)
                loss = F.mse_loss(conf, yb)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(yb)
            mean_loss = total / n
            if not math.isfinite(mean_loss):
                raise RuntimeError(f"gcn-v training diverged at epoch {epoch} (loss {mean_loss})")
            seconds = time.perf_counter() - t0
            history.append({"epoch": epoch, "loss": mean_loss, "seconds": seconds})
            bar.set_postfix(loss=f"{mean_loss:.5f}")
            if epoch % max(1, log_every) == 0 or epoch == cfg.epochs:
                log.info(
                    "gcn-v: epoch %d/%d loss %.6f (%.1f s)", epoch, cfg.epochs, mean_loss, seconds
                )
        model.eval()
    return model, history


def train_gcn_v_on_graph(
    x: np.ndarray,
    knn_ids: np.ndarray,
    knn_sims: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    progress: bool = True,
) -> tuple[GCNV, list[dict], np.ndarray]:
    """GCN-V trained on a labelled kNN graph: Â from the graph, the ``s_nbr`` target from
    the labels, then :func:`train_gcn_v`. Returns the model, its history and ÂX (which
    inference on the same rows reuses)."""
    agg = aggregate(whole_graph_adjacency(knn_ids, knn_sims), x)
    target = confidence_target(knn_ids, knn_sims, labels)
    model, history = train_gcn_v(x, None, target, cfg, progress=progress, agg=agg)
    return model, history, agg
