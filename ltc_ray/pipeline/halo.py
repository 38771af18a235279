"""Partition actors for the "halo" shapes: scorers and linkers that look past their own
rows (graph models). Generic: they call the method's hooks and never its internals.

Each actor owns a contiguous range of nodes: their features and kNN rows. To score
its nodes it fetches exactly what a one-hop model needs from the other actors: the
reverse kNN edges pointing into its range (for max(S, S^T)) and the features of its
halo (neighbours owned elsewhere). Results do not depend on the partitioning because
every owned row of the normalised adjacency is rebuilt from the full set of edges
touching it. Peak memory per actor is O(partition + halo).
"""

from __future__ import annotations

import logging

import numpy as np
import ray

from ltc_ray.cluster.base import HaloPartition, LinkHaloPartition, halo_fits
from ltc_ray.cluster.components import spanning_forest
from ltc_ray.graph.adjacency import adjacency_rows, directed_edges
from ltc_ray.graph.knn_graph import KnnManifest, read_knn_rows
from ltc_ray.graph.ranking import sorted_positions
from ltc_ray.graph.rerank import csr_take
from ltc_ray.io.features import FeatureInfo, read_features, write_feature_part
from ltc_ray.runtime import (
    delay_for_tests,
    gather_rows,
    peak_rss_bytes,
    set_torch_threads,
    worker_device,
)

log = logging.getLogger("ltc_ray")


