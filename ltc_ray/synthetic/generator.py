"""MS1M-shaped synthetic benchmark in the learn-to-cluster data layout.

Why: the real MS1M features cannot ship with the project, but demos, tests and
benchmarks need labelled data with the same split sizes, the same long-tailed
identity sizes and a similar difficulty (simple baselines around F 0.65, a
label-perfect kNN-edge oracle above 0.99).

Layout written under ``data_root`` (learn-to-cluster §1):
``features/<name>.bin`` raw float32 little-endian row-major ``(n, dim)``, unit rows;
``labels/<name>.meta`` one global identity id per line.
``part0_train`` is base part 0; ``partN_test`` is base parts 1..N concatenated in
order, so ``part3_test`` starts with the bytes of ``part1_test``.

Feature model (all per-identity draws come from ``default_rng([seed, 0, gid])``
so a file does not depend on ``chunk_rows``): identity centres lie near one of a
set of global look-alike *family* centres (shared by all parts, so bigger test
parts hold more look-alikes); each identity has 1-3 pose/age *modes* around its
centre (a few samples lie between centre and mode, as pose is continuous), its
own noise level with a per-image factor, and a few very noisy *outlier* samples.
Rows are shuffled inside fixed windows of :data:`SHUFFLE_ROWS` rows of each base
part. Defaults are calibrated (``benchmarks/calibrate_synthetic.py``): on
part1_test the best thresholded kNN-CC pairwise F is about 0.65 (MS1M simple
baselines: 0.68-0.75) and a label-perfect kNN-edge oracle scores above 0.99.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
from tqdm import tqdm

from ltc_ray.errors import InputError
from ltc_ray.io.fs import file_stamp

# Published MS1M split sizes (learn-to-cluster README / wiki).
MS1M_IDS_PER_PART = 8573
MS1M_TRAIN_SAMPLES = 576_494
MS1M_TEST_SAMPLES = {1: 584_013, 3: 1_740_301, 5: 2_890_517, 7: 4_046_365, 9: 5_206_761}
TEST_PARTS = (1, 3, 5, 7, 9)
VALID_PARTS = (0, *TEST_PARTS)

SHUFFLE_ROWS = 65_536
"""Rows of a base part shuffled together; fixed so output never depends on chunk_rows."""

# Domain tags that keep the RNG streams of different uses apart.
_TAG_IDENTITY, _TAG_FAMILY, _TAG_SIZES, _TAG_SHUFFLE = 0, 1, 2, 3


def _published_base_samples() -> list[int]:
    """Samples in base parts 0..9 at scale 1.0; unpublished pairs split evenly."""
    base = [MS1M_TRAIN_SAMPLES, MS1M_TEST_SAMPLES[1]]
    for lo, hi in zip(TEST_PARTS[:-1], TEST_PARTS[1:], strict=True):
        pair = MS1M_TEST_SAMPLES[hi] - MS1M_TEST_SAMPLES[lo]
        base += [pair - pair // 2, pair // 2]
    return base


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _check_scale(scale: float) -> float:
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise InputError("--scale", f"must be a number in (0, 1], got {scale!r}") from None
    if not (np.isfinite(scale) and 0.0 < scale <= 1.0):
        raise InputError("--scale", f"must be in (0, 1], got {scale}")
    return scale


def base_part_sizes(scale: float) -> list[tuple[int, int]]:
    """(n_samples, n_ids) of base parts 0..9 at ``scale`` (fraction of identities).

    ids per part = round(8573 * scale), at least 2; samples per part =
    round(published * scale), at least 2 per identity.
    """
    scale = _check_scale(scale)
    n_ids = max(2, _round_half_up(MS1M_IDS_PER_PART * scale))
    return [(max(2 * n_ids, _round_half_up(n * scale)), n_ids) for n in _published_base_samples()]


def part_name(part: int) -> str:
    """Learn-to-cluster split name: 0 -> ``part0_train``, N -> ``partN_test``."""
    return "part0_train" if part == 0 else f"part{part}_test"


def _base_parts_of(part: int) -> list[int]:
    return [0] if part == 0 else list(range(1, part + 1))


def benchmark_sizes(scale: float) -> dict[str, tuple[int, int]]:
    """Published split name -> (n_samples, n_ids) at ``scale``; exact MS1M sizes at 1.0."""
    base = base_part_sizes(scale)
    return {
        part_name(p): (
            sum(base[b][0] for b in _base_parts_of(p)),
            sum(base[b][1] for b in _base_parts_of(p)),
        )
        for p in VALID_PARTS
    }


@dataclass(frozen=True)
class SyntheticParams:
    """Knobs of the feature model; defaults calibrated by benchmarks/calibrate_synthetic.py.

    Cosines are between unit centres before sample noise; a noise norm s gives a
    same-mode sample cosine of about 1 / (1 + s^2).
    """

    size_sigma: float = 0.6
    """Log-normal sigma of identity sizes (long tail); the mean is fixed by the split."""
    size_max_factor: float = 8.0
    """Identity sizes are clipped at this multiple of the mean size."""
    ids_per_family: float = 8.0
    """Mean identities per look-alike family inside one base part (part9 holds 9x)."""
    family_affinity: tuple[float, float] = (0.5, 0.95)
    """Uniform range of cos(identity centre, family centre)."""
    mode_probs: tuple[float, float, float] = (0.5, 0.3, 0.2)
    """Probability of 1, 2 or 3 pose/age modes per identity."""
    mode_cos: tuple[float, float] = (0.5, 0.8)
    """Uniform range of cos(mode centre, identity centre) for secondary modes."""
    mode_share: tuple[float, float] = (0.3, 0.8)
    """Uniform range of a secondary mode's weight relative to the main mode (1.0)."""
    bridge_rate: float = 0.15
    """Share of secondary-mode samples placed uniformly between the centre and their mode
    (pose is continuous); keeps separated modes reachable in the kNN graph."""
    noise_median: float = 0.6
    """Median per-identity noise norm (ratio of noise to signal before normalising)."""
    noise_sigma: float = 0.35
    """Log-normal sigma of the per-identity noise norm (image quality varies)."""
    sample_noise_sigma: float = 0.4
    """Log-normal sigma of a per-sample factor on the noise norm (per-image quality)."""
    outlier_rate: float = 0.03
    """Fraction of samples that are hard outliers (still labelled with their identity)."""
    outlier_noise: float = 2.5
    """Noise norm of an outlier sample."""


