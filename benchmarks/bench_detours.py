"""The same audit with the code of a base revision and with this checkout, in one run.

    .venv/bin/python benchmarks/bench_detours.py [--base 7f9e410] [--n 200] [--workers 2]
                                                 [--cpus-per-worker 1] [--rounds 1] [--json FILE] [--keep DIR]

Why: a refactor that removes detours (loading the dataset once, preparing each sample once,
typed settings instead of JSON round trips) must cost less and change no number. This
script shows both in one run:

- cost: ``diffcam audit --limit N`` of the built-in synthetic dataset with the base
  revision's code (extracted with ``git archive``, put first on PYTHONPATH so its packages
  shadow the editable install; the script checks which ``flows/cli.py`` each run
  imported) and with this checkout's, each in a fresh process with its own store, the
  same model folder and thread settings; ``--rounds R`` alternates them R times. Printed:
  wall time per run and the samples' summed ``t_total_s`` (the workers' per-sample
  work), with the after/before ratios. On a shared machine read the ratio, not the
  third digit.
- sameness: every table of the two runs compared row by row (rows sorted by their
  keys; run ids, wall-clock timings and the run's timestamps left out). Printed per
  table: identical, or the columns whose values differ and the columns only one side
  has (a column a change adds is expected; a changed value is not).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("runs", "samples", "token_maps", "flags", "failures")
#: Columns that differ between two runs of the same code: ids, clocks, where the run was.
VOLATILE = {"run_id", "t_generate_s", "t_attribution_s", "t_total_s", "t_faithfulness_s", "started_at",
            "finished_at", "created_at", "updated_at", "wall_s", "store", "host", "code_version"}
LAUNCH = ("import sys, diffcam.flows.cli as c; print('imported', c.__file__, file=sys.stderr); "
          "sys.argv[0] = 'diffcam'; sys.exit(c.main())")


def extract(rev: str, dest: Path) -> Path:
    """The tree of `rev` (tracked files only) in `dest`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], check=True,
                             capture_output=True).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_audit(tree: Path, store: Path, n: int, workers: int, cpus: int, model: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", LAUNCH, "audit", "--limit", str(n), "--workers", str(workers), "--cpus-per-worker", str(cpus),
           "--model", str(model), "--store", str(store), "--run-id", "bench"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"audit with {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    imported = next(line.split(" ", 1)[1] for line in proc.stderr.splitlines() if line.startswith("imported "))
    if Path(imported).resolve() != (tree / "flows" / "cli.py").resolve():
        raise SystemExit(f"the run meant for {tree} imported {imported}")
    samples = read_table(store, "samples")
    return {"wall_s": wall, "samples_t_total_s": float(pc.sum(samples["t_total_s"]).as_py()),
            "n_samples": samples.num_rows}


def read_table(store: Path, table: str):
    files = sorted((store / "runs").glob(f"run_id=*/{table}/*.parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")


def _rows(table) -> list[tuple]:
    cols = [c for c in table.column_names if c not in VOLATILE]
    return cols, sorted(tuple(json.dumps(v, sort_keys=True, default=str) for v in row.values())
                        for row in table.select(cols).to_pylist())


def compare_tables(before: Path, after: Path) -> dict:
    out = {}
    for name in TABLES:
        a, b = read_table(before, name), read_table(after, name)
        if a is None or b is None:
            out[name] = {"rows_before": 0 if a is None else a.num_rows, "rows_after": 0 if b is None else b.num_rows,
                         "identical": a is None and b is None}
            continue
        only_before = sorted(set(a.column_names) - set(b.column_names))
        only_after = sorted(set(b.column_names) - set(a.column_names))
        common = [c for c in a.column_names if c in b.column_names and c not in VOLATILE]
        differing = []
        if a.num_rows == b.num_rows:
            # rows sorted by all common columns, then each column compared
            ca, ra = _rows(a.select(common))
            cb, rb = _rows(b.select(common))
            differing = [c for i, c in enumerate(ca) if [r[i] for r in ra] != [r[i] for r in rb]]
        out[name] = {"rows_before": a.num_rows, "rows_after": b.num_rows, "only_before": only_before,
                     "only_after": only_after, "differing_columns": differing if a.num_rows == b.num_rows else "row count",
                     "identical": a.num_rows == b.num_rows and not differing}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="7f9e410", help="git revision to compare with (default: 7f9e410)")
    ap.add_argument("--n", type=int, default=200, help="samples audited (default 200)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=int, default=1,
                    help="torch threads per worker (default 1: two workers' OpenMP threads must not fight on 2 cores)")
    ap.add_argument("--rounds", type=int, default=1, help="before/after pairs, alternated")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-shapes")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep the stores here instead of a temp folder")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-detours-")) if a.keep is None else a.keep
    base = extract(a.base, work / "base-tree")
    runs = {"before": [], "after": []}
    for r in range(a.rounds):
        for side, tree in (("before", base), ("after", ROOT)) if r % 2 == 0 else (("after", ROOT), ("before", base)):
            res = run_audit(tree, work / f"{side}-{r}", a.n, a.workers, a.cpus_per_worker, a.model.resolve())
            runs[side].append(res)
            print(f"round {r} {side}: wall {res['wall_s']:.1f} s, samples' t_total_s {res['samples_t_total_s']:.1f} s "
                  f"({res['n_samples']} samples)", flush=True)
    mean = {side: {k: sum(x[k] for x in v) / len(v) for k in ("wall_s", "samples_t_total_s")} for side, v in runs.items()}
    report = {
        "base": a.base, "n": a.n, "workers": a.workers, "rounds": a.rounds, "runs": runs, "mean": mean,
        "wall_ratio_after_over_before": mean["after"]["wall_s"] / mean["before"]["wall_s"],
        "per_sample_ratio_after_over_before": mean["after"]["samples_t_total_s"] / mean["before"]["samples_t_total_s"],
        "tables": compare_tables(work / "before-0", work / "after-0"),
    }
    print(f"wall after/before {report['wall_ratio_after_over_before']:.3f}; "
          f"per-sample work after/before {report['per_sample_ratio_after_over_before']:.3f}")
    for name, t in report["tables"].items():
        print(f"  {name}: {'identical' if t['identical'] else 'DIFFERENT'} {json.dumps(t)}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    if a.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
