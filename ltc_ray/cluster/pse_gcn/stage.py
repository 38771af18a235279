"""PSE-GCN's score stage on partition actors
(:class:`~ltc_ray.pipeline.halo.LinkActor`, started through
:class:`~ltc_ray.cluster.base.StageTools`), in four phases; each runs on every actor
before the next starts, and an actor keeps its phase results for the next
(``actor.keep``), serving them to the others (``actor.gather_kept``):

1. reciprocal masks R(i, k1), R(i, k2) of the owned rows (the one-hop rows fetched);
2. the expanded sets R*(i) (the one-hop nodes' masks fetched), kept as CSR;
3. Jaccard re-ranking over the two-hop candidates (their R* fetched): the re-ranked rows,
   written as this partition's block of the re-scored graph and kept;
4. the DGC embeddings of the owned nodes' subgraphs (re-ranked rows of the hop-1 nodes,
   features and input kNN rows of every subgraph node fetched), written as a feature part.

Every phase works chunk by chunk over the owned rows, so an actor's peak memory is its
rows, its kept results and one chunk's neighbourhood. Nothing depends on the partitioning:
each row's result is a function of the graph alone.
"""

from __future__ import annotations

import time

import numpy as np
import ray

from ltc_ray.cluster.base import RescoreContext, RescoreOutput
from ltc_ray.graph.knn_graph import KnnManifest, block_file, save_manifest
from ltc_ray.graph.ranking import sorted_positions
from ltc_ray.graph.rerank import expanded_sets, jaccard_rerank, reciprocal_masks
from ltc_ray.io.features import write_feature_part
from ltc_ray.io.fs import join_uri
from ltc_ray.io.knn_files import id_dtype_for, save_knn_block
from ltc_ray.runtime import peak_rss_bytes, wait_all

__all__ = ["rerank_and_embed"]


def _unique(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).ravel()
    return np.unique(ids[ids >= 0])


def _chunks(n: int, chunk: int):
    for lo in range(0, n, chunk):
        yield lo, min(n, lo + chunk)


def _rows_only(fetch, ids: np.ndarray) -> np.ndarray:
    """The input kNN id rows of the sorted distinct ``ids`` (no features fetched)."""
    _, rows_of = fetch(ids, features=False)
    return rows_of(ids)[0].astype(np.int64)


def _masks_job(actor, fetch, shape: dict, chunk: int):
    ids = actor.knn_ids.astype(np.int64)
    masks = np.empty(ids.shape, dtype=np.uint8)
    for lo, hi in _chunks(len(ids), chunk):
        masks[lo:hi] = reciprocal_masks(actor.start + lo, ids[lo:hi],
                                        lambda q: _rows_only(fetch, q), shape["k1"], shape["k2"])
    actor.keep("masks", masks)
    return {"seconds": 0.0}


def _rstar_job(actor, fetch, chunk: int):
    ids = actor.knn_ids.astype(np.int64)
    masks = actor.state["masks"]
    lengths, parts = [], []
    for lo, hi in _chunks(len(ids), chunk):

        def neighbours_of(q):
            return _rows_only(fetch, q), actor.gather_kept("masks", q)

        ptr, idx = expanded_sets(actor.start + lo, ids[lo:hi], masks[lo:hi], neighbours_of)
        lengths.append(np.diff(ptr))
        parts.append(idx)
    indptr = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=indptr[1:])
    actor.keep("rstar", (indptr, np.concatenate(parts).astype(np.int64)))
    return {"rstar_mean": float(indptr[-1] / max(1, len(ids)))}


def _rerank_job(actor, fetch, shape: dict, chunk: int, out_dir: str, index: int):
    """Phase 3: the re-ranked rows, written as block ``index`` and kept."""
    ids = actor.knn_ids.astype(np.int64)
    n, top = len(ids), shape["top"]
    new_ids = np.empty((n, top), dtype=np.int64)
    new_sims = np.empty((n, top), dtype=np.float32)
    indptr, indices = actor.state["rstar"]
    for lo, hi in _chunks(n, chunk):
        own = (indptr[lo : hi + 1] - indptr[lo], indices[indptr[lo] : indptr[hi]])
        new_ids[lo:hi], new_sims[lo:hi] = jaccard_rerank(
            actor.start + lo, ids[lo:hi], own, lambda q: _rows_only(fetch, q),
            lambda q: actor.gather_kept("rstar", q), shape["k1"], shape["expand"], top)
    save_knn_block(join_uri(out_dir, block_file(index)),
                   new_ids.astype(id_dtype_for(actor.n_rows)), new_sims, actor.start,
                   actor.storage_options)
    actor.keep("rerank_ids", new_ids)
    actor.keep("rerank_sims", new_sims)
    return {"rows": int(n)}


def _drop(actor, fetch, *keys: str):
    """Release kept results once every actor's phase that reads them is done."""
    for key in keys:
        actor.state.pop(key, None)


