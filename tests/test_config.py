"""Config: defaults documented in configs/default.yaml, overrides, and errors at the edge:
every numeric key's range (NaN/inf refused), YAML aliases and oversized input refused, tune
grids checked against the tuned key, and CDP's re-cut loop always progressing."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from ltc_ray.cluster import method_names
from ltc_ray.cluster.baselines import CDPParams
from ltc_ray.config import (
    AUTOS,
    FLAG_RANGES,
    RANGES,
    Config,
    _get,
    check_flag,
    config_from_dict,
    load_config,
    numeric_fields,
    shown,
    validate,
)
from ltc_ray.errors import InputError
from ltc_ray.params import Range

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


# ---------------------------------------------------------------- ranges (issue 13)
NUMERIC = numeric_fields()
KEYS = [(key, typ) for key, typ, _ in NUMERIC]
KEY_IDS = [key for key, _, _ in NUMERIC]


def test_every_numeric_key_has_a_range_and_its_default_is_in_it():
    keys = [key for key, _, _ in NUMERIC]
    assert sorted(keys) == sorted(RANGES), "config.RANGES must list every int/float field"
    for key, _, default in NUMERIC:
        if default == "auto":  # derived at run time; the key must say how
            assert key in AUTOS, key
        elif default is not None:
            assert RANGES[key].problem(default) is None, key


@pytest.mark.parametrize("text", ["nan", ".nan", "inf", "-inf", ".inf", "-.inf", "1e999"])
@pytest.mark.parametrize("key, typ", KEYS, ids=KEY_IDS)
def test_every_numeric_key_refuses_nan_and_infinities(key, typ, text):
    with pytest.raises(InputError) as err:
        load_config(None, [f"{key}={text}"])
    assert key in err.value.where
    expected = "expected an integer" if typ is int else "must be a finite number"
    assert expected in err.value.problem


def _outside(rng: Range, typ: type) -> list[float]:
    """Values just outside ``rng`` (and its bounds when open)."""
    unit = 1 if typ is int else 1e-9 * max(1.0, abs(rng.low or 0), abs(rng.high or 0))
    out = []
    if rng.low is not None:
        out.append(rng.low if rng.low_open else rng.low - unit)
    if rng.high is not None:
        out.append(rng.high if rng.high_open else rng.high + unit)
    return [typ(v) for v in out]


@pytest.mark.parametrize("key, typ", KEYS, ids=KEY_IDS)
def test_every_numeric_key_refuses_values_outside_its_range(key, typ):
    rng = RANGES[key]
    assert rng.low is not None, f"{key}: every numeric key has a lower bound"
    for value in _outside(rng, typ):
        with pytest.raises(InputError) as err:
            load_config(None, [f"{key}={value!r}"])
        assert err.value.where == f"config {key}" and shown(value) in err.value.problem, value
    for bound, is_open in ((rng.low, rng.low_open), (rng.high, rng.high_open)):
        if bound is not None and not is_open:  # the closed bounds themselves are valid
            assert _get(load_config(None, [f"{key}={typ(bound)!r}"]), key) == typ(bound)


def test_sizes_and_counts_have_upper_bounds():
    """Every int key has an upper bound (a huge count or size would hang or exhaust
    memory), and a byte budget is positive."""
    for key, typ, _ in NUMERIC:
        if typ is int:
            assert RANGES[key].high is not None, key
    assert RANGES["knn.shard_max_bytes"].low > 0
    assert RANGES["methods.hard-clusters.halo_bytes"].low > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("knn.k=1e400", "expected an integer, got '1e400'"),
        ("knn.k=10.5", "expected an integer, got 10.5"),
        ("knn.k=true", "expected an integer, got True"),
        ("knn.k=100000", "must be <= 4096"),
        ("knn.shard_max_bytes=0", "must be >= 1048576"),
        ("seed=4294967296", "must be <= 2147483646"),
        ("methods.cdp.step=1e-7", "must be >= 0.0001"),
        ("methods.hard-clusters.damping=1", "is a damping factor in [0, 1), got 1.0"),
        ("methods.knn-dbscan.eps=0", "is a cosine distance in (0, 2], got 0.0"),
        ("methods.aro.threshold=-0.5", "is a rank-order distance in [0, inf), got -0.5"),
        ("methods.gcn-ve.rho=1.5", "is a share in [0, 1], got 1.5"),
        ("method=Knn CC", "is not a method name"),
    ],
)
def test_range_messages(override, message):
    with pytest.raises(InputError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_integers_accept_integral_spellings():
    cfg = load_config(None, ["knn.k=1e3", "knn.block_rows=1_000", "seed=7.0", "dim=0x10"])
    assert (cfg.knn.k, cfg.knn.block_rows, cfg.seed, cfg.dim) == (1000, 1000, 7, 16)


def test_defaults_and_shipped_configs_serialise_without_nan():
    for cfg in [Config(), *(load_config(str(p)) for p in sorted(CONFIGS.glob("*.yaml")))]:
        json.dumps(cfg.to_dict(), allow_nan=False)  # raises on NaN/inf
        assert validate(copy.deepcopy(cfg)).to_dict() == cfg.to_dict()


def test_validate_refuses_nan_set_in_code():
    cfg = Config()
    cfg.methods.knn_cc.threshold = math.nan
    with pytest.raises(InputError, match="config methods.knn-cc.threshold: must be a finite"):
        validate(cfg)
    cfg = Config()
    cfg.knn.k = 10.0  # a float in an int field
    with pytest.raises(InputError, match="config knn.k: expected an integer"):
        validate(cfg)


# ---------------------------------------------------------------- YAML and files
BOMB = "[" + ", ".join(
    ["&a [x, x, x, x, x, x, x, x, x]"]
    + [f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
) + "]"


def test_alias_bomb_is_refused_fast_in_files_and_overrides(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"method: {BOMB}\n")
    for path, overrides in ((str(bomb), []), (None, [f"knn.k={BOMB}"]),
                            (None, [f"method={BOMB}"])):
        start = time.perf_counter()
        with pytest.raises(InputError) as err:
            load_config(path, overrides)
        assert time.perf_counter() - start < 0.5
        assert "YAML anchors and aliases" in err.value.problem
        assert len(str(err.value)) < 300  # never the expanded tree


def test_plain_aliases_and_duplicate_keys_are_refused(tmp_path):
    alias = tmp_path / "alias.yaml"
    alias.write_text("knn:\n  k: &k 10\nseed: *k\n")
    with pytest.raises(InputError, match=r"anchors and aliases .* \(line 2\)"):
        load_config(str(alias))
    dup = tmp_path / "dup.yaml"
    dup.write_text("knn:\n  k: 10\n  k: 80\n")
    with pytest.raises(InputError, match=r"duplicate key 'k' \(line 3\)"):
        load_config(str(dup))


def test_deep_nesting_is_one_error():
    with pytest.raises(InputError, match="nested too deeply"):
        load_config(None, ["knn.k=" + "[" * 20_000 + "]" * 20_000])


def test_config_file_that_is_a_directory_not_utf8_or_huge(tmp_path):
    with pytest.raises(InputError, match="config file is a directory") as err:
        load_config(str(tmp_path))
    assert err.value.where == str(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("knn:\n  k: 10  # défaut\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"not UTF-8 text \(byte 17 is 0xe9\)"):
        load_config(str(latin))
    big = tmp_path / "big.yaml"
    big.write_text("# pad\n" * 50_000)
    with pytest.raises(InputError, match="larger than 256 KiB"):
        load_config(str(big))


def test_sections_must_be_mappings_but_may_be_empty(tmp_path):
    for text, where in (("knn: 3\n", "'knn'"), ("methods:\n  cdp: [1]\n", "'methods.cdp'"),
                        ("- a\n", "'<top>'")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(InputError, match=f"expected a mapping at {where}"):
            load_config(str(bad))
    empty = tmp_path / "empty.yaml"
    empty.write_text("knn:\n  # k: 40\nmethods:\n")
    assert load_config(str(empty)).to_dict() == Config().to_dict()


@pytest.mark.parametrize(
    "override",
    ["knn.index=" + "h" * 100_000, "x" * 100_000 + "=1", "knn.k=" + "9" * 5000,
     "knn.k=[" + "1, " * 30_000 + "1]", "knn." + "y" * 100_000 + "=1", "novalue" * 10_000],
)
def test_messages_never_echo_unbounded_values(override):
    with pytest.raises(InputError) as err:
        load_config(None, [override])
    assert len(str(err.value)) < 400


def test_shown_cuts_long_values():
    assert shown("x" * 1000).endswith("…") and len(shown("x" * 1000)) == 80
    assert shown(10**5000) == "<an integer of about 5001 digits>"
    assert shown(list(range(1000))) == "<a list of 1000 entries>"
    assert shown(0.5) == "0.5"


# ---------------------------------------------------------------- flags (cli)
@pytest.mark.parametrize("flag", sorted(FLAG_RANGES))
def test_every_numeric_flag_refuses_nan_and_infinities(flag):
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(InputError) as err:
            check_flag(flag, value)
        assert err.value.where == flag and "finite" in err.value.problem


def test_model_and_method_flags_are_taken_verbatim():
    """--model is a path, not YAML: '#' (a YAML comment) and '~' (YAML null) stay in it."""
    from ltc_ray.cli import cluster_parser
    from ltc_ray.cli.args import _config

    model = "/models/run #3/~v2"
    args = cluster_parser().parse_args(["--features", "x.bin", "--method", "gcn-v",
                                        "--model", model])
    cfg = _config(args)
    assert cfg.method == "gcn-v"
    assert cfg.methods.gcn_v.model == cfg.methods.hard_clusters.model == model
    with pytest.raises(InputError) as err:
        _config(cluster_parser().parse_args(["--features", "x.bin", "--method", "m" * 10_000]))
    assert err.value.where == "--method" and len(err.value.problem) < 120


# ---------------------------------------------------------------- tune grids
def test_grid_parsing_refuses_nan_too_fine_and_too_long():
    from ltc_ray.pipeline.tune import parse_grid

    assert parse_grid("0.5:0.7:0.1") == (0.5, 0.7, 0.1)
    for text, message in (("nan:nan:1", "must be finite"), ("0:inf:0.1", "must be finite"),
                          ("0:1:1e-9", "STEP must be at least 1e-06"),
                          ("0:1:1e-5", "more than the 1000 allowed"),
                          ("0.8:0.4:0.1", "expected LOW:HIGH:STEP"), ("1:2", "expected"),
                          ("a:b:c", "expected")):
        with pytest.raises(InputError, match=message) as err:
            parse_grid(text)
        assert err.value.where == "--grid"


def test_grid_values_are_checked_against_the_tuned_key():
    from ltc_ray.pipeline.tune import grid_values

    cfg = Config()
    assert grid_values(cfg, "methods.knn-cc.threshold", (0.5, 0.7, 0.1)) == [0.5, 0.6, 0.7]
    assert cfg.to_dict() == Config().to_dict()  # a copy was probed, not the config
    with pytest.raises(InputError, match="value 1.5 is not a valid methods.knn-cc.threshold"):
        grid_values(cfg, "methods.knn-cc.threshold", (1.5, 3.0, 0.5))
    with pytest.raises(InputError, match="value 1.1 is not a valid"):
        grid_values(cfg, "methods.knn-cc.threshold", (0.5, 1.1, 0.3))  # only the end is out
    with pytest.raises(InputError, match=r"cosine distance in \(0, 2\], got 0.0"):
        grid_values(cfg, "methods.knn-dbscan.eps", (0.0, 0.5, 0.05))


def test_every_method_default_grid_is_valid():
    from ltc_ray.cluster import REGISTRY
    from ltc_ray.pipeline.tune import grid_values

    for name, cls in REGISTRY.items():
        t = cls.shape.tunable
        if t is not None:
            assert grid_values(Config(), f"methods.{name}.{t.param}", (t.low, t.high, t.step)), name


# ---------------------------------------------------------------- CDP progress
def _cdp_graph(n: int = 600, dim: int = 32, k: int = 10, seed: int = 3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))
    x = centres[rng.integers(0, 12, n)] + 0.6 * rng.normal(size=(n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    sims = x @ x.T
    ids = np.argsort(-sims, axis=1)[:, :k]
    return ids, np.take_along_axis(sims, ids, 1).astype(np.float32)


def _cdp(threshold: float, max_size: int, step: float):
    from ltc_ray.cluster import get_method

    cfg = Config()
    cfg.method = "cdp"
    cfg.methods.cdp = CDPParams(threshold=threshold, max_size=max_size, step=step)
    return get_method("cdp", cfg)


def _naive_cdp(ids, sims, p: CDPParams) -> np.ndarray:
    """The loop before the fix (every rounded threshold in turn), as the reference."""
    from ltc_ray.cluster.whole_graph import components, knn_edges

    n = len(ids)
    src, dst, sim = knn_edges(ids, sims, p.threshold)
    labels, th = components(n, src, dst), p.threshold
    while True:
        big = np.bincount(labels)[labels] > p.max_size
        if not big.any():
            return labels
        th = round(th + p.step, 6)
        keep = big[src] & (sim >= th)
        src, dst, sim = src[keep], dst[keep], sim[keep]
        labels = labels.copy()
        labels[big] = labels.max() + 1 + components(n, src, dst)[big]
        if th > 1.0 + 1e-6:
            labels[big] = labels.max() + 1 + np.flatnonzero(big)
            return labels


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a, b]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def test_cdp_with_a_step_too_small_to_round_finishes():
    """step 1e-7 with max_size 1: the rounded threshold never moved, so the loop never
    ended; now each pass jumps to the first threshold that cuts an edge."""
    ids, sims = _cdp_graph()
    start = time.perf_counter()
    labels = _cdp(0.0, 1, 1e-7).cluster_graph(ids, sims)
    assert time.perf_counter() - start < 30
    assert len(np.unique(labels)) == len(ids)  # max_size 1: singletons
    with pytest.raises(InputError, match="config methods.cdp.step: must be >= 0.0001"):
        load_config(None, ["method=cdp", "methods.cdp.step=1e-7", "methods.cdp.max_size=1"])


@pytest.mark.parametrize("threshold, max_size, step",
                         [(0.3, 40, 0.05), (0.1, 15, 0.01), (-0.2, 5, 0.003), (0.2, 25, 1e-4),
                          (0.5, 2, 0.3), (0.0, 1, 0.02)])
def test_cdp_skipping_idle_passes_gives_the_same_partition(threshold, max_size, step):
    ids, sims = _cdp_graph(n=300, seed=int(step * 1e4) + max_size)
    fast = _cdp(threshold, max_size, step).cluster_graph(ids, sims)
    reference = _naive_cdp(ids, sims, CDPParams(threshold, max_size, step))
    assert _same_partition(fast, reference)
    assert np.bincount(np.unique(fast, return_inverse=True)[1].ravel()).max() <= max_size
