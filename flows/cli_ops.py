"""`diffcam compare | sweep | deploy | serve | webhook`: diffcam in an MLOps loop.

`register(app)` adds them to the Typer app of `flows/cli.py`. Heavy imports (Prefect,
FastAPI, DuckDB, scipy) happen inside the commands so that ``--help`` answers at once.

Exit codes: 0 success (compare: every gate passed); 1 compare failed a gate / the sweep
failed; 2 bad input (message on stderr, nothing run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from diffcam.flows.cli_common import fail
from diffcam.flows.paths import DEFAULT_STORE

__all__ = ["register"]


def _need_server(what: str) -> None:
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            fail(f"{what} needs a Prefect server: start one with `prefect server start --host 127.0.0.1` and "
                  "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (or point it at your team's server)")


# --------------------------------------------------------------------------- compare

_COMPARE_HELP = """Regression report of run B (candidate) against run A (baseline): per word and overall changes in localisation
metrics and map statistics (KS test, Wasserstein distance, Benjamini–Hochberg q-values), new and resolved
flags, and a pass/fail verdict against gates.

Writes compare.md and compare.json (default STORE/compare/RUN_A__RUN_B/). Gates come from --gates FILE (.toml
with a [gates] table, or .json) and the flags below; defaults: Obj-IoU may drop < 2 points, no new confirmed
flag of kind clever_hans, failure rate +5 points at most, both runs succeeded on the same dataset.

Examples:
  diffcam compare nightly-0412 nightly-0413
  diffcam compare A B --store runs/ --max-obj-iou-drop 1 --json > verdict.json
  diffcam compare A B --gates ci/gates.toml || echo "regression"

Exit codes: 0 every gate passed; 1 a gate failed; 2 bad input.
"""


def compare_cmd(
    run_a: str = typer.Argument(..., help="Baseline run id (the previous checkpoint)."),
    run_b: str = typer.Argument(..., help="Candidate run id."),
    store: Path = typer.Option(DEFAULT_STORE, "--store", help="Store folder."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default STORE/compare/RUN_A__RUN_B/)."),
    gates_file: Path | None = typer.Option(None, "--gates", help="Gates file (.toml [gates] table or .json)."),
    max_obj_iou_drop: float | None = typer.Option(
        None, "--max-obj-iou-drop", min=0.0,
        help="Overall Obj-IoU may drop by less than this many points (default 2)."),
    max_word_obj_iou_drop: float | None = typer.Option(
        None, "--max-word-obj-iou-drop", min=0.0, help="Per-word Obj-IoU drop limit in points (default: off)."),
    flag_kinds: list[str] | None = typer.Option(
        None, "--fail-on-new-flag",
        help="Flag kind pattern whose new flags fail the gate (repeatable; default clever_hans)."),
    any_flag: bool = typer.Option(False, "--unconfirmed-flags-count",
                                  help="Count new flags of those kinds even when not confirmed."),
    method: str | None = typer.Option(None, "--method", help="CAM method to compare (default diffusion-cam)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON verdict on stdout instead of the summary."),
) -> None:
    from diffcam.flows.compare import CompareGates, compare_runs, default_out_dir, load_gates, write_comparison
    from diffcam.storage.store import RUN_ID_RE, Store

    for rid in (run_a, run_b):
        if not RUN_ID_RE.match(rid):
            fail(f"run id {rid!r} must match {RUN_ID_RE.pattern}")
    if not store.is_dir():
        fail(f"--store {store}: no such store folder")
    try:
        gates = load_gates(gates_file) if gates_file else CompareGates()
        overrides: dict[str, Any] = {}
        if max_obj_iou_drop is not None:
            overrides["max_obj_iou_drop_points"] = max_obj_iou_drop
        if max_word_obj_iou_drop is not None:
            overrides["max_word_obj_iou_drop_points"] = max_word_obj_iou_drop
        if flag_kinds:
            overrides["fail_on_new_flag_kinds"] = tuple(flag_kinds)
        if any_flag:
            overrides["new_flags_confirmed_only"] = False
        if method:
            overrides["method"] = method
        gates = gates.with_(**overrides)
    except (OSError, ValueError, TypeError) as e:
        fail(f"gates: {e}")
    st = Store(store)
    known = st.runs()
    for rid in (run_a, run_b):
        if rid not in known:
            fail(f"run {rid!r} not found in {st.root}" + (f"; runs: {', '.join(known[-5:])}" if known else ""))
    cmp = compare_runs(st, run_a, run_b, gates)
    md, js = write_comparison(cmp, out or default_out_dir(st.root, run_a, run_b))
    if as_json:
        typer.echo(cmp.to_json())
    else:
        typer.echo(f"{'PASS' if cmp.passed else 'FAIL'}  {run_a} → {run_b}  (method {gates.method})")
        for g in cmp.gate_results:
            typer.echo(f"  [{'ok' if g.passed else 'FAIL'}] {g.name}: {g.detail}")
        for w in cmp.warnings:
            typer.echo(f"  warning: {w}", err=True)
        fl = cmp.flags
        typer.echo(f"  flags: {len(fl['new'])} new, {len(fl['resolved'])} resolved, "
                   f"{len(fl['newly_confirmed'])} newly confirmed")
        n_sig = sum(1 for w in cmp.words if w["significant"])
        typer.echo(f"  per-word changes significant at q < {gates.alpha}: {n_sig}")
        typer.echo(f"  report  {md}\n  json    {js}")
    raise typer.Exit(0 if cmp.passed else 1)


# ------------------------------------------------------------------- sweep / deploy


def _ops_config(config: Path | None, **overrides: Any):
    from diffcam.flows.deploy import OpsConfig

    audit_options = {k: overrides.pop(k) for k in ("workers", "gpus_per_worker", "ray_address")
                     if overrides.get(k) is not None}
    for k in ("workers", "gpus_per_worker", "ray_address"):
        overrides.pop(k, None)
    try:
        if config is not None:
            cfg = OpsConfig.from_toml(config, **overrides)
        else:
            if not overrides.get("registry"):
                fail("give --registry FOLDER (or --config ops.toml)")
            cfg = OpsConfig(**{k: v for k, v in overrides.items() if v is not None})
        if audit_options:
            cfg = cfg.with_(audit_options={**cfg.audit_options, **audit_options})
        cfg.registry_roots()  # the registry must exist
    except (OSError, ValueError, TypeError) as e:
        fail(str(e))
    return cfg


_SWEEP_HELP = """Audit, once and now, every checkpoint of the registry not yet audited with these settings (what the scheduled
deployment does each night); already-audited (checkpoint hash, dataset, settings) triples are skipped unless
--force.

