"""The embedding job on Ray Data: images -> ``OUT/embeddings.parquet``.

Pipeline (one dataset row = one chunk of ``chunk_size`` images of the sorted listing)::

    from_items(chunk descriptors)
      -> map_batches(_prepare_chunks)   CPU tasks: reuse check, read + decode + resize (PIL)
      -> map_batches(_ChunkEmbedder)    actor pool (num_gpus=1 each on a GPU cluster):
                                        batched inference, writes OUT/_work/chunk-<i>.parquet
                                        and its marker chunk-<i>.json
      -> iter_rows()                    the driver sees small per-chunk stats only

A chunk's part is reused on a rerun when its marker's fingerprint (the chunk's names, the
images root, the model's sha256, the preprocessing and D) matches and the part's size and
sha256 are the ones the marker recorded; anything else is computed again. Unreadable
images are recorded per image (path, error) and end in ``failed.parquet``.

Commit (driver, one part in memory at a time): ``embeddings.parquet`` (one row group per
part, ids 0..N-1 in listing order), ``failed.parquet``, ``report.json``, then ``_SUCCESS``;
then the job's own files under ``OUT/_work`` are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from ltc_ray.embed.model import (
    Embedder,
    ModelSpec,
    Preprocess,
    decode_image,
    resolve_model,
    to_model_input,
)
from ltc_ray.embed.sources import IMAGE_EXTENSIONS, ImageListing, image_uri, list_images
from ltc_ray.errors import InputError, WorkFileError, brief, storage_errors
from ltc_ray.io.fs import join_uri, open_uri, url_to_fs, write_bytes_atomic
from ltc_ray.io.lock import LOCK, sole_writer
from ltc_ray.redact import redact

__all__ = ["EMBEDDINGS", "FAILED", "REPORT", "SUCCESS", "WORK_DIR", "EmbedSpec",
           "check_embed_output", "chunk_fingerprint", "run_embed"]

log = logging.getLogger("ltc_ray")

EMBEDDINGS, FAILED, REPORT, SUCCESS, WORK_DIR = (
    "embeddings.parquet", "failed.parquet", "report.json", "_SUCCESS", "_work")
REPORT_KIND = "ltc-ray-embeddings"
SUCCESS_FORMAT = "ltc-ray-embeddings/1"
OUTPUT_NAMES = {EMBEDDINGS, FAILED, REPORT, SUCCESS, WORK_DIR, LOCK}  # all this job writes
FINGERPRINT_VERSION = 1
FAILED_SAMPLE = 100
READ_GROUP = 256  # images fetched together (concurrently on object stores)
_WORK_FILE = re.compile(r"^\.?chunk-\d{6,}\.(parquet|json)(\..*\.tmp)?$")


@dataclass
class EmbedSpec:
    """One embedding job (the CLI's flags)."""

    input: str
    model: str
    output: str
    model_config: str | None = None
    path_column: str = "path"
    images_root: str | None = None
    chunk_size: int = 1024
    batch_size: int = 256
    actors: int | None = None  # default: one per GPU, else max(1, CPUs // 4)
    actor_cpus: float = 1.0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    num_cpus: int | None = None
    overwrite: bool = False
    commit: bool = True  # False: compute the parts under OUT/_work and stop (--no-commit)
    storage_options: dict | None = field(default=None, repr=False)


# ------------------------------------------------------------------ checks
def check_embed_output(output: str, overwrite: bool, storage_options: dict | None = None
                       ) -> None:
    """Refuse a file at ``output``, a folder holding anything this job does not write, a
    finished result without ``--overwrite``, and a finished result of another kind (a
    cluster run) even with it. Our own names count as ours only beside our ``_SUCCESS``
    or ``_work`` (a run or a commit that stopped midway), so no flag ever replaces a
    user's ``report.json``."""
    with storage_errors(output):
        fs, path = url_to_fs(output, storage_options)
        if fs.isfile(path):
            raise InputError(output, "output is an existing file; give a folder URI")
        if not fs.isdir(path):
            return
        present = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
        foreign = sorted(present - OUTPUT_NAMES)
        if not foreign and not present & {SUCCESS, WORK_DIR}:
            foreign = sorted(present - {LOCK})
        if foreign:
            raise InputError(output, f"output folder holds files the embedding job did not "
                             f"write (e.g. '{brief(foreign[0])}'); refusing to touch it "
                             "whatever the flags: choose a new (or empty) --output")
        success = join_uri(path, SUCCESS)
        if not fs.exists(success):
            return
        try:
            manifest = json.loads(fs.cat_file(success))
        except (ValueError, UnicodeDecodeError):
            manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != SUCCESS_FORMAT:
        raise InputError(output, "holds a finished result of another kind (its _SUCCESS is "
                         "not an embedding job's); choose another --output")
    if not overwrite:
        raise InputError(output, "already holds finished embeddings (_SUCCESS); pass "
                         "--overwrite to replace them")


def _check_not_inside(output: str, listing: ImageListing, so: dict | None) -> None:
    """An output inside the folder being listed would be listed by the next run."""
    if listing.kind != "folder":
        return
    fs_o, out = url_to_fs(output, so)
    fs_i, src = url_to_fs(listing.source, so)
    if type(fs_o) is type(fs_i):
        out, src = out.rstrip("/"), src.rstrip("/")
        if out == src or out.startswith(src + "/"):
            raise InputError(output, f"output lies inside the input folder {listing.source}; "
                             "write it elsewhere")


def chunk_fingerprint(names: list[str], images_root: str | None, model: ModelSpec) -> str:
    """What a chunk's part depends on: its names, what they are relative to, the model
    bytes, the preprocessing and the embedding width."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": FINGERPRINT_VERSION, "root": images_root, "model": model.sha256,
                         "format": model.format, "pre": model.preprocess.to_dict(),
                         "dim": model.dim}, sort_keys=True).encode())
    h.update("\n".join(names).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _part_names(work: str, chunk: int) -> tuple[str, str]:
    return join_uri(work, f"chunk-{chunk:06d}.parquet"), join_uri(work, f"chunk-{chunk:06d}.json")


# ------------------------------------------------------------------ Ray Data stages
def _reusable(work: str, chunk: int, fingerprint: str, so: dict | None) -> dict | None:
    """The marker of a part that can be reused, else None (missing, stale or damaged)."""
    part, marker = _part_names(work, chunk)
    fs, mpath = url_to_fs(marker, so)
    try:
        meta = json.loads(fs.cat_file(mpath))
        if not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint:
            return None
        data = url_to_fs(part, so)[0].cat_file(url_to_fs(part, so)[1])
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return None
    return meta


def _read_group(uris: list[str], so: dict | None) -> list[bytes | BaseException]:
    """The bytes of each image (or the exception reading it), fetched concurrently per
    filesystem on object stores (fsspec ``cat_ranges``; no glob expansion of names)."""
    out: list[bytes | BaseException] = [b""] * len(uris)
    groups: dict[int, tuple[Any, list[int], list[str]]] = {}
    for i, uri in enumerate(uris):
        try:
            fs, path = url_to_fs(uri, so)
        except Exception as exc:  # noqa: BLE001 - a bad URI is this image's failure
            out[i] = exc
            continue
        groups.setdefault(id(fs), (fs, [], []))
        groups[id(fs)][1].append(i)
        groups[id(fs)][2].append(path)
    for fs, idx, paths in groups.values():
        got = fs.cat_ranges(paths, None, None, on_error="return")
        for i, value in zip(idx, got, strict=True):
            out[i] = value
    return out


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _error_text(exc: BaseException) -> str:
    """One line for failed.parquet (PIL names the in-memory buffer: say "the file")."""
    return redact(f"{type(exc).__name__}: {_OBJECT_REPR.sub('the file', brief(exc, 300))}")


def _prepare_chunks(batch: pa.Table, *, work: str, images_root: str | None, preprocess: dict,
                    check_extension: bool, so: dict | None) -> dict[str, np.ndarray]:
    """CPU task: for each chunk, reuse its part if valid, else read and decode its images
    (per-image failures recorded, never raised)."""
    from ltc_ray.runtime import delay_for_tests

    pp = Preprocess(tuple(preprocess["size"]), tuple(preprocess["mean"]),
                    tuple(preprocess["std"]), preprocess["resize"], preprocess["color"])
    h, w = pp.size
    rows: dict[str, list] = {k: [] for k in ("chunk", "fingerprint", "names", "reused",
                                             "pixels", "ok", "errors")}
    for r in range(batch.num_rows):
        chunk = int(batch.column("chunk")[r].as_py())
        fingerprint = batch.column("fingerprint")[r].as_py()
        names = batch.column("names")[r].as_py()
        delay_for_tests("embed")
        meta = _reusable(work, chunk, fingerprint, so)
        pixels = np.zeros((0 if meta else len(names), h, w, 3), np.uint8)
        ok = np.zeros(len(pixels), bool)
        errors = [""] * len(pixels)
        if meta is None:
            for start in range(0, len(names), READ_GROUP):
                group = names[start:start + READ_GROUP]
                blobs = _read_group([image_uri(images_root, n) for n in group], so)
                for j, (name, blob) in enumerate(zip(group, blobs, strict=True)):
                    ext = name[name.rfind("."):].lower() if "." in name.rsplit("/", 1)[-1] \
                        else ""
                    if check_extension and ext not in IMAGE_EXTENSIONS:
                        errors[start + j] = f"not an image file (extension {ext or 'none'!r})"
                    elif isinstance(blob, BaseException):
                        errors[start + j] = _error_text(blob)
                    else:
                        try:
                            pixels[start + j] = decode_image(blob, pp)
                            ok[start + j] = True
                        except Exception as exc:  # noqa: BLE001 - any decode failure
                            errors[start + j] = _error_text(exc)
        rows["chunk"].append(chunk)
        rows["fingerprint"].append(fingerprint)
        rows["names"].append(json.dumps(names))
        rows["reused"].append(meta is not None)
        rows["pixels"].append(pixels)
        rows["ok"].append(ok)
        rows["errors"].append(json.dumps(errors))
    return {"chunk": np.asarray(rows["chunk"], np.int64),
            "fingerprint": np.asarray(rows["fingerprint"], dtype=object),
            "names": np.asarray(rows["names"], dtype=object),
            "reused": np.asarray(rows["reused"], bool),
            "pixels": _ragged(rows["pixels"]),
            "ok": _ragged(rows["ok"]),
            "errors": np.asarray(rows["errors"], dtype=object)}


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of per-row arrays (stacked when all share a shape)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


class _ChunkEmbedder:
    """Actor: loads the model once, embeds each chunk in batches and writes its part."""

    def __init__(self, model: ModelSpec, work: str, batch_size: int, threads: float,
                 so: dict | None):
        from ltc_ray.runtime import worker_device

        self.model, self.work, self.batch_size, self.so = model, work, batch_size, so
        self.device = worker_device()
        self.embedder = Embedder(model.read_bytes(), model.format, self.device,
                                 threads=max(1, int(threads)))

    def _embed(self, pixels: np.ndarray) -> np.ndarray:
        out = np.empty((len(pixels), self.model.dim), np.float32)
        for start in range(0, len(pixels), self.batch_size):
            x = to_model_input(pixels[start:start + self.batch_size], self.model.preprocess)
            y = self.embedder(x)
            if y.shape != (len(x), self.model.dim):
                raise RuntimeError(f"model {self.model.uri} returned shape {y.shape} for "
                                   f"{len(x)} images, expected (n, {self.model.dim})")
            out[start:start + len(x)] = y
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats: dict[str, list] = {k: [] for k in ("chunk", "n_ok", "n_failed", "reused",
                                                  "seconds")}
        for r in range(len(batch["chunk"])):
            t0 = time.perf_counter()
            chunk = int(batch["chunk"][r])
            part, marker = _part_names(self.work, chunk)
            if bool(batch["reused"][r]):
                meta = json.loads(url_to_fs(marker, self.so)[0].cat_file(
                    url_to_fs(marker, self.so)[1]))
                n_ok, n_failed = int(meta["n_ok"]), int(meta["n_failed"])
            else:
                n_ok, n_failed = self._write_part(
                    chunk, str(batch["fingerprint"][r]), json.loads(str(batch["names"][r])),
                    np.asarray(batch["pixels"][r]), np.asarray(batch["ok"][r], bool),
                    json.loads(str(batch["errors"][r])), part, marker)
            stats["chunk"].append(chunk)
            stats["n_ok"].append(n_ok)
            stats["n_failed"].append(n_failed)
            stats["reused"].append(bool(batch["reused"][r]))
            stats["seconds"].append(time.perf_counter() - t0)
        return {k: np.asarray(v) for k, v in stats.items()}

    def _write_part(self, chunk: int, fingerprint: str, names: list[str], pixels: np.ndarray,
                    ok: np.ndarray, errors: list[str], part: str, marker: str
                    ) -> tuple[int, int]:
        dim = self.model.dim
        emb = np.zeros((len(names), dim), np.float32)
        if ok.any():
            emb[ok] = self._embed(pixels[ok])
        finite = np.isfinite(emb).all(axis=1)
        errors = np.asarray(errors, dtype=object)
        errors[ok & ~finite] = "model output is not finite"
        ok = ok & finite
        values = pa.array(emb.reshape(-1), pa.float32())
        embedding = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~ok))
        table = pa.table({
            "pos": pa.array(np.arange(len(names), dtype=np.int32)),
            "path": pa.array(names, pa.string()),
            "embedding": embedding,
            "error": pa.array(np.where(ok, None, errors).tolist(), pa.string()),
        })
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=max(1, len(names)))
        data = sink.getvalue().to_pybytes()
        write_bytes_atomic(part, data, self.so)
        meta = {"fingerprint": fingerprint, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "rows": len(names),
                "n_ok": int(ok.sum()), "n_failed": int((~ok).sum()), "dim": dim}
        write_bytes_atomic(marker, json.dumps(meta).encode(), self.so)
        return meta["n_ok"], meta["n_failed"]


# ------------------------------------------------------------------ driver
def _resources_plan(spec: EmbedSpec) -> tuple[int, float, bool]:
    """(actors, GPUs per actor, use GPUs) from the cluster's resources and the flags."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if spec.device == "cuda" and gpus == 0:
        raise InputError("--device", "cuda was asked for but the Ray cluster has no GPUs")
    use_gpu = gpus > 0 and spec.device != "cpu"
    actors = spec.actors or (gpus if use_gpu else max(1, int(cpus // 4)))
    if not use_gpu and actors * spec.actor_cpus >= cpus and cpus >= 2:
        # leave a CPU for the decode tasks, or the pipeline stalls
        actors = max(1, int((cpus - 1) // spec.actor_cpus))
    return actors, (1.0 if use_gpu else 0.0), use_gpu


def _commit(spec: EmbedSpec, listing: ImageListing, model: ModelSpec, n_chunks: int,
            work: str, report: dict) -> dict:
    """Stream the parts into the output files, then report.json and _SUCCESS last."""
    so, out = spec.storage_options, spec.output
    fs, out_path = url_to_fs(out, so)
    success = join_uri(out_path, SUCCESS)
    if fs.exists(success):  # --overwrite (checked up front): never vouch for a mix
        fs.rm(success)
    emb_schema = pa.schema([("id", pa.int64()), ("path", pa.string()),
                            ("embedding", pa.list_(pa.float32(), model.dim))])
    fail_schema = pa.schema([("path", pa.string()), ("error", pa.string())])
    n_ok = n_failed = 0
    sample: list[dict] = []
    with open_uri(join_uri(out, EMBEDDINGS), "wb", so) as fe, \
            open_uri(join_uri(out, FAILED), "wb", so) as ff:
        we = pq.ParquetWriter(fe, emb_schema, compression="zstd")
        wf = pq.ParquetWriter(ff, fail_schema, compression="zstd")
        for chunk in range(n_chunks):
            part, _ = _part_names(work, chunk)
            try:
                with open_uri(part, "rb", so) as f:
                    table = pq.read_table(f)
            except (OSError, pa.ArrowInvalid) as exc:
                raise WorkFileError(part, brief(exc)) from None
            good = table.column("error").is_null()
            ok_rows = table.filter(good)
            if ok_rows.num_rows:
                ids = pa.array(np.arange(n_ok, n_ok + ok_rows.num_rows, dtype=np.int64))
                we.write_table(pa.table([ids, ok_rows.column("path"),
                                         ok_rows.column("embedding").cast(
                                             emb_schema.field("embedding").type)],
                                        schema=emb_schema),
                               row_group_size=ok_rows.num_rows)
                n_ok += ok_rows.num_rows
            bad = table.filter(pc.invert(good)).select(["path", "error"])
            if bad.num_rows:
                wf.write_table(bad.cast(fail_schema), row_group_size=bad.num_rows)
                n_failed += bad.num_rows
                if len(sample) < FAILED_SAMPLE:
                    sample += bad.slice(0, FAILED_SAMPLE - len(sample)).to_pylist()
            del table, ok_rows, bad
        we.close()
        wf.close()
    report.update({"n_embedded": n_ok, "n_failed": n_failed, "failed_sample": sample})
    write_bytes_atomic(join_uri(out, REPORT),
                       redact(json.dumps(report, indent=1)).encode(), so)
    files = []
    for name in (EMBEDDINGS, FAILED, REPORT):
        files.append({"path": name, "bytes": int(fs.size(join_uri(out_path, name)))})
    files[0]["rows"], files[1]["rows"] = n_ok, n_failed
    write_bytes_atomic(join_uri(out, SUCCESS), json.dumps(
        {"format": SUCCESS_FORMAT, "files": files, "n_embedded": n_ok, "dim": model.dim},
        indent=1).encode(), so)
    return report


def _remove_work(work: str, so: dict | None) -> None:
    """Delete the job's own files under OUT/_work (by their names), then the folder if
    that leaves it empty; anything else there is kept."""
    fs, path = url_to_fs(work, so)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return
    mine = [p for p in entries if _WORK_FILE.match(p.rstrip("/").rsplit("/", 1)[-1])]
    if mine:
        fs.rm(mine)
    fs.invalidate_cache(path)
    try:
        if not fs.ls(path, detail=False):
            fs.rmdir(path)
    except (FileNotFoundError, OSError, NotImplementedError):
        pass


def run_embed(spec: EmbedSpec) -> dict:
    """Run the job; returns the report (``committed`` False with ``--no-commit``)."""
    t_start = time.perf_counter()
    so = spec.storage_options
    for name, value in (("--chunk-size", spec.chunk_size), ("--batch-size", spec.batch_size)):
        if value < 1:
            raise InputError(name, f"must be a positive integer, got {value}")
    if spec.actors is not None and spec.actors < 1:
        raise InputError("--actors", f"must be a positive integer, got {spec.actors}")
    if spec.actor_cpus <= 0:
        raise InputError("--actor-cpus", f"must be positive, got {spec.actor_cpus}")
    if spec.device not in ("auto", "cpu", "cuda"):
        raise InputError("--device", f"must be auto, cpu or cuda, got {brief(spec.device)}")
    check_embed_output(spec.output, spec.overwrite, so)
    model = resolve_model(spec.model, spec.model_config, so, probe=False)  # cheap: sidecar
    listing = list_images(spec.input, path_column=spec.path_column,
                          images_root=spec.images_root, storage_options=so)
    _check_not_inside(spec.output, listing, so)
    model = resolve_model(spec.model, spec.model_config, so)  # loads it, learns D
    log.info("embed: %d images from %s (%s), model %s (%s, D=%d)", len(listing),
             listing.source, listing.kind, model.uri, model.format, model.dim)

    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-embed"
    with sole_writer(spec.output, run_id, so,
                     lambda: check_embed_output(spec.output, spec.overwrite, so)):
        return _run_locked(spec, listing, model, t_start)


def _run_locked(spec: EmbedSpec, listing: ImageListing, model: ModelSpec,
                t_start: float) -> dict:
    """The job's work, holding the output's lock (one writer per output): Ray Data, then
    the commit."""
    import ray

    from ltc_ray.runtime import init_ray

    so = spec.storage_options
    init_ray(spec.num_cpus)
    actors, gpus, use_gpu = _resources_plan(spec)
    work = join_uri(spec.output, WORK_DIR)
    names = listing.names
    starts = list(range(0, len(names), spec.chunk_size))
    descs = [{"chunk": i, "fingerprint": chunk_fingerprint(
                  names[s:s + spec.chunk_size], listing.images_root, model),
              "names": names[s:s + spec.chunk_size]} for i, s in enumerate(starts)]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts chunks
    ds = ray.data.from_items(descs, override_num_blocks=len(descs))
    h, w = model.preprocess.size
    # what one decode task holds: the chunk's pixels and one group of files in flight.
    # Declaring it also keeps these CPU tasks a stage of their own: Ray Data fuses a task
    # stage into the actor stage when their resources are equal, and then each actor would
    # decode and infer in turn instead of in parallel.
    decode_memory = min(len(names), spec.chunk_size) * h * w * 3 + READ_GROUP * (1 << 20)
    ds = ds.map_batches(
        _prepare_chunks, batch_size=1, batch_format="pyarrow", num_cpus=1, memory=decode_memory,
        fn_kwargs={"work": work, "images_root": listing.images_root,
                   "preprocess": model.preprocess.to_dict(),
                   "check_extension": listing.kind == "folder", "so": so})
    ds = ds.map_batches(
        _ChunkEmbedder, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=spec.actor_cpus,
        num_gpus=gpus, fn_constructor_kwargs={"model": model, "work": work,
                                              "batch_size": spec.batch_size,
                                              "threads": spec.actor_cpus, "so": so})
    t0 = time.perf_counter()
    reused = computed_images = 0
    seen: set[int] = set()
    step = max(1, len(descs) // 10)
    with tqdm(total=len(descs), desc="embed", unit="chunk", disable=None) as bar:
        for row in ds.iter_rows():
            seen.add(int(row["chunk"]))
            if bool(row["reused"]):
                reused += 1
            else:
                computed_images += int(row["n_ok"]) + int(row["n_failed"])
            bar.update(1)
            if len(seen) % step == 0 or len(seen) == len(descs):  # for logs without a TTY
                log.info("embed: %d/%d chunks done (%d reused)", len(seen), len(descs), reused)
    pipeline_s = time.perf_counter() - t0
    if len(seen) != len(descs):  # Ray Data lost a chunk: never commit a partial listing
        raise RuntimeError(f"{len(descs) - len(seen)} chunk(s) produced no result")
    report: dict[str, Any] = {
        "kind": REPORT_KIND, "source": listing.source, "source_kind": listing.kind,
        "images_root": listing.images_root, "n_listed": len(listing),
        "dim": model.dim, "model": model.uri, "model_format": model.format,
        "model_sha256": model.sha256, "model_config": model.sidecar,
        "preprocess": model.preprocess.to_dict(),
        "chunk_size": spec.chunk_size, "chunks": len(descs), "reused_chunks": reused,
        "computed_chunks": len(descs) - reused, "computed_images": computed_images,
        "actors": actors, "device": "cuda" if use_gpu else "cpu",
        "pipeline_seconds": round(pipeline_s, 3),
        "images_per_s": round(computed_images / pipeline_s, 1) if computed_images else None,
    }
    if not spec.commit:
        report.update({"committed": False, "seconds": round(time.perf_counter() - t_start, 3)})
        log.info("embed: %d chunk(s) under %s (%d reused); --no-commit: stopping before the "
                 "commit", len(descs), work, reused)
        return report
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    with storage_errors(spec.output):
        report = _commit(spec, listing, model, len(descs), work, report)
    _remove_work(work, so)
    report["committed"] = True
    if report["n_embedded"] == 0:
        log.warning("embed: no image could be embedded (%d failed): see %s/%s for why",
                    report["n_failed"], spec.output, FAILED)
    log.info("embed: %d embedded, %d failed, %d/%d chunks reused, %.1f s", report["n_embedded"],
             report["n_failed"], reused, len(descs), report["seconds"])
    return report
