"""L-GCN on Ray: pivot subgraphs scored on partition actors (a re-scored graph), then
learn-to-cluster's dynamic-threshold propagation as size-constrained components over
the pooled pivot-neighbour probabilities (:mod:`ltc_ray.cluster.constrained`).

A partition actor (:class:`~ltc_ray.pipeline.halo.LinkActor`) owns its rows' features
and kNN rows; for a chunk of its pivots it fetches the rows of their hop-1 nodes, then
the features and rows of every node of their subgraphs (three hops of the kNN graph),
from their owners, scores the chunk and writes its rows of the re-scored graph: self
first (probability 1), then the hop-1 neighbours by probability. Peak memory per actor
is its rows plus one chunk's subgraph nodes.
"""

from __future__ import annotations

import numpy as np
import ray

from ltc_ray.cluster.components import stars_to_label
from ltc_ray.cluster.constrained import constrained_components_ray, pooled_pairs
from ltc_ray.graph.knn_graph import KnnManifest, block_file, read_knn_rows, save_manifest
from ltc_ray.io.features import FeatureInfo
from ltc_ray.io.fs import join_uri
from ltc_ray.io.knn_files import id_dtype_for, save_knn_block
from ltc_ray.runtime import peak_rss_bytes, wait_all

__all__ = ["label_links", "resort_by_probability", "score_pivots"]


def resort_by_probability(knn_ids: np.ndarray, prob: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``hop1 + 1`` columns: self with 1.0, then the hop-1 neighbours by
    probability (:func:`~ltc_ray.models.edge_scorer.resort_rows`: descending, ties in kNN
    order, empty slots (-1) last with 0)."""
    from ltc_ray.models.edge_scorer import resort_rows

    n, h = prob.shape
    ids = knn_ids[:, 1 : h + 1].astype(np.int64)
    ids, p = resort_rows(ids, np.where(ids >= 0, prob, 0.0))
    return (np.concatenate([knn_ids[:, :1].astype(np.int64), ids], axis=1),
            np.concatenate([np.ones((n, 1), np.float32), p], axis=1))


def _score_job(actor, fetch, method, index: int, out_dir: str, chunk: int):
    """On a partition actor: its pivots' probabilities, written as block ``index``;
    returns (node scores, stats)."""
    hop1, hop2 = method.hops()
    n = actor.stop - actor.start
    ids = actor.knn_ids.astype(np.int64)
    new_ids = np.empty((n, hop1 + 1), dtype=np.int64)
    new_p = np.empty((n, hop1 + 1), dtype=np.float32)
    halo = 0
    for lo in range(0, n, chunk):
        rows = ids[lo : lo + chunk]
        pivots = np.arange(actor.start + lo, actor.start + lo + len(rows), dtype=np.int64)
        first = np.unique(np.concatenate([pivots, rows[:, 1 : hop1 + 1].ravel()]))
        first = first[first >= 0]  # the pivots and their hop-1 nodes
        _, rows_of = fetch(first)
        hop2_ids = rows_of(first)[0][:, 1 : hop2 + 1].ravel()
        needed = np.unique(np.concatenate([first, hop2_ids[hop2_ids >= 0]]))
        feats_of, rows_of = fetch(needed)
        halo += int(np.count_nonzero((needed < actor.start) | (needed >= actor.stop)))
        prob = method.pivot_probabilities(pivots, rows, feats_of, rows_of)
        new_ids[lo : lo + len(rows)], new_p[lo : lo + len(rows)] = resort_by_probability(
            rows, prob)
    so = actor.storage_options
    save_knn_block(join_uri(out_dir, block_file(index)),
                   new_ids.astype(id_dtype_for(actor.n_rows)), new_p, actor.start, so)
    valid = new_ids[:, 1:] >= 0
    score = np.where(valid.any(axis=1), (new_p[:, 1:] * valid).sum(axis=1)
                     / np.maximum(valid.sum(axis=1), 1), 0.0).astype(np.float32)
    return score, {"rows": int(n), "halo": halo, "peak_rss": peak_rss_bytes()}


def score_pivots(method, info: FeatureInfo, manifest: KnnManifest,
                 ranges: list[tuple[int, int]], cpus: float, gpus: float, out_dir: str,
                 chunk: int, tools) -> tuple[list, KnnManifest, dict]:
    """(node-score refs, the re-scored graph, stats) of the rescore stage (``tools``:
    :class:`~ltc_ray.cluster.base.StageTools`)."""
    so = info.storage_options
    actors, bounds = tools.start_actors(info, manifest, ranges, cpus, gpus)
    method_ref = ray.put(method)
    try:
        pairs = [a.run.options(num_returns=2).remote(_score_job, actors, bounds, i,
                                                     method_ref, i, out_dir, chunk)
                 for i, a in enumerate(actors)]
        stats = wait_all([p[1] for p in pairs], f"score ({method.name})", "partition")
        scores = [p[0] for p in pairs]
        ray.wait(scores, num_returns=len(scores))  # the results outlive the actors
    finally:
        for actor in actors:
            ray.kill(actor)
    hop1, _ = method.hops()
    graph = KnnManifest(directory=out_dir, n_rows=manifest.n_rows, k=hop1 + 1,
                        block_rows=manifest.block_rows, source="rescored", index=manifest.index,
                        recall=manifest.recall, bounds=[int(b) for b in bounds],
                        details={"method": method.name, "from": manifest.directory})
    save_manifest(graph, so)
    return scores, graph, {"halo_rows": sum(s["halo"] for s in stats),
                           "actor_peak_rss_bytes": [s["peak_rss"] for s in stats]}


@ray.remote(max_retries=3)
def _directed(graph: KnnManifest, lo: int, hi: int, so: dict | None):
    ids, p = read_knn_rows(graph, lo, hi, so)
    ids = ids[:, 1:].astype(np.int64)
    src = np.broadcast_to(np.arange(lo, hi, dtype=np.int64)[:, None], ids.shape)
    keep = ids >= 0
    return src[keep], ids[keep], p[:, 1:][keep]


_parents = ray.remote(num_returns=2, max_retries=3)(stars_to_label)


def label_links(graph: KnnManifest, ranges: list[tuple[int, int]], max_size: int,
                step: float, so: dict | None) -> tuple[list, list, dict]:
    """(parent refs, edge refs, stats): the dynamic-threshold propagation over the
    re-scored graph; a sample's parent is its component's smallest sample."""
    directed = [_directed.remote(graph, lo, hi, so) for lo, hi in ranges]
    pairs, low = pooled_pairs(directed, ranges)
    label, rounds = constrained_components_ray(graph.n_rows, pairs, low, max_size, step)
    out = [_parents.remote(label, lo, hi) for lo, hi in ranges]
    return [o[0] for o in out], [o[1] for o in out], {"rounds": rounds,
                                                      "min_probability": float(low)}

