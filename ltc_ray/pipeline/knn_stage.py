"""Sharded kNN on Ray: shard (or replica) actors hold the database, query blocks stream
through them with bounded work in flight, partial top-k lists merge exactly, and each
block's result is written to the run's work area by a worker (never via the driver).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import ray

from ltc_ray.config import KnnConfig
from ltc_ray.errors import FAISS_INSTALL, InputError, MissingDependency
from ltc_ray.graph.knn_graph import (
    MANIFEST,
    KnnManifest,
    read_knn_rows,
    save_manifest,
)
from ltc_ray.io.features import FeatureInfo, read_features
from ltc_ray.io.fs import join_uri, url_to_fs
from ltc_ray.io.knn_files import (
    id_dtype_for,
    inspect_ltc_knn,
    iter_ltc_knn,
    save_knn_block,
)
from ltc_ray.knn.search import (
    FlatView,
    build_index,
    exact_topk,
    ivf_nlist,
    merge_topk,
    put_self_first,
    recall_at_k,
    self_similarities,
)
from ltc_ray.pipeline.stages import uri_version
from ltc_ray.runtime import delay_for_tests, peak_rss_bytes, ray_get, worker_device

try:  # faiss comes from the `cpu` or `gpu` extra (as in ltc_ray.knn.search)
    import faiss
except ImportError as exc:
    raise MissingDependency.from_import_error("faiss", FAISS_INSTALL, exc) from exc

log = logging.getLogger("ltc_ray")


@dataclass
class KnnLayout:
    """How the database is spread over actors."""

    mode: str  # "replicate" | "shard"
    n_actors: int
    threads_per_actor: int
    cpus_per_actor: float
    gpus_per_actor: float
    shard_ranges: list[tuple[int, int]]  # one per actor (replicate: the whole base)


# Share of a GPU's measured free memory a database copy may take: the rest holds the query
# block, the score tiles (2^27 scores), the candidates and the CUDA context.
GPU_MEMORY_SHARE = 0.6


def plan_knn_layout(n_rows: int, dim: int, cfg: KnnConfig, resources: dict,
                    gpu_free_bytes: float | None = None) -> KnnLayout:
    """Choose replicate vs shard and the actor count from the cluster's resources.

    GPUs are requested only when the cluster reports some, so a GPU actor is never
    left pending on a CPU-only cluster. With GPUs, ``gpu_free_bytes`` (measured on a GPU
    worker by :func:`measure_gpu_free_bytes`, or given as ``gpu_free_bytes`` in a
    hypothetical ``resources``) caps the bytes per database copy at
    :data:`GPU_MEMORY_SHARE` of it: the database is replicated on every GPU while it fits
    there, else sharded so that each shard does.
    """
    cpus = max(float(resources.get("CPU", 1.0)), 1.0)
    gpus = int(resources.get("GPU", 0)) if cfg.gpu == "auto" else 0
    base_bytes = n_rows * dim * 4
    gpu_free_bytes = gpu_free_bytes or resources.get("gpu_free_bytes")
    budget = cfg.shard_max_bytes
    if gpus and gpu_free_bytes:
        budget = min(budget, GPU_MEMORY_SHARE * float(gpu_free_bytes))
    mode = cfg.mode
    if mode == "auto":
        mode = "shard" if cfg.shards > 1 or base_bytes > budget else "replicate"
    if mode == "shard":
        n_actors = cfg.shards or max(math.ceil(base_bytes / budget), gpus, 1)
        n_actors = min(n_actors, n_rows)
        bounds = np.linspace(0, n_rows, n_actors + 1).round().astype(int)
        ranges = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    else:
        n_actors = gpus or max(1, int(cpus // cfg.cpus_per_actor))
        ranges = [(0, n_rows)] * n_actors
    # Actors share the CPUs evenly; the light read/merge tasks request none.
    cpus_per_actor = cpus / n_actors
    return KnnLayout(
        mode=mode,
        n_actors=n_actors,
        threads_per_actor=max(1, int(cpus_per_actor)),
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=min(1.0, gpus / n_actors) if gpus else 0.0,
        shard_ranges=ranges,
    )


@ray.remote(num_cpus=0, num_gpus=1)
def _gpu_free_bytes() -> int:
    import torch

    free, _ = torch.cuda.mem_get_info()
    return int(free)


def measure_gpu_free_bytes(resources: dict) -> int | None:
    """Free memory of one GPU worker (bytes), measured by a one-GPU task; None without GPUs
    or when the worker cannot tell (no CUDA torch)."""
    if not resources.get("GPU"):
        return None
    try:
        return ray_get(_gpu_free_bytes.remote())
    except Exception as exc:  # noqa: BLE001 - a plan input, not a failure: fall back
        log.warning("kNN: could not measure GPU memory (%s); using knn.shard_max_bytes", exc)
        return None


def _exact_or_ivf_index(xb: np.ndarray, cfg: KnnConfig, seed: int, want_gpu: bool):
    """(backend name, index) for this worker: ``knn.backend`` auto picks torch on a CUDA
    device (tensor-core candidates, certified exact) and faiss elsewhere; IVF is faiss's.
    Every backend gives the same graph: candidates are re-scored per pair and certified
    afterwards (:func:`ltc_ray.knn.search.exact_topk`).
    The device is the one Ray assigned this actor (never a GPU it did not ask for)."""
    cuda = want_gpu and worker_device() == "cuda"
    backend = cfg.backend
    if backend == "auto":
        backend = "torch" if cuda and cfg.index == "flat" else "faiss"
    if backend == "torch":  # (config validation refuses torch with IVF)
        from ltc_ray.knn.torch_index import TorchFlatIndex

        precision = None if cfg.precision == "auto" else cfg.precision
        index = TorchFlatIndex(xb, "cuda" if cuda else "cpu", precision)
        return f"torch-{index.device.type}-{index.precision}", index
    use_gpu = cuda and faiss.get_num_gpus() > 0
    if want_gpu and not use_gpu:
        log.warning("GPU requested but this faiss build has no GPU support; using CPU")
    index = build_index(xb, cfg.index, cfg.nlist, cfg.nprobe, seed, use_gpu)
    return ("faiss-gpu" if use_gpu else "faiss-cpu"), index


@ray.remote(max_restarts=3, max_task_retries=3)
class KnnShardActor:
    """Holds rows ``[start, stop)`` of the database and answers top-k queries."""

    def __init__(self, info: FeatureInfo, start: int, stop: int, cfg: KnnConfig,
                 threads: int, seed: int, want_gpu: bool):
        faiss.omp_set_num_threads(threads)
        self.info = info
        self.start = start
        self.cfg = cfg
        self.xb = read_features(info, start, stop)
        self.backend, self.index = _exact_or_ivf_index(self.xb, cfg, seed, want_gpu)
        self.widened = 0  # query rows that needed more candidates (near-ties at rank k)

    def widened_rows(self) -> int:
        return self.widened

    def backend_name(self) -> str:
        return self.backend

    def peak_rss(self) -> int:
        return peak_rss_bytes()

    def search(self, queries: np.ndarray, k: int, exact: bool = False):
        """Exact top-k of ``queries`` in this shard (IVF: of its candidates): global ids
        and re-scored sims, ordered by (similarity desc, id asc)."""
        delay_for_tests("knn")
        index = self.index
        if exact and self.cfg.index != "flat":
            index = FlatView(self.xb)  # exact, without copying the shard's rows
        certify = exact or self.cfg.index == "flat"
        ids, sims, widened = exact_topk(index, queries, self.xb, k, self.start, certify=certify)
        if not exact:
            self.widened += widened
        return ids, sims

    def search_and_save(self, block: int, start: int, stop: int, k: int, uri: str) -> dict:
        """Replicate mode: read the query block, search, write its kNN block file."""
        queries = read_features(self.info, start, stop)
        ids, sims = self.search(queries, k)  # (the test-only delay hook sits in search)
        return _finish_block(queries, start, ids, sims, k, self.info.n_rows, uri,
                             self.info.storage_options)


def _finish_block(queries, start, ids, sims, k, n_rows, uri, storage_options) -> dict:
    rows = np.arange(start, start + len(queries), dtype=np.int64)
    ids, sims = put_self_first(rows, ids, sims, self_similarities(queries))
    digest = save_knn_block(uri, ids.astype(id_dtype_for(n_rows)), sims, start, storage_options)
    return {"rows": len(rows), "peak_rss": peak_rss_bytes(), "uri": uri, "digest": digest}


@ray.remote(num_cpus=0)
def _read_queries(info: FeatureInfo, start: int, stop: int) -> np.ndarray:
    return read_features(info, start, stop)


@ray.remote(num_cpus=0, max_retries=3)
def _merge_and_save(queries, start, k, n_rows, uri, storage_options, *partials) -> dict:
    ids, sims = merge_topk(partials, k)
    return _finish_block(queries, start, ids, sims, k, n_rows, uri, storage_options)


# A replicated flat base up to this size is searched by plain tasks instead of actors:
# pooled Ray workers that already imported ltc_ray (no actor process to start) keep the
# base and its index between blocks, and several tasks with few threads each overlap one
# block's re-scoring and writing with the other blocks' searches.
TASK_BASE_BYTES = 1 << 30
TASK_MEMORY_BYTES = 4 << 30  # all task workers' copies of the base together
MIN_TASK_ROWS = 2048
_WORKER_BASE: dict = {}  # (features, version, rows, dim) -> (rows, faiss index); one entry


def _cached_base(info: FeatureInfo):
    """This worker's copy of the whole base and its flat index, read once per input. The
    rows handed out are a view of the index's own storage (one copy in memory)."""
    key = (info.uri, info.version, info.n_rows, info.dim)
    if key not in _WORKER_BASE:
        _WORKER_BASE.clear()
        index = build_index(read_features(info, 0, info.n_rows), "flat")
        xb = faiss.rev_swig_ptr(index.get_xb(), info.n_rows * info.dim)
        _WORKER_BASE[key] = (xb.reshape(info.n_rows, info.dim), index)
    return _WORKER_BASE[key]


