"""The audit flow: model + dataset → committed tables, validation verdict, report.

``audit(...)`` (a Prefect 3 flow) does, in order:

1. resolve the model folder (content hash) and the dataset (`diffcam.storage.datasets.load_dataset`,
   content hash); a missing dataset means the built-in synthetic one;
2. write the ``runs`` row (status ``running``, config JSON: every setting that shapes the
   numbers, `diffcam.core.settings.run_settings`, and the run options; code version) — or,
   when the run id exists, check that it is the same model, dataset, settings and plan and
   resume it;
3. plan shards (`diffcam.tasks.plan.plan_shards`: stable ids);
4. for every shard not yet committed, the `diffcam.tasks.shard.run_shard` task (Prefect retries)
   maps its samples over the Ray worker pool (`diffcam.tasks.pool.CamPool`) and commits the shard
   atomically; progress (shards done/total, samples/s, ETA) goes to ``get_run_logger()``;
5. the bias step (`diffcam.tasks.finalize.dataset_flags_task`): its discovery scan and counterfactual
   regenerations run on the same workers (`diffcam.tasks.scan.pool_scanner`,
   `diffcam.tasks.answers.pool_answerer`), which are closed after it (also when anything before
   fails). On a resumed run with every shard committed, the workers start only if the scan
   or a counterfactual needs them (the driver never loads the model itself: on a GPU
   cluster the regenerations run on the GPUs);
6. validate (`diffcam.storage.validation`), 7. report (`diffcam.storage.report`),
8. update the run row: ``succeeded`` / ``validation_failed`` / ``failed`` with the reason;
   what happened to the Ray workers (deaths, replacements, retries) is logged and kept in the
   row's ``config_json`` under ``audit.pool``.

Runs with no Prefect server configured (Prefect starts a temporary local one) and with no
Ray cluster (a local Ray is started and shut down). Re-running a run id skips committed
shards, so an interrupted run resumes without duplicating or losing rows.

Design choice: one Prefect task per shard, Ray actors called inside it (not prefect-ray's
RayTaskRunner, which starts Ray per flow run and a Prefect server per Ray worker).
Shards run one after another on the driver; the samples inside a shard run in parallel on
the pool. Cost of that barrier: at the end of each shard, workers idle for at most one
batch while the slowest batch finishes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from diffcam.flows.env import set_env_defaults

set_env_defaults()  # before prefect / ray are imported (flows/env.py says why)

from prefect import flow, get_run_logger  # noqa: E402 - after set_env_defaults()

from diffcam.core.settings import CamSettings  # noqa: E402 - after set_env_defaults()
from diffcam.flows.paths import DEFAULT_MODEL, DEFAULT_STORE, REPO_ROOT  # noqa: E402 - after set_env_defaults()

__all__ = [
    "audit",
    "AuditConfigError",
    "model_hash",
    "code_version",
    "default_dataset",
    "new_run_id",
    "remember_dataset",
    "DEFAULT_SYNTHETIC_N",
]

DEFAULT_SYNTHETIC_N = 200
DEFAULT_SYNTHETIC_SEED = 0
#: Settings that decide which rows a run holds: a resumed run must keep them.
_PLAN_KEYS = ("shard_size", "limit")


class AuditConfigError(ValueError):
    """Bad input to the audit (missing model, incompatible resume, ...): nothing was run."""


def model_hash(model_dir: str | Path) -> str:
    """sha256 over the folder's files (recursively; hidden files and folders excluded): per
    file, in sorted relative-path order, the posix path, a NUL and the file's own sha256.
    Renaming, adding or editing any file changes it; the folder's location does not."""
    from diffcam.storage.store import file_sha256

    root = Path(model_dir)
    h = hashlib.sha256(b"diffcam-model-v1\0")
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + bytes.fromhex(file_sha256(p)))
    return h.hexdigest()


