"""``ltc-ray serve``: browse results in a web page (FastAPI on uvicorn, the ``ui`` extra).

Binds 127.0.0.1 by default (the seed bound 0.0.0.0 with Flask's debugger on); any other
address is allowed with a warning, since the page can start jobs and write annotations
and has no login. FastAPI and uvicorn are imported only once the flags are checked.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Sequence

from ltc_ray.cli.args import EXIT_OK, _Parser, _storage_options, add_storage_options
from ltc_ray.errors import InputError, MissingDependency, storage_errors
from ltc_ray.io.fs import url_to_fs

log = logging.getLogger("ltc_ray")

UI_INSTALL = "pip install 'ltc-ray[ui]'"


def serve_parser() -> argparse.ArgumentParser:
    """``serve``'s flags."""
    p = _Parser(prog="serve", description="Browse results in a web page: runs, overviews with "
                "plots, clusters by size with thumbnails, search, re-cluster, annotations. "
                "Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--results", required=True,
                   help="results root URI: every folder below it holding _SUCCESS is a run")
    p.add_argument("--images", help="images root URI that relative image names are joined "
                   "onto (default: each run's embedding report's images_root)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; anything else is reachable "
                   "from other machines: the page has no login)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--cache-dir", help="thumbnail cache folder (default "
                   "~/.cache/ltc-ray/thumbs)")
    add_storage_options(p)
    p.add_argument("--recluster-cpus", type=int, default=1,
                   help="CPUs of the local Ray a re-cluster job starts (default 1)")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_main(argv: Sequence[str]) -> int:
    """``serve``: check the roots, build the app, run uvicorn until interrupted."""
    args = serve_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise InputError("--port", f"must be in 1..65535, got {args.port}")
    if args.recluster_cpus < 1:
        raise InputError("--recluster-cpus", f"must be a positive integer, got "
                         f"{args.recluster_cpus}")
    so = _storage_options(args.storage_options)
    for flag, uri in (("--results", args.results), ("--images", args.images)):
        if uri:
            with storage_errors(uri):
                fs, path = url_to_fs(uri, so)
                if not fs.isdir(path):
                    raise InputError(uri, f"is not a folder ({flag})")
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingDependency.from_import_error("uvicorn", UI_INSTALL, exc) from None
    from ltc_ray.serve.app import create_app  # raises MissingDependency without fastapi

    loopback = _is_loopback(args.host)
    if not loopback:
        print(f"warning: binding {args.host}: the page is reachable from other machines and "
              "has no login (it can start re-cluster jobs and write annotations); use the "
              "default 127.0.0.1 with an SSH tunnel instead", file=sys.stderr)
    allowed = ["127.0.0.1", "localhost", "[::1]", args.host] if loopback else None
    app = create_app(args.results, args.images, cache_dir=args.cache_dir, storage_options=so,
                     recluster_cpus=args.recluster_cpus, allowed_hosts=allowed)
    shown = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    print(f"serving {args.results} at http://{shown}:{args.port}/ (Ctrl-C to stop)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host.strip("[]"), port=args.port, log_level="warning",
                access_log=False, server_header=False)
    return EXIT_OK
