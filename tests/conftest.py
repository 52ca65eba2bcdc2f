"""Shared fixtures: an isolated Prefect home, one Prefect test server per session, tiny datasets.

The environment is prepared at import time, before any test module imports Prefect or
Ray: environment defaults (flows/env.py: server start-up timeout, no telemetry) and a
``PREFECT_HOME`` of its own under a temp dir, so tests never touch the user's profiles,
database or a configured server. `prefect_harness` (session-scoped, opt-in) starts one
temporary Prefect server for the tests that run flows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from diffcam.flows.env import set_env_defaults

set_env_defaults()
_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="diffcam-test-prefect-"))
os.environ["PREFECT_HOME"] = str(_PREFECT_HOME)
os.environ.pop("PREFECT_API_URL", None)  # never talk to a real server from tests
os.environ.pop("PREFECT_PROFILE", None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (with its own database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """``make_dataset(n=6, seed=0, broken=(), missing=())`` writes a synthetic dataset folder.

    ``broken``: sample indices whose image is overwritten with bytes that are not an image
    (found when a worker opens it: a ``load`` failure row). ``missing``: indices whose image
    file is deleted (found by `load_dataset`: ``Sample.problem``, a planned failure row).
    """
    from diffcam.storage.synthetic_writer import write_synthetic_dataset

    def make(n: int = 6, seed: int = 0, broken: tuple[int, ...] = (), missing: tuple[int, ...] = (),
             name: str = "ds") -> Path:
        root = write_synthetic_dataset(tmp_path / name, n, seed)
        images = sorted((root / "images").glob("*.png"))
        for i in broken:
            images[i].write_bytes(b"this is not a png\n")
        for i in missing:
            images[i].unlink()
        return root

    return make
