"""Images -> Parquet embeddings with a user-supplied model, on Ray Data (``ltc-ray embed``).

Cheap to import: torch, onnxruntime and Ray load only when a job runs or a model loads.
"""

from ltc_ray.embed.job import (
    EMBEDDINGS,
    FAILED,
    REPORT,
    SUCCESS,
    WORK_DIR,
    EmbedSpec,
    check_embed_output,
    run_embed,
)
from ltc_ray.embed.model import (
    Embedder,
    ModelSpec,
    Preprocess,
    decode_image,
    load_preprocess,
    resolve_model,
    to_model_input,
)
from ltc_ray.embed.sources import ImageListing, image_uri, list_images

__all__ = [
    "EMBEDDINGS", "FAILED", "REPORT", "SUCCESS", "WORK_DIR", "EmbedSpec", "Embedder",
    "ImageListing", "ModelSpec", "Preprocess", "check_embed_output", "decode_image",
    "image_uri", "list_images", "load_preprocess", "resolve_model", "run_embed",
    "to_model_input",
]
