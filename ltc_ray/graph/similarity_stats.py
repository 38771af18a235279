"""The kNN similarity distribution, summed from per-partition histograms, and the
label-free rules that turn it into a method's parameters.

Why: a cosine threshold fitted to one embedding model does not transfer to another
(same-identity cosines range from about 0.3 to 0.8 between face models). What does
transfer is where a cut lies *relative to the data's own scale*: between the typical
nearest-neighbour similarity (``near``: the median similarity at rank 1, mostly the
same identity) and the typical far-neighbour similarity (``far``: the median at rank
``min(79, k - 1)``, mostly other identities). A rule (:class:`~ltc_ray.params.Auto`) is
``low + alpha * (high - low)`` between two such anchors, each a quantile of one
statistic: ``r<R>`` (the similarity at rank R; ``r1``: the nearest neighbour), ``far``
(rank ``min(79, k - 1)``) or ``all`` (every rank). Bounded anchors keep a rule sane on any
data: with ``0 <= alpha <= 1`` the value lies between the two.

Each method's ``alpha`` was fitted once on the train splits of the domain-shift
benchmark (``benchmarks/domain_shift.py --fit``), never on the data being clustered. (A
search over more anchors -- other ranks and quantiles, and a nearest-impostor level
extrapolated along ``s(r) = a - b log r`` -- found pairs with smaller gaps there, but
only through extrapolations outside [-1, 1]: not a rule to trust on unseen data.)

Distributed and exact: every partition counts its similarities into fixed bins
(:data:`BINS` over [-1, 1], integer counts per rank), the counts are summed, and the
quantiles are read off the sum, so the derived values are identical for any number of
shards, partitions or workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltc_ray.params import Auto

BINS = 2000  # bins per statistic: quantiles exact to 0.001 on [-1, 1] (cosines)
WIDTH = 2.0 / BINS
FAR_RANK = 79  # the "far" anchor's rank (capped at k - 1): k = 80 is the default graph
STATISTICS = ("r<rank>", "far", "all")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
SUMMARY_RANKS = (1, 2, 5, 10, 20, 40)  # the ranks a summary (run.json, model.json) lists
SUMMARY_BINS = 100  # a summary's coarse histograms (reports): sums of BINS // 100 fine bins
# a trained model's graph vs the one it runs on: an anchor moved by more than this
SHIFT_TOLERANCE = 0.05
# near - far below this: the rows hardly leave the identity (auto's premise does not hold)
NARROW_GAP = 0.1


def stat_ranks(k: int) -> tuple[int, ...]:
    """The ranks histogrammed for a k-column graph (self at rank 0): every rank up to
    the far rank ``min(FAR_RANK, k - 1)``."""
    return tuple(range(1, min(FAR_RANK, k - 1) + 1))


def n_rows_of(k: int) -> int:
    """Rows of a :func:`rank_histograms` array: one per rank, then all ranks."""
    return len(stat_ranks(k)) + 1


def rank_histograms(knn_ids: np.ndarray, knn_sims: np.ndarray) -> np.ndarray:
    """Counts ``(n_rows_of(k), BINS) int64``: one row per rank of :func:`stat_ranks`,
    then one over every rank 1..k-1; padding (id < 0) is skipped."""
    k = knn_sims.shape[1]
    ranks = stat_ranks(k)
    out = np.zeros((n_rows_of(k), BINS), np.int64)
    if len(knn_sims) == 0 or k < 2:
        return out
    valid = knn_ids[:, 1:] >= 0
    sims = np.where(valid, knn_sims[:, 1:].astype(np.float64), -1.0)  # padding: -inf
    bins = np.clip(((sims + 1.0) / WIDTH).astype(np.int64), 0, BINS - 1)
    for row, rank in enumerate(ranks):
        out[row] = np.bincount(bins[valid[:, rank - 1], rank - 1], minlength=BINS)
    out[len(ranks)] = np.bincount(bins[valid], minlength=BINS)
    return out


@dataclass(frozen=True)
class SimilarityStats:
    """Summed histograms of a k-column graph (:func:`rank_histograms` layout)."""

    k: int
    counts: np.ndarray

    @property
    def ranks(self) -> tuple[int, ...]:
        return stat_ranks(self.k)

    @property
    def far_rank(self) -> int:
        return min(FAR_RANK, self.k - 1)

    def _row(self, statistic: str) -> tuple[np.ndarray, float, float]:
        """Counts, lower edge and bin width of one statistic (:data:`STATISTICS`)."""
        ranks = self.ranks
        if statistic == "all":
            return self.counts[len(ranks)], -1.0, WIDTH
        rank = self.far_rank if statistic == "far" else int(statistic[1:])
        return self.counts[ranks.index(rank)], -1.0, WIDTH

    def quantile(self, statistic: str, p: float) -> float:
        """The ``p`` quantile of ``statistic`` ("r1", "r5", "far", "all"), as the
        centre of its bin, rounded to 4 decimals; NaN when there are none."""
        row, low, width = self._row(statistic)
        total = int(row.sum())
        if total == 0:
            return float("nan")
        cum = np.cumsum(row)
        b = int(np.searchsorted(cum, p * total, side="left"))
        return round(low + (min(b, BINS - 1) + 0.5) * width, 4)

    def anchor(self, spec: str) -> float:
        """An anchor ``"<statistic>:<quantile>"`` (e.g. ``"r1:0.5"``, ``"far:0.5"``)."""
        statistic, p = spec.split(":")
        return self.quantile(statistic, float(p))

    def mean_count_above(self, threshold: float) -> float:
        """The mean number of neighbours (ranks 1..far) with similarity >= ``threshold``
        per row (bin resolution: the bins at or above the threshold's bin)."""
        ranks = self.counts[: len(self.ranks)]
        rows = int(ranks[0].sum())
        if rows == 0:
            return 0.0
        first = int(np.clip((threshold + 1.0) / WIDTH, 0, BINS - 1))
        return float(ranks[:, first:].sum()) / rows

    def anchors(self) -> dict[str, float]:
        """``near`` (median similarity at rank 1) and ``far`` (median at the far rank)."""
        return {"near": self.anchor("r1:0.5"), "far": self.anchor("far:0.5")}

    def coarse_histogram(self, bins: int = SUMMARY_BINS) -> dict:
        """Counts of "all", "r1" and "far" in ``bins`` equal bins over [-1, 1]: sums of
        the fine bins, so exact and identical for any partitioning (the report's plot)."""
        if BINS % bins:
            raise ValueError(f"bins must divide {BINS}, got {bins}")
        out: dict = {"lo": -1.0, "hi": 1.0, "bins": bins}
        for name in ("all", "r1", "far"):
            row = self._row(name)[0] if self.ranks else np.zeros(BINS, np.int64)
            out[name] = [int(c) for c in row.reshape(bins, BINS // bins).sum(axis=1)]
        return out

    def summary(self) -> dict:
        """What ``run.json`` and a model's ``model.json`` record: anchors, rank
        quantiles, edge count, coarse histograms (:meth:`coarse_histogram`)."""
        names = [f"r{r}" for r in self.ranks if r in SUMMARY_RANKS or r == self.far_rank]
        names.append("all")
        quantiles = {name: [self.quantile(name, p) for p in QUANTILES] for name in names}
        anchors = self.anchors()
        out = {"k": self.k, "far_rank": self.far_rank, "edges": int(self.counts[-1].sum()),
               "quantiles_at": list(QUANTILES), "rank_quantiles": quantiles, **anchors,
               "histogram": self.coarse_histogram()}
        if anchors["near"] - anchors["far"] < NARROW_GAP:
            out["warning"] = (
                f"the far anchor ({anchors['far']:.3f} at rank {self.far_rank}) is within "
                f"{NARROW_GAP} of the near one ({anchors['near']:.3f}): the kNN rows may not "
                "reach past most identities (k too small for them), so auto values may "
                "over-split; raise knn.k or pin the values")
        return out


def combine(k: int, parts: list[np.ndarray]) -> SimilarityStats:
    """The sum of per-partition :func:`rank_histograms` (exact, order-free)."""
    total = np.zeros((n_rows_of(k), BINS), np.int64)
    for part in parts:
        total += part
    return SimilarityStats(k, total)


def graph_stats(knn_ids: np.ndarray, knn_sims: np.ndarray) -> SimilarityStats:
    """The statistics of a whole graph held in one process (tests, benchmarks, in-process
    use); the job sums :func:`rank_histograms` per partition instead, with the same result."""
    return combine(knn_sims.shape[1], [rank_histograms(knn_ids, knn_sims)])


def derive(rule: Auto, stats: SimilarityStats) -> tuple[float, dict]:
    """The value of ``rule`` on ``stats`` and the anchors behind it (the module
    docstring's rule; ``kind`` "distance" gives ``1 - value``, "scale" ``alpha *
    (high - low)``), rounded to 3 decimals and clipped to ``rule.clip``."""
    if rule.kind not in ("similarity", "distance", "scale"):
        raise ValueError(f"rule kind {rule.kind!r} needs the method's own derive_params")
    low, high = stats.anchor(rule.low), stats.anchor(rule.high)
    if rule.kind == "scale":
        value = rule.alpha * (high - low)
    else:
        value = low + rule.alpha * (high - low)
        if rule.kind == "distance":
            value = 1.0 - value
    lo, hi = rule.clip
    value = round(min(max(value, lo), hi), 3)
    basis = {"low": rule.low, "low_value": low, "high": rule.high, "high_value": high,
             "alpha": rule.alpha, "kind": rule.kind}
    return value, basis


def shift_report(trained: dict, current: dict, tolerance: float = SHIFT_TOLERANCE) -> list[str]:
    """How the graph a model runs on differs from its training graph: one line per
    anchor (``near``/``far``) that moved by more than ``tolerance`` (empty: no shift).
    ``trained``/``current`` are :meth:`SimilarityStats.summary` records."""
    lines = []
    for key, what in (("near", "median rank-1 similarity"),
                      ("far", "median far-neighbour similarity")):
        a, b = trained.get(key), current.get(key)
        if not (_finite_number(a) and _finite_number(b)):  # an old or hand-edited model.json
            continue
        if abs(b - a) > tolerance:
            lines.append(f"{what} {b:.3f} here vs {a:.3f} in training ({b - a:+.3f})")
    return lines


def _finite_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and bool(np.isfinite(value)))
