"""Crashes and faults: nothing lost, nothing duplicated (docs/RELIABILITY.md §§ 2-3).

- Commits: a write error (disk full, I/O error) at *every* step of a shard commit leaves no
  partial shard visible and the retry succeeds; a process SIGKILLed at every step leaves
  either nothing or the whole shard, and `Store.recover` removes the debris.
- Driver: `diffcam audit` SIGKILLed (process group: driver + its Ray) at random points,
  resumed until done; the final tables equal those of an uninterrupted run, row for row
  (timing columns excluded, see `VOLATILE`).
- Workers (fault injection through ``DIFFCAM_FAULTS``, test-only): an actor killed
  mid-batch is restarted and its samples retried; a poison sample that kills its worker
  every time ends in ``failures`` after a bounded number of attempts; an out-of-memory
  error fails only its sample; a hung sample is killed after ``call_timeout_s``; actors
  that used up their restarts are replaced, so later work proceeds.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from diffcam.core.settings import CamSettings
from diffcam.flows.paths import DEFAULT_MODEL
from diffcam.storage import store as store_mod
from diffcam.storage.schemas import KEYS, table_from_rows
from diffcam.storage.store import Store
from tests.test_store import build_rows

#: The methods a default run writes (what these tables are built with).
METHODS = tuple(CamSettings().methods)

#: Columns that legitimately differ between two runs of the same inputs: wall-clock
#: timings. Everything else (map bytes included) must be identical.
VOLATILE = {"samples": {"t_generate_s", "t_attribution_s", "t_total_s", "t_faithfulness_s"}}
REPO = Path(__file__).resolve().parents[1]


def comparable(st: Store, run_id: str) -> dict[str, list[dict]]:
    """The run's sharded tables as sorted row lists, without run_id and volatile columns."""
    out = {}
    for name in ("samples", "token_maps", "failures", "flags"):
        rows = st.read_table(name, run_id).to_pylist()
        drop = {"run_id"} | VOLATILE.get(name, set())
        rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
        key = [k for k in KEYS[name] if k != "run_id"]
        out[name] = sorted(rows, key=lambda r: tuple(str(r[k]) for k in key))
    return out


def assert_exactly_once(st: Store, run_id: str, manifest_ids: list[str]) -> None:
    samples, failures = st.read_table("samples", run_id), st.read_table("failures", run_id)
    ids = samples.column("sample_id").to_pylist() + failures.column("sample_id").to_pylist()
    assert sorted(ids) == sorted(manifest_ids), "lost or extra samples"
    assert len(ids) == len(set(ids)), "a sample in both tables, or twice"
    maps = st.read_table("token_maps", run_id)
    keys = list(zip(*(maps.column(k).to_pylist() for k in KEYS["token_maps"])))
    assert len(keys) == len(set(keys)), "duplicate token_maps rows"


# ----------------------------------------------------------------------------- commits: write errors


def _shard1(tmp_path: Path, st: Store) -> dict[str, pa.Table]:
    rows = build_rows("run-1", tmp_path / "ds")
    st.write_run(rows["run"])
    return {n: table_from_rows(n, rs) for n, rs in rows["shards"][1].items()}  # 4 tables, 4 files


def _step_counter(monkeypatch, target: str, fail_at: int, exc: OSError):
    real = getattr(store_mod, target) if target != "os.replace" else os.replace
    calls = []

    def failing(*a, **k):
        calls.append(a)
        if len(calls) == fail_at:
            raise exc
        return real(*a, **k)

    if target == "os.replace":
        monkeypatch.setattr(store_mod.os, "replace", failing)
    else:
        monkeypatch.setattr(store_mod, target, failing)
    return calls


# every write step of commit_shard: 4 table files staged, fsync of the staging dir, 4 renames into
# place, fsync of the table dirs, the marker (written to a temp file and renamed)
WRITE_STEPS = [("write_parquet", k) for k in (1, 2, 3, 4)] + [("_fsync_path", 1)] + \
    [("os.replace", k) for k in (1, 2, 3, 4)] + [("_fsync_path", 2), ("_write_bytes_atomic", 1), ("os.replace", 5)]


