"""The web API and page for browsing results (FastAPI): ``create_app`` builds it.

Routes (all JSON unless noted; 400 bad parameters, 403 a path outside the roots, 404 an
unknown run/cluster/file):

- ``GET /`` the page, ``GET /static/{file}`` its JavaScript and CSS;
- ``GET /api/runs``, ``/api/overview``, ``/api/clusters``, ``/api/cluster``,
  ``/api/search``, ``/api/thumb`` (JPEG), ``POST /api/recluster``, ``GET /api/jobs/{job}``,
  ``GET|POST /api/annotations``;
- the seed's ``GET /browse/{path}`` (a folder layout under the results root, paged) and
  ``GET /image/{path}`` (a thumbnail of an image under the images root, never the file).

Unlike the seed: no CORS (the page is served from the same origin), no debug mode, a
``Host`` check against DNS rebinding when the CLI binds a loopback address, POSTs only
with a JSON body, and security headers (CSP, nosniff, no framing) on every answer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from importlib import resources
from urllib.parse import quote, urlencode

import numpy as np

from ltc_ray.errors import InputError, MissingDependency, brief
from ltc_ray.io.fs import file_stamp, join_uri, url_to_fs
from ltc_ray.io.names import SampleNames
from ltc_ray.report.overview import run_overview
from ltc_ray.report.plots import overview_svgs
from ltc_ray.serve.annotations import check_annotation
from ltc_ray.serve.paths import PathRefused, resolve_name, resolve_under
from ltc_ray.serve.recluster import Reclusterer
from ltc_ray.serve.runs import RunIndex, RunRegistry, UnknownRun
from ltc_ray.serve.thumbs import SIZES, Thumbnails, placeholder_jpeg

try:
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, Field
except ImportError as exc:  # the ui extra
    raise MissingDependency.from_import_error("fastapi", "pip install 'ltc-ray[ui]'",
                                              exc) from None

__all__ = ["CLUSTER_PAGE", "create_app"]

log = logging.getLogger("ltc_ray")

CLUSTER_PAGE = 48  # thumbnails per cluster page (the seed's 6 rows of 8)
MAX_LIMIT = 1000
MAX_QUERY_CHARS = 200
FOLDER_NAMES = "img_names.txt"
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
STATIC = resources.files("ltc_ray.serve") / "static"


class ReclusterRequest(BaseModel):
    run: str = Field(max_length=4096)
    cluster_id: int
    method: str = "kmeans"
    k: int | None = None


class AnnotationRequest(BaseModel):
    run: str = Field(max_length=4096)
    action: str
    cluster_ids: list[int] = Field(default_factory=list)
    sample_ids: list[int] = Field(default_factory=list)
    name: str | None = None


class _BadParam(ValueError):
    """A query parameter out of range: 400."""


def _thumb_url(run: str, sample: int, size: int = 128) -> str:
    return "/api/thumb?" + urlencode({"run": run, "sample": int(sample), "size": size})


def _check_query(q: str | None) -> str | None:
    if q is None:
        return None
    q = q.strip()
    if len(q) > MAX_QUERY_CHARS:
        raise _BadParam(f"q is longer than {MAX_QUERY_CHARS} characters")
    return q or None


class _State:
    """What the routes share: the registry, thumbnails, jobs, the images root."""

    def __init__(self, results_uri: str, images_uri: str | None, cache_dir: str | None,
                 storage_options: dict | None, recluster_cpus: int):
        self.storage_options = storage_options
        self.registry = RunRegistry(results_uri, images_uri, storage_options)
        self.thumbs = Thumbnails(cache_dir, storage_options)
        self.jobs = Reclusterer(self.registry, recluster_cpus, storage_options)
        self.images_uri = images_uri
        self._images_guess: tuple[float, str | None] | None = None
        self._folder_names: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    def images_root(self) -> str | None:
        """``--images``, else the one images root every run with names agrees on."""
        if self.images_uri:
            return self.images_uri
        now = time.monotonic()
        if self._images_guess is None or now - self._images_guess[0] > 30:
            roots = {row.get("images_root") for row in self.registry.list_runs()} - {None}
            self._images_guess = (now, roots.pop() if len(roots) == 1 else None)
        return self._images_guess[1]

    def folder_names(self, uri: str):
        """A folder's ``img_names.txt`` with its line index (SampleNames over a text
        file), cached by the file's stamp: a page is one ranged read."""

        fs, path = url_to_fs(uri, self.storage_options)
        stamp = file_stamp(fs, path)
        key = (uri, repr(sorted(stamp.items())))
        with self._lock:
            names = self._folder_names.get(key)
        if names is None:
            names = SampleNames.from_text(uri, None, self.storage_options)
            with self._lock:
                if len(self._folder_names) > 256:
                    self._folder_names.clear()
                self._folder_names[key] = names
        return names


