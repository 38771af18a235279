"""``auto`` parameters (issue 15): the mechanism, end to end.

Exact, shard-free similarity histograms; derived values and clusters that do not depend
on shards or partitions; what run.json records; the config's ``auto`` keys; the
partitioned ARO against its one-process reference; the singleton-attach step; the
shift warning of a model run on unlike data; and auto vs a threshold tuned on the train
split on two settings with different similarity scales.

One Ray session for the module (the session fixture); every split's kNN graph is built
once and reused by every run over it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import ray
from _data import random_knn, write_bin
from _models import tiny_gcn_v

from ltc_ray.cli import main
from ltc_ray.cluster import ClusterMethod, get_method
from ltc_ray.cluster.aro import SCORE_NEIGHBORS, rank_order_distances
from ltc_ray.cluster.base import neighbor_density
from ltc_ray.cluster.whole_graph import components, labels_to_clusters
from ltc_ray.config import AUTOS, Config, load_config, set_key
from ltc_ray.errors import InputError
from ltc_ray.graph.knn_graph import read_knn_rows
from ltc_ray.graph.similarity_stats import WIDTH, combine, derive, rank_histograms
from ltc_ray.metrics import evaluate
from ltc_ray.models.store import add_model_meta
from ltc_ray.params import AUTO
from ltc_ray.pipeline.cluster_stage import ClusterRefs, attach_singletons
from ltc_ray.pipeline.executor import Run
from ltc_ray.pipeline.job import JobSpec, start_run
from ltc_ray.pipeline.tune import COARSE_FACTOR, _values
from ltc_ray.runtime import StageLog, ray_get
from ltc_ray.synthetic.shift import SETTINGS, make_split, write_split

LABEL_FREE = (
    "knn-cc",
    "density-peak",
    "infomap",
    "chinese-whispers",
    "knn-dbscan",
    "aro",
    "cdp",
    "hac",
    "kmeans",
)
# the tolerance of auto vs tuned (pairwise F on the test split); never loosened to pass
TOLERANCE = 0.06
LAYOUTS = {  # test_determinism's "one" vs "many"
    "one": [
        "knn.mode=replicate",
        "knn.block_rows=100000",
        "cluster.partitions=1",
        "cluster.merge=local",
    ],
    "many": [
        "knn.mode=shard",
        "knn.shards=2",
        "knn.block_rows=150",
        "cluster.partitions=3",
        "cluster.merge=forest",
    ],
}


# quoted: a bare ``off`` is YAML's boolean false (test_attach_words_are_not_booleans)
ATTACH_OFF = "cluster.attach_singletons='off'"


def _config(overrides=()) -> Config:
    return load_config(None, list(overrides))


def _cluster_ids(run: Run, method: ClusterMethod) -> tuple[np.ndarray, np.ndarray]:
    refs = run.cluster(method)
    return ray_get(refs.cluster_id), np.concatenate(ray_get(refs.parents))


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a, b]), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))


# ------------------------------------------------------------------ 1. histograms
def test_histograms_are_exact_and_shard_free():
    k = 30
    ids, sims = random_knn(300, k, seed=3)  # negative similarities and padding included
    whole = combine(k, [rank_histograms(ids, sims)])
    chunks = [(0, 97), (97, 180), (180, 300)]
    parts = [rank_histograms(ids[lo:hi], sims[lo:hi]) for lo, hi in chunks]
    for order in (parts, parts[::-1]):  # summed in any order
        np.testing.assert_array_equal(combine(k, order).counts, whole.counts)
    split = combine(k, parts)
    assert split.summary() == whole.summary()
    # every rule any key may derive with gives the same value and basis
    rules = {
        key: rule for key, rule in AUTOS.items() if rule.kind in ("similarity", "distance", "scale")
    }
    assert "methods.knn-cc.threshold" in rules and "cluster.attach_threshold" in rules
    for key, rule in rules.items():
        assert derive(rule, split) == derive(rule, whole), key
    aro = get_method("aro", _config(["knn.k=30"]))
    fields = {
        "neighbors": AUTOS["methods.aro.neighbors"],
        "threshold": AUTOS["methods.aro.threshold"],
    }
    assert aro.derive_params(split, fields) == aro.derive_params(whole, fields)

    # quantiles: bin centres on the 0.001 grid, holding the order statistic they stand for
    valid = ids[:, 1:] >= 0
    for rank in (1, 7, whole.far_rank):
        values = np.sort(sims[valid[:, rank - 1], rank].astype(np.float64))
        for p in (0.1, 0.5, 0.9):
            q = whole.quantile(f"r{rank}", p)
            centre = (q + 1.0) / WIDTH - 0.5
            assert abs(centre - round(centre)) < 1e-6, q
            exact = values[int(np.ceil(p * len(values))) - 1]
            assert abs(exact - q) <= WIDTH / 2 + 1e-6, (rank, p, q, exact)
    assert whole.anchor("far:0.5") == whole.quantile(f"r{k - 1}", 0.5)

    # mean neighbours above a cut (ranks 1..far) against a direct count
    ranked = sims[:, 1 : whole.far_rank + 1].astype(np.float64)
    ranked_valid = valid[:, : whole.far_rank]
    rows = int(valid[:, 0].sum())
    for cut in (-0.2, 0.3, 0.75):
        got = whole.mean_count_above(cut) * rows
        low = np.count_nonzero(ranked_valid & (ranked >= cut + 1e-6))
        high = np.count_nonzero(ranked_valid & (ranked >= cut - WIDTH - 1e-6))
        assert low <= got <= high, (cut, low, got, high)
        assert high - low < 0.05 * high  # the bin is narrow: not a vacuous bracket


# ------------------------------------------------------------------ shared small split
@pytest.fixture(scope="module")
def small_split(ray_local, tmp_path_factory):
    """A low-sim split of 12 identities (~480 rows, 256-d) and its graph built in two
    layouts (one kNN actor, one partition vs two shards, three partitions)."""
    root = tmp_path_factory.mktemp("auto-small")
    s = dataclasses.replace(SETTINGS["low-sim"], n_ids=12)
    files = write_split(s, "test", str(root), seed=1)
    runs = {}
    for name, sets in LAYOUTS.items():
        spec = JobSpec(
            features=files["features"],
            labels=files["labels"],
            output="unused",
            config=_config(sets),
            work_dir=str(root / f"work-{name}"),
        )
        runs[name] = start_run(spec)
    return files, runs


# ------------------------------------------------------------------ 2. executor
@pytest.fixture(scope="module")
def aro_runs(small_split):
    """ARO with ``auto`` neighbors and threshold in both layouts, attach off (link actors
    are the costly part: tests 2 and 5 share these two runs)."""
    _, runs = small_split
    out = {}
    for layout, run in runs.items():
        run.derived.clear()
        run.config.cluster.attach_singletons = "off"
        try:
            refs = run.cluster(get_method("aro", run.config))
        finally:
            run.config.cluster.attach_singletons = AUTO
        out[layout] = (
            dict(run.derived),
            ray_get(refs.cluster_id),
            np.concatenate(ray_get(refs.parents)),
            len(refs.ranges),
        )
    return out


def test_derived_values_and_clusters_do_not_depend_on_the_layout(small_split, aro_runs):
    files, runs = small_split
    one, many = runs["one"], runs["many"]
    assert many.stages.stages["knn"].extra["n_actors"] == 2
    # the pipeline's histograms are those of the whole graph in one process
    graph = one.graph
    whole = rank_histograms(*read_knn_rows(graph, 0, graph.n_rows))
    np.testing.assert_array_equal(one.similarity().counts, whole)
    np.testing.assert_array_equal(many.similarity().counts, whole)
    assert many.stages.stages["graph_stats"].extra["partitions"] == 3
    out = {}
    for layout, run in runs.items():
        run.derived.clear()
        cid, parent = _cluster_ids(run, get_method("knn-cc", run.config))
        out[layout] = (dict(run.derived), cid, parent, run.stages.stages["link"].extra)
    assert many.stages.stages["score"].extra["partitions"] == 3
    assert out["many"][3]["merge_mode"] == "forest"
    for name, result, keys in [
        ("knn-cc", out, {"knn-cc.threshold", "cluster.attach_threshold"}),
        ("aro", aro_runs, {"aro.neighbors", "aro.threshold"}),
    ]:
        assert set(result["one"][0]) == keys, name
        assert result["one"][0] == result["many"][0], name
        np.testing.assert_array_equal(result["one"][1], result["many"][1], err_msg=name)
        np.testing.assert_array_equal(result["one"][2], result["many"][2], err_msg=name)
        assert 2 <= len(np.unique(result["one"][1])) <= graph.n_rows // 2, name


# ------------------------------------------------------------------ 5. ARO vs reference
def test_partitioned_aro_equals_the_one_process_reference(small_split, aro_runs):
    """The pipeline's ARO (1 and 3 partitions, link actors) is the components of the
    one-process rank-order pairs at distance <= t, with the m and t it used."""
    _, runs = small_split
    graph = runs["one"].graph
    derived = aro_runs["one"][0]
    m, t = derived["aro.neighbors"]["value"], derived["aro.threshold"]["value"]
    knn_ids, _ = read_knn_rows(graph, 0, graph.n_rows)
    src, dst, dist = rank_order_distances(knn_ids, m)
    keep = dist <= t
    ref = components(graph.n_rows, src[keep], dst[keep])
    assert 2 <= len(np.unique(ref)) <= graph.n_rows // 2  # a real clustering
    assert 0 < keep.sum() < len(keep)  # the threshold cuts
    assert {layout: result[3] for layout, result in aro_runs.items()} == {"one": 1, "many": 3}
    for layout, (_, cid, _, _) in aro_runs.items():
        assert _same_partition(cid, ref), layout


# ------------------------------------------------------------------ 3. the job
def _reuse(run: Run) -> list[str]:
    """Flags that run the job in ``run``'s work area with its kNN settings (its graph is
    reused, not built again)."""
    sets = [arg for item in LAYOUTS["one"] for arg in ("--set", item)]
    return [*sets, "--work-dir", run.work_dir]


def _cli(args: list[str], capsys) -> dict:
    code = main(["cluster", *args])
    assert code == 0, capsys.readouterr().err
    out = Path(args[args.index("--output") + 1])
    return json.loads((out / "run.json").read_text())


def test_cluster_job_records_derived_values(small_split, tmp_path, capsys):
    files, runs = small_split
    common = [
        "--features",
        files["features"],
        "--labels",
        files["labels"],
        "--method",
        "knn-cc",
        *_reuse(runs["one"]),
    ]
    run = _cli([*common, "--output", str(tmp_path / "auto")], capsys)
    derived = run["derived_parameters"]
    assert set(derived) == {"knn-cc.threshold", "cluster.attach_threshold"}
    for entry in derived.values():  # the value, its rule and the anchors behind it
        assert {"value", "rule", "low", "low_value", "high", "high_value"} <= set(entry)
        low, high = entry["low_value"], entry["high_value"]
        assert -1 < low < high < 1
        assert entry["value"] == round(low + entry["alpha"] * (high - low), 3)
    sim = run["similarity"]
    assert -1 < sim["far"] < sim["near"] < 1
    anchors = {"far:0.5": sim["far"], "r1:0.5": sim["near"]}
    for entry in derived.values():
        for side in ("low", "high"):
            if entry[side] in anchors:
                assert entry[f"{side}_value"] == anchors[entry[side]]
    sizes = run["cluster_sizes"]
    assert {"singletons", "singleton_share", "cluster_size_quantiles"} <= set(sizes)
    assert sizes["n_clusters"] == run["n_clusters"]
    assert run["config"]["methods"]["knn-cc"]["threshold"] == AUTO
    assert run["shift_warnings"] == []
    # an explicit value is used as given: nothing derived for it
    explicit = _cli(
        [*common, "--set", "methods.knn-cc.threshold=0.6", "--output", str(tmp_path / "explicit")],
        capsys,
    )
    assert "knn-cc.threshold" not in explicit["derived_parameters"]
    assert "cluster.attach_threshold" in explicit["derived_parameters"]
    assert explicit["config"]["methods"]["knn-cc"]["threshold"] == 0.6
    assert "link" not in explicit["reused_stages"]  # another threshold: linked again


# ------------------------------------------------------------------ 4. config
def test_auto_in_yaml_and_set(tmp_path, capsys):
    for word in ("auto", "AUTO", " auto "):
        path = tmp_path / "c.yaml"
        path.write_text(
            f'methods:\n  knn-cc:\n    threshold: "{word}"\n'
            f'cluster:\n  attach_threshold: "{word}"\n'
        )
        cfg = load_config(str(path))
        assert cfg.methods.knn_cc.threshold == AUTO
        assert cfg.cluster.attach_threshold == AUTO
        cfg = load_config(None, [f"methods.cdp.step={word}", f"methods.aro.neighbors={word}"])
        assert cfg.methods.cdp.step == AUTO and cfg.methods.aro.neighbors == AUTO
    cfg = load_config(None, ["methods.knn-cc.threshold=0.6", "methods.aro.neighbors=12"])
    assert cfg.methods.knn_cc.threshold == 0.6 and cfg.methods.aro.neighbors == 12
    with pytest.raises(InputError) as exc:
        load_config(None, ["methods.knn-cc.threshold=autox"])
    assert "'auto'" in str(exc.value) and "autox" in str(exc.value)
    path = tmp_path / "bad.yaml"
    path.write_text("cluster:\n  attach_threshold: autox\n")
    with pytest.raises(InputError, match="'auto'"):
        load_config(str(path))
    for key in ("knn.k", "methods.density-peak.neighbors", "seed"):
        assert key not in AUTOS
        with pytest.raises(InputError) as exc:
            load_config(None, [f"{key}=auto"])
        assert key.split(".")[-1] in str(exc.value)
    # the job refuses it before any work, naming the key
    code = main(
        [
            "cluster",
            "--features",
            str(tmp_path / "none.npy"),
            "--method",
            "knn-cc",
            "--set",
            "methods.knn-cc.threshold=autox",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code != 0 and "'auto'" in capsys.readouterr().err


def test_attach_words_are_not_booleans(tmp_path):
    for word in ("on", "off"):
        assert (
            load_config(None, [f"cluster.attach_singletons={word}"]).cluster.attach_singletons
            == word
        )
        path = tmp_path / "c.yaml"
        path.write_text(f"cluster:\n  attach_singletons: {word}\n")
        assert load_config(str(path)).cluster.attach_singletons == word


# ------------------------------------------------------------------ 6. attach
def _attach_data() -> tuple[np.ndarray, dict]:
    """Four tight clusters of 15 (rows 0-59), then singleton ``near`` (cos ~0.77 to
    cluster 0), ``far`` (cos ~0.53 to cluster 1) and six isolated rows: the singletons sit
    in the last partition, their clusters in the first."""
    rng = np.random.default_rng(5)
    dim = 32
    eye = np.eye(dim)
    rows = [eye[c] + 0.05 * rng.standard_normal(dim) for c in range(4) for _ in range(15)]
    rows.append(0.8 * eye[0] + 0.6 * eye[10])
    rows.append(0.55 * eye[1] + np.sqrt(1 - 0.55**2) * eye[11])
    rows += [eye[20 + i] for i in range(6)]
    x = np.array(rows, np.float32)
    return x, {"near": 60, "far": 61, "isolated": list(range(62, 68))}


def test_attach_step(ray_local, tmp_path):
    x, rows = _attach_data()
    path = tmp_path / "f.bin"
    write_bin(path, x)
    base = ["knn.k=10", "methods.knn-cc.threshold=0.85", "cluster.partitions=1"]
    spec = JobSpec(
        features=str(path),
        output="unused",
        work_dir=str(tmp_path / "work"),
        config=_config([*base, "dim=32", "cluster.attach_threshold=0.65"]),
    )
    first = start_run(spec)
    graph, info = first.graph, first.info
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    target = int(np.argmax(u[:15] @ u[rows["near"]]))
    assert 0.7 < float(u[target] @ u[rows["near"]]) < 0.85

    count = itertools.count()

    def run(parts: int, *sets: str) -> tuple[np.ndarray, np.ndarray, Run]:
        cfg = _config([*base, "dim=32", f"cluster.partitions={parts}", *sets])
        r = Run.on_graph(graph, info, cfg, str(tmp_path / f"w{next(count)}"))
        cid, parent = _cluster_ids(r, get_method("knn-cc", cfg))
        return cid, parent, r

    off, off_parent, _ = run(1, ATTACH_OFF)
    sizes = np.bincount(off)
    singles = [rows["near"], rows["far"], *rows["isolated"]]
    assert (sizes[off[singles]] == 1).all() and len(sizes) == 4 + len(singles)
    assert off_parent[rows["near"]] == -1
    cid, parent, r = run(1, "cluster.attach_threshold=0.65")
    assert r.stages.stages["attach"].extra["attached"] == 1
    assert cid[rows["near"]] == cid[0] and parent[rows["near"]] == target
    assert np.bincount(cid)[cid[[rows["far"], *rows["isolated"]]]].tolist() == [1] * 7
    assert len(np.unique(cid)) == len(sizes) - 1
    # three partitions (the singletons' targets in another one): the same clusters, parents
    cid3, parent3, r3 = run(3, "cluster.attach_threshold=0.65")
    assert r3.stages.stages["score"].extra["partitions"] == 3 and r3.derived == {}
    np.testing.assert_array_equal(cid3, cid)
    np.testing.assert_array_equal(parent3, parent)
    # a cut above the near singleton's best link: nobody moves
    high, _, r = run(1, "cluster.attach_threshold=0.9")
    assert r.stages.stages["attach"].extra["attached"] == 0
    np.testing.assert_array_equal(high, off)
    # auto: derived from the graph and recorded; label-free on, learned methods off
    _, _, r = run(1, "cluster.attach_singletons=auto")
    assert (
        r.derived["cluster.attach_threshold"]["value"]
        == r.stages.stages["attach"].extra["threshold"]
    )
    cfg = _config(["method=gcn-v", "cluster.attach_singletons=auto"])
    assert r.attach_threshold(get_method("gcn-v", cfg, load=False)) is None
    # ... unless the method's shape says otherwise: map-equation (learned) attaches
    derived = r.derived["cluster.attach_threshold"]["value"]
    assert r.attach_threshold(get_method("map-equation", cfg, load=False)) == derived
    r.config.cluster.attach_singletons = "on"
    r.config.cluster.attach_threshold = 0.5
    assert r.attach_threshold(get_method("gcn-v", cfg, load=False)) == 0.5
    r.config.cluster.attach_singletons = "off"
    assert r.attach_threshold(get_method("knn-cc", cfg, load=False)) is None


# ------------------------------------------------------------------ 7. shift warning
def test_shift_warning_names_the_anchor(small_split, tmp_path, capsys):
    files, runs = small_split
    graph = runs["one"].graph
    model = tiny_gcn_v(tmp_path / "model", runs["one"].info.dim, graph.k)
    add_model_meta(model, {"graph_stats": {"near": 0.99, "far": 0.95}})
    common = [
        "--features",
        files["features"],
        "--method",
        "gcn-v",
        "--model",
        model,
        *_reuse(runs["one"]),
    ]
    run = _cli([*common, "--output", str(tmp_path / "shifted")], capsys)
    warnings = run["shift_warnings"]
    assert len(warnings) == 2 and all(w.startswith("gcn-v: ") for w in warnings)
    assert "median rank-1 similarity" in warnings[0] and "0.990 in training" in warnings[0]
    assert "median far-neighbour similarity" in warnings[1]
    assert run["derived_parameters"] == {}  # a learned method: no attach step by default
    # the data's own summary, computed here from the graph: no shift
    own = combine(graph.k, [rank_histograms(*read_knn_rows(graph, 0, graph.n_rows))])
    assert own.summary() == run["similarity"]
    add_model_meta(model, {"graph_stats": own.summary()})
    # the executor's check that fills run.json (a second job would only add the scoring)
    cfg = _config(LAYOUTS["one"])
    cfg.methods.gcn_v.model = model
    runs["one"].resolve(get_method("gcn-v", cfg))
    assert runs["one"].shift_warnings == []
    add_model_meta(model, {"graph_stats": {**own.summary(), "far": own.summary()["far"] + 0.06}})
    runs["one"].resolve(get_method("gcn-v", cfg))
    assert [w.split(" here")[0] for w in runs["one"].shift_warnings] == [
        "gcn-v: median far-neighbour similarity " + f"{own.summary()['far']:.3f}"
    ]


# ------------------------------------------------------------------ 8. auto vs tuned
@pytest.fixture(scope="module")
def shift_runs(ray_local, tmp_path_factory):
    """Train and test splits of two settings with different similarity scales (~1,400
    rows each), each with its kNN graph built once: ``{setting: {split: (run, labels)}}``."""
    root = tmp_path_factory.mktemp("auto-shift")
    out = {}
    for name in ("high-sim", "low-sim"):
        s = dataclasses.replace(SETTINGS[name], n_ids=35)
        out[name] = {}
        for split in ("train", "test"):
            files = write_split(s, split, str(root), seed=0)
            _, labels = make_split(s, split, seed=0)
            spec = JobSpec(
                features=files["features"],
                labels=files["labels"],
                output="unused",
                config=_config(),
                work_dir=str(root / f"{name}-{split}"),
            )
            out[name][split] = (start_run(spec), labels)
    return out


def _pipeline_f(run: Run, labels: np.ndarray, name: str, value=None) -> float:
    cfg = _config()
    if value is not None:
        tunable = get_method(name, cfg, load=False).shape.tunable
        set_key(cfg, f"methods.{name}.{tunable.param}", repr(float(value)))
    cid, _ = _cluster_ids(run, get_method(name, cfg))
    return evaluate(labels, cid)["pairwise_f"]


def _aro_reference(run: Run, thresholds: list[float]) -> list[np.ndarray]:
    """ARO's cluster ids per threshold, with the list length the pipeline derives and its
    attach step: the one-process reference (equal to the partitioned link, test 5) and the
    pipeline's own attach stage, so a grid costs no link actors."""
    cfg = _config()
    method = run.resolve(get_method("aro", cfg))
    attach = run.attach_threshold(method)
    n = run.graph.n_rows
    knn_ids, knn_sims = read_knn_rows(run.graph, 0, n)
    assert attach is not None
    src, dst, dist = rank_order_distances(knn_ids, method.list_length(run.graph.k))
    scores = neighbor_density(knn_sims, SCORE_NEIGHBORS)
    out = []
    for t in thresholds:
        keep = dist <= t
        cid, sizes, reps, parent = labels_to_clusters(components(n, src[keep], dst[keep]), scores)
        refs = ClusterRefs(
            ranges=[(0, n)],
            scores=[ray.put(scores)],
            parents=[ray.put(parent)],
            cluster_id=ray.put(cid),
            summary=ray.put((sizes, reps)),
            n_clusters=len(sizes),
        )
        attached = attach_singletons(refs, run.graph, attach, None, StageLog())
        out.append(ray_get(attached.cluster_id))
    return out