@pytest.mark.parametrize("target, fail_at", WRITE_STEPS, ids=[f"{t}#{k}" for t, k in WRITE_STEPS])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["disk-full", "io-error"])
def test_write_error_at_any_commit_step_leaves_no_partial_shard(tmp_path, monkeypatch, target, fail_at, err):
    st = Store(tmp_path / "store")
    tables = _shard1(tmp_path, st)
    _step_counter(monkeypatch, target, fail_at, OSError(err, os.strerror(err)))
    with pytest.raises(OSError) as ei:
        st.commit_shard("run-1", 1, tables)
    assert ei.value.errno == err
    monkeypatch.undo()
    assert st.committed_shards("run-1") == [] and st.committed_rows("run-1") == dict.fromkeys(
        ("samples", "token_maps", "flags", "failures"), 0)
    for name in tables:
        assert st.read_table(name, "run-1").num_rows == 0
        assert not st.table_path("run-1", name, 1).exists(), f"{name} file left in place"
    st.recover("run-1")
    rd = st.run_dir("run-1")
    assert not (rd / "_tmp").exists()
    assert not (rd / "_commits").exists() or not list((rd / "_commits").iterdir())  # no marker, no temp marker
    assert st.commit_shard("run-1", 1, tables) is True  # the retry commits the whole shard
    assert {n: st.read_table(n, "run-1").num_rows for n in tables} == {n: t.num_rows for n, t in tables.items()}
    assert st.verify("run-1") == []


def test_disk_full_while_updating_the_run_row_keeps_the_old_row(tmp_path, monkeypatch):
    st = Store(tmp_path / "store")
    _shard1(tmp_path, st)
    before = st.read_run("run-1")
    _step_counter(monkeypatch, "write_parquet", 1, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError):
        st.update_run("run-1", status="failed", error="x")
    monkeypatch.undo()
    assert st.read_run("run-1") == before
    assert not [p for p in (st.run_dir("run-1") / "runs").iterdir() if p.name != "run.parquet"]


# ----------------------------------------------------------------------------- commits: SIGKILL mid-commit

_KILL_SCRIPT = textwrap.dedent("""
    import os, signal
    from pathlib import Path
    from diffcam.storage import store as store_mod
    from diffcam.storage.catalog import write_catalog_file
    from diffcam.storage.schemas import table_from_rows
    from diffcam.storage.store import Store
    from tests.test_store import build_rows

    target, kill_at = {target!r}, {kill_at}
    st = Store({store!r})
    rows = build_rows("run-1", Path({ds!r}))
    if "run-1" not in st.runs():
        st.write_run(rows["run"])
    tables = {{n: table_from_rows(n, rs) for n, rs in rows["shards"][1].items()}}
    real = os.replace if target == "os.replace" else getattr(store_mod, target)
    calls = []
    def dying(*a, **k):
        calls.append(1)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    if target == "os.replace":
        store_mod.os.replace = dying
    else:
        setattr(store_mod, target, dying)
    st.commit_shard("run-1", 1, tables)
    write_catalog_file(st)  # as the audit flow does after its shards
    print("COMMITTED")
""")

# SIGKILL before each step (os.replace #6 is the catalog file, the step after the commit)
KILL_STEPS = [("write_parquet", k) for k in (1, 3)] + [("os.replace", k) for k in (1, 2, 4, 5, 6)] + \
    [("_write_bytes_atomic", 1)]


