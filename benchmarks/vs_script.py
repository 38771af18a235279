"""Our whole job against the one-process script a user with one machine would write.

    python benchmarks/vs_script.py [--sizes 20000,100000,200000] [--repeats 3] [--k 80]
        [--threshold 0.7] [--cpus 2] [--index flat|ivf] [--root DIR] [--json OUT.json]
        [--markdown OUT.md] [--pin]
    python benchmarks/vs_script.py --scaling [--sizes 25000,75000,200000,400000] ...

Why: with one machine the alternative to ltc-ray is ``benchmarks/one_process_script.py``
(faiss + scipy, ~20 lines), so the job is measured side by side with it. Each
measurement is a fresh subprocess, script and ours alternating (ABAB), median of the
repeats; the wall time is taken here around the subprocess (what the user waits for:
Python start, imports, Ray start-up for ours). Both outputs must be the same partition
(exit 1 otherwise, with the exact index). Per size it reports both walls, kNN
throughput (our ``knn`` stage vs the script's faiss search) and the merge (our
``link`` + ``merge`` vs the script's cut + scipy components), peak RSS of both, and the
issue's targets as met/missed.

``--scaling``: the job alone across sizes (IVF kNN by default), per-stage seconds and
the log-log slope per stage; a non-kNN stage with slope > 1.1 is flagged, stages under
0.05 s at every size are reported as too short to fit.

Data: MS1M-shaped synthetic rows (``ltc_ray.synthetic``, part1's generator at the scale
that holds N rows; the first N), written once per size as ``ROOT/data/rows-N.npy``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPT = HERE / "one_process_script.py"
JOB = REPO / "jobs" / "cluster.py"
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "TQDM_DISABLE": "1"}
DIM = 256
PART1_ROWS = 584_013  # MS1M part1_test at scale 1.0
VS_SIZES = "20000,100000,200000"
SCALING_SIZES = "25000,75000,200000,400000"
LARGE = 100_000  # the "at >= 100K rows"
SHORT_S = 0.05  # a stage under this at every size is too short to fit a slope
SLOPE_FLAG = 1.1
STAGE_ORDER = ("plan", "knn", "graph_stats", "score", "link", "merge", "attach", "write",
               "commit")  # run.json sorts its keys; reports list stages in pipeline order


def log(msg: str) -> None:
    print(f"[vs_script {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ================================================================ data
def make_rows(n: int, path: Path) -> Path:
    """``n`` MS1M-shaped rows x 256 as .npy (untimed; reused when already there)."""
    if path.exists():
        try:
            if np.load(path, mmap_mode="r").shape == (n, DIM):
                return path
        except ValueError:
            pass
    from ltc_ray.synthetic import SyntheticParams, iter_base_part

    scale = min(1.0, n / PART1_ROWS)
    params, chunks, have = SyntheticParams(), [], 0
    for part in range(1, 10):  # past part1's size: the next base parts, as part3.. do
        for x, _ in iter_base_part(part, scale, 0, DIM, 65_536, params):
            chunks.append(x[: n - have].copy())
            have += len(chunks[-1])
            if have == n:
                break
        if have == n:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, np.concatenate(chunks))
    tmp.replace(path)
    return path


# ================================================================ one measurement each
def _env() -> dict:
    env = {**os.environ, **ENV}
    env.pop("RAY_ADDRESS", None)  # a local Ray on this machine, as the script runs here
    return env


def _run(cmd: list[str], log_path: Path) -> float:
    """Run ``cmd`` to completion; its wall seconds as the user sees them."""
    with open(log_path, "w") as fh:
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(),
                            cwd=REPO).returncode
        wall = time.perf_counter() - t0
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}\n--- {log_path} ---\n{tail}")
    return wall


def _pin(args) -> list[str]:
    return ["taskset", "-c", f"0-{args.cpus - 1}"] if args.pin else []


def run_ours(feat: Path, out: Path, work: Path, args, index: str) -> dict:
    """One fresh job (nothing reused): harness wall, run.json's stages and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    cmd = [*_pin(args), sys.executable, str(JOB), "--features", str(feat),
           "--output", str(out), "--work-dir", str(work), "--method", "knn-cc",
           "--set", f"methods.knn-cc.threshold={args.threshold}",
           "--set", "cluster.attach_singletons=off", "--set", f"knn.k={args.k}",
           "--set", f"knn.index={index}", "--num-cpus", str(args.cpus), "--overwrite"]
    wall = _run(cmd, out.parent / f"{out.name}.log")
    run = json.loads((out / "run.json").read_text())
    if run.get("reused_stages"):
        raise SystemExit(f"{out}: stages were reused {run['reused_stages']}; not a fresh run")
    stages = run["stages"]
    worker = max([max(s.get("worker_peak_rss_bytes") or 0, s.get("actor_peak_rss_bytes") or 0)
                  for s in stages.values()] or [0])
    return {
        "wall_s": wall,
        "job_wall_s": run.get("wall_seconds"),
        "stages_s": {name: float(stages[name]["seconds"]) for name in sorted(
            stages, key=lambda x: (STAGE_ORDER.index(x) if x in STAGE_ORDER else 99, x))},
        "driver_peak_rss_bytes": int(run.get("driver_peak_rss_bytes") or 0),
        "worker_peak_rss_bytes": int(worker),
        "knn_recall": run.get("knn_recall"),
        "n_clusters": run.get("n_clusters"),
    }


