"""The exit-code contract's edges: which storage failures are the user's input (exit 2),
which are the machine's (exit 1, with a traceback), and that an exit-1 failure inside a
Ray worker keeps the worker's traceback in the log."""

from __future__ import annotations

import errno
import io
import logging
import socket
import traceback

import pytest

from ltc_ray import cli
from ltc_ray.errors import InputError, is_storage_error, storage_errors
from ltc_ray.runtime import WorkerTraceback, ray_get

LOCATION = [errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
            errno.ENAMETOOLONG, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH]
MACHINE = [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE,
           errno.ENFILE, errno.EFBIG]


@pytest.mark.parametrize("code", LOCATION, ids=[errno.errorcode[c] for c in LOCATION])
def test_a_location_problem_is_bad_input(code):
    with pytest.raises(InputError) as info, storage_errors("s3://bucket/x"):
        raise OSError(code, "the location says no")  # (OSError() picks the errno's subclass)
    assert info.value.where == "s3://bucket/x" and "cannot access storage" in info.value.problem


@pytest.mark.parametrize("code", MACHINE, ids=[errno.errorcode[c] for c in MACHINE])
def test_a_resource_error_of_the_machine_is_not_bad_input(code):
    """A full disk while writing is exit 1 with a traceback, not the user's fault."""
    with pytest.raises(OSError) as info, storage_errors("/data/out"):
        raise OSError(code, "the machine says no")
    assert not isinstance(info.value, InputError) and info.value.errno == code


def test_storage_failures_without_an_errno():
    assert is_storage_error(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert is_storage_error(ConnectionResetError())
    assert is_storage_error(FileNotFoundError("no such key"))  # s3fs: no errno
    assert not is_storage_error(OSError("something else"))
    assert not is_storage_error(ValueError("a bug"))
    # an object store's reply that s3fs translates to EIO is the endpoint's, not the disk's
    from botocore.exceptions import ClientError

    reply = OSError(errno.EIO, "Unknown code")
    reply.__cause__ = ClientError({"Error": {"Code": "Odd", "Message": "odd"}}, "GetObject")
    assert is_storage_error(reply) and not is_storage_error(OSError(errno.EIO, "disk"))


def _tasks(ray):
    """Remote functions made here: a local function travels to the worker by value (this
    test module is not importable there)."""

    def _explode_in_the_worker(x: int) -> int:
        raise ValueError(f"worker cannot take {x}")

    def _bad_input_in_the_worker(path: str) -> int:
        raise InputError(path, "row 3 is wrong")

    return ray.remote(_explode_in_the_worker), ray.remote(_bad_input_in_the_worker)


@pytest.fixture()
def ltc_log():
    """The job log as run_verb writes it (it adds no handler of its own when one exists)."""
    log = logging.getLogger("ltc_ray")
    saved = (log.handlers[:], log.level, log.propagate)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    yield stream
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


def test_ray_get_keeps_the_workers_traceback(ray_local):
    task, _ = _tasks(ray_local)
    with pytest.raises(ValueError, match="worker cannot take 5") as info:
        ray_get(task.remote(5))
    assert type(info.value) is ValueError  # the user's own type, not a RayTaskError
    cause = info.value.__cause__
    assert isinstance(cause, WorkerTraceback) and "_explode_in_the_worker" in str(cause)
    assert "\x1b[" not in str(cause)  # plain text in the log, not terminal colours
    assert "_explode_in_the_worker" in "".join(traceback.format_exception(info.value))


def test_exit_1_logs_the_worker_frames_and_input_errors_stay_one_line(
        ray_local, ltc_log, monkeypatch, capsys, tmp_path):
    explode, bad = _tasks(ray_local)
    monkeypatch.setitem(cli.VERBS, "crash", (lambda argv: ray_get(explode.remote(1)), ""))
    monkeypatch.setitem(cli.VERBS, "bad", (lambda argv: ray_get(bad.remote(argv[0])), ""))

    assert cli.run_verb("crash", []) == cli.EXIT_FAILED
    logged = ltc_log.getvalue()
    assert "job failed" in logged and "_explode_in_the_worker" in logged, logged
    assert capsys.readouterr().err.strip() == "failed: ValueError: worker cannot take 1"

    ltc_log.truncate(0)
    where = str(tmp_path / "f.bin")
    assert cli.run_verb("bad", [where]) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines() == [f"error: {where}: row 3 is wrong"]
    assert ltc_log.getvalue() == ""  # no traceback anywhere for bad input
