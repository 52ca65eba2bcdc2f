"""diffcam as a service: the sweep and checkpoint flows, and their Prefect deployments.

Two flows wrap `diffcam.flows.audit.audit` (called as a subflow, so its run and parameters show in
Prefect as usual):

- `audit_new_checkpoints` (the **sweep**; deployment ``diffcam-sweep`` on a cron schedule):
  lists the registry (`diffcam.flows.registry`), skips every (checkpoint hash, dataset hash,
  settings hash) the store's ledger already holds, audits the rest one after another;
- `audit_checkpoint` (deployment ``diffcam-on-registered``, triggered by the Prefect event
  `EVENT_REGISTERED` that `diffcam.flows.webhook` emits): the event's payload becomes the
  flow's parameters (`TRIGGER_PARAMETERS`); it re-checks that the checkpoint lies inside
  the registry roots, claims it in the ledger, audits it.

After each audit both compare it with the previous audit of the same model line (same
dataset and settings; `diffcam.flows.compare`), write ``<store>/compare/<A>__<B>/compare.{md,json}``,
record the verdict in the ledger and the run row's ``parent_run_id``, and emit
`EVENT_COMPARE_PASSED` or `EVENT_COMPARE_FAILED` (build Prefect automations on the latter,
e.g. a notification). A failed
gate makes the flow run end Failed (``fail_on_regression``), so it is red in the UI.

Deployments are built by `build_deployments` from one typed `OpsConfig` and either
served from this process (`serve_deployments`: one machine, ``diffcam serve``) or
registered on a work pool (`deploy_to_work_pool`: a team's server and workers, ``diffcam
deploy --work-pool``). Entry points are module paths (``diffcam.flows.deploy.audit_checkpoint``),
so a worker needs the ``diffcam`` package installed, not this checkout's working directory.
"""

from __future__ import annotations

import inspect
import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from diffcam.flows.env import set_env_defaults

set_env_defaults()  # before prefect is imported (flows/env.py)

from prefect import flow, get_run_logger, task  # noqa: E402 - after set_env_defaults()
from prefect.cache_policies import NO_CACHE  # noqa: E402 - after set_env_defaults()

from diffcam.core.settings import CamSettings, Settings  # noqa: E402 - after set_env_defaults()
from diffcam.flows.compare import CompareGates  # noqa: E402 - after set_env_defaults()
from diffcam.flows.paths import DEFAULT_STORE  # noqa: E402 - after set_env_defaults()

__all__ = [
    "EVENT_REGISTERED",
    "EVENT_COMPARE_PASSED",
    "EVENT_COMPARE_FAILED",
    "PAYLOAD_FIELDS",
    "TRIGGER_PARAMETERS",
    "PayloadError",
    "RegisteredPayload",
    "validate_payload",
    "OpsConfig",
    "audit_new_checkpoints",
    "audit_checkpoint",
    "build_deployments",
    "serve_deployments",
    "deploy_to_work_pool",
    "describe_deployments",
]

EVENT_REGISTERED = "diffcam.model.registered"
#: Emitted after each automatic comparison, one name per verdict, so that an automation can
#: expect ``diffcam.compare.failed`` (Prefect triggers match event names and resources, not payloads).
EVENT_COMPARE_PASSED = "diffcam.compare.passed"
EVENT_COMPARE_FAILED = "diffcam.compare.failed"
RESOURCE_PREFIX = "diffcam.checkpoint."


class PayloadError(ValueError):
    """An `EVENT_REGISTERED` payload that would not start a correct run."""