def _size_rng(seed: int, part: int) -> np.random.Generator:
    return np.random.default_rng([seed, _TAG_SIZES, part])


def sample_identity_sizes(
    n_samples: int, n_ids: int, rng: np.random.Generator, params: SyntheticParams | None = None
) -> np.ndarray:
    """Long-tailed identity sizes, ``(n_ids,) int64``, min 2, summing exactly to n_samples.

    A clipped log-normal draw is scaled to the target total; the integer rounding
    is fixed by largest remainder (stable order), so the result is deterministic.
    """
    params = params or SyntheticParams()
    if n_samples < 2 * n_ids:
        raise InputError("--scale", f"{n_samples} samples cannot fill {n_ids} identities of >= 2")
    mean = n_samples / n_ids
    raw = rng.lognormal(np.log(mean) - params.size_sigma**2 / 2, params.size_sigma, n_ids)
    raw = np.clip(raw, 2.0, params.size_max_factor * mean)
    extra = n_samples - 2 * n_ids
    weight = raw - 2.0 + 1e-9
    share = extra * weight / weight.sum()
    sizes = np.floor(share).astype(np.int64)
    short = extra - int(sizes.sum())
    if short > 0:
        sizes[np.argsort(-(share - sizes), kind="stable")[:short]] += 1
    return sizes + 2


def identity_sizes(
    part: int, scale: float, seed: int = 0, params: SyntheticParams | None = None
) -> np.ndarray:
    """Identity sizes of base part ``part`` (0..9) at ``scale``, ``(n_ids,) int64``."""
    n_samples, n_ids = base_part_sizes(scale)[part]
    return sample_identity_sizes(n_samples, n_ids, _size_rng(seed, part), params)


