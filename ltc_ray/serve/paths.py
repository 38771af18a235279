"""Resolve a user-supplied path under a root, refusing anything that could leave it.

The seed browser joined the URL path onto its image directory as is (``/image/../../etc``
served any file). Here a path is refused (:class:`PathRefused`, HTTP 403) when any
decoding of it holds a ``..`` or ``.`` segment, a backslash, a NUL or other control
character, a leading ``/`` (absolute), a scheme (``s3:``, ``file:``, ``C:``) or a segment
starting with ``~``; percent-encoding is decoded repeatedly, so ``%2e%2e`` and
``%252e%252e`` are caught too. On the local disk the joined path's real path (symbolic
links followed) must also lie inside the root's real path; on object storage there are no
links, and the normalised key must keep the root's prefix.
"""

from __future__ import annotations

import os
import posixpath
import re
from urllib.parse import unquote

from ltc_ray.io.fs import is_local_fs, join_uri, url_to_fs

__all__ = ["MAX_PATH_CHARS", "PathRefused", "clean_segments", "is_uri_or_absolute",
           "resolve_name", "resolve_under"]

MAX_PATH_CHARS = 4096
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class PathRefused(ValueError):
    """A path that names (or could name) something outside its root: answered with 403."""


def _decodings(path: str) -> list[str]:
    """``path`` and every further percent-decoding of it until it stops changing."""
    forms = [path]
    for _ in range(4):
        nxt = unquote(forms[-1])
        if nxt == forms[-1]:
            break
        forms.append(nxt)
    return forms


def is_uri_or_absolute(name: str) -> bool:
    """Whether ``name`` is an absolute path or a URI (``s3://...``, ``file:...``, ``C:\\``)."""
    return name.startswith(("/", "\\")) or bool(_SCHEME.match(name))


def clean_segments(path: str) -> list[str]:
    """The path's ``/``-separated segments (empty ones dropped), or :class:`PathRefused`
    if any decoding of it could step out of a root."""
    if not isinstance(path, str) or len(path) > MAX_PATH_CHARS:
        raise PathRefused("path too long")
    for form in _decodings(path):
        if _CONTROL.search(form):
            raise PathRefused("control character in path")
        if "\\" in form:
            raise PathRefused("backslash in path")
        if is_uri_or_absolute(form):
            raise PathRefused("absolute path or URI")
        for seg in form.split("/"):
            if seg in (".", "..") or seg.startswith("~"):
                raise PathRefused(f"segment {seg!r} not allowed")
    return [seg for seg in path.split("/") if seg]


def _inside(child: str, parent: str) -> bool:
    parent = parent.rstrip("/") or "/"
    return child == parent or child.startswith(parent if parent == "/" else parent + "/")


def resolve_under(root_uri: str, path: str, storage_options: dict | None = None) -> str:
    """URI of ``path`` inside ``root_uri`` (which need not exist yet), or
    :class:`PathRefused`. Local roots: symbolic links are followed and the real path must
    stay inside the root's real path."""
    segments = clean_segments(path)
    target = join_uri(root_uri, *segments) if segments else root_uri
    fs, root_path = url_to_fs(root_uri, storage_options)
    _, target_path = url_to_fs(target, storage_options)
    if is_local_fs(fs):
        real_root = os.path.realpath(root_path)
        real = os.path.realpath(target_path)
        if not _inside(real, real_root):
            raise PathRefused("resolves outside the root (a symbolic link)")
        return target
    root_key = "/" + posixpath.normpath(root_path.strip("/"))
    key = "/" + posixpath.normpath(target_path.strip("/"))
    if not _inside(key, root_key):
        raise PathRefused("resolves outside the root")
    return target


def resolve_name(root_uri: str | None, name: str, storage_options: dict | None = None) -> str:
    """URI of a sample's image name: a relative name is resolved safely under ``root_uri``;
    an absolute name or URI must lie inside ``root_uri`` (after normalisation, links
    followed on the local disk). Without a root, only absolute names/URIs resolve (they are
    the run's own input, as the embedding job listed them)."""
    if not is_uri_or_absolute(name):
        if root_uri is None:
            raise PathRefused("relative image name but no images root")
        return resolve_under(root_uri, name, storage_options)
    if any(_CONTROL.search(form) for form in _decodings(name)):
        raise PathRefused("control character in name")
    if root_uri is None:
        return name
    fs, root_path = url_to_fs(root_uri, storage_options)
    name_fs, name_path = url_to_fs(name, storage_options)
    if type(name_fs) is not type(fs):
        raise PathRefused("image on another storage than the images root")
    if is_local_fs(fs):
        if not _inside(os.path.realpath(name_path), os.path.realpath(root_path)):
            raise PathRefused("image outside the images root")
        return name
    if not _inside("/" + posixpath.normpath(name_path.strip("/")),
                   "/" + posixpath.normpath(root_path.strip("/"))):
        raise PathRefused("image outside the images root")
    return name
