"""Errors a user can cause: bad arguments, bad files, bad config.

Every such error is an :class:`InputError` whose message names the file (or
flag) and the problem, so jobs can print one line and exit with code 2.
"""

from __future__ import annotations

import contextlib
import errno
import socket
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


class MissingDependency(Exception):
    """A package the job needs cannot be imported: an install problem, not bad input, so
    jobs print one line naming the extra that brings it and exit 1, before any work."""

    def __init__(self, module: str, install: str, problem: str = "is not installed"):
        self.module = module
        self.install = install
        self.problem = problem
        super().__init__(f"{module} {problem}: {install}")

    def __reduce__(self):  # picklable across Ray workers, like InputError
        return (type(self), (self.module, self.install, self.problem))

    @classmethod
    def from_import_error(cls, module: str, install: str, exc: ImportError) -> MissingDependency:
        """The error for a failed ``import module``: "is not installed" when the module
        itself is absent; a broken install (one of its own imports fails) says so, with
        the first line of the error."""
        if isinstance(exc, ModuleNotFoundError) and exc.name in (module, None):
            return cls(module, install)
        return cls(module, install, f"cannot be imported ({brief(exc)})")


FAISS_INSTALL = "pip install 'ltc-ray[cpu]' (or 'ltc-ray[gpu]' on GPU machines)"

# Exceptions from these packages are storage failures: an endpoint that cannot be reached,
# missing credentials, a denied permission.
_STORAGE_PACKAGES = {"botocore", "aiobotocore", "s3fs", "gcsfs", "google", "aiohttp", "adlfs"}
# OSErrors that describe the location itself: it is missing, denied, not what the path
# says, or behind a network that does not answer. Everything else (ENOSPC, EDQUOT, EIO,
# EROFS, ENOMEM, EMFILE, ...) is this machine's trouble, not the user's input.
_LOCATION_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ENOENT", "EACCES", "EPERM", "ENOTDIR", "EISDIR", "ENAMETOOLONG", "ELOOP", "ENXIO",
        "ENODEV", "ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "ETIMEDOUT", "EHOSTUNREACH",
        "EHOSTDOWN", "ENETUNREACH", "ENETDOWN", "EADDRNOTAVAIL",
    ) if hasattr(errno, name)
)
_LOCATION_TYPES = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
                   ConnectionError, TimeoutError, socket.gaierror, socket.herror)


def _from_storage_package(exc: BaseException) -> bool:
    return any(cls.__module__.split(".")[0] in _STORAGE_PACKAGES for cls in type(exc).__mro__)


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the storage location cannot be used (missing, denied, an
    endpoint or credentials that fail): the user's input, exit 2. A full disk, a
    read-only file system or an I/O error of this machine is not, nor is a bug."""
    if _from_storage_package(exc):
        return True
    if isinstance(exc, OSError):
        # an object store's reply translated to an OSError (s3fs: unknown codes -> EIO)
        # describes the endpoint, not this machine
        cause = exc.__cause__
        if cause is not None and _from_storage_package(cause):
            return True
        return isinstance(exc, _LOCATION_TYPES) or exc.errno in _LOCATION_ERRNOS
    return False  # (ConnectionError and TimeoutError are OSErrors)


@contextlib.contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """For the cheap up-front checks: a storage failure while looking at ``where`` becomes
    an :class:`InputError` (one line, exit 2) instead of a traceback after Ray started.
    Resource errors of the machine (a full disk, ...) propagate as themselves: exit 1."""
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