def run_script(feat: Path, out: Path, args, index: str) -> dict:
    """One run of the user's script: harness wall, its phases and its VmHWM."""
    out.unlink(missing_ok=True)
    cmd = [*_pin(args), sys.executable, str(SCRIPT), "--features", str(feat),
           "--dim", str(DIM), "--k", str(args.k), "--threshold", str(args.threshold),
           "--output", str(out), "--threads", str(args.cpus), "--index", index]
    log_path = out.with_suffix(".log")
    wall = _run(cmd, log_path)
    line = [ln for ln in log_path.read_text().splitlines() if ln.startswith("{")][-1]
    rec = json.loads(line)
    return {"wall_s": wall, "phases_s": rec["seconds"], "peak_rss_bytes": rec["peak_rss_bytes"],
            "n_clusters": rec["clusters"]}


# ================================================================ correctness
def read_labels(path: Path, n: int) -> np.ndarray:
    """cluster_id by sample_id from a Parquet file or a directory of parts."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(path), columns=["sample_id", "cluster_id"])
    sid = table.column("sample_id").to_numpy()
    cid = table.column("cluster_id").to_numpy()
    order = np.argsort(sid, kind="stable")
    if not np.array_equal(sid[order], np.arange(n)):
        raise SystemExit(f"{path}: sample_id is not 0..{n - 1} once each")
    return cid[order].astype(np.int64)


def compare_partitions(a: np.ndarray, b: np.ndarray) -> dict:
    """Contingency check: every a-cluster meets exactly one b-cluster and vice versa."""
    nb = int(b.max()) + 1
    pairs = np.unique(a * nb + b)
    pa_, pb_ = pairs // nb, pairs % nb
    split_a = np.bincount(pa_, minlength=int(a.max()) + 1) > 1
    split_b = np.bincount(pb_, minlength=nb) > 1
    bad = split_a[a] | split_b[b]
    return {"same_partition": not bool(bad.any()), "mismatch_rows": int(bad.sum()),
            "same_ids": bool(np.array_equal(a, b))}


# ================================================================ the two modes
def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _median_dict(dicts: list[dict]) -> dict:
    keys = [k for k in dicts[0] if all(k in d for d in dicts)]
    return {k: _median([d[k] for d in dicts]) for k in keys}


def _targets(n: int, ratio: float, knn_tput: float, merge_speed: float) -> list[dict]:
    """The issue's targets at this size (None where the target does not apply)."""
    wall_max = 1.1 if n >= LARGE else 2.0
    out = [{"name": "whole job wall", "target": f"ours/script <= {wall_max}",
            "value": ratio, "met": ratio <= wall_max}]
    large = n >= LARGE
    out.append({"name": "kNN throughput", "target": "ours/script >= 0.95 (at >= 100K)",
                "value": knn_tput, "met": (knn_tput >= 0.95) if large else None})
    out.append({"name": "merge speed", "target": "scipy/ours >= 1.0 (at >= 100K)",
                "value": merge_speed, "met": (merge_speed >= 1.0) if large else None})
    return out


