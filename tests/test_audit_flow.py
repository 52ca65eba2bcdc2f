"""The audit end to end: real tiny model, real local Ray, ephemeral Prefect (slow tests).

`test_worker_in_process` runs `CamWorker` without Ray (the real model, ~10 s).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime

import pytest

from diffcam.core.settings import CamSettings
from diffcam.flows.paths import DEFAULT_MODEL
from diffcam.storage.catalog import run_sql
from diffcam.storage.schemas import KEYS
from diffcam.storage.store import Store


def _keys(table, name):
    cols = [table.column(k).to_pylist() for k in KEYS[name]]
    return list(zip(*cols))


def _manifest_ids(root):
    return [json.loads(line)["sample_id"] for line in (root / "manifest.jsonl").read_text().splitlines() if line]


def test_worker_in_process(make_dataset):
    """One worker, no Ray: a broken image and a bad mask become failure rows, the rest rows."""
    from diffcam.storage.datasets import load_dataset
    from diffcam.tasks.plan import plan_shards
    from diffcam.tasks.worker import CamWorker

    root = make_dataset(n=3, broken=(1,))
    (root / "masks" / "synth-000002_0.png").write_bytes(b"not a png")
    ds = load_dataset(root)
    items = [{**it, "run_id": "r", "shard_id": 0} for it in plan_shards(ds.samples, root=ds.root)[0].items]
    w = CamWorker(str(DEFAULT_MODEL), CamSettings(methods=("diffusion-cam", "gradcam")), threads=1)
    assert w.info()["device"] == "cpu"
    out = w.process(items)
    assert [r["sample_id"] for r in out] == ["synth-000000", "synth-000001", "synth-000002"]
    ok, img_bad, mask_bad = out
    assert ok["failures"] is None and ok["samples"]["n_words"] * 2 == len(ok["token_maps"])
    assert {r["method"] for r in ok["token_maps"]} == {"diffusion-cam", "gradcam"}
    assert img_bad["samples"] is None and img_bad["failures"]["stage"] == "load"
    assert "not-an-image" in img_bad["failures"]["message"]
    assert mask_bad["failures"]["stage"] == "load" and "mask" in mask_bad["failures"]["message"]


def test_worker_rejects_unknown_layer():
    from diffcam.tasks.worker import CamWorker

    with pytest.raises(ValueError, match="valid"):
        CamWorker(str(DEFAULT_MODEL), CamSettings(layer="encoder.99"))


@pytest.mark.slow
def test_audit_flow_end_to_end(prefect_harness, make_dataset, tmp_path):
    from diffcam.flows.audit import audit

    root = make_dataset(n=6, broken=(2,), missing=(4,))
    store = tmp_path / "store"
    summary = audit(model=str(DEFAULT_MODEL), dataset=str(root), store=str(store), run_id="e2e",
                    workers=2, shard_size=3, gpus_per_worker=1.0)
    assert summary["status"] == "succeeded", summary["validation_failed"]
    assert summary["n_samples"] == 6 and summary["n_results"] == 4 and summary["n_failures"] == 2
    assert summary["shards_committed"] == [0, 1] and summary["shards_skipped"] == []
    # asked 1 GPU per worker on a machine without GPUs: the actors ask for none (else they would pend forever)
    assert summary["workers"] == 2 and summary["gpus_per_worker"] == 0.0

    st = Store(store)
    samples, maps, failures = (st.read_table(t, "e2e") for t in ("samples", "token_maps", "failures"))
    ids = samples.column("sample_id").to_pylist() + failures.column("sample_id").to_pylist()
    assert sorted(ids) == sorted(_manifest_ids(root))  # every sample in exactly one table
    for t, name in ((samples, "samples"), (maps, "token_maps"), (failures, "failures")):
        keys = _keys(t, name)
        assert len(keys) == len(set(keys)), f"duplicate keys in {name}"
    fail = {r["sample_id"]: r for r in failures.to_pylist()}
    assert fail["synth-000002"]["stage"] == "load" and "not-an-image" in fail["synth-000002"]["message"]
    assert fail["synth-000004"]["stage"] == "load" and "missing" in fail["synth-000004"]["message"]
    n_methods = len({m for m in maps.column("method").to_pylist()})
    assert n_methods == len(CamSettings().methods)  # four attribution methods + the random and objectness maps
    assert maps.num_rows == sum(samples.column("n_words").to_pylist()) * n_methods

    run = st.read_run("e2e")
    assert run["status"] == "succeeded" and run["n_results"] == 4 and run["n_failures"] == 2
    assert json.loads(run["validation_json"])["success"] is True
    assert json.loads(run["config_json"])["audit"]["shard_size"] == 3
    for key in ("report_html", "summary_md"):
        assert (store / "reports" / "e2e").exists() and open(summary[key]).read()
    assert (store / "catalog.duckdb").is_file()
    counted = run_sql(store, "SELECT count(*) AS n FROM samples WHERE run_id = ?", ["e2e"]).to_pylist()
    assert counted == [{"n": 4}]
    # the dataset-level bias step ran once and its section is in the report
    assert st.is_committed("e2e", "dataset")
    assert "Bias" in open(summary["report_html"]).read()


def _without_seconds(evidence_json):
    """A flag's evidence minus the wall-clock fields (the only values two runs may differ in)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "seconds"}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.loads(evidence_json))


