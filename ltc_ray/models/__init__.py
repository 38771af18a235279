"""Learned graph models (torch): GCN-V, its training target, training loop and model store.

Plain functions over arrays, no Ray: the pipeline's partition actors call the same code.
"""

from ltc_ray.models.gcn_v import GCNV, aggregate, predict
from ltc_ray.models.store import data_fingerprint, load_model, save_model
from ltc_ray.models.targets import confidence_target, raw_confidence, target_scale
from ltc_ray.models.train import TrainConfig, train_gcn_v

__all__ = [
    "GCNV",
    "TrainConfig",
    "aggregate",
    "confidence_target",
    "data_fingerprint",
    "load_model",
    "predict",
    "raw_confidence",
    "save_model",
    "target_scale",
    "train_gcn_v",
]
