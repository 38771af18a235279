"""Exact inner-product top-k with torch matmuls: tensor cores on GPUs, plain BLAS on CPUs.

The database sits on the device in the search precision (fp16/bf16 on GPUs: half the bytes
and the tensor-core rate). Low precision only chooses candidates: each query keeps the
top ``k + margin`` by low-precision score, those are re-scored in fp32, and a per-row
certificate proves that nothing outside the candidates can reach the top k. For unit
vectors rounded to a format with unit roundoff u, |x̂·ŷ - x·y| <= 2u + u² (the inputs)
plus u (the fp16/bf16 output) plus d·2⁻²³ (fp32 accumulation); an unfetched row scores at
most the last fetched low-precision score plus that bound. Rows whose fp32 k-th score does
not clear it (dense near-ties) are searched again in fp32. The result equals an exact fp32
search; the caller's per-pair re-scoring and certificate (``ltc_ray.knn.search.exact_topk``)
then fix the final order exactly as for faiss. ``.search``/``.ntotal`` mirror faiss, so
:func:`ltc_ray.knn.search.search_block` takes either.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PRECISIONS", "TorchFlatIndex", "error_bound"]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_UNIT_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}


def error_bound(precision: str, dim: int) -> float:
    """Upper bound on |low-precision score - exact score| for unit vectors, with a 2x
    safety factor (norms within 1e-3 of one after L2 normalisation included)."""
    u = _UNIT_ROUNDOFF[precision]
    return 2.0 * (3.0 * u + u * u + dim * 2.0**-23)


class TorchFlatIndex:
    """Exact flat inner-product index over ``xb (n, d)`` (unit rows) on ``device``.

    ``precision`` fp16/bf16 picks candidates on tensor cores, fp32 searches directly;
    ``margin`` extra candidates per query; ``tile_elems`` bounds a score tile (queries x
    database rows per matmul, fp32: 2^27 = 512 MiB). Memory on the device:
    ``n·d`` elements of the precision plus an fp32 copy (for re-scoring) when it is not
    fp32.
    """

    def __init__(
        self,
        xb: np.ndarray,
        device: str | torch.device = "cpu",
        precision: str | None = None,
        margin: int = 32,
        tile_elems: int = 2**27,
    ):
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        if xb.ndim != 2:
            raise ValueError(f"xb must be (n, d), got {xb.shape}")
        self.device = torch.device(device)
        if precision is None:
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if margin < 0 or tile_elems < 1:
            raise ValueError(f"margin ({margin}) must be >= 0, tile_elems ({tile_elems}) >= 1")
        self.precision = precision
        self.margin = int(margin)
        self.tile_elems = int(tile_elems)
        self.ntotal, self.d = xb.shape
        self.xb32 = torch.from_numpy(xb).to(self.device)
        dtype = PRECISIONS[precision]
        self.xb_low = self.xb32 if dtype == torch.float32 else self.xb32.to(dtype)
        self.bound = error_bound(precision, self.d) if dtype != torch.float32 else 0.0
        self.rows_refined = 0  # queries that failed the certificate and ran again in fp32

    def _topk(self, q: torch.Tensor, xb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocked top-k over the database: scores (b, k) float32 and ids (b, k) int64."""
        best_s = best_i = None
        step = max(k, self.tile_elems // max(len(q), 1))
        for lo in range(0, self.ntotal, step):
            block = xb[lo : lo + step]
            scores = (q @ block.T).float()
            kk = min(k, scores.shape[1])
            s, i = torch.topk(scores, kk, dim=1)
            i = i + lo
            if best_s is not None:
                s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                s, pos = torch.topk(s, min(k, s.shape[1]), dim=1)
                i = torch.gather(i, 1, pos)
            best_s, best_i = s, i
        return best_s, best_i

    def _rescore32(self, q32: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,bkd->bk", q32, self.xb32[ids])

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss-style ``(sims (b, k) float32, ids (b, k) int64)``, best first; -1 / -inf
        pad when ``k`` exceeds the database."""
        q32 = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        b = len(q32)
        kk = min(k, self.ntotal)
        if self.xb_low is self.xb32 or kk == self.ntotal:
            sims, ids = self._topk(q32, self.xb32, kk)
        else:
            fetch = min(kk + self.margin, self.ntotal)
            previous = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
            try:
                low, cand = self._topk(q32.to(self.xb_low.dtype), self.xb_low, fetch)
            finally:
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = previous
            exact = self._rescore32(q32, cand)
            sims, pos = torch.topk(exact, kk, dim=1)
            ids = torch.gather(cand, 1, pos)
            # certificate: an unfetched row scores <= (last fetched low score) + bound
            if fetch < self.ntotal:
                unsure = sims[:, -1] <= low[:, -1] + self.bound
                if bool(unsure.any()):
                    rows = torch.nonzero(unsure).flatten()
                    self.rows_refined += int(len(rows))
                    s, i = self._topk(q32[rows], self.xb32, kk)
                    sims[rows], ids[rows] = s, i
        out_s = np.full((b, k), -np.inf, dtype=np.float32)
        out_i = np.full((b, k), -1, dtype=np.int64)
        out_s[:, :kk] = sims.cpu().numpy()
        out_i[:, :kk] = ids.cpu().numpy()
        return out_s, out_i
