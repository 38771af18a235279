"""One writer per output location: a lease file created only if absent.

A job takes ``<output>/_LOCK`` before its first write and gives it back when it ends
(committed or failed). The lease is created with an exclusive create: ``O_EXCL`` on a local
disk, a conditional put (``If-None-Match: *``, fsspec ``mode="create"``) on object storage,
so of two jobs racing for one location exactly one gets it; the other exits 2 naming the
holder. The holder rewrites the lease's ``heartbeat`` every :data:`HEARTBEAT_SECONDS`.
A lease is stale, and is taken over, when its heartbeat is older than
:data:`STALE_SECONDS` (``LTC_RAY_LOCK_STALE_SECONDS`` overrides it) or when it was taken on
this host by a process that no longer exists (a killed job).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import psutil

from ltc_ray.errors import InputError, storage_errors
from ltc_ray.io.fs import current_umask, is_local_fs, join_uri, url_to_fs

log = logging.getLogger("ltc_ray")

LOCK = "_LOCK"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
STALE_ENV = "LTC_RAY_LOCK_STALE_SECONDS"
T = TypeVar("T")


def _stale_after() -> float:
    try:
        return float(os.environ.get(STALE_ENV, STALE_SECONDS))
    except ValueError:
        return STALE_SECONDS


def _lease(run_id: str) -> bytes:
    now = time.time()
    return json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": now, "heartbeat": now}).encode()


def _create_exclusive(fs, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; whether this call created it."""
    try:
        if is_local_fs(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        else:
            fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def _read_lease(fs, path: str) -> dict | None:
    """The lease at ``path`` (None: gone); an unreadable lease reads as an empty one."""
    try:
        holder = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, OSError):
        return {}
    return holder if isinstance(holder, dict) else {}


def is_stale(holder: dict, now: float | None = None) -> bool:
    """Whether a lease's holder is gone: its process died here, or it stopped beating."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not psutil.pid_exists(holder["pid"]):
            return True
    heartbeat = holder.get("heartbeat")
    if not isinstance(heartbeat, int | float):
        return True
    return now - heartbeat > _stale_after()


class OutputLock:
    """The lease on one output location; use as a context manager or acquire/release."""

    def __init__(self, output: str, run_id: str, storage_options: dict | None = None):
        self.output = output
        self.run_id = run_id
        self.storage_options = storage_options
        self.fs, self.path = url_to_fs(join_uri(output, LOCK), storage_options)
        self._created_dir = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease or raise InputError naming its live holder."""
        fs, out_dir = url_to_fs(self.output, self.storage_options)
        self._created_dir = is_local_fs(fs) and not os.path.isdir(out_dir)
        for _ in range(3):
            if _create_exclusive(self.fs, self.path, _lease(self.run_id)):
                break
            holder = _read_lease(self.fs, self.path)
            if holder is None:
                continue  # released meanwhile: try again
            if not is_stale(holder):
                raise InputError(
                    self.output, f"another job is writing to this output (run "
                    f"{str(holder.get('run_id'))[:40]}, pid {holder.get('pid')} on "
                    f"{str(holder.get('host'))[:40]}); wait for it or choose another output "
                    f"(a killed job's lock ({LOCK}) is taken over after "
                    f"{_stale_after():.0f} s)",
                )
            log.warning("output %s: taking over the stale lock of run %s", self.output,
                        holder.get("run_id"))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)
        else:
            raise InputError(self.output, "could not take the output's lock; try again")
        self._beat = threading.Thread(target=self._heartbeat, name="ltc-ray-lock",
                                      daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            holder = _read_lease(self.fs, self.path)
            if not holder or holder.get("run_id") != self.run_id:
                log.warning("output %s: lost the lock to another job", self.output)
                return
            holder["heartbeat"] = time.time()
            try:
                self.fs.pipe_file(self.path, json.dumps(holder).encode())
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried next time
                log.warning("output %s: could not renew the lock: %s", self.output, exc)

    def ensure_held(self) -> None:
        """Raise before a commit when the lease is no longer this job's (taken over as
        stale while this job was stalled): never commit over another job's work."""
        if not self.holds():
            raise RuntimeError(f"lost the lock on {self.output} to another job; not committing")

    def holds(self) -> bool:
        """Whether the lease on storage is still this job's."""
        holder = _read_lease(self.fs, self.path)
        return bool(holder) and holder.get("run_id") == self.run_id

    def release(self) -> None:
        """Give the lease back (only our own) and remove an output directory this job
        created and left empty."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            if self.holds():
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self.path)
        except Exception as exc:  # noqa: BLE001 - storage gone: never mask the job's own error
            log.warning("output %s: could not release the lock (%s); the next run takes it "
                        "over", self.output, str(exc).splitlines()[0] if str(exc) else exc)
        if self._created_dir:
            _, out_dir = url_to_fs(self.output, self.storage_options)
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only when empty

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def sole_writer(output: str, run_id: str, storage_options: dict | None,
                check: Callable[[], T]) -> Iterator[tuple[OutputLock, T]]:
    """``with sole_writer(uri, run_id, so, check) as (lock, checked):`` hold ``uri``'s lock
    for the block. ``check`` (the location's ownership test, already run before the cheap
    checks) runs again under the lock, since another job may have committed there
    meanwhile; its result is ``checked``. Storage failures here are one-line InputErrors."""
    lock = OutputLock(output, run_id, storage_options)
    with storage_errors(output):
        lock.acquire()
    try:
        with storage_errors(output):
            checked = check()
        yield lock, checked
    finally:
        lock.release()
