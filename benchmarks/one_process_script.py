"""The one-process script a user with one machine would write instead of running ltc-ray.

    python benchmarks/one_process_script.py --features F.npy --dim 256 --k 80 \
        --threshold 0.7 --output OUT.parquet --threads 2 [--index ivf --nlist N --nprobe P]

Why: ``benchmarks/vs_script.py`` measures our job against this, so it is deliberately the
honest ~20 lines (numpy, faiss, scipy, pyarrow; no ltc_ray): L2-normalise, faiss
inner-product search of every row's ``k`` neighbours (self included, as ``knn.k``),
keep edges with similarity >= threshold, connected components, one Parquet file with
``sample_id`` and ``cluster_id`` (dense, larger clusters first, ties by smallest member,
like ltc-ray's output). Prints one JSON line: seconds per phase and its own peak RSS.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from scipy.sparse.csgraph import connected_components  # noqa: E402


def vm_hwm() -> int:
    """Peak RSS of this process (VmHWM), bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def load(path: str, dim: int) -> np.ndarray:
    """Rows as float32, L2-normalised (inner product = cosine)."""
    if path.endswith(".npy"):
        x = np.load(path).astype(np.float32, copy=False)
    else:
        x = np.fromfile(path, dtype="<f4").reshape(-1, dim)
    x = np.ascontiguousarray(x, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def knn(x: np.ndarray, k: int, index_kind: str, nlist: int, nprobe: int):
    """faiss top-k of every row against all rows: (sims, ids), each (n, k)."""
    n, d = x.shape
    if index_kind == "ivf":
        nlist = nlist or min(4096, 8 * round(math.sqrt(n)))
        nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants 39 training points a list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(nprobe, nlist)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(x)
    return index.search(x, k)


def cut_and_components(sims: np.ndarray, ids: np.ndarray, threshold: float) -> np.ndarray:
    """Dense cluster ids of the components of the kept edges (larger first, then by
    smallest member)."""
    n = len(ids)
    keep = (sims >= threshold) & (ids >= 0) & (ids != np.arange(n)[:, None])
    rows, cols = np.nonzero(keep)
    graph = sp.csr_matrix(
        (np.ones(len(rows), np.int8), (rows, ids[rows, cols])), shape=(n, n)
    )
    _, labels = connected_components(graph, directed=False)
    _, first, sizes = np.unique(labels, return_index=True, return_counts=True)
    rank = np.empty(len(sizes), np.int64)
    rank[np.lexsort((first, -sizes))] = np.arange(len(sizes))
    return rank[labels]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True, help=".npy or raw float32 .bin")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=80, help="neighbours per row, self included")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--output", required=True, help="Parquet file to write")
    ap.add_argument("--threads", type=int, default=0, help="faiss threads (0 = all)")
    ap.add_argument("--index", choices=("flat", "ivf"), default="flat")
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (0 = min(4096, 8 sqrt N))")
    ap.add_argument("--nprobe", type=int, default=32)
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    phases = {"import": time.perf_counter() - T_START}

    t = time.perf_counter()
    x = load(args.features, args.dim)
    phases["load"] = time.perf_counter() - t

    t = time.perf_counter()
    sims, ids = knn(x, args.k, args.index, args.nlist, args.nprobe)
    phases["knn"] = time.perf_counter() - t

    t = time.perf_counter()
    cluster_id = cut_and_components(sims, ids, args.threshold)
    phases["cut+cc"] = time.perf_counter() - t

    t = time.perf_counter()
    table = pa.table({"sample_id": pa.array(np.arange(len(x), dtype=np.int64)),
                      "cluster_id": pa.array(cluster_id)})
    pq.write_table(table, args.output)
    phases["write"] = time.perf_counter() - t

    phases["total"] = time.perf_counter() - T_START
    print(json.dumps({"seconds": {k: round(v, 4) for k, v in phases.items()},
                      "rows": len(x), "clusters": int(cluster_id.max()) + 1 if len(x) else 0,
                      "peak_rss_bytes": vm_hwm()}))


if __name__ == "__main__":
    main()