def family_centres(n_families: int, dim: int, seed: int) -> np.ndarray:
    """Global look-alike family centres, ``(n_families, dim) float64`` unit rows."""
    centres = np.stack(
        [
            np.random.default_rng([seed, _TAG_FAMILY, f]).standard_normal(dim)
            for f in range(n_families)
        ]
    )
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def identity_samples(
    gid: int, n: int, families: np.ndarray, seed: int, params: SyntheticParams
) -> np.ndarray:
    """All ``n`` samples of global identity ``gid``, ``(n, dim) float32`` unit rows.

    Depends only on (seed, gid, n, families, params), never on chunking.
    """
    rng = np.random.default_rng([seed, _TAG_IDENTITY, gid])
    dim = families.shape[1]
    family = families[rng.integers(len(families))]
    affinity = rng.uniform(*params.family_affinity)
    centre = _unit(affinity * family + np.sqrt(1 - affinity**2) * _unit(rng.standard_normal(dim)))
    n_modes = 1 + int(rng.choice(3, p=params.mode_probs))
    mode_cos = rng.uniform(*params.mode_cos, n_modes - 1)
    offsets = _unit(rng.standard_normal((n_modes - 1, dim)))
    modes = np.vstack(
        [centre, _unit(mode_cos[:, None] * centre + np.sqrt(1 - mode_cos[:, None] ** 2) * offsets)]
    )
    weights = np.concatenate([[1.0], rng.uniform(*params.mode_share, n_modes - 1)])
    mode_of = rng.choice(n_modes, size=n, p=weights / weights.sum())
    bridge = (mode_of > 0) & (rng.random(n) < params.bridge_rate)
    along = np.where(bridge, rng.random(n), 1.0)[:, None]
    means = _unit((1.0 - along) * centre + along * modes[mode_of]).astype(np.float32)
    noise_norm = params.noise_median * np.exp(params.noise_sigma * rng.standard_normal())
    outlier = rng.random(n) < params.outlier_rate
    sample_norm = noise_norm * np.exp(params.sample_noise_sigma * rng.standard_normal(n))
    scale = np.where(outlier, params.outlier_noise, sample_norm).astype(np.float32)
    noise = rng.standard_normal((n, dim), dtype=np.float32)
    noise *= scale[:, None] / np.float32(np.sqrt(dim))
    x = means + noise
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x


def _n_families(scale: float, params: SyntheticParams) -> int:
    ids = base_part_sizes(scale)[1][1]
    return max(1, _round_half_up(ids / params.ids_per_family))


