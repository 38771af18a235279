"""The ``ltc-ray`` command line: one verb per module here and per script in ``jobs/``.

Exit codes: 0 success, 2 bad arguments or bad input (one line on stderr naming the
file or flag and the problem), 1 anything else.

Importing this package loads neither torch, faiss nor Ray (``--help`` and the argument
checks run without them); each verb imports the pipeline once its cheap checks pass.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from ltc_ray.cli.args import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from ltc_ray.cli.cluster import cluster_dry_run, cluster_main, cluster_parser
from ltc_ray.cli.demo import demo_main, demo_parser
from ltc_ray.cli.embed import embed_main, embed_parser
from ltc_ray.cli.evaluate import evaluate_main, evaluate_parser
from ltc_ray.cli.export import export_main, export_parser
from ltc_ray.cli.folders import folders_main, folders_parser
from ltc_ray.cli.report import report_main, report_parser
from ltc_ray.cli.serve import serve_main, serve_parser
from ltc_ray.cli.synthetic import synthetic_main, synthetic_parser
from ltc_ray.cli.train import train_main, train_parser
from ltc_ray.cli.tune import tune_main, tune_parser
from ltc_ray.errors import InputError, MissingDependency, WorkFileError
from ltc_ray.redact import RedactingFormatter, redact

__all__ = [
    "EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "VERBS", "cluster_dry_run", "cluster_main",
    "cluster_parser", "demo_main", "demo_parser", "embed_main", "embed_parser", "evaluate_main",
    "evaluate_parser", "export_main", "export_parser", "folders_main", "folders_parser",
    "report_main", "report_parser", "serve_main", "serve_parser", "main", "run_verb",
    "synthetic_main", "synthetic_parser", "train_main", "train_parser", "tune_main", "tune_parser",
]

log = logging.getLogger("ltc_ray")

VERBS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "cluster": (cluster_main, "cluster embeddings (jobs/cluster.py)"),
    "make-synthetic": (synthetic_main, "write the synthetic benchmark (jobs/make_synthetic.py)"),
    "evaluate": (evaluate_main, "score an output against labels (jobs/evaluate.py)"),
    "tune": (tune_main, "pick a method's threshold on a labelled split (jobs/tune.py)"),
    "train": (train_main, "train a learned method on a labelled split (jobs/train.py)"),
    "export-knn": (export_main, "export a kNN graph as faiss_k_<k>.npz (jobs/export_knn.py)"),
    "embed": (embed_main, "embed images with a user-supplied model (jobs/embed.py)"),
    "export-folders": (folders_main,
                       "write a result as img_names.txt folders (jobs/export_folders.py)"),
    "report": (report_main, "write a run's overview as one static HTML file"),
    "serve": (serve_main, "browse results in a web page (binds 127.0.0.1 by default)"),
    "demo": (demo_main, "synthetic data -> tune -> cluster -> table (jobs/demo.py)"),
}


def run_verb(verb: str, argv: Sequence[str]) -> int:
    """Run one verb with logging and the exit-code contract."""
    if not log.handlers:  # our own progress lines only; libraries stay at WARNING
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    func = VERBS[verb][0]
    try:
        return func(argv)
    except InputError as exc:
        print(redact(f"error: {exc.where}: {exc.problem}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except MissingDependency as exc:  # an install problem, not bad input: exit 1, one line
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the job boundary: report and exit 1
        from ltc_ray.runtime import unwrap_ray_error

        cause = unwrap_ray_error(exc)
        if isinstance(cause, InputError):
            print(redact(f"error: {cause.where}: {cause.problem}"), file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(cause, MissingDependency):  # a worker's install lacks it
            print(f"error: {cause}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(cause, WorkFileError):  # the run's own file: rerunning heals it
            print(redact(f"failed: {cause}"), file=sys.stderr)
            return EXIT_FAILED
        log.exception("job failed")
        print(redact(f"failed: {type(cause).__name__}: {cause}"), file=sys.stderr)
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        lines = ["usage: ltc-ray VERB [options]   (ltc-ray VERB --help for a verb's options)", ""]
        lines += [f"  {verb:<15} {help_}" for verb, (_, help_) in VERBS.items()]
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown verb '{argv[0]}'\n" + "\n".join(lines), file=sys.stderr)
            return EXIT_BAD_INPUT
        print("\n".join(lines))
        return EXIT_OK if argv else EXIT_BAD_INPUT
    return run_verb(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
