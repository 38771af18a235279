"""A generated labelled image set and a tiny embedding model, for tests and the demo.

Why: the embedding job must be tested (and demonstrated) without downloading a model or
a data set. Each identity gets its own coarse colour pattern (a 4 x 4 grid of random
colours); each of its images is that pattern shifted by up to a pixel, with its own
brightness and pixel noise, saved as PNG or JPEG. The tiny model (average-pool to
8 x 8, flatten, a fixed random projection) then maps images of one identity close
together and different identities far apart, so clustering its embeddings recovers the
identities. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import io
import json

import numpy as np
import yaml
from PIL import Image

from ltc_ray.io.fs import write_bytes_atomic

__all__ = ["CORRUPT_DIR", "identity_of", "make_image_set", "tiny_model_weights",
           "write_tiny_model"]

GRID = 4  # colour cells per side of an identity's pattern
POOL = 8  # the tiny model pools to POOL x POOL
CORRUPT_DIR = "corrupt"
TINY_PREPROCESS = {"size": None, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                   "resize": "shorter+center-crop", "color": "rgb"}


def _identity_patterns(n_identities: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size, 3) float32 in [0, 255]: each identity's upsampled colour grid."""
    grids = rng.integers(0, 256, size=(n_identities, GRID, GRID, 3)).astype(np.float32)
    idx = (np.arange(size) * GRID) // size
    return grids[:, idx][:, :, idx]


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format=fmt, **({"quality": 95}
                                                                  if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_image_set(root: str, n_identities: int, per_identity: int, size: int = 32,
                   seed: int = 0, corrupt: int = 0,
                   storage_options: dict | None = None) -> list[str]:
    """Write ``n_identities * per_identity`` images under ``root`` (any fsspec URI) as
    ``id_<k>/<j>.png`` (even ``j``) or ``.jpg`` (odd ``j``), plus ``corrupt`` damaged
    files ``corrupt/bad_<c>.jpg|png`` (truncated images and random bytes).
    Returns the relative names written, sorted."""
    if n_identities < 1 or per_identity < 1 or size < POOL or size % POOL:
        raise ValueError(f"need n_identities, per_identity >= 1 and size a multiple of {POOL}")
    rng = np.random.default_rng(seed)
    patterns = _identity_patterns(n_identities, size, rng)
    width = max(4, len(str(n_identities - 1)))
    names: list[str] = []
    for k in range(n_identities):  # one identity's images at a time (vectorised inside)
        shifts = rng.integers(-1, 2, size=(per_identity, 2))
        gain = rng.uniform(0.9, 1.1, size=(per_identity, 1, 1, 1)).astype(np.float32)
        noise = rng.normal(0.0, 6.0, size=(per_identity, size, size, 3)).astype(np.float32)
        imgs = np.repeat(patterns[k][None], per_identity, axis=0) * gain + noise
        for j in range(per_identity):  # each image is its own file: encoding is per image
            img = np.roll(imgs[j], tuple(shifts[j]), axis=(0, 1))
            pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
            ext, fmt = (".png", "PNG") if j % 2 == 0 else (".jpg", "JPEG")
            name = f"id_{k:0{width}d}/{j:04d}{ext}"
            write_bytes_atomic(f"{root.rstrip('/')}/{name}", _encode(pixels, fmt),
                               storage_options)
            names.append(name)
    for c in range(corrupt):
        good = _encode(np.clip(patterns[c % n_identities], 0, 255).astype(np.uint8),
                       "JPEG" if c % 3 != 1 else "PNG")
        if c % 3 == 2:  # not an image at all
            data, ext = rng.integers(0, 256, size=200, dtype=np.uint8).tobytes(), ".jpg"
        else:  # a real image cut short
            data, ext = good[: len(good) // 2], ".png" if c % 3 == 1 else ".jpg"
        name = f"{CORRUPT_DIR}/bad_{c:03d}{ext}"
        write_bytes_atomic(f"{root.rstrip('/')}/{name}", data, storage_options)
        names.append(name)
    return sorted(names)


def identity_of(names: list[str]) -> np.ndarray:
    """The identity of each name :func:`make_image_set` wrote (-1 for ``corrupt/``)."""
    out = np.full(len(names), -1, dtype=np.int64)
    for i, name in enumerate(names):
        head = name.replace("\\", "/").split("/")[-2] if "/" in name else ""
        if head.startswith("id_"):
            out[i] = int(head[3:])
    return out


def tiny_model_weights(size: int = 32, dim: int = 32, seed: int = 0) -> np.ndarray:
    """The tiny model's fixed projection, (3 * POOL * POOL, dim) float32."""
    if size % POOL:
        raise ValueError(f"size must be a multiple of {POOL}")
    rng = np.random.default_rng([seed, 7])
    return (rng.standard_normal((3 * POOL * POOL, dim)) / np.sqrt(3 * POOL * POOL)).astype(
        np.float32)


def _stem(path: str) -> str:
    slash = path.rfind("/")
    dot = path.rfind(".")
    return path[:dot] if dot > slash + 1 else path


def write_tiny_model(path: str, kind: str = "torchscript", size: int = 32, dim: int = 32,
                     seed: int = 0, storage_options: dict | None = None) -> str:
    """Write the tiny model (``avg_pool(size/8) -> flatten -> x @ W``) at ``path`` as
    TorchScript (traced) or ONNX (built with the ``onnx`` helper API), and its
    preprocessing sidecar next to it: ``<stem>.yaml`` (TorchScript) or ``<stem>.json``
    (ONNX). The two kinds with the same ``size/dim/seed`` compute the same function.
    Returns the sidecar's path."""
    weights = tiny_model_weights(size, dim, seed)
    k = size // POOL
    if kind == "torchscript":
        import torch

        class Tiny(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.register_buffer("w", torch.from_numpy(weights.copy()))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.flatten(torch.nn.functional.avg_pool2d(x, k), 1) @ self.w

        buf = io.BytesIO()
        traced = torch.jit.trace(Tiny().eval(), torch.zeros(2, 3, size, size))
        torch.jit.save(traced, buf)
        data = buf.getvalue()
        sidecar = _stem(path) + ".yaml"
    elif kind == "onnx":
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        graph = helper.make_graph(
            [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[k, k],
                              strides=[k, k]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["embedding"])],
            "tiny",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
            [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
            initializer=[numpy_helper.from_array(weights, "w")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # readable by every onnxruntime of the last years
        onnx.checker.check_model(model)
        data = model.SerializeToString()
        sidecar = _stem(path) + ".json"
    else:
        raise ValueError(f"kind must be 'torchscript' or 'onnx', got {kind!r}")
    write_bytes_atomic(path, data, storage_options)
    pre = dict(TINY_PREPROCESS, size=[size, size])
    text = (json.dumps(pre, indent=1) if sidecar.endswith(".json")
            else yaml.safe_dump(pre, sort_keys=False))
    write_bytes_atomic(sidecar, text.encode(), storage_options)
    return sidecar
