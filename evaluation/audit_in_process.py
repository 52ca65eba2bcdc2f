"""The audit without Ray or Prefect, for benchmarks and tests on a laptop.

Not the production path (that is flows/audit.py): one `diffcam.tasks.worker.CamWorker` called
in-process, shards committed with `Store`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

__all__ = ["audit_in_process"]


def _quiet(msg: str) -> None:
    """The default log: says nothing."""


def audit_in_process(
    store: Any,
    run_id: str,
    model_dir: str | Path,
    dataset_path: str | Path,
    cam_settings: Any = None,
    *,
    shard_size: int = 16,
    threads: int = 1,
    device: str = "cpu",
    limit: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Audit ``dataset_path`` with ``model_dir`` into ``store`` without Ray or Prefect:
    one `diffcam.tasks.worker.CamWorker` called in-process, shards committed with `Store`.
    For benchmarks and tests; returns timings. The run row is written (status
    ``succeeded`` at the end); an existing run id raises (use a new one)."""
    from datetime import datetime

    from diffcam.core.settings import CamSettings, run_settings
    from diffcam.storage.datasets import load_dataset
    from diffcam.storage.schemas import table_from_rows
    from diffcam.tasks.plan import plan_shards
    from diffcam.tasks.worker import CamWorker

    log = log or _quiet
    cam = cam_settings or CamSettings()
    ds = load_dataset(dataset_path)
    shards = plan_shards(ds.samples, shard_size=shard_size, limit=limit, root=ds.root)
    n = sum(len(s) for s in shards)
    config = {**run_settings(cam), "audit": {"shard_size": shard_size, "limit": limit, "in_process": True}}
    store.write_run({
        "run_id": run_id, "model_uri": Path(model_dir).resolve().as_uri(), "model_hash": "in-process",
        "dataset_uri": ds.uri, "dataset_hash": ds.content_hash, "config_json": json.dumps(config, sort_keys=True),
        "code_version": "in-process", "started_at": datetime.now(UTC), "status": "running",
        "n_samples": n, "n_shards": len(shards), "trigger": "manual",
    })
    t0 = time.perf_counter()
    worker = CamWorker(str(model_dir), cam, threads=threads, device=device)
    t1 = time.perf_counter()
    n_ok = n_fail = 0
    for shard in shards:
        items = [{**it, "run_id": run_id, "shard_id": shard.shard_id} for it in shard.items]
        results = worker.process(items)
        samples = [r["samples"] for r in results if r["samples"] is not None]
        maps = [row for r in results for row in r["token_maps"]]
        fails = [r["failures"] for r in results if r["failures"] is not None]
        fails += [{**f, "run_id": run_id} for f in shard.failures]
        n_ok += len(samples)
        n_fail += len(fails)
        store.commit_shard(run_id, shard.shard_id, {
            "samples": table_from_rows("samples", samples), "token_maps": table_from_rows("token_maps", maps),
            "failures": table_from_rows("failures", fails)})
        log(f"shard {shard.shard_id}: {len(samples)} ok, {len(fails)} failed ({time.perf_counter() - t1:.0f} s)")
    store.update_run(run_id, status="succeeded", finished_at=datetime.now(UTC), n_results=n_ok,
                     n_failures=n_fail)
    return {"load_s": t1 - t0, "explain_s": time.perf_counter() - t1, "n_ok": n_ok, "n_failures": n_fail}