@pytest.mark.slow
def test_bias_counterfactuals_run_on_the_workers(prefect_harness, make_dataset, tmp_path, monkeypatch):
    """The bias step's regenerations go to the audit's Ray workers: the driver never loads
    the model (``load_adapter`` raises there). A bias step that fails still closes the pool;
    its resumed run (every shard committed) starts the workers for the bias step alone. The
    committed flags equal, value for value, those of the same step on a model loaded here."""
    import numpy as np
    import ray

    import diffcam.core.models.base
    import diffcam.tasks.bias.step
    from diffcam.core.bias.flags import Flag
    from diffcam.core.bias.settings import BiasSettings
    from diffcam.flows.audit import audit
    from diffcam.storage.schemas import table_from_rows

    real_flags, real_load, real_cf = diffcam.tasks.bias.step.all_dataset_flags, diffcam.core.models.base.load_adapter, \
        diffcam.tasks.bias.step.counterfactual
    tested: list[dict] = []

    def with_suspect(analyses, settings):
        """The real flags plus a `clever_hans` suspect on the word with the most maps (the
        tiny model on six samples raises none by itself), so the counterfactuals run."""
        (word, method), a = max(analyses.items(), key=lambda kv: (len(kv[1]["sample_ids"]), kv[0]))
        grid = tuple(a["grid"])
        ev = {"grid": list(grid), "prototype": np.full(grid, 1.0 / (grid[0] * grid[1])).tolist(),
              "window": [0, 0, 1, 1], "sample_ids": list(a["sample_ids"])}
        return [*real_flags(analyses, settings), Flag("suspect", "clever_hans", 1.0, 0.0, ev, word=word, method=method,
                                                      region=(0.0, 0.0, 1 / grid[1], 1 / grid[0]))]

    def spy(*args, **kw):
        tested.append(real_cf(*args, **kw))
        if len(tested) == 1:
            raise RuntimeError("injected failure after the first counterfactual")
        return tested[-1]

    def no_driver_model(*args, **kw):
        raise AssertionError("the bias step loaded the model in the driver")

    monkeypatch.setattr(diffcam.tasks.bias.step, "all_dataset_flags", with_suspect)
    monkeypatch.setattr(diffcam.tasks.bias.step, "counterfactual", spy)
    monkeypatch.setattr(diffcam.core.models.base, "load_adapter", no_driver_model)
    root = make_dataset(n=6)
    kw = dict(model=str(DEFAULT_MODEL), dataset=str(root), store=str(tmp_path / "store"), run_id="cf",
              workers=2, shard_size=3, cpus_per_worker=1)
    with pytest.raises(RuntimeError, match="injected failure"):
        audit(**kw)
    assert len(tested) == 1 and tested[0]["n_generations"] > 0, tested
    assert not ray.is_initialized()  # the pool was closed (and the Ray it started shut down)
    summary = audit(**kw)
    assert summary["status"] == "succeeded", summary["validation_failed"]
    assert summary["shards_committed"] == [] and summary["shards_skipped"] == [0, 1]
    assert summary["workers"] == 2 and len(tested) == 2  # started for the bias step alone
    assert tested[1]["examples"] == tested[0]["examples"]

    monkeypatch.setattr(diffcam.core.models.base, "load_adapter", real_load)
    st = Store(tmp_path / "store")
    local = diffcam.tasks.bias.step.run_dataset_flags(st, "cf", None, root, BiasSettings(), adapter=real_load(DEFAULT_MODEL))
    assert tested[2]["examples"] == tested[1]["examples"]  # the same regenerated answers
    stored = st.read_table("flags", "cf").to_pylist()
    expected = table_from_rows("flags", local).to_pylist()
    assert [{**r, "evidence_json": _without_seconds(r["evidence_json"])} for r in stored] == \
        [{**r, "evidence_json": _without_seconds(r["evidence_json"])} for r in expected]


