"""One prepared GPU check: the torch kNN backend, faiss-gpu, exactness and model inference.

    python benchmarks/gpu_check.py [--json gpu_check.json] [--budget-s 420]
    python benchmarks/gpu_check.py --device cpu --sizes 20000   # smoke test, no GPU

Measures, on synthetic unit-norm rows clustered like face embeddings (log-normal identity
sizes, mean 68 rows as in MS1M, per-identity and per-image noise; generated with torch on
the device in chunks):

1. ``ltc_ray.knn.torch_index.TorchFlatIndex`` per size and precision (fp16, bf16): index
   build time, self-kNN search time (all rows against all rows in query blocks of 16384, k +
   8 candidates by default; the pipeline asks k + 4), rows/s, TFLOP/s counted as 2*N*N*d /
   search time, % of the GPU's dense fp16 peak (a table by device name, else the measured
   8192^3 fp16 matmul) and the share of queries whose certificate failed and were searched
   again in fp32. Sizes above --full-search-max search the first --sample-queries rows (rows
   are i.i.d.) against the whole base and extrapolate (``extrapolated: true``); so does any
   search that reaches --search-cap-s.
2. faiss-gpu ``IndexFlatIP`` on the first size (when faiss has GPUs): build, search, rows/s.
3. Exactness: 256 query rows searched exactly on the CPU (numpy float64, top-k by similarity
   desc then id asc) against the torch backend's candidates re-scored in float64 and ordered
   the same way (the pipeline's own per-pair float32 re-scoring needs faiss, which a GPU
   machine may lack). Lists must be equal; lists that differ only among float64 similarities
   within --tie-tol are counted as ties. Any other difference: exit 1.
4. Model inference with random weights: GCN-V forward per 1M nodes (and the project's
   ``predict`` with host arrays, and the CPU scipy aggregation it runs on: k + 1 entries per
   row), and the hard-clusters edge scorer per 1M anchors (each anchor scores its k edges;
   per 1M edges = per 1M anchors / k), at the default and at the paper's reference shape.

Writes ``--json`` after every step (a killed run keeps what it measured) and prints a short
markdown table. Steps that would pass --budget-s are skipped with a note; an out-of-memory
step is recorded, not fatal. Imports no Ray: a package ``__init__`` that fails here (e.g.
``ltc_ray.knn`` needs faiss) is bypassed and the module loaded on its own. Exit 0 ok,
1 exactness failed or a step raised, 2 no CUDA GPU without ``--device cpu``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import platform
import re
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NO_CUDA = "no CUDA GPU: run this on a GPU machine, or --device cpu --sizes 20000 for a smoke test"
# dense fp16 tensor TFLOP/s (fp32 accumulate) by device name; None: a variant not listed
PEAK_FP16_TFLOPS: list[tuple[str, float | None]] = [
    (r"\bNVL\b", None),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIE\b", 756.0),
    (r"\bH100\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bA10\b", 125.0),
    (r"\bL4\b", 121.0),
    (r"\bV100\b", 125.0),
    (r"\bRTX 4090\b", 165.0),
]
MEAN_IDENTITY_ROWS = 68  # MS1M: ~584K rows over 8573 identities per part
CHECK_QUERIES = 256
GEN_CHUNK = 1 << 20


def _log(msg: str) -> None:
    print(f"[gpu_check {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.perf_counter()


def table_peak(name: str) -> float | None:
    """Dense fp16 TFLOP/s of a GPU named ``name`` from the table, None when not listed."""
    for pattern, value in PEAK_FP16_TFLOPS:
        if re.search(pattern, name, re.I):
            return value
    return None


def import_light(name: str) -> tuple[types.ModuleType, str]:
    """``importlib.import_module(name)``; when a package ``__init__`` on the way fails (the
    GPU machine may lack faiss or fsspec), stand in an empty package for it so that only
    the module's own imports run. Returns the module and how it was loaded."""
    try:
        return importlib.import_module(name), "package"
    except Exception as exc:  # noqa: BLE001 - MissingDependency is not an ImportError
        why = f"{type(exc).__name__}: {exc}".splitlines()[0]
    parts = name.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        if pkg not in sys.modules:
            stub = types.ModuleType(pkg)
            stub.__path__ = [str(REPO.joinpath(*parts[:i]))]
            sys.modules[pkg] = stub
    return importlib.import_module(name), f"module file (package import failed: {why})"