Examples:
  diffcam sweep --registry /models/registry --store runs/
  diffcam sweep --registry /models/registry --limit 20 --settle-s 0
"""


def sweep_cmd(
    registry: str | None = typer.Option(None, "--registry", help="Registry folder (of checkpoint folders)."),
    store: Path | None = typer.Option(None, "--store", help="Store (default: the config's, else diffcam-store)."),
    config: Path | None = typer.Option(None, "--config", help="ops.toml ([ops] table)."),
    dataset: Path | None = typer.Option(None, "--dataset", help="Dataset folder/manifest (default: built-in)."),
    limit: int | None = typer.Option(None, "--limit", min=1),
    force: bool = typer.Option(False, "--force", help="Audit again even when already audited."),
    settle_s: float = typer.Option(60.0, "--settle-s", min=0.0, help="Skip checkpoints modified in the last N s."),
    workers: int | None = typer.Option(None, "--workers", min=1),
    json_out: Path | None = typer.Option(None, "--json", help="Write the sweep result as JSON here."),
) -> None:
    cfg = _ops_config(config, registry=registry, store=None if store is None else str(store),
                      dataset=None if dataset is None else str(dataset), limit=limit, workers=workers)
    from diffcam.flows.deploy import audit_new_checkpoints

    state = audit_new_checkpoints(
        registry=cfg.registry, store=cfg.store, dataset=cfg.dataset, settings=cfg.settings, limit=cfg.limit,
        force=force, settle_s=settle_s, stale_after_s=cfg.stale_after_s, audit_options=cfg.audit_options,
        compare=cfg.compare, gates=cfg.gates, fail_on_regression=cfg.fail_on_regression, return_state=True,
    )
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        fail(f"sweep failed: {state.message or result}", code=1)
    for r in result["checkpoints"]:
        typer.echo(f"  {r['action']:<8} {r['model_line']}/{r['name']}  {r.get('run_id') or ''}  {r['reason']}")
        if r.get("compare"):
            c = r["compare"]
            typer.echo(f"           compare vs {c['run_a']}: {'pass' if c['passed'] else 'FAIL'}  {c['markdown']}")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if state.is_failed():
        fail(f"sweep: {state.message}", code=1)


_DEPLOY_HELP = """Create the two Prefect deployments: the nightly sweep (cron) and the audit triggered by the
`diffcam.model.registered` event (its payload becomes the flow's parameters).

With --work-pool: registers them on the server in PREFECT_API_URL for that pool's workers (a team's server;
workers need the diffcam package installed). Without: use `diffcam serve` (one machine). --dry-run prints what
would be created and needs no server.

