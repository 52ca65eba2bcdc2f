"""Method table with chance rows, word specificity and faithfulness; tuning sweeps on another seed.

    .venv/bin/python benchmarks/bench_method.py [--n 200] [--model DIR] [--json FILE] [--no-sweep]
                                                [--sweep-n N] [--faith-n N] [--clutter-n N]

(the same as `diffcam bench method`; the logic lives in evaluation/method_table.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffcam.evaluation.method_table import main
from diffcam.flows.paths import DEFAULT_MODEL

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-n", type=int, default=None)
    ap.add_argument("--faith-n", type=int, default=None)
    ap.add_argument("--clutter-n", type=int, default=None)
    a = ap.parse_args()
    main(n=a.n, model=a.model, json_out=a.json, sweep=not a.no_sweep, sweep_n=a.sweep_n, faith_n=a.faith_n,
         clutter_n=a.clutter_n)
