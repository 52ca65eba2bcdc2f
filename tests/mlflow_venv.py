"""A real MLflow, for the integration tests, in a virtualenv of its own (not a diffcam dependency).

`mlflow_python()` returns the ``python`` of a virtualenv that holds exactly
``tests/mlflow-requirements.txt`` (every package pinned), creating it on first use under
``$DIFFCAM_TEST_MLFLOW_CACHE`` (default ``~/.cache/diffcam-test-mlflow``), in a folder
named after the MLflow version, the Python version and a hash of the requirements file, so a
changed pin builds a new one. Creating it takes ~1 min (pip install); later runs reuse it.
A file lock serialises concurrent creators; a folder without its ``.complete`` marker (an
interrupted install) is rebuilt.

Skips the calling test only when pip cannot reach the package index (checked after a failed
install with ``pip index versions mlflow``); any other install failure is an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffcam.storage.store import file_lock, file_sha256

MLFLOW_VERSION = "3.17.2"
REQUIREMENTS = Path(__file__).with_name("mlflow-requirements.txt")
CACHE_ENV = "DIFFCAM_TEST_MLFLOW_CACHE"


def venv_dir() -> Path:
    cache = Path(os.environ.get(CACHE_ENV) or "~/.cache/diffcam-test-mlflow").expanduser()
    key = file_sha256(REQUIREMENTS)[:12]
    return cache / f"mlflow-{MLFLOW_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}-{key}"


def _registry_reachable(python: Path) -> tuple[bool, str]:
    r = subprocess.run([str(python), "-m", "pip", "index", "versions", "mlflow"], capture_output=True, text=True,
                       timeout=120)
    return r.returncode == 0, (r.stdout + r.stderr)[-1500:]


def mlflow_python() -> Path:
    """The virtualenv's python (module doc); `pytest.skip` when the index is unreachable."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if marker.is_file():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(venv.parent / ".lock"):
        if marker.is_file():  # another process built it while we waited
            return python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        r = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "-r", str(REQUIREMENTS)], capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            reachable, detail = _registry_reachable(python)
            shutil.rmtree(venv, ignore_errors=True)
            if not reachable:
                pytest.skip(f"pip cannot reach the package index to install mlflow=={MLFLOW_VERSION} into "
                            f"{venv}: {detail.strip().splitlines()[-1] if detail.strip() else 'no output'}")
            raise RuntimeError(f"pip install -r {REQUIREMENTS} into {venv} failed (exit {r.returncode}):\n"
                               f"{r.stderr[-4000:]}")
        check = subprocess.run([str(python), "-c", "import mlflow; print(mlflow.__version__)"], capture_output=True,
                               text=True, timeout=300)
        if check.returncode != 0 or check.stdout.strip() != MLFLOW_VERSION:
            raise RuntimeError(f"{venv}: mlflow {MLFLOW_VERSION} does not import after install: "
                               f"{check.stdout[-500:]}{check.stderr[-2000:]}")
        marker.write_text(MLFLOW_VERSION + "\n")
    return python