class RegisteredPayload(BaseModel):
    """An `EVENT_REGISTERED` payload. Every key must be present (null where unknown): a
    template field missing from the payload makes Prefect's trigger action fail (no run).
    ``settings`` is a `CamSettings` subset (unset fields: the deployment's defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: Annotated[str, Field(min_length=1)]
    model_line: Annotated[str, Field(min_length=1)]
    version: str | None
    dataset: Annotated[str, Field(min_length=1)] | None
    settings: CamSettings | None
    limit: Annotated[int, Field(ge=1, strict=True)] | None
    force: Annotated[bool, Field(strict=True)]
    notification: dict[str, Any]


#: Every key of an `EVENT_REGISTERED` payload (`RegisteredPayload`).
PAYLOAD_FIELDS = tuple(RegisteredPayload.model_fields)
#: The event deployment's trigger parameters: one single-expression template per payload key
#: (Prefect renders those with ``| tojson``, so dicts, ints, booleans and null keep their type).
TRIGGER_PARAMETERS = {k: "{{ event.payload." + k + " }}" for k in PAYLOAD_FIELDS}


def validate_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """Check an `EVENT_REGISTERED` payload before it is emitted (`RegisteredPayload`);
    returns it unchanged.

    Raises `PayloadError` naming every problem: a missing or unknown key, a wrong type, CAM
    settings that `CamSettings` refuses, a limit < 1. Paths are checked by the caller (the
    receiver knows the roots) and again by `audit_checkpoint`."""
    if not isinstance(payload, dict):
        raise PayloadError(f"payload must be an object, got {type(payload).__name__}")
    try:
        RegisteredPayload.model_validate(payload)
    except ValidationError as e:
        errors = e.errors()
        missing = [err["loc"][0] for err in errors if err["type"] == "missing"]
        unknown = sorted(str(err["loc"][0]) for err in errors if err["type"] == "extra_forbidden")
        problems = ([f"missing key(s) {missing}"] if missing else []) + (
            [f"unknown key(s) {unknown}"] if unknown else [])
        problems += [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}, got {err['input']!r}"
                     for err in errors if err["type"] not in ("missing", "extra_forbidden")]
        raise PayloadError("; ".join(problems)) from None
    return payload


# --------------------------------------------------------------------------- config


class OpsConfig(Settings):
    """Everything the two deployments need; ``diffcam deploy/serve --config ops.toml``
    reads it from the ``[ops]`` table (with ``[ops.settings]`` = CamSettings and
    ``[ops.gates]`` = `diffcam.flows.compare.CompareGates`)."""

    registry: str  #: registry source URI or folder (diffcam.flows.registry.open_source)
    store: str = str(DEFAULT_STORE)
    dataset: str | None = None  #: None: the built-in synthetic dataset of the store
    settings: CamSettings | None = None  #: the fields set are the deployments' settings; None = defaults
    limit: int | None = Field(None, ge=1)
    cron: str = "0 2 * * *"  #: nightly sweep
    timezone: str = "UTC"
    extra_registry_roots: tuple[str, ...] = ()  #: more folders event payloads may point into
    audit_options: dict[str, Any] = Field(default_factory=dict)  #: workers, gpus_per_worker, ray_address, ...
    settle_s: float = 60.0
    stale_after_s: float = 12 * 3600.0
    compare: bool = True
    fail_on_regression: bool = True
    gates: CompareGates | None = None  #: None: the default gates
    sweep_name: str = "diffcam-sweep"
    event_name: str = "diffcam-on-registered"
    tags: tuple[str, ...] = ("diffcam",)
    concurrency_limit: int | None = 1  #: audits per deployment at a time (more are queued)
    work_pool: str | None = None
    job_variables: dict[str, Any] | None = None

    # Deployment runs start in another working directory: keep absolute paths.
    @field_validator("registry")
    @classmethod
    def _absolute_registry(cls, v: str) -> str:
        return v if "://" in v else str(Path(v).expanduser().absolute())

    @field_validator("store", "dataset")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        return None if v is None else str(Path(v).expanduser().absolute())

    @field_validator("audit_options")
    @classmethod
    def _audit_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_audit_options(v)
        return v

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Any) -> OpsConfig:
        data = tomllib.loads(Path(path).read_text())
        ops = dict(data.get("ops", data))
        ops.update({k: v for k, v in overrides.items() if v is not None})
        if "registry" not in ops:
            raise ValueError(f"{path}: [ops] needs registry = \"<folder>\" (or pass --registry)")
        try:
            return cls.model_validate(ops)
        except ValidationError as e:
            raise ValueError(f"{path}: {e}") from None

    def with_(self, **kw: Any) -> OpsConfig:
        """A validated copy with the values of ``kw`` that are not None (CLI flags left unset)."""
        return super().with_(**{k: v for k, v in kw.items() if v is not None})

    def registry_roots(self) -> list[str]:
        from diffcam.flows.registry import open_source

        roots = [str(r) for r in open_source(self.registry).roots]
        return roots + [str(Path(r).expanduser().resolve()) for r in self.extra_registry_roots]

    def defaults(self) -> dict[str, Any]:
        """Deployment-level values a notification leaves null (JSON, as Prefect parameters)."""
        return {"dataset": self.dataset, "settings": _settings_json(self.settings), "limit": self.limit}


def _settings_json(settings: CamSettings | None) -> dict[str, Any] | None:
    """The fields the operator set, as JSON: a deployment parameter shows what was chosen."""
    return None if settings is None else settings.model_dump(mode="json", exclude_unset=True)


_AUDIT_CORE = {"model", "dataset", "store", "run_id", "limit", "settings", "trigger"}


def _check_audit_options(options: dict[str, Any] | None) -> None:
    from diffcam.flows.audit import audit

    allowed = set(inspect.signature(getattr(audit, "fn", audit)).parameters) - _AUDIT_CORE
    unknown = set(options or {}) - allowed
    if unknown:
        raise ValueError(f"audit option(s) {sorted(unknown)} are not parameters of diffcam.flows.audit.audit; "
                         f"allowed: {sorted(allowed)}")


# ---------------------------------------------------------------------------- flows


@task(name="compare-with-previous", cache_policy=NO_CACHE)
def compare_task(store: str, run_a: str, run_b: str, gates: CompareGates | None) -> dict[str, Any]:
    """`diffcam.flows.compare.compare_runs` + `write_comparison` into ``<store>/compare/<A>__<B>/``."""
    from diffcam.flows.compare import compare_runs, default_out_dir, write_comparison

    cmp = compare_runs(store, run_a, run_b, gates)
    md, js = write_comparison(cmp, default_out_dir(store, run_a, run_b))
    failed = [g.name for g in cmp.gate_results if not g.passed]
    return {"passed": cmp.passed, "failed_gates": failed, "markdown": str(md), "json": str(js),
            "new_flags": len(cmp.flags["new"]), "resolved_flags": len(cmp.flags["resolved"])}


def _who() -> str:
    from prefect.runtime import flow_run

    rid = flow_run.id
    return f"prefect:{rid}" if rid else f"{socket.gethostname()}:{os.getpid()}"


def _resolve_dataset(store: str, dataset: str | None) -> tuple[str, str]:
    """(dataset path, content hash) — the same dataset `diffcam.flows.audit.audit` would load."""
    from diffcam.flows.audit import default_dataset
    from diffcam.storage.datasets import load_dataset

    path = Path(dataset) if dataset else default_dataset(store)
    ds = load_dataset(path)
    return str(path), ds.content_hash


def _audit_one(*, checkpoint: Path, model_line: str, name: str, content_hash: str, store: str, dataset: str,
               dataset_hash: str, settings: CamSettings | None, limit: int | None, trigger: str, force: bool,
               source: dict[str, Any], audit_options: dict[str, Any], compare: bool, gates: CompareGates | None,
               stale_after_s: float) -> dict[str, Any]:
    """Claim → audit (subflow) → compare with the previous audit of the line. Inside a flow."""
    from diffcam.flows.audit import audit
    from diffcam.flows.ledger import AuditLedger, AuditRecord, new_audit_run_id, settings_key
    from diffcam.storage.catalog import write_catalog_file
    from diffcam.storage.store import Store

    logger = get_run_logger()
    s_hash, s_json = settings_key(settings, limit)
    ledger = AuditLedger(store, stale_after_s=stale_after_s)
    candidate = AuditRecord(
        run_id=new_audit_run_id(model_line, name), model_line=model_line, checkpoint=str(checkpoint),
        model_hash=content_hash, dataset=dataset, dataset_hash=dataset_hash, settings_hash=s_hash,
        settings_json=s_json, trigger=trigger, claimed_by=_who(), source=source,
    )
    claim = ledger.claim(candidate, force=force)
    out = {"checkpoint": str(checkpoint), "model_line": model_line, "name": name, "model_hash": content_hash,
           "action": claim.action, "run_id": claim.run_id, "reason": claim.reason}
    logger.info("%s/%s (%s…): %s — %s", model_line, name, content_hash[:12], claim.action, claim.reason)
    if claim.action == "skip":
        return out
    try:
        summary = audit(
            model=str(checkpoint), dataset=dataset, store=store, run_id=claim.run_id, limit=limit,
            settings=settings, trigger=trigger,
            **audit_options,
        )
    except BaseException:
        if ledger.release(claim.run_id):  # bad input caught before the run row: free the claim
            logger.warning("released the claim of %s: the audit did not start", claim.run_id)
        raise
    out["status"] = summary["status"]
    out["report_html"] = summary.get("report_html")
    if not compare:
        return out
    rec = ledger.get(claim.run_id)
    prev = ledger.previous(rec)
    if prev is None:
        ledger.update(claim.run_id, compare_verdict="none")
        out["compare"] = None
        logger.info("no earlier audit of model line %r with this dataset and settings: nothing to compare", model_line)
        return out
    res = compare_task(store, prev.run_id, claim.run_id, gates)
    ledger.update(claim.run_id, previous_run_id=prev.run_id, compare_verdict="pass" if res["passed"] else "fail",
                  compare_dir=str(Path(res["markdown"]).parent))
    Store(store).update_run(claim.run_id, parent_run_id=prev.run_id)
    write_catalog_file(store)  # the parent link shows in catalog.duckdb too
    out["compare"] = {"run_a": prev.run_id, **res}
    _emit_compared(model_line, prev.run_id, claim.run_id, res)
    (logger.info if res["passed"] else logger.warning)(
        "compare %s → %s: %s%s (%s)", prev.run_id, claim.run_id, "pass" if res["passed"] else "FAIL",
        f" — failed gates: {', '.join(res['failed_gates'])}" if res["failed_gates"] else "", res["markdown"])
    return out


def _emit_compared(model_line: str, run_a: str, run_b: str, res: dict[str, Any]) -> None:
    from prefect.events import emit_event

    emit_event(
        EVENT_COMPARE_PASSED if res["passed"] else EVENT_COMPARE_FAILED,
        resource={"prefect.resource.id": f"diffcam.model-line.{model_line}", "prefect.resource.name": model_line},
        related=[{"prefect.resource.id": f"diffcam.run.{r}", "prefect.resource.role": role}
                 for r, role in ((run_a, "baseline"), (run_b, "candidate"))],
        payload={"verdict": "pass" if res["passed"] else "fail", "run_a": run_a, "run_b": run_b, **res},
    )


def _final(result: dict[str, Any], problems: list[str]) -> Any:
    """The result, or a Failed state carrying it (the flow run ends Failed, red in the UI)."""
    from prefect.states import Failed

    if problems:
        return Failed(message="; ".join(problems)[:2000], data=result)
    return result


def _regressions(results: list[dict[str, Any]]) -> list[str]:
    return [f"{r['run_id']}: gate(s) failed vs {r['compare']['run_a']}: {', '.join(r['compare']['failed_gates'])}"
            for r in results if r.get("compare") and not r["compare"]["passed"]]


@flow(name="diffcam-sweep")
def audit_new_checkpoints(
    registry: str,
    store: str = str(DEFAULT_STORE),
    dataset: str | None = None,
    settings: CamSettings | None = None,
    limit: int | None = None,
    force: bool = False,
    settle_s: float = 60.0,
    stale_after_s: float = 12 * 3600.0,
    max_audits: int | None = None,
    audit_options: dict[str, Any] | None = None,
    compare: bool = True,
    gates: CompareGates | None = None,
    fail_on_regression: bool = True,
) -> dict[str, Any]:
    """Audit every checkpoint of ``registry`` not yet audited with this dataset and settings.

    Checkpoints younger than ``settle_s`` wait for the next sweep (may still be copying).
    ``max_audits`` caps the audits of one sweep (the rest wait). One failing checkpoint does
    not stop the others; the flow ends Failed if any audit failed or (with
    ``fail_on_regression``) any comparison failed its gates."""
    from diffcam.flows.registry import HashCache, open_source

    logger = get_run_logger()
    audit_options = dict(audit_options or {})
    _check_audit_options(audit_options)
    src = open_source(registry, hash_cache=HashCache(Path(store) / "ops" / "hash-cache.json"))
    ds_path, ds_hash = _resolve_dataset(store, dataset)
    ckpts = src.list_checkpoints(settle_s=settle_s)
    logger.info("registry %s: %d ready checkpoint(s); dataset %s (%s…)", src.uri, len(ckpts), ds_path, ds_hash[:12])
    results: list[dict[str, Any]] = []
    problems: list[str] = []
    n_audits = 0
    for c in ckpts:
        if max_audits is not None and n_audits >= max_audits:
            results.append({"checkpoint": str(c.path), "model_line": c.line, "name": c.name, "action": "deferred",
                            "reason": f"max_audits={max_audits} reached"})
            continue
        try:
            r = _audit_one(checkpoint=c.path, model_line=c.line, name=c.name, content_hash=c.content_hash,
                           store=store, dataset=ds_path, dataset_hash=ds_hash, settings=settings, limit=limit,
                           trigger="schedule", force=force, source={"registry": src.uri}, audit_options=audit_options,
                           compare=compare, gates=gates, stale_after_s=stale_after_s)
        except Exception as e:  # noqa: BLE001 - recorded; the other checkpoints still run
            logger.error("%s/%s: audit failed: %s: %s", c.line, c.name, type(e).__name__, e)
            r = {"checkpoint": str(c.path), "model_line": c.line, "name": c.name, "action": "failed",
                 "reason": f"{type(e).__name__}: {e}"[:2000]}
            problems.append(f"{c.line}/{c.name}: {r['reason']}")
        n_audits += r["action"] in ("audit", "resume", "failed")
        results.append(r)
    counts = {a: sum(r["action"] == a for r in results) for a in ("audit", "resume", "skip", "deferred", "failed")}
    logger.info("sweep done: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    if fail_on_regression:
        problems += _regressions(results)
    return _final({"registry": src.uri, "dataset": ds_path, "counts": counts, "checkpoints": results}, problems)


@flow(name="diffcam-audit-checkpoint")
def audit_checkpoint(
    checkpoint: str,
    registry_roots: list[str],
    store: str = str(DEFAULT_STORE),
    model_line: str | None = None,
    version: str | None = None,
    dataset: str | None = None,
    settings: CamSettings | None = None,
    limit: int | None = None,
    force: bool = False,
    notification: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    stale_after_s: float = 12 * 3600.0,
    audit_options: dict[str, Any] | None = None,
    compare: bool = True,
    gates: CompareGates | None = None,
    fail_on_regression: bool = True,
    trigger: str = "event",
) -> dict[str, Any]:
    """Audit one checkpoint named by a registry notification (the event deployment).

    ``checkpoint`` must resolve (symlinks followed) inside ``registry_roots`` and be a
    checkpoint folder. ``dataset`` / ``settings`` / ``limit`` null: ``defaults`` (the
    deployment's). Skipped when already audited with the same dataset and settings,
    unless ``force``."""
    from diffcam.flows.registry import HashCache, contained_path, is_checkpoint_dir

    logger = get_run_logger()
    audit_options = dict(audit_options or {})
    _check_audit_options(audit_options)
    defaults = defaults or {}
    path = contained_path(checkpoint, registry_roots)  # PathNotAllowed (a ValueError): the run fails, nothing ran
    if not is_checkpoint_dir(path):
        raise ValueError(f"{path}: not a checkpoint folder (needs config.json and *.safetensors)")
    ds = dataset if dataset is not None else defaults.get("dataset")
    cam = settings if settings is not None else defaults.get("settings")
    cam = None if cam is None else CamSettings.model_validate(cam)  # the defaults arrive as JSON
    lim = limit if limit is not None else defaults.get("limit")
    ds_path, ds_hash = _resolve_dataset(store, ds)
    content_hash = HashCache(Path(store) / "ops" / "hash-cache.json").content_hash(path)
    line = model_line or path.parent.name
    logger.info("notification %s: %s/%s at %s", (notification or {}).get("delivery_id"), line, version or path.name,
                path)
    # The folder name (not the registry's version number) names the run, as in the sweep.
    r = _audit_one(checkpoint=path, model_line=line, name=path.name, content_hash=content_hash,
                   store=store, dataset=ds_path, dataset_hash=ds_hash, settings=cam, limit=lim, trigger=trigger,
                   force=force, source={"notification": notification or {}, "version": version},
                   audit_options=audit_options, compare=compare, gates=gates, stale_after_s=stale_after_s)
    return _final(r, _regressions([r]) if fail_on_regression else [])


# ----------------------------------------------------------------------- deployments


def build_deployments(cfg: OpsConfig) -> list[Any]:
    """The sweep (cron) and the event-triggered deployment, as `RunnerDeployment`s."""
    from prefect.events import DeploymentEventTrigger
    from prefect.types.entrypoint import EntrypointType

    common = {
        "store": cfg.store, "stale_after_s": cfg.stale_after_s, "audit_options": dict(cfg.audit_options),
        "compare": cfg.compare, "fail_on_regression": cfg.fail_on_regression,
        "gates": None if cfg.gates is None else cfg.gates.model_dump(mode="json", exclude_unset=True),
    }
    kw: dict[str, Any] = {"tags": list(cfg.tags), "entrypoint_type": EntrypointType.MODULE_PATH,
                          "concurrency_limit": cfg.concurrency_limit}
    if cfg.work_pool:
        kw["work_pool_name"] = cfg.work_pool
        if cfg.job_variables:
            kw["job_variables"] = cfg.job_variables
    from prefect.schedules import Cron

    sweep = audit_new_checkpoints.to_deployment(
        name=cfg.sweep_name,
        schedule=Cron(cfg.cron, timezone=cfg.timezone),
        parameters={"registry": cfg.registry, "dataset": cfg.dataset, "settings": _settings_json(cfg.settings),
                    "limit": cfg.limit,
                    "settle_s": cfg.settle_s, **common},
        description=f"Nightly: audit checkpoints of {cfg.registry} not yet audited with these settings.",
        **kw,
    )
    on_event = audit_checkpoint.to_deployment(
        name=cfg.event_name,
        triggers=[DeploymentEventTrigger(
            name=f"{cfg.event_name}-trigger",
            expect={EVENT_REGISTERED},
            match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
            parameters=dict(TRIGGER_PARAMETERS),
        )],
        parameters={"registry_roots": cfg.registry_roots(), "defaults": cfg.defaults(), **common},
        description=f"On {EVENT_REGISTERED}: audit the announced checkpoint (payload → parameters).",
        **kw,
    )
    return [sweep, on_event]


def describe_deployments(cfg: OpsConfig) -> list[dict[str, Any]]:
    """What `build_deployments` creates, as plain data (``diffcam deploy --dry-run``)."""
    out = []
    for d in build_deployments(cfg):
        out.append({
            "name": f"{d.flow_name}/{d.name}", "entrypoint": d.entrypoint,
            "schedules": [s.schedule.model_dump(mode="json") for s in (d.schedules or [])],
            "triggers": [t.model_dump(mode="json", exclude_none=True) for t in (d.triggers or [])],
            "parameters": d.parameters, "work_pool": d.work_pool_name, "tags": d.tags,
            "concurrency_limit": cfg.concurrency_limit,
        })
    return out


def serve_deployments(cfg: OpsConfig, *, limit: int | None = None) -> None:
    """Create/update both deployments on the configured Prefect server and run their flow
    runs from this process until interrupted (SIGTERM/Ctrl-C pauses their schedules)."""
    from prefect import serve

    serve(*build_deployments(cfg.with_(work_pool=None)), limit=limit)


def deploy_to_work_pool(cfg: OpsConfig, *, image: str | None = None) -> list[Any]:
    """Register both deployments on ``cfg.work_pool`` (workers run them); returns their ids.
    ``image``: a pre-built image with diffcam installed, for Docker/Kubernetes pools."""
    import prefect

    if not cfg.work_pool:
        raise ValueError("deploying needs a work pool (--work-pool); on one machine use `diffcam serve`")
    return prefect.deploy(*build_deployments(cfg), work_pool_name=cfg.work_pool, image=image, build=False,
                          push=False, print_next_steps_message=False, ignore_warnings=True)