def _embed_job(actor, fetch, method, chunk: int, feature_dir: str, index: int):
    """Phase 4: the owned nodes' embeddings, written as feature part ``index``; returns
    (node scores: the mean re-ranked similarity past self, stats)."""
    from ltc_ray.models.pse_gcn import subgraph_nodes

    t0 = time.perf_counter()
    hop1, hop2, _ = method.subgraph_shape()
    rr_ids, rr_sims = actor.state["rerank_ids"], actor.state["rerank_sims"]
    n = len(rr_ids)
    out, halo = None, 0

    def kept_rerank(q):
        q = np.asarray(q, dtype=np.int64)
        ids, sims = actor.gather_kept("rerank_ids", q), actor.gather_kept("rerank_sims", q)
        return ids, sims

    for lo, hi in _chunks(n, chunk):
        centres = np.arange(actor.start + lo, actor.start + hi, dtype=np.int64)
        first = _unique(np.concatenate([centres, rr_ids[lo:hi, 1 : hop1 + 1].ravel()]))
        rr_first = kept_rerank(first)

        def rerank_of(q, first=first, rr_first=rr_first):
            pos = sorted_positions(first, q)
            return rr_first[0][pos], rr_first[1][pos]

        nodes, _ = subgraph_nodes(centres, rerank_of, hop1, hop2)
        needed = _unique(nodes)
        feats_of, rows_of = fetch(needed)
        halo += int(np.count_nonzero((needed < actor.start) | (needed >= actor.stop)))
        emb = method.embed(centres, feats_of, rows_of, rerank_of)
        if out is None:
            out = np.empty((n, emb.shape[1]), dtype=np.float32)
        out[lo:hi] = emb
    part = write_feature_part(feature_dir, index, actor.start, out, actor.storage_options)
    valid = rr_ids[:, 1:] >= 0
    score = np.where(valid.any(axis=1), (rr_sims[:, 1:] * valid).sum(axis=1)
                     / np.maximum(valid.sum(axis=1), 1), 0.0).astype(np.float32)
    return score, {"part": part, "width": int(out.shape[1]), "halo": halo,
                   "seconds": time.perf_counter() - t0, "peak_rss": peak_rss_bytes()}


def _phase(actors, bounds, job, what: str, *args, per_actor=None) -> list:
    """Run ``job`` on every actor (``per_actor(i)`` adds per-actor args) and wait."""
    refs = [a.run.remote(job, actors, bounds, i, *args, *(per_actor(i) if per_actor else ()))
            for i, a in enumerate(actors)]
    return wait_all(refs, what, "partition")


def rerank_and_embed(method, ctx: RescoreContext) -> RescoreOutput:
    """The score stage: re-ranked graph (``ctx.out_dir``) and embeddings
    (``ctx.feature_dir``) of every node, with per-phase seconds in the stats."""
    shape = method.rerank_shape()
    chunk = int(method.params.chunk_rows)
    so = ctx.features.storage_options
    actors, bounds = ctx.tools.start_actors(ctx.features, ctx.graph, ctx.ranges, ctx.cpus,
                                            ctx.gpus)
    seconds: dict[str, float] = {}
    method_ref = ray.put(method)
    try:
        t = time.perf_counter()
        _phase(actors, bounds, _masks_job, "re-rank: reciprocal sets", shape, chunk)
        seconds["reciprocal"] = time.perf_counter() - t
        t = time.perf_counter()
        rstar = _phase(actors, bounds, _rstar_job, "re-rank: expanded sets", chunk)
        _phase(actors, bounds, _drop, "re-rank: release", "masks")
        seconds["expanded"] = time.perf_counter() - t
        t = time.perf_counter()
        _phase(actors, bounds, _rerank_job, "re-rank: Jaccard", shape, chunk, ctx.out_dir,
               per_actor=lambda i: (i,))
        _phase(actors, bounds, _drop, "re-rank: release", "rstar")
        seconds["jaccard"] = time.perf_counter() - t
        t = time.perf_counter()
        pairs = [a.run.options(num_returns=2).remote(_embed_job, actors, bounds, i, method_ref,
                                                     chunk, ctx.feature_dir, i)
                 for i, a in enumerate(actors)]
        stats = wait_all([p[1] for p in pairs], f"score ({method.name}: embeddings)",
                         "partition")
        scores = [p[0] for p in pairs]
        ray.wait(scores, num_returns=len(scores))  # the results outlive the actors
        seconds["embed"] = time.perf_counter() - t
    finally:
        for actor in actors:
            ray.kill(actor)
    graph = KnnManifest(directory=ctx.out_dir, n_rows=ctx.graph.n_rows, k=shape["top"],
                        block_rows=ctx.graph.block_rows, source="rescored",
                        index=ctx.graph.index, recall=ctx.graph.recall,
                        bounds=[int(b) for b in bounds],
                        details={"method": method.name, "from": ctx.graph.directory,
                                 "rerank": shape})
    save_manifest(graph, so)
    hop1, hop2, local_k = method.subgraph_shape()
    return RescoreOutput(
        scores, graph,
        {"phase_seconds": {k: round(v, 3) for k, v in seconds.items()},
         "rerank": shape, "subgraph": {"hop1": hop1, "hop2": hop2, "local_k": local_k},
         "rstar_mean_size": round(float(np.mean([r["rstar_mean"] for r in rstar])), 2),
         "halo_rows": sum(s["halo"] for s in stats),
         "actor_peak_rss_bytes": [s["peak_rss"] for s in stats]},
        feature_parts=[s["part"] for s in stats], feature_width=stats[0]["width"])