@pytest.mark.slow
def test_interrupted_run_resumes_without_duplicates_or_recompute(prefect_harness, make_dataset, tmp_path, monkeypatch):
    """Shard 1 fails hard in the first run (every retry); shard 0 fails once and is retried.
    The re-run with the same id computes only shard 1."""
    import diffcam.tasks.shard
    from diffcam.flows.audit import audit

    root = make_dataset(n=6, missing=(5,))
    store = tmp_path / "store"
    real = diffcam.tasks.shard.assemble_tables
    calls: Counter[int] = Counter()

    def flaky(run_id, shard, results):
        calls[shard.shard_id] += 1
        if shard.shard_id == 1 or (shard.shard_id == 0 and calls[0] == 1):
            raise RuntimeError(f"injected failure in shard {shard.shard_id}")
        return real(run_id, shard, results)

    monkeypatch.setattr(diffcam.tasks.shard, "assemble_tables", flaky)
    kw = dict(model=str(DEFAULT_MODEL), dataset=str(root), store=str(store), run_id="resume",
              workers=2, shard_size=2, shard_retries=1, shard_retry_delay_s=0)
    with pytest.raises(RuntimeError, match="1 of 3 shard"):
        audit(**kw)
    assert calls == {0: 2, 1: 2, 2: 1}  # shard 0 retried once and succeeded; shard 1 failed twice
    st = Store(store)
    run = st.read_run("resume")
    assert run["status"] == "failed" and "injected failure in shard 1" in run["error"]
    assert st.committed_shards("resume") == [0, 2]
    before = {k: st.shard_marker("resume", k) for k in (0, 2)}

    monkeypatch.setattr(diffcam.tasks.shard, "assemble_tables", real)
    summary = audit(**kw)
    assert summary["resumed"] is True and summary["status"] == "succeeded", summary["validation_failed"]
    assert summary["shards_committed"] == [1] and summary["shards_skipped"] == [0, 2]
    assert summary["samples_computed"] == 2
    assert {k: st.shard_marker("resume", k) for k in (0, 2)} == before  # not recomputed, not rewritten

    samples, failures = st.read_table("samples", "resume"), st.read_table("failures", "resume")
    ids = samples.column("sample_id").to_pylist() + failures.column("sample_id").to_pylist()
    assert sorted(ids) == sorted(_manifest_ids(root))
    assert len(ids) == len(set(ids)) == 6
    maps = st.read_table("token_maps", "resume")
    assert len(set(_keys(maps, "token_maps"))) == maps.num_rows
    run = st.read_run("resume")
    assert run["status"] == "succeeded" and run["error"] is None and run["n_results"] + run["n_failures"] == 6


@pytest.mark.slow
def test_resume_with_other_inputs_is_refused(prefect_harness, make_dataset, tmp_path):
    from diffcam.flows.audit import AuditConfigError, audit

    root = make_dataset(n=2)
    store = tmp_path / "store"
    Store(store).write_run({
        "run_id": "x", "model_uri": "file:///m", "model_hash": "0" * 64, "dataset_uri": "file:///d",
        "dataset_hash": "1" * 64, "config_json": "{}", "code_version": "t",
        "started_at": datetime.now(UTC),
        "status": "failed", "n_samples": 2,
    })
    with pytest.raises(AuditConfigError, match="different inputs"):
        audit(model=str(DEFAULT_MODEL), dataset=str(root), store=str(store), run_id="x", workers=1)
    assert Store(store).read_run("x")["status"] == "failed"  # untouched


