"""Deployments, the sweep / checkpoint flows, and the whole loop against a real Prefect server.

- fast: what `build_deployments` creates (no server);
- `prefect_harness` (one temporary server for the session, ~10 s once): the sweep and the
  checkpoint flow with a stand-in audit (skip / resume / compare / regression logic);
- slow: ``prefect server start`` on loopback + ``diffcam serve`` + ``diffcam webhook``
  subprocesses, real audits of the tiny model on 3 samples.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diffcam.core.settings import CamSettings
from diffcam.flows.compare import CompareGates
from diffcam.flows.deploy import (
    EVENT_COMPARE_FAILED,
    EVENT_REGISTERED,
    PAYLOAD_FIELDS,
    TRIGGER_PARAMETERS,
    OpsConfig,
    audit_checkpoint,
    audit_new_checkpoints,
    build_deployments,
    describe_deployments,
)
from diffcam.flows.ledger import AuditLedger
from diffcam.flows.paths import DEFAULT_MODEL
from diffcam.storage.store import Store
from tests.test_compare import fabricate
from tests.test_registry import make_ckpt

# ------------------------------------------------------------------------------ fast


def test_deployments_schedule_trigger_and_parameters(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    reg.mkdir()
    cfg = OpsConfig(registry=str(reg), store="rel-store", cron="30 1 * * *", limit=3,
                    settings={"methods": ["diffusion-cam"]}, audit_options={"workers": 1},
                    gates={"max_obj_iou_drop_points": 1.0})
    sweep, event = build_deployments(cfg)
    assert sweep.entrypoint == "diffcam.flows.deploy.audit_new_checkpoints"
    assert event.entrypoint == "diffcam.flows.deploy.audit_checkpoint"
    assert sweep.schedules[0].schedule.cron == "30 1 * * *" and not sweep.triggers
    assert sweep.parameters["store"] == str((Path.cwd() / "rel-store").absolute())  # absolute for the runner
    assert sweep.parameters["registry"] == str(reg) and sweep.parameters["limit"] == 3
    [trig] = event.triggers
    assert trig.expect == {EVENT_REGISTERED} and not event.schedules
    assert trig.parameters == TRIGGER_PARAMETERS and set(trig.parameters) == set(PAYLOAD_FIELDS)
    assert event.parameters["registry_roots"] == [str(reg.resolve())]
    assert event.parameters["defaults"] == {"dataset": None, "settings": {"methods": ["diffusion-cam"]}, "limit": 3}
    # every parameter a deployment or its trigger sets is a parameter of its flow
    for dep, fl in ((sweep, audit_new_checkpoints), (event, audit_checkpoint)):
        names = set(inspect.signature(fl.fn).parameters)
        assert set(dep.parameters) <= names
        for t in dep.triggers or []:
            assert set(t.parameters) <= names
    assert describe_deployments(cfg)[1]["triggers"][0]["expect"] == [EVENT_REGISTERED]


def test_ops_config_from_toml_and_validation(tmp_path: Path) -> None:
    (tmp_path / "reg").mkdir()
    p = tmp_path / "ops.toml"
    p.write_text(f'[ops]\nregistry = "{tmp_path / "reg"}"\nlimit = 5\n[ops.settings]\ndistractor = "none"\n'
                 '[ops.gates]\nmax_obj_iou_drop_points = 1.0\n[ops.audit_options]\nworkers = 2\n')
    cfg = OpsConfig.from_toml(p, cron="0 3 * * *")
    assert cfg.limit == 5 and cfg.settings == CamSettings(distractor="none") and cfg.cron == "0 3 * * *"
    assert cfg.audit_options == {"workers": 2} and cfg.gates == CompareGates(max_obj_iou_drop_points=1.0)
    assert cfg.with_(limit=None, cron="1 1 * * *").limit == 5  # unset CLI flags keep the config's values
    for bad, msg in (({"settings": {"distractor": "x"}}, "distractor"),
                     ({"gates": {"nope": 1}}, r"unknown CompareGates field\(s\) \['nope'\]"),
                     ({"audit_options": {"threads": 9}}, "not parameters of diffcam.flows.audit"), ({"limit": 0}, "limit")):
        with pytest.raises(ValueError, match=msg):
            OpsConfig(registry=str(tmp_path / "reg"), **bad)
    p.write_text('[ops]\nregistry = "x"\ntypo = 1\n')
    with pytest.raises(ValueError, match="typo"):
        OpsConfig.from_toml(p)


def test_deploy_dry_run_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from diffcam.flows.cli import app

    (tmp_path / "reg").mkdir()
    r = CliRunner().invoke(app, ["deploy", "--registry", str(tmp_path / "reg"), "--store", str(tmp_path / "s"),
                                 "--dry-run", "--cron", "15 4 * * *", "--workers", "2"])
    assert r.exit_code == 0, r.output
    deps = json.loads(r.stdout)
    assert [d["name"] for d in deps] == ["diffcam-sweep/diffcam-sweep",
                                         "diffcam-audit-checkpoint/diffcam-on-registered"]
    assert deps[0]["schedules"][0]["cron"] == "15 4 * * *" and deps[0]["parameters"]["audit_options"] == {"workers": 2}
    r = CliRunner().invoke(app, ["deploy", "--registry", str(tmp_path / "reg")])
    assert r.exit_code == 2 and "--work-pool" in r.output


# ------------------------------------------------------- flows with a stand-in audit


class FakeAudit:
    """Stands in for diffcam.flows.audit.audit: writes a fabricated run (tests.test_compare.fabricate).
    A checkpoint folder named ``*-bad`` localises "circle" badly and gets a confirmed
    spurious flag; ``*-crash`` fails once (run row 'failed'), then succeeds on resume."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.crashed: set[str] = set()

    def __call__(self, *, model: str, dataset: str, store: str, run_id: str, limit, settings, trigger,
                 **opts: Any) -> dict[str, Any]:
        self.calls.append({"model": model, "dataset": dataset, "run_id": run_id, "limit": limit,
                           "settings": settings, "trigger": trigger, **opts})
        st = Store(store)
        name = Path(model).name
        if name.endswith("-crash") and name not in self.crashed:
            self.crashed.add(name)
            fabricate(st, run_id, status="failed")
            raise RuntimeError("injected crash")
        if run_id in st.runs():  # a resume: finish the run
            st.update_run(run_id, status="succeeded")
        elif name.endswith("-bad"):
            fabricate(st, run_id, iou={"circle": 0.1}, flags=[{"kind": "clever_hans", "word": "circle",
                                                                "confirmed": True}])
        else:
            fabricate(st, run_id)
        return {"status": "succeeded", "report_html": None}