class Check:
    """The run's state: the report, the budget and the torch device."""

    def __init__(self, args: argparse.Namespace, torch: Any):
        self.args = args
        self.torch = torch
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.deadline = time.monotonic() + args.budget_s
        self.failed = False
        self.report: dict[str, Any] = {"schema": "gpu_check/1", "args": vars(args).copy(),
                                       "notes": [], "knn": [], "correctness": [], "models": []}

    # -- bookkeeping
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def save(self) -> None:
        self.report["wall_s"] = round(time.perf_counter() - T0, 3)
        Path(self.args.json).write_text(json.dumps(self.report, indent=2, default=str) + "\n")

    def note(self, msg: str) -> None:
        _log(msg)
        self.report["notes"].append(msg)

    def guarded(self, what: str, fn: Callable[[], Any], need_s: float = 0.0) -> Any:
        """Run one step: skipped when the budget has under ``need_s`` left; an OOM is
        recorded and the step skipped; any other error recorded and the exit code set."""
        result, problem = None, None
        if self.left() < need_s:
            self.note(f"{what}: skipped, {max(0.0, self.left()):.0f}s of --budget-s left")
            return None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - one failed step must not lose the others
            line = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            oom = isinstance(exc, getattr(self.torch.cuda, "OutOfMemoryError", MemoryError)) \
                or "out of memory" in str(exc).lower() or isinstance(exc, MemoryError)
            problem = f"{what}: {'out of memory' if oom else 'error'}: {line}"
            if not oom:
                self.failed = True
                traceback.print_exc()
        self.free()
        if problem:
            self.note(problem)
        self.save()
        return result

    # -- steps
    def environment(self) -> None:
        torch = self.torch
        env: dict[str, Any] = {"device": str(self.dev), "python": platform.python_version(),
                               "numpy": np.__version__, "torch": torch.__version__,
                               "cuda": torch.version.cuda, "host": platform.node()}
        if self.cuda:
            props = torch.cuda.get_device_properties(self.dev)
            env.update(gpu_name=props.name, gpu_memory_bytes=int(props.total_memory),
                       cudnn=torch.backends.cudnn.version(),
                       tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
        try:
            import faiss

            env["faiss"] = getattr(faiss, "__version__", "unknown")
            env["faiss_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
        except Exception as exc:  # noqa: BLE001 - absent or broken: both mean "no faiss"
            env["faiss"] = None
            env["faiss_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self.report["env"] = env

    def matmul_peak(self) -> None:
        """TFLOP/s of a big fp16 matmul (fp32 on CPU: a reference for the smoke test)."""
        torch = self.torch
        n, dtype = (8192, torch.float16) if self.cuda else (512, torch.float32)
        a = torch.randn(n, n, device=self.dev, dtype=dtype)
        b = torch.randn(n, n, device=self.dev, dtype=dtype)
        for _ in range(3):
            a @ b
        self.sync()
        reps, elapsed = 5, 0.0
        while True:
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            self.sync()
            elapsed = time.perf_counter() - t
            if elapsed > 0.5 or reps >= 5000:
                break
            reps *= 4
        measured = 2.0 * n**3 * reps / elapsed / 1e12
        name = self.report["env"].get("gpu_name", "")
        table = table_peak(name) if self.cuda else None
        self.report["peak"] = {
            "measured_matmul_tflops": round(measured, 2),
            "measured_matmul": f"{n}^3 {str(dtype).removeprefix('torch.')} x{reps}",
            "table_fp16_dense_tflops": table,
            "used_tflops": table or round(measured, 2),
            "source": "table" if table else "measured",
        }

    def generate(self, n: int) -> np.ndarray:
        """(n, d) float32 unit rows around log-normal-sized identities, made on the device."""
        torch, d = self.torch, self.args.dim
        g = torch.Generator(device=self.dev).manual_seed(self.args.seed)
        n_ids = max(1, round(n / MEAN_IDENTITY_ROWS))
        centres = torch.nn.functional.normalize(
            torch.randn(n_ids, d, generator=g, device=self.dev), dim=1)
        weights = torch.exp(0.6 * torch.randn(n_ids, generator=g, device=self.dev))
        noise = 0.6 * torch.exp(0.35 * torch.randn(n_ids, generator=g, device=self.dev))
        out = np.empty((n, d), dtype=np.float32)
        for lo in range(0, n, GEN_CHUNK):
            m = min(GEN_CHUNK, n - lo)
            lab = torch.multinomial(weights, m, replacement=True, generator=g)
            scale = noise[lab] * torch.exp(0.4 * torch.randn(m, generator=g, device=self.dev))
            x = centres[lab] + torch.randn(m, d, generator=g, device=self.dev) * (
                scale / math.sqrt(d))[:, None]
            out[lo:lo + m] = torch.nn.functional.normalize(x, dim=1).cpu().numpy()
        return out

    def timed_search(self, search: Callable[[np.ndarray], Any], xb: np.ndarray) -> dict:
        """Self-kNN in query blocks: all rows, or the first --sample-queries rows above
        --full-search-max; stops early at --search-cap-s or the budget and extrapolates."""
        a = self.args
        n = len(xb)
        planned = n if n <= a.full_search_max else min(n, a.sample_queries)
        done, stop = 0, None
        t0 = time.perf_counter()
        while done < planned:
            tb = time.perf_counter()
            hi = min(done + a.query_block, planned)
            search(xb[done:hi])
            done = hi
            now = time.perf_counter()
            if done < planned:
                if now - t0 + (now - tb) > a.search_cap_s:
                    stop = "search cap"
                    break
                if self.left() < (now - tb) + 5:
                    stop = "budget"
                    break
        elapsed = time.perf_counter() - t0
        peak = self.report["peak"]["used_tflops"]
        tflops = 2.0 * done * n * a.dim / elapsed / 1e12
        out = {"queries_planned": planned, "queries_searched": done, "search_s": round(elapsed, 3),
               "full_search_s": round(elapsed * n / done, 3), "extrapolated": done < n,
               "rows_per_s": round(done / elapsed, 1), "tflops": round(tflops, 3),
               "pct_peak": round(100.0 * tflops / peak, 2)}
        if stop:
            out["stopped_by"] = stop
            self.note(f"search of {n:,} rows stopped by the {stop} after {done:,} queries; "
                      "full time extrapolated")
        return out

    def torch_knn(self, ti: types.ModuleType, xb: np.ndarray, precision: str,
                  qidx: np.ndarray, ref: tuple[np.ndarray, np.ndarray] | None) -> None:
        torch, a = self.torch, self.args
        n = len(xb)
        entry: dict[str, Any] = {"backend": "torch", "size": n, "dim": a.dim, "k": a.k,
                                 "search_k": a.k + a.tie_margin, "precision_requested": precision}
        self.report["knn"].append(entry)
        entry["status"] = "incomplete"
        used = precision
        try:  # a CPU torch without fp16/bf16 matmuls: fall back to fp32, and say so
            ti.TorchFlatIndex(xb[:64], self.dev, precision).search(xb[:4], 2)
        except RuntimeError as exc:
            used = "fp32"
            self.note(f"{precision} unsupported on {self.dev} ({str(exc).splitlines()[0]}); "
                      "using fp32")
        entry["precision"] = used
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
        t = time.perf_counter()
        index = ti.TorchFlatIndex(xb, self.dev, used)
        self.sync()
        entry["build_s"] = round(time.perf_counter() - t, 3)
        entry["margin"], entry["tile_elems"] = index.margin, index.tile_elems
        entry["certificate_bound"] = index.bound
        index.search(xb[: min(n, 2048)], a.k + a.tie_margin)  # warm-up, not timed
        index.rows_refined = 0
        entry.update(self.timed_search(lambda q: index.search(q, a.k + a.tie_margin), xb))
        entry["rows_refined"] = int(index.rows_refined)
        entry["refined_share"] = round(index.rows_refined / entry["queries_searched"], 4)
        if self.cuda:
            entry["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(self.dev))
        entry["status"] = "ok"
        self.save()
        if ref is not None:
            sims, ids = index.search(xb[qidx], a.k + a.tie_margin)
            self.compare(xb, qidx, ref, sims, ids, n, used)

    def compare(self, xb: np.ndarray, qidx: np.ndarray, ref: tuple[np.ndarray, np.ndarray],
                sims: np.ndarray, ids: np.ndarray, n: int, precision: str) -> None:
        """The backend's candidates re-scored in float64 and ordered (sim desc, id asc),
        against the exact float64 top-k."""
        k, tol = self.args.k, self.args.tie_tol
        ref_ids, ref_sims = ref
        q = xb[qidx].astype(np.float64)
        s64 = np.einsum("bd,bkd->bk", q, xb[np.maximum(ids, 0)].astype(np.float64))
        s64[ids < 0] = -np.inf
        order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -s64), axis=1)[:, :k]
        got_ids = np.take_along_axis(ids, order, axis=1)
        got_sims = np.take_along_axis(s64, order, axis=1)
        equal = (got_ids == ref_ids).all(axis=1)
        close = np.abs(got_sims - ref_sims).max(axis=1) <= tol
        ties, bad = int((~equal & close).sum()), int((~equal & ~close).sum())
        valid = ids[:, :k] >= 0
        fp32_err = np.abs(sims[:, :k].astype(np.float64) - s64[:, :k])[valid]
        result = {
            "size": n, "precision": precision, "queries": len(qidx), "k": k,
            "equal_rows": int(equal.sum()), "equal_share": round(float(equal.mean()), 6),
            "tie_rows": ties, "failed_rows": bad, "tie_tol": tol,
            "raw_equal_share": round(float((ids[:, :k] == ref_ids).all(axis=1).mean()), 6),
            "max_sim_abs_diff": float(fp32_err.max()) if fp32_err.size else 0.0,
            "max_sorted_sim_diff": float(np.abs(got_sims - ref_sims).max()),
            "passed": bad == 0,
        }
        self.report["correctness"].append(result)
        if bad:
            self.failed = True
            self.note(f"exactness FAILED at {n:,} rows {precision}: {bad} of {len(qidx)} lists "
                      "differ beyond ties")

    def faiss_gpu(self, xb: np.ndarray) -> None:
        """faiss' exact GPU index on the same rows, searched the same way."""
        try:
            import faiss
        except Exception:  # noqa: BLE001 - absent or broken
            self.report["faiss_gpu"] = "not installed"
            return
        if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() < 1:
            self.report["faiss_gpu"] = "not installed (this faiss build has no GPU support)"
            return
        if not self.cuda:
            self.report["faiss_gpu"] = "not measured (--device cpu)"
            return
        a, n = self.args, len(xb)
        entry: dict[str, Any] = {"backend": "faiss-gpu IndexFlatIP", "size": n, "dim": a.dim,
                                 "k": a.k, "search_k": a.k + a.tie_margin,
                                 "faiss": getattr(faiss, "__version__", "unknown")}
        self.report["faiss_gpu"] = entry
        t = time.perf_counter()
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, a.dim)
        index.add(xb)
        entry["build_s"] = round(time.perf_counter() - t, 3)
        index.search(xb[: min(n, 2048)], a.k + a.tie_margin)
        entry.update(self.timed_search(lambda q: index.search(q, a.k + a.tie_margin), xb))
        entry["status"] = "ok"

    def timed(self, fn: Callable[[], Any], reps: int) -> float:
        """Seconds for ``reps`` calls of ``fn`` after one warm-up call, synchronised."""
        with self.torch.no_grad():
            fn()
            self.sync()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            self.sync()
        return time.perf_counter() - t

    def models(self) -> None:
        """Random-weight GCN-V and edge-scorer inference in fp32, as the pipeline runs them."""
        gv, how_v = import_light("ltc_ray.models.gcn_v")
        es, how_e = import_light("ltc_ray.models.edge_scorer")
        self.report.setdefault("imports", {}).update(
            {"ltc_ray.models.gcn_v": how_v, "ltc_ray.models.edge_scorer": how_e})
        self.gcn_v(gv)
        self.save()
        self.edge_scorer(es)

    def gcn_v(self, gv: types.ModuleType) -> None:
        """conf, hidden = model(x, ÂX) per node; ÂX comes from scipy on the CPU."""
        torch, a, dev = self.torch, self.args, self.dev
        rng = np.random.default_rng(a.seed)
        gen = torch.Generator(device=dev).manual_seed(a.seed)
        batch, rows = (65536, 1 << 20) if self.cuda else (4096, 4096)
        model = gv.GCNV(a.dim, 512).to(dev).eval()
        x = torch.randn(batch, a.dim, generator=gen, device=dev)
        agg = torch.randn(batch, a.dim, generator=gen, device=dev)
        fwd = self.timed(lambda: model(x, agg), rows // batch)
        t_rows = 262144 if self.cuda else 4096
        xh = rng.standard_normal((t_rows, a.dim), dtype=np.float32)
        t = time.perf_counter()
        gv.predict(model, xh, xh, batch_rows=batch, device=dev)
        pred = time.perf_counter() - t
        import scipy.sparse as sp

        a_rows = 65536 if self.cuda else 4096
        cols = rng.integers(0, a_rows, size=(a_rows, a.k + 1))
        cols[:, 0] = np.arange(a_rows)
        adj = sp.csr_matrix((np.full(cols.size, 1.0 / (a.k + 1), np.float32), cols.ravel(),
                             np.arange(0, cols.size + 1, a.k + 1)), shape=(a_rows, a_rows))
        t = time.perf_counter()
        gv.aggregate(adj, xh[:a_rows])
        agg_s = time.perf_counter() - t
        self.report["models"].append({
            "model": "gcn-v", "unit": "nodes", "in_dim": a.dim, "hidden": 512, "batch": batch,
            "dtype": "fp32", "forward_s_per_1m": round(fwd / rows * 1e6, 4),
            "predict_s_per_1m": round(pred / t_rows * 1e6, 4),
            "predict_note": "ltc_ray.models.gcn_v.predict on host arrays (copies included)",
            "aggregate_cpu_s_per_1m": round(agg_s / a_rows * 1e6, 4),
            "aggregate_note": f"scipy CSR, {a.k + 1} entries per row, single-threaded CPU"})

    def edge_scorer(self, es: types.ModuleType) -> None:
        """tokens (anchors, k, dim) -> one logit per (anchor, neighbour) edge."""
        torch, a, dev = self.torch, self.args, self.dev
        rng = np.random.default_rng(a.seed)
        gen = torch.Generator(device=dev).manual_seed(a.seed)
        shapes = [("default", es.ScorerShape(in_dim=a.dim, k=a.k))]
        if a.dim % 8 == 0:
            shapes.append(("reference", es.ScorerShape(in_dim=a.dim, d_model=a.dim, heads=8,
                                                       ffn=2048, k=a.k)))
        t_rows = 262144 if self.cuda else 4096
        feats = rng.standard_normal((t_rows, a.dim), dtype=np.float32)
        for label, shape in shapes:
            model = es.EdgeScorer(shape).to(dev).eval()
            cpu_batch = 64 if label == "default" else 16
            for batch in (256, 2048) if self.cuda else (cpu_batch,):
                anchors = (65536 if label == "default" else 16384) if self.cuda else cpu_batch
                steps = max(1, anchors // batch)
                tokens = torch.randn(batch, a.k, a.dim, generator=gen, device=dev)
                pad = torch.zeros(batch, a.k, dtype=torch.bool, device=dev)
                fwd = self.timed(lambda m=model, tk=tokens, p=pad: m(tk, p), steps)
                per_1m = fwd / (steps * batch) * 1e6
                self.report["models"].append({
                    "model": "edge-scorer", "shape": label, "unit": "anchors (k edges each)",
                    "d_model": shape.d_model, "heads": shape.heads, "ffn": shape.ffn,
                    "k": a.k, "batch": batch, "dtype": "fp32",
                    "forward_s_per_1m_anchors": round(per_1m, 4),
                    "forward_s_per_1m_edges": round(per_1m / a.k, 6)})
            anchors, call_batch = (8192, 256) if self.cuda else (cpu_batch, cpu_batch)
            knn_ids = rng.integers(0, t_rows, size=(anchors, a.k))
            t = time.perf_counter()
            es.edge_probabilities(model, knn_ids, lambda q: feats[q], call_batch, str(dev))
            call = time.perf_counter() - t
            self.report["models"][-1]["edge_probabilities_s_per_1m_anchors"] = round(
                call / anchors * 1e6, 4)
            self.report["models"][-1]["edge_probabilities_note"] = (
                f"the project's call: host gather of features, batch {call_batch}, copies included")
            self.save()


def exact_topk(xb: np.ndarray, qidx: np.ndarray, k: int,
               chunk: int = 131072) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of rows ``qidx`` against all of ``xb`` in float64: ``(ids, sims)`` (b, k),
    by similarity desc, ties by id asc. Candidates are the entries at or above each row's
    running k-th best (a lower bound of the final one), so every tie at the cut is kept."""
    q = xb[qidx].astype(np.float64)
    b = len(qidx)
    kth = np.full(b, -np.inf)
    r = np.empty(0, np.int64)
    i = np.empty(0, np.int64)
    s = np.empty(0, np.float64)
    for lo in range(0, len(xb), chunk):
        block = q @ xb[lo:lo + chunk].astype(np.float64).T
        if lo == 0 and block.shape[1] > k:  # the first block alone bounds the k-th best
            kth = np.partition(block, block.shape[1] - k, axis=1)[:, block.shape[1] - k]
        rr, cc = np.nonzero(block >= kth[:, None])
        r, i, s = np.concatenate([r, rr]), np.concatenate([i, cc + lo]), np.concatenate(
            [s, block[rr, cc]])
        order = np.lexsort((i, -s, r))
        r, i, s = r[order], i[order], s[order]
        first = np.searchsorted(r, np.arange(b))
        full = np.bincount(r, minlength=b) >= k
        kth[full] = s[first[full] + k - 1]
        keep = s >= kth[r]
        r, i, s = r[keep], i[keep], s[keep]
    rank = np.arange(len(r)) - np.searchsorted(r, np.arange(b))[r]
    keep = rank < k
    return i[keep].reshape(b, k), s[keep].reshape(b, k)


def markdown(report: dict) -> str:
    """The short table printed at the end."""
    env, peak = report.get("env", {}), report.get("peak", {})
    lines = [f"**{env.get('gpu_name', env.get('device'))}**, torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, faiss {env.get('faiss')}; peak {peak.get('used_tflops')} "
             f"TFLOP/s ({peak.get('source')}; measured matmul "
             f"{peak.get('measured_matmul_tflops')}); wall {report.get('wall_s')} s", "",
             "| backend | rows | prec | build s | search s | rows/s | TFLOP/s | % peak | refined |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    faiss_entry = report.get("faiss_gpu")
    for e in report.get("knn", []) + ([faiss_entry] if isinstance(faiss_entry, dict) else []):
        if "search_s" not in e:
            continue
        search = f"{e['full_search_s']:.1f}" + (" (extrap.)" if e["extrapolated"] else "")
        lines.append(f"| {e['backend']} | {e['size']:,} | {e.get('precision', 'fp32')} | "
                     f"{e['build_s']:.2f} | {search} | {e['rows_per_s']:,.0f} | "
                     f"{e['tflops']:.1f} | {e['pct_peak']:.1f} | {e.get('refined_share', '-')} |")
    if isinstance(faiss_entry, str):
        lines.append(f"\nfaiss-gpu: {faiss_entry}")
    for c in report.get("correctness", []):
        lines.append(f"- exact check {c['size']:,} {c['precision']}: "
                     f"{'PASS' if c['passed'] else 'FAIL'}, equal {c['equal_rows']}/"
                     f"{c['queries']}, ties {c['tie_rows']}, max |sim diff| "
                     f"{c['max_sim_abs_diff']:.2e}")
    for m in report.get("models", []):
        if m["model"] == "gcn-v":
            lines.append(f"- GCN-V: {m['forward_s_per_1m']} s per 1M nodes (forward), "
                         f"{m['predict_s_per_1m']} s (predict), "
                         f"{m['aggregate_cpu_s_per_1m']} s (CPU aggregate)")
        else:
            lines.append(f"- edge scorer {m['shape']} batch {m['batch']}: "
                         f"{m['forward_s_per_1m_anchors']} s per 1M anchors "
                         f"({m['forward_s_per_1m_edges']} s per 1M edges)")
    for note in report.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000,5210000", help="database rows per size, comma list")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=80)
    p.add_argument("--tie-margin", type=int, default=8,
                   help="extra candidates searched (default 8; the pipeline's TIE_MARGIN is 4)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: smoke tests only, with tiny --sizes")
    p.add_argument("--precisions", default="fp16,bf16")
    p.add_argument("--json", default="gpu_check.json", help="report path")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip later steps once this many seconds have passed")
    p.add_argument("--search-cap-s", type=float, default=60.0,
                   help="longest one timed search runs before it extrapolates")
    p.add_argument("--full-search-max", type=int, default=1_000_000,
                   help="largest size searched in full; larger ones search a sample")
    p.add_argument("--sample-queries", type=int, default=262144)
    p.add_argument("--query-block", type=int, default=16384,
                   help="queries per search call (the pipeline's knn.block_rows)")
    p.add_argument("--tie-tol", type=float, default=1e-7,
                   help="float64 similarities closer than this count as ties")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    if not args.sizes or min(args.sizes) <= args.k + args.tie_margin:
        p.error("every size must exceed k + tie margin")
    if set(args.precisions) - {"fp32", "fp16", "bf16"}:
        p.error("--precisions: fp32, fp16 or bf16")
    if min(args.k, args.dim, args.query_block, args.sample_queries) < 1 or args.tie_margin < 0:
        p.error("--k, --dim, --query-block, --sample-queries must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    run = Check(args, torch)
    run.environment()
    ti, how = import_light("ltc_ray.knn.torch_index")
    run.report["imports"] = {"ltc_ray.knn.torch_index": how}
    run.guarded("matmul peak", run.matmul_peak)
    if "peak" not in run.report:
        run.report["peak"] = {"used_tflops": float("nan"), "source": "failed"}
    _log(f"peak {run.report['peak']}")
    run.guarded("model inference", run.models, need_s=30)
    _log("models done")
    for i, n in enumerate(sorted(args.sizes)):
        xb = run.guarded(f"generate {n:,} rows", lambda n=n: run.generate(n), need_s=20)
        if xb is None:
            continue
        _log(f"generated {n:,} x {args.dim}")
        qidx = np.sort(np.random.default_rng(args.seed).choice(
            n, min(CHECK_QUERIES, n), replace=False))
        t = time.perf_counter()
        ref = run.guarded(f"exact float64 reference at {n:,} rows",
                          lambda xb=xb, q=qidx: exact_topk(xb, q, args.k), need_s=15)
        run.report.setdefault("reference_cpu_s", {})[str(n)] = round(time.perf_counter() - t, 3)
        for p in args.precisions:
            run.guarded(f"torch kNN {n:,} rows {p}",
                        lambda xb=xb, p=p, q=qidx, r=ref: run.torch_knn(ti, xb, p, q, r),
                        need_s=15)
            _log(f"torch {n:,} {p}: {run.report['knn'][-1] if run.report['knn'] else None}")
        if i == 0:
            run.report["faiss_gpu"] = "skipped (budget)"
            run.guarded(f"faiss-gpu {n:,} rows", lambda xb=xb: run.faiss_gpu(xb), need_s=15)
        del xb
        run.free()
    if not run.report["correctness"]:
        run.failed = True
        run.note("no exactness check ran")
    run.report["correctness_passed"] = bool(run.report["correctness"]) and all(
        c["passed"] for c in run.report["correctness"])
    run.report["ray_imported"] = "ray" in sys.modules
    run.save()
    print(markdown(run.report))
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
