"""What `--faithfulness` costs an audit: the same audit with and without it, in one run.

    .venv/bin/python benchmarks/bench_faithfulness_cost.py [--n 200] [--fraction 0.1] [--workers 2]
                                                          [--model DIR] [--json FILE]

Runs ``diffcam audit --limit N --faithfulness 0`` and then ``--faithfulness F`` on the
built-in synthetic dataset (each in a fresh process, its own store), and prints:

- wall ratio: whole command, with / without (what a user waits for; includes start-up,
  validation, bias step and report, which faithfulness does not touch);
- compute ratio: the samples' summed ``t_total_s`` with / without (the per-sample work
  in the workers: generation, attribution and, on the selected samples, faithfulness);
- how many samples were measured and their mean ``t_faithfulness_s``;
- the within-run compute ratio: the "with" run's summed ``t_total_s`` over the same sum
  minus its ``t_faithfulness_s`` — both halves measured under the same machine load, so
  it is the figure to trust on a shared machine, where two runs minutes apart see
  different loads.

The target (docs/EVALUATION.md §3) is a wall ratio of at most 1.5 at F = 0.1. Numbers on a busy machine
are noisy: read the ratio, not the third digit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIFFCAM = Path(sys.executable).parent / "diffcam"


def run_audit(store: Path, n: int, fraction: float, workers: int, model: Path | None) -> dict:
    cmd = [str(DIFFCAM), "audit", "--limit", str(n), "--faithfulness", str(fraction), "--workers", str(workers),
           "--store", str(store), "--run-id", f"faith-{fraction}", "--json", str(store / "summary.json")]
    if model is not None:
        cmd += ["--model", str(model)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    import duckdb

    files = str(store / "runs" / "**" / "samples" / "*.parquet")
    con = duckdb.connect()
    total, faith, n_faith, n_samples, faith_sum = con.execute(
        f"SELECT sum(t_total_s), avg(t_faithfulness_s), count(t_faithfulness_s), count(*), "
        f"coalesce(sum(t_faithfulness_s), 0) "
        f"FROM read_parquet('{files}', hive_partitioning=false, union_by_name=true)").fetchone()
    return {"wall_s": wall, "compute_s": float(total), "n_samples": int(n_samples),
            "n_faithfulness_samples": int(n_faith), "mean_t_faithfulness_s": None if faith is None else float(faith),
            # the same run's samples without their faithfulness part: a ratio free of load changes between runs
            "within_run_compute_ratio": float(total) / (float(total) - float(faith_sum))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="diffcam-faith-cost-") as tmp:
        base = run_audit(Path(tmp) / "off", a.n, 0.0, a.workers, a.model)
        print(f"without: {base}", flush=True)
        with_f = run_audit(Path(tmp) / "on", a.n, a.fraction, a.workers, a.model)
        print(f"with --faithfulness {a.fraction}: {with_f}", flush=True)
    out = {"n": a.n, "fraction": a.fraction, "workers": a.workers, "without": base, "with": with_f,
           "wall_ratio": with_f["wall_s"] / base["wall_s"], "compute_ratio": with_f["compute_s"] / base["compute_s"]}
    print(f"wall ratio {out['wall_ratio']:.2f}x (target <= 1.5x); compute ratio {out['compute_ratio']:.2f}x; "
          f"within-run compute ratio {with_f['within_run_compute_ratio']:.2f}x; "
          f"{with_f['n_faithfulness_samples']} of {with_f['n_samples']} samples measured, "
          f"{with_f['mean_t_faithfulness_s']:.2f} s each")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