@pytest.mark.slow
def test_killed_worker_restarts_and_its_call_is_retried(make_dataset):
    """SIGKILL the only actor while it works: Ray restarts it (model reloaded) and retries
    the in-flight call, so every sample still gets a row and none a `worker` failure."""
    import os
    import signal
    import threading
    import time

    import ray

    from diffcam.storage.datasets import load_dataset
    from diffcam.tasks.plan import plan_shards
    from diffcam.tasks.pool import CamPool, PoolConfig

    root = make_dataset(n=8)  # enough work that the kill lands while the pool is still running
    ds = load_dataset(root)
    items = [{**it, "run_id": "r", "shard_id": 0} for it in plan_shards(ds.samples, root=ds.root)[0].items]
    with CamPool(PoolConfig(model_dir=str(DEFAULT_MODEL), settings=CamSettings(methods=("gradcam",)), workers=1,
                            cpus_per_worker=1, gpus_per_worker=0)) as pool:
        pid = pool.worker_info[0]["pid"]
        out: list = []
        t = threading.Thread(target=lambda: out.extend(pool.run(items)))
        t.start()
        time.sleep(0.5)  # the first call (batch of one sample) is in flight
        os.kill(pid, signal.SIGKILL)
        t.join(timeout=120)
        assert not t.is_alive()
        # The restarted actor may still be reloading its model: ask until it answers.
        deadline = time.monotonic() + 120
        while True:
            try:
                new_pid = ray.get(pool.actors[0].info.remote())["pid"]
                break
            except ray.exceptions.ActorUnavailableError:
                assert time.monotonic() < deadline, "the killed actor never came back"
                time.sleep(0.5)
    assert new_pid != pid
    assert sorted(r["sample_id"] for r in out) == sorted(it["sample_id"] for it in items)
    assert all(r["failures"] is None for r in out), [r["failures"]["message"] for r in out if r["failures"]]


# ------------------------------------------------------------------ command line (fast)


@pytest.mark.parametrize("args, message", [
    (["audit", "--model", "/no/such/model"], "not a checkpoint folder"),
    (["audit", "--dataset", "/no/such/data"], "does not exist"),
    (["audit", "--run-id", "bad id"], "--run-id"),
    (["audit", "--distractor", "sideways"], "distractor"),
    (["audit", "--methods", "diffusion-cam,heatmap"], "unknown method(s) ['heatmap']"),
    (["sql", "SELECT 1", "--store", "/no/such/store"], "no such store"),
    (["sql", "SELECT 1", "--format", "xml"], "--format"),
    (["report", "some-run", "--store", "/no/such/store"], "no such store"),
])
def test_cli_bad_input_exits_2_with_a_message(args, message):
    from typer.testing import CliRunner

    from diffcam.flows.cli import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_cli_lists_every_registered_method_with_its_kind():
    from typer.testing import CliRunner

    from diffcam.core.methods import method_names
    from diffcam.flows.cli import app

    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.output.splitlines() if line.strip()}
    assert set(lines) == set(method_names())
    assert "model (no gradients)" in lines["occlusion"] and "opt-in" in lines["occlusion"]
    assert "audit-default" in lines["diffusion-cam"] and "chance (no model)" in lines["objectness"]


def test_cli_rejects_a_broken_manifest_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from diffcam.flows.cli import app

    (tmp_path / "manifest.jsonl").write_text('{"sample_id": 1}\n')
    res = CliRunner().invoke(app, ["audit", "--dataset", str(tmp_path), "--store", str(tmp_path / "s")])
    assert res.exit_code == 2 and "prompt: missing required field" in res.output
    assert not (tmp_path / "s").exists()


def test_cli_sql_refuses_writes_and_formats_results(tmp_path):
    from typer.testing import CliRunner

    from diffcam.flows.cli import app

    store = tmp_path / "store"
    store.mkdir()
    runner = CliRunner()
    res = runner.invoke(app, ["sql", f"COPY (SELECT 1) TO '{store}/x.csv'", "--store", str(store)])
    assert res.exit_code == 2 and "refused" in res.output and not (store / "x.csv").exists()
    res = runner.invoke(app, ["sql", "SELECT 1 AS a, 'x' AS b, 1.5::DOUBLE AS c", "--store", str(store), "-f", "json"])
    assert res.exit_code == 0 and json.loads(res.output) == [{"a": 1, "b": "x", "c": 1.5}]
    res = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM samples", "--store", str(store)])
    assert res.exit_code == 0 and "(1 row)" in res.output
    res = runner.invoke(app, ["sql", "SELECT nope FROM runs", "--store", str(store)])
    assert res.exit_code == 2 and "query failed" in res.output


