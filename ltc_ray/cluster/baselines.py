"""Unsupervised baselines over the whole kNN graph (issue 7).

Infomap runs distributed, per connected component in parallel pieces
(:mod:`ltc_ray.cluster.map_equation_stage`, issue 20). The others are
:class:`~ltc_ray.cluster.whole_graph.WholeGraphMethod`: vectorised numpy / scipy over
sparse matrices (no N x N matrix, no per-sample Python loop), run in one Ray task whose
memory bound is documented in ``cluster.whole_graph``. Every method is deterministic for a
given graph and ``Config.seed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ltc_ray.cluster.base import (
    ClusterMethod,
    LinkStageContext,
    LinkStageOutput,
    PartitionInput,
    Shape,
    Tunable,
    neighbor_density,
    register,
)
from ltc_ray.cluster.whole_graph import (
    SCORE_NEIGHBORS,
    WholeGraphMethod,
    components,
    knn_edges,
    row_argmax,
    symmetric_graph,
    whole_graph_shape,
)
from ltc_ray.graph.map_equation import (
    DEFAULT_MAX_PIECE_EDGES,
    DEFAULT_MAX_PIECE_NODES,
    map_equation_labels,
)
from ltc_ray.params import AUTO, COSINE, ROUNDS, ROWS, Auto, Range, param
from ltc_ray.plan_model import PlanContext, PlanStage, rate_key, rows_score_stage

log = logging.getLogger("ltc_ray")


@dataclass
class InfomapParams:
    """Infomap on the kNN graph with edges of cosine >= threshold, weighted by cosine
    (two-level, undirected, seeded by ``seed``), per connected component in parallel
    pieces (cluster/map_equation_stage.py)."""

    # auto: from this graph's similarities (graph/similarity_stats.py; fit: domain_shift.py)
    threshold: float | str = param(AUTO, valid=COSINE,
                                   auto=Auto(0.76, "far:0.5", "r1:0.5"))
    trials: int = param(2, valid=Range(1, 1000))  # Infomap trials (the best is kept)
    # a piece task's budget; a larger component is split (coarse blocks, then refined)
    max_piece_edges: int = param(DEFAULT_MAX_PIECE_EDGES, valid=Range(1, 1 << 40))
    max_piece_nodes: int = param(DEFAULT_MAX_PIECE_NODES, valid=Range(2, (1 << 31) - 1))
    split_passes: int = param(3, valid=Range(1, 100))  # passes over an oversized component


@dataclass
class ChineseWhispersParams:
    """Chinese whispers on the kNN graph with edges of cosine >= threshold (cosine-weighted
    votes, a seeded random half of the nodes updated per round)."""

    # auto: from this graph's similarities (graph/similarity_stats.py; fit: domain_shift.py)
    threshold: float | str = param(AUTO, valid=COSINE,
                                   auto=Auto(0.75, "far:0.5", "r1:0.5"))
    # rounds at most (stops early when no label would change)
    iterations: int = param(20, valid=Range(1, ROUNDS))


@dataclass
class KnnDBSCANParams:
    """DBSCAN on the kNN cosine-distance graph: core = >= min_samples points (self included)
    within eps in the kNN row; border points join their nearest core; noise = singletons."""

    # auto: from this graph's similarities (graph/similarity_stats.py; fit: domain_shift.py)
    eps: float | str = param(AUTO, valid=Range(0.0, 2.0, low_open=True, what="a cosine distance"),
                             auto=Auto(0.95, "far:0.5", "r2:0.5", kind="distance",
                                       clip=(0.001, 2.0)))
    min_samples: int = param(4, valid=Range(1, 1 << 16))


@dataclass
class CDPParams:
    """CDP-style linkage: components of edges with cosine >= threshold, re-cut with the
    threshold raised by ``step`` while larger than ``max_size``."""

    # auto: from this graph's similarities (graph/similarity_stats.py; fit: domain_shift.py)
    threshold: float | str = param(AUTO, valid=COSINE, auto=Auto(0.91, "far:0.5", "r1:0.5"))
    max_size: int = param(300, valid=Range(1, 1 << 40))
    # auto: a tenth of the gap between the near and far anchors (0.05 at cosine scale 0.5)
    step: float | str = param(AUTO, valid=Range(1e-4, 2.0, why_low="a smaller step re-cuts the "
                                                                    "graph up to 2/step times"),
                              auto=Auto(0.1, "far:0.5", "r1:0.5", kind="scale", clip=(1e-3, 2.0)))


@dataclass
class HACParams:
    """Average-linkage HAC on the kNN graph (missing pairs = similarity 0), merging while
    the average cosine is >= threshold (distance 1 - threshold)."""

    # auto: from this graph's similarities (graph/similarity_stats.py; fit: domain_shift.py)
    threshold: float | str = param(AUTO, valid=COSINE,
                                   auto=Auto(0.5, "far:0.5", "r1:0.5"))
    max_rounds: int = param(1000, valid=Range(1, ROUNDS))  # reciprocal-pair merge rounds


@dataclass
class KMeansParams:
    """Spherical faiss k-means on the features; K and the starting centroids from the
    components of kNN edges with cosine >= threshold, unless n_clusters > 0."""

    # auto: knn-cc's rule (the starting components are knn-cc's clusters)
    threshold: float | str = param(AUTO, valid=COSINE, auto=Auto(0.91, "far:0.5", "r1:0.5"))
    # > 0: fixed K with seeded random init (nredo restarts)
    n_clusters: int = param(0, valid=Range(0, ROWS))
    niter: int = param(20, valid=Range(1, 10_000))
    nredo: int = param(3, valid=Range(1, 100))


@register
class InfomapMethod(ClusterMethod):
    """Infomap (two-level, undirected, seeded, ``trials`` trials) on the kNN graph with
    edges of cosine >= ``threshold``, weighted by cosine. Nodes left without an edge are
    singletons.

    Distributed (shape link "stage", :mod:`ltc_ray.cluster.map_equation_stage`): partition
    tasks keep the edges, the components are solved in parallel pieces of at most
    ``max_piece_edges`` edges / ``max_piece_nodes`` nodes, one Infomap call per component,
    so the clusters equal one Infomap run per component for any number of partitions or
    workers; a component over the budget is split and refined (approximate, see
    :mod:`ltc_ray.graph.map_equation`). Needs the ``infomap`` package (a main dependency)."""

    name = "infomap"
    Params = InfomapParams
    shape = Shape(score="rows", link="stage", score_params=(),
                  tunable=Tunable("threshold", 0.30, 0.95, 0.01))

    def score(self, part: PartitionInput) -> np.ndarray:
        return neighbor_density(part.knn_sims, SCORE_NEIGHBORS)

    def budget(self):
        """The seed, trials and piece budgets (a ``MapEquationBudget``)."""
        from ltc_ray.cluster.map_equation_stage import MapEquationBudget  # (Ray)

        return MapEquationBudget.of(self.params, self.seed)

    def stage_links(self, ctx: LinkStageContext) -> LinkStageOutput:
        from ltc_ray.cluster.map_equation_stage import cosine_edges, map_equation_stage

        threshold = float(self.params.threshold)
        edges = [cosine_edges.remote(ctx.graph, lo, hi, ctx.storage_options, threshold)
                 for lo, hi in ctx.ranges]
        parents, merge, stats = map_equation_stage(ctx.graph.n_rows, edges, ctx.ranges,
                                                   self.budget(), ctx.cpus)
        return LinkStageOutput(parents, merge, stats)

    def cluster_graph(self, knn_ids: np.ndarray, knn_sims: np.ndarray,
                      features: np.ndarray | None = None) -> np.ndarray:
        """The same clusters in this process (tests, small graphs): labels ``(N,)``."""
        b = self.budget()
        src, dst, sim = knn_edges(knn_ids, knn_sims, float(self.params.threshold))
        keep = sim > 0
        return map_equation_labels(len(knn_ids), src[keep], dst[keep], sim[keep], seed=b.seed,
                                   trials=b.trials, max_piece_edges=b.max_piece_edges,
                                   max_piece_nodes=b.max_piece_nodes,
                                   split_passes=b.split_passes)

    def plan(self, ctx: PlanContext) -> list[PlanStage]:
        """Score tasks, then the map equation's tasks (:func:`map_equation_stage.plan_stages`)
        sized for every kNN edge kept (an upper bound: the threshold keeps fewer)."""
        from ltc_ray.cluster.map_equation_stage import plan_stages as plan_map_equation

        kept = ctx.n * (ctx.k - 1)
        return [rows_score_stage(ctx, rate_key(self, "score")),
                *plan_map_equation(ctx, self.budget(), kept, "at most every kNN edge, "
                                   "N·(k−1)", "edges of cosine >= threshold")]


@register
class ChineseWhispers(WholeGraphMethod):
    """Chinese whispers (Biemann 2006): label propagation on the kNN graph with edges of
    cosine >= ``threshold``, weighted by cosine. Each of at most ``iterations`` rounds
    computes every node's weighted-vote winner at once (a sparse row-argmax, ties to
    the smallest label) and applies it to a seeded random half of the nodes, which
    breaks the oscillations of fully synchronous updates; stops early when no node
    would change."""

    name = "chinese-whispers"
    Params = ChineseWhispersParams
    shape = whole_graph_shape(Tunable("threshold", 0.30, 0.95, 0.01))

    def cluster_graph(self, knn_ids: np.ndarray, knn_sims: np.ndarray,
                      features: np.ndarray | None = None) -> np.ndarray:
        n = len(knn_ids)
        a = symmetric_graph(n, *knn_edges(knn_ids, knn_sims, self.params.threshold))
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(a.indptr))
        labels = np.arange(n, dtype=np.int64)
        rng = np.random.default_rng(self.seed)
        for _ in range(self.params.iterations):
            votes = sp.csr_matrix((a.data, (rows, labels[a.indices])), shape=(n, n))
            votes.sum_duplicates()
            votes.sort_indices()
            node, winner, _ = row_argmax(votes)
            changed = winner != labels[node]
            if not changed.any():
                break
            move = changed & (rng.random(len(node)) < 0.5)
            labels[node[move]] = winner[move]
        return labels


@register
class KnnDBSCAN(WholeGraphMethod):
    """DBSCAN on the sparse kNN distance graph (cosine distance ``1 - sim``): a core point
    has >= ``min_samples`` points (itself included, as in scikit-learn) within ``eps`` in
    its kNN row; clusters are connected components of core-core edges within ``eps``;
    a border point (not core, a core within ``eps`` in either one's row) joins its
    nearest such core; the rest (noise) are singletons."""

    name = "knn-dbscan"
    Params = KnnDBSCANParams
    shape = whole_graph_shape(Tunable("eps", 0.05, 0.70, 0.01))

    def cluster_graph(self, knn_ids: np.ndarray, knn_sims: np.ndarray,
                      features: np.ndarray | None = None) -> np.ndarray:
        n = len(knn_ids)
        src, dst, sim = knn_edges(knn_ids, knn_sims, 1.0 - self.params.eps)
        core = np.bincount(src, minlength=n) + 1 >= self.params.min_samples
        both = core[src] & core[dst]
        # border candidates from both directions: (border, core, sim)
        fwd = ~core[src] & core[dst]
        bwd = core[src] & ~core[dst]
        b_node = np.concatenate([src[fwd], dst[bwd]])
        b_core = np.concatenate([dst[fwd], src[bwd]])
        b_sim = np.concatenate([sim[fwd], sim[bwd]])
        order = np.lexsort((b_core, -b_sim, b_node))  # nearest core, then smallest id
        b_node, b_core = b_node[order], b_core[order]
        first = np.r_[True, b_node[1:] != b_node[:-1]] if len(b_node) else np.empty(0, bool)
        return components(
            n,
            np.concatenate([src[both], b_node[first]]),
            np.concatenate([dst[both], b_core[first]]),
        )


@register
class CDP(WholeGraphMethod):
    """CDP-style linkage: components of kNN edges with cosine >= ``threshold``; every
    component larger than ``max_size`` is re-cut with its threshold raised by ``step``
    (only its own edges), repeatedly, until all fit (nodes of a component still too big
    at cosine 1 become singletons). Unlike learn-to-cluster's super-vertex proposals
    (overlapping), the result is a partition.

    The thresholds are ``round(threshold + i * step, 6)``, i = 1, 2, ...; a pass whose
    threshold would drop no edge of a big component changes nothing, so it is skipped
    (i jumps to the first threshold above the weakest edge left): i grows every pass, so
    the loop ends after at most (1 - threshold) / step + 1 passes and, for a step that
    the rounding resolves, one per distinct edge similarity (a step below 1e-6 used to
    repeat one rounded threshold forever; config refuses steps below 1e-4)."""

    name = "cdp"
    Params = CDPParams
    shape = whole_graph_shape(Tunable("threshold", 0.30, 0.95, 0.01))

    def cluster_graph(self, knn_ids: np.ndarray, knn_sims: np.ndarray,
                      features: np.ndarray | None = None) -> np.ndarray:
        n = len(knn_ids)
        p = self.params
        th0, step = float(p.threshold), float(p.step)
        src, dst, sim = knn_edges(knn_ids, knn_sims, th0)
        labels = components(n, src, dst)
        # the first pass above cosine 1 (+ float slack): the rest become singletons there
        last = max(1, int(np.ceil((1.0 + 1.5e-6 - th0) / step)))
        while last > 1 and round(th0 + (last - 1) * step, 6) > 1.0 + 1e-6:
            last -= 1
        while round(th0 + last * step, 6) <= 1.0 + 1e-6:
            last += 1
        i = 0
        while True:
            big = np.bincount(labels)[labels] > p.max_size
            if not big.any():
                return labels
            inside = big[src]
            i += 1
            if inside.any():  # skip the passes that would drop no edge
                i = max(i, self._first_pass_above(float(sim[inside].min()), th0, step, last))
            i = min(i, last)
            th = round(th0 + i * step, 6)
            keep = inside & (sim >= np.float32(th))  # as _first_pass_above compares
            src, dst, sim = src[keep], dst[keep], sim[keep]
            sub = components(n, src, dst)
            labels = labels.copy()
            labels[big] = labels.max() + 1 + sub[big]
            if th > 1.0 + 1e-6:  # nothing can be cut further: the rest are singletons
                labels[big] = labels.max() + 1 + np.flatnonzero(big)
                return labels

    @staticmethod
    def _first_pass_above(lowest: float, th0: float, step: float, last: int) -> int:
        """The smallest i whose threshold ``round(th0 + i * step, 6)`` drops the weakest
        edge left (similarity ``lowest``, a float32: ``sim >= th`` compares in float32);
        ``last`` when none before it does."""
        weakest = np.float32(lowest)

        def drops(i: int) -> bool:
            return bool(np.float32(round(th0 + i * step, 6)) > weakest)

        above = (np.floor(float(weakest) * 1e6) + 1) / 1e6  # first 6-decimal value above
        while np.float32(above) <= weakest:
            above += 1e-6
        i = int(np.ceil((above - 5e-7 - th0) / step))  # the first pass rounding up to it
        if not drops(i):  # a rounding tie, or a step below 1e-6
            i = max(i + 1, int(np.ceil((above - 4e-7 - th0) / step)))
        while i < last and not drops(i):
            i += max(1, int(np.ceil(1e-6 / step)))
        return min(i, last)


@register
class AverageHAC(WholeGraphMethod):
    """Average-linkage HAC restricted to the kNN graph (a pair with no kNN edge counts as
    similarity 0), stopped at average cosine ``threshold`` (distance 1 - threshold).

    Exact for that linkage, computed in vectorised rounds: average linkage is reducible,
    so merging every *reciprocal* best pair at once gives the same hierarchy as the
    sequential algorithm (the RAC argument, Sumengen et al. 2021). A round coarsens the
    sparse cluster graph (summed similarities) and takes each cluster's best average
    neighbour (ties to the smallest id); at most ``max_rounds`` rounds (a warning if hit;
    ~80-160 rounds on 29K synthetic samples)."""

    name = "hac"
    Params = HACParams
    # averages count missing pairs as 0
    shape = whole_graph_shape(Tunable("threshold", 0.05, 0.95, 0.01))

    def cluster_graph(self, knn_ids: np.ndarray, knn_sims: np.ndarray,
                      features: np.ndarray | None = None) -> np.ndarray:
        n = len(knn_ids)
        g = symmetric_graph(n, *knn_edges(knn_ids, knn_sims)).tocoo()
        r, c, w = g.row.astype(np.int64), g.col.astype(np.int64), g.data.astype(np.float64)
        labels = np.arange(n, dtype=np.int64)  # node -> current cluster
        size = np.ones(n, dtype=np.float64)
        for _ in range(self.params.max_rounds):
            n_c = len(size)
            s = sp.csr_matrix((w, (r, c)), shape=(n_c, n_c))
            s.sum_duplicates()
            s.sort_indices()
            row_of = np.repeat(np.arange(n_c), np.diff(s.indptr))
            avg = sp.csr_matrix(
                (s.data / (size[row_of] * size[s.indices]), s.indices, s.indptr), shape=s.shape
            )
            node, best, val = row_argmax(avg)
            best_of = np.full(n_c, -1, dtype=np.int64)
            best_of[node] = best
            ok = val >= self.params.threshold
            pair = ok & (best_of[best] == node) & (node < best)
            if not pair.any():
                break
            merge_to = np.arange(n_c, dtype=np.int64)
            merge_to[best[pair]] = node[pair]
            uniq, new = np.unique(merge_to, return_inverse=True)
            new = new.reshape(-1)
            size = np.bincount(new, weights=size, minlength=len(uniq))
            labels = new[labels]
            r, c = new[row_of], new[s.indices]
            w = s.data
            keep = r != c
            r, c, w = r[keep], c[keep], w[keep]
        else:
            log.warning(
                "hac: stopped after max_rounds=%d rounds with merges left", self.params.max_rounds
            )
        return labels


@register
class KMeans(WholeGraphMethod):
    """Spherical k-means (faiss) on the features, in the same single task as the other
    whole-graph methods, which then also reads the feature matrix (N·D·4 bytes more).

    The cluster count and the starting centroids come from the kNN graph: the connected
    components of edges with cosine >= ``threshold`` (knn-cc's clusters) give K and
    their normalised means seed the centroids, so k-means refines a graph clustering
    instead of depending on a random draw (faiss' random init merges and splits
    clusters). ``n_clusters`` > 0 fixes K instead and then uses faiss' seeded random
    init with ``nredo`` restarts. ``threshold`` is what ``jobs/tune.py`` searches."""

    name = "kmeans"
    Params = KMeansParams
    shape = whole_graph_shape(Tunable("threshold", 0.30, 0.95, 0.01), whole_graph_features=True)

    def cluster_graph(self, knn_ids: np.ndarray, knn_sims: np.ndarray,
                      features: np.ndarray | None = None) -> np.ndarray:
        import faiss  # a main dependency only through the cpu/gpu extras

        x = features

        p = self.params
        n, d = x.shape
        x = np.ascontiguousarray(x, dtype=np.float32)
        if p.n_clusters > 0:
            k = min(int(p.n_clusters), n)
            km = faiss.Kmeans(d, k, niter=p.niter, nredo=p.nredo, seed=self.seed,
                              spherical=True, verbose=False, min_points_per_centroid=1)
            km.train(x)
        else:
            src, dst, _ = knn_edges(knn_ids, knn_sims, p.threshold)
            _, start = np.unique(components(n, src, dst), return_inverse=True)
            start = start.reshape(-1)
            k = int(start.max()) + 1
            member = sp.csr_matrix((np.ones(n, np.float32), (start, np.arange(n))), shape=(k, n))
            centroids = np.asarray(member @ x, dtype=np.float32)
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
            km = faiss.Kmeans(d, k, niter=p.niter, seed=self.seed, spherical=True,
                              verbose=False, min_points_per_centroid=1)
            km.train(x, init_centroids=centroids)
        log.info("kmeans: %d clusters over %d rows", k, n)
        _, assign = km.index.search(x, 1)
        return assign.reshape(-1).astype(np.int64)
