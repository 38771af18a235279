"""The README's demo: synthetic MS1M-shaped data -> the default method with every
parameter derived from the data (no labels, no config), thresholds tuned, GCN-V and the
hard-clusters edge scorer trained on the TRAIN split -> cluster the TEST split with each
method on a local Ray -> a metrics table and the derived values. Then the image workflow
on a small generated image set: embed (a tiny TorchScript model) -> cluster -> a report,
and the command that opens every result in the browser (``ltc-ray serve``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from ltc_ray.cli.args import EXIT_OK, _Parser
from ltc_ray.cli.cluster import cluster_main
from ltc_ray.cli.embed import embed_main
from ltc_ray.cli.train import train_main
from ltc_ray.cli.tune import tune_main
from ltc_ray.config import Config
from ltc_ray.metrics.report import metrics_table
from ltc_ray.synthetic import make_benchmark
from ltc_ray.synthetic.images import identity_of, make_image_set, write_tiny_model

TUNED_METHODS = ("knn-cc", "density-peak")
IMAGE_SET = {"n_identities": 40, "per_identity": 30, "size": 64}  # 1,200 small images


def demo_parser() -> argparse.ArgumentParser:
    """``demo``'s flags."""
    p = _Parser(prog="demo", description=__doc__)
    p.add_argument("--scale", type=float, default=0.05,
                   help="fraction of MS1M (0.05 = ~29K train + ~29K test samples)")
    p.add_argument("--epochs", type=int, default=40, help="GCN-V training epochs")
    p.add_argument("--hc-epochs", type=int, default=3,
                   help="hard-clusters edge scorer training epochs")
    p.add_argument("--data-root", default="data/demo")
    p.add_argument("--runs", default="runs/demo", help="where outputs and tuned configs go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--port", type=int, default=8000, help="the port the printed serve command uses")
    return p


def _ltc_ray_command() -> str:
    """The ``ltc-ray`` script of this interpreter's environment (the demo's .venv)."""
    script = os.path.join(os.path.dirname(sys.executable), "ltc-ray")
    return os.path.relpath(script) if os.path.exists(script) else "ltc-ray"


def image_workflow(data_root: str, runs: str, seed: int) -> tuple[str, dict]:
    """Generated images -> ``ltc-ray embed`` -> ``ltc-ray cluster --report`` (default
    method, no labels used) -> scored against the generator's identities afterwards."""
    images, model = f"{data_root}/images", f"{data_root}/tiny-model/model.pt"
    names = make_image_set(images, seed=seed, **IMAGE_SET)
    write_tiny_model(model, size=IMAGE_SET["size"], seed=seed)
    labels = f"{data_root}/images.meta"  # the identities, in the embedding job's row order
    with open(labels, "w") as fh:
        fh.write("\n".join(str(i) for i in identity_of(names)) + "\n")
    embeddings = f"{runs}/images-embeddings"
    embed_main(["--input", images, "--model", model, "--output", embeddings, "--overwrite"])
    out = f"{runs}/images-{Config().method}"
    cluster_main(["--features", f"{embeddings}/embeddings.parquet", "--labels", labels,
                  "--output", out, "--overwrite", "--report"])
    with open(f"{out}/metrics.json") as fh:
        return out, json.load(fh)


def demo_main(argv: Sequence[str]) -> int:
    """``demo``: every step in one process on one local Ray; prints the metrics table."""
    from ltc_ray.runtime import init_ray  # loads Ray: not at the CLI's import (--help)

    args = demo_parser().parse_args(argv)
    make_benchmark(args.data_root, parts=(0, 1), scale=args.scale, seed=args.seed,
                   overwrite=True)  # replaces only an earlier demo's own files
    init_ray(args.num_cpus)  # one local Ray for every step below
    common = ["--data-root", args.data_root]
    train_work = f"{args.runs}/part0_train.work"  # one kNN graph of part0 for all of training
    runs = {}
    for method in TUNED_METHODS:
        tuned = f"{args.runs}/{method}.yaml"
        tune_main(["--part", "0", *common, "--method", method, "--output-config", tuned,
                   "--overwrite", "--work-dir", train_work])
        runs[method] = ["--config", tuned]
    model = f"{args.runs}/gcn-v-model"
    train_main(["--method", "gcn-v", "--part", "0", *common, "--output", model, "--overwrite",
                "--epochs", str(args.epochs), "--work-dir", train_work])
    runs["gcn-v"] = ["--method", "gcn-v", "--model", model]
    hc_model = f"{args.runs}/hard-clusters-model"
    train_main(["--method", "hard-clusters", "--part", "0", *common, "--output", hc_model,
                "--overwrite", "--epochs", str(args.hc_epochs), "--work-dir", train_work])
    runs["hard-clusters"] = ["--model", hc_model]  # the model's method: hard-clusters
    runs = {f"{Config().method} (auto)": [], **runs}  # no config, no labels used
    results, seconds, derived = {}, {}, {}
    for method, flags in runs.items():
        out = f"{args.runs}/part1_test-{method.split()[0]}{'-auto' if not flags else ''}"
        t0 = time.perf_counter()
        cluster_main(["--part", "1", *common, *flags, "--output", out, "--overwrite",
                      "--work-dir", f"{args.runs}/part1_test.work", "--report"])
        seconds[method] = time.perf_counter() - t0
        with open(f"{out}/metrics.json") as fh:
            results[method] = json.load(fh)
        with open(f"{out}/run.json") as fh:
            derived[method] = json.load(fh).get("derived_parameters", {})
    print(f"\nDemo: synthetic part1_test at scale {args.scale}; thresholds tuned, GCN-V and the "
          "hard-clusters edge scorer trained on part0_train only; the kNN graph is built once "
          "(first row's time)")
    print(metrics_table(results, seconds))
    print("\nValues derived from the test split's own kNN similarities (run.json "
          "derived_parameters; README \"Your own embeddings\"):")
    for method, values in derived.items():
        for key, entry in values.items():
            print(f"  {method}: {key} = {entry['value']}  ({entry['rule']})")
    print(f"\nParquet outputs: {args.runs}/part1_test-<method>/clusters/*.parquet; a report "
          "with plots beside each: report.html")
    image_run, image_metrics = image_workflow(args.data_root, args.runs, args.seed)
    print(f"\nImages: {IMAGE_SET['n_identities'] * IMAGE_SET['per_identity']} generated "
          f"images of {IMAGE_SET['n_identities']} identities ({args.data_root}/images) embedded "
          f"with a tiny TorchScript model and clustered: pairwise F "
          f"{image_metrics['pairwise_f']:.4f}, {image_metrics['n_clusters']} clusters "
          f"({image_run})")
    print(f"\nBrowse every result (clusters, thumbnails, re-cluster, annotations):\n"
          f"  {_ltc_ray_command()} serve --results {args.runs} --port {args.port}\n"
          f"  then open http://127.0.0.1:{args.port}/ in a browser (Ctrl-C stops the server)")
    return EXIT_OK
