"""Side-by-side benchmark harness: our pipeline stages against single-process references.

    python benchmarks/run.py --suite cpu-quick --json OUT.json [--rates ltc_ray/data/rates.json]

Every measurement runs in a fresh subprocess (``ours`` and ``reference`` alternating,
ABAB, median of the repeats), so each side's peak RSS is its own: the child reports its
``VmHWM`` (``ru_maxrss`` would include the harness' pages from before the exec; ``os.wait4``'s
figure is kept as ``rss_wait4``); Ray workers (kNN shard actors, GCN-V partition actors)
report theirs the same way. Cases:

- ``knn``: our Ray-sharded ``build_knn_graph`` (shard mode, exact re-scoring, block files)
  vs one-process faiss ``IndexFlatIP`` (same k, same machine); agreement = share of equal ids.
- ``merge``: partitioned link edges (kNN edges with cosine >= 0.7) reduced to star forests
  per partition and merged (``ltc_ray.cluster.components``) vs scipy ``connected_components``
  over all those edges at once; the two labelings must be the same partition.
- ``metrics``: ``ltc_ray.metrics.evaluate`` vs the brute-force contingency metrics of
  ``benchmarks/bench_metrics.py`` (must agree to 1e-9).
- ``gcn-v``: partitioned GCN-V inference on halo actors vs whole-graph inference in one
  process (random-weight model; scores must agree to 1e-5).

It also checks the memory model (``ltc_ray.pipeline.plan`` and the methods' own
``cluster/gcn_v/plan.py``, ``cluster/hard_clusters/plan.py``) against the measured peaks
(flag: more than 25% off) and can write the measured rates for ``cluster --dry-run``
(``--rates ltc_ray/data/rates.json``: package data, so an installed ltc-ray plans with them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# the rates record the planner ships as package data (ltc_ray.plan_model.load_rates)
RATES_FILE = REPO / "ltc_ray" / "data" / "rates.json"
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
MERGE_THRESHOLD = 0.7
TOLERANCE = 0.25  # memory model: flag predictions off by more than this

SUITES = {
    # test-only: seconds, one repeat, no Ray-heavy GCN-V case
    "smoke": {
        "sizes": [0.002],
        "k": 20,
        "repeats": 1,
        "metrics_n": 20_000,
        "cases": ["knn", "merge", "metrics"],
        "extra_cases": ["hard-clusters"],  # only with --cases (its actors take ~20 s)
        "cpus": 2,
        "hidden": 64,
    },
    # <= 10 min on 2 shared cores
    "cpu-quick": {
        "sizes": [0.03],
        "k": 80,
        "repeats": 3,
        "metrics_n": 1_000_000,
        "cases": ["knn", "merge", "metrics", "gcn-v"],
        "cpus": 2,
        "hidden": 512,
    },
    # the scaling curve (about an hour on 2 cores): log-log slope per case across sizes
    "cpu-scale": {
        "sizes": [0.05, 0.1, 0.2, 0.4],
        "k": 80,
        "repeats": 3,
        "metrics_n": 5_206_761,
        "metrics_scaled": True,  # metrics at 5.21M x size / largest size: a slope too
        "cases": ["knn", "merge", "metrics", "gcn-v", "hard-clusters"],
        "cpus": 2,
        "hidden": 512,
    },
}


# ================================================================ children (one measurement)
def _child_main(case: str, side: str, params: dict) -> dict:
    os.environ.update(ENV)
    fn = CHILDREN[(case, side)]
    return fn(params)


def _vm_hwm() -> int:
    """Peak RSS of this process image (VmHWM; read here without importing anything)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _child_baseline(p: dict) -> dict:
    mods = p["imports"]
    for m in mods:
        __import__(m)
    return {"seconds": 0.0}


def _ray_start(cpus: int):
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return ray


def _worker_baseline(ray, with_torch: bool = True) -> int:
    """Peak RSS of a fresh Ray worker that imported what our actors import: a kNN actor
    faiss and the kNN stage only (``with_torch`` False), a model actor torch as well."""

    @ray.remote(num_cpus=0)
    class Probe:
        def rss(self, with_torch: bool) -> int:
            import faiss  # noqa: F401

            import ltc_ray.pipeline.knn_stage  # noqa: F401
            from ltc_ray.runtime import peak_rss_bytes

            if with_torch:
                import torch  # noqa: F401

                import ltc_ray.pipeline.halo  # noqa: F401
            return peak_rss_bytes()

    probe = Probe.remote()
    rss = ray.get(probe.rss.remote(with_torch))
    ray.kill(probe)
    return rss