@pytest.mark.slow
def test_sigkill_at_any_commit_step_is_all_or_nothing(tmp_path):
    """One process per kill point (~1.5 s each): after the kill the shard is either fully
    visible (the marker was renamed) or not at all; `recover` removes the debris; the resumed
    commit completes it exactly once."""
    full = None
    for target, kill_at in KILL_STEPS:
        store = tmp_path / f"store-{target}-{kill_at}"
        script = _KILL_SCRIPT.format(target=target, kill_at=kill_at, store=str(store), ds=str(tmp_path / "ds"))
        # run from the checkout: `python -c` imports the test helpers (tests.test_store) from the
        # current folder, and diffcam from the installed package
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert res.returncode == -signal.SIGKILL, (target, kill_at, res.stdout, res.stderr[-2000:])
        st = Store(store)
        visible = st.committed_shards("run-1")
        counts = {n: st.read_table(n, "run-1").num_rows for n in ("samples", "token_maps", "failures", "flags")}
        if visible:  # killed after the marker: the whole shard, verified
            assert visible == [1] and st.verify("run-1") == []
            assert (target, kill_at) == ("os.replace", 6)
            full = counts
        else:
            assert set(counts.values()) == {0}, (target, kill_at, counts)
        st.recover("run-1")
        assert not (st.run_dir("run-1") / "_tmp").exists()
        leftovers = [p for t in ("samples", "token_maps", "failures", "flags")
                     for p in (st.run_dir("run-1") / t).glob("*") if not visible]
        assert leftovers == [], leftovers
        # resume: commit again (a no-op if it was already committed)
        res = subprocess.run([sys.executable, "-c", _KILL_SCRIPT.format(
            repo=str(REPO), target="write_parquet", kill_at=10**9, store=str(store), ds=str(tmp_path / "ds"))],
            capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        st = Store(store)
        assert st.committed_shards("run-1") == [1] and st.verify("run-1") == []
        counts = {n: st.read_table(n, "run-1").num_rows for n in ("samples", "token_maps", "failures", "flags")}
        assert counts == {"samples": 1, "token_maps": 3 * len(METHODS), "failures": 1, "flags": 1}, counts
    assert full == {"samples": 1, "token_maps": 3 * len(METHODS), "failures": 1, "flags": 1}


# ----------------------------------------------------------------------------- workers


@pytest.mark.slow
def test_worker_faults_kill_poison_oom_hang(make_dataset, tmp_path):
    """One pool (2 workers, batches of 2, max_restarts=1, max_attempts=2, call_timeout 15 s;
    6 s timed out a healthy call once when two test files ran side by side on the 2 cores):

    - synth-1 kills its worker once, mid-batch → the batch's samples are retried alone → rows;
    - synth-3 kills its worker every time (poison) → `worker` failure after 1 batch + 2 lone
      attempts, its batch neighbour synth-2 is audited;
    - synth-4 raises torch.OutOfMemoryError, synth-6 MemoryError → their own failure rows;
    - synth-7 hangs → its worker is killed after the timeout, twice → `worker` WorkerTimeout;
    - the actors that used up their restart are replaced, and a second run on the same pool
      gives the very same rows as the first (restarts change nothing).
    """
    from diffcam.storage.datasets import load_dataset
    from diffcam.tasks.plan import plan_shards
    from diffcam.tasks.pool import CamPool, PoolConfig

    root = make_dataset(n=8)
    ds = load_dataset(root)
    items = [{**it, "run_id": "r", "shard_id": 0} for it in plan_shards(ds.samples, shard_size=8, root=ds.root)[0].items]
    sid = [it["sample_id"] for it in items]
    state = tmp_path / "fault-state"
    state.mkdir()
    faults = {"kill_once_on": [sid[1]], "state_dir": str(state), "kill_on": [sid[3]], "oom_on": [sid[4]],
              "memory_error_on": [sid[6]], "hang_on": [sid[7]], "hang_s": 3600}
    cfg = PoolConfig(model_dir=str(DEFAULT_MODEL), settings=CamSettings(methods=("gradcam", "diffusion-cam")), workers=2,
                     cpus_per_worker=1, gpus_per_worker=0, batch_size=2, max_restarts=1, max_attempts=2,
                     call_timeout_s=15.0, faults=faults)
    t0 = time.monotonic()
    with CamPool(cfg) as pool:
        out = pool.run(items)
        stats = dict(pool.stats)
        again = pool.run([items[0], items[2], items[5]])  # later work proceeds on the same (replaced) pool
    elapsed = time.monotonic() - t0
    by = {r["sample_id"]: r for r in out}
    assert sorted(by) == sorted(sid) and len(out) == len(items)  # exactly one result each
    assert all((r["samples"] is None) != (r["failures"] is None) for r in out)
    for i in (0, 1, 2, 5):
        assert by[sid[i]]["failures"] is None, (i, by[sid[i]]["failures"])
    poison = by[sid[3]]["failures"]
    assert (poison["stage"], poison["error_class"], poison["attempts"]) == ("worker", "WorkerCrash", 3)
    assert "2 time(s) auditing this sample alone" in poison["message"]
    oom = by[sid[4]]["failures"]
    assert oom["stage"] == "generate" and oom["error_class"] == "OutOfMemoryError"
    assert oom["message"].startswith("out of memory during generate")
    mem = by[sid[6]]["failures"]
    assert mem["stage"] == "generate" and mem["error_class"] == "MemoryError" and "out of memory" in mem["message"]
    hung = by[sid[7]]["failures"]
    assert (hung["stage"], hung["error_class"]) == ("worker", "WorkerTimeout") and "timed out" in hung["message"]
    assert stats["poison"] == 2 and stats["timeouts"] == 3 and stats["replaced"] >= 1, stats
    assert stats["worker_deaths"] >= 6, stats
    for r in again:  # same rows after all those restarts (timings aside)
        first = by[r["sample_id"]]["samples"]
        assert {k: v for k, v in r["samples"].items() if not k.startswith("t_")} == \
               {k: v for k, v in first.items() if not k.startswith("t_")}
        assert r["token_maps"] == by[r["sample_id"]]["token_maps"]
    print(f"\nworker faults: {stats}, {elapsed:.0f} s")


# ----------------------------------------------------------------------------- driver


def _manifest_ids(root: Path) -> list[str]:
    return [json.loads(line)["sample_id"] for line in (root / "manifest.jsonl").read_text().splitlines() if line]


@pytest.mark.slow
def test_driver_sigkilled_at_random_points_resumes_to_the_uninterrupted_result(
        prefect_harness, make_dataset, tmp_path, monkeypatch):
    """Reference: an uninterrupted in-process run (whose shard-1 commit hits a disk-full error
    once: Prefect retries the shard), re-run once as if it had crashed after its last commit.
    Then `diffcam audit` is SIGKILLed twice at random points
    (seeded: after a new commit, plus a random 0-0.8 s) and resumed; its final tables equal the
    reference, row for row, map bytes included — no duplicates, no missing samples."""
    from prefect.settings import PREFECT_API_URL

    from diffcam.flows.audit import audit

    root = make_dataset(n=8, broken=(5,))
    ids = _manifest_ids(root)
    store = tmp_path / "store"
    common = ["--dataset", str(root), "--store", str(store), "--shard-size", "2", "--workers", "1",
              "--cpus-per-worker", "1"]

    # -- reference, with one disk-full error during a commit
    real = store_mod.write_parquet
    calls = []

    def disk_full_once(table, path):
        calls.append(path)
        if len(calls) == 4:  # a file of the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        real(table, path)

    monkeypatch.setattr(store_mod, "write_parquet", disk_full_once)
    ref = audit(model=str(DEFAULT_MODEL), dataset=str(root), store=str(store), run_id="reference",
                workers=1, cpus_per_worker=1, shard_size=2, shard_retry_delay_s=0)
    monkeypatch.undo()
    assert ref["status"] == "succeeded" and len(calls) > 4
    st = Store(store)
    assert_exactly_once(st, "reference", ids)
    # a crash after the last commit (during validation or the report) leaves status "running":
    # the re-run recomputes nothing, validates and reports again, and the tables do not change
    tables = comparable(st, "reference")
    st.update_run("reference", status="running", finished_at=None, validation_json=None)
    again = audit(model=str(DEFAULT_MODEL), dataset=str(root), store=str(store), run_id="reference",
                  workers=1, cpus_per_worker=1, shard_size=2)
    assert again["resumed"] and again["status"] == "succeeded" and again["samples_computed"] == 0
    assert again["shards_committed"] == [] and comparable(st, "reference") == tables

    # -- the same audit, killed at random points
    rng = random.Random(int(os.environ.get("DIFFCAM_FAULT_SEED", "20261126")))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # reuse the session's server
    cmd = [str(Path(sys.executable).parent / "diffcam"), "audit", *common, "--run-id", "killed"]
    commits = store / "runs" / "run_id=killed" / "_commits"
    kills = []
    for attempt in range(2):
        before = len(list(commits.glob("shard=*.json"))) if commits.exists() else 0
        delay = rng.uniform(0.0, 0.8)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 100
            while proc.poll() is None and time.monotonic() < deadline and \
                    (len(list(commits.glob("shard=*.json"))) if commits.exists() else 0) <= before:
                time.sleep(0.02)
            time.sleep(delay)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # driver + the Ray it started
            proc.wait()
        n = len(list(commits.glob("shard=*.json")))
        kills.append({"attempt": attempt, "delay_s": round(delay, 3), "committed_after": n})
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 1 <= kills[-1]["committed_after"] < 4, kills
    assert Store(store).read_run("killed")["status"] == "running"  # what a crash leaves

    res = subprocess.run([*cmd, "--json", str(tmp_path / "s.json")], env=env, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["resumed"] and summary["status"] == "succeeded"
    st = Store(store)
    assert_exactly_once(st, "killed", ids)
    cam = [{k: v for k, v in json.loads(st.read_run(r)["config_json"]).items() if k != "audit"}
           for r in ("reference", "killed")]
    assert cam[0] == cam[1], "the CAM defaults changed between the runs (code edited during the test?)"
    assert comparable(st, "killed") == comparable(st, "reference")
    print(f"\ndriver kills: {kills}")
