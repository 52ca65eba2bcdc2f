"""Model-registry webhook receiver: a signed notification in, a Prefect event out.

``create_app(settings)`` returns a FastAPI app with two endpoints:

- ``POST /hooks/mlflow`` — MLflow model-registry webhooks (``model_version.created``,
  ``model_version_alias.created``; other MLflow events are answered 200 "ignored"; MLflow's
  own test delivery, model ``example_model``, is answered 200 "test" once its signature is
  verified, unless the registry really has an ``example_model`` line). A version whose
  ``source`` is not a local path is mapped to a folder by the registry
  (`diffcam.flows.registry.FolderRegistry.resolve_source`: ``runs:/``, ``models:/``,
  ``mlflow-artifacts:/`` URIs, then ``<registry>/<name>/[v]<version>``). Headers
  ``X-MLflow-Delivery-Id``, ``X-MLflow-Timestamp`` (unix seconds) and ``X-MLflow-Signature:
  v1,<base64 HMAC-SHA256(secret, "{delivery_id}.{timestamp}.{raw body}")>``.
- ``POST /hooks/registry`` — a plain JSON form (``{"checkpoint": "<folder>", "model_line":
  …, "version": …, "dataset": …, "settings": {…}, "limit": N, "force": false}``, only
  ``checkpoint`` required) signed the same way with ``X-Diffcam-Delivery-Id``,
  ``X-Diffcam-Timestamp`` and ``X-Diffcam-Signature``.
- ``GET /healthz``.

Every request is checked, in this order, and refused with a clear message:

=====  ====================================================================
413    body larger than ``max_body_bytes`` (checked while reading)
401    a signature header missing, or no ``v1`` signature that matches (constant-time compare)
400    a malformed delivery id or timestamp
401    timestamp further than ``tolerance_s`` from the receiver's clock (stale or future)
409    delivery id already accepted (replay); the cache lives in the store
       (``<store>/ops/webhook-deliveries/``) so a restart does not re-open the window
400    body that is not a JSON object
403    checkpoint (or dataset) that resolves — symlinks followed — outside the configured roots
422    anything else that would not make a correct run (unknown model version, not a
       checkpoint folder, bad settings, unknown keys)
503    the Prefect API is unreachable (the delivery id is released, so the sender may retry)
=====  ====================================================================

Every answer is logged with the delivery id (a refused request's id is the header's, marked
"unverified"); `configure_logging` makes those lines visible whatever the root logger's level.
Only an accepted (or ignored) delivery stays in the replay cache; a refused one is released,
so its retry gets the same answer. Accepted → 202 with the event id. The receiver never runs an audit: it emits
`diffcam.flows.deploy.EVENT_REGISTERED` with a payload validated by `diffcam.flows.deploy.validate_payload`,
and the event deployment does the rest. The HMAC secret is read from the environment
(``DIFFCAM_WEBHOOK_SECRET`` by default) when the app is created and is never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from diffcam.core.settings import Settings

__all__ = [
    "WebhookSettings",
    "ReplayCache",
    "create_app",
    "sign",
    "signature_header",
    "MIN_SECRET_LEN",
    "MLFLOW_TEST_MODEL",
    "configure_logging",
]

log = logging.getLogger("diffcam.webhook")

MIN_SECRET_LEN = 16
#: The model name of MLflow's own test delivery (`MlflowClient.test_webhook`'s example payload).
MLFLOW_TEST_MODEL = "example_model"
_DELIVERY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_EVENT_NS = uuid.UUID("6f1c1f5e-9a39-4b0e-8a55-6c1b8a3f2d10")  # uuid5 namespace: delivery id → event id
_PLAIN_KEYS = {"checkpoint", "model_line", "version", "dataset", "settings", "limit", "force"}

Emitter = Callable[..., str]


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """base64 HMAC-SHA256 of ``"{delivery_id}.{timestamp}.{body}"`` (MLflow's scheme)."""
    msg = f"{delivery_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(secret.encode(), msg, hashlib.sha256).digest()).decode()


def signature_header(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    return f"v1,{sign(secret, delivery_id, timestamp, body)}"


class WebhookSettings(Settings):
    """Receiver configuration (the secret itself is read from ``secret_env``)."""

    registry: str  #: registry source (diffcam.flows.registry.open_source): its roots + version lookup
    store: str  #: where the replay cache lives (``<store>/ops/webhook-deliveries``)
    extra_registry_roots: tuple[str, ...] = ()
    #: folders a plain-form ``dataset`` may point into; empty: notifications cannot pick a dataset
    dataset_roots: tuple[str, ...] = ()
    secret_env: str = "DIFFCAM_WEBHOOK_SECRET"
    tolerance_s: int = Field(300, ge=1)
    max_body_bytes: int = Field(64 * 1024, ge=256)
    #: MLflow aliases that trigger an audit (empty: every alias)
    aliases: tuple[str, ...] = ()
    mlflow_events: tuple[str, ...] = ("model_version.created", "model_version_alias.created")
    extra: dict[str, Any] = Field(default_factory=dict)


class ReplayCache:
    """Delivery ids seen in the last ``ttl_s`` seconds, one file each (created with
    ``O_EXCL``: two receivers sharing a store cannot both accept one delivery).

    A replayed request carries its original timestamp, so it can pass the freshness
    check for at most 2 × tolerance after the original was accepted: ``ttl_s`` must be
    at least that (`create_app` uses 2 × tolerance + 60 s)."""

    def __init__(self, folder: Path, ttl_s: float) -> None:
        self.folder = folder
        self.ttl_s = ttl_s

    def _path(self, delivery_id: str) -> Path:
        return self.folder / hashlib.sha256(delivery_id.encode()).hexdigest()

    def claim(self, delivery_id: str, now: float) -> bool:
        """True if the id was not seen (and is now recorded); False for a replay."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prune(now)
        try:
            fd = os.open(self._path(delivery_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"delivery_id": delivery_id, "seen_at": now}))
        os.utime(self._path(delivery_id), (now, now))
        return True

    def release(self, delivery_id: str) -> None:
        self._path(delivery_id).unlink(missing_ok=True)

    def prune(self, now: float) -> int:
        n = 0
        if not self.folder.is_dir():
            return 0
        for p in self.folder.iterdir():
            try:
                if now - p.stat().st_mtime > self.ttl_s:
                    p.unlink(missing_ok=True)
                    n += 1
            except FileNotFoundError:
                continue
        return n


def prefect_emitter(event: str, resource: dict[str, str], related: list[dict[str, str]], payload: dict[str, Any],
                    id: uuid.UUID) -> str:  # noqa: A002 - mirrors emit_event
    """Emit through `prefect.events.emit_event` after checking that the Prefect API answers
    (emit_event hands the event to a background sender and never reports a failure)."""
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConnectionError("PREFECT_API_URL is not set: no Prefect server to send events to")
    with get_client(sync_client=True) as client:  # the configured server or Cloud, with its auth
        problem = client.api_healthcheck()
    if problem is not None:
        raise ConnectionError(f"Prefect API unhealthy: {type(problem).__name__}: {problem}")
    ev = emit_event(event, resource=resource, related=related, payload=payload, id=id)
    if ev is None:
        raise ConnectionError("Prefect did not accept the event (events are disabled in this environment)")
    return str(ev.id)


class _TestDelivery(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _unverified_id(raw: str | None) -> str:
    """The delivery-id header of a request that was not (yet) authenticated, made safe to log."""
    if not raw:
        return "(no delivery id header)"
    safe = raw[:128] if _DELIVERY_RE.match(raw[:128]) else repr(raw[:64])
    return f"{safe} (unverified)"


def configure_logging(level: int | str = logging.INFO, stream: Any = None) -> logging.Logger:
    """Send the receiver's log to ``stream`` (stderr) at ``level``, whatever the root logger's
    level: the root stays at WARNING (Python's default, which Prefect's logging set-up keeps),
    which would hide the accept/ignore lines. Idempotent; returns the logger."""
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    log.setLevel(lvl)
    for h in [h for h in log.handlers if getattr(h, "_diffcam_webhook", False)]:
        log.removeHandler(h)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s diffcam.webhook: %(message)s"))
    handler._diffcam_webhook = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.propagate = False
    return log


class _Reject(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def create_app(settings: WebhookSettings, *, emit: Emitter | None = None, clock: Callable[[], float] = time.time,
               environ: dict[str, str] | None = None) -> Any:
    """The FastAPI app (module doc). ``emit`` defaults to `prefect_emitter`; ``clock`` and
    ``environ`` are for tests. Raises ValueError when the secret is missing or shorter than
    `MIN_SECRET_LEN` characters, or the registry does not exist."""
    from diffcam.flows.deploy import EVENT_REGISTERED, RESOURCE_PREFIX, PayloadError, validate_payload
    from diffcam.flows.registry import PathNotAllowed, contained_path, is_checkpoint_dir, open_source

    env = os.environ if environ is None else environ
    secret = env.get(settings.secret_env, "")
    if len(secret) < MIN_SECRET_LEN:
        raise ValueError(f"set ${settings.secret_env} to the webhook secret (at least {MIN_SECRET_LEN} characters; "
                         "the same secret as the registry's webhook)")
    source = open_source(settings.registry)
    roots = [str(r) for r in source.roots] + [str(Path(r).expanduser()) for r in settings.extra_registry_roots]
    replay = ReplayCache(Path(settings.store).absolute() / "ops" / "webhook-deliveries", 2 * settings.tolerance_s + 60)
    emit = emit or prefect_emitter
    app = FastAPI(title="diffcam registry webhook", docs_url=None, redoc_url=None, openapi_url=None)

    async def read_body(request: Request) -> bytes:
        cl = request.headers.get("content-length")
        if cl is not None and (not cl.isdigit() or int(cl) > settings.max_body_bytes):
            raise _Reject(413, f"body larger than {settings.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise _Reject(413, f"body larger than {settings.max_body_bytes} bytes")
        return bytes(body)

    def authenticate(request: Request, body: bytes, prefix: str) -> str:
        names = [f"{prefix}-Signature", f"{prefix}-Delivery-Id", f"{prefix}-Timestamp"]
        sig_h, delivery, ts = (request.headers.get(n) for n in names)
        missing = [n for n, v in zip(names, (sig_h, delivery, ts)) if not v]
        if missing:
            raise _Reject(401, f"missing header(s): {', '.join(missing)}")
        expected = sign(secret, delivery, ts, body).encode()
        given = [p.split(",", 1)[1] for p in sig_h.split() if p.startswith("v1,")]
        if not any(hmac.compare_digest(expected, g.encode()) for g in given):
            raise _Reject(401, f"invalid signature ({prefix}-Signature must be v1,<base64 HMAC-SHA256 of "
                               "'<delivery id>.<timestamp>.<body>'>)")
        if not _DELIVERY_RE.match(delivery):
            raise _Reject(400, f"{prefix}-Delivery-Id must match {_DELIVERY_RE.pattern}")
        if not ts.isdigit():
            raise _Reject(400, f"{prefix}-Timestamp must be unix seconds, got {ts[:32]!r}")
        now = clock()
        skew = now - int(ts)
        if abs(skew) > settings.tolerance_s:
            raise _Reject(401, f"timestamp {ts} is {skew:+.0f} s from the receiver's clock "
                               f"(tolerance {settings.tolerance_s} s): stale or replayed request")
        if not replay.claim(delivery, now):
            raise _Reject(409, f"delivery {delivery} was already accepted (replay)")
        return delivery

    def checkpoint_path(raw: str) -> Path:
        try:
            path = contained_path(raw, roots)
        except PathNotAllowed as e:
            raise _Reject(403, f"checkpoint {raw!r} is not inside the registry roots") from e
        if not is_checkpoint_dir(path):
            raise _Reject(422, f"checkpoint {raw!r} is not a checkpoint folder (config.json + *.safetensors)")
        return path

    def dataset_path(raw: Any) -> str | None:
        if raw is None:
            return None
        if not isinstance(raw, str):
            raise _Reject(422, "dataset must be a string path or null")
        try:
            return str(contained_path(raw, list(settings.dataset_roots)))
        except PathNotAllowed as e:
            raise _Reject(403, f"dataset {raw!r} is not inside the configured dataset roots") from e

    def line_of(path: Path, given: Any) -> str:
        if isinstance(given, str) and given:
            return given
        line_fn = getattr(source, "line_of", None)
        try:
            return line_fn(path) if line_fn else path.parent.name
        except ValueError:  # inside an extra root
            return path.parent.name

    def from_mlflow(body: dict[str, Any], delivery: str) -> dict[str, Any] | None:
        entity, action = body.get("entity"), body.get("action")
        kind = f"{entity}.{action}"
        data = body.get("data")
        if kind not in settings.mlflow_events:
            return None
        if not isinstance(data, dict):
            raise _Reject(422, "MLflow payload has no 'data' object")
        name, version = data.get("name"), data.get("version")
        if not isinstance(name, str) or not name or version is None:
            raise _Reject(422, "MLflow payload needs data.name and data.version")
        if is_test_delivery(name):
            raise _TestDelivery(kind)
        version = str(version)
        if kind == "model_version_alias.created":
            alias = data.get("alias")
            if settings.aliases and alias not in settings.aliases:
                return None
        src = data.get("source") if kind == "model_version.created" else None
        if isinstance(src, str) and (src.startswith("file:") or src.startswith("/")):
            path = checkpoint_path(src)
        else:
            resolve_source = getattr(source, "resolve_source", None)
            try:
                found = (resolve_source(src if isinstance(src, str) else None, name, version) if resolve_source
                         else source.resolve(name, version))
                path = checkpoint_path(str(found))
            except LookupError as e:
                raise _Reject(422, f"cannot map {name} version {version} (source {src!r}) to a local "
                                   f"checkpoint: {e}") from None
            except PathNotAllowed as e:
                raise _Reject(403, f"{name} version {version} resolves outside the registry roots") from e
        note = {"kind": f"mlflow:{kind}", "delivery_id": delivery, "name": name, "version": version}
        for k in ("alias", "run_id"):
            if isinstance(data.get(k), str):
                note[k] = data[k]
        return {"checkpoint": str(path), "model_line": name, "version": version, "dataset": None, "settings": None,
                "limit": None, "force": False, "notification": note}

    def from_plain(body: dict[str, Any], delivery: str) -> dict[str, Any]:
        unknown = sorted(set(body) - _PLAIN_KEYS)
        if unknown:
            raise _Reject(422, f"unknown key(s) {unknown}; allowed: {sorted(_PLAIN_KEYS)}")
        if not isinstance(body.get("checkpoint"), str) or not body["checkpoint"]:
            raise _Reject(422, "'checkpoint' (a folder path inside the registry) is required")
        path = checkpoint_path(body["checkpoint"])
        version = body.get("version")
        return {"checkpoint": str(path), "model_line": line_of(path, body.get("model_line")),
                "version": None if version is None else str(version), "dataset": dataset_path(body.get("dataset")),
                "settings": body.get("settings"), "limit": body.get("limit"), "force": body.get("force", False),
                "notification": {"kind": "plain", "delivery_id": delivery}}

    def is_test_delivery(name: str) -> bool:
        # MLflow's `test_webhook` posts its documented example payload, whose model is
        # "example_model"; a registry that really has such a model line gets it audited.
        if name != MLFLOW_TEST_MODEL:
            return False
        return not any((Path(r) / name).is_dir() for r in roots)

    async def handle(request: Request, prefix: str, parse: Callable[[dict[str, Any], str], dict[str, Any] | None]):
        delivery = None
        try:
            body = await read_body(request)
            delivery = authenticate(request, body, prefix)
            try:
                doc = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _Reject(400, f"body is not JSON: {e}") from None
            if not isinstance(doc, dict):
                raise _Reject(400, "body must be a JSON object")
            try:
                payload = parse(doc, delivery)
            except _TestDelivery as t:
                log.info("delivery %s: MLflow test delivery (%s for model %r): signature verified, "
                         "nothing audited", delivery, t.kind, MLFLOW_TEST_MODEL)
                return JSONResponse({"status": "test", "delivery_id": delivery,
                                     "detail": f"MLflow test delivery ({t.kind}, model {MLFLOW_TEST_MODEL!r}) "
                                               "received and its signature verified; nothing is audited"},
                                    status_code=200)
            if payload is None:
                log.info("delivery %s: ignored (%s.%s)", delivery, doc.get("entity"), doc.get("action"))
                return JSONResponse({"status": "ignored", "delivery_id": delivery}, status_code=200)
            try:
                validate_payload(payload)
            except PayloadError as e:
                raise _Reject(422, str(e)) from None
            name = payload["version"] or Path(payload["checkpoint"]).name
            resource = {"prefect.resource.id": f"{RESOURCE_PREFIX}{payload['model_line']}.{name}",
                        "prefect.resource.name": f"{payload['model_line']}/{name}"}
            related = [{"prefect.resource.id": f"diffcam.delivery.{delivery}", "prefect.resource.role": "notification"}]
            event_id = uuid.uuid5(_EVENT_NS, f"{prefix}:{delivery}")
            try:
                emitted = emit(EVENT_REGISTERED, resource=resource, related=related, payload=payload, id=event_id)
            except Exception as e:  # noqa: BLE001 - answered 503; the sender retries
                replay.release(delivery)
                log.error("delivery %s: could not emit the event: %s: %s", delivery, type(e).__name__, e)
                raise _Reject(503, f"could not hand the event to Prefect ({type(e).__name__}); retry later") from None
            log.info("delivery %s: accepted %s/%s at %s → event %s", delivery, payload["model_line"],
                     payload["version"] or Path(payload["checkpoint"]).name, payload["checkpoint"], emitted)
            return JSONResponse({"status": "accepted", "event": EVENT_REGISTERED, "event_id": emitted,
                                 "delivery_id": delivery, "checkpoint": payload["checkpoint"],
                                 "model_line": payload["model_line"]}, status_code=202)
        except _Reject as r:
            if delivery is not None and r.status != 503:
                # Only an emitted (or deliberately ignored) delivery stays in the replay cache:
                # a retry of a refused one gets the same answer, not "replay".
                replay.release(delivery)
            shown = delivery or _unverified_id(request.headers.get(f"{prefix}-Delivery-Id"))
            log.warning("delivery %s: rejected %d: %s", shown, r.status, r.detail)
            return JSONResponse({"status": "rejected", "detail": r.detail}, status_code=r.status)

    @app.post("/hooks/mlflow")
    async def mlflow_hook(request: Request):
        return await handle(request, "X-MLflow", from_mlflow)

    @app.post("/hooks/registry")
    async def plain_hook(request: Request):
        return await handle(request, "X-Diffcam", from_plain)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return app
