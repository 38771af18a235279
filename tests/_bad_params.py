"""Bad-input cases: parameters and configuration files. NaN and infinities are refused in
every float key and flag, integers must be integral and within their range (config.RANGES),
YAML anchors/aliases (the "billion laughs" bomb) and duplicate keys are refused, a config
that is a directory, not UTF-8 or oversized is refused, tune grids are checked against
the tuned key's range before any work, and no message echoes an unbounded user value."""

from __future__ import annotations

from pathlib import Path

from _bad_common import TRAIN, Case, D, _cluster

# "billion laughs": nine nested aliases, 9**9 leaves once expanded (~40 s into a MemoryError
# when the tree was printed in an error message), a few hundred bytes written down
BOMB = "[" + ", ".join(
    ["&a [x, x, x, x, x, x, x, x, x]"]
    + [f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
) + "]"
HUGE = 100_000  # characters of an oversized --set value or key (one argv entry holds 128 KiB)
TUNE = ("--features", "{d}/good.bin", "--labels", "{d}/good.meta", "--dim", str(D),
        "--output-config", "{out}")
TRAIN_OUT = (*TRAIN, "--output", "{out}")
FINITE = "must be a finite number, got"

# fmt: off
CASES: list[Case] = [
    # --- NaN and infinities in float keys (the issue: exit 0 with every sample a singleton)
    Case("params-nan", _cluster("--method", "knn-dbscan", "--set", "methods.knn-dbscan.eps=nan"),
         f"{FINITE} 'nan'", "methods.knn-dbscan.eps"),
    Case("params-yaml-nan", _cluster("--method", "aro", "--set", "methods.aro.threshold=.nan"),
         f"{FINITE} nan", "methods.aro.threshold"),
    Case("params-inf", _cluster("--set", "knn.shard_max_bytes=inf"), f"{FINITE} 'inf'",
         "knn.shard_max_bytes"),
    Case("params-minus-inf", _cluster("--set", "methods.knn-cc.threshold=-.inf"),
         f"{FINITE} -inf", "methods.knn-cc.threshold"),
    Case("params-float-overflow", _cluster("--set", "methods.hard-clusters.eps=1e999"),
         f"{FINITE} '1e999'", "methods.hard-clusters.eps"),
    Case("params-nan-optional", _cluster("--set", "methods.gcn-ve.rho=nan"), f"{FINITE} 'nan'",
         "methods.gcn-ve.rho"),
    # --- integers: overflow, not integral, absurd
    Case("params-int-overflow", _cluster("--set", "knn.k=1e400"),
         "expected an integer, got '1e400'", "knn.k"),
    Case("params-int-fraction", _cluster("--set", "knn.k=10.5"),
         "expected an integer, got 10.5", "knn.k"),
    Case("params-int-nan", _cluster("--set", "seed=nan"), "expected an integer, got 'nan'",
         "seed"),
    Case("params-int-5000-digits", _cluster("--set", "knn.k=" + "9" * 5000),
         "expected an integer, got '99999999", "knn.k"),
    Case("params-k-too-large", _cluster("--set", "knn.k=100000"), "must be <= 4096, got 100000",
         "knn.k"),
    Case("params-shard-bytes-zero", _cluster("--set", "knn.shard_max_bytes=0"),
         "must be >= 1048576 (1 MiB: smaller shards would start an actor per handful of rows)",
         "knn.shard_max_bytes"),
    Case("params-block-rows-huge", _cluster("--set", "knn.block_rows=1e12"),
         "must be <= 16777216, got 1000000000000", "knn.block_rows"),
    Case("params-seed-64-bit", _cluster("--set", "seed=4294967296"),
         "must be <= 2147483646 (faiss and Infomap take 32-bit seeds)", "seed"),
    Case("params-partitions-huge", _cluster("--set", "cluster.partitions=10000000"),
         "must be <= 65536, got 10000000", "cluster.partitions"),
    Case("params-iterations-huge", _cluster("--set", "methods.hac.max_rounds=1e9"),
         "must be <= 100000, got 1000000000", "methods.hac.max_rounds"),
    Case("params-damping-one", _cluster("--set", "methods.hard-clusters.damping=1"),
         "is a damping factor in [0, 1), got 1.0", "methods.hard-clusters.damping"),
    Case("params-dbscan-eps-zero", _cluster("--set", "methods.knn-dbscan.eps=0"),
         "is a cosine distance in (0, 2], got 0.0", "methods.knn-dbscan.eps"),
    Case("params-sigma-zero", _cluster("--set", "methods.hard-clusters.tpdi_sigma=0"),
         "is a softmax temperature in [1e-06, 1000000], got 0.0",
         "methods.hard-clusters.tpdi_sigma"),
    Case("params-cdp-step-tiny",
         _cluster("--method", "cdp", "--set", "methods.cdp.step=1e-7",
                  "--set", "methods.cdp.max_size=1"),
         "must be >= 0.0001 (a smaller step re-cuts the graph up to 2/step times), got 1e-07",
         "methods.cdp.step"),
    Case("params-dim-huge", ("--features", "{d}/good.bin", "--dim", "10000000"),
         "must be <= 65536, got 10000000", "--dim"),
    Case("params-num-cpus-huge", _cluster("--num-cpus", "100000000"),
         "must be <= 65536, got 100000000", "--num-cpus"),
    # --- YAML: aliases (billion laughs), duplicates, nesting
    Case("params-alias-bomb-config", _cluster("--config", "{d}/params-bomb.yaml"),
         "YAML anchors and aliases (&name, *name) are not supported (line 1)",
         "{d}/params-bomb.yaml"),
    Case("params-alias-bomb-set", _cluster("--set", f"knn.k={BOMB}"),
         "YAML anchors and aliases (&name, *name) are not supported", "knn.k"),
    Case("params-alias-plain", _cluster("--config", "{d}/params-alias.yaml"),
         "YAML anchors and aliases (&name, *name) are not supported (line 2)",
         "{d}/params-alias.yaml"),
    Case("params-duplicate-key", _cluster("--config", "{d}/params-duplicate.yaml"),
         "duplicate key 'k' (line 3)", "{d}/params-duplicate.yaml"),
    Case("params-deep-nesting", _cluster("--set", "knn.k=" + "[" * 20_000 + "]" * 20_000),
         "YAML nested too deeply", "knn.k"),
    # --- config files
    Case("params-config-directory", _cluster("--config", "{d}/params-config-dir"),
         "config file is a directory; expected a YAML file", "{d}/params-config-dir"),
    Case("params-config-latin1", _cluster("--config", "{d}/params-latin1.yaml"),
         "config file is not UTF-8 text (byte 33 is 0xe9)", "{d}/params-latin1.yaml"),
    Case("params-config-too-large", _cluster("--config", "{d}/params-large.yaml"),
         "config file is larger than 256 KiB", "{d}/params-large.yaml"),
    Case("params-config-section-scalar", _cluster("--config", "{d}/params-knn-scalar.yaml"),
         "expected a mapping at 'knn', got 3", "{d}/params-knn-scalar.yaml"),
    Case("params-config-section-list", _cluster("--config", "{d}/params-methods-list.yaml"),
         "expected a mapping at 'methods.knn-cc', got [0.5]", "{d}/params-methods-list.yaml"),
    Case("params-config-nan", _cluster("--config", "{d}/params-nan.yaml"), f"{FINITE} nan",
         "{d}/params-nan.yaml [methods.knn-cc.threshold]"),
    # --- unbounded user content is never echoed whole
    Case("params-huge-value", _cluster("--set", "knn.index=" + "h" * HUGE),
         "must be one of flat, ivf, got 'hhhhhhhh", "knn.index"),
    Case("params-huge-key", _cluster("--set", "x" * HUGE + "=1"),
         "unknown config key 'xxxxxxxx", "--set"),
    Case("params-huge-method", _cluster("--method", "m" * HUGE),
         "is not a method name, got 'mmmmmmmm", "--method"),
    # --- tune: the grid
    Case("params-tune-grid-nan", ("--method", "knn-cc", "--grid", "nan:nan:1", *TUNE),
         "LOW, HIGH and STEP must be finite numbers, got 'nan:nan:1'", "--grid", job="tune"),
    Case("params-tune-grid-inf", ("--method", "knn-cc", "--grid", "0:inf:0.1", *TUNE),
         "LOW, HIGH and STEP must be finite numbers", "--grid", job="tune"),
    Case("params-tune-grid-step-tiny", ("--method", "knn-cc", "--grid", "0:1:1e-9", *TUNE),
         "STEP must be at least 1e-06 (values are rounded to 6 decimals), got 1e-09", "--grid",
         job="tune"),
    Case("params-tune-grid-too-many", ("--method", "knn-cc", "--grid", "0:1:1e-5", *TUNE),
         "has 1e+05 values, more than the 1000 allowed", "--grid", job="tune"),
    Case("params-tune-grid-above-range", ("--method", "knn-cc", "--grid", "1.5:3:0.5", *TUNE),
         "value 1.5 is not a valid methods.knn-cc.threshold: is a cosine similarity in "
         "[-1, 1], got 1.5", "--grid", job="tune"),
    Case("params-tune-grid-partly-out", ("--method", "knn-dbscan", "--grid", "0:0.5:0.05", *TUNE),
         "value 0 is not a valid methods.knn-dbscan.eps: is a cosine distance in (0, 2], got 0.0",
         "--grid", job="tune"),
    Case("params-tune-grid-two-parts", ("--method", "knn-cc", "--grid", "0.1:0.9", *TUNE),
         "expected LOW:HIGH:STEP with STEP > 0, got '0.1:0.9'", "--grid", job="tune"),
    Case("params-tune-set-nan",
         ("--method", "knn-cc", "--set", "methods.knn-cc.threshold=nan", *TUNE),
         f"{FINITE} 'nan'", "methods.knn-cc.threshold", job="tune"),
    Case("params-tune-alias-bomb", ("--method", "knn-cc", "--config", "{d}/params-bomb.yaml",
                                    *TUNE),
         "YAML anchors and aliases", "{d}/params-bomb.yaml", job="tune"),
    # --- train: float and integer flags
    Case("params-train-lr-nan", (*TRAIN_OUT, "--lr", "nan"), f"{FINITE} nan", "--lr",
         job="train"),
    Case("params-train-lr-inf", (*TRAIN_OUT, "--lr", "inf"), f"{FINITE} inf", "--lr",
         job="train"),
    Case("params-train-lr-huge", (*TRAIN_OUT, "--lr", "5"),
         "is a learning rate in (0, 1], got 5.0", "--lr", job="train"),
    Case("params-train-rho-nan", (*TRAIN_OUT, "--rho", "nan"), f"{FINITE} nan", "--rho",
         job="train"),
    Case("params-train-epochs-huge", (*TRAIN_OUT, "--epochs", "1000000000"),
         "must be <= 10000, got 1000000000", "--epochs", job="train"),
    Case("params-train-epochs-overflow", (*TRAIN_OUT, "--epochs", "1e400"),
         "invalid int value: '1e400'", "--epochs", job="train"),
    Case("params-train-epochs-5000-digits", (*TRAIN_OUT, "--epochs", "9" * 5000),
         "invalid int value: '99999999", "--epochs", job="train"),
    Case("params-train-hidden-huge", (*TRAIN_OUT, "--hidden", "100000"),
         "must be <= 8192, got 100000", "--hidden", job="train"),
    Case("params-train-batch-rows-negative", (*TRAIN_OUT, "--batch-rows", "-1"),
         "must be >= 0, got -1", "--batch-rows", job="train"),
    Case("params-train-tune-folds-huge",
         (*TRAIN_OUT, "--method", "hard-clusters", "--tune-folds", "1000"),
         "must be <= 100, got 1000", "--tune-folds", job="train"),
    Case("params-train-set-inf", (*TRAIN_OUT, "--set", "methods.hard-clusters.eps=inf"),
         f"{FINITE} 'inf'", "methods.hard-clusters.eps", job="train"),
    Case("params-train-config-latin1", (*TRAIN_OUT, "--config", "{d}/params-latin1.yaml"),
         "config file is not UTF-8 text", "{d}/params-latin1.yaml", job="train"),
]
# fmt: on


def make_data(d: Path) -> None:
    """The files these cases need, written into the shared data directory ``d``."""
    (d / "params-bomb.yaml").write_text(f"method: {BOMB}\n")
    (d / "params-alias.yaml").write_text("knn:\n  k: &k 10\nseed: *k\n")
    (d / "params-duplicate.yaml").write_text("knn:\n  k: 10\n  k: 80\n")
    (d / "params-config-dir").mkdir()
    # "# seuil de similarité" in Latin-1: byte 33 is the 0xe9 of "é"
    (d / "params-latin1.yaml").write_bytes(
        "knn:\n  k: 10\n# seuil de similarité\n".encode("latin-1"))
    (d / "params-large.yaml").write_text("# padding\n" * 30_000 + "knn:\n  k: 10\n")
    (d / "params-knn-scalar.yaml").write_text("knn: 3\n")
    (d / "params-methods-list.yaml").write_text("methods:\n  knn-cc: [0.5]\n")
    (d / "params-nan.yaml").write_text("methods:\n  knn-cc:\n    threshold: .nan\n")
