"""One shard of an audit: send its samples to the worker pool, gather rows, commit atomically.

`assemble_tables` is pure (rows → Arrow tables, with the every-sample-exactly-once check);
`run_shard` is the Prefect task around it (retries from the decorator, options set by the
flow with ``with_options``). A shard that is already committed is skipped without
touching the workers, which is how a re-run of a run id resumes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from diffcam.storage.schemas import table_from_rows
from diffcam.storage.store import Store
from diffcam.tasks.plan import Shard

__all__ = ["ShardResult", "assemble_tables", "run_shard"]


@dataclass(frozen=True)
class ShardResult:
    shard_id: int
    status: str  # "committed" | "skipped" (already committed before this run)
    n_samples: int
    n_results: int
    n_failures: int
    seconds: float


def assemble_tables(run_id: str, shard: Shard, results: Sequence[dict[str, Any]]) -> dict[str, pa.Table]:
    """Rows of one shard → ``samples`` / ``token_maps`` / ``failures`` tables (manifest order).

    ``results`` are `CamWorker.process_one` outputs for ``shard.items``; the shard's planned
    failures are added. Raises RuntimeError if a sample of the shard has no result, two
    results, or a result that is both or neither a sample and a failure — a shard that
    would break "every sample in exactly one of samples / failures" is never committed.
    """
    order = {sid: k for k, sid in enumerate(shard.sample_ids)}
    by_id: dict[str, dict[str, Any]] = {}
    for r in results:
        sid = r["sample_id"]
        if sid not in order:
            raise RuntimeError(f"shard {shard.shard_id}: result for unknown sample {sid!r}")
        if sid in by_id:
            raise RuntimeError(f"shard {shard.shard_id}: two results for sample {sid!r}")
        if (r["samples"] is None) == (r["failures"] is None):
            raise RuntimeError(f"shard {shard.shard_id}: sample {sid!r} must be exactly one of samples/failures")
        by_id[sid] = r
    planned = {f["sample_id"]: {**f, "run_id": run_id} for f in shard.failures}
    missing = [s for s in shard.sample_ids if s not in by_id and s not in planned]
    extra = sorted(set(by_id) & set(planned))
    if missing or extra:
        raise RuntimeError(f"shard {shard.shard_id}: missing results for {missing[:5]}, duplicated {extra[:5]}")
    samples, maps, failures = [], [], []
    for sid in shard.sample_ids:
        if sid in planned:
            failures.append(planned[sid])
            continue
        r = by_id[sid]
        if r["failures"] is not None:
            failures.append(r["failures"])
        else:
            samples.append(r["samples"])
            maps.extend(r["token_maps"])
    return {
        "samples": table_from_rows("samples", samples),
        "token_maps": table_from_rows("token_maps", maps),
        "failures": table_from_rows("failures", failures),
    }


@task(name="audit-shard", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      task_run_name="shard-{shard.shard_id}")
def run_shard(store_root: str, run_id: str, shard: Shard, pool: Any) -> ShardResult:
    """Audit one shard on ``pool`` (a started `diffcam.tasks.pool.CamPool`) and commit it.

    Idempotent: an already committed shard returns status "skipped"; a commit that races
    another writer of the same shard is a no-op in `Store.commit_shard`.
    """
    logger = get_run_logger()
    # catalog.duckdb is not rebuilt per shard (~0.1 s each, growing with the run): the flow
    # rebuilds it once every shard is committed.
    store = Store(store_root)
    t0 = time.perf_counter()
    if store.is_committed(run_id, shard.shard_id):
        return ShardResult(shard.shard_id, "skipped", len(shard), 0, 0, 0.0)
    items = [{**it, "run_id": run_id, "shard_id": shard.shard_id} for it in shard.items]
    results = pool.run(items) if items else []
    tables = assemble_tables(run_id, shard, results)
    committed = store.commit_shard(run_id, shard.shard_id, tables)
    dt = time.perf_counter() - t0
    n_ok, n_fail = tables["samples"].num_rows, tables["failures"].num_rows
    if not committed:
        logger.warning("shard %d was committed by another writer meanwhile; kept that commit", shard.shard_id)
        return ShardResult(shard.shard_id, "skipped", len(shard), 0, 0, dt)
    return ShardResult(shard.shard_id, "committed", len(shard), n_ok, n_fail, dt)
