"""The registry webhook receiver: signatures, timestamps, replays, containment, payloads (fast:
FastAPI TestClient, a recording emitter instead of Prefect)."""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from diffcam.flows.deploy import EVENT_REGISTERED, PAYLOAD_FIELDS, PayloadError, validate_payload
from diffcam.flows.webhook import ReplayCache, WebhookSettings, create_app, signature_header
from tests.test_registry import make_ckpt

SECRET = "s3cret-for-tests-0123456789"
NOW = 1_800_000_000.0


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.events: list[dict[str, Any]] = []
        self.fail = fail

    def __call__(self, event: str, **kw: Any) -> str:
        if self.fail:
            raise ConnectionError("server down")
        self.events.append({"event": event, **kw})
        return str(kw["id"])


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    reg = tmp_path / "registry"
    make_ckpt(reg / "shapes" / "v1", b"1")
    make_ckpt(reg / "shapes" / "v2", b"2")
    datasets = tmp_path / "datasets"
    (datasets / "eval").mkdir(parents=True)
    outside = make_ckpt(tmp_path / "outside" / "evil")
    rec = Recorder()
    settings = WebhookSettings(registry=str(reg), store=str(tmp_path / "store"), dataset_roots=(str(datasets),))
    clock = {"t": NOW}
    app = create_app(settings, emit=rec, clock=lambda: clock["t"], environ={"DIFFCAM_WEBHOOK_SECRET": SECRET})
    return {"reg": reg, "outside": outside, "datasets": datasets, "rec": rec, "settings": settings, "clock": clock,
            "client": TestClient(app), "tmp": tmp_path}


def post(client: TestClient, path: str, body: dict[str, Any] | bytes, *, prefix: str = "X-MLflow",
         secret: str = SECRET, ts: float = NOW, delivery: str | None = None,
         signature: str | None = None) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    delivery = delivery or str(uuid.uuid4())
    headers = {
        f"{prefix}-Delivery-Id": delivery,
        f"{prefix}-Timestamp": str(int(ts)),
        f"{prefix}-Signature": signature or signature_header(secret, delivery, str(int(ts)), raw),
        "Content-Type": "application/json",
    }
    return client.post(path, content=raw, headers=headers)


def mlflow_created(source: str, name: str = "shapes", version: str = "1") -> dict[str, Any]:
    return {"entity": "model_version", "action": "created", "timestamp": int(NOW * 1000),
            "data": {"name": name, "version": version, "source": source, "run_id": "abc123", "tags": {},
                     "description": None}}


def test_mlflow_version_created_emits_the_event(env) -> None:
    ckpt = env["reg"] / "shapes" / "v1"
    r = post(env["client"], "/hooks/mlflow", mlflow_created(f"file://{ckpt}"), delivery="d-1")
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "accepted" and r.json()["model_line"] == "shapes"
    [ev] = env["rec"].events
    assert ev["event"] == EVENT_REGISTERED
    assert ev["resource"]["prefect.resource.id"] == "diffcam.checkpoint.shapes.1"
    p = ev["payload"]
    assert set(p) == set(PAYLOAD_FIELDS)
    assert p["checkpoint"] == str(ckpt.resolve()) and p["model_line"] == "shapes" and p["version"] == "1"
    assert p["dataset"] is None and p["settings"] is None and p["force"] is False
    assert p["notification"] == {"kind": "mlflow:model_version.created", "delivery_id": "d-1", "name": "shapes",
                                 "version": "1", "run_id": "abc123"}
    assert ev["id"] == uuid.UUID(r.json()["event_id"])


def test_mlflow_source_not_local_resolves_through_the_registry(env) -> None:
    r = post(env["client"], "/hooks/mlflow", mlflow_created("models:/m-123", version="2"))
    assert r.status_code == 202, r.text
    assert env["rec"].events[0]["payload"]["checkpoint"] == str((env["reg"] / "shapes" / "v2").resolve())
    r = post(env["client"], "/hooks/mlflow", mlflow_created("models:/m-9", version="9"))
    assert r.status_code == 422 and "cannot map" in r.json()["detail"]


