"""The kNN graph as an artifact: fixed-size row blocks plus a JSON manifest.

Block ``b`` holds rows ``[b * block_rows, min((b + 1) * block_rows, N))`` as
``knn_ids (n, k)`` (int32 while N < 2**31) and ``knn_sims (n, k) float32``,
sorted by similarity descending with self at rank 0. Any stage can read any row
range without touching the other blocks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from ltc_ray.io.fs import join_uri, open_uri, uri_exists, write_bytes_atomic
from ltc_ray.io.knn_files import load_knn_block

MANIFEST = "manifest.json"


def block_file(index: int) -> str:
    return f"block-{index:06d}.npz"


@dataclass
class KnnManifest:
    """Where a run's kNN graph lives and how it was made."""

    directory: str
    n_rows: int
    k: int
    block_rows: int
    source: str  # "computed" | "imported"
    index: str = "flat"
    recall: float | None = None  # measured recall@k when approximate
    details: dict = field(default_factory=dict)
    # uneven blocks (one per partition, e.g. a re-scored graph): block b holds rows
    # [bounds[b], bounds[b + 1]); None = fixed blocks of ``block_rows``
    bounds: list[int] | None = None

    @property
    def n_blocks(self) -> int:
        if self.bounds is not None:
            return len(self.bounds) - 1
        return -(-self.n_rows // self.block_rows)

    def block_range(self, index: int) -> tuple[int, int]:
        if self.bounds is not None:
            return int(self.bounds[index]), int(self.bounds[index + 1])
        start = index * self.block_rows
        return start, min(start + self.block_rows, self.n_rows)

    def blocks_of(self, start: int, stop: int) -> range:
        """Indices of the blocks that rows ``[start, stop)`` overlap."""
        last_row = max(stop, 1) - 1
        if self.bounds is not None:
            edges = np.asarray(self.bounds)
            first = int(np.searchsorted(edges, start, side="right")) - 1
            return range(first, int(np.searchsorted(edges, last_row, side="right")))
        return range(start // self.block_rows, last_row // self.block_rows + 1)

    def block_uri(self, index: int) -> str:
        return join_uri(self.directory, block_file(index))


def save_manifest(manifest: KnnManifest, storage_options: dict | None = None) -> None:
    data = json.dumps(asdict(manifest), indent=2, sort_keys=True).encode()
    write_bytes_atomic(join_uri(manifest.directory, MANIFEST), data, storage_options)


def load_manifest(directory: str, storage_options: dict | None = None) -> KnnManifest | None:
    """The manifest of a complete kNN graph in ``directory``, or None."""
    uri = join_uri(directory, MANIFEST)
    if not uri_exists(uri, storage_options):
        return None
    with open_uri(uri, "rb", storage_options) as fh:
        tree = json.loads(fh.read())
    tree["directory"] = directory
    return KnnManifest(**tree)


def read_knn_rows(
    manifest: KnnManifest, start: int, stop: int, storage_options: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of the graph, loading only the blocks they overlap."""
    if not 0 <= start <= stop <= manifest.n_rows:
        raise ValueError(f"row range [{start}, {stop}) outside [0, {manifest.n_rows})")
    ids_parts, sims_parts = [], []
    for b in manifest.blocks_of(start, stop):
        ids, sims, block_start = load_knn_block(manifest.block_uri(b), storage_options)
        lo = max(start, block_start) - block_start
        hi = min(stop, block_start + len(ids)) - block_start
        ids_parts.append(ids[lo:hi])
        sims_parts.append(sims[lo:hi])
    return np.concatenate(ids_parts), np.concatenate(sims_parts)


def export_ltc_npz(
    work_dir: str, output: str, storage_options: dict | None = None
) -> tuple[int, int]:
    """Stream a run's kNN graph (``<work_dir>/knn`` or ``work_dir`` itself) into a
    learn-to-cluster ``faiss_k_<k>.npz``; returns (N, k)."""
    from ltc_ray.errors import InputError
    from ltc_ray.io.knn_files import write_ltc_knn

    manifest = load_manifest(join_uri(work_dir, "knn"), storage_options) or load_manifest(
        work_dir, storage_options
    )
    if manifest is None:
        raise InputError(work_dir, "no complete kNN graph here (knn/manifest.json missing)")

    def blocks():
        for b in range(manifest.n_blocks):
            ids, sims, _ = load_knn_block(manifest.block_uri(b), storage_options)
            yield ids, sims

    write_ltc_knn(output, manifest.n_rows, manifest.k, blocks(), storage_options)
    return manifest.n_rows, manifest.k