def iter_base_part(
    part: int,
    scale: float,
    seed: int,
    dim: int,
    chunk_rows: int,
    params: SyntheticParams,
    families: np.ndarray | None = None,
):
    """Yield the rows of base part ``part`` in file order as (features, labels) chunks.

    features ``(m, dim) float32``, labels ``(m,) int64`` global identity ids; each
    chunk holds whole shuffle windows, about ``max(chunk_rows, SHUFFLE_ROWS)`` rows,
    as views into reused buffers (consume a chunk before asking for the next).
    Memory stays about one chunk plus one window, whatever the part size.
    """
    if families is None:
        families = family_centres(_n_families(scale, params), dim, seed)
    base = base_part_sizes(scale)
    sizes = identity_sizes(part, scale, seed, params)
    first_gid = sum(n_ids for _, n_ids in base[:part])
    windows_per_chunk = max(1, chunk_rows // SHUFFLE_ROWS)
    n_total = int(sizes.sum())
    out_rows = min(windows_per_chunk * SHUFFLE_ROWS, n_total)
    out_x = np.empty((out_rows, dim), np.float32)
    out_y = np.empty(out_rows, np.int64)
    win_x = np.empty((min(SHUFFLE_ROWS, n_total), dim), np.float32)
    win_y = np.empty(len(win_x), np.int64)
    filled, out_filled, window = 0, 0, 0
    rows_left = n_total
    for i, size in enumerate(sizes):
        gid = first_gid + i
        x = identity_samples(gid, int(size), families, seed, params)
        pos = 0
        while pos < size:
            take = min(int(size) - pos, len(win_x) - filled)
            win_x[filled : filled + take] = x[pos : pos + take]
            win_y[filled : filled + take] = gid
            filled += take
            pos += take
            if filled == min(len(win_x), rows_left):  # window full (or the part's last rows)
                perm = np.random.default_rng([seed, _TAG_SHUFFLE, part, window]).permutation(filled)
                # mode="clip": perm is in range, and "raise" would buffer a window-sized copy
                np.take(
                    win_x[:filled],
                    perm,
                    axis=0,
                    out=out_x[out_filled : out_filled + filled],
                    mode="clip",
                )
                out_y[out_filled : out_filled + filled] = win_y[perm]
                out_filled += filled
                rows_left -= filled
                window += 1
                filled = 0
                if out_filled + min(len(win_x), rows_left) > out_rows or rows_left == 0:
                    yield out_x[:out_filled], out_y[:out_filled]
                    out_filled = 0


class _Sink:
    """One output file pair; written to a temporary name, renamed on close (local paths)."""

    def __init__(self, path: str):
        self.path = path
        self.local = "://" not in path
        if self.local:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._tmp = path + ".tmp"
            self._file = open(self._tmp, "wb")
        else:
            fs, fs_path = fsspec.core.url_to_fs(path)
            fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
            self._file = fsspec.open(path, "wb").open()

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)

    def close(self, ok: bool) -> None:
        self._file.close()
        if self.local:
            if ok:
                os.replace(self._tmp, self.path)
            else:
                os.remove(self._tmp)


def _stream(chunks, sinks: list[tuple[_Sink, _Sink]], bar: tqdm) -> None:
    """Append every (features, labels) chunk to each (feature, label) sink pair.

    A function of its own so the last chunk's buffers are freed on return, before
    the next base part allocates its own.
    """
    for x, y in chunks:
        feat_bytes = memoryview(np.ascontiguousarray(x, dtype="<f4")).cast("B")
        label_bytes = ("\n".join(y.astype(str)) + "\n").encode()
        for feat_sink, label_sink in sinks:
            feat_sink.write(feat_bytes)
            label_sink.write(label_bytes)
        bar.update(len(y))


def _check_parts(parts: Sequence[int]) -> list[int]:
    try:
        wanted = sorted({int(p) for p in parts})
    except (TypeError, ValueError):
        raise InputError("--parts", f"must be integers from {VALID_PARTS}, got {parts!r}") from None
    bad = [p for p in wanted if p not in VALID_PARTS]
    if bad or not wanted:
        raise InputError("--parts", f"must be a non-empty subset of {VALID_PARTS}, got {parts!r}")
    return wanted