def vs_mode(args, root: Path, sizes: list[int], index: str) -> dict:
    entries, total = [], len(sizes) * args.repeats * 2
    step = 0
    for n in sizes:
        feat = make_rows(n, root / "data" / f"rows-{n}.npy")
        out_dir = root / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        script_runs, ours_runs, checks = [], [], []
        for r in range(args.repeats):
            for side in ("script", "ours"):  # ABAB
                step += 1
                log(f"[{step}/{total}] N={n:,} {side} repeat {r + 1}/{args.repeats} ...")
                if side == "script":
                    rec = run_script(feat, out_dir / f"script-{n}.parquet", args, index)
                    script_runs.append(rec)
                else:
                    rec = run_ours(feat, out_dir / f"ours-{n}", root / "work" / f"ours-{n}",
                                   args, index)
                    ours_runs.append(rec)
                log(f"[{step}/{total}] N={n:,} {side}: {rec['wall_s']:.2f} s")
            checks.append(compare_partitions(read_labels(out_dir / f"ours-{n}" / "clusters", n),
                                             read_labels(out_dir / f"script-{n}.parquet", n)))
        same = all(c["same_partition"] for c in checks)
        script_wall = _median([r["wall_s"] for r in script_runs])
        ours_wall = _median([r["wall_s"] for r in ours_runs])
        phases = _median_dict([r["phases_s"] for r in script_runs])
        stages = _median_dict([r["stages_s"] for r in ours_runs])
        ours_knn, script_knn = stages.get("knn", math.nan), phases["knn"]
        ours_merge = stages.get("link", 0.0) + stages.get("merge", 0.0)
        script_merge = phases["cut+cc"]
        entry = {
            "N": n,
            "script_wall_s": script_wall,
            "ours_wall_s": ours_wall,
            "ratio_ours_over_script": ours_wall / script_wall,
            "script_runs_s": [r["wall_s"] for r in script_runs],
            "ours_runs_s": [r["wall_s"] for r in ours_runs],
            "script_phases_s": phases,
            "ours_stages_s": stages,
            "ours_outside_stages_s": ours_wall - sum(stages.values()),
            "knn": {
                "script_s": script_knn,
                "ours_s": ours_knn,
                "ratio_ours_over_script_s": ours_knn / script_knn,
                "script_rows_per_s": n / script_knn,
                "ours_rows_per_s": n / ours_knn,
                "throughput_ours_over_script": script_knn / ours_knn,
            },
            "merge": {
                "script_cut_cc_s": script_merge,
                "ours_link_merge_s": ours_merge,
                "speed_scipy_over_ours": script_merge / ours_merge if ours_merge else math.inf,
            },
            "rss": {
                "script_peak_bytes": int(_median([r["peak_rss_bytes"] for r in script_runs])),
                "ours_driver_peak_bytes": int(_median(
                    [r["driver_peak_rss_bytes"] for r in ours_runs])),
                "ours_worker_peak_bytes": int(_median(
                    [r["worker_peak_rss_bytes"] for r in ours_runs])),
            },
            "n_clusters": {"ours": ours_runs[-1]["n_clusters"],
                           "script": script_runs[-1]["n_clusters"]},
            "knn_recall": ours_runs[-1]["knn_recall"],
            "same_partition": same,
            "mismatch_rows": max(c["mismatch_rows"] for c in checks),
            "same_ids": all(c["same_ids"] for c in checks),
            "reused_stages": [],
        }
        entry["targets"] = _targets(n, entry["ratio_ours_over_script"],
                                    entry["knn"]["throughput_ours_over_script"],
                                    entry["merge"]["speed_scipy_over_ours"])
        entries.append(entry)
        log(f"N={n:,}: script {script_wall:.2f} s, ours {ours_wall:.2f} s "
            f"(x{entry['ratio_ours_over_script']:.2f}), same partition: {same}")
    return {"entries": entries,
            "all_same_partition": all(e["same_partition"] for e in entries)}


