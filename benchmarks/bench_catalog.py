"""Benchmark: write >= 1 M synthetic `samples` rows with the real store writer, then time
report queries through `diffcam.storage.catalog.connect`.

    .venv/bin/python benchmarks/bench_catalog.py                       # 2 runs x 50 shards x 10,000 rows
    .venv/bin/python benchmarks/bench_catalog.py --json out/bench_catalog.json --keep DIR

Every shard goes through `Store.commit_shard` (schema check, temp file, fsync, rename,
commit marker; catalog.duckdb is rebuilt once, timed apart). Each timed query opens a fresh sandboxed
connection (views built from the commit markers), as `diffcam sql` and the report do.
Target: the per-run summary group-by in under 2 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from diffcam.storage import catalog
from diffcam.storage.queries import run_query
from diffcam.storage.store import Store

GROUP_BY_SQL = """
SELECT run_id, count(*) AS n, avg(t_total_s) AS mean_s, quantile_cont(t_total_s, 0.95) AS p95_s,
       avg(mean_f3) AS mean_f3, sum(n_words) AS n_words
FROM samples GROUP BY run_id ORDER BY run_id
"""


def synthetic_samples(run_id: str, shard: int, rows: int, rng: np.random.Generator) -> pa.Table:
    start = shard * rows
    ids = [f"{run_id}-s{i:08d}" for i in range(start, start + rows)]
    prompts = np.array(["Describe the image.", "What colour is the square?", "Where is the circle?"])
    answers = np.array(["a red square on the left", "blue", "the circle is at the top right"])
    pick = rng.integers(0, 3, rows)
    t_gen = rng.gamma(2.0, 0.4, rows).astype(np.float32)
    t_att = rng.gamma(2.0, 0.2, rows).astype(np.float32)
    masked = rng.random(rows) < 0.8
    f3 = np.where(masked, rng.random(rows), np.nan).astype(np.float32)
    cols = {
        "run_id": pa.array([run_id] * rows),
        "shard_id": pa.array(np.full(rows, shard, np.int32)),
        "sample_id": pa.array(ids),
        "line_no": pa.array(np.arange(start, start + rows, dtype=np.int32)),
        "image_path": pa.array([f"images/{i}.png" for i in ids]),
        "image_sha256": pa.array([f"{i:064x}" for i in range(start, start + rows)]),
        "width": pa.array(np.full(rows, 640, np.int32)),
        "height": pa.array(np.full(rows, 480, np.int32)),
        "prompt": pa.array(prompts[pick]),
        "answer": pa.array(answers[pick]),
        "n_objects": pa.array(masked.astype(np.int16)),
        "n_words": pa.array(rng.integers(1, 8, rows).astype(np.int32)),
        "n_steps": pa.array(np.full(rows, 16, np.int32)),
        "grid_h": pa.array(np.full(rows, 24, np.int16)),
        "grid_w": pa.array(np.full(rows, 32, np.int16)),
        "t_generate_s": pa.array(t_gen),
        "t_attribution_s": pa.array(t_att),
        "t_total_s": pa.array(t_gen + t_att),
        "mean_inside_frac": pa.array(f3, from_pandas=True),
        "mean_obj_iou": pa.array(f3, from_pandas=True),
        "mean_f3": pa.array(f3, from_pandas=True),
        "pointing_rate": pa.array(f3, from_pandas=True),
    }
    return pa.table(cols)  # commit_shard conforms it to the schema (adds reference_answer)


def timed(fn, repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_s": times[0], "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--shards", type=int, default=50, help="shards per run")
    ap.add_argument("--rows", type=int, default=10_000, help="rows per shard")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", type=Path, default=None, help="write the store here and keep it")
    ap.add_argument("--json", type=Path, default=None, help="write results as JSON")
    args = ap.parse_args(argv)

    root = args.keep or Path(tempfile.mkdtemp(prefix="diffcam-bench-"))
    if args.keep and root.exists():
        shutil.rmtree(root)
    store = Store(root / "store")
    rng = np.random.default_rng(0)
    total = args.runs * args.shards * args.rows
    try:
        commit_times = []
        t_write = time.perf_counter()
        for r in range(args.runs):
            run_id = f"bench-{r}"
            store.write_run({
                "run_id": run_id, "model_uri": "models/bench", "model_hash": f"sha256:m{r % 2}",
                "dataset_uri": "synthetic", "dataset_hash": "sha256:d", "config_json": "{}",
                "code_version": "bench", "started_at": datetime.now(UTC), "status": "running",
                "n_samples": args.shards * args.rows,
            })
            for k in range(args.shards):
                table = synthetic_samples(run_id, k, args.rows, rng)
                t0 = time.perf_counter()
                store.commit_shard(run_id, k, {"samples": table})
                commit_times.append(time.perf_counter() - t0)
        write_s = time.perf_counter() - t_write
        n_rows = store.read_table("samples", "bench-0").num_rows * args.runs
        bytes_on_disk = sum(p.stat().st_size for p in (store.root / "runs").rglob("*.parquet"))

        t0 = time.perf_counter()
        catalog.write_catalog_file(store)
        catalog_file_s = time.perf_counter() - t0

        def connect_only() -> None:
            catalog.connect(store).close()

        def group_by() -> None:
            con = catalog.connect(store)
            try:
                con.sql(GROUP_BY_SQL).to_arrow_table()
            finally:
                con.close()

        def named(name: str, **params) -> None:
            run_query(store, name, **params)

        results = {
            "connect": timed(connect_only, args.repeat),
            "samples_group_by_run": timed(group_by, args.repeat),
            "runs_overview": timed(lambda: named("runs_overview"), args.repeat),
            "run_summary": timed(lambda: named("run_summary", run_id="bench-0"), args.repeat),
            "flag_rates_by_checkpoint": timed(lambda: named("flag_rates_by_checkpoint"), args.repeat),
        }
        check = catalog.run_sql(store, "SELECT count(*) AS n FROM samples").column("n")[0].as_py()
        out = {
            "rows": check,
            "expected_rows": total,
            "runs": args.runs,
            "shards": args.runs * args.shards,
            "rows_per_shard": args.rows,
            "parquet_bytes": bytes_on_disk,
            "write_s": write_s,
            "commit_shard_median_s": statistics.median(commit_times),
            "commit_shard_max_s": max(commit_times),
            "catalog_file_rebuild_s": catalog_file_s,
            "queries": results,
            "target_s": 2.0,
            "meets_target": results["samples_group_by_run"]["median_s"] < 2.0 and results["runs_overview"]["median_s"] < 2.0,
            "platform": {"python": platform.python_version(), "machine": platform.machine(),
                         "duckdb": __import__("duckdb").__version__, "pyarrow": pa.__version__},
        }
        assert check == total == n_rows, (check, total, n_rows)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"rows {out['rows']:,} in {out['shards']} shards / {args.runs} runs, "
          f"{out['parquet_bytes'] / 1e6:.1f} MB Parquet")
    print(f"write (commit_shard incl. fsync + marker): {write_s:.2f} s total, "
          f"median {out['commit_shard_median_s'] * 1e3:.0f} ms/shard, max {out['commit_shard_max_s'] * 1e3:.0f} ms")
    print(f"catalog.duckdb rebuild: {catalog_file_s * 1e3:.0f} ms")
    print(f"{'query (fresh sandboxed connection each)':45s} {'first':>8s} {'median':>8s} {'max':>8s}")
    for name, t in results.items():
        print(f"{name:45s} {t['first_s'] * 1e3:7.0f}ms {t['median_s'] * 1e3:7.0f}ms {t['max_s'] * 1e3:7.0f}ms")
    print(f"target < 2 s: {'met' if out['meets_target'] else 'NOT met'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if out["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
