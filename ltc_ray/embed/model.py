"""The user's embedding model: its preprocessing sidecar, loading, and image decoding.

Why a sidecar: a TorchScript or ONNX file does not say how images must be prepared for
it. A small YAML/JSON file next to the model (``<model>.yaml``, ``<model-stem>.yaml`` or
``.json``; or ``--model-config``) declares it::

    size: [112, 112]          # [h, w] of the model input (or one number)
    mean: [0.5, 0.5, 0.5]     # per channel, on the 0..1 scale (or one number)
    std: [0.5, 0.5, 0.5]
    resize: shorter+center-crop   # or "stretch" (default: shorter+center-crop)
    color: rgb                    # or "bgr" (channel order the model expects)
    format: torchscript           # optional: "torchscript" | "onnx" (default: by extension)

The model takes float32 ``(N, 3, h, w)`` = ``(pixel / 255 - mean) / std`` and returns
``(N, D)`` (any trailing singleton dims are flattened away).

torch and onnxruntime are imported only inside functions (the CLI stays cheap).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageOps

from ltc_ray.errors import InputError, MissingDependency, brief, storage_errors
from ltc_ray.io.fs import open_uri, require_file, url_to_fs

__all__ = [
    "MODEL_FORMATS", "ONNX_INSTALL", "Embedder", "ModelSpec", "Preprocess", "decode_image",
    "find_sidecar", "load_preprocess", "model_format", "parse_preprocess", "resolve_model",
    "to_model_input",
]

MODEL_FORMATS = ("torchscript", "onnx")
ONNX_INSTALL = "pip install 'ltc-ray[onnx]'"
RESIZE_MODES = ("shorter+center-crop", "stretch")
COLORS = ("rgb", "bgr")
SIDECAR_SUFFIXES = (".yaml", ".yml", ".json")
SIDECAR_KEYS = {"size", "mean", "std", "resize", "color", "format", "description"}
MAX_SIDE = 4096


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input (see the module docstring)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shorter+center-crop"
    color: str = "rgb"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return d


def _numbers(where: str, key: str, value: Any, n: int, kind: type) -> tuple:
    values = [value] * n if isinstance(value, int | float) and not isinstance(value, bool) \
        else value
    if not isinstance(values, list | tuple) or len(values) != n or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise InputError(where, f"'{key}' must be a number or a list of {n} numbers, "
                         f"got {brief(value)}")
    if kind is int and not all(float(v).is_integer() for v in values):
        raise InputError(where, f"'{key}' must hold integers, got {brief(value)}")
    return tuple(kind(v) for v in values)


def parse_preprocess(obj: Any, where: str) -> tuple[Preprocess, str | None]:
    """A sidecar's mapping checked: ``(Preprocess, format or None)``; InputError naming
    ``where`` (the sidecar) and the bad key otherwise."""
    if not isinstance(obj, dict):
        raise InputError(where, "must be a mapping with size, mean and std")
    unknown = sorted(set(map(str, obj)) - SIDECAR_KEYS)
    if unknown:
        raise InputError(where, f"unknown key(s) {unknown}; allowed: {sorted(SIDECAR_KEYS)}")
    for key in ("size", "mean", "std"):
        if key not in obj:
            raise InputError(where, f"missing '{key}'")
    size = _numbers(where, "size", obj["size"], 2, int)
    if not all(1 <= s <= MAX_SIDE for s in size):
        raise InputError(where, f"'size' must be in 1..{MAX_SIDE}, got {list(size)}")
    mean = _numbers(where, "mean", obj["mean"], 3, float)
    std = _numbers(where, "std", obj["std"], 3, float)
    if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
        raise InputError(where, "'mean' must be finite and 'std' positive")
    resize = obj.get("resize", RESIZE_MODES[0])
    if resize not in RESIZE_MODES:
        raise InputError(where, f"'resize' must be one of {list(RESIZE_MODES)}, "
                         f"got {brief(resize)}")
    color = str(obj.get("color", "rgb")).lower()
    if color not in COLORS:
        raise InputError(where, f"'color' must be one of {list(COLORS)}, got {brief(color)}")
    fmt = obj.get("format")
    if fmt is not None and fmt not in MODEL_FORMATS:
        raise InputError(where, f"'format' must be one of {list(MODEL_FORMATS)}, "
                         f"got {brief(fmt)}")
    return Preprocess(size, mean, std, resize, color), fmt


def load_preprocess(uri: str, storage_options: dict | None = None
                    ) -> tuple[Preprocess, str | None]:
    """Read and check a sidecar (YAML, or JSON when it ends in .json)."""
    with storage_errors(uri):
        require_file(uri, "model config (sidecar)", storage_options)
        with open_uri(uri, "rb", storage_options) as f:
            raw = f.read(1 << 20)
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text) if uri.endswith(".json") else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError(uri, f"cannot parse the model config ({brief(exc)})") from None
    return parse_preprocess(obj, uri)


def find_sidecar(model_uri: str, storage_options: dict | None = None) -> str | None:
    """The default sidecar: ``<model>.yaml|.yml|.json``, else ``<stem>.yaml|.yml|.json``."""
    slash, dot = model_uri.rfind("/"), model_uri.rfind(".")
    stems = [model_uri] + ([model_uri[:dot]] if dot > slash + 1 else [])
    fs, _ = url_to_fs(model_uri, storage_options)
    for stem in stems:
        for suffix in SIDECAR_SUFFIXES:
            cand = stem + suffix
            if fs.isfile(url_to_fs(cand, storage_options)[1]):
                return cand
    return None


def model_format(model_uri: str, declared: str | None) -> str:
    """The sidecar's ``format``, else ONNX for ``.onnx`` and TorchScript otherwise."""
    if declared:
        return declared
    return "onnx" if model_uri.lower().endswith(".onnx") else "torchscript"