# (setting, method) -> the measured numbers, where auto misses the tolerance
# (measured on the rules of 2026-11-29; a refit that closes the gap makes these XPASS)
MISSES: dict[tuple[str, str], str] = {
    ("low-sim", "knn-dbscan"): "auto 0.562 vs tuned 0.637 (eps 0.4 best on train)",
    ("high-sim", "kmeans"): "auto 0.811 vs tuned 0.876 (threshold 0.75 best on train)",
}
CASES = [
    pytest.param(
        s,
        m,
        marks=[pytest.mark.xfail(strict=True, raises=AssertionError, reason=MISSES[(s, m)])]
        if (s, m) in MISSES
        else [],
        id=f"{s}-{m}",
    )
    for s in ("high-sim", "low-sim")
    for m in LABEL_FREE
]


@pytest.mark.parametrize(("setting", "name"), CASES)
def test_auto_is_close_to_the_train_tuned_threshold(shift_runs, setting, name):
    """Auto on the test split scores at most TOLERANCE below the value best on the train
    split over the tunable's coarse grid (tune's first pass), run on the test split. One-
    sided: auto beating an over-fitted train value is no failure of the rule."""
    (train, train_labels), (test, test_labels) = (
        shift_runs[setting][split] for split in ("train", "test")
    )
    tunable = get_method(name, _config(), load=False).shape.tunable
    grid = _values(tunable.low, tunable.high, tunable.step * COARSE_FACTOR)
    if name == "aro":
        scores = [evaluate(train_labels, cid)["pairwise_f"] for cid in _aro_reference(train, grid)]
        best = grid[int(np.argmax(scores))]
        test.derived.clear()
        auto_cid, _ = _cluster_ids(test, get_method(name, _config()))
        auto = evaluate(test_labels, auto_cid)["pairwise_f"]
        derived = test.derived["aro.threshold"]["value"]
        ref_auto, ref_best = _aro_reference(test, [derived, best])
        # the reference path is the pipeline's own result at the derived threshold
        assert _same_partition(ref_auto, auto_cid)
        tuned = evaluate(test_labels, ref_best)["pairwise_f"]
    else:
        scores = [_pipeline_f(train, train_labels, name, v) for v in grid]
        best = grid[int(np.argmax(scores))]
        tuned = _pipeline_f(test, test_labels, name, best)
        auto = _pipeline_f(test, test_labels, name)
    print(
        f"{setting} {name}: auto {auto:.4f} tuned {tuned:.4f} ({tunable.param}={best:g}, "
        f"train F {max(scores):.4f})"
    )
    assert auto >= tuned - TOLERANCE, (auto, tuned, best)