@pytest.fixture
def fake_audit(monkeypatch) -> FakeAudit:
    import diffcam.flows.audit

    fake = FakeAudit()
    monkeypatch.setattr(diffcam.flows.audit, "audit", fake)
    return fake


@pytest.mark.slow
def test_sweep_skips_audited_resumes_failed_and_compares(prefect_harness, fake_audit, make_dataset,
                                                          tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    make_ckpt(reg / "line" / "v1", b"1")
    ds = make_dataset(n=2)
    store = str(tmp_path / "store")
    kw = dict(registry=str(reg), store=store, dataset=str(ds), settle_s=0, limit=2,
              settings={"methods": ["diffusion-cam"]})

    first = audit_new_checkpoints(**kw)
    assert [(c["name"], c["action"]) for c in first["checkpoints"]] == [("v1", "audit")]
    assert first["checkpoints"][0]["compare"] is None  # the first audit of the line
    call = fake_audit.calls[0]
    assert call["trigger"] == "schedule" and call["limit"] == 2
    assert call["model"] == str((reg / "line" / "v1").resolve())
    assert call["settings"] == CamSettings(methods=("diffusion-cam",))  # typed, from the flow's JSON parameter

    make_ckpt(reg / "line" / "v2", b"2")
    make_ckpt(reg / "line" / "v3-crash", b"3")
    second = audit_new_checkpoints(return_state=True, **kw)
    assert second.is_failed() and "injected crash" in second.message
    ledger = AuditLedger(store)
    by_name = {Path(r.checkpoint).name: r for r in ledger.records()}
    assert set(by_name) == {"v1", "v2", "v3-crash"} and len(fake_audit.calls) == 3
    assert ledger.status(by_name["v3-crash"].run_id) == "failed"
    assert by_name["v2"].previous_run_id == by_name["v1"].run_id and by_name["v2"].compare_verdict == "pass"
    assert (Path(by_name["v2"].compare_dir) / "compare.json").is_file()
    assert Store(store).read_run(by_name["v2"].run_id)["parent_run_id"] == by_name["v1"].run_id

    third = audit_new_checkpoints(**kw)
    actions = {c["name"]: c["action"] for c in third["checkpoints"]}
    assert actions == {"v1": "skip", "v2": "skip", "v3-crash": "resume"}
    assert fake_audit.calls[-1]["run_id"] == by_name["v3-crash"].run_id  # same run id: committed shards kept

    forced = audit_new_checkpoints(force=True, compare=False, **kw)
    assert all(c["action"] == "audit" for c in forced["checkpoints"])


@pytest.mark.slow
def test_event_flow_checks_containment_and_fails_on_regression(prefect_harness, fake_audit, make_dataset,
                                                                tmp_path: Path, monkeypatch) -> None:
    import prefect.events

    emitted: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda event, **kw: emitted.append((event, kw)))
    reg = tmp_path / "registry"
    good = make_ckpt(reg / "line" / "v1", b"1")
    bad = make_ckpt(reg / "line" / "v2-bad", b"2")
    outside = make_ckpt(tmp_path / "outside" / "x")
    ds = make_dataset(n=2)
    store = str(tmp_path / "store")
    common = dict(registry_roots=[str(reg)], store=store, model_line="line", version=None, dataset=None,
                  settings=None, limit=None, force=False, notification={"delivery_id": "d"},
                  defaults={"dataset": str(ds), "settings": {"methods": ["diffusion-cam"]}, "limit": 2})

    s = audit_checkpoint(checkpoint=str(outside), return_state=True, **common)
    assert s.is_failed() and "outside the allowed roots" in s.message and fake_audit.calls == []

    r1 = audit_checkpoint(checkpoint=str(good), **common)
    assert r1["action"] == "audit" and fake_audit.calls[-1]["trigger"] == "event"
    assert fake_audit.calls[-1]["limit"] == 2 and fake_audit.calls[-1]["dataset"] == str(ds)
    again = audit_checkpoint(checkpoint=str(good), **common)
    assert again["action"] == "skip" and len(fake_audit.calls) == 1

    s2 = audit_checkpoint(checkpoint=str(bad), return_state=True, **common)
    assert s2.is_failed() and "no new confirmed spurious flag" in s2.message and "Obj-IoU drop" in s2.message
    rec = [r for r in AuditLedger(store).records() if r.checkpoint.endswith("v2-bad")][0]
    assert rec.compare_verdict == "fail" and rec.previous_run_id == r1["run_id"]
    md = (Path(rec.compare_dir) / "compare.md").read_text()
    assert "**Verdict: FAIL**" in md and "circle" in md
    [(name, ev)] = emitted
    assert name == EVENT_COMPARE_FAILED and ev["payload"]["run_b"] == rec.run_id
    assert ev["resource"]["prefect.resource.id"] == "diffcam.model-line.line"


