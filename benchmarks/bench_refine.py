"""Time Diffusion-CAM refinement ("full" preset) against the literal per-pixel reference.

    .venv/bin/python benchmarks/bench_refine.py [--n N] [--grid 8 16 24 32] [--words 6] [--json FILE]

For each grid side, N seeded raw-map-like inputs (two Gaussian blobs + noise + zeros,
min-max to [0, 1]) are refined three ways: the literal loops of tests/literal_reference.py
one map at a time; `refine(H, "full")`, one vectorised call per map; and
`refine_stack(maps, "full")`, one vectorised call per answer of `--words` maps (how
`cam.explain` refines every word of a sample; the default 6 is about the mean answer
length of the synthetic benchmark, 3/7/10 words for 1/2/3 objects). The table shows the
median time per map of each, the speed-ups against the literal reference, the AKD kernel
sizes used and the largest absolute difference from the literal outputs (a correctness
check, not a timing).

Both modules are loaded from their files in this checkout (diffcam_core/refine.py and
tests/literal_reference.py import nothing from the project), so the script runs without
installing the package and without changing the import path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load(name: str, path: Path) -> ModuleType:
    """Import one file as a module (registered first so dataclasses can resolve it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cam_like(rng: np.random.Generator, side: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side]
    m = np.zeros((side, side))
    for _ in range(2):
        cy, cx, s = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(1.0, side / 4)
        m += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    m += 0.15 * rng.random((side, side))
    m[rng.random((side, side)) < 0.1] = 0.0
    m = np.maximum(m - np.quantile(m, 0.05), 0)
    return m / m.max()


def timed(fn, repeat: int) -> tuple[float, np.ndarray]:
    """Best of `repeat` wall-clock runs (seconds) and the last output."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="maps per grid size (default 20)")
    ap.add_argument("--grid", type=int, nargs="+", default=[8, 16, 24, 32], help="grid sides (default 8 16 24 32)")
    ap.add_argument("--n-steps", type=int, default=32, help="denoising steps given to AKD (default 32)")
    ap.add_argument("--words", type=int, default=6, help="maps per refine_stack call (words of one answer; default 6)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per map for the vectorised version; best kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.n < 1 or any(g < 1 for g in args.grid) or args.n_steps < 1 or args.repeat < 1 or args.words < 1:
        ap.error("--n, --grid, --n-steps, --repeat and --words must be positive")

    refine = load("bench_diffcam_refine", ROOT / "diffcam_core" / "refine.py")
    literal = load("bench_literal_reference", ROOT / "tests" / "literal_reference.py")

    rows = []
    for side in args.grid:
        rng = np.random.default_rng([args.seed, side])
        maps = [cam_like(rng, side) for _ in range(args.n)]
        ks, t_vec, t_lit, t_stack, diff = [], [], [], [], 0.0
        lit_out = []
        for H in maps:
            ks.append(refine.akd_kernel_size(H, args.n_steps))
            tv, ov = timed(lambda H=H: refine.refine(H, "full", n_steps=args.n_steps), args.repeat)
            tl, ol = timed(lambda H=H: literal.refine_full(H, args.n_steps), 1)
            t_vec.append(tv)
            t_lit.append(tl)
            lit_out.append(ol)
            diff = max(diff, float(np.abs(ov - ol).max()))
        # Answers: consecutive groups of --words maps (the maps cycle if N is smaller).
        order = [i % len(maps) for i in range(max(len(maps), args.words))]
        for start in range(0, len(order) - args.words + 1, args.words):
            idx = order[start : start + args.words]
            stack = np.stack([maps[i] for i in idx])
            ts, os_ = timed(lambda stack=stack: refine.refine_stack(stack, "full", n_steps=args.n_steps), args.repeat)
            t_stack.append(ts / args.words)
            diff = max(diff, max(float(np.abs(os_[j] - lit_out[i]).max()) for j, i in enumerate(idx)))
        vec_ms, lit_ms = 1e3 * float(np.median(t_vec)), 1e3 * float(np.median(t_lit))
        stack_ms = 1e3 * float(np.median(t_stack))
        rows.append(
            {
                "grid": side,
                "n": args.n,
                "words_per_stack": args.words,
                "kernel_sizes": sorted(set(ks)),
                "vectorised_ms_median": vec_ms,
                "stack_ms_per_map_median": stack_ms,
                "literal_ms_median": lit_ms,
                "speedup": lit_ms / vec_ms,
                "speedup_stack": lit_ms / stack_ms,
                "max_abs_diff": diff,
            }
        )

    print(
        f"refinement 'full' vs literal reference, n_steps={args.n_steps}, {args.n} maps per grid, "
        f"median ms per map; stack = refine_stack over {args.words} maps (one answer)"
    )
    print(
        f"{'grid':>7} {'AKD k':>10} {'literal':>9} {'refine':>8} {'speed-up':>9} "
        f"{'stack':>8} {'speed-up':>9} {'max |diff|':>11}"
    )
    for r in rows:
        ks = ",".join(map(str, r["kernel_sizes"]))
        print(
            f"{r['grid']:>3}x{r['grid']:<3} {ks:>10} {r['literal_ms_median']:>9.3f} {r['vectorised_ms_median']:>8.3f} "
            f"{r['speedup']:>8.1f}x {r['stack_ms_per_map_median']:>8.3f} {r['speedup_stack']:>8.1f}x "
            f"{r['max_abs_diff']:>11.1e}"
        )
    if args.json:
        payload = {
            "benchmark": "refine_full_vs_literal",
            "n_steps": args.n_steps,
            "words_per_stack": args.words,
            "seed": args.seed,
            "repeat": args.repeat,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "rows": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
