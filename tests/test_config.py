"""Config: defaults documented in configs/default.yaml, overrides, and errors at the edge."""

from __future__ import annotations

from pathlib import Path

import pytest

from ltc_ray.cluster import method_names
from ltc_ray.config import Config, config_from_dict, load_config
from ltc_ray.errors import InputError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_documents_the_real_defaults():
    assert load_config(str(CONFIGS / "default.yaml")).to_dict() == Config().to_dict()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert cfg.method in method_names()


def test_overrides_apply_in_order_and_coerce_types():
    cfg = load_config(
        None,
        [
            "knn.k=40",
            "knn.k=30",
            "methods.knn-cc.threshold=0.65",
            "knn.reuse=false",
            "knn.shard_max_bytes=1e9",
        ],
    )
    assert cfg.knn.k == 30 and cfg.methods.knn_cc.threshold == 0.65
    assert cfg.knn.reuse is False and cfg.knn.shard_max_bytes == 1e9
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "override, message",
    [
        ("knn.bogus=1", "unknown config key 'bogus'"),
        ("bogus.k=1", "unknown config key 'bogus'"),
        ("knn.k=abc", "expected an integer"),
        ("knn.k=1", "knn.k"),
        ("knn.index=hnsw", "must be one of flat, ivf"),
        ("methods.knn-cc.threshold=1.5", "cosine similarity in [-1, 1]"),
        ("knn.block_rows=0", "must be positive"),
        ("knn.reuse=maybe", "expected true/false"),
        ("knn=3", "expected a mapping"),
        ("novalue", "expected key=value"),
    ],
)
def test_bad_overrides_are_input_errors(override, message):
    with pytest.raises(InputError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("knn: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("knn:\n  kk: 3\n")
    with pytest.raises(InputError, match=r"unknown.yaml \[knn.kk\]: unknown config key 'kk'"):
        load_config(str(unknown))