@pytest.mark.slow
def test_driver_killed_mid_run_resumes(make_dataset, tmp_path):
    """SIGKILL the whole `diffcam audit` process group (driver, local Ray, Prefect server)
    once its first shard is committed; the same command with the same run id finishes the
    run without recomputing or duplicating the committed shard."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = make_dataset(n=8)
    store = tmp_path / "store"
    cmd = [str(Path(sys.executable).parent / "diffcam"), "audit", "--dataset", str(root), "--store", str(store),
           "--run-id", "killed", "--shard-size", "2", "--workers", "1", "--cpus-per-worker", "1"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}  # its own ephemeral server
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    commits = store / "runs" / "run_id=killed" / "_commits"
    try:
        deadline = time.monotonic() + 150
        while not list(commits.glob("shard=*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: driver + its Ray + its Prefect server
        proc.wait()
    st = Store(store)
    first = {k: st.shard_marker("killed", k) for k in st.committed_shards("killed")}
    assert 1 <= len(first) < 4, "the run must have been killed between its first and last commit"
    assert st.read_run("killed")["status"] == "running"  # what a crash leaves

    summary_file = tmp_path / "summary.json"
    res = subprocess.run([*cmd, "--json", str(summary_file)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    assert summary["resumed"] and summary["status"] == "succeeded"
    assert summary["shards_skipped"] == sorted(first)
    assert sorted(summary["shards_committed"] + summary["shards_skipped"]) == [0, 1, 2, 3]
    assert {k: st.shard_marker("killed", k) for k in first} == first
    ids = st.read_table("samples", "killed").column("sample_id").to_pylist()
    assert sorted(ids) == sorted(_manifest_ids(root)) and len(ids) == len(set(ids))


def test_worker_measures_evidence_columns(make_dataset):
    """faithfulness=1: every content word × map gets AUCs/vanish; function words and chance rows behave."""
    from diffcam.storage.datasets import load_dataset
    from diffcam.storage.schemas import table_from_rows
    from diffcam.tasks.plan import plan_shards
    from diffcam.tasks.worker import CamWorker

    root = make_dataset(n=4)
    ds = load_dataset(root)
    items = [{**it, "run_id": "r", "shard_id": 0} for it in plan_shards(ds.samples, root=ds.root)[0].items]
    w = CamWorker(str(DEFAULT_MODEL), CamSettings(methods=("diffusion-cam-raw", "token-gradnorm", "random", "objectness"),
                                                  faithfulness=1.0), threads=1)
    out = w.process(items)
    assert all(r["failures"] is None for r in out)
    rows = [t for r in out for t in r["token_maps"]]
    table_from_rows("token_maps", rows)  # the new columns fit the schema
    content = [t for t in rows if not t["is_function"]]
    assert content and all(t["vanished"] is not None for t in content)
    assert all(t["deletion_auc"] is None and t["vanished"] is None for t in rows if t["is_function"])
    informative = [t for t in content if t["deletion_auc"] is not None]
    assert len(informative) >= len(content) // 2
    assert all(0.0 <= t["deletion_auc"] <= 1.0 and 0.0 <= t["insertion_auc"] <= 1.0 for t in informative)
    assert all(r["samples"]["t_faithfulness_s"] > 0 for r in out)
    # specificity exists exactly for masked words of images with another masked object
    for r in out:
        n_obj = r["samples"]["n_objects"]
        for t in r["token_maps"]:
            assert (t["specificity"] is not None) == (t["has_mask"] and n_obj >= 2 and t["map_max"] > 0), t
    # the objectness map is the same for every word of a sample; the random map is not
    for r in out:
        obj = {t["map"] for t in r["token_maps"] if t["method"] == "objectness"}
        rnd = [t["map"] for t in r["token_maps"] if t["method"] == "random"]
        assert len(obj) == 1 and len(set(rnd)) == len(rnd)
    # off: nothing measured, and the selection is by sample id, reproducible
    w.settings = CamSettings(methods=("token-gradnorm",), faithfulness=0.0)
    off = w.process(items[:1])[0]
    assert all(t["vanished"] is None for t in off["token_maps"]) and off["samples"]["t_faithfulness_s"] is None
