"""Domain-shift benchmark: how well each label-free method's defaults ("auto" parameters
derived from the kNN similarity profile) transfer across embedding models (issue 15).

    python benchmarks/domain_shift.py --json runs/domain-shift/results.json \\
        --markdown runs/domain-shift/report.md [--learned] [--fit]
    python benchmarks/domain_shift.py --quick      # smoke: 3 settings x 3 methods

For every setting of :data:`ltc_ray.synthetic.shift.SETTINGS` (similarity scale,
dimension, identity sizes, outliers, offset / unnormalised rows) and every method, on
the setting's TEST split:

- ``default``: the method with the default config (every ``auto`` parameter derived
  from the test graph, the singleton-attach step at its default): pairwise F, BCubed F,
  NMI, cluster count, the derived values and the cluster-size distribution;
- ``tuned``: the method's threshold tuned (``ltc_ray.pipeline.tune.tune``, its default
  grid) on the TRAIN split (disjoint identities, same distribution), applied to test:
  what a user with labelled data from the same model could reach;
- ``best``: the threshold tuned on the TEST split itself. A REFERENCE ONLY (it looks at
  the test labels), never used to choose anything: the ceiling of the method.

``--learned`` also trains gcn-v and hard-clusters on ms1m-like train and runs them on
ms1m-like and low-sim test (the shift check's warnings, and gcn-v with ``tau=auto``).
``--fit`` re-fits each similarity/distance rule's alpha on the train curves (and a
leave-one-setting-out check on the test curves); it only reports, never edits code.

Cost on 2 cores shared with other jobs (load average 6-8): ``--quick`` took 14.5 minutes
(864 s), about 80% of it ARO's two tunes per setting (22 trials of 5-10 s each: its
link actors); ``--learned`` adds about 4 minutes, ``--fit`` seconds. The full run (10
settings x 9 methods, two tunes of ~22 trials per cell) is estimated from those per-trial
costs at about 2 hours (not measured). Data, kNN graphs, tuned configs and models stay
under ``--root``; a rerun reuses the data and the kNN graphs (the stage store).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "TQDM_DISABLE": "1"}
for _key, _value in ENV.items():
    os.environ.setdefault(_key, _value)

from ltc_ray.cluster import get_method, method_class  # noqa: E402
from ltc_ray.config import Config, set_key  # noqa: E402
from ltc_ray.errors import InputError  # noqa: E402
from ltc_ray.io.labels import read_labels  # noqa: E402
from ltc_ray.metrics import size_distribution  # noqa: E402
from ltc_ray.params import Auto, field_autos  # noqa: E402
from ltc_ray.pipeline.executor import Run  # noqa: E402
from ltc_ray.pipeline.job import JobSpec, evaluate_task, read_labels_task, start_run  # noqa: E402
from ltc_ray.pipeline.tune import parse_grid, tune  # noqa: E402
from ltc_ray.runtime import init_ray, ray_get  # noqa: E402
from ltc_ray.synthetic.shift import (  # noqa: E402
    SETTINGS,
    ShiftSetting,
    same_identity_cosine,
    write_split,
)

LABEL_FREE = ("knn-cc", "density-peak", "infomap", "chinese-whispers", "knn-dbscan", "aro",
              "cdp", "hac", "kmeans")
QUICK_SETTINGS = ("ms1m-like", "low-sim", "lfw-like")
QUICK_METHODS = ("knn-cc", "aro", "hac")
LEARNED_TRAIN, LEARNED_TEST = "ms1m-like", ("ms1m-like", "low-sim")
LEARNED_OPTIONS = {"gcn-v": {"epochs": 30}, "hard-clusters": {"epochs": 1, "tune_folds": 2},
                   "gcn-d": {}, "gcn-ds": {}, "lgcn": {}, "pse-gcn": {},
                   # the same edge scorer as hard-clusters, trained the same way
                   "map-equation": {"epochs": 1, "tune_folds": 2}}
LEARNED_DEFAULT = ("gcn-v", "hard-clusters")
COLLAPSE_DEFAULT, COLLAPSE_TUNED = 0.5, 0.8
FIT_ALPHAS = np.round(np.arange(-0.5, 2.0 + 1e-9, 0.01), 2)
FIT_MEAN_WEIGHT = 0.2
KEPT_METRICS = ("pairwise_precision", "pairwise_recall", "pairwise_f", "bcubed_precision",
                "bcubed_recall", "bcubed_f", "nmi", "n_clusters", "n_classes", "n_samples")

log = logging.getLogger("domain_shift")


def say(text: str) -> None:
    """Progress on stderr (stdout carries the report)."""
    print(text, file=sys.stderr, flush=True)


# ================================================================ data
def prepare_data(s: ShiftSetting, root: str, seed: int) -> dict:
    """Both splits of ``s`` under ``<root>/data``; reused when the files exist and their
    sidecar records the same seed and generator parameters. Returns per split: paths,
    n_samples, n_ids, same_identity_cos, impostor_cos."""
    out = {}
    for split in ("train", "test"):
        folder = os.path.join(root, "data", s.name)
        features = os.path.join(folder, f"{split}.npy")
        labels = os.path.join(folder, f"{split}.meta")
        sidecar = os.path.join(folder, f"{split}.json")
        record = None
        if os.path.exists(features) and os.path.exists(labels) and os.path.exists(sidecar):
            saved = json.loads(Path(sidecar).read_text())
            if saved.get("seed") == seed and saved.get("setting") == s.describe():
                record = saved["stats"]
                if "same_identity_cos" not in record:  # an older sidecar: recompute
                    x = np.load(features)
                    record.update(same_identity_cosine(x, read_labels(labels, len(x))))
        if record is None:
            t0 = time.perf_counter()
            record = write_split(s, split, os.path.join(root, "data"), seed)
            record["generate_s"] = round(time.perf_counter() - t0, 2)
            Path(sidecar).write_text(json.dumps(
                {"seed": seed, "setting": s.describe(), "stats": record}, indent=1))
        out[split] = record
    return out


# ================================================================ one split's run
class Split:
    """One split's prepared run (kNN graph, similarity stats, labels ref) in its own work
    dir, shared by the default/tuned runs and by ``tune`` (which reuses its kNN stage)."""

    def __init__(self, setting: str, split: str, data: dict, root: str, seed: int,
                 num_cpus: int):
        self.setting, self.split = setting, split
        self.features, self.labels = data["features"], data["labels"]
        self.work_dir = os.path.join(root, "work", setting, split)
        self.seed, self.num_cpus = seed, num_cpus
        t0 = time.perf_counter()
        self.run: Run = start_run(JobSpec(
            features=self.features, labels=self.labels, output=self.work_dir + "/unused",
            config=base_config("knn-cc", seed), work_dir=self.work_dir, num_cpus=num_cpus))
        self.labels_ref = read_labels_task.remote(self.labels, self.run.info.n_rows, None)
        self.stats = self.run.similarity()
        self.prepare_s = round(time.perf_counter() - t0, 2)
        self.knn_reused = "knn" in self.run.store.reused

    def cluster(self, config: Config) -> dict:
        """``config.method`` on this split: metrics, derived values, sizes, warnings."""
        run = self.run
        run.derived, run.shift_warnings = {}, []
        t0 = time.perf_counter()
        refs = run.cluster(get_method(config.method, config))
        metrics = ray_get(evaluate_task.remote(self.labels_ref, refs.cluster_id))
        sizes = ray_get(refs.summary)[0]
        return {**{k: metrics[k] for k in KEPT_METRICS if k in metrics},
                "derived": copy.deepcopy(run.derived),
                "cluster_sizes": size_distribution(sizes),
                "shift_warnings": list(run.shift_warnings),
                "seconds": round(time.perf_counter() - t0, 2)}

    def tune(self, config: Config, output_config: str, grid: tuple | None) -> dict:
        """``tune`` on this split (its work dir: the kNN graph is reused)."""
        t0 = time.perf_counter()
        result = tune(self.features, self.labels, copy.deepcopy(config), output_config,
                      grid=grid, work_dir=self.work_dir, num_cpus=self.num_cpus,
                      overwrite=True)
        curve = [[float(v), m["pairwise_f"], m["bcubed_f"], m["n_clusters"]]
                 for v, m in sorted(result["results"].items())]
        return {"param": result["param"], "value": float(result["best_value"]),
                "score": result["best_score"], "config": output_config, "curve": curve,
                "seconds": round(time.perf_counter() - t0, 2)}


def base_config(method: str, seed: int) -> Config:
    """The default config for ``method`` (every auto parameter left auto)."""
    return Config(method=method, seed=seed)


# ================================================================ the grid of runs
def bench_cell(name: str, test: Split, train: Split, root: str, seed: int,
               grid: tuple | None, grid_factor: float = 1.0) -> dict:
    """default / tuned / best of one method on one setting (tune's grid: ``grid``, else
    the method's own with its step times ``grid_factor``)."""
    cfg = base_config(name, seed)
    tunable = get_method(name, cfg).shape.tunable
    if grid is None and tunable is not None and grid_factor != 1.0:
        grid = (tunable.low, tunable.high, round(tunable.step * grid_factor, 6))
    cell: dict = {"default": test.cluster(cfg)}
    d = cell["default"]
    say(f"  {name:16s} default  pairwise F {d['pairwise_f']:.3f}  BCubed F "
        f"{d['bcubed_f']:.3f}  ({d['n_clusters']} clusters, {d['seconds']:.1f} s)")
    configs = os.path.join(root, "configs")
    os.makedirs(configs, exist_ok=True)
    try:
        tuned = train.tune(cfg, os.path.join(configs, f"{test.setting}.{name}.train.yaml"), grid)
    except InputError as exc:  # no tunable threshold
        cell["tuned"] = cell["best"] = None
        cell["no_tune"] = str(exc)
        say(f"  {name:16s} no tunable: {exc}")
        return cell
    applied = copy.deepcopy(cfg)
    set_key(applied, f"methods.{name}.{tuned['param']}", repr(tuned["value"]))
    tuned["train_score"] = tuned.pop("score")
    cell["tuned"] = {**tuned, "test": test.cluster(applied)}
    best = test.tune(cfg, os.path.join(configs, f"{test.setting}.{name}.test-reference.yaml"),
                     grid)
    best["pairwise_f_test"] = best.pop("score")
    cell["best"] = {**best, "note": "reference only: tuned on the test labels"}
    by_value = {row[0]: row for row in best["curve"]}
    row = by_value.get(best["value"])
    if row is not None:
        cell["best"]["bcubed_f_test"] = row[2]
        cell["best"]["n_clusters"] = row[3]
    t = cell["tuned"]
    say(f"  {name:16s} tuned    {t['param']}={t['value']:g} (train F {t['train_score']:.3f}) "
        f"-> test pairwise F {t['test']['pairwise_f']:.3f}; best {best['value']:g} -> "
        f"{cell['best']['pairwise_f_test']:.3f}  ({t['seconds'] + best['seconds']:.0f} s tuning)")
    return cell


def run_benchmark(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    settings = selected_settings(args)
    methods = args.methods
    reused = None
    if args.reuse_tuning:  # the tuned/best cells of an earlier run (same seed and data)
        with open(args.reuse_tuning) as fh:
            reused = json.load(fh)
    grid = parse_grid(args.grid) if args.grid else None
    resources = init_ray(args.num_cpus)  # one Ray session for everything below
    result: dict = {
        "benchmark": "domain-shift", "seed": args.seed, "root": args.root,
        "methods": list(methods), "settings": {}, "results": {},
        "rules": {name: declared_rules(name) for name in methods},
        "grid": args.grid, "grid_factor": args.grid_factor, "machine": machine(resources),
        "loadavg_before": os.getloadavg(),
        "note": "best = the threshold tuned on the test split: a reference only, never used "
                "to choose anything",
    }
    splits: dict[tuple[str, str], Split] = {}

    def split_of(s: ShiftSetting, split: str) -> Split:
        key = (s.name, split)
        if key not in splits:
            data = result["settings"].setdefault(s.name, setting_record(s, args))
            splits[key] = Split(s.name, split, data["splits"][split], args.root, args.seed,
                                args.num_cpus)
            data["splits"][split]["similarity"] = splits[key].stats.summary()
            data["splits"][split]["prepare_s"] = splits[key].prepare_s
            data["splits"][split]["knn_reused"] = splits[key].knn_reused
        return splits[key]

    for s in ([] if args.learned_only else settings):
        say(f"== {s.name}: {s.note}")
        test, train = split_of(s, "test"), split_of(s, "train")
        info = result["settings"][s.name]["splits"]["test"]
        say(f"   test: {info['n_samples']} samples, {info['n_ids']} ids, same-id cos "
            f"{info['same_identity_cos']:.3f}, impostor cos {info['impostor_cos']:.3f}; near "
            f"{test.stats.anchors()['near']:.3f}, far {test.stats.anchors()['far']:.3f}")
        cells = result["results"].setdefault(s.name, {})
        for name in methods:
            t0 = time.perf_counter()
            earlier = (reused or {}).get("results", {}).get(s.name, {}).get(name)
            if earlier is not None:  # --reuse-tuning: only the default run is new
                cells[name] = {**earlier, "default": test.cluster(base_config(name, args.seed))}
                cells[name]["tuning_from"] = args.reuse_tuning
            else:
                cells[name] = bench_cell(name, test, train, args.root, args.seed, grid,
                                         args.grid_factor)
            cells[name]["seconds"] = round(time.perf_counter() - t0, 2)
    if args.learned or args.learned_only:
        result["learned"] = run_learned(args, split_of)
    if args.fit:
        result["fit"] = fit_rules(result, splits)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["loadavg_after"] = os.getloadavg()
    return result


def declared_rules(name: str) -> dict:
    """The auto rules ``name`` declares now (the library's fitted alphas change between
    runs: the record says which ones these results used)."""
    return {field: {"rule": rule.describe(), "alpha": rule.alpha, "kind": rule.kind}
            for field, rule in field_autos(method_class(name).Params).items()}


def selected_settings(args: argparse.Namespace) -> list[ShiftSetting]:
    if args.tiny:  # the smoke test's: one small setting
        return [dataclasses.replace(SETTINGS["ms1m-like"], name="ms1m-like-tiny", n_ids=16)]
    return [SETTINGS[name] for name in args.settings]


def setting_record(s: ShiftSetting, args: argparse.Namespace) -> dict:
    return {"generator": s.describe(), "note": s.note,
            "splits": prepare_data(s, args.root, args.seed)}


def machine(resources: dict) -> dict:
    return {"description": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
                           f"Python {platform.python_version()}",
            "ray_cpus": resources.get("CPU"), "date": time.strftime("%Y-%m-%d", time.gmtime())}


# ================================================================ learned methods
def run_learned(args: argparse.Namespace, split_of) -> dict:
    """gcn-v and hard-clusters trained on ms1m-like train, run on ms1m-like and low-sim
    test: metrics and the shift check's warnings (and gcn-v with tau=auto)."""
    from ltc_ray.pipeline.train import train

    say("== learned methods (trained on ms1m-like train)")
    source = split_of(SETTINGS[LEARNED_TRAIN], "train")
    chosen = {name: LEARNED_OPTIONS[name] for name in args.learned_methods}
    out: dict = {"trained_on": LEARNED_TRAIN, "options": chosen, "runs": {}}
    for name, options in chosen.items():
        model = os.path.join(args.root, "models", name)
        t0 = time.perf_counter()
        meta = train(name, source.features, source.labels, model, base_config(name, args.seed),
                     options=options, work_dir=source.work_dir, overwrite=True,
                     num_cpus=args.num_cpus)
        train_s = round(time.perf_counter() - t0, 1)
        say(f"  {name}: trained in {train_s:.0f} s (train F "
            f"{meta['job_train_metrics']['pairwise_f']:.3f})")
        runs = out["runs"].setdefault(name, {"model": model, "train_s": train_s,
                                             "train_metrics": meta["job_train_metrics"]})
        variants = [("model", None)]
        if name == "gcn-v":
            variants.append(("tau=auto", "auto"))
        for setting in LEARNED_TEST:
            test = split_of(SETTINGS[setting], "test")
            for variant, tau in variants:
                cfg = base_config(name, args.seed)
                cfg.methods.of(name).model = model
                if tau is not None:
                    cfg.methods.of(name).tau = tau
                r = test.cluster(cfg)
                runs[f"{setting}/{variant}"] = r
                say(f"  {name:14s} {setting:10s} {variant:9s} pairwise F {r['pairwise_f']:.3f} "
                    f"BCubed F {r['bcubed_f']:.3f}; {len(r['shift_warnings'])} shift warnings")
    return out


# ================================================================ --fit
def rule_value(rule: Auto, alpha: float, low: float, high: float) -> float:
    """:func:`ltc_ray.graph.similarity_stats.derive`'s value for another ``alpha``."""
    value = low + alpha * (high - low)
    if rule.kind == "distance":
        value = 1.0 - value
    lo, hi = rule.clip
    return round(min(max(value, lo), hi), 3)


def curve_gap(curve: list, value: float) -> tuple[float, bool]:
    """best F of the curve - F at ``value`` (linear between tried values; outside the
    tried range the nearest end's F) and whether ``value`` was outside."""
    xs = np.array([row[0] for row in curve])
    fs = np.array([row[1] for row in curve])
    outside = bool(value < xs[0] - 1e-9 or value > xs[-1] + 1e-9)
    return float(fs.max() - np.interp(value, xs, fs)), outside


def fit_rules(result: dict, splits: dict) -> dict:
    """Refit alpha of every similarity/distance rule on the train curves (objective:
    worst gap + 0.2 * mean gap over the settings), with a leave-one-setting-out check on
    the test curves. Reports only."""
    out: dict = {"objective": f"max gap + {FIT_MEAN_WEIGHT} * mean gap (pairwise F)",
                 "alpha_grid": [float(FIT_ALPHAS[0]), float(FIT_ALPHAS[-1]), 0.01],
                 "methods": {}}
    for name in result["methods"]:
        cls = method_class(name)
        tunable = cls.shape.tunable
        rule = field_autos(cls.Params).get(tunable.param) if tunable else None
        if rule is None or rule.kind not in ("similarity", "distance"):
            continue  # aro's threshold follows its list length: not a single rule
        usable = [s for s in result["results"] if result["results"][s][name].get("tuned")]
        if usable:
            out["methods"][name] = fit_method(name, tunable.param, rule, usable, result,
                                              splits)
    return out


def fit_method(name: str, param: str, rule: Auto, usable: list[str], result: dict,
               splits: dict) -> dict:
    """:func:`fit_rules` for one method over the settings ``usable``."""
    anchors = {(s, split): (splits[(s, split)].stats.anchor(rule.low),
                            splits[(s, split)].stats.anchor(rule.high))
               for s in usable for split in ("train", "test")}
    curves = {(s, "train"): result["results"][s][name]["tuned"]["curve"] for s in usable}
    curves.update({(s, "test"): result["results"][s][name]["best"]["curve"] for s in usable})

    def value(alpha: float, s: str, split: str) -> float:
        return rule_value(rule, alpha, *anchors[(s, split)])

    def gaps(alpha: float, among: list[str], split: str) -> dict[str, float]:
        return {s: curve_gap(curves[(s, split)], value(alpha, s, split))[0] for s in among}

    def fit(among: list[str]) -> float:
        scores = []
        for a in FIT_ALPHAS:
            g = np.array(list(gaps(float(a), among, "train").values()))
            scores.append(g.max() + FIT_MEAN_WEIGHT * g.mean())
        rounded = np.round(np.array(scores), 9)
        ties = FIT_ALPHAS[rounded == rounded.min()]
        return float(ties[np.argmin(np.abs(ties - rule.alpha))])  # the nearest the declared

    refit = fit(usable)
    record: dict = {"param": param, "rule": rule.describe(), "kind": rule.kind,
                    "declared_alpha": rule.alpha, "refit_alpha": refit}
    for label, alpha in (("declared", rule.alpha), ("refit", refit)):
        for split in ("train", "test"):
            record[f"{label}_{split}_gaps"] = {
                s: round(v, 4) for s, v in gaps(alpha, usable, split).items()}
            record[f"{label}_{split}_values"] = {s: value(alpha, s, split) for s in usable}
    record["refit_outside_tried_range"] = [
        s for s in usable
        if curve_gap(curves[(s, "train")], record["refit_train_values"][s])[1]]
    # the declared alpha must reproduce the value the run itself derived (a check of this
    # re-implementation against ltc_ray.graph.similarity_stats.derive)
    derived = {s: result["results"][s][name]["default"]["derived"].get(
        f"{name}.{param}", {}).get("value") for s in usable}
    record["derived_matches"] = all(
        d is None or abs(d - record["declared_test_values"][s]) < 1e-6
        for s, d in derived.items())
    if len(usable) >= 2:
        loso = {}
        for s in usable:
            a = fit([o for o in usable if o != s])
            loso[s] = {"alpha": a, "test_gap": round(gaps(a, [s], "test")[s], 4)}
        record["leave_one_out"] = loso
    return record


# ================================================================ the report
def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def cell_values(cell: dict, metric: str) -> tuple[float, float | None, float | None]:
    default = cell["default"][metric]
    tuned = cell["tuned"]["test"][metric] if cell.get("tuned") else None
    best = None
    if cell.get("best"):
        best = cell["best"].get(f"{metric}_test")
    return default, tuned, best


def markdown(result: dict) -> str:
    settings = list(result["results"])
    methods = result["methods"]
    if not settings:  # --learned-only: no label-free grid
        head = [f"# Domain-shift benchmark, learned methods only (seed {result['seed']}, "
                f"{result['machine']['description']}, {result['wall_s']:.0f} s)"]
        return "\n".join(head + learned_markdown(result.get("learned", {"runs": {},
                                                   "trained_on": LEARNED_TRAIN}))) + "\n"
    lines = [f"# Domain-shift benchmark (seed {result['seed']}, {result['machine']['description']},"
             f" {result['wall_s']:.0f} s)", "",
             "Cells: **default / tuned / best** in percent on each setting's TEST split. "
             "default = every auto parameter derived from the test graph; tuned = threshold "
             "tuned on the TRAIN split, applied to test; best = threshold tuned on the test "
             "split itself (**a reference only**: it looks at the test labels).", ""]
    lines += ["## Settings", "", "| setting | dim | test samples | ids | same-id cos | "
              "impostor cos | near (r1 median) | far | note |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in settings:
        rec = result["settings"][s]
        t = rec["splits"]["test"]
        sim = t.get("similarity", {})
        lines.append(f"| {s} | {rec['generator']['dim']} | {t['n_samples']} | {t['n_ids']} | "
                     f"{t['same_identity_cos']:.3f} | {t['impostor_cos']:.3f} | "
                     f"{sim.get('near', float('nan')):.3f} | {sim.get('far', float('nan')):.3f} "
                     f"| {rec['note']} |")
    for metric, title in (("pairwise_f", "Pairwise F"), ("bcubed_f", "BCubed F")):
        lines += ["", f"## {title} (default / tuned / best)", "",
                  "| method | " + " | ".join(settings) + " |",
                  "|---|" + "---|" * len(settings)]
        for name in methods:
            row = [" / ".join(pct(v) for v in cell_values(result["results"][s][name], metric))
                   for s in settings]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", "## Per setting: the best train-tuned method and each default's gap to it",
              "", "| setting | best tuned (test pairwise F) | " + " | ".join(methods) + " |",
              "|---|---|" + "---:|" * len(methods)]
    for s in settings:
        tuned = {m: cell_values(result["results"][s][m], "pairwise_f")[1] for m in methods}
        tuned = {m: v for m, v in tuned.items() if v is not None}
        if not tuned:
            continue
        top = max(tuned, key=tuned.get)
        gaps = [f"{100 * (tuned[top] - result['results'][s][m]['default']['pairwise_f']):+.1f}"
                for m in methods]
        lines.append(f"| {s} | {top} ({pct(tuned[top])}) | " + " | ".join(gaps) + " |")
    lines += ["", "(gap = best tuned pairwise F - the method's default pairwise F, points)", "",
              "## Worst case of the defaults over the settings", "",
              "| method | worst default pairwise F | on | mean |", "|---|---:|---|---:|"]
    worst = {}
    for m in methods:
        values = {s: result["results"][s][m]["default"]["pairwise_f"] for s in settings}
        w = min(values, key=values.get)
        worst[m] = values[w]
        mean = float(np.mean(list(values.values())))
        lines.append(f"| {m} | {pct(values[w])} | {w} | {pct(mean)} |")
    champion = max(worst, key=worst.get)
    lines += ["", f"Best worst case: **{champion}** ({pct(worst[champion])}): the default "
              "method should be this one.", "",
              f"## Collapses (default < {COLLAPSE_DEFAULT:g} while tuned > {COLLAPSE_TUNED:g})", ""]
    any_collapse = False
    for m in methods:
        hits = []
        for s in settings:
            d, t, _ = cell_values(result["results"][s][m], "pairwise_f")
            if t is not None and d < COLLAPSE_DEFAULT and t > COLLAPSE_TUNED:
                hits.append(f"{s} ({pct(d)} vs {pct(t)})")
        if hits:
            any_collapse = True
            lines.append(f"- {m}: " + ", ".join(hits))
    if not any_collapse:
        lines.append("- none")
    if "learned" in result:
        lines += learned_markdown(result["learned"])
    if "fit" in result:
        lines += fit_markdown(result["fit"])
    return "\n".join(lines) + "\n"


def learned_markdown(learned: dict) -> list[str]:
    lines = ["", f"## Learned methods (trained on {learned['trained_on']} train)", "",
             "| method | test setting | variant | pairwise F | BCubed F | clusters | "
             "shift warnings |", "|---|---|---|---:|---:|---:|---|"]
    for name, runs in learned["runs"].items():
        for key, r in runs.items():
            if "/" not in key:
                continue
            setting, variant = key.split("/")
            warn = "; ".join(r["shift_warnings"]) or "none"
            extra = ""
            if r["derived"]:
                extra = " (" + ", ".join(f"{k}={v['value']}" for k, v in r["derived"].items()) + ")"
            lines.append(f"| {name} | {setting} | {variant}{extra} | {pct(r['pairwise_f'])} | "
                         f"{pct(r['bcubed_f'])} | {r['n_clusters']} | {warn} |")
    return lines


def fit_markdown(fit: dict) -> list[str]:
    lines = ["", "## Rule fit (--fit; reports only)", "",
             f"alpha on a 0.01 grid in [{fit['alpha_grid'][0]}, {fit['alpha_grid'][1]}] "
             f"minimising {fit['objective']} on the TRAIN curves; test gaps use each test "
             "split's own anchors and its reference curve. F between tried values is "
             "interpolated; outside the tried range the nearest end's F is used.", "",
             "| method | rule | declared alpha | refit alpha | train gap max/mean (declared "
             "-> refit) | test gap max/mean (declared -> refit) | leave-one-out test gap max "
             "| reproduces run.derived |", "|---|---|---:|---:|---|---|---:|---|"]

    def mm(gaps: dict) -> str:
        v = np.array(list(gaps.values()))
        return f"{100 * v.max():.1f}/{100 * v.mean():.1f}"

    for name, r in fit["methods"].items():
        loso = r.get("leave_one_out")
        loso_max = f"{100 * max(v['test_gap'] for v in loso.values()):.1f}" if loso else "n/a"
        lines.append(
            f"| {name} | {r['rule']} | {r['declared_alpha']:g} | {r['refit_alpha']:g} | "
            f"{mm(r['declared_train_gaps'])} -> {mm(r['refit_train_gaps'])} | "
            f"{mm(r['declared_test_gaps'])} -> {mm(r['refit_test_gaps'])} | {loso_max} | "
            f"{'yes' if r['derived_matches'] else 'NO'} |")
    for name, r in fit["methods"].items():
        if r.get("leave_one_out"):
            parts = ", ".join(f"{s}: alpha {v['alpha']:g}, gap {100 * v['test_gap']:.1f}"
                              for s, v in r["leave_one_out"].items())
            lines.append(f"\n{name} leave-one-setting-out: {parts}")
        if r["refit_outside_tried_range"]:
            lines.append(f"\n{name}: refit value outside the tried range on "
                         f"{', '.join(r['refit_outside_tried_range'])}")
    return lines


# ================================================================ CLI
def _csv(choices: tuple[str, ...] | list[str], what: str):
    def parse(text: str) -> list[str]:
        if text == "all":
            return list(choices)
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {unknown or text!r}; known: all, {', '.join(choices)}")
        return names
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ltc_ray.cluster import method_names

    ap = argparse.ArgumentParser(
        description="Domain-shift benchmark: default (auto) vs train-tuned vs test-tuned "
                    "(reference only) thresholds of the label-free methods on the synthetic "
                    "shift settings (ltc_ray.synthetic.shift).",
        epilog=f"settings: {', '.join(SETTINGS)}. --quick = --settings "
               f"{','.join(QUICK_SETTINGS)} --methods {','.join(QUICK_METHODS)} (about 15 "
               "minutes on 2 busy cores, mostly ARO's tuning); the full run about 2 hours. "
               "'best' (tuned on the test split) is a reference only.",
    )
    ap.add_argument("--settings", type=_csv(list(SETTINGS), "setting"), default="all",
                    help="comma-separated settings, or all (default)")
    ap.add_argument("--methods", type=_csv(method_names(), "method"),
                    default=",".join(LABEL_FREE),
                    help="comma-separated methods (default: the label-free ones)")
    ap.add_argument("--root", default="runs/domain-shift",
                    help="data (<root>/data), kNN work dirs (<root>/work/<setting>/<split>), "
                         "tuned configs (<root>/configs), models (<root>/models); "
                         "default runs/domain-shift")
    ap.add_argument("--seed", type=int, default=0, help="data and config seed (default 0)")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    ap.add_argument("--json", metavar="OUT.json",
                    help="write every result here (default <root>/results.json)")
    ap.add_argument("--markdown", metavar="OUT.md",
                    help="write the report here (default <root>/report.md)")
    ap.add_argument("--learned", action="store_true",
                    help="also train gcn-v and hard-clusters on ms1m-like train and run them "
                         "on ms1m-like and low-sim test (shift warnings, gcn-v tau=auto)")
    ap.add_argument("--learned-methods", type=_csv(list(LEARNED_OPTIONS), "method"),
                    default=",".join(LEARNED_DEFAULT),
                    help=f"the learned methods --learned trains and runs (default "
                         f"{','.join(LEARNED_DEFAULT)}; any of {', '.join(LEARNED_OPTIONS)})")
    ap.add_argument("--learned-only", action="store_true",
                    help="only the learned methods (no label-free grid)")
    ap.add_argument("--fit", action="store_true",
                    help="refit each similarity/distance rule's alpha on the train curves, "
                         "with a leave-one-setting-out check (reports only)")
    ap.add_argument("--quick", action="store_true",
                    help=f"settings {','.join(QUICK_SETTINGS)}, methods "
                         f"{','.join(QUICK_METHODS)}")
    ap.add_argument("-v", "--verbose", action="store_true", help="the library's INFO log")
    ap.add_argument("--grid-factor", type=float, default=2.0,
                    help="tune each method's own grid with its step times this (default 2: "
                    "half the trials of jobs/tune.py's default grid)")
    ap.add_argument("--reuse-tuning", metavar="EARLIER.json",
                    help="take the tuned and best cells (train/test tuning curves) from an "
                    "earlier run's JSON with the same --root and seed and re-run only the "
                    "default runs (after a change of the auto rules: tuning does not depend "
                    "on them except through the other auto params, which must be unchanged)")
    ap.add_argument("--grid", help=argparse.SUPPRESS)  # LOW:HIGH:STEP for every tune (tests)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the smoke test
    args = ap.parse_args(argv)  # (a str default goes through type= too: lists below)
    if args.quick:
        args.settings, args.methods = list(QUICK_SETTINGS), list(QUICK_METHODS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.makedirs(args.root, exist_ok=True)
    result = run_benchmark(args)
    report = markdown(result)
    json_out = args.json or os.path.join(args.root, "results.json")
    md_out = args.markdown or os.path.join(args.root, "report.md")
    Path(json_out).write_text(json.dumps(result, indent=1, default=_json_default))
    Path(md_out).write_text(report)
    print(report)
    say(f"wrote {json_out} and {md_out} ({result['wall_s']:.0f} s)")
    return 0


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


if __name__ == "__main__":
    sys.exit(main())
