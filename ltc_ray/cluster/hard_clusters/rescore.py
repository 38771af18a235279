"""hard-clusters' own re-scoring stage (its :class:`~ltc_ray.cluster.base.Shape` score
"rescore"): an edge model per partition, then a density that is a reduce over all
partitions.

One :class:`EdgeActor` per partition owns rows ``[start, stop)``: their features and kNN
rows. It fetches the features of its one-hop halo (neighbours owned elsewhere) from their
owners, re-scores and re-sorts its rows with the method's model and writes them as one
block of a new graph (``<work>/knn-rescored``, uneven blocks = partitions). The density is
NDDE: every actor emits its rows' transition edges; the owner of each target pulls the
edges into its range from every actor and sums them in (target, source) order, so the
result is bit-identical for any partitioning. The iterative NDDE repeats a pull of the
sources' current density per round, in two phases (compute, then advance) so no actor
reads a half-updated neighbour; the stop test sums exact fixed-point integers.

Peak memory per actor: its rows and features, the halo's features (all at once, or per
chunk of rows when they exceed ``methods.hard-clusters.halo_bytes``: at scale, with rows in
random order, a partition's halo is nearly the whole corpus), and its share of the
transition edges (m per row, m = 20 by default).
"""

from __future__ import annotations

import logging

import numpy as np
import ray

from ltc_ray.cluster.hard_clusters.algorithm import (
    L1_UNITS,
    IncomingEdges,
    halo_chunk_rows,
    l1_units,
)
from ltc_ray.graph.knn_graph import KnnManifest, block_file, read_knn_rows, save_manifest
from ltc_ray.io.features import FeatureInfo, read_features
from ltc_ray.io.fs import join_uri
from ltc_ray.io.knn_files import id_dtype_for, save_knn_block
from ltc_ray.runtime import (
    delay_for_tests,
    gather_rows,
    peak_rss_bytes,
    ray_get,
    set_torch_threads,
    wait_all,
    worker_device,
)

log = logging.getLogger("ltc_ray")


@ray.remote(max_restarts=0, max_concurrency=4)
class EdgeActor:
    """Owns nodes ``[start, stop)``; threaded so it serves halo requests while it works.
    Its state lives across the stage's rounds, so a dead actor fails the stage (a rerun
    of the job resumes from the kNN graph)."""

    def __init__(self, start: int, stop: int, info: FeatureInfo, manifest: KnnManifest,
                 threads: int = 1):
        set_torch_threads(threads)
        self.so = info.storage_options
        self.start, self.stop = start, stop
        self.knn_ids, _ = read_knn_rows(manifest, start, stop, self.so)
        self.x = read_features(info, start, stop)
        self.n_total = manifest.n_rows
        self.edges: tuple | None = None  # this partition's transition edges (src, dst, w)
        self.incoming: IncomingEdges | None = None
        self.rho: np.ndarray | None = None
        self.next_rho: np.ndarray | None = None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Features of owned nodes ``ids`` (the halo requests of other actors)."""
        return self.x[np.asarray(ids, dtype=np.int64) - self.start]

    def _halo_of(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        """The distinct neighbours of kNN rows ``ids`` and how many are owned elsewhere."""
        needed = np.unique(ids[ids >= 0])
        return needed, int(np.count_nonzero((needed < self.start) | (needed >= self.stop)))

    def rescore(self, method, actors: list, bounds: np.ndarray, index: int,
                out_dir: str) -> dict:
        """Re-score and re-sort the owned rows; write them as block ``index``. The halo's
        features are fetched once, or per chunk of rows when they exceed
        ``halo_bytes`` (rows are scored independently, so the result is the same)."""
        delay_for_tests("score")
        ids = self.knn_ids.astype(np.int64)
        needed, halo = self._halo_of(ids)
        n, k = ids.shape
        chunk = halo_chunk_rows(n, halo, k, self.x.shape[1], method.params.halo_bytes,
                                method.params.batch_size)
        new_ids = np.empty_like(ids)
        prob = np.empty(ids.shape, dtype=np.float32)
        fetched = 0
        device = worker_device()
        for lo in range(0, n, chunk):
            rows = ids[lo: lo + chunk]
            if chunk < n:
                needed, halo = self._halo_of(rows)
            feats = gather_rows(self.x, self.start, needed, actors, bounds, index)
            fetched += halo

            def feats_of(query: np.ndarray, feats=feats, needed=needed) -> np.ndarray:
                return feats[np.searchsorted(needed, query)]

            new_ids[lo: lo + chunk], prob[lo: lo + chunk] = method.rescore_rows(
                rows, feats_of, device)
            del feats, feats_of  # before the next chunk's fetch
        save_knn_block(join_uri(out_dir, block_file(index)),
                       new_ids.astype(id_dtype_for(self.n_total)), prob, self.start, self.so)
        node_ids = np.arange(self.start, self.stop, dtype=np.int64)
        self.edges = method.transition_edges(node_ids, new_ids, prob)
        return {"rows": int(n), "halo": fetched, "halo_chunks": -(-n // chunk),
                "peak_rss": peak_rss_bytes()}

    def edges_into(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src, dst, w = self.edges
        keep = (dst >= lo) & (dst < hi)
        return src[keep], dst[keep], w[keep]

    def gather_incoming(self, actors: list, index: int) -> float | None:
        """Pull every partition's transition edges into the owned range; sets the one-step
        density (the incoming weight) and the diffusion's start (1/N)."""
        self.x = None  # every actor has rescored: no more feature requests will come
        others = [a for i, a in enumerate(actors) if i != index]
        parts = [self.edges_into(self.start, self.stop)]
        parts += ray.get([a.edges_into.remote(self.start, self.stop) for a in others])
        src, dst, w = (np.concatenate(x) for x in zip(*parts, strict=True))
        self.incoming = IncomingEdges.build(self.start, self.stop, src, dst, w)
        self.rho = np.full(self.stop - self.start, 1.0 / self.n_total)
        return peak_rss_bytes()

    def weight_in(self) -> np.ndarray:
        """The one-step density, float32 like every method's scores."""
        return self.incoming.pull().astype(np.float32)

    def rho_of(self, ids: np.ndarray) -> np.ndarray:
        return self.rho[np.asarray(ids, dtype=np.int64) - self.start]

    def diffuse(self, actors: list, bounds: np.ndarray, index: int, damping: float) -> int:
        """Phase 1 of a round: the next density of the owned nodes from the sources'
        current one; returns the owned L1 change in fixed-point units."""
        src = self.incoming.src
        sources = np.unique(src)
        values = gather_rows(self.rho, self.start, sources, actors, bounds, index,
                                 method="rho_of")
        pulled = self.incoming.pull(values[np.searchsorted(sources, src)])
        self.next_rho = damping * self.rho + (1.0 - damping) * pulled
        return l1_units(self.next_rho - self.rho)

    def advance(self) -> int:
        """Phase 2: every actor has read the current density; make the next one current."""
        self.rho, self.next_rho = self.next_rho, None
        return peak_rss_bytes()

    def density(self) -> np.ndarray:
        return self.rho.astype(np.float32)