def test_mlflow_alias_created(env) -> None:
    body = {"entity": "model_version_alias", "action": "created", "timestamp": 0,
            "data": {"name": "shapes", "alias": "champion", "version": "2"}}
    r = post(env["client"], "/hooks/mlflow", body)
    assert r.status_code == 202, r.text
    p = env["rec"].events[0]["payload"]
    assert p["version"] == "2" and p["notification"]["alias"] == "champion"


def test_other_mlflow_events_are_ignored(env) -> None:
    body = {"entity": "model_version_tag", "action": "set", "timestamp": 0, "data": {"name": "shapes"}}
    r = post(env["client"], "/hooks/mlflow", body)
    assert r.status_code == 200 and r.json()["status"] == "ignored" and env["rec"].events == []


@pytest.mark.parametrize("case", ["wrong-secret", "tampered-body", "garbage", "missing", "wrong-version"])
def test_bad_signatures_are_rejected_and_emit_nothing(env, case: str) -> None:
    body = mlflow_created(f"file://{env['reg'] / 'shapes' / 'v1'}")
    client = env["client"]
    if case == "wrong-secret":
        r = post(client, "/hooks/mlflow", body, secret="another-secret-0123456789")
    elif case == "tampered-body":
        raw = json.dumps(body).encode()
        sig = signature_header(SECRET, "d-t", str(int(NOW)), raw)
        tampered = json.dumps(mlflow_created(f"file://{env['outside']}")).encode()
        r = post(client, "/hooks/mlflow", tampered, delivery="d-t", signature=sig)
    elif case == "garbage":
        r = post(client, "/hooks/mlflow", body, signature="v1,bm90IGEgc2lnbmF0dXJl")
    elif case == "wrong-version":
        good = signature_header(SECRET, "d-v", str(int(NOW)), json.dumps(body).encode())
        r = post(client, "/hooks/mlflow", body, delivery="d-v", signature="v0," + good[3:])
    else:
        r = client.post("/hooks/mlflow", content=json.dumps(body).encode())
    assert r.status_code == 401, r.text
    assert env["rec"].events == []


def test_stale_and_future_timestamps_are_rejected(env) -> None:
    body = mlflow_created(f"file://{env['reg'] / 'shapes' / 'v1'}")
    for ts in (NOW - 301, NOW + 301):
        r = post(env["client"], "/hooks/mlflow", body, ts=ts)
        assert r.status_code == 401 and "tolerance 300 s" in r.json()["detail"]
    assert post(env["client"], "/hooks/mlflow", body, ts=NOW - 299).status_code == 202
    assert len(env["rec"].events) == 1


def test_replay_is_rejected_even_after_a_restart(env) -> None:
    body = mlflow_created(f"file://{env['reg'] / 'shapes' / 'v1'}")
    assert post(env["client"], "/hooks/mlflow", body, delivery="d-r").status_code == 202
    r = post(env["client"], "/hooks/mlflow", body, delivery="d-r")
    assert r.status_code == 409 and "replay" in r.json()["detail"]
    # a new receiver process on the same store still refuses it (inside the time window)
    env["clock"]["t"] = NOW + 200
    app2 = create_app(env["settings"], emit=env["rec"], clock=lambda: env["clock"]["t"],
                      environ={"DIFFCAM_WEBHOOK_SECRET": SECRET})
    r = post(TestClient(app2), "/hooks/mlflow", body, delivery="d-r", ts=NOW)
    assert r.status_code == 409
    assert len(env["rec"].events) == 1


def test_replay_cache_keeps_ids_for_two_tolerances(tmp_path: Path) -> None:
    cache = ReplayCache(tmp_path / "c", ttl_s=660)
    assert cache.claim("x", 1000.0) and not cache.claim("x", 1000.0 + 650)
    assert cache.claim("x", 1000.0 + 700)  # expired: a request that old fails the timestamp check anyway
    cache.release("x")
    assert cache.claim("x", 2000.0)


