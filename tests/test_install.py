"""An install without faiss (``pip install .`` with neither the ``cpu`` nor the ``gpu``
extra): a job stops before any work with one line naming the extra, exit 1 (an install
problem, not bad input), and every verb's ``--help`` still works."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from conftest import PYTHON, REPO

from ltc_ray.cli import VERBS
from ltc_ray.errors import FAISS_INSTALL, MissingDependency

NO_FAISS_LINE = f"error: faiss is not installed: {FAISS_INSTALL}"


@pytest.fixture()
def no_faiss_env(tmp_path) -> dict:
    """An environment whose ``import faiss`` fails as it does where faiss is not installed:
    a ``faiss`` module first on the path that raises what the import system raises."""
    shadow = tmp_path / "no_faiss"
    shadow.mkdir()
    (shadow / "faiss.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'faiss'\", name='faiss')\n"
    )
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(
               [str(shadow), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("RAY_ADDRESS", None)
    return env


def test_the_shadow_really_hides_faiss(no_faiss_env):
    proc = subprocess.run([PYTHON, "-c", "import faiss"], env=no_faiss_env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "No module named 'faiss'" in proc.stderr


def test_cluster_without_faiss_stops_with_one_line_before_work(no_faiss_env, tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    features = tmp_path / "f.npy"
    np.save(features, x)
    out = tmp_path / "out"
    proc = subprocess.run(
        [PYTHON, str(REPO / "jobs" / "cluster.py"), "--features", str(features),
         "--set", "knn.k=5", "--output", str(out)],
        cwd=REPO, env=no_faiss_env, capture_output=True, text=True, timeout=120,
    )
    # one line: a job that started Ray (or any stage) logs more than that
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [NO_FAISS_LINE], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists()


def test_every_verbs_help_works_without_faiss(no_faiss_env):
    script = (
        "import sys\n"
        "from ltc_ray.cli import VERBS, run_verb\n"
        "for verb in VERBS:\n"
        "    try:\n"
        "        run_verb(verb, ['--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (verb, exc.code)\n"
        "    else:\n"
        "        sys.exit(f'{verb} --help did not exit')\n"
        "print('ok', len(VERBS))\n"
    )
    proc = subprocess.run([PYTHON, "-c", script], cwd=REPO, env=no_faiss_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("usage:") >= len(VERBS) >= 11
    assert proc.stdout.strip().endswith(f"ok {len(VERBS)}")


def test_serve_without_the_ui_extra_says_which_extra(tmp_path):
    """``pip install .`` without ``[ui]``: ``ltc-ray serve`` exits 1 with one line naming
    the extra (fastapi hidden the way faiss is above); its --help still works."""
    shadow = tmp_path / "no_fastapi"
    shadow.mkdir()
    (shadow / "fastapi.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'fastapi'\", name='fastapi')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(shadow), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([PYTHON, "-m", "ltc_ray.cli", "serve", "--results", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: fastapi is not installed: pip install 'ltc-ray[ui]'"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_broken_faiss_says_so_and_names_the_extra():
    missing = MissingDependency.from_import_error(
        "faiss", FAISS_INSTALL, ModuleNotFoundError("No module named 'faiss'", name="faiss"))
    assert str(missing) == f"faiss is not installed: {FAISS_INSTALL}"
    broken = MissingDependency.from_import_error(
        "faiss", FAISS_INSTALL, ImportError("libopenblas.so.0: cannot open shared object file"))
    assert str(broken).startswith("faiss cannot be imported (libopenblas.so.0")
    assert "pip install 'ltc-ray[cpu]'" in str(broken)


def test_pyproject_extras_are_what_the_message_names():
    text = (REPO / "pyproject.toml").read_text()
    assert 'cpu = ["faiss-cpu' in text and 'gpu = ["faiss-gpu' in text