Examples:
  diffcam deploy --registry /models/registry --store /data/diffcam-store --dry-run
  diffcam deploy --config ops.toml --work-pool gpu-pool
  diffcam deploy --config ops.toml --work-pool k8s-gpu --image registry.example/diffcam:0.1.0
"""


_RAY_ADDRESS_HELP = (
    "Ray cluster the audits use: HOST:PORT as `ray start --head` prints it (or auto). A cluster with token "
    "authentication needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN[_PATH] in the environment of whatever runs the "
    "flows (the worker, or `diffcam serve`).")


def deploy_cmd(
    registry: str | None = typer.Option(None, "--registry", help="Registry folder."),
    store: str | None = typer.Option(None, "--store", help="Store folder (shared storage for a team)."),
    config: Path | None = typer.Option(None, "--config", help="ops.toml ([ops], [ops.gates], [ops.settings])."),
    dataset: str | None = typer.Option(None, "--dataset"),
    cron: str | None = typer.Option(None, "--cron", help="Sweep schedule (default '0 2 * * *')."),
    limit: int | None = typer.Option(None, "--limit", min=1),
    workers: int | None = typer.Option(None, "--workers", min=1),
    gpus_per_worker: float | None = typer.Option(None, "--gpus-per-worker", min=0.0),
    ray_address: str | None = typer.Option(None, "--ray-address", help=_RAY_ADDRESS_HELP),
    work_pool: str | None = typer.Option(None, "--work-pool", help="Prefect work pool to register on."),
    image: str | None = typer.Option(None, "--image", help="Pre-built image (Docker/Kubernetes pools)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the deployments as JSON; change nothing."),
) -> None:
    cfg = _ops_config(config, registry=registry, store=store, dataset=dataset, cron=cron, limit=limit,
                      workers=workers, gpus_per_worker=gpus_per_worker, ray_address=ray_address, work_pool=work_pool)
    from diffcam.flows.deploy import deploy_to_work_pool, describe_deployments

    if dry_run:
        typer.echo(json.dumps(describe_deployments(cfg), indent=1, default=str))
        return
    if not cfg.work_pool:
        fail("--work-pool is required to register deployments (on one machine, `diffcam serve` creates and runs them)")
    _need_server("diffcam deploy")
    ids = deploy_to_work_pool(cfg, image=image)
    typer.echo(f"registered {len(ids)} deployment(s) on work pool {cfg.work_pool!r}: "
               f"diffcam-sweep/{cfg.sweep_name} (cron {cfg.cron!r}), "
               f"diffcam-audit-checkpoint/{cfg.event_name} (on diffcam.model.registered)")


_SERVE_HELP = """Create the two deployments (nightly sweep + event-triggered audit) on the Prefect server in PREFECT_API_URL
and run their flow runs from this process until Ctrl-C (which pauses their schedules).

One machine:
  prefect server start --host 127.0.0.1 &            # UI at http://127.0.0.1:4200
  export PREFECT_API_URL=http://127.0.0.1:4200/api
  diffcam serve --registry /models/registry --store diffcam-store
  diffcam webhook --registry /models/registry --store diffcam-store   # another terminal