@dataclass(frozen=True)
class ModelSpec:
    """A checked model: what every actor needs to load it, and what the report records."""

    uri: str
    format: str
    sha256: str
    sidecar: str
    preprocess: Preprocess
    dim: int
    storage_options: dict | None = field(default=None, repr=False, compare=False)

    def read_bytes(self) -> bytes:
        with open_uri(self.uri, "rb", self.storage_options) as f:
            return f.read()


class Embedder:
    """A loaded model: float32 ``(N, 3, h, w)`` -> float32 ``(N, D)``."""

    def __init__(self, data: bytes, fmt: str, device: str = "cpu", threads: int = 1):
        self.format, self.device = fmt, device
        if fmt == "onnx":
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise MissingDependency.from_import_error("onnxruntime", ONNX_INSTALL,
                                                          exc) from None
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = max(1, int(threads))
            opts.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
            if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self._session = ort.InferenceSession(data, sess_options=opts, providers=providers)
            self._input = self._session.get_inputs()[0].name
        else:
            import torch

            torch.set_num_threads(max(1, int(threads)))
            self._module = torch.jit.load(io.BytesIO(data), map_location=device)
            self._module.eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if self.format == "onnx":
            out = self._session.run(None, {self._input: np.ascontiguousarray(x, np.float32)})[0]
            return np.asarray(out, dtype=np.float32).reshape(n, -1)
        import torch

        with torch.inference_mode():
            out = self._module(torch.from_numpy(np.ascontiguousarray(x, np.float32))
                               .to(self.device))
            if isinstance(out, tuple | list):
                out = out[0]
            return out.float().reshape(n, -1).cpu().numpy()


def resolve_model(model_uri: str, config_uri: str | None = None,
                  storage_options: dict | None = None, probe: bool = True) -> ModelSpec:
    """Check the model before any expensive work: the file exists, its sidecar is found
    and valid, the model loads and maps a zero image batch to finite ``(N, D)``.
    InputError naming the model or sidecar otherwise."""
    with storage_errors(model_uri):
        require_file(model_uri, "model file", storage_options)
        sidecar = config_uri or find_sidecar(model_uri, storage_options)
    if sidecar is None:
        raise InputError(model_uri, "no preprocessing config next to the model (looked for "
                         "<model>.yaml/.yml/.json and <stem>.yaml/.yml/.json); write one "
                         "(size, mean, std) or pass --model-config")
    preprocess, declared = load_preprocess(sidecar, storage_options)
    fmt = model_format(model_uri, declared)
    spec = ModelSpec(model_uri, fmt, "", sidecar, preprocess, 0, storage_options)
    with storage_errors(model_uri):
        data = spec.read_bytes()
    spec = ModelSpec(model_uri, fmt, hashlib.sha256(data).hexdigest(), sidecar, preprocess, 0,
                     storage_options)
    if not probe:
        return spec
    try:
        embedder = Embedder(data, fmt)
    except MissingDependency:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model file
        raise InputError(model_uri, f"cannot load it as a {fmt} model ({brief(exc)})") from None
    h, w = preprocess.size
    try:
        out = embedder(np.zeros((2, 3, h, w), np.float32))
    except Exception as exc:  # noqa: BLE001
        raise InputError(model_uri, f"fails on a (2, 3, {h}, {w}) input as {sidecar} declares "
                         f"({brief(exc)})") from None
    if out.shape[0] != 2 or out.shape[1] < 1 or not np.isfinite(out).all():
        raise InputError(model_uri, f"maps a (2, 3, {h}, {w}) input to shape "
                         f"{tuple(out.shape)} or non-finite values; expected finite (2, D)")
    return ModelSpec(model_uri, fmt, spec.sha256, sidecar, preprocess, int(out.shape[1]),
                     storage_options)


def decode_image(data: bytes, pp: Preprocess) -> np.ndarray:
    """One image's bytes -> uint8 ``(h, w, 3)`` in the model's channel order; raises on an
    unreadable image (the caller records the error). JPEGs decode at a reduced scale when
    that still covers the target size (PIL's draft mode)."""
    h, w = pp.size
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (w, h))
        img = ImageOps.exif_transpose(img).convert("RGB")
        W, H = img.size
        box = (0.0, 0.0, float(W), float(H))
        if pp.resize == "shorter+center-crop":
            if W * h > H * w:  # wider than the target: crop the sides
                cw = H * w / h
                box = ((W - cw) / 2, 0.0, (W + cw) / 2, float(H))
            else:
                ch = W * h / w
                box = (0.0, (H - ch) / 2, float(W), (H + ch) / 2)
        if img.size != (w, h) or box != (0.0, 0.0, float(W), float(H)):
            img = img.resize((w, h), Image.Resampling.BILINEAR, box=box)
        arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (h, w, 3):
        raise ValueError(f"decoded to shape {arr.shape}, expected {(h, w, 3)}")
    return arr[..., ::-1] if pp.color == "bgr" else arr


def to_model_input(pixels: np.ndarray, pp: Preprocess) -> np.ndarray:
    """uint8 ``(N, h, w, 3)`` -> the model's float32 ``(N, 3, h, w)``."""
    mean = np.asarray(pp.mean, np.float32)
    std = np.asarray(pp.std, np.float32)  # both listed in the model's channel order
    x = (pixels.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
