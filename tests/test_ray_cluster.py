"""`diffcam audit --ray-address` on a cluster started with `ray start --head`, token
authentication on (Ray 2.60's default once a token exists), as docs/OPERATIONS.md sets it up.

- without the token: the audit fails within seconds (Ray itself waits ~40 s and then only says
  "Failed to connect to Ray cluster"), the message names authentication and the fix, and the
  run row is ``failed`` with that reason;
- with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``: the audit runs on the cluster's
  workers; one worker is SIGKILLed mid-run (test-only fault injection) and the death, the
  restart and the retry appear in the audit's output and in the run row.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diffcam.core.settings import CamSettings
from diffcam.storage.store import Store
from tests.test_deploy import _free_port

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("ray-head")
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # Ray's session folder holds unix sockets: keep its path short (sun_path is 108 bytes)
    temp_dir = Path(tempfile.mkdtemp(prefix="dcray-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"})
    log = root / "head.log"
    # ports from the OS's ephemeral range: outside Ray's worker-port range (10002-19999)
    cmd = [str(BIN / "ray"), "start", "--head", "--port", str(_free_port()), "--num-cpus", "2",
           "--include-dashboard=false", "--dashboard-agent-listen-port", str(_free_port()),
           "--temp-dir", str(temp_dir), "--block"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        address = None
        while time.time() - t0 < 90 and address is None:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            m = re.search(r"ray start --address='([^']+)'", log.read_text(errors="replace"))
            address = m.group(1) if m else None
            time.sleep(0.3)
        assert address, f"ray start --head not up after 90 s:\n{log.read_text()[-4000:]}"
        yield {"address": address, "token": token, "root": root, "log": log, "start_s": time.time() - t0}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # --block: drains the node and stops its processes
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of this test's cluster (its own process group)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _audit(args: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    r = subprocess.run([str(BIN / "diffcam"), "audit", *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    return r, time.time() - t0


def _driver_env(prefect_api: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"PREFECT_API_URL": prefect_api, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", **extra})
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_audit_on_a_ray_start_head_cluster_with_token_auth(prefect_harness, ray_head, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    from diffcam.storage.synthetic_writer import write_synthetic_dataset

    api = PREFECT_API_URL.value()  # the session's Prefect server: no temporary one per command
    dataset = write_synthetic_dataset(tmp_path / "ds", 2, 5)
    ids = [json.loads(line)["sample_id"] for line in (dataset / "manifest.jsonl").read_text().splitlines()]
    store = tmp_path / "store"
    common = ["--ray-address", ray_head["address"], "--dataset", str(dataset), "--store", str(store),
              "--workers", "1", "--shard-size", "4"]

    # 1. no token: fails fast, names authentication, run row failed with that reason
    r, took = _audit([*common, "--run-id", "no-token"], _driver_env(api), 120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "authentication failed" in r.stderr and "RAY_AUTH_MODE=token" in r.stderr, r.stderr[-3000:]
    assert took < 35, f"{took:.0f} s: Ray's own connect timeout is ~40 s"
    row = Store(store).read_run("no-token")
    assert row["status"] == "failed" and "authentication failed" in row["error"], row

    # 2. with the cluster's token: audited on the cluster; one worker killed once and retried
    faults = json.dumps({"kill_once_on": [ids[1]], "state_dir": str(tmp_path)})
    r, took_ok = _audit([*common, "--run-id", "with-token"],
                        _driver_env(api, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(ray_head["token"]),
                                    DIFFCAM_FAULTS=faults), 240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert re.search(r"worker 0: pid \d+ on \S+ \(Ray node [0-9a-f]{12}\)", out), out[-5000:]
    assert "1 worker death(s)" in out and "1 sample call(s) retried" in out, out[-5000:]
    row = Store(store).read_run("with-token")
    assert row["status"] == "succeeded" and row["n_results"] == 2 and row["n_failures"] == 0, row
    pool = json.loads(row["config_json"])["audit"]["pool"]
    assert pool["worker_deaths"] == 1 and pool["retried"] == 1 and pool["poison"] == 0, pool
    print(f"\nray start --head up in {ray_head['start_s']:.0f} s; refused without token in {took:.0f} s; "
          f"audit with token (one worker killed) {took_ok:.0f} s")


# ------------------------------------------------------------------ fast, no cluster


def test_unreachable_or_malformed_ray_address_fails_at_once() -> None:
    from diffcam.tasks.ray_cluster import RayClusterError, check_ray_cluster

    port = _free_port()  # nobody listens there
    t0 = time.time()
    with pytest.raises(RayClusterError, match=rf"cannot reach the Ray cluster at 127\.0\.0\.1:{port}: "
                                              r"ConnectionRefusedError.*ray start --head --port"):
        check_ray_cluster(f"127.0.0.1:{port}")
    assert time.time() - t0 < 5  # Ray's own client would retry for ~40 s
    for bad in ("nonsense", "host:", ":6379", "host:port"):
        with pytest.raises(RayClusterError, match="expected HOST:PORT"):
            check_ray_cluster(bad)
    check_ray_cluster("auto")  # left to ray.init (it finds a local cluster and its token itself)
    check_ray_cluster("ray://head:10001")


def test_pool_stats_line_names_every_counter() -> None:
    from diffcam.tasks.pool import POOL_STATS, CamPool, PoolConfig

    pool = CamPool(PoolConfig(model_dir="unused", settings=CamSettings()))
    pool.n_workers = 2
    assert pool.stats_summary() == dict.fromkeys(POOL_STATS, 0)
    assert pool.stats_line() == "workers: 2, no worker deaths, restarts or retries"
    pool.stats.update({"worker_deaths": 2, "replaced": 1, "retried": 3, "poison": 1})
    line = pool.stats_line()
    assert line.startswith("workers: 2; 2 worker death(s), 1 actor(s) replaced, 3 sample call(s) retried")
    assert "1 poison sample(s)" in line and "0 timeout(s)" in line


@pytest.mark.parametrize("raised, expect", [
    (ConnectionError("Failed to connect to Ray cluster"), "If the cluster was started with token authentication"),
    (RuntimeError("Authentication token is missing or incorrect"), "authentication failed"),
])
def test_ray_init_failures_on_unchecked_addresses_say_what_to_set(monkeypatch, raised, expect) -> None:
    """``auto`` / ``ray://`` addresses go straight to ray.init: its failure is reworded."""
    import ray

    from diffcam.tasks.pool import CamPool, PoolConfig
    from diffcam.tasks.ray_cluster import RayClusterError

    if isinstance(raised, RuntimeError):  # what Ray raises for a refused token
        raised = ray.exceptions.AuthenticationError(str(raised))

    def refuse(*a: Any, **kw: Any) -> None:
        raise raised

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    pool = CamPool(PoolConfig(model_dir="unused", settings={}, ray_address="auto"))
    with pytest.raises(RayClusterError) as e:
        pool.__enter__()
    msg = str(e.value)
    assert msg.startswith("could not connect to the Ray cluster at auto: ") and expect in msg, msg
    assert "RAY_AUTH_MODE=token" in msg and "RAY_AUTH_TOKEN_PATH=<file>" in msg