@ray.remote(max_retries=3)
def _search_block_task(info: FeatureInfo, start: int, stop: int, k: int, uri: str,
                       threads: int) -> dict:
    """Task path of a replicated flat base: search one query block, write its file."""
    faiss.omp_set_num_threads(threads)
    delay_for_tests("knn")
    xb, index = _cached_base(info)
    queries = xb[start:stop]
    ids, sims, widened = exact_topk(index, queries, xb, k)
    result = _finish_block(queries, start, ids, sims, k, info.n_rows, uri, info.storage_options)
    return {**result, "widened": widened}


def task_slots(layout: KnnLayout, cfg: KnnConfig, n_rows: int, dim: int) -> int:
    """How many search tasks :func:`build_knn_graph` runs at once for a small replicated
    flat base on CPUs (each holds the base: at most TASK_MEMORY_BYTES together, at most one
    per CPU); 0 = search with actors."""
    base = n_rows * dim * 4
    if (layout.mode != "replicate" or cfg.index != "flat" or layout.gpus_per_actor
            or cfg.backend == "torch" or base > TASK_BASE_BYTES):
        return 0
    cpus = max(1, int(layout.cpus_per_actor * layout.n_actors))
    return max(1, min(cpus, TASK_MEMORY_BYTES // max(base, 1)))


def _task_bounds(n_rows: int, block_rows: int, slots: int) -> list[int]:
    """Even query blocks, none larger than ``block_rows``: a multiple of the task slots
    (no CPU idle at the end) when there are at least as many blocks as slots, else one per
    slot down to blocks of :data:`MIN_TASK_ROWS` (smaller ones search inefficiently)."""
    n_blocks = -(-n_rows // block_rows)
    if n_blocks >= slots:
        n_blocks = -(-n_blocks // slots) * slots
    else:
        n_blocks = max(n_blocks, min(slots, n_rows // MIN_TASK_ROWS))
    n_blocks = max(1, min(n_rows, n_blocks))
    return [int(b) for b in np.linspace(0, n_rows, n_blocks + 1).round()]


def _build_with_tasks(info: FeatureInfo, cfg: KnnConfig, work_dir: str, layout: KnnLayout,
                      fingerprint: dict, slots: int) -> tuple[KnnManifest, dict]:
    cpus = layout.cpus_per_actor * layout.n_actors
    threads = max(1, int(cpus // slots))
    bounds = _task_bounds(info.n_rows, cfg.block_rows, slots)
    log.info("kNN: %d block(s) searched by %d task(s) at a time x %d thread(s), index=flat, "
             "k=%d", len(bounds) - 1, slots, threads, cfg.k)
    manifest = KnnManifest(directory=work_dir, n_rows=info.n_rows, k=cfg.k,
                           block_rows=cfg.block_rows, source="computed", index=cfg.index,
                           bounds=bounds)

    def submit(b: int):
        start, stop = manifest.block_range(b)
        return _search_block_task.options(num_cpus=cpus / slots).remote(
            info, start, stop, cfg.k, manifest.block_uri(b), threads)

    t0 = time.perf_counter()
    results = _run_bounded(submit, range(manifest.n_blocks), 2 * slots, "kNN blocks")
    search_s = time.perf_counter() - t0
    widened = sum(r["widened"] for r in results)
    manifest.details = {"fingerprint": fingerprint, "mode": "tasks", "n_actors": 0}
    digests = {r["uri"]: tuple(r["digest"]) for r in results}
    digests[join_uri(work_dir, MANIFEST)] = save_manifest(manifest, info.storage_options)
    peak = max(r["peak_rss"] for r in results)
    return manifest, {
        "mode": "tasks", "n_actors": 0, "tasks": len(results), "threads_per_actor": threads,
        "gpus_per_actor": 0.0, "gpu_free_bytes": None, "backend": ["faiss-cpu"],
        "search_seconds": round(search_s, 3), "actor_peak_rss_bytes": 0,
        "worker_peak_rss_bytes": peak, "recall": None, "widened_rows": widened,
        "block_digests": digests,
    }


def knn_graph_keys(cfg: KnnConfig, seed: int, layout: KnnLayout | None = None) -> dict:
    """What a kNN graph depends on besides its features: the one fingerprint of a graph.

    An exact (flat) graph is the same for any layout (partial top-k lists merge exactly),
    so its keys are k and the index only, and ``layout`` may be None. An IVF graph trains
    one index per shard, so its neighbours depend on the shard count, on each shard's
    list count as trained (:func:`ivf_nlist` of its rows, a list), on nprobe and the seed.
    Every replica of a replicated database holds the whole base: one shard."""
    keys: dict = {"k": cfg.k, "index": cfg.index}
    if cfg.index == "flat":
        return keys
    if layout is None:
        raise ValueError("an IVF graph's keys need the resolved layout (plan_knn_layout)")
    ranges = layout.shard_ranges if layout.mode == "shard" else layout.shard_ranges[:1]
    return {**keys, "shards": len(ranges),
            "nlist": [ivf_nlist(stop - start, cfg.nlist) for start, stop in ranges],
            "nprobe": cfg.nprobe, "seed": seed}


def _resolve_layout(n_rows: int, dim: int, cfg: KnnConfig,
                    resources: dict) -> tuple[KnnLayout, int | None]:
    """The layout a build uses, and the GPU memory measured for it (None: not measured)."""
    gpu_free = measure_gpu_free_bytes(resources) if cfg.gpu == "auto" else None
    return plan_knn_layout(n_rows, dim, cfg, resources, gpu_free), gpu_free


def knn_graph_keys_for(info: FeatureInfo, cfg: KnnConfig, resources: dict, seed: int) -> dict:
    """:func:`knn_graph_keys` of the graph :func:`build_knn_graph` would build now, for a
    stage key known before building. The layout is resolved only for IVF (flat keys are
    layout-free), the same way as the build does (with ``knn.gpu=auto`` on a GPU cluster
    that includes measuring a GPU's free memory)."""
    layout = None if cfg.index == "flat" else _resolve_layout(
        info.n_rows, info.dim, cfg, resources)[0]
    return knn_graph_keys(cfg, seed, layout)


def build_knn_graph(
    info: FeatureInfo, cfg: KnnConfig, work_dir: str, resources: dict, seed: int = 0
) -> tuple[KnnManifest, dict]:
    """Compute the exact (or IVF) kNN graph of ``info`` into ``work_dir``.

    Returns the manifest and run statistics (layout, backend, peak RSS, recall). Always
    computes: whether an earlier graph may be reused is the stage store's decision
    (``ltc_ray.pipeline.stages``), which also checks every block file.
    """
    so = info.storage_options
    _drop_manifest(work_dir, so)  # never let an old manifest vouch for new blocks

    layout, gpu_free = _resolve_layout(info.n_rows, info.dim, cfg, resources)
    fingerprint = {"features": info.uri, "version": info.version, "n_rows": info.n_rows,
                   "dim": info.dim, **knn_graph_keys(cfg, seed, layout)}
    slots = task_slots(layout, cfg, info.n_rows, info.dim)
    if slots:
        return _build_with_tasks(info, cfg, work_dir, layout, fingerprint, slots)
    log.info(
        "kNN: %s mode, %d actor(s) x %d thread(s)%s, index=%s, k=%d, block_rows=%d",
        layout.mode, layout.n_actors, layout.threads_per_actor,
        f", {layout.gpus_per_actor:g} GPU each" if layout.gpus_per_actor else "",
        cfg.index, cfg.k, cfg.block_rows,
    )
    actors = [
        KnnShardActor.options(
            num_cpus=layout.cpus_per_actor, num_gpus=layout.gpus_per_actor
        ).remote(info, lo, hi, cfg, layout.threads_per_actor, seed, layout.gpus_per_actor > 0)
        for lo, hi in layout.shard_ranges
    ]
    backends = ray_get([a.backend_name.remote() for a in actors])
    manifest = KnnManifest(
        directory=work_dir, n_rows=info.n_rows, k=cfg.k, block_rows=cfg.block_rows,
        source="computed", index=cfg.index,
    )
    limit = cfg.max_in_flight or 2 * layout.n_actors
    blocks = range(manifest.n_blocks)

    def submit(b: int):
        start, stop = manifest.block_range(b)
        uri = manifest.block_uri(b)
        if layout.mode == "replicate":
            return actors[b % layout.n_actors].search_and_save.remote(b, start, stop, cfg.k, uri)
        queries = _read_queries.remote(info, start, stop)
        partials = [a.search.remote(queries, cfg.k) for a in actors]
        return _merge_and_save.remote(queries, start, cfg.k, info.n_rows, uri, so, *partials)

    t0 = time.perf_counter()
    results = _run_bounded(submit, blocks, limit, "kNN blocks")
    search_s = time.perf_counter() - t0
    recall = None
    if cfg.index != "flat" and cfg.recall_sample > 0:
        searchers = actors[:1] if layout.mode == "replicate" else actors
        recall = _measure_recall(info, manifest, searchers, cfg, seed)
        log.info("kNN: measured recall@%d = %.4f on %d queries", cfg.k, recall,
                 min(cfg.recall_sample, info.n_rows))
    actor_rss = ray_get([a.peak_rss.remote() for a in actors])
    widened = sum(ray_get([a.widened_rows.remote() for a in actors]))
    if widened:
        log.info("kNN: %d query row(s) x shard had near-ties at rank %d and were searched "
                 "with more candidates", widened, cfg.k)
    for a in actors:
        ray.kill(a)
    manifest.recall = recall
    manifest.details = {"fingerprint": fingerprint, "mode": layout.mode,
                        "n_actors": layout.n_actors}
    # the writers' own digests: the stage marker needs no second read of the graph
    digests = {r["uri"]: tuple(r["digest"]) for r in results}
    digests[join_uri(work_dir, MANIFEST)] = save_manifest(manifest, so)
    stats = {
        "mode": layout.mode,
        "n_actors": layout.n_actors,
        "threads_per_actor": layout.threads_per_actor,
        "gpus_per_actor": layout.gpus_per_actor,
        "gpu_free_bytes": gpu_free,
        "backend": sorted(set(backends)),
        "search_seconds": round(search_s, 3),
        "actor_peak_rss_bytes": max(actor_rss),
        "worker_peak_rss_bytes": max([r["peak_rss"] for r in results] + actor_rss),
        "recall": recall,
        "widened_rows": widened,
        "block_digests": digests,
    }
    return manifest, stats


def _drop_manifest(work_dir: str, so: dict | None) -> None:
    """Remove a graph's manifest before its blocks are overwritten, so a crash mid-build
    leaves no manifest that matches a mix of old and new blocks."""
    fs, path = url_to_fs(join_uri(work_dir, MANIFEST), so)
    if fs.exists(path):
        fs.rm(path)


def _run_bounded(submit, items, limit: int, desc: str) -> list:
    """Submit ``submit(item)`` for each item with at most ``limit`` in flight."""
    from tqdm import tqdm

    pending, results = [], []
    items = list(items)
    with tqdm(total=len(items), desc=desc, unit="block", leave=False, disable=None) as bar:
        for item in items:
            if len(pending) >= limit:
                done, pending = ray.wait(pending, num_returns=1)
                results.extend(ray_get(done))
                bar.update(len(done))
            pending.append(submit(item))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.extend(ray_get(done))
            bar.update(len(done))
    return results


def _measure_recall(info, manifest, actors, cfg: KnnConfig, seed: int) -> float:
    """Recall@k of the approximate graph against exact search on a window of queries."""
    n = min(cfg.recall_sample, info.n_rows)
    start = int(np.random.default_rng(seed).integers(0, info.n_rows - n + 1))
    queries = read_features(info, start, start + n)
    q_ref = ray.put(queries)
    partials = ray_get([a.search.remote(q_ref, cfg.k, True) for a in actors])
    exact_ids, _ = merge_topk(partials, cfg.k)
    approx_ids, _ = read_knn_rows(manifest, start, start + n, info.storage_options)
    rows = np.arange(start, start + n)
    exact_ids, _ = put_self_first(rows, exact_ids, np.zeros(exact_ids.shape, np.float32),
                                  np.ones(n))
    return recall_at_k(approx_ids.astype(np.int64), exact_ids)


@ray.remote(num_cpus=1)
def _import_ltc(uri: str, n_rows: int, k: int, work_dir: str, block_rows: int,
                storage_options: dict | None) -> dict:
    """Convert the npz into block files: each row's neighbours sorted by similarity
    (descending, ties by lower id, empty slots last) BEFORE keeping the top ``k``, so a
    file whose columns are not sorted gives the same graph as a sorted one; then self at
    rank 0 (inserted, dropping the last neighbour, where the row lacks it). Content errors
    (ids, distances; see :func:`iter_ltc_knn`) are InputErrors naming the file and row."""
    manifest = KnnManifest(directory=work_dir, n_rows=n_rows, k=k, block_rows=block_rows,
                           source="imported")
    rows, digests = 0, {}
    for start, ids, sims in iter_ltc_knn(uri, block_rows, storage_options):
        ids, sims = merge_topk([(ids.astype(np.int64), sims)], k)
        node = np.arange(start, start + len(ids), dtype=np.int64)
        ids, sims = put_self_first(node, ids, sims, np.ones(len(ids)))
        block_uri = manifest.block_uri(start // block_rows)
        digests[block_uri] = save_knn_block(block_uri, ids.astype(id_dtype_for(n_rows)), sims,
                                            start, storage_options)
        rows += len(ids)
    return {"rows": rows, "peak_rss": peak_rss_bytes(), "digests": digests}


def import_ltc_knn(
    uri: str, info: FeatureInfo, cfg: KnnConfig, work_dir: str
) -> tuple[KnnManifest, dict]:
    """Convert a learn-to-cluster ``faiss_k_<k>.npz`` into the run's block files
    (streamed in a worker; the driver reads only the npz header)."""
    so = info.storage_options
    n, k_file = inspect_ltc_knn(uri, so)
    if n != info.n_rows:
        raise InputError(uri, f"kNN file has {n} rows but the features have {info.n_rows}")
    if k_file < cfg.k:
        raise InputError(
            uri, f"kNN file has k={k_file} neighbours, config asks for knn.k={cfg.k} "
            f"(set knn.k={k_file} or knn.reuse=false)",
        )
    fingerprint = {"imported": uri, "version": uri_version(uri, so), "n_rows": n, "k": cfg.k}
    _drop_manifest(work_dir, so)  # reuse is the stage store's decision, as for a build
    log.info("kNN: importing precomputed %s (k=%d, using %d)", uri, k_file, cfg.k)
    result = ray_get(_import_ltc.remote(uri, n, cfg.k, work_dir, cfg.block_rows, so))
    manifest = KnnManifest(directory=work_dir, n_rows=n, k=cfg.k, block_rows=cfg.block_rows,
                           source="imported", details={"fingerprint": fingerprint})
    digests = {block: tuple(digest) for block, digest in result["digests"].items()}
    digests[join_uri(work_dir, MANIFEST)] = save_manifest(manifest, so)
    return manifest, {"imported_from": uri, "worker_peak_rss_bytes": result["peak_rss"],
                      "block_digests": digests}


__all__ = [
    "build_knn_graph",
    "import_ltc_knn",
    "knn_graph_keys",
    "knn_graph_keys_for",
    "measure_gpu_free_bytes",
    "plan_knn_layout",
]