def rescore_and_density(method, info: FeatureInfo, manifest: KnnManifest,
                        ranges: list[tuple[int, int]], cpus: float, out_dir: str,
                        gpus: float = 0.0) -> tuple[list, KnnManifest, dict]:
    """Run the rescore stage. Returns (per-partition density refs, the re-scored graph's
    manifest, stats). The actors are gone when it returns."""
    n_parts = len(ranges)
    share = max(cpus / n_parts, 0.01)
    gpu_share = min(1.0, gpus / n_parts) if gpus else 0.0
    actors = [EdgeActor.options(num_cpus=share, num_gpus=gpu_share).remote(
        lo, hi, info, manifest, max(1, int(share))) for lo, hi in ranges]
    bounds = np.array([lo for lo, _ in ranges] + [ranges[-1][1]], dtype=np.int64)
    params = method.params
    try:
        method_ref = ray.put(method)
        stats = wait_all([a.rescore.remote(method_ref, actors, bounds, i, out_dir)
                          for i, a in enumerate(actors)], f"score ({method.name})", "partition")
        rss = [s["peak_rss"] for s in stats]
        rss = [max(a, b) for a, b in zip(rss, ray_get(
            [a.gather_incoming.remote(actors, i) for i, a in enumerate(actors)]), strict=True)]
        iterations = 1
        if params.density == "iterative":
            iterations = 0
            for iterations in range(1, params.max_iter + 1):  # noqa: B007 - reported below
                change = sum(ray_get([a.diffuse.remote(actors, bounds, i, params.damping)
                                      for i, a in enumerate(actors)]))
                ray_get([a.advance.remote() for a in actors])
                if change < params.eps * L1_UNITS:
                    break
            parts = [a.density.remote() for a in actors]
        else:
            parts = [a.weight_in.remote() for a in actors]
        ray.wait(parts, num_returns=len(parts))  # the results outlive the actors
    finally:
        for actor in actors:
            ray.kill(actor)
    graph = KnnManifest(directory=out_dir, n_rows=manifest.n_rows, k=manifest.k,
                        block_rows=manifest.block_rows, source="rescored", index=manifest.index,
                        recall=manifest.recall, bounds=[int(b) for b in bounds],
                        details={"method": method.name, "from": manifest.directory})
    save_manifest(graph, info.storage_options)
    return parts, graph, {"halo_rows": sum(s["halo"] for s in stats),
                          "halo_chunks": [s["halo_chunks"] for s in stats],
                          "actor_peak_rss_bytes": rss, "density_iterations": iterations}

