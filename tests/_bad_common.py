"""The bad-input matrix's shared vocabulary: the good data's shape, :class:`Case` and
helpers to build a case's arguments. Each ``tests/_bad_<area>.py`` module defines
``CASES`` and ``make_data(d)`` (its own files in the shared data directory);
``tests/test_bad_inputs.py`` runs them all."""

from __future__ import annotations

from dataclasses import dataclass, field

N, D, K = 200, 16, 10  # the good feature set: 200 x 16 float32, clustered with knn.k=10

S3_UNREACHABLE = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
S3_NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                     "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None}
# Why a case must run as a real `python jobs/<job>.py` subprocess rather than in the shared
# runner (tests/_bad_runner.py; see tests/test_bad_inputs.py): ``Case.fresh``.
FRESH_STORAGE = ("object storage: botocore, s3fs and fsspec read the AWS_* variables and cache "
                 "sessions, credentials and filesystem instances once per process")
FRESH_CANARY = ("one case per job as a real process: interpreter start, the script and its "
                "lazy imports print nothing but the one line")
TRAIN = ("--method", "gcn-v", "--features", "{d}/good.bin", "--labels", "{d}/good.meta",
         "--dim", str(D))


@dataclass(frozen=True)
class Case:
    """One bad input. ``{d}`` in args/where is the data directory, ``{out}`` the case's
    output location (``--output {out}`` is appended to cluster jobs unless the args name
    an output themselves)."""

    id: str
    args: tuple[str, ...]
    message: str  # fragment of the one stderr line
    where: str  # the file or flag the line must name
    job: str = "cluster"
    env: dict = field(default_factory=dict)
    cwd: str | None = None  # the job's working directory (default: the repository)
    fresh: str = ""  # why it runs as its own subprocess (FRESH_*; default: in the runner)


def _cluster(*args: str, features: str = "{d}/good.bin", k: int = K) -> tuple[str, ...]:
    """A cluster job over ``features`` (16-d .bin) with knn.k = ``k``, plus ``args``."""
    return ("--features", features, "--dim", str(D), "--set", f"knn.k={k}", *args)