def _slope(ns: list[int], secs: list[float]) -> float:
    x = np.log(np.asarray(ns, dtype=float))
    y = np.log(np.maximum(np.asarray(secs, dtype=float), 1e-4))  # a 0.000 s stage stays finite
    return float(np.polyfit(x, y, 1)[0])


def scaling_mode(args, root: Path, sizes: list[int], index: str) -> dict:
    entries, total, step = [], len(sizes) * args.repeats, 0
    for n in sizes:
        feat = make_rows(n, root / "data" / f"rows-{n}.npy")
        (root / "out").mkdir(parents=True, exist_ok=True)
        runs = []
        for r in range(args.repeats):
            step += 1
            log(f"[{step}/{total}] scaling N={n:,} ours repeat {r + 1}/{args.repeats} ...")
            runs.append(run_ours(feat, root / "out" / f"scale-{n}", root / "work" / f"scale-{n}",
                                 args, index))
            log(f"[{step}/{total}] scaling N={n:,}: {runs[-1]['wall_s']:.2f} s")
        entries.append({"N": n, "wall_s": _median([r["wall_s"] for r in runs]),
                        "runs_s": [r["wall_s"] for r in runs],
                        "stages_s": _median_dict([r["stages_s"] for r in runs]),
                        "knn_recall": runs[-1]["knn_recall"]})
    for e in entries:  # the merge runs in link (star forests) above
        # cluster.merge_local_max_edges and in merge below it: their sum is the merge's cost
        if "link" in e["stages_s"] and "merge" in e["stages_s"]:
            e["stages_s"]["link+merge"] = e["stages_s"]["link"] + e["stages_s"]["merge"]
    stages = [s for s in entries[0]["stages_s"] if all(s in e["stages_s"] for e in entries)]
    slopes = {}
    ns = [e["N"] for e in entries]
    for name in [*stages, "wall"]:
        secs = [e["wall_s"] if name == "wall" else e["stages_s"][name] for e in entries]
        short = max(secs) < SHORT_S
        slope = _slope(ns, secs) if len(set(ns)) > 1 else math.nan
        slopes[name] = {
            "slope": slope,
            "seconds": secs,
            "too_short": short,
            "flagged": bool(name not in ("knn", "wall") and not short and slope > SLOPE_FLAG),
        }
    return {"entries": entries, "slopes": slopes}


# ================================================================ reports
def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "MISSED")


