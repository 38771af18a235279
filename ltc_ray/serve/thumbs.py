"""Thumbnails made on demand and cached on disk; the original bytes are never served.

The seed served full-resolution originals. Here an image is opened through fsspec
(local or object storage), turned upright (EXIF orientation), reduced to fit
``size x size`` (``size`` in 64/128/256) and re-encoded as JPEG. The result is cached
under ``cache_dir`` by the sha256 of the image URI, the size and the file's stamp (bytes,
modification time, ETag: :func:`ltc_ray.io.fs.file_stamp`), so a replaced image gets a
new thumbnail. An image that cannot be read or decoded (or is absurdly large) gets a
generated placeholder tile instead of an error, and so do samples without names.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os

from ltc_ray.io.fs import file_stamp, url_to_fs, write_bytes_atomic

__all__ = ["MAX_PIXELS", "SIZES", "Thumbnails", "default_cache_dir", "placeholder_jpeg"]

log = logging.getLogger("ltc_ray")

SIZES = (64, 128, 256)
MAX_PIXELS = 100_000_000  # larger images (decompression bombs) get a placeholder
MAX_BYTES = 512 << 20  # and so do files larger than this
JPEG_QUALITY = 85


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/ltc-ray/thumbs`` (``~/.cache/...``): per user, not a shared /tmp
    folder another user could fill with forged thumbnails."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ltc-ray", "thumbs")


@functools.lru_cache(maxsize=512)
def placeholder_jpeg(text: str, size: int) -> bytes:
    """A grey tile with ``text`` (a sample id, or why there is no image) as JPEG."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (size, size), (214, 217, 222))
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=max(9, size // 7))
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        font = ImageFont.load_default()
    text = text[:24]
    box = draw.textbbox((0, 0), text, font=font)
    w, h = box[2] - box[0], box[3] - box[1]
    draw.text(((size - w) / 2 - box[0], (size - h) / 2 - box[1]), text, fill=(70, 74, 82),
              font=font)
    draw.rectangle((0, 0, size - 1, size - 1), outline=(180, 184, 190))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _make_thumbnail(fh, size: int) -> bytes:
    from PIL import Image, ImageOps

    with Image.open(fh) as img:
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"image too large ({img.width}x{img.height})")
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale directly
        img = ImageOps.exif_transpose(img)
        if img.mode not in ("RGB", "L"):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
        return buf.getvalue()


class Thumbnails:
    """Makes and caches JPEG thumbnails of image URIs."""

    def __init__(self, cache_dir: str | None = None, storage_options: dict | None = None):
        self.cache_dir = os.path.abspath(cache_dir or default_cache_dir())
        self.storage_options = storage_options
        os.makedirs(self.cache_dir, exist_ok=True)

    def cache_path(self, uri: str, size: int, stamp: dict) -> str:
        """Where the thumbnail of ``uri`` at ``size`` with this file stamp is cached."""
        key = json.dumps({"uri": uri, "size": size, "stamp": stamp}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()
        return os.path.join(self.cache_dir, digest[:2], f"{digest}.jpg")

    def get(self, uri: str, size: int) -> tuple[bytes, str]:
        """``(jpeg, kind)`` for the image at ``uri``: kind is ``cached``, ``made``,
        ``missing`` or ``unreadable`` (the last two: a placeholder tile)."""
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}")
        fs, path = url_to_fs(uri, self.storage_options)
        try:
            stamp = file_stamp(fs, path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            return placeholder_jpeg("missing", size), "missing"
        except OSError as exc:
            log.warning("serve: cannot stat image %s: %s", uri, exc)
            return placeholder_jpeg("unreadable", size), "unreadable"
        cached = self.cache_path(uri, size, stamp)
        try:
            with open(cached, "rb") as fh:
                return fh.read(), "cached"
        except FileNotFoundError:
            pass
        try:
            if stamp["bytes"] > MAX_BYTES or fs.isdir(path):
                raise ValueError("not an image file of a sane size")
            with fs.open(path, "rb") as fh:
                data = _make_thumbnail(fh, size)
        except Exception as exc:  # noqa: BLE001 - any undecodable file: a placeholder tile
            log.info("serve: no thumbnail for %s: %s: %s", uri, type(exc).__name__, exc)
            return placeholder_jpeg("unreadable", size), "unreadable"
        write_bytes_atomic(cached, data)
        return data, "made"