def _cluster_row(index: RunIndex, cid: int, names: dict[int, str]) -> dict:
    rep = int(index.representative[cid])
    return {"cluster_id": int(cid), "size": int(index.sizes[cid]), "name": names.get(int(cid)),
            "representative": rep, "thumb": _thumb_url(index.run, rep)}


def create_app(results_uri: str, images_uri: str | None = None, *, cache_dir: str | None = None,
               storage_options: dict | None = None, recluster_cpus: int = 1,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The browsing app over the runs under ``results_uri`` (any fsspec URI).

    ``images_uri``: where relative image names live (default: each run's embedding report's
    ``images_root``). ``cache_dir``: thumbnail cache (default ``~/.cache/ltc-ray/thumbs``).
    ``allowed_hosts``: ``Host`` header values accepted (None: any; the CLI passes the
    loopback names when it binds a loopback address, against DNS rebinding)."""
    state = _State(results_uri, images_uri, cache_dir, storage_options, recluster_cpus)
    so = storage_options
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.jobs.shutdown()  # stop a running re-cluster subprocess with the server

    app = FastAPI(title="ltc-ray results", docs_url=None, redoc_url=None, openapi_url=None,
                  debug=False, lifespan=lifespan)
    app.state.ltc = state
    hosts = {h.lower() for h in allowed_hosts} if allowed_hosts else None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if hosts is not None:
            host = (request.headers.get("host") or "").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in hosts and host not in hosts:
                return JSONResponse({"detail": "host not allowed"}, status_code=400)
        if request.method == "POST":
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return JSONResponse({"detail": "POST a JSON body (Content-Type: "
                                     "application/json)"}, status_code=415)
            origin = request.headers.get("origin")
            if origin and origin.split("://", 1)[-1].lower() != \
                    (request.headers.get("host") or "").lower():
                return JSONResponse({"detail": "cross-origin request refused"},
                                    status_code=403)
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Content-Security-Policy", CSP)
        return response

    @app.exception_handler(PathRefused)
    async def _refused(request: Request, exc: PathRefused):
        return JSONResponse({"detail": f"refused: {exc}"}, status_code=403)

    @app.exception_handler(UnknownRun)
    async def _unknown(request: Request, exc: UnknownRun):
        return JSONResponse({"detail": f"not found: {exc}"}, status_code=404)

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError):
        return JSONResponse({"detail": brief(f"{exc.where}: {exc.problem}", 400)},
                            status_code=400)

    @app.exception_handler(_BadParam)
    async def _bad(request: Request, exc: _BadParam):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=400)

    def run_index(run: str) -> RunIndex:
        return state.registry.get(run)

    def cluster_id_of(index: RunIndex, cid: int) -> int:
        if not 0 <= cid < index.n_clusters:
            raise UnknownRun(f"cluster {cid} (run {index.run} has {index.n_clusters})")
        return cid

    # ------------------------------------------------------------------ page
    @app.get("/", include_in_schema=False)
    def page():
        index_html = STATIC / "index.html"
        if not index_html.is_file():
            return JSONResponse({"detail": "the page is not installed"}, status_code=404)
        return FileResponse(str(index_html), media_type="text/html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # ------------------------------------------------------------------ API
    @app.get("/api/runs")
    def runs():
        return {"runs": state.registry.list_runs()}

    @app.get("/api/overview")
    def overview(run: str):

        index = run_index(run)
        out = run_overview(index.uri, so)
        out["svg"] = overview_svgs(out)
        out["run"] = run
        out["parent"] = index.parent
        out["has_names"] = index.names is not None
        return out

    @app.get("/api/clusters")
    def clusters(run: str, sort: str = "size", order: str = "desc",
                 offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=MAX_LIMIT),
                 q: str | None = None):
        if sort not in ("size", "id", "name"):
            raise _BadParam("sort must be size, id or name")
        if order not in ("asc", "desc"):
            raise _BadParam("order must be asc or desc")
        q = _check_query(q)
        index = run_index(run)
        names = index.cluster_names()
        k = index.n_clusters
        ids = np.arange(k, dtype=np.int64)
        matches = None
        if q is not None:
            hits = index.match(q)
            matches = np.bincount(index.cluster_of[hits], minlength=k)
            ids = ids[matches > 0]
        if sort == "size":
            keys = index.sizes[ids] if order == "asc" else -index.sizes[ids]
            ids = ids[np.lexsort((ids, keys))]  # ties by id, ascending
        elif sort == "id":
            ids = ids if order == "asc" else ids[::-1]
        else:  # named clusters by name, then the unnamed by id
            named = sorted((names[int(c)].casefold(), int(c)) for c in ids if int(c) in names)
            if order == "desc":
                named.reverse()
            unnamed = [int(c) for c in ids if int(c) not in names]
            ids = np.asarray([c for _, c in named] + unnamed, dtype=np.int64)
        page = ids[offset:offset + limit]
        rows = [_cluster_row(index, int(c), names) for c in page]
        if matches is not None:
            for row in rows:
                row["matches"] = int(matches[row["cluster_id"]])
        return {"run": run, "total": int(len(ids)), "offset": offset, "limit": limit,
                "sort": sort, "order": order, "q": q, "clusters": rows}

    @app.get("/api/cluster")
    def cluster(run: str, id: int, page: int = Query(1, ge=1),  # noqa: A002 - the contract
                per_page: int = Query(CLUSTER_PAGE, ge=1, le=MAX_LIMIT)):
        index = run_index(run)
        cid = cluster_id_of(index, id)
        members = index.cluster_members(cid)
        total_pages = max(1, math.ceil(len(members) / per_page))
        if page > total_pages:
            raise _BadParam(f"page {page} is beyond the last page ({total_pages})")
        chunk = members[(page - 1) * per_page:page * per_page]
        names = index.names_of(chunk)
        return {"run": run, "cluster_id": cid, "size": int(len(members)),
                "name": index.cluster_names().get(cid),
                "representative": int(index.representative[cid]),
                "page": page, "per_page": per_page, "total_pages": total_pages,
                "members": [{"sample_id": int(s), "name": n, "thumb": _thumb_url(run, int(s))}
                            for s, n in zip(chunk.tolist(), names, strict=True)]}

    @app.get("/api/search")
    def search(run: str, q: str, limit: int = Query(100, ge=1, le=MAX_LIMIT)):
        q = _check_query(q)
        if q is None:
            raise _BadParam("q must not be empty")
        index = run_index(run)
        hits = index.match(q)
        shown = hits[:limit]
        names = index.names_of(shown)
        return {"run": run, "q": q, "total": int(len(hits)),
                "matches": [{"sample_id": int(s), "name": n,
                             "cluster_id": int(index.cluster_of[s]),
                             "thumb": _thumb_url(run, int(s))}
                            for s, n in zip(shown.tolist(), names, strict=True)]}

    def jpeg(data: bytes, kind: str) -> Response:
        return Response(content=data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600",
                                 "X-Thumbnail": kind})

    @app.get("/api/thumb")
    def thumb(run: str, sample: int, size: int = 128):
        if size not in SIZES:
            raise _BadParam(f"size must be one of {', '.join(map(str, SIZES))}")
        index = run_index(run)
        if not 0 <= sample < index.n_samples:
            raise UnknownRun(f"sample {sample} (run {run} has {index.n_samples})")
        if index.names is None:
            return jpeg(placeholder_jpeg(f"#{sample}", size), "placeholder")
        name = index.names_of(np.asarray([sample]))[0]
        try:
            uri = resolve_name(index.images_root, name, so)
        except PathRefused:
            return jpeg(placeholder_jpeg(f"#{sample}", size), "refused")
        data, kind = state.thumbs.get(uri, size)
        return jpeg(data, kind)

    @app.post("/api/recluster")
    def recluster(body: ReclusterRequest):
        job = state.jobs.submit(body.run, body.cluster_id, body.method, body.k)
        return {"job": job.job, "state": job.state}

    @app.get("/api/jobs/{job}")
    def job_state(job: str):
        found = state.jobs.get(job)
        if found is None:
            raise UnknownRun(f"job {brief(job, 40)}")
        return found.to_dict()

    @app.get("/api/annotations")
    def annotations(run: str):
        return {"run": run, "annotations": run_index(run).annotations.rows()}

    @app.post("/api/annotations")
    def annotate(body: AnnotationRequest):
        index = run_index(body.run)
        clusters, samples, name = check_annotation(body.action, body.cluster_ids,
                                                   body.sample_ids, body.name, index.sizes,
                                                   index.cluster_of)
        return index.annotations.append(body.action, clusters.tolist(), samples.tolist(), name)

    # ------------------------------------------------------------------ seed parity
    def browse_folder(path: str, page: int, num_per_page: int) -> dict:
        uri = resolve_under(state.registry.results_uri, path, so)
        fs, fpath = url_to_fs(uri, so)
        fs.invalidate_cache(fpath)
        if not fs.isdir(fpath):
            raise UnknownRun(f"folder {brief(path, 120)}")
        entries = fs.ls(fpath, detail=True)
        dirs = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                      if e.get("type") == "directory")
        dirs = [d for d in dirs if not d.startswith(".")]
        has_names = any(e["name"].rstrip("/").endswith("/" + FOLDER_NAMES)
                        and e.get("type") == "file" for e in entries)
        total, img_names = 0, []
        if has_names:
            names = state.folder_names(join_uri(uri, FOLDER_NAMES))
            total = names.n_rows
            lo = min(total, (page - 1) * num_per_page)
            hi = min(total, lo + num_per_page)
            img_names = ["/image/" + quote(n) for n in names.read(lo, hi).to_pylist()]
        total_pages = math.ceil(total / num_per_page)
        _, root = url_to_fs(state.registry.results_uri, so)
        return {"root_dir_name": root.rstrip("/").rsplit("/", 1)[-1], "path": path.strip("/"),
                "clu_names": dirs, "img_names": img_names,
                "is_last_img_page": page >= total_pages, "total_pages": total_pages,
                "total_images": total, "page": page, "num_per_page": num_per_page}

    @app.get("/browse")
    @app.get("/browse/")
    def browse_root(page: int = Query(1, ge=1),
                    num_per_page: int = Query(CLUSTER_PAGE, ge=1, le=MAX_LIMIT)):
        return browse_folder("", page, num_per_page)

    @app.get("/browse/{path:path}")
    def browse(path: str, page: int = Query(1, ge=1),
               num_per_page: int = Query(CLUSTER_PAGE, ge=1, le=MAX_LIMIT)):
        return browse_folder(path, page, num_per_page)

    @app.get("/image/{path:path}")
    def image(path: str, size: int = 128):
        if size not in SIZES:
            raise _BadParam(f"size must be one of {', '.join(map(str, SIZES))}")
        root = state.images_root()
        if root is None:
            raise UnknownRun("no images root (start the server with --images)")
        uri = resolve_under(root, path, so)
        fs, fpath = url_to_fs(uri, so)
        if not fs.isfile(fpath):
            raise UnknownRun(f"image {brief(path, 120)}")
        data, kind = state.thumbs.get(uri, size)
        if kind == "missing":
            raise UnknownRun(f"image {brief(path, 120)}")
        return jpeg(data, kind)

    return app