def markdown(result: dict) -> str:
    la = result["loadavg_before"]
    head = (f"{result['machine']['description']}; load average {la[0]:.2f} / {la[1]:.2f} / "
            f"{la[2]:.2f} at start; k={result['k']}, threshold {result['threshold']}, "
            f"index {result['index']}, {result['cpus']} CPUs each side; "
            f"median of {result['repeats']}")
    if result["mode"] == "scaling":
        entries = result["entries"]
        lines = [f"Job scaling ({head}).", "",
                 "| stage | " + " | ".join(f"{e['N']:,} rows s" for e in entries)
                 + " | log-log slope | note |",
                 "|---|" + "---:|" * len(entries) + "---:|---|"]
        for name, s in result["slopes"].items():
            note = ("too short to fit" if s["too_short"] else
                    f"FLAG: slope > {SLOPE_FLAG}" if s["flagged"] else "")
            lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in s["seconds"])
                         + f" | {s['slope']:.2f} | {note} |")
        return "\n".join(lines) + "\n"
    lines = [f"ltc-ray job vs the one-process script ({head}, ABAB, fresh processes).", "",
             "| rows | script wall s | ours wall s | ours/script | kNN script s (rows/s) "
             "| kNN ours s (rows/s) | kNN throughput ours/script | cut+cc script s "
             "| link+merge ours s | merge speed scipy/ours | peak RSS MiB script / ours "
             "driver / ours worker | same partition |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for e in result["entries"]:
        k, m, r = e["knn"], e["merge"], e["rss"]
        lines.append(
            f"| {e['N']:,} | {e['script_wall_s']:.2f} | {e['ours_wall_s']:.2f} "
            f"| {e['ratio_ours_over_script']:.2f} "
            f"| {k['script_s']:.2f} ({k['script_rows_per_s']:,.0f}) "
            f"| {k['ours_s']:.2f} ({k['ours_rows_per_s']:,.0f}) "
            f"| {k['throughput_ours_over_script']:.2f} | {m['script_cut_cc_s']:.2f} "
            f"| {m['ours_link_merge_s']:.2f} | {m['speed_scipy_over_ours']:.2f} "
            f"| {_mb(r['script_peak_bytes'])} / {_mb(r['ours_driver_peak_bytes'])} / "
            f"{_mb(r['ours_worker_peak_bytes'])} | {'yes' if e['same_partition'] else 'NO'} |")
    lines += ["", "Targets (issue 16): whole job <= 1.1x the script at >= 100K rows and "
              "<= 2x below; kNN throughput >= 0.95x single-process faiss and merge >= 1.0x "
              "scipy at >= 100K.", "",
              "| rows | target | value | verdict |", "|---:|---|---:|---|"]
    for e in result["entries"]:
        for t in e["targets"]:
            lines.append(f"| {e['N']:,} | {t['name']}: {t['target']} | {t['value']:.2f} "
                         f"| {_verdict(t['met'])} |")
    lines += ["", "Where the time goes (seconds, medians):", "",
              "| rows | script: " + ", ".join(result["entries"][0]["script_phases_s"])
              + " | ours: stages + outside (Python, Ray start/stop) |", "|---:|---|---|"]
    for e in result["entries"]:
        sp_ = ", ".join(f"{v:.2f}" for v in e["script_phases_s"].values())
        st = ", ".join(f"{k} {v:.2f}" for k, v in e["ours_stages_s"].items())
        lines.append(f"| {e['N']:,} | {sp_} | {st}, outside {e['ours_outside_stages_s']:.2f} |")
    return "\n".join(lines) + "\n"


def _machine() -> dict:
    return {"description": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}",
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scaling", action="store_true",
                    help="the job alone across sizes: per-stage log-log slopes")
    ap.add_argument("--sizes", help=f"comma-separated row counts (default {VS_SIZES}; "
                    f"with --scaling {SCALING_SIZES})")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per side and size (default 3; with --scaling 1)")
    ap.add_argument("--k", type=int, default=80, help="neighbours per row, self included")
    ap.add_argument("--threshold", type=float, default=0.7, help="the same cut for both")
    ap.add_argument("--cpus", type=int, default=2, help="ours --num-cpus, script --threads")
    ap.add_argument("--index", choices=("flat", "ivf"),
                    help="kNN index (default flat; with --scaling ivf)")
    ap.add_argument("--pin", action="store_true",
                    help="run both under taskset on CPUs 0..cpus-1 (Ray's daemons included)")
    ap.add_argument("--root", help="data and outputs (default: a new temp dir)")
    ap.add_argument("--json", metavar="OUT", help="write the results here")
    ap.add_argument("--markdown", metavar="OUT", help="write the report table here")
    args = ap.parse_args(argv)
    sizes = [int(v) for v in (args.sizes or (SCALING_SIZES if args.scaling else VS_SIZES))
             .split(",")]
    args.repeats = args.repeats or (1 if args.scaling else 3)
    index = args.index or ("ivf" if args.scaling else "flat")
    root = Path(args.root or tempfile.mkdtemp(prefix="ltc-vs-script-"))
    root.mkdir(parents=True, exist_ok=True)
    log(f"root {root}; sizes {sizes}; repeats {args.repeats}; index {index}")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    body = (scaling_mode if args.scaling else vs_mode)(args, root, sizes, index)
    result = {"mode": "scaling" if args.scaling else "vs", "machine": _machine(),
              "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
              "wall_s": round(time.perf_counter() - t0, 1), "k": args.k,
              "threshold": args.threshold, "cpus": args.cpus, "index": index,
              "repeats": args.repeats, "pinned": args.pin, "sizes": sizes, **body}
    table = markdown(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table)
    if not args.scaling and not result["all_same_partition"]:
        bad = [e["N"] for e in result["entries"] if not e["same_partition"]]
        log(f"DIFFERENT PARTITIONS at N={bad} (rows in mismatched clusters: "
            f"{[e['mismatch_rows'] for e in result['entries'] if not e['same_partition']]})")
        # IVF: both sides are approximate with different training, so only report it
        return 1 if index == "flat" else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