def code_version() -> str:
    """``<package version>+<git describe --always --dirty>`` in a checkout, else the version."""
    try:
        from importlib.metadata import version

        v = version("diffcam")
    except Exception:  # noqa: BLE001 - not installed: still report something true
        v = "unknown"
    if (REPO_ROOT / ".git").exists():
        try:
            out = subprocess.run(
                ["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            )
            if out.returncode == 0 and out.stdout.strip():
                return f"{v}+{out.stdout.strip()}"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return v


def default_dataset(store: str | Path, n: int = DEFAULT_SYNTHETIC_N, seed: int = DEFAULT_SYNTHETIC_SEED) -> Path:
    """The built-in synthetic dataset ``<store>/datasets/synthetic-seed<seed>-n<n>/``,
    generated on first use (atomically, by `write_synthetic_dataset`) and reused after."""
    from diffcam.storage.synthetic_writer import write_synthetic_dataset

    path = Path(store) / "datasets" / f"synthetic-seed{seed}-n{n}"
    if not (path / "manifest.jsonl").is_file():
        if path.exists() and any(path.iterdir()):
            raise AuditConfigError(f"{path} exists but has no manifest.jsonl; remove it to regenerate")
        try:
            write_synthetic_dataset(path, n, seed)
        except FileExistsError:
            if not (path / "manifest.jsonl").is_file():  # not a concurrent writer that just finished
                raise
    return path


#: Datasets already loaded and hashed in this process, by resolved path (`remember_dataset`).
_LOADED: dict[str, tuple[Any, int, int]] = {}


def remember_dataset(path: str | Path, ds: Any) -> None:
    """Hand the flow a dataset the caller already loaded and hashed (``diffcam audit`` does, to
    refuse a bad manifest before Prefect starts), so that the audit does not read and hash it
    again. A flow parameter must be JSON through Prefect's API, which a manifest's samples are
    not, hence this hand-over in the process; the next `audit` of ``path`` takes it, unless the
    manifest file changed since."""
    st = ds.manifest_path.stat()
    _LOADED[str(Path(path).resolve())] = (ds, st.st_mtime_ns, st.st_size)


def _load_dataset(path: Path) -> Any:
    from diffcam.storage.datasets import load_dataset

    ds, mtime_ns, size = _LOADED.pop(str(path.resolve()), (None, None, None))
    if ds is not None:
        st = ds.manifest_path.stat()
        if (st.st_mtime_ns, st.st_size) == (mtime_ns, size):
            return ds
    return load_dataset(path)  # ManifestError (a ValueError) lists every structural problem


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-<6 hex>`` (UTC): sortable, unique enough for one store."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def _resolve_model(model: str | Path) -> Path:
    p = Path(model).expanduser()
    if not p.is_dir():
        raise AuditConfigError(f"--model {model}: not a folder")
    if not (p / "config.json").is_file():
        raise AuditConfigError(f"--model {model}: no config.json (not a checkpoint folder)")
    if not any(p.glob("*.safetensors")):
        raise AuditConfigError(f"--model {model}: no *.safetensors weights")
    return p.resolve()


def _check_resume(row: dict[str, Any], model_h: str, dataset_h: str, config: dict[str, Any]) -> None:
    problems = []
    if row["model_hash"] != model_h:
        problems.append(f"model hash {row['model_hash'][:12]}… ≠ {model_h[:12]}…")
    if row["dataset_hash"] != dataset_h:
        problems.append(f"dataset hash {row['dataset_hash'][:12]}… ≠ {dataset_h[:12]}…")
    try:
        old = json.loads(row["config_json"])
    except (TypeError, json.JSONDecodeError):
        old = {}
    # a row written before refine/stats/bias were recorded holds only the CamSettings fields
    keys = (set(config) | set(old)) - {"audit"} - ({"refine", "stats", "bias"} - set(old))
    differ = sorted(k for k in keys if old.get(k) != config.get(k))
    if differ:
        problems.append(f"settings differ ({', '.join(differ)})")
    for k in _PLAN_KEYS:
        if old.get("audit", {}).get(k) != config["audit"][k]:
            problems.append(f"{k} {old.get('audit', {}).get(k)!r} ≠ {config['audit'][k]!r}")
    if problems:
        raise AuditConfigError(
            f"run {row['run_id']} exists with different inputs ({'; '.join(problems)}); "
            "resume it with the same model, dataset and settings, or use a new --run-id"
        )


def _open_run(st, run_id: str, row: dict[str, Any], config: dict[str, Any], logger) -> bool:
    """Write the run row, or check and reopen an existing run; True when resuming."""
    if run_id not in st.runs():
        st.write_run(row)
        return False
    _check_resume(st.read_run(run_id), row["model_hash"], row["dataset_hash"], config)
    removed = st.recover(run_id)
    if removed:
        logger.info("removed %d leftover file(s) of an interrupted commit", len(removed))
    st.update_run(run_id, status="running", finished_at=None, error=None, n_results=None, n_failures=None,
                  validation_json=None)
    return True


def _run_shards(task, pending, pool, st, run_id: str, n_samples: int, logger):
    """Run ``task`` on each pending shard; a shard that fails (after its retries) is recorded
    and the others go on. Returns (results, [(shard_id, exception)], samples computed)."""
    results, failed = [], []
    computed = 0
    done = n_samples - sum(len(s) for s in pending)
    t0 = time.perf_counter()
    for k, shard in enumerate(pending, 1):
        try:
            res = task(str(st.root), run_id, shard, pool)
        except Exception as exc:  # noqa: BLE001 - recorded; the run fails after the other shards
            failed.append((shard.shard_id, exc))
            logger.error("shard %d failed after its retries: %s: %s", shard.shard_id, type(exc).__name__, exc)
            continue
        results.append(res)
        computed += res.n_samples if res.status == "committed" else 0
        done += res.n_samples
        elapsed = time.perf_counter() - t0
        rate = computed / elapsed if elapsed > 0 else 0.0
        eta = f"{(n_samples - done) / rate:.0f} s" if rate > 0 else "?"
        logger.info("shard %d %s (%d ok, %d failed) · %d/%d shards · %d/%d samples · %.2f samples/s · ETA %s",
                    shard.shard_id, res.status, res.n_results, res.n_failures, k, len(pending),
                    done, n_samples, rate, eta)
    return results, failed, computed


def _record_pool(st, run_id: str, config: dict[str, Any], pool, logger) -> None:
    """Put what happened to the Ray workers (deaths, replacements, retries: `CamPool.stats`)
    in the audit's log and in the run row (``config_json`` → ``audit.pool``; the resume check
    ignores it). A pool that never started its workers records nothing."""
    if not pool.n_workers:
        return
    stats = pool.stats_summary()
    config["audit"]["pool"] = {"workers": pool.n_workers, **stats}
    (logger.warning if any(stats.values()) else logger.info)(pool.stats_line())
    try:
        st.update_run(run_id, config_json=json.dumps(config, sort_keys=True))
    except Exception as e:  # noqa: BLE001 - the audit's own outcome matters more; say so
        logger.error("could not record the worker statistics in the run row: %s: %s", type(e).__name__, e)


INTEGRITY_EXPECTATION = "committed files match their commit markers (sha256)"


def validate_or_integrity_failure(st, run_id: str, validate) -> Any:
    """``validate(store_root, run_id)`` (the GX suite), or — when the tables cannot even be
    read because a committed file was truncated, deleted, replaced or its marker forged —
    a failed `ValidationResult` naming the damaged files instead of a crash. The GX suite
    itself catches tampered-but-readable tables (and re-hashes every file)."""
    from diffcam.storage.store import StoreCorruptError
    from diffcam.storage.validation import ValidationResult

    try:
        return validate(str(st.root), run_id)
    except Exception as exc:  # noqa: BLE001 - re-raised unless the store is damaged
        try:
            problems = st.verify(run_id)
        except StoreCorruptError as e:
            problems = [str(e)]
        if not problems:
            raise
        return ValidationResult(run_id=run_id, success=False, per_expectation=[{
            "table": "store", "expectation": INTEGRITY_EXPECTATION, "success": False,
            "details": {"problems": problems[:20], "n_problems": len(problems),
                        "error": f"{type(exc).__name__}: {str(exc)[:500]}"},
        }])


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Run:
    """One audit once its inputs are resolved: what every step after planning reads."""

    store: Any  # diffcam.storage.store.Store
    run_id: str
    model_dir: Path
    model_hash: str
    dataset: Any  # diffcam.storage.samples.Dataset
    shards: list[Any]  # diffcam.tasks.plan.Shard
    n_samples: int
    settings: CamSettings
    bias_settings: Any  # diffcam.core.bias.settings.BiasSettings
    config: dict[str, Any]
    logger: Any
    timings: dict[str, float] = field(default_factory=dict)


def _check_options(limit: int | None, workers: int | None, cpus_per_worker: int | None, trigger: str,
                   gpus_per_worker: float) -> None:
    """Refuse bad numbers before anything is read or written."""
    from diffcam.storage.schemas import TRIGGERS

    if limit is not None and limit < 1:
        raise AuditConfigError(f"--limit must be >= 1, got {limit}")
    if workers is not None and workers < 1:
        raise AuditConfigError(f"--workers must be >= 1, got {workers}")
    if cpus_per_worker is not None and cpus_per_worker < 1:
        raise AuditConfigError(f"--cpus-per-worker must be >= 1, got {cpus_per_worker}")
    if trigger not in TRIGGERS:
        raise AuditConfigError(f"trigger {trigger!r} is not one of {TRIGGERS}")
    if gpus_per_worker < 0:
        raise AuditConfigError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")


def _load_and_plan(model: str, dataset: str | None, store: str, run_id: str | None, settings: CamSettings,
                   shard_size: int, limit: int | None, synthetic_n: int, pool_options: dict[str, Any],
                   logger: Any) -> _Run:
    """Load: the model folder and its hash, the dataset (the built-in one when None) and its
    problems; plan: the stable shards and the config every resume must match."""
    from diffcam.core.bias.settings import BiasSettings
    from diffcam.core.settings import run_settings
    from diffcam.storage.store import Store
    from diffcam.tasks.plan import plan_shards

    t0 = time.perf_counter()
    st = Store(store)
    run_id = run_id or new_run_id()
    try:
        st.run_dir(run_id)
    except ValueError as e:
        raise AuditConfigError(str(e)) from None
    model_dir = _resolve_model(model)
    m_hash = model_hash(model_dir)
    ds = _load_dataset(Path(dataset) if dataset else default_dataset(st.root, n=synthetic_n))
    if ds.line_problems:
        logger.warning("%d manifest problem(s): those lines become failure rows (first: %s)",
                       len(ds.line_problems), "; ".join(str(p) for p in ds.line_problems[:5]))
    shards = plan_shards(ds.samples, shard_size=shard_size, limit=limit, root=ds.root)
    bias_settings = BiasSettings()  # the dataset step's (recorded in the run's config)
    config = {**run_settings(settings, bias_settings),
              "audit": {"shard_size": shard_size, "limit": limit, **pool_options}}
    run = _Run(st, run_id, model_dir, m_hash, ds, shards, sum(len(s) for s in shards), settings, bias_settings,
               config, logger)
    run.timings["resolve_s"] = time.perf_counter() - t0
    logger.info("run %s: model %s (%s…), dataset %s (%d samples, %d shards of %d)",
                run_id, model_dir, m_hash[:12], ds.uri, run.n_samples, len(shards), shard_size)
    return run


def _start_run(run: _Run, trigger: str) -> bool:
    """Write the ``running`` row (or check and reopen a run being resumed); True when resuming."""
    from diffcam.storage.catalog import write_catalog_file

    resumed = _open_run(run.store, run.run_id, {
        "run_id": run.run_id, "model_uri": run.model_dir.as_uri(), "model_hash": run.model_hash,
        "dataset_uri": run.dataset.uri, "dataset_hash": run.dataset.content_hash,
        "config_json": json.dumps(run.config, sort_keys=True), "code_version": code_version(),
        "started_at": _now(), "finished_at": None, "status": "running",
        "n_samples": run.n_samples, "n_shards": len(run.shards), "trigger": trigger,
    }, run.config, run.logger)
    write_catalog_file(run.store)  # catalog.duckdb (the DuckDB CLI's views) is a step of this flow, not of each store write
    return resumed


def _pending_shards(run: _Run) -> tuple[set[int], list[Any]]:
    """(plan shards already committed, those still to run). A named shard ("dataset": the
    dataset-level flags) is not a plan shard: mixing it in made resuming a run that got that far fail."""
    committed = {k for k in run.store.committed_shards(run.run_id) if isinstance(k, int)}
    pending = [s for s in run.shards if s.shard_id not in committed]
    run.logger.info("%d/%d shards already committed; %d to run", len(run.shards) - len(pending), len(run.shards),
                    len(pending))
    return committed, pending


def _audit_shards(run: _Run, pool: Any, pending: list[Any], task: Any) -> tuple[list[Any], int]:
    """Every pending shard on the workers (started only when a shard has samples); a run with a
    failed shard stops here, resumable. Returns (shard results, samples computed)."""
    if any(s.items for s in pending):
        pool.start()
        run.timings.update(pool.timings)
    t0 = time.perf_counter()
    results, failed, computed = _run_shards(task, pending, pool if pool.actors else None, run.store, run.run_id,
                                            run.n_samples, run.logger)
    run.timings["shards_s"] = time.perf_counter() - t0
    if failed:
        reason = "; ".join(f"shard {sid}: {type(e).__name__}: {e}" for sid, e in failed)[:4000]
        raise RuntimeError(f"{len(failed)} of {len(run.shards)} shard(s) failed ({reason}); "
                           f"re-run with --run-id {run.run_id} to resume")
    return results, computed


def _count_rows(run: _Run) -> dict[str, int]:
    """The result and failure counts into the run row; a run where no sample could be audited stops."""
    from diffcam.storage.catalog import write_catalog_file

    counts = {"n_results": run.store.read_table("samples", run.run_id).num_rows,
              "n_failures": run.store.read_table("failures", run.run_id).num_rows}
    run.store.update_run(run.run_id, **counts)
    write_catalog_file(run.store)  # every shard is in
    if counts["n_results"] == 0:
        raise RuntimeError(f"no sample could be audited ({counts['n_failures']} failures): see the failures table")
    return counts


def _bias_step(run: _Run, pool: Any) -> None:
    """The dataset-level bias analysis; its scan and counterfactuals run on the same workers."""
    from diffcam.tasks.answers import pool_answerer
    from diffcam.tasks.finalize import dataset_flags_task
    from diffcam.tasks.scan import pool_scanner

    t0 = time.perf_counter()
    n_flags = dataset_flags_task(str(run.store.root), run.run_id, str(run.model_dir), run.dataset,
                                 run.bias_settings, answerer=partial(pool_answerer, pool, log=run.logger.info),
                                 scanner=partial(pool_scanner, pool, log=run.logger.info))
    run.timings["dataset_flags_s"] = time.perf_counter() - t0
    run.logger.info("dataset-level bias analysis: %d flag rows", n_flags)


def _validate_step(run: _Run) -> tuple[Any, str]:
    """The GX verdict and the run's status, written before the report so the report shows them."""
    from diffcam.storage.catalog import write_catalog_file
    from diffcam.tasks.finalize import validate_run_task

    t0 = time.perf_counter()
    verdict = validate_or_integrity_failure(run.store, run.run_id, validate_run_task)
    run.timings["validate_s"] = time.perf_counter() - t0
    status = "succeeded" if verdict.success else "validation_failed"
    if not verdict.success:
        failed_names = ", ".join(f"{e['table']}: {e['expectation']}" for e in verdict.failed)
        run.logger.warning("validation failed: %s", failed_names[:2000])
    # a report that then fails turns the run into "failed" (the flow's handler)
    run.store.update_run(run.run_id, validation_json=verdict.to_json(), status=status, finished_at=_now())
    write_catalog_file(run.store)
    return verdict, status


def _report_step(run: _Run, verdict: Any) -> tuple[Path, Path]:
    from diffcam.tasks.finalize import report_task

    t0 = time.perf_counter()
    html_path, md_path = report_task(str(run.store.root), run.run_id, verdict)
    run.timings["report_s"] = time.perf_counter() - t0
    return html_path, md_path


def _record_failure(run: _Run, exc: BaseException) -> None:
    """The run row says ``failed`` and why; never hides the original error."""
    from diffcam.storage.catalog import write_catalog_file

    try:
        run.store.update_run(run.run_id, status="failed", finished_at=_now(),
                             error=f"{type(exc).__name__}: {exc}"[:4000])
        write_catalog_file(run.store)
    except Exception as e2:  # noqa: BLE001 - keep the original error
        run.logger.error("could not record the failure in the run row: %s", e2)


@flow(name="diffcam-audit")
def audit(
    model: str = str(DEFAULT_MODEL),
    dataset: str | None = None,
    store: str = str(DEFAULT_STORE),
    run_id: str | None = None,
    limit: int | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 1.0,
    ray_address: str | None = None,
    settings: CamSettings | None = None,
    shard_size: int | None = None,
    batch_size: int = 1,
    cpus_per_worker: int | None = None,
    shard_retries: int = 2,
    shard_retry_delay_s: float = 2.0,
    synthetic_n: int = DEFAULT_SYNTHETIC_N,
    trigger: str = "manual",
) -> dict[str, Any]:
    """Audit ``model`` on ``dataset`` into ``store``; returns a summary dict (see the module doc).

    The body reads as the data flow: load and plan → open the run → run the shards on the
    workers → bias step → validate → report; each step is a function of `_Run` above.
    ``settings``: what Diffusion-CAM computes (None: defaults; from Prefect's API it arrives
    as its JSON dict and is validated into `CamSettings`). ``dataset`` None: the built-in
    synthetic dataset (``synthetic_n`` samples); a dataset given to `remember_dataset` is
    not loaded again. ``shard_size`` None: 16.
    Raises `AuditConfigError` for bad input (before any run row is written) and
    RuntimeError when the run failed (after recording why in the run row).
    """
    from diffcam.tasks.plan import DEFAULT_SHARD_SIZE
    from diffcam.tasks.pool import CamPool, PoolConfig
    from diffcam.tasks.shard import run_shard

    t_start = time.perf_counter()
    logger = get_run_logger()
    _check_options(limit, workers, cpus_per_worker, trigger, gpus_per_worker)
    settings = settings if settings is not None else CamSettings()
    pool_options = {"batch_size": batch_size, "workers": workers, "gpus_per_worker": gpus_per_worker,
                    "cpus_per_worker": cpus_per_worker, "ray_address": ray_address}
    run = _load_and_plan(model, dataset, store, run_id, settings, shard_size or DEFAULT_SHARD_SIZE, limit,
                         synthetic_n, pool_options, logger)
    resumed = _start_run(run, trigger)
    try:
        committed_before, pending = _pending_shards(run)
        # the workers serve the shards and then the bias step's counterfactuals; started only
        # when a shard has samples, else on the bias step's first regeneration
        pool = CamPool(PoolConfig(model_dir=str(run.model_dir), settings=settings, **pool_options), log=logger.info)
        task = run_shard.with_options(retries=shard_retries, retry_delay_seconds=shard_retry_delay_s)
        try:
            results, computed = _audit_shards(run, pool, pending, task)
            counts = _count_rows(run)
            _bias_step(run, pool)
        finally:
            pool.close()
            _record_pool(run.store, run.run_id, run.config, pool, logger)
        verdict, status = _validate_step(run)
        html_path, md_path = _report_step(run, verdict)
    except BaseException as exc:
        _record_failure(run, exc)
        raise

    run.timings["total_s"] = time.perf_counter() - t_start
    summary = {
        "run_id": run.run_id,
        "status": status,
        "resumed": resumed,
        "store": str(run.store.root),
        "run_dir": str(run.store.run_dir(run.run_id)),
        "catalog": str(run.store.root / "catalog.duckdb"),
        "report_html": str(html_path),
        "summary_md": str(md_path),
        "dataset": run.dataset.uri,
        "model": str(run.model_dir),
        "n_samples": run.n_samples,
        **counts,
        "n_shards": len(run.shards),
        "shards_committed": sorted(r.shard_id for r in results if r.status == "committed"),
        "shards_skipped": sorted(committed_before | {r.shard_id for r in results if r.status == "skipped"}),
        "samples_computed": computed,
        "workers": pool.n_workers,
        "cpus_per_worker": pool.cpus_per_worker,
        "gpus_per_worker": pool.gpus_per_actor,
        "pool": run.config["audit"].get("pool", {}),
        "validation_failed": [f"{e['table']}: {e['expectation']}" for e in verdict.failed],
        "timings": run.timings,
    }
    logger.info("run %s %s: %d samples, %d failures; report %s", run.run_id, status, counts["n_results"],
                counts["n_failures"], html_path)
    return summary