@pytest.mark.parametrize("where", ["outside", "dotdot", "symlink", "registry-root-sibling"])
def test_paths_outside_the_registry_are_forbidden(env, where: str) -> None:
    reg, outside = env["reg"], env["outside"]
    if where == "outside":
        p = str(outside)
    elif where == "dotdot":
        p = f"{reg}/shapes/../../outside/evil"
    elif where == "symlink":
        (reg / "shapes" / "v3").symlink_to(outside, target_is_directory=True)
        p = str(reg / "shapes" / "v3")
    else:
        sib = make_ckpt(env["tmp"] / "registry-evil" / "x")
        p = str(sib)  # a string-prefix check would let this through
    r = post(env["client"], "/hooks/mlflow", mlflow_created(f"file://{p}"))
    assert r.status_code == 403, r.text
    r = post(env["client"], "/hooks/registry", {"checkpoint": p}, prefix="X-Diffcam", delivery="d-403")
    assert r.status_code == 403
    # a refused delivery is not kept as "seen": its retry gets the same answer, not 409
    assert post(env["client"], "/hooks/registry", {"checkpoint": p}, prefix="X-Diffcam",
                delivery="d-403").status_code == 403
    assert env["rec"].events == []


def test_plain_form(env) -> None:
    ckpt = env["reg"] / "shapes" / "v2"
    body = {"checkpoint": str(ckpt), "dataset": str(env["datasets"] / "eval"), "settings": {"distractor": "none"},
            "limit": 4, "force": True}
    r = post(env["client"], "/hooks/registry", body, prefix="X-Diffcam")
    assert r.status_code == 202, r.text
    p = env["rec"].events[0]["payload"]
    assert p["model_line"] == "shapes" and p["version"] is None and p["limit"] == 4 and p["force"] is True
    assert p["dataset"] == str((env["datasets"] / "eval").resolve()) and p["settings"] == {"distractor": "none"}
    assert env["rec"].events[0]["resource"]["prefect.resource.id"] == "diffcam.checkpoint.shapes.v2"


@pytest.mark.parametrize("body,status,msg", [
    ({"checkpoint": "CKPT", "dataset": "/etc"}, 403, "dataset"),
    ({"checkpoint": "CKPT", "settings": {"distractor": "nope"}}, 422, "distractor"),
    ({"checkpoint": "CKPT", "limit": 0}, 422, "limit"),
    ({"checkpoint": "CKPT", "limit": "3"}, 422, "limit"),
    ({"checkpoint": "CKPT", "force": "yes"}, 422, "force"),
    ({"checkpoint": "CKPT", "rm": "-rf"}, 422, "unknown key"),
    ({"dataset": None}, 422, "checkpoint"),
    ({"checkpoint": "REG/shapes"}, 422, "not a checkpoint folder"),
])
def test_plain_form_rejections(env, body: dict[str, Any], status: int, msg: str) -> None:
    body = {k: (v.replace("CKPT", str(env["reg"] / "shapes" / "v1")).replace("REG", str(env["reg"]))
                if isinstance(v, str) else v) for k, v in body.items()}
    r = post(env["client"], "/hooks/registry", body, prefix="X-Diffcam")
    assert r.status_code == status, r.text
    assert msg in r.json()["detail"]
    assert env["rec"].events == []


def test_body_limits_and_malformed_requests(env) -> None:
    big = b"{" + b" " * 70_000 + b"}"
    assert post(env["client"], "/hooks/mlflow", big).status_code == 413
    assert post(env["client"], "/hooks/mlflow", b"not json").status_code == 400
    assert post(env["client"], "/hooks/mlflow", b"[1, 2]").status_code == 400
    assert post(env["client"], "/hooks/mlflow", {"a": 1}, delivery="bad id with spaces").status_code == 400
    assert env["rec"].events == []


def test_emit_failure_is_503_and_the_delivery_can_be_retried(env) -> None:
    failing = Recorder(fail=True)
    app = create_app(env["settings"], emit=failing, clock=lambda: NOW, environ={"DIFFCAM_WEBHOOK_SECRET": SECRET})
    body = mlflow_created(f"file://{env['reg'] / 'shapes' / 'v1'}")
    assert post(TestClient(app), "/hooks/mlflow", body, delivery="d-5").status_code == 503
    assert post(env["client"], "/hooks/mlflow", body, delivery="d-5").status_code == 202


