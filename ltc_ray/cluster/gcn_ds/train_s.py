"""GCN-D + GCN-S's trainer (``jobs/train.py --method gcn-ds``): :mod:`.train` with GCN-S
trained on the same proposals (a random seed member each, per epoch); the model
directory holds ``gcn-d/`` and ``gcn-s/``."""

from __future__ import annotations

from ltc_ray.cluster.gcn_ds.train import summary, train
from ltc_ray.cluster.gcn_ds.train import train_config as _config

__all__ = ["summary", "train", "train_config"]


def train_config(options: dict, seed: int):
    return _config(options, seed, segments=True)