def make_benchmark(
    data_root: str,
    parts: Sequence[int] = (0, 1),
    scale: float = 0.01,
    seed: int = 0,
    dim: int = 256,
    chunk_rows: int = 262144,
    progress: bool = True,
    params: SyntheticParams | None = None,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Write an MS1M-shaped labelled benchmark under ``data_root``; return what was written.

    ``parts`` from {0, 1, 3, 5, 7, 9}; ``scale`` = fraction of MS1M identities and
    samples. Every needed base part is generated once and streamed into every
    requested file that contains it, so memory stays bounded (about
    ``(max(chunk_rows, SHUFFLE_ROWS) + SHUFFLE_ROWS) * dim * 4`` bytes) at any scale.
    Local files are written under a ``.tmp`` name and renamed when complete; fsspec
    URIs (``s3://...``) are written in place. Same seed -> same bytes, whatever
    ``chunk_rows``. Returns name -> {"features", "labels", "n_samples", "n_ids"}.

    An existing file is replaced only with ``overwrite`` and only when an earlier call wrote
    it and it is unchanged since (recorded in ``<data_root>/`` :data:`WRITTEN_MARKER`):
    real data under the same root is never overwritten.
    """
    wanted = _check_parts(parts)
    scale = _check_scale(scale)
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError("--seed", f"must be a non-negative integer, got {seed!r}")
    if not isinstance(dim, int | np.integer) or dim < 2:
        raise InputError("--dim", f"must be an integer >= 2, got {dim!r}")
    if not isinstance(chunk_rows, int | np.integer) or chunk_rows < 1:
        raise InputError("--chunk-rows", f"must be a positive integer, got {chunk_rows!r}")
    params = params or SyntheticParams()
    seed, dim, chunk_rows = int(seed), int(dim), int(chunk_rows)
    root = str(data_root).rstrip("/")
    sizes = benchmark_sizes(scale)
    base = base_part_sizes(scale)
    result = {
        part_name(p): {
            "features": f"{root}/features/{part_name(p)}.bin",
            "labels": f"{root}/labels/{part_name(p)}.meta",
            "n_samples": sizes[part_name(p)][0],
            "n_ids": sizes[part_name(p)][1],
        }
        for p in wanted
    }
    targets = [path for info in result.values() for path in (info["features"], info["labels"])]
    written_before = _check_replaceable(root, targets, overwrite)
    # base part -> the requested outputs that contain it
    readers: dict[int, list[str]] = {}
    for p in wanted:
        for b in _base_parts_of(p):
            readers.setdefault(b, []).append(part_name(p))
    families = family_centres(_n_families(scale, params), dim, seed)
    sinks: dict[str, tuple[_Sink, _Sink]] = {}
    ok = False
    try:
        for name, info in result.items():
            sinks[name] = (_Sink(info["features"]), _Sink(info["labels"]))
        total = sum(base[b][0] for b in readers)
        with tqdm(
            total=total, unit="rows", desc="synthetic", file=sys.stderr, disable=not progress
        ) as bar:
            for b in sorted(readers):
                chunks = iter_base_part(b, scale, seed, dim, chunk_rows, params, families)
                _stream(chunks, [sinks[name] for name in readers[b]], bar)
        ok = True
    finally:
        for feat_sink, label_sink in sinks.values():
            feat_sink.close(ok)
            label_sink.close(ok)
    _record_written(root, targets, written_before)
    return result


WRITTEN_MARKER = ".ltc-ray-synthetic.json"  # the files make_benchmark wrote under a root


def _check_replaceable(root: str, targets: list[str], overwrite: bool) -> dict:
    """Refuse to replace a file this function did not write (or that changed since), and
    any existing file without ``overwrite``. Returns the marker's record."""
    fs, root_path = fsspec.core.url_to_fs(root)
    try:
        record = json.loads(fs.cat_file(f"{root_path}/{WRITTEN_MARKER}"))["files"]
        if not isinstance(record, dict):
            raise TypeError
    except FileNotFoundError:
        record = {}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        record = {}  # unreadable: vouches for nothing
    for uri in targets:
        path = fsspec.core.url_to_fs(uri)[1]
        if not fs.exists(path):
            continue
        current = file_stamp(fs, path)
        rel = path[len(root_path.rstrip("/")) + 1:]
        if record.get(rel) != current:
            raise InputError(uri, "exists and was not written by make_synthetic (or changed "
                             "since); refusing to replace it whatever the flags: choose "
                             "another --data-root")
        if not overwrite:
            raise InputError(uri, "already exists (an earlier synthetic benchmark); pass "
                             "--overwrite to replace it")
    return record


def _record_written(root: str, targets: list[str], record: dict) -> None:
    """Add the files just written to the root's marker."""
    fs, root_path = fsspec.core.url_to_fs(root)
    for uri in targets:
        path = fsspec.core.url_to_fs(uri)[1]
        record[path[len(root_path.rstrip("/")) + 1:]] = file_stamp(fs, path)
    with fsspec.open(f"{root.rstrip('/')}/{WRITTEN_MARKER}", "w") as fh:
        fh.write(json.dumps({"files": record}, indent=1, sort_keys=True))