def test_secret_is_required_and_never_logged(env, caplog) -> None:
    with pytest.raises(ValueError, match="DIFFCAM_WEBHOOK_SECRET"):
        create_app(env["settings"], emit=env["rec"], environ={})
    with pytest.raises(ValueError, match="at least 16"):
        create_app(env["settings"], emit=env["rec"], environ={"DIFFCAM_WEBHOOK_SECRET": "short"})
    caplog.set_level("DEBUG")
    post(env["client"], "/hooks/mlflow", mlflow_created(f"file://{env['reg'] / 'shapes' / 'v1'}"))
    post(env["client"], "/hooks/mlflow", {"x": 1}, secret="wrong-secret-0123456789")
    assert SECRET not in caplog.text and "rejected 401" in caplog.text and "accepted" in caplog.text


def test_healthz(env) -> None:
    assert env["client"].get("/healthz").json() == {"status": "ok"}


def test_validate_payload_names_every_problem() -> None:
    good = {"checkpoint": "/r/x", "model_line": "x", "version": None, "dataset": None, "settings": None,
            "limit": None, "force": False, "notification": {}}
    assert validate_payload(dict(good)) == good
    with pytest.raises(PayloadError) as e:
        validate_payload({**{k: v for k, v in good.items() if k != "dataset"}, "limit": True, "extra": 1})
    msg = str(e.value)
    assert "missing key(s) ['dataset']" in msg and "unknown key(s) ['extra']" in msg and "limit" in msg


def test_time_is_checked_against_the_real_clock_by_default(env) -> None:
    app = create_app(env["settings"], emit=env["rec"], environ={"DIFFCAM_WEBHOOK_SECRET": SECRET})
    body = mlflow_created(f"file://{env['reg'] / 'shapes' / 'v1'}")
    assert post(TestClient(app), "/hooks/mlflow", body, ts=time.time()).status_code == 202
    assert post(TestClient(app), "/hooks/mlflow", body, ts=NOW).status_code == 401


