"""Run many bad-input cases in one process, each exactly as ``python jobs/<job>.py ARGS``
would run it, so the matrix pays the interpreter start and ``import ltc_ray.cli`` once per
runner instead of once per case (tests/test_bad_inputs.py starts one runner per worker).

Usage: ``python tests/_bad_runner.py CASES.json OUT_DIR``. ``CASES.json`` is a list of
``{"id", "script", "args", "cwd", "env"}``; for each case, in order, the runner

* points file descriptors 1 and 2 at ``OUT_DIR/<id>.out`` and ``OUT_DIR/<id>.err`` (fd-level,
  so whatever writes there is captured: Python's streams, handlers a library bound to
  ``sys.stderr`` earlier, native code), sets ``os.environ`` to the case's environment (the
  whole of it), its cwd, ``sys.argv`` and ``sys.path`` as the interpreter would for the
  script, and resets the process state a fresh interpreter would start with: the loggers
  that existed at start-up (so ``run_verb`` installs its handler anew), warning filters and
  "already warned" registries, the secrets ``ltc_ray.redact`` registered;
* runs the script itself (``runpy.run_path(script, run_name="__main__")``: its own
  ``sys.exit(run_verb(verb, argv))``), turning ``SystemExit`` into the exit code as the
  interpreter does and an escaping exception into a traceback on stderr and exit 1;
* appends ``{"id", "rc", "seconds"}`` to ``OUT_DIR/results.jsonl`` (``"timeout": true``
  past ``CASE_TIMEOUT`` seconds, as ``subprocess.run(timeout=...)`` would stop it).

A case that leaves anything behind that could change the next one (Ray initialised, a
thread still running, a changed umask or signal handler) is reported with ``"leak"`` and
the runner stops: the caller reruns that case and the remaining ones as real subprocesses.

What ``import ltc_ray.cli`` prints at start-up (every fresh ``jobs/*.py`` prints it too)
goes to ``OUT_DIR/startup.out`` and ``startup.err``; the caller prepends it to each case's
output."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import runpy
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

CASE_TIMEOUT = 120  # seconds, as the subprocess cases' timeout
_LIBC = ctypes.CDLL(None)


class _Timeout(BaseException):
    """Raised in the case by SIGALRM: the case ran past CASE_TIMEOUT."""


def _alarm(signum, frame):
    raise _Timeout


def _flush() -> None:
    """Python's buffered streams, then C stdio's: all of a case's output reaches its file."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a case may have closed or replaced it
            pass
    _LIBC.fflush(None)


class _Redirect:
    """fds 1 and 2 into two files for the duration of a ``with``."""

    def __init__(self, out: Path, err: Path):
        self.out, self.err = out, err

    def __enter__(self):
        _flush()
        self.saved = (os.dup(1), os.dup(2))
        for fd, path in ((1, self.out), (2, self.err)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        return self

    def __exit__(self, *exc):
        _flush()
        for fd, saved in zip((1, 2), self.saved, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        return False


def _logger_state() -> dict:
    manager = logging.Logger.manager
    loggers = {name: lg for name, lg in manager.loggerDict.items()
               if isinstance(lg, logging.Logger)}
    loggers[""] = logging.getLogger()
    return {name: (lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled)
            for name, lg in loggers.items()}


def _restore_loggers(state: dict, disable: int) -> None:
    for lg, handlers, level, propagate, disabled in state.values():
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled
    logging.disable(disable)


def _reset_warnings(filters: list) -> None:
    """Filters as at start-up and no "already warned" memory: a warning prints again, as it
    would in a fresh process."""
    warnings.filters[:] = filters
    warnings._filters_mutated()  # invalidates every module's __warningregistry__
    for module in list(sys.modules.values()):
        registry = getattr(module, "__warningregistry__", None)
        if isinstance(registry, dict):
            registry.clear()
    warnings.onceregistry.clear()


def _exit_code(exc: SystemExit) -> int:
    """What the interpreter makes of an uncaught SystemExit (printing a non-int code)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _leaks(threads: set, umask: int, handlers: dict) -> list[str]:
    """What a case left behind that a fresh process would not carry into the next case."""
    found = []
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        found.append("Ray was initialised")
    for thread in threading.enumerate():
        if thread.ident not in threads:
            thread.join(timeout=1.0)
            if thread.is_alive():
                found.append(f"thread {thread.name!r} still running")
    mask = os.umask(umask)
    if mask != umask:
        found.append(f"umask changed to {mask:o}")
    for signum, handler in handlers.items():
        if signal.getsignal(signum) is not handler:
            found.append(f"signal {signum} handler changed")
            signal.signal(signum, handler)
    return found


def main(cases_json: str, out_dir: str) -> int:
    cases = json.loads(Path(cases_json).read_text())
    out = Path(out_dir)
    repo = Path(__file__).resolve().parents[1]
    # the interpreter's path for `python jobs/<job>.py`: the script's directory first
    sys.path[0] = str(repo / "jobs")
    base_path = list(sys.path)
    with _Redirect(out / "startup.out", out / "startup.err"):
        sys.path.insert(0, str(repo))  # what each jobs/*.py does before its import
        import ltc_ray.cli  # noqa: F401 - the import every script starts with
        import ltc_ray.redact as redact
    signal.signal(signal.SIGALRM, _alarm)
    base_env, base_cwd, base_argv = dict(os.environ), os.getcwd(), list(sys.argv)
    loggers, disable = _logger_state(), logging.root.manager.disable
    filters = list(warnings.filters)
    umask = os.umask(0o022)
    os.umask(umask)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    threads = {t.ident for t in threading.enumerate()}
    results = open(out / "results.jsonl", "a")  # noqa: SIM115 - open for the whole run
    for case in cases:
        os.environ.clear()
        os.environ.update(case["env"])
        os.chdir(case["cwd"])
        sys.argv = [case["script"], *case["args"]]
        sys.path[:] = base_path
        _restore_loggers(loggers, disable)
        _reset_warnings(filters)
        redact._registered.clear()
        timeout = False
        start = time.perf_counter()
        with _Redirect(out / f"{case['id']}.out", out / f"{case['id']}.err"):
            signal.alarm(CASE_TIMEOUT)
            try:
                runpy.run_path(case["script"], run_name="__main__")
                rc = 0
            except SystemExit as exc:
                rc = _exit_code(exc)
            except _Timeout:
                rc, timeout = -9, True
            except BaseException:  # noqa: BLE001 - as the interpreter reports it
                traceback.print_exc()
                rc = 1
            finally:
                signal.alarm(0)
        seconds = time.perf_counter() - start
        os.environ.clear()
        os.environ.update(base_env)
        os.chdir(base_cwd)
        sys.argv = base_argv
        leak = _leaks(threads, umask, handlers)
        record = {"id": case["id"], "rc": rc, "seconds": round(seconds, 3)}
        if timeout:
            record["timeout"] = True
        if leak:
            record["leak"] = leak
        results.write(json.dumps(record) + "\n")
        results.flush()
        if leak:
            return 3
    results.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