@pytest.mark.slow
def test_sweep_cli(prefect_harness, fake_audit, make_dataset, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from diffcam.flows.cli import app

    reg = tmp_path / "registry"
    make_ckpt(reg / "line" / "v1", b"1")
    ds = make_dataset(n=2)
    cfg = tmp_path / "ops.toml"
    cfg.write_text(f'[ops]\nregistry = "{reg}"\nstore = "{tmp_path / "store"}"\ndataset = "{ds}"\n')
    first = CliRunner().invoke(app, ["sweep", "--config", str(cfg), "--settle-s", "0",
                                     "--json", str(tmp_path / "s.json")])
    assert first.exit_code == 0, first.output
    assert "audit    line/v1" in first.output and (tmp_path / "store" / "ops" / "audits").is_dir()
    assert json.loads((tmp_path / "s.json").read_text())["counts"]["audit"] == 1
    second = CliRunner().invoke(app, ["sweep", "--config", str(cfg), "--settle-s", "0"])
    assert second.exit_code == 0 and "skip     line/v1" in second.output and len(fake_audit.calls) == 1


# ------------------------------------------------------ real server, slow end to end


def stop_process_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process group a test started, SIGKILL it if it has not ended in ``timeout`` s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{log.read_text()[-4000:]}")


class Loop:
    """Handles on the running server, serve process and webhook receiver."""

    def __init__(self, root: Path, api: str, hook: str, registry: Path, store: Path, dataset: Path, secret: str,
                 logs: dict[str, Path], env: dict[str, str]) -> None:
        self.root, self.api, self.hook, self.secret, self.logs, self.env = root, api, hook, secret, logs, env
        self.registry, self.store, self.dataset = registry, store, dataset

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        """One API call, retried on 502/503 as Prefect's own client does: under a loaded CI machine the
        server's SQLite database can be locked for a moment and the server answers 503 (seen once in a
        fresh-clone run); anything else, or a 503 that lasts, still fails the test."""
        import httpx

        for delay in (0.5, 1, 2, 4, 8, 0):  # the last answer is final: no sleep after it
            r = httpx.request(method, f"{self.api}{path}", json=body, timeout=10)
            if r.status_code not in (502, 503):
                break
            time.sleep(delay)
        r.raise_for_status()
        return r.json()

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def deployment(self, flow: str, name: str) -> dict[str, Any]:
        return self.get(f"/deployments/name/{flow}/{name}")

    def runs(self, *, deployment_id: str | None = None, flow_name: str | None = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"sort": "EXPECTED_START_TIME_ASC"}
        if deployment_id:
            body["flow_runs"] = {"deployment_id": {"any_": [deployment_id]}}
        if flow_name:
            body["flows"] = {"name": {"any_": [flow_name]}}
        return self.post("/flow_runs/filter", body)

    def wait_terminal(self, run_id: str, timeout: float) -> dict[str, Any]:
        t0 = time.time()
        while time.time() - t0 < timeout:
            fr = self.get(f"/flow_runs/{run_id}")
            if fr["state"] and fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return fr
            time.sleep(1)
        raise TimeoutError(f"flow run {run_id} not finished after {timeout} s:\n{self.tail('serve')}")

    def wait_runs(self, deployment_id: str, n: int, timeout: float) -> list[dict[str, Any]]:
        t0 = time.time()
        while time.time() - t0 < timeout:
            runs = self.runs(deployment_id=deployment_id)
            if len(runs) >= n:
                return runs
            time.sleep(0.5)
        raise TimeoutError(f"no flow run of deployment {deployment_id} after {timeout} s:\n{self.tail('serve')}")

    def tail(self, name: str, n: int = 4000) -> str:
        return self.logs[name].read_text(errors="replace")[-n:]

    def notify(self, body: dict[str, Any], *, delivery: str | None = None, secret: str | None = None,
               ts: float | None = None, path: str = "/hooks/mlflow") -> Any:
        import httpx

        from diffcam.flows.webhook import signature_header

        raw = json.dumps(body).encode()
        delivery = delivery or str(uuid.uuid4())
        ts_s = str(int(ts if ts is not None else time.time()))
        prefix = "X-MLflow" if path.endswith("mlflow") else "X-Diffcam"
        headers = {f"{prefix}-Delivery-Id": delivery, f"{prefix}-Timestamp": ts_s,
                   f"{prefix}-Signature": signature_header(secret or self.secret, delivery, ts_s, raw),
                   "Content-Type": "application/json"}
        return httpx.post(f"{self.hook}{path}", content=raw, headers=headers, timeout=30)


def _copy_model(dst: Path, note: str) -> Path:
    """A copy of the tiny model with an extra file: same weights, a different content hash."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copytree(DEFAULT_MODEL, tmp)
    (tmp / "NOTES.txt").write_text(note)
    tmp.rename(dst)  # appear in the registry atomically
    return dst


@contextlib.contextmanager
def ops_loop(root: Path, registry: Path, store: Path, dataset: Path) -> Iterator[Loop]:
    """``prefect server start`` on loopback, ``diffcam serve --config ROOT/ops.toml`` and
    ``diffcam webhook --registry REGISTRY`` as subprocesses (logs in ROOT/<name>.log),
    stopped on exit."""
    (root / "ops.toml").write_text(
        f'[ops]\nregistry = "{registry}"\nstore = "{store}"\ndataset = "{dataset}"\nlimit = 3\nsettle_s = 0\n'
        f'cron = "0 2 * * *"\n[ops.settings]\nmethods = ["diffusion-cam"]\n'
        f'[ops.audit_options]\nworkers = 1\nshard_size = 4\n')
    port, hook_port = _free_port(), _free_port()
    api = f"http://127.0.0.1:{port}/api"
    secret = "e2e-secret-" + uuid.uuid4().hex
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0",
                 "GX_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"})
    server_env = {**base, "PREFECT_HOME": str(root / "prefect-server")}
    client_env = {**base, "PREFECT_HOME": str(root / "prefect-client"), "PREFECT_API_URL": api,
                  "PREFECT_RUNNER_POLL_FREQUENCY": "1", "DIFFCAM_WEBHOOK_SECRET": secret}
    bin_dir = Path(sys.executable).parent
    logs = {n: root / f"{n}.log" for n in ("server", "serve", "webhook")}
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=env, cwd=root, stdout=open(logs[name], "wb"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p

    try:
        srv = start("server", [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], server_env)
        _wait_http(f"{api}/health", 90, srv, logs["server"])
        serve = start("serve", [str(bin_dir / "diffcam"), "serve", "--config", str(root / "ops.toml")], client_env)
        hook = start("webhook", [str(bin_dir / "diffcam"), "webhook", "--registry", str(registry), "--store",
                                 str(store), "--port", str(hook_port)], client_env)
        _wait_http(f"http://127.0.0.1:{hook_port}/healthz", 60, hook, logs["webhook"])
        lp = Loop(root, api, f"http://127.0.0.1:{hook_port}", registry, store, dataset, secret, logs, client_env)
        t0 = time.time()
        while True:  # serve has registered both deployments
            try:
                lp.deployment("diffcam-audit-checkpoint", "diffcam-on-registered")
                lp.deployment("diffcam-sweep", "diffcam-sweep")
                break
            except Exception:  # noqa: BLE001 - not yet
                if serve.poll() is not None or time.time() - t0 > 90:
                    raise RuntimeError(f"serve did not register the deployments:\n{lp.tail('serve')}") from None
                time.sleep(1)
        time.sleep(2)  # the automation for the trigger is created with the deployment
        yield lp
    finally:
        for p in reversed(procs):  # webhook, serve (SIGTERM pauses its schedules), then the server
            stop_process_group(p)


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    from diffcam.storage.synthetic_writer import write_synthetic_dataset

    root = tmp_path_factory.mktemp("ops-loop")
    registry, store = root / "registry", root / "store"
    (registry / "shapes").mkdir(parents=True)
    _copy_model(registry / "shapes" / "v1", "v1")
    dataset = write_synthetic_dataset(root / "dataset", 3, 11)
    with ops_loop(root, registry, store, dataset) as lp:
        yield lp


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_signed_notification_runs_an_audit_and_bad_ones_start_nothing(loop: Loop) -> None:
    dep = loop.deployment("diffcam-audit-checkpoint", "diffcam-on-registered")
    ckpt = loop.registry / "shapes" / "v1"
    body = {"entity": "model_version", "action": "created", "timestamp": int(time.time() * 1000),
            "data": {"name": "shapes", "version": "1", "source": f"file://{ckpt}", "run_id": "r1", "tags": {},
                     "description": None}}
    outside = _copy_model(loop.root / "elsewhere", "not in the registry")
    bad_path = {**body, "data": {**body["data"], "source": f"file://{outside}"}}

    assert loop.notify(body, secret="wrong-secret-" + "x" * 16).status_code == 401
    assert loop.notify(body, ts=time.time() - 3600).status_code == 401
    r = loop.notify(bad_path)
    assert r.status_code == 403, r.text
    r = loop.notify(body, delivery="delivery-ok-1")
    assert r.status_code == 202, r.text
    assert loop.notify(body, delivery="delivery-ok-1").status_code == 409  # replay

    [run] = loop.wait_runs(dep["id"], 1, 60)
    assert run["parameters"]["checkpoint"] == str(ckpt.resolve())
    assert run["parameters"]["model_line"] == "shapes" and run["parameters"]["version"] == "1"
    assert run["parameters"]["notification"]["delivery_id"] == "delivery-ok-1"
    assert run["parameters"]["limit"] is None and run["parameters"]["defaults"]["limit"] == 3
    done = loop.wait_terminal(run["id"], 150)
    assert done["state"]["type"] == "COMPLETED", (done["state"], loop.tail("serve"))

    [audit_run] = [r for r in loop.runs(flow_name="diffcam-audit") if r["parent_task_run_id"]
                   and r["parameters"]["model"] == str(ckpt.resolve())]
    assert audit_run["state"]["type"] == "COMPLETED"
    p = audit_run["parameters"]
    assert p["dataset"] == str(loop.dataset) and p["limit"] == 3 and p["trigger"] == "event"
    assert CamSettings.model_validate(p["settings"]) == CamSettings(methods=("diffusion-cam",)) and p["workers"] == 1
    rid = p["run_id"]
    st = Store(loop.store)
    assert st.read_run(rid)["status"] == "succeeded" and st.read_run(rid)["trigger"] == "event"
    assert AuditLedger(loop.store).get(rid).source["notification"]["delivery_id"] == "delivery-ok-1"

    time.sleep(5)  # nothing else was triggered: rejected requests and the replay started no run
    assert len(loop.runs(deployment_id=dep["id"])) == 1


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_scheduled_sweep_audits_a_new_checkpoint_and_skips_an_audited_one(loop: Loop) -> None:
    dep = loop.deployment("diffcam-sweep", "diffcam-sweep")
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 2 * * *"] and dep["schedules"][0]["active"]
    ledger = AuditLedger(loop.store)
    v1 = str((loop.registry / "shapes" / "v1").resolve())
    n_before = 0
    if not any(r.checkpoint == v1 for r in ledger.records()):  # this test alone: audit v1 first
        fr = loop.post(f"/deployments/{dep['id']}/create_flow_run", {})
        assert loop.wait_terminal(fr["id"], 150)["state"]["type"] == "COMPLETED", loop.tail("serve")
        n_before = 1
    v2 = _copy_model(loop.registry / "shapes" / "v2", "v2")

    # the scheduled deployment, run now (the cron would start exactly this run at 02:00)
    fr = loop.post(f"/deployments/{dep['id']}/create_flow_run", {})
    done = loop.wait_terminal(fr["id"], 170)
    assert done["state"]["type"] == "COMPLETED", (done["state"], loop.tail("serve"))
    started = [r for r in loop.runs(deployment_id=dep["id"]) if r["state"]["type"] != "SCHEDULED"]
    assert len(started) == n_before + 1  # (SCHEDULED ones are the cron's upcoming nights)

    recs = {Path(r.checkpoint).name: r for r in AuditLedger(loop.store).records()}
    assert set(recs) == {"v1", "v2"}  # v1 skipped: still its single audit
    r2 = recs["v2"]
    assert r2.checkpoint == str(v2.resolve()) and r2.trigger == "schedule"
    assert ledger.status(r2.run_id) == "succeeded"
    sweep_audits = [r for r in loop.runs(flow_name="diffcam-audit") if r["parameters"]["run_id"] == r2.run_id]
    assert len(sweep_audits) == 1 and sweep_audits[0]["parameters"]["trigger"] == "schedule"
    # compared automatically with the previous audit of the line (same weights: passes)
    assert r2.previous_run_id == recs["v1"].run_id and r2.compare_verdict == "pass", r2
    doc = json.loads((Path(r2.compare_dir) / "compare.json").read_text())
    assert doc["run_a"]["run_id"] == recs["v1"].run_id and doc["verdict"] == "pass"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_deploy_registers_both_deployments_on_a_work_pool(loop: Loop) -> None:
    """The team path: `diffcam deploy --work-pool` puts the same two deployments on a pool
    (module entry points, the cron schedule, the event trigger as an automation)."""
    bin_dir = Path(sys.executable).parent
    pool = "diffcam-test-pool"
    subprocess.run([str(bin_dir / "prefect"), "work-pool", "create", pool, "--type", "process"], env=loop.env,
                   cwd=loop.root, check=True, capture_output=True, timeout=60)
    cfg = loop.root / "pool.toml"
    cfg.write_text((loop.root / "ops.toml").read_text().replace(
        "[ops]\n", '[ops]\nsweep_name = "pool-sweep"\nevent_name = "pool-on-registered"\n', 1))
    r = subprocess.run([str(bin_dir / "diffcam"), "deploy", "--config", str(cfg), "--work-pool", pool], env=loop.env,
                       cwd=loop.root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    sweep = loop.deployment("diffcam-sweep", "pool-sweep")
    event = loop.deployment("diffcam-audit-checkpoint", "pool-on-registered")
    assert sweep["work_pool_name"] == event["work_pool_name"] == pool
    assert sweep["entrypoint"] == "diffcam.flows.deploy.audit_new_checkpoints"
    assert [s["schedule"]["cron"] for s in sweep["schedules"]] == ["0 2 * * *"]
    autos = loop.post("/automations/filter", {})
    mine = [a for a in autos if any(act.get("deployment_id") == event["id"] for act in a["actions"])]
    assert len(mine) == 1 and mine[0]["trigger"]["expect"] == [EVENT_REGISTERED]
    assert mine[0]["actions"][0]["parameters"]["checkpoint"]  # the payload template