def test_default_emitter_answers_503_when_prefect_is_down(env) -> None:
    """The real emitter checks the Prefect API first (emit_event itself never reports a
    failure): a dead server is a 503, and the delivery may be retried."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{dead}/api"}):
        app = create_app(env["settings"], clock=lambda: NOW, environ={"DIFFCAM_WEBHOOK_SECRET": SECRET})
        body = mlflow_created(f"file://{env['reg'] / 'shapes' / 'v1'}")
        r = post(TestClient(app), "/hooks/mlflow", body, delivery="d-down")
    assert r.status_code == 503 and "retry later" in r.json()["detail"]
    assert post(env["client"], "/hooks/mlflow", body, delivery="d-down").status_code == 202


# ------------------------------------------------- what MLflow really sends (issue 19)


@pytest.fixture
def receiver_log() -> Any:
    """The receiver's log as `configure_logging` (what `diffcam webhook` calls) sets it up,
    written to a buffer; the logger is restored afterwards (caplog relies on propagation)."""
    import io
    import logging

    logger = logging.getLogger("diffcam.webhook")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    buf = io.StringIO()
    from diffcam.flows.webhook import configure_logging

    configure_logging("info", stream=buf)
    yield buf
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def mlflow_test_delivery(kind: str = "created") -> dict[str, Any]:
    """The payloads `MlflowClient.test_webhook` sent (MLflow 3.17.2, recorded from a real server)."""
    if kind == "created":
        return {"entity": "model_version", "action": "created", "timestamp": "2026-12-02T05:56:23.057254+00:00",
                "data": {"name": "example_model", "version": "1", "source": "models:/123",
                         "run_id": "abcd1234abcd5678", "tags": {"example_key": "example_value"},
                         "description": "An example model version"}}
    return {"entity": "model_version_alias", "action": "created", "timestamp": "2026-12-02T05:56:24.178232+00:00",
            "data": {"name": "example_model", "alias": "example_alias", "version": "1"}}


@pytest.mark.parametrize("kind", ["created", "alias"])
def test_mlflow_test_delivery_is_a_clear_2xx_and_a_log_line(env, receiver_log, kind: str) -> None:
    r = post(env["client"], "/hooks/mlflow", mlflow_test_delivery(kind), delivery=f"t-{kind}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "test" and "signature verified" in r.json()["detail"]
    assert env["rec"].events == []  # nothing audited
    line = [ln for ln in receiver_log.getvalue().splitlines() if f"t-{kind}" in ln]
    assert len(line) == 1 and "MLflow test delivery" in line[0] and " INFO " in line[0], receiver_log.getvalue()
    # a test delivery with a wrong signature is refused like any other request
    r = post(env["client"], "/hooks/mlflow", mlflow_test_delivery(kind), secret="not-the-secret-0123456789")
    assert r.status_code == 401


def test_a_real_example_model_line_is_audited_not_treated_as_a_test(env) -> None:
    make_ckpt(env["reg"] / "example_model" / "v1", b"e")
    r = post(env["client"], "/hooks/mlflow", mlflow_test_delivery("created"))
    assert r.status_code == 202, r.text
    assert r.json()["checkpoint"] == str((env["reg"] / "example_model" / "v1").resolve())


def test_runs_uri_resolves_through_the_mlflow_artifact_layout(env) -> None:
    """What a real MLflow server sends for `create_model_version(source="runs:/<run>/model")`
    when the registry is its --artifacts-destination."""
    run = "f7a798b502b443268b156f10c74f6cf4"
    ckpt = make_ckpt(env["reg"] / "1" / run / "artifacts" / "model", b"mlflow")
    body = mlflow_created(f"runs:/{run}/model", version="7")
    body["data"]["run_id"] = run
    r = post(env["client"], "/hooks/mlflow", body)
    assert r.status_code == 202, r.text
    p = env["rec"].events[0]["payload"]
    assert p["checkpoint"] == str(ckpt.resolve()) and p["model_line"] == "shapes" and p["version"] == "7"
    # a run the registry does not hold: 422 naming where it looked
    r = post(env["client"], "/hooks/mlflow", mlflow_created("runs:/0123abcd/model", version="8"))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "<experiment>/0123abcd/artifacts/model" in detail and "shapes/{8,v8}" in detail, detail


def test_refusals_log_the_delivery_id_of_the_header(env, receiver_log) -> None:
    body = mlflow_created(f"file://{env['reg'] / 'shapes' / 'v1'}")
    assert post(env["client"], "/hooks/mlflow", body, delivery="bad-sig-1",
                secret="not-the-secret-0123456789").status_code == 401
    assert post(env["client"], "/hooks/mlflow", body, delivery="stale-1", ts=NOW - 3600).status_code == 401
    raw = json.dumps(body).encode()
    weird = "x\ny" * 3
    r = env["client"].post("/hooks/mlflow", content=raw, headers={
        "X-MLflow-Delivery-Id": weird, "X-MLflow-Timestamp": str(int(NOW)), "X-MLflow-Signature": "v1,AAAA"})
    assert r.status_code == 401
    text = receiver_log.getvalue()
    assert "delivery bad-sig-1 (unverified): rejected 401" in text, text
    assert "delivery stale-1 (unverified): rejected 401: timestamp" in text
    assert "delivery 'x\\ny" in text and "delivery ?" not in text  # logged quoted, never raw


def test_accepted_and_ignored_deliveries_are_logged_at_info_with_their_id(env, receiver_log) -> None:
    import logging

    # what the issue measured: with only the default logging (as under Prefect), INFO is dropped
    assert logging.getLogger().getEffectiveLevel() > logging.INFO
    body = mlflow_created(f"file://{env['reg'] / 'shapes' / 'v1'}")
    assert post(env["client"], "/hooks/mlflow", body, delivery="ok-1").status_code == 202
    other = {"entity": "model_version_tag", "action": "set", "timestamp": 0, "data": {"name": "shapes"}}
    assert post(env["client"], "/hooks/mlflow", other, delivery="ign-1").status_code == 200
    lines = receiver_log.getvalue().splitlines()
    [acc] = [ln for ln in lines if "ok-1" in ln]
    [ign] = [ln for ln in lines if "ign-1" in ln]
    assert " INFO " in acc and "accepted shapes/1 at" in acc and str((env["reg"] / "shapes" / "v1").resolve()) in acc
    assert " INFO " in ign and "ignored (model_version_tag.set)" in ign


def test_configure_logging_refuses_an_unknown_level() -> None:
    from diffcam.flows.webhook import configure_logging

    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud")