def _knn_ours(p: dict) -> dict:
    import ltc_ray.pipeline.job  # noqa: F401 - what a job driver imports (its baseline)
    from ltc_ray.config import KnnConfig
    from ltc_ray.io.features import inspect_features
    from ltc_ray.pipeline.knn_stage import build_knn_graph

    ray = _ray_start(p["cpus"])
    worker_base = _worker_baseline(ray)  # a model actor (GCN-V, edge scorer): torch too
    knn_worker_base = _worker_baseline(ray, with_torch=False)  # a kNN actor loads no torch
    driver_base = _vm_hwm()  # imports + a started Ray, before any work
    info = inspect_features(p["features"])
    shutil.rmtree(p["work_dir"], ignore_errors=True)  # a complete graph would be reused
    cfg = KnnConfig(k=p["k"], mode="shard", shards=p["cpus"], index=p.get("index", "flat"))
    t0 = time.perf_counter()
    manifest, stats = build_knn_graph(info, cfg, p["work_dir"], dict(ray.cluster_resources()))
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return {
        "seconds": seconds,
        "worker_rss": stats["actor_peak_rss_bytes"],
        "task_rss": stats["worker_peak_rss_bytes"],
        "worker_baseline": worker_base,
        "knn_worker_baseline": knn_worker_base,
        "driver_baseline": driver_base,
        "shards": stats["n_actors"],
        "rows_per_shard": -(-info.n_rows // stats["n_actors"]),
        "block_rows": cfg.block_rows,
    }


def _knn_ref(p: dict) -> dict:
    import faiss

    from ltc_ray.graph.knn_graph import load_manifest, read_knn_rows
    from ltc_ray.io.features import inspect_features, read_features

    faiss.omp_set_num_threads(p["cpus"])
    info = inspect_features(p["features"])
    t0 = time.perf_counter()
    x = read_features(info, 0, info.n_rows)
    index = faiss.IndexFlatIP(info.dim)
    index.add(x)
    _, ids = index.search(x, p["k"])
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds}
    manifest = load_manifest(p["work_dir"])  # ours, from the run just before
    if manifest is not None:
        ours, _ = read_knn_rows(manifest, 0, info.n_rows)
        # same set of neighbours per row (order among exact ties may differ)
        same = [len(np.intersect1d(a, b)) for a, b in zip(ours, ids, strict=True)]
        out["agreement"] = float(np.sum(same) / ids.size)
    return out


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings of the same nodes name the same clusters (a bijection of ids)."""
    pairs = np.unique(np.stack([a, b]), axis=1).shape[1]
    return bool(pairs == len(np.unique(a)) == len(np.unique(b)))


def _link_edges(ids: np.ndarray, sims: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    src = np.repeat(np.arange(start, start + len(ids), dtype=np.int64), ids.shape[1])
    dst = ids.reshape(-1).astype(np.int64)
    keep = (sims.reshape(-1) >= MERGE_THRESHOLD) & (dst >= 0) & (dst != src)
    return src[keep], dst[keep]


def _merge_ours(p: dict) -> dict:
    from ltc_ray.cluster.components import merge_edges, spanning_forest
    from ltc_ray.graph.knn_graph import load_manifest, read_knn_rows

    manifest = load_manifest(p["work_dir"])
    n = manifest.n_rows
    bounds = np.linspace(0, n, p["partitions"] + 1).round().astype(int)
    t0 = time.perf_counter()
    forests, n_edges = [], 0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):  # what the link tasks do
        ids, sims = read_knn_rows(manifest, int(lo), int(hi))
        src, dst = _link_edges(ids, sims, int(lo))
        n_edges += len(src)
        forests.append(spanning_forest(src, dst))
        del ids, sims, src, dst
    cluster_id, sizes, _ = merge_edges(n, forests)
    seconds = time.perf_counter() - t0
    np.save(p["out"] + ".npy", cluster_id)
    return {
        "seconds": seconds,
        "edges": n_edges,
        "forest_edges": int(sum(len(f[0]) for f in forests)),
        "clusters": len(sizes),
        "rows_per_partition": int(np.max(np.diff(bounds))),
    }


def _merge_ref(p: dict) -> dict:
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    from ltc_ray.graph.knn_graph import load_manifest, read_knn_rows

    manifest = load_manifest(p["work_dir"])
    n = manifest.n_rows
    t0 = time.perf_counter()
    ids, sims = read_knn_rows(manifest, 0, n)
    src, dst = _link_edges(ids, sims, 0)
    graph = sp.coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n)).tocsr()
    n_comp, labels = connected_components(graph, directed=True, connection="weak")
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "clusters": int(n_comp)}
    if os.path.exists(p["out"] + ".npy"):  # ours, from the run just before
        out["same_partition"] = _same_partition(np.load(p["out"] + ".npy"), labels)
    return out


def _metrics_labels(p: dict):
    sys.path.insert(0, str(HERE))
    from bench_metrics import make_labels

    return make_labels(p["metrics_n"], max(2, p["metrics_n"] // 70), 0, False)


def _metrics_ours(p: dict) -> dict:
    from ltc_ray.metrics import evaluate

    true, pred = _metrics_labels(p)
    t0 = time.perf_counter()
    scores = evaluate(true, pred)
    seconds = time.perf_counter() - t0
    Path(p["out"]).write_text(json.dumps(scores))
    return {"seconds": seconds}


def _metrics_ref(p: dict) -> dict:
    from bench_metrics import ref_bcubed, ref_nmi, ref_pairwise

    true, pred = _metrics_labels(p)
    t0 = time.perf_counter()
    pw, bc, nm = ref_pairwise(true, pred), ref_bcubed(true, pred), ref_nmi(true, pred)
    seconds = time.perf_counter() - t0
    ours = json.loads(Path(p["out"]).read_text())
    mine = [
        ours["pairwise_precision"],
        ours["pairwise_recall"],
        ours["pairwise_f"],
        ours["bcubed_precision"],
        ours["bcubed_recall"],
        ours["bcubed_f"],
        ours["nmi"],
    ]
    diff = float(np.max(np.abs(np.array(mine) - np.array([*pw, *bc, nm]))))
    return {"seconds": seconds, "max_abs_diff": diff}


def _gcn_method(p: dict):
    from ltc_ray.cluster import get_method
    from ltc_ray.config import Config, KnnConfig

    cfg = Config(method="gcn-v", knn=KnnConfig(k=p["k"]))
    cfg.methods.gcn_v.model = p["model"]
    return get_method("gcn-v", cfg)


def _even_ranges(n: int, parts: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``parts`` contiguous row ranges of ``n`` rows: (bounds, [(lo, hi), ...])."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return bounds, [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _gcn_ours(p: dict) -> dict:
    from ltc_ray.graph.knn_graph import load_manifest
    from ltc_ray.io.features import inspect_features
    from ltc_ray.pipeline.cluster_stage import score_stage
    from ltc_ray.runtime import StageLog, ray_get

    ray = _ray_start(p["cpus"])
    info = inspect_features(p["features"])
    manifest = load_manifest(p["work_dir"])
    method = _gcn_method(p)
    bounds, ranges = _even_ranges(info.n_rows, p["partitions"])
    log = StageLog()
    t0 = time.perf_counter()
    scores, _, _ = score_stage(method, manifest, ranges, float(p["cpus"]), None, log,
                               info=info)
    scores = np.concatenate(ray_get(scores))
    seconds = time.perf_counter() - t0
    extra = log.stages["score"].extra
    ray.shutdown()
    np.save(p["out"] + ".npy", scores)
    return {
        "seconds": seconds,
        "worker_rss": max(extra["actor_peak_rss_bytes"]),
        "halo_rows": extra["halo_rows"],
        "partitions": len(ranges),
        "rows_per_partition": int(np.max(np.diff(bounds))),
    }


def _gcn_ref(p: dict) -> dict:
    from ltc_ray.graph.adjacency import whole_graph_adjacency
    from ltc_ray.graph.knn_graph import load_manifest, read_knn_rows
    from ltc_ray.io.features import inspect_features, read_features
    from ltc_ray.models.gcn_v import aggregate, predict

    info = inspect_features(p["features"])
    manifest = load_manifest(p["work_dir"])
    method = _gcn_method(p)
    t0 = time.perf_counter()
    x = read_features(info, 0, info.n_rows)
    knn_ids, knn_sims = read_knn_rows(manifest, 0, info.n_rows)
    adj = whole_graph_adjacency(knn_ids, knn_sims)
    whole, _ = predict(method.inference.net(), x, aggregate(adj, x))
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds}
    if os.path.exists(p["out"] + ".npy"):
        out["max_abs_diff"] = float(np.max(np.abs(np.load(p["out"] + ".npy") - whole)))
    return out


def _hc_method(p: dict):
    from ltc_ray.cluster import get_method
    from ltc_ray.config import Config, KnnConfig

    cfg = Config(method="hard-clusters", knn=KnnConfig(k=p["k"]))
    cfg.methods.hard_clusters.model = p["hc_model"]
    return get_method("hard-clusters", cfg), cfg


def _hc_ours(p: dict) -> dict:
    """The job's score (edge scorer + NDDE on edge actors), link (TPDi on link actors) and
    merge stages over the prepared graph; the stage times give per-stage slopes."""
    from ltc_ray.cluster.hard_clusters.rescore import rescore_and_density
    from ltc_ray.graph.knn_graph import load_manifest
    from ltc_ray.io.features import inspect_features
    from ltc_ray.pipeline.cluster_stage import link_merge_stage
    from ltc_ray.runtime import StageLog, ray_get

    ray = _ray_start(p["cpus"])
    info = inspect_features(p["features"])
    manifest = load_manifest(p["work_dir"])
    method, cfg = _hc_method(p)
    bounds, ranges = _even_ranges(info.n_rows, p["partitions"])
    out_dir = p["out"] + ".rescored"
    shutil.rmtree(out_dir, ignore_errors=True)
    log = StageLog()
    t0 = time.perf_counter()
    with log.stage("score", rows=info.n_rows):
        scores, graph, stats = rescore_and_density(method, info, manifest, ranges,
                                                   float(p["cpus"]), out_dir)
    refs = link_merge_stage(method, graph, ranges, scores, cfg.cluster, None, log,
                            cpus=float(p["cpus"]), features=info)
    cluster_id = ray_get(refs.cluster_id)
    seconds = time.perf_counter() - t0
    link_rss = log.stages["link"].worker_peak_rss_bytes
    ray.shutdown()
    np.save(p["out"] + ".npy", cluster_id)
    return {
        "seconds": seconds,
        "stages_s": {name: log.stages[name].seconds for name in ("score", "link", "merge")},
        "worker_rss": max(*stats["actor_peak_rss_bytes"], link_rss),
        "edge_actor_rss": max(stats["actor_peak_rss_bytes"]),
        "link_actor_rss": link_rss,
        "halo_rows": stats["halo_rows"],
        "link_halo_rows": log.stages["link"].extra["halo_rows"],
        "rows_per_partition": int(np.max(np.diff(bounds))),
        "partitions": len(ranges),
        "clusters": refs.n_clusters,
    }


def _hc_ref(p: dict) -> dict:
    """The reference's shape: the whole graph in one process (score every row, NDDE,
    TPDi, link, connected components)."""
    import torch

    from ltc_ray.cluster.base import PartitionInput
    from ltc_ray.cluster.components import merge_edges
    from ltc_ray.cluster.hard_clusters import ndde_density
    from ltc_ray.graph.knn_graph import load_manifest, read_knn_rows
    from ltc_ray.io.features import inspect_features, read_features

    torch.set_num_threads(p["cpus"])
    info = inspect_features(p["features"])
    manifest = load_manifest(p["work_dir"])
    method, _ = _hc_method(p)
    t0 = time.perf_counter()
    x = read_features(info, 0, info.n_rows)
    knn_ids, _ = read_knn_rows(manifest, 0, info.n_rows)
    ids, prob = method.rescore_rows(knn_ids.astype(np.int64), lambda q: x[q], "cpu")
    density, _ = ndde_density(ids, prob, method.params.density_k, method.params.density_sigma)
    link = method.link_whole(PartitionInput(0, len(ids), ids, prob), density.astype(np.float32))
    cluster_id, sizes, _ = merge_edges(len(ids), [(link.src, link.dst)])
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "clusters": len(sizes)}
    if os.path.exists(p["out"] + ".npy"):  # ours, from the run just before
        out["same_partition"] = _same_partition(np.load(p["out"] + ".npy"), cluster_id)
    return out


CHILDREN = {
    ("baseline", "ours"): _child_baseline,
    ("knn", "ours"): _knn_ours,
    ("knn", "reference"): _knn_ref,
    ("merge", "ours"): _merge_ours,
    ("merge", "reference"): _merge_ref,
    ("metrics", "ours"): _metrics_ours,
    ("metrics", "reference"): _metrics_ref,
    ("gcn-v", "ours"): _gcn_ours,
    ("gcn-v", "reference"): _gcn_ref,
    ("hard-clusters", "ours"): _hc_ours,
    ("hard-clusters", "reference"): _hc_ref,
}


# ================================================================ parent
def run_child(case: str, side: str, params: dict, timeout: float = 1800) -> dict:
    """One measurement in a fresh interpreter; its result carries ``rss``, the child's peak."""
    env = {
        **os.environ,
        **ENV,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as fh:
        out_path = fh.name
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        case,
        "--side",
        side,
        "--params",
        json.dumps(params),
        "--child-out",
        out_path,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{case}/{side} timed out after {timeout} s")
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{case}/{side} failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(Path(out_path).read_text())
    os.unlink(out_path)
    # wait4's ru_maxrss also counts the forked parent's pages before exec; the child's own
    # VmHWM ("rss") does not, so it is the figure used, this one only kept for reference
    result["rss_wait4"] = int(usage.ru_maxrss) * 1024
    return result


def _median(values):
    return statistics.median(values)


def measure(case: str, params: dict, repeats: int) -> dict:
    """ABAB: ours then reference, ``repeats`` times; medians of seconds and peak RSS."""
    runs = {"ours": [], "reference": []}
    for _ in range(repeats):
        for side in ("ours", "reference"):
            runs[side].append(run_child(case, side, params))
    ours_s = _median([r["seconds"] for r in runs["ours"]])
    ref_s = _median([r["seconds"] for r in runs["reference"]])
    # ours' peak RSS: the largest single process (driver, or a Ray worker when it reports)
    ours_rss = _median([max(r["rss"], r.get("worker_rss", 0)) for r in runs["ours"]])
    return {
        "ours_s": ours_s,
        "reference_s": ref_s,
        "ratio": ref_s / ours_s,
        "ours_peak_rss_bytes": int(ours_rss),
        "reference_peak_rss_bytes": int(_median([r["rss"] for r in runs["reference"]])),
        "ours_runs_s": [r["seconds"] for r in runs["ours"]],
        "reference_runs_s": [r["seconds"] for r in runs["reference"]],
        "ours_detail": runs["ours"][-1],
        "ours_all": [
            {key: r[key] for key in ("seconds", "stages_s") if key in r} for r in runs["ours"]
        ],
        "reference_detail": runs["reference"][-1],
    }


def memory_checks(entry: dict, n: int, dim: int, k: int, hidden: int, base: dict) -> list[dict]:
    """Predicted (memory model) vs measured peak RSS for the processes this case ran."""
    from ltc_ray.cluster.gcn_v.plan import inference_actor_memory
    from ltc_ray.cluster.hard_clusters.plan import edge_actor_memory, link_actor_memory
    from ltc_ray.pipeline.plan import driver_memory, knn_actor_memory, merge_memory

    d = entry["ours_detail"]
    out = []

    def check(stage, est, measured):
        off = measured / est.total - 1
        out.append(
            {
                "stage": stage,
                "predicted_bytes": est.total,
                "measured_bytes": int(measured),
                "off": round(off, 3),
                "flag": abs(off) > TOLERANCE,
                "model": est.to_dict(),
            }
        )

    if entry["name"] == "knn":
        wb = d["knn_worker_baseline"]
        check(
            "knn_actor",
            knn_actor_memory(d["rows_per_shard"], dim, k, d["block_rows"], wb, n_rows=n),
            d["worker_rss"],
        )
        check("driver", driver_memory(n, d["driver_baseline"]), d["rss"])
    elif entry["name"] == "gcn-v":
        n_part = d["rows_per_partition"]
        halo = d["halo_rows"] // d["partitions"]
        check(
            "inference_actor",
            inference_actor_memory(n_part, halo, dim, k, base["worker"], hidden),
            d["worker_rss"],
        )
    elif entry["name"] == "hard-clusters":
        n_part, parts = d["rows_per_partition"], d["partitions"]
        check(
            "edge_actor",
            edge_actor_memory(n_part, d["halo_rows"] // parts, dim, k, base["worker"]),
            d["edge_actor_rss"],
        )
        check(
            "link_actor",
            link_actor_memory(n_part, d["link_halo_rows"] // parts, n, k, base["worker"]),
            d["link_actor_rss"],
        )
    elif entry["name"] == "merge":
        est = merge_memory(n, d["forest_edges"], base["light"])
        # the same process also ran the link step, one partition at a time
        n_p = d["rows_per_partition"]
        est.terms["link partition (rows + edges)"] = n_p * k * 8 + n_p * (k - 1) * 16 * 2
        check("merge", est, d["rss"])
    return out


def run_suite(
    name: str,
    json_out: str | None,
    rates_out: str | None = None,
    work: str | None = None,
    repeats: int | None = None,
    cases: list[str] | None = None,
    graph_index: str = "flat",
    sizes: list[float] | None = None,
) -> dict:
    """Run suite ``name``. ``cases`` limits it to some of its cases; without the kNN case
    the graph the others need is built once per size, untimed, with ``graph_index``
    (``ivf`` makes the large sizes affordable on a few cores: exact kNN is quadratic)."""
    os.environ.update(ENV)
    from ltc_ray.synthetic import make_benchmark

    suite = dict(SUITES[name])
    if cases:
        allowed = suite["cases"] + suite.get("extra_cases", [])
        unknown = sorted(set(cases) - set(allowed))
        if unknown:
            raise SystemExit(f"--cases: {unknown} not in suite {name} ({allowed})")
        suite["cases"] = [c for c in allowed if c in cases]
    if sizes:
        suite["sizes"] = sizes
    repeats = repeats or suite["repeats"]
    k, cpus, hidden = suite["k"], suite["cpus"], suite["hidden"]
    load_before = os.getloadavg()
    tmp = Path(work or tempfile.mkdtemp(prefix=f"ltc-bench-{name}-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    base = {
        "light": _median(
            [
                run_child(
                    "baseline",
                    "ours",
                    {
                        "imports": [
                            "numpy",
                            "scipy.sparse.csgraph",
                            "ltc_ray.cluster.components",
                            "ltc_ray.graph.knn_graph",
                        ]
                    },
                )["rss"]
                for _ in range(2)
            ]
        )
    }
    entries, checks, worker_bases, driver_bases, knn_bases = [], [], [], [], []
    for scale in suite["sizes"]:
        root = tmp / f"data-{scale}"
        info = make_benchmark(str(root), parts=(1,), scale=scale, seed=0, progress=False)
        part = info["part1_test"]
        n, dim = part["n_samples"], 256
        model = tmp / f"model-{scale}"
        if "gcn-v" in suite["cases"] and not model.exists():
            import torch

            from ltc_ray.models.gcn_v import GCNV
            from ltc_ray.models.store import save_model

            torch.manual_seed(0)
            save_model(str(model), GCNV(dim, hidden), {"k": k, "thresholds": {"tau": 0.6}})
        hc_model = tmp / "model-hard-clusters"
        if "hard-clusters" in suite["cases"] and not hc_model.exists():
            import torch

            from ltc_ray.models.edge_scorer import EdgeScorer, ScorerShape
            from ltc_ray.models.store import save_edge_scorer

            # untrained weights: the cost per row does not depend on them; tau 0.7 is the
            # paper's default (about half the nodes link with these weights)
            torch.manual_seed(0)
            save_edge_scorer(str(hc_model), EdgeScorer(ScorerShape(in_dim=dim, k=k)),
                             {"thresholds": {"tau": 0.7}})
        common = {
            "features": part["features"],
            "k": k,
            "cpus": cpus,
            "work_dir": str(tmp / f"knn-{scale}"),
            "model": str(model),
            "hc_model": str(hc_model),
        }
        graph_cases = {"merge", "gcn-v", "hard-clusters"}
        if "knn" not in suite["cases"] and graph_cases & set(suite["cases"]):
            prep = run_child("knn", "ours", {**common, "index": graph_index})  # not timed
            worker_bases.append(prep["worker_baseline"])
            driver_bases.append(prep["driver_baseline"])
            knn_bases.append(prep["knn_worker_baseline"])
            base["worker"] = int(_median(worker_bases))
            base["driver"] = int(_median(driver_bases))
            base["knn_worker"] = int(_median(knn_bases))
            print(f"  graph for N={n:,} ({graph_index}, untimed): {prep['seconds']:.1f} s",
                  file=sys.stderr)
        for case in suite["cases"]:
            params = {
                **common,
                "out": str(tmp / f"{case}-{scale}.out"),
                "partitions": 4 if case == "merge" else cpus,
                "metrics_n": suite["metrics_n"],
            }
            if case == "knn":  # the kNN case leaves its graph for merge and gcn-v
                params["work_dir"] = common["work_dir"]
            size = n
            if case == "metrics":
                size = suite["metrics_n"]
                if suite.get("metrics_scaled"):
                    size = round(size * scale / max(suite["sizes"]))
                params["metrics_n"] = size
            entry = {
                "name": case,
                "N": size,
                "scale": scale,
                "repeats": repeats,
                **measure(case, params, repeats),
            }
            if case == "knn":
                worker_bases.append(entry["ours_detail"]["worker_baseline"])
                driver_bases.append(entry["ours_detail"]["driver_baseline"])
                knn_bases.append(entry["ours_detail"]["knn_worker_baseline"])
            if worker_bases:
                base["worker"] = int(_median(worker_bases))
                base["driver"] = int(_median(driver_bases))
                base["knn_worker"] = int(_median(knn_bases))
            entry["memory_checks"] = memory_checks(entry, size, dim, k, hidden, base)
            checks += entry["memory_checks"]
            entries.append(entry)
            print(
                f"  {case} N={size:,}: ours {entry['ours_s']:.2f} s, reference "
                f"{entry['reference_s']:.2f} s, ratio {entry['ratio']:.2f}",
                file=sys.stderr,
            )

    result = {
        "suite": name,
        "machine": _machine(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "k": k,
        "cpus": cpus,
        "dim": 256,
        "baseline_rss_bytes": {key: int(v) for key, v in base.items()},
        "entries": entries,
        "memory_checks": checks,
        "slopes": _slopes(entries) if len(suite["sizes"]) > 1 else {},
        "stage_slopes": _stage_slopes(entries) if len(suite["sizes"]) > 1 else {},
        "slopes_top": ({**_slopes(entries, True), **_stage_slopes(entries, True)}
                       if len(suite["sizes"]) > 1 else {}),
        "graph_index": graph_index if "knn" not in suite["cases"] else "flat",
    }
    print(markdown_table(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    if rates_out:
        record = rates_record(result)
        if Path(rates_out).exists():  # rates measured from jobs' run.json are kept
            previous = json.loads(Path(rates_out).read_text())
            if "from_jobs" in previous:
                record["from_jobs"] = previous["from_jobs"]
        Path(rates_out).write_text(json.dumps(record, indent=2) + "\n")
    return result


def _machine() -> dict:
    return {
        "description": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


def _fit(pts: list[tuple[float, float]], top: bool) -> float:
    """log-log slope through ``pts`` (N, seconds); ``top``: between the two largest N only,
    where fixed costs (actor start-up, task launch) weigh least."""
    pts = sorted(pts)[-2:] if top else pts
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def _slopes(entries: list[dict], top: bool = False) -> dict:
    """log-log slope of ours_s against N per case (1.0 = linear)."""
    out = {}
    for case in sorted({e["name"] for e in entries}):
        pts = [(e["N"], e["ours_s"]) for e in entries if e["name"] == case]
        if len({x for x, _ in pts}) > 1:
            out[case] = _fit(pts, top)
    return out


def _stage_slopes(entries: list[dict], top: bool = False) -> dict:
    """log-log slope per pipeline stage, for cases whose runs report stage times."""
    out = {}
    for case in sorted({e["name"] for e in entries}):
        runs = [e for e in entries if e["name"] == case and "stages_s" in e["ours_detail"]]
        if len(runs) < 2:
            continue
        for stage in runs[0]["ours_detail"]["stages_s"]:
            # the median over repeats of each stage's time
            pts = [(e["N"], _median([r["stages_s"][stage] for r in e["ours_all"]]))
                   for e in runs]
            out[f"{case}/{stage}"] = _fit(pts, top)
    return out


def rates_record(result: dict) -> dict:
    """Rates the dry-run plans with (largest size of each case)."""
    by = {}
    for e in result["entries"]:
        if e["name"] not in by or e["N"] > by[e["name"]]["N"]:
            by[e["name"]] = e
    cpus, dim = result["cpus"], result["dim"]
    rates = {}
    if "knn" in by:
        n = by["knn"]["N"]
        rates["knn_flat_flops_per_cpu_s"] = 2.0 * n * n * dim / (by["knn"]["ours_s"] * cpus)
    if "gcn-v" in by:
        rates["gcn_v_rows_per_cpu_s"] = by["gcn-v"]["N"] / (by["gcn-v"]["ours_s"] * cpus)
    if "merge" in by:
        rates["merge_rows_per_s"] = by["merge"]["N"] / by["merge"]["ours_s"]
    if "metrics" in by:
        rates["metrics_rows_per_s"] = by["metrics"]["N"] / by["metrics"]["ours_s"]
    machine = dict(result["machine"])
    machine["loadavg"] = result["loadavg_before"]
    return {
        "suite": result["suite"],
        "machine": machine,
        "baseline_rss_bytes": {
            "driver": result["baseline_rss_bytes"]["driver"],
            "worker": result["baseline_rss_bytes"]["worker"],
            "knn_worker": result["baseline_rss_bytes"]["knn_worker"],
        },
        "rates": rates,
        # not measured here (no GPU at hand): documented assumptions for GPU plans
        "assumed": {
            "gpu_flat_flops_per_gpu_s": 4.0e14,  # ~50% of an H100's dense bf16 peak
            "gpu_ivf_flops_per_gpu_s": 1.0e13,  # IVF-flat list scans are memory-bound
            "ivf_cpu_penalty": 2.0,  # CPU IVF scan rate = measured flat rate / 2
            "note": "GPU rates are assumptions, not measurements (issue 6 item 3)",
        },
    }


def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def markdown_table(result: dict) -> str:
    la = result["loadavg_before"]
    lines = [
        f"suite `{result['suite']}` on {result['machine']['description']}, "
        f"load average {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} at start; "
        f"k={result['k']}, {result['cpus']} CPUs; medians of "
        f"{result['entries'][0]['repeats'] if result['entries'] else 0} (ABAB)",
        "",
        "| case | N | ours s | reference s | ratio ref/ours | ours peak RSS MiB "
        "| reference peak RSS MiB | check |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in result["entries"]:
        rd = e["reference_detail"]
        check = ", ".join(
            f"{key}={rd[key]:.3g}" if isinstance(rd[key], float) else f"{key}={rd[key]}"
            for key in ("agreement", "same_partition", "max_abs_diff")
            if key in rd
        )
        lines.append(
            f"| {e['name']} | {e['N']:,} | {e['ours_s']:.2f} | {e['reference_s']:.2f} "
            f"| {e['ratio']:.2f} | {_mb(e['ours_peak_rss_bytes'])} "
            f"| {_mb(e['reference_peak_rss_bytes'])} | {check} |"
        )
    if result["memory_checks"]:
        lines += [
            "",
            "| memory model | predicted MiB | measured MiB | off | flag |",
            "|---|---:|---:|---:|---|",
        ]
        for c in result["memory_checks"]:
            lines.append(
                f"| {c['stage']} | {_mb(c['predicted_bytes'])} "
                f"| {_mb(c['measured_bytes'])} | {100 * c['off']:+.0f}% "
                f"| {'> 25% off' if c['flag'] else 'ok'} |"
            )
    if result.get("slopes"):
        lines += [
            "",
            "log-log slopes: " + ", ".join(f"{k} {v:.2f}" for k, v in result["slopes"].items()),
        ]
    if result.get("stage_slopes"):
        lines += [
            "",
            "log-log slopes per stage: "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["stage_slopes"].items()),
        ]
    if result.get("slopes_top"):
        lines += [
            "",
            "between the two largest sizes: "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["slopes_top"].items()),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES))
    ap.add_argument("--json", metavar="OUT", help="write the results here")
    ap.add_argument("--rates", metavar="OUT", help="write the measured rates (the ones "
                    f"cluster --dry-run plans with: {RATES_FILE.relative_to(REPO)})")
    ap.add_argument("--work", help="scratch directory (default: a new temp dir)")
    ap.add_argument("--repeats", type=int, help="override the suite's repeat count")
    ap.add_argument("--cases", help="comma-separated subset of the suite's cases")
    ap.add_argument("--sizes", help="comma-separated dataset scales instead of the suite's "
                    "(fractions of the 584K-row part1), e.g. 0.01,0.02")
    ap.add_argument("--graph-index", choices=("flat", "ivf"), default="flat",
                    help="without the knn case: index of the (untimed) graph the others use")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        result = _child_main(args.child, args.side, json.loads(args.params))
        result["rss"] = _vm_hwm()  # this image's own peak, see run_child
        Path(args.child_out).write_text(json.dumps(result))
        return 0
    if not args.suite:
        ap.error("--suite is required")
    run_suite(args.suite, args.json, args.rates, args.work, args.repeats,
              args.cases.split(",") if args.cases else None, args.graph_index,
              [float(v) for v in args.sizes.split(",")] if args.sizes else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
