"""Errors a user can cause: bad arguments, bad files, bad config.

Every such error is an :class:`InputError` whose message names the file (or
flag) and the problem, so jobs can print one line and exit with code 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

ECHO_CHARS = 80  # what an error message may echo of a user's value or file content


def brief(value: object, limit: int = ECHO_CHARS) -> str:
    """``str(value)``'s first line, cut to ``limit`` characters: what a one-line error
    message may echo of user input without printing something unbounded."""
    lines = str(value).strip().splitlines()
    text = lines[0] if lines else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class InputError(ValueError):
    """A problem with the user's input; jobs map it to exit code 2."""

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep the two-argument form picklable across Ray workers
        return (type(self), (self.where, self.problem))


class WorkFileError(RuntimeError):
    """A file the run wrote for itself (a kNN block, a stage result) is missing or damaged.

    Not an :class:`InputError`: the user's input is fine, and a rerun of
    the same command computes the file again (the stage's ``_DONE`` marker records each
    artifact's size and sha256, which the rerun checks before reusing anything)."""

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(
            f"{where}: damaged work file ({problem}); rerun the same command (the job "
            "that wrote it) to compute it again"
        )

    def __reduce__(self):  # picklable across Ray workers, like InputError
        return (type(self), (self.where, self.problem))


# Exceptions from these packages (and OSError) are storage failures: an endpoint that
# cannot be reached, missing credentials, a denied permission.
_STORAGE_PACKAGES = {"botocore", "aiobotocore", "s3fs", "gcsfs", "google", "aiohttp", "adlfs"}


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a storage failure rather than a bug."""
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    return any(cls.__module__.split(".")[0] in _STORAGE_PACKAGES for cls in type(exc).__mro__)


@contextlib.contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """For the cheap up-front checks: a storage failure while looking at ``where`` becomes
    an :class:`InputError` (one line, exit 2) instead of a traceback after Ray started."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        raise InputError(where, f"cannot access storage ({detail})") from None
