"""Names of a finished run's samples: row ``i`` of the run's input is ``sample_id`` ``i``.

Two sources, both read by row range without loading every name:

- a text file, one name per line (line ``i`` = sample_id ``i``; the seed's
  ``img_names.txt``): one streamed pass counts the lines and keeps a line-offset index
  (``int64``, 8 bytes a line, no names), after which any row range or set of rows is a
  ranged read;
- a Parquet file with a string ``path`` column (the embedding job's ``embeddings.parquet``,
  or a re-cluster's input subset), read by row group.

``images_root`` (what relative names are relative to) comes from the embedding job's
``report.json`` beside the features file.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ltc_ray.errors import InputError, brief, storage_errors
from ltc_ray.io.fs import join_uri, open_uri, url_to_fs
from ltc_ray.io.output import RUN, read_success

__all__ = ["EMBEDDINGS_REPORT_KIND", "PATH_COLUMN", "SampleNames", "image_uri", "is_absolute"]

log = logging.getLogger("ltc_ray")

PATH_COLUMN = "path"
EMBEDDINGS_REPORT_KIND = "ltc-ray-embeddings"
_PARQUET_SUFFIXES = (".parquet", ".pq")
_SCAN_BYTES = 8 << 20  # the text index pass reads this much at a time
_SPAN_GAP_BYTES = 1 << 20  # take(): rows closer than this share one ranged read
_JSON_MAX_BYTES = 64 << 20


def _is_parquet(uri: str) -> bool:
    return uri.lower().rstrip("/").endswith(_PARQUET_SUFFIXES)


def _dirname(uri: str) -> str:
    """The folder holding ``uri`` (``.`` for a bare file name)."""
    head, sep, _ = uri.rstrip("/").rpartition("/")
    if not sep:
        return "."
    return head if head and not head.endswith(":/") else head + "/"


def _read_json(uri: str, storage_options: dict | None) -> dict:
    with open_uri(uri, "rb", storage_options) as fh:
        raw = fh.read(_JSON_MAX_BYTES + 1)
    try:
        value = json.loads(raw.decode("utf-8")) if len(raw) <= _JSON_MAX_BYTES else None
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise InputError(uri, "is not a JSON object ltc-ray wrote; the result is damaged")
    return value



def is_absolute(name: str) -> bool:
    """A full URI or an absolute path: used as is, not joined onto the images root."""
    return "://" in name or name.startswith("/")


def image_uri(images_root: str | None, name: str) -> str:
    """The image a listed name stands for: the name itself when it is a URI or absolute
    path, else joined onto ``images_root`` (when known)."""
    if is_absolute(name) or not images_root:
        return name
    return join_uri(images_root, name)

class SampleNames:
    """Names of a finished run's samples (row i of the run's input = sample_id i)."""

    n_rows: int
    images_root: str | None
    source: str

    def __init__(self, source: str, n_rows: int, *, kind: str,
                 images_root: str | None = None, storage_options: dict | None = None,
                 line_starts: np.ndarray | None = None,
                 row_group_starts: np.ndarray | None = None) -> None:
        self.source = source
        self.n_rows = int(n_rows)
        self.images_root = images_root
        self.kind = kind  # "text" | "parquet"
        self.storage_options = storage_options
        # text: byte offset of line i's first byte; entry n_rows is one past the last
        # line's terminator (a final line without a newline gets a virtual one)
        self._line_starts = line_starts
        # parquet: first row of each row group, then n_rows
        self._rg_starts = row_group_starts
        self._metadata: pq.FileMetaData | None = None

    # -- construction ---------------------------------------------------------------
    @classmethod
    def for_output(cls, output_uri: str, names_uri: str | None = None,
                   storage_options: dict | None = None, *,
                   manifest: dict | None = None) -> SampleNames:
        """The names of a finished output's samples: from ``names_uri`` (a text file, one
        name per line; a ``.parquet`` file is read by its ``path`` column), else from the
        run's input features when that is Parquet with a string ``path`` column; else an
        :class:`InputError` saying to pass ``--names``. ``manifest``: the output's
        ``_SUCCESS`` when the caller has already read it (checked by ``read_success``)."""
        with storage_errors(output_uri):
            if manifest is None:
                manifest = read_success(output_uri, storage_options)
            run = _read_json(join_uri(output_uri, RUN), storage_options)
        n = int(manifest["rows"])
        if run.get("n_samples") not in (None, n):
            raise InputError(join_uri(output_uri, RUN), f"says n_samples={run['n_samples']} "
                             f"but _SUCCESS lists {n} rows; the result is damaged")
        features = run.get("features")
        if names_uri:
            with storage_errors(names_uri):
                if _is_parquet(names_uri):
                    return cls.from_parquet(names_uri, n, storage_options, flag="--names")
                return cls.from_text(names_uri, n, storage_options)
        if isinstance(features, str) and _is_parquet(features):
            with storage_errors(features):
                fs, path = url_to_fs(features, storage_options)
                if not fs.exists(path):
                    raise InputError(features, f"the run's input (run.json 'features' of "
                                     f"{output_uri}) is gone; pass --names FILE (one name a "
                                     "line, line i = sample_id i)")
                try:
                    with fs.open(path, "rb") as fh:
                        has_path = PATH_COLUMN in pq.ParquetFile(fh).schema_arrow.names
                except pa.ArrowException:
                    raise InputError(features, "the run's input is not a readable Parquet "
                                     "file; pass --names FILE") from None
                if has_path:
                    return cls.from_parquet(features, n, storage_options)
        shown = brief(features) if isinstance(features, str) else "none recorded"
        raise InputError(output_uri, f"its input ({shown}) holds no names (a Parquet file "
                         f"with a '{PATH_COLUMN}' column, as `ltc-ray embed` writes); pass "
                         "--names FILE (one name a line, line i = sample_id i)")

    @classmethod
    def from_text(cls, uri: str, n_expected: int | None = None,
                  storage_options: dict | None = None) -> SampleNames:
        """A names file: UTF-8, one name per line, ``\\n`` or ``\\r\\n`` endings, the last
        line's newline optional. One streamed pass builds the line-offset index; an empty
        line or a count other than ``n_expected`` is an :class:`InputError`."""
        fs, path = url_to_fs(uri, storage_options)
        if not fs.exists(path) or fs.isdir(path):
            raise InputError(uri, "names file not found (--names)" if not fs.exists(path)
                             else "names file is a directory (--names)")
        newlines = []
        size = 0
        with fs.open(path, "rb") as fh:
            while True:
                block = fh.read(_SCAN_BYTES)
                if not block:
                    break
                found = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
                newlines.append(found.astype(np.int64) + size)
                size += len(block)
        ends = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
        if size and (not len(ends) or ends[-1] != size - 1):
            ends = np.append(ends, size)  # the seed writes no final newline
        starts = np.empty(len(ends) + 1, dtype=np.int64)
        starts[0] = 0
        starts[1:] = ends + 1
        lengths = np.diff(starts) - 1
        if len(lengths) and int(lengths.min()) <= 0:
            line = int(np.argmax(lengths <= 0)) + 1
            raise InputError(uri, f"line {line} is empty; a names file holds one name a line")
        if n_expected is not None and len(ends) != n_expected:
            raise InputError(uri, f"holds {len(ends)} names but the result has {n_expected} "
                             "samples (line i must name sample_id i)")
        return cls(uri, len(ends), kind="text", storage_options=storage_options,
                   line_starts=starts)

    @classmethod
    def from_parquet(cls, uri: str, n_expected: int | None = None,
                     storage_options: dict | None = None, flag: str = "features") -> SampleNames:
        """A Parquet file with a string ``path`` column; ``images_root`` from the
        embedding job's ``report.json`` beside it."""
        fs, path = url_to_fs(uri, storage_options)
        if not fs.exists(path):
            raise InputError(uri, f"names file not found ({flag})")
        try:
            with fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as exc:
            if isinstance(exc, OSError) and not (type(exc) is OSError and exc.errno is None):
                raise
            raise InputError(uri, f"not a readable Parquet file ({brief(exc)})") from None
        if schema.names.count(PATH_COLUMN) != 1:
            raise InputError(uri, f"needs one string column '{PATH_COLUMN}' (columns: "
                             f"{brief(', '.join(schema.names) or 'none')})")
        t = schema.field(PATH_COLUMN).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise InputError(uri, f"column '{PATH_COLUMN}' has type {brief(t)}, expected string")
        rows = np.array([meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
                        dtype=np.int64)
        rg_starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        n = int(rg_starts[-1])
        if n_expected is not None and n != n_expected:
            raise InputError(uri, f"holds {n} rows but the result has {n_expected} samples "
                             "(row i must name sample_id i)")
        names = cls(uri, n, kind="parquet", images_root=_images_root(uri, storage_options),
                    storage_options=storage_options, row_group_starts=rg_starts)
        names._metadata = meta  # later reads skip the footer request
        return names

    # -- reading ----------------------------------------------------------------------
    def read(self, start: int, stop: int) -> pa.Array:
        """String names of rows ``[start, stop)``: one ranged read (text) or only the
        overlapping row groups (Parquet)."""
        if not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"row range [{start}, {stop}) outside [0, {self.n_rows}) of "
                             f"{self.source}")
        if start == stop:
            return pa.array([], type=pa.string())
        if self.kind == "text":
            fs, path = url_to_fs(self.source, self.storage_options)
            lo, hi = int(self._line_starts[start]), int(self._line_starts[stop]) - 1
            return pa.array(self._lines(fs.cat_file(path, start=lo, end=hi), stop - start),
                            type=pa.string())
        groups = np.arange(np.searchsorted(self._rg_starts, start, side="right") - 1,
                           np.searchsorted(self._rg_starts, stop, side="left"))
        column = self._row_groups(groups)
        first = int(self._rg_starts[groups[0]])
        return self._checked(column.slice(start - first, stop - start), start)

    def take(self, sample_ids: np.ndarray) -> list[str]:
        """Names of arbitrary rows, in the order given: reads only the row groups (Parquet)
        or byte spans (text, nearby rows share one read) that hold them."""
        ids = np.asarray(sample_ids, dtype=np.int64).ravel()
        if not len(ids):
            return []
        if int(ids.min()) < 0 or int(ids.max()) >= self.n_rows:
            raise ValueError(f"sample_id outside [0, {self.n_rows}) of {self.source}")
        uniq, inverse = np.unique(ids, return_inverse=True)
        if self.kind == "text":
            got = self._take_text(uniq)
        else:
            groups = np.unique(np.searchsorted(self._rg_starts, uniq, side="right") - 1)
            # the needed row groups, read one after another: positions in their concatenation
            lengths = np.diff(self._rg_starts)[groups]
            offset_of = np.zeros(len(self._rg_starts), dtype=np.int64)
            offset_of[groups] = np.cumsum(lengths) - lengths
            group_of = np.searchsorted(self._rg_starts, uniq, side="right") - 1
            local = offset_of[group_of] + uniq - self._rg_starts[group_of]
            column = self._row_groups(groups)
            got = self._checked(column.take(pa.array(local)), int(uniq[0])).to_pylist()
        return [got[i] for i in inverse.tolist()]

    def image_uri(self, name: str) -> str:
        """The image a name refers to (:func:`image_uri` under ``images_root``)."""
        return image_uri(self.images_root, name)

    # -- internals --------------------------------------------------------------------
    def _lines(self, data: bytes, count: int) -> list[str]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(self.source, f"is not UTF-8 text ({brief(exc)})") from None
        lines = text.split("\n")
        if len(lines) != count:  # the file changed after its index was built
            raise InputError(self.source, "changed while being read; run the export again")
        if "\r" in text:
            lines = [line[:-1] if line.endswith("\r") else line for line in lines]
        return lines

    def _take_text(self, uniq: np.ndarray) -> list[str]:
        """Sorted unique rows of a text file: rows whose bytes lie within
        ``_SPAN_GAP_BYTES`` of each other are fetched in one ranged read."""
        fs, path = url_to_fs(self.source, self.storage_options)
        starts, ends = self._line_starts[uniq], self._line_starts[uniq + 1] - 1
        breaks = np.flatnonzero(starts[1:] - ends[:-1] > _SPAN_GAP_BYTES) + 1
        bounds = np.concatenate([[0], breaks, [len(uniq)]])
        out: list[str] = []
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            first, last = int(uniq[a]), int(uniq[b - 1])
            data = fs.cat_file(path, start=int(self._line_starts[first]),
                               end=int(self._line_starts[last + 1]) - 1)
            lines = self._lines(data, last - first + 1)
            out.extend(lines[i] for i in (uniq[a:b] - first).tolist())
        return out

    def _row_groups(self, groups: np.ndarray) -> pa.Array:
        """The ``path`` column of the given row groups, concatenated."""
        fs, path = url_to_fs(self.source, self.storage_options)
        try:
            with fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh, metadata=self._metadata)
                table = pf.read_row_groups([int(g) for g in groups], columns=[PATH_COLUMN])
        except pa.ArrowException as exc:
            raise InputError(self.source, f"corrupt Parquet file ({brief(exc)})") from None
        column = table.column(0).combine_chunks()
        return column.cast(pa.string()) if pa.types.is_large_string(column.type) else column

    def _checked(self, names: pa.Array, first_row: int) -> pa.Array:
        if names.null_count:
            raise InputError(self.source, f"column '{PATH_COLUMN}' has null values (near row "
                             f"{first_row})")
        return names


def _images_root(features_uri: str, storage_options: dict | None) -> str | None:
    """``images_root`` of the embedding job's ``report.json`` beside ``features_uri``
    (None without one: names are then taken as they are)."""
    report = join_uri(_dirname(features_uri), "report.json")
    fs, path = url_to_fs(report, storage_options)
    if not fs.exists(path):
        return None
    try:
        value = _read_json(report, storage_options)
    except InputError:
        log.warning("%s is not JSON; ignoring it (images_root unknown)", report)
        return None
    if value.get("kind") != EMBEDDINGS_REPORT_KIND:
        return None
    root = value.get("images_root")
    return root if isinstance(root, str) and root else None