@ray.remote(max_restarts=2, max_task_retries=2, max_concurrency=4)
class PartitionActor:
    """Owns nodes ``[start, stop)``; threaded so it can serve its neighbours' halo
    requests while it computes."""

    def __init__(self, start: int, stop: int, info: FeatureInfo, manifest: KnnManifest,
                 threads: int = 1):
        set_torch_threads(threads)
        so = info.storage_options
        self.storage_options = so
        self.start, self.stop = start, stop
        self.knn_ids, self.knn_sims = read_knn_rows(manifest, start, stop, so)
        self.x = read_features(info, start, stop)
        self.src, self.dst, self.sim = directed_edges(self.knn_ids, self.knn_sims, start)
        self.stats: dict = {}

    def edges_into(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This partition's kNN edges whose target lies in ``[lo, hi)`` (reverse edges)."""
        keep = (self.dst >= lo) & (self.dst < hi)
        return self.src[keep], self.dst[keep], self.sim[keep]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Features of owned nodes ``ids`` (global ids, any order)."""
        return self.x[np.asarray(ids, dtype=np.int64) - self.start]

    def score(self, method, actors: list, bounds: np.ndarray, index: int,
              feature_dir: str | None = None):
        """Scores of the owned nodes; returns ``(scores (n,) float32, stats)``. Node features
        a method emits (e.g. GCN-V's hidden layer) are written to ``feature_dir``."""
        delay_for_tests("score")
        others = [a for i, a in enumerate(actors) if i != index]
        incoming = ray.get([a.edges_into.remote(self.start, self.stop) for a in others])
        src = np.concatenate([self.src] + [e[0] for e in incoming])
        dst = np.concatenate([self.dst] + [e[1] for e in incoming])
        sim = np.concatenate([self.sim] + [e[2] for e in incoming])
        targets = np.arange(self.start, self.stop, dtype=np.int64)
        adj, cols = adjacency_rows(targets, src, dst, sim)
        x_cols = self._gather(cols, actors, bounds, index)
        part = HaloPartition(self.start, self.stop, self.knn_ids, self.knn_sims, self.x, adj,
                             cols, x_cols, device=worker_device())
        out = method.score_halo(part)
        feature_part, feature_dim = None, 0
        if out.node_features is not None and feature_dir is not None:
            feature_part = write_feature_part(feature_dir, index, self.start, out.node_features,
                                              self.storage_options)
            feature_dim = int(out.node_features.shape[1])
        scores = out.scores
        stats = {
            "feature_part": feature_part,
            "feature_dim": feature_dim,
            "rows": int(len(targets)),
            "halo": int(len(cols) - len(targets)),
            "in_edges": int(sum(len(e[0]) for e in incoming)),
            "peak_rss": peak_rss_bytes(),
        }
        return scores, stats

    def _gather(self, cols: np.ndarray, actors: list, bounds: np.ndarray, index: int) -> np.ndarray:
        return gather_rows(self.x, self.start, cols, actors, bounds, index)


def score_with_halo(method, info: FeatureInfo, manifest: KnnManifest,
                    ranges: list[tuple[int, int]], cpus: float,
                    feature_dir: str | None = None, gpus: float = 0.0) -> tuple[list, list, list]:
    """Start one actor per partition and score every partition.

    Returns (score refs, stat refs, actors); kill the actors once the stats are in
    (the score refs stay valid in the object store).
    """
    n_parts = len(ranges)
    share = max(cpus / n_parts, 0.01)
    # GPUs only when the cluster has them (a GPU request on a CPU-only cluster never runs)
    gpu_share = min(1.0, gpus / n_parts) if gpus else 0.0
    actors = [
        PartitionActor.options(num_cpus=share, num_gpus=gpu_share).remote(
            lo, hi, info, manifest, max(1, int(share)))
        for lo, hi in ranges
    ]
    bounds = np.array([lo for lo, _ in ranges] + [ranges[-1][1]], dtype=np.int64)
    method_ref = ray.put(method)
    pairs = [a.score.options(num_returns=2).remote(method_ref, actors, bounds, i, feature_dir)
             for i, a in enumerate(actors)]
    return [p[0] for p in pairs], [p[1] for p in pairs], actors


@ray.remote(max_restarts=2, max_task_retries=2, max_concurrency=4)
class LinkActor:
    """Owns rows ``[start, stop)`` of a feature graph (e.g. GCN-V features, k = 160) and
    links them with a method that looks two hops out (GCN-E: candidates' features and
    their own kNN rows), fetched from the owning actors."""

    def __init__(self, start: int, stop: int, info: FeatureInfo | None, manifest: KnnManifest,
                 threads: int = 1, storage_options: dict | None = None):
        if info is not None:  # a model links on features; rows-only linkers (TPDi, ARO)
            set_torch_threads(threads)  # are numpy: importing torch would cost seconds
        so = info.storage_options if info is not None else storage_options
        self.storage_options = so
        self.start, self.stop, self.n_rows = start, stop, manifest.n_rows
        self.knn_ids, self.knn_sims = read_knn_rows(manifest, start, stop, so)
        # methods that only need the neighbours' rows (TPDi) link without features
        self.x = read_features(info, start, stop) if info is not None else None
        # a stage's own per-node results kept between its phases (:meth:`keep`), served to
        # the other actors by :meth:`kept_rows`; the peers of the current :meth:`run`
        self.state: dict = {}
        self.peers: tuple | None = None

    def rows(self, ids: np.ndarray, features: bool = True
             ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Features (None without features, or not asked for) and kNN rows of owned nodes
        ``ids``."""
        local = np.asarray(ids, dtype=np.int64) - self.start
        feats = self.x[local] if self.x is not None and features else None
        return feats, self.knn_ids[local], self.knn_sims[local]

    def _fetch(self, needed: np.ndarray, actors: list, bounds: np.ndarray, index: int,
               features: bool = True):
        """Features (None without, or not asked for) and kNN rows of the sorted distinct
        nodes ``needed``: own rows from this actor, the others' from their owners."""
        owner = np.searchsorted(bounds, needed, side="right") - 1
        features = features and self.x is not None
        feats = (np.empty((len(needed), self.x.shape[1]), dtype=np.float32)
                 if features else None)
        rows_ids = np.empty((len(needed), self.knn_ids.shape[1]), dtype=self.knn_ids.dtype)
        rows_sims = np.empty((len(needed), self.knn_ids.shape[1]), dtype=np.float32)
        mine = np.nonzero(owner == index)[0]
        wanted = [(p, np.nonzero(owner == p)[0]) for p in np.unique(owner) if p != index]
        fetched = ray.get([actors[p].rows.remote(needed[pos], features) for p, pos in wanted])
        for pos, (f, ri, rs) in [(mine, self.rows(needed[mine], features))] + [
                (pos, got) for (_, pos), got in zip(wanted, fetched, strict=True)]:
            rows_ids[pos], rows_sims[pos] = ri, rs
            if feats is not None:
                feats[pos] = f
        return feats, rows_ids, rows_sims

    def keep(self, key: str, value) -> None:
        """Keep a stage's per-node result for the owned rows: an array of ``n`` rows, or a
        CSR pair ``(indptr (n+1,), indices)`` of variable-length rows."""
        self.state[key] = value

    def kept_rows(self, key: str, ids: np.ndarray):
        """Rows ``ids`` (owned, global) of what :meth:`keep` holds under ``key``: an array's
        rows, or a CSR pair of those rows in the order asked."""
        value = self.state[key]
        local = np.asarray(ids, dtype=np.int64) - self.start
        if isinstance(value, tuple):
            return csr_take(value[0], value[1], local)
        return value[local]

    def gather_kept(self, key: str, needed: np.ndarray):
        """What every owner keeps under ``key`` for the sorted distinct nodes ``needed``
        (rows in that order; a CSR pair for variable-length rows); only within a
        :meth:`run` (it knows the peers)."""
        if self.peers is None:
            raise RuntimeError("gather_kept() runs only inside run()")
        actors, bounds, index = self.peers
        needed = np.asarray(needed, dtype=np.int64)
        owner = np.searchsorted(bounds, needed, side="right") - 1
        groups = [(p, np.nonzero(owner == p)[0]) for p in np.unique(owner)]
        remote = {p: actors[p].kept_rows.remote(key, needed[pos])
                  for p, pos in groups if p != index}
        got = [self.kept_rows(key, needed[pos]) if p == index else ray.get(remote[p])
               for p, pos in groups]
        order = np.concatenate([pos for _, pos in groups]) if groups else np.zeros(0, np.int64)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        if isinstance(self.state[key], tuple):
            indptr = np.concatenate([[0], np.cumsum(np.concatenate(
                [np.diff(g[0]) for g in got]) if got else [])]).astype(np.int64)
            indices = np.concatenate([g[1] for g in got]) if got else np.zeros(0, np.int64)
            return csr_take(indptr, indices, back)
        stacked = np.concatenate(got) if got else self.state[key][:0]
        return stacked[back]

    def lookups(self, needed: np.ndarray, actors: list, bounds: np.ndarray, index: int,
                features: bool = True):
        """``(feats_of, rows_of)`` over the sorted distinct nodes ``needed``, fetched once
        (``feats_of`` None without features or when not asked for); asking for any other
        node is a KeyError."""
        feats, rows_ids, rows_sims = self._fetch(needed, actors, bounds, index, features)

        def lookup(query) -> np.ndarray:
            return sorted_positions(needed, query)

        def rows_of(query):
            pos = lookup(query)
            return rows_ids[pos], rows_sims[pos]

        return ((lambda q: feats[lookup(q)]) if feats is not None else None), rows_of

    def run(self, job, actors: list, bounds: np.ndarray, index: int, *args):
        """``job(actor, fetch, *args)`` on this actor, where ``fetch(needed, features=True)``
        gives the :meth:`lookups` of any sorted distinct nodes: a method's own work over
        other partitions' rows (proposal members, pivot subgraphs); returns what it returns.
        A job may :meth:`keep` results for a later job, which reads any node's with
        :meth:`gather_kept` (run the jobs of one phase on every actor before the next)."""
        delay_for_tests("link")
        self.peers = (actors, bounds, index)
        return job(self, lambda needed, features=True: self.lookups(
            needed, actors, bounds, index, features), *args)

    def link(self, method, actors: list, bounds: np.ndarray, index: int, forest: bool,
             context, *score_parts):
        """``(parent, edges, stats)`` of the owned nodes, as the link tasks return.

        The neighbourhood is fetched once, or, for a method that reads only rows (TPDi)
        when those rows exceed the method's ``halo_bytes``, per request of its link step
        (one block of anchors at a time: memory bounded whatever the corpus size)."""
        delay_for_tests("link")
        scores = np.concatenate(score_parts)
        ids = self.knn_ids[self.knn_ids >= 0].astype(np.int64)
        needed = np.unique(np.concatenate([ids, np.arange(self.start, self.stop)]))
        del ids
        halo = int(len(needed) - (self.stop - self.start))
        row_bytes = self.knn_ids.shape[1] * (self.knn_ids.itemsize + 4)  # ids + p
        lazy = self.x is None and not halo_fits(halo, row_bytes, method.shape.halo_bytes)
        if lazy:
            needed = None
            fetched = {"rows": 0, "requests": 0}

            def rows_of(query):
                q = np.asarray(query, dtype=np.int64)
                uniq, inverse = np.unique(q, return_inverse=True)
                _, ri, rs = self._fetch(uniq, actors, bounds, index)
                fetched["requests"] += 1
                fetched["rows"] += int(np.count_nonzero((uniq < self.start)
                                                        | (uniq >= self.stop)))
                return ri[inverse], rs[inverse]

            part = LinkHaloPartition(self.start, self.stop, self.knn_ids, self.knn_sims,
                                     feats_of=None, rows_of=rows_of)
        else:
            feats_of, rows_of = self.lookups(needed, actors, bounds, index)
            part = LinkHaloPartition(self.start, self.stop, self.knn_ids, self.knn_sims,
                                     feats_of=feats_of, rows_of=rows_of)
        result = method.link_halo(part, scores, context)
        edges = (spanning_forest(result.src, result.dst, self.n_rows) if forest
                 else (result.src, result.dst))
        stats = {"edges": int(len(result.src)), "forest_edges": int(len(edges[0])),
                 "halo": fetched["rows"] if lazy else halo,
                 "halo_requests": fetched["requests"] if lazy else 1,
                 "peak_rss": peak_rss_bytes()}
        return result.parent, edges, stats


def start_link_actors(info: FeatureInfo | None, manifest: KnnManifest,
                      ranges: list[tuple[int, int]], cpus: float, gpus: float = 0.0,
                      storage_options: dict | None = None) -> tuple[list, np.ndarray]:
    """One :class:`LinkActor` per partition and the partition bounds (for
    :meth:`LinkActor.run`); kill the actors when done."""
    share = max(cpus / len(ranges), 0.01)
    gpu_share = min(1.0, gpus / len(ranges)) if gpus else 0.0
    actors = [LinkActor.options(num_cpus=share, num_gpus=gpu_share).remote(
        lo, hi, info, manifest, max(1, int(share)), storage_options) for lo, hi in ranges]
    bounds = np.array([lo for lo, _ in ranges] + [ranges[-1][1]], dtype=np.int64)
    return actors, bounds


def link_with_halo(method, info: FeatureInfo | None, manifest: KnnManifest,
                   ranges: list[tuple[int, int]], cpus: float, scores: list, forest: bool,
                   context, storage_options: dict | None = None
                   ) -> tuple[list, list, list, list]:
    """One :class:`LinkActor` per partition (without ``info``: rows only, no features);
    returns (parent refs, edge refs, stat refs, actors) — kill the actors once the stats
    are in."""
    share = max(cpus / len(ranges), 0.01)
    actors = [LinkActor.options(num_cpus=share).remote(lo, hi, info, manifest,
                                                       max(1, int(share)), storage_options)
              for lo, hi in ranges]
    bounds = np.array([lo for lo, _ in ranges] + [ranges[-1][1]], dtype=np.int64)
    method_ref = ray.put(method)
    triples = [a.link.options(num_returns=3).remote(method_ref, actors, bounds, i, forest,
                                                    context, *scores)
               for i, a in enumerate(actors)]
    return [t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples], actors