"""


def serve_cmd(
    registry: str | None = typer.Option(None, "--registry", help="Registry folder."),
    store: str | None = typer.Option(None, "--store", help="Store folder."),
    config: Path | None = typer.Option(None, "--config", help="ops.toml."),
    dataset: str | None = typer.Option(None, "--dataset"),
    cron: str | None = typer.Option(None, "--cron"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Samples per audit (default: all)."),
    workers: int | None = typer.Option(None, "--workers", min=1),
    gpus_per_worker: float | None = typer.Option(None, "--gpus-per-worker", min=0.0),
    ray_address: str | None = typer.Option(None, "--ray-address", help=_RAY_ADDRESS_HELP),
    max_runs: int | None = typer.Option(None, "--max-runs", min=1, help="Flow runs at a time in this process."),
) -> None:
    cfg = _ops_config(config, registry=registry, store=store, dataset=dataset, cron=cron, limit=limit,
                      workers=workers, gpus_per_worker=gpus_per_worker, ray_address=ray_address)
    _need_server("diffcam serve")
    from diffcam.flows.deploy import serve_deployments

    serve_deployments(cfg, limit=max_runs)


_WEBHOOK_HELP = """Run the registry webhook receiver: verifies signed notifications (MLflow model-registry webhooks at
/hooks/mlflow, a plain JSON form at /hooks/registry) and emits the Prefect event diffcam.model.registered. It
never runs an audit.

The HMAC secret is read from $DIFFCAM_WEBHOOK_SECRET (at least 16 characters). Listens on 127.0.0.1 by
default: put a TLS reverse proxy in front of it to expose it. Every delivery is logged on stderr with its id:
accepted, ignored, MLflow test delivery, or rejected with the reason.

MLflow side (its server's environment): MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and
MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true for a receiver on http or a private address; a fixed
MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY (else a restarted MLflow server cannot use the secret). Point --registry
at the MLflow server's --artifacts-destination so runs:/ and models:/ sources resolve (docs/OPERATIONS.md).

Example:
  export DIFFCAM_WEBHOOK_SECRET=...   PREFECT_API_URL=http://127.0.0.1:4200/api
  diffcam webhook --registry /models/registry --store diffcam-store --port 8787
"""


def webhook_cmd(
    registry: str = typer.Option(..., "--registry", help="Registry folder: notified checkpoints must lie inside."),
    store: Path = typer.Option(DEFAULT_STORE, "--store", help="Store folder (holds the replay cache)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8787, "--port", min=1, max=65535),
    extra_root: list[str] | None = typer.Option(None, "--extra-root", help="Another allowed checkpoint root."),
    dataset_root: list[str] | None = typer.Option(
        None, "--dataset-root", help="Folder a notification's dataset may point into (default: none allowed)."),
    alias: list[str] | None = typer.Option(None, "--alias", help="Only these MLflow aliases trigger (default all)."),
    tolerance_s: int = typer.Option(300, "--tolerance-s", min=1, help="Allowed clock skew of the timestamp."),
    max_body_bytes: int = typer.Option(65536, "--max-body-bytes", min=256),
    secret_env: str = typer.Option("DIFFCAM_WEBHOOK_SECRET", "--secret-env", help="Variable holding the secret."),
    log_level: str = typer.Option(
        "info", "--log-level",
        help="Level of the receiver's own lines on stderr (info: one line per delivery, with its id)."),
) -> None:
    from diffcam.flows.webhook import WebhookSettings, configure_logging, create_app

    _need_server("diffcam webhook")
    try:
        configure_logging(log_level)
        app = create_app(WebhookSettings(
            registry=registry, store=str(store), extra_registry_roots=tuple(extra_root or ()),
            dataset_roots=tuple(dataset_root or ()), aliases=tuple(alias or ()), tolerance_s=tolerance_s,
            max_body_bytes=max_body_bytes, secret_env=secret_env))
    except ValueError as e:
        fail(str(e))
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")


def register(app: typer.Typer) -> None:
    """Add `compare`, `sweep`, `deploy`, `serve` and `webhook` to the `diffcam` app."""
    app.command("compare", help=_COMPARE_HELP)(compare_cmd)
    app.command("sweep", help=_SWEEP_HELP)(sweep_cmd)
    app.command("deploy", help=_DEPLOY_HELP)(deploy_cmd)
    app.command("serve", help=_SERVE_HELP)(serve_cmd)
    app.command("webhook", help=_WEBHOOK_HELP)(webhook_cmd)
