"""The cue zoo: build small models with known shortcuts, then judge the bias audit on models
its thresholds were not fitted to.

    python benchmarks/cue_zoo.py build --out models/zoo [--only NAME ...] [--device cuda]
        [--threads 1] [--include-expensive] [--steps N --n-train N]   (the last two: smoke runs only)
    python benchmarks/cue_zoo.py eval --json FILE [--zoo models/zoo] [--quick] [--cache DIR]
    python benchmarks/cue_zoo.py eval --add NAME ... --to FULL.json --json FILE   (a model built later)
    python benchmarks/cue_zoo.py list

Recipes and ground truth: `diffcam.evaluation.zoo_recipes`; the evaluation (threshold fit on
the calibration split, held-out figures): `diffcam.evaluation.zoo_eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from diffcam.evaluation.zoo_eval import evaluate, evaluate_added
from diffcam.evaluation.zoo_recipes import (
    RECIPES,
    REPO,
    build_command,
    entry_cue,
    load_recipes,
    measure_ground_truth,
    model_dir,
    train_entry,
    update_json,
)


def _build_in_parallel(a: argparse.Namespace, rec: dict[str, Any]) -> None:
    """``--jobs N``: the selected entries dealt round-robin (in file order) to N builds of
    their own, run side by side (each its own process and ``--threads``; they share
    ``ground_truth.json`` under its lock). For a GPU, where one tiny model leaves the device
    mostly idle; on a 2-core CPU use at most 2 jobs of 1 thread. Audit-only entries run after
    the trained ones, since they need their model."""
    import subprocess

    chosen = [e for e in rec["entries"] if not a.only or e["name"] in a.only]
    first = [e["name"] for e in chosen if e["source"] != "audit_only"]
    later = [e["name"] for e in chosen if e["source"] == "audit_only"]
    for names in (first, later):
        lists = [names[k::a.jobs] for k in range(a.jobs)]
        procs = []
        for k, only in enumerate(x for x in lists if x):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--recipes", str(a.recipes), "build", "--out",
                   str(a.out), "--device", a.device, "--threads", str(a.threads), "--only", *only]
            cmd += ["--retrain"] if a.retrain else []
            cmd += ["--include-expensive"] if a.include_expensive else []
            cmd += [] if a.steps is None else ["--steps", str(a.steps)]
            cmd += [] if a.n_train is None else ["--n-train", str(a.n_train)]
            log = a.out / f"build-job{k}.log"
            print(f"job {k}: {' '.join(only)} (log: {log})", flush=True)
            procs.append((subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO), log))
        failed = [str(log) for p, log in procs if p.wait() != 0]
        if failed:
            raise SystemExit(f"{len(failed)} build job(s) failed; see {', '.join(failed)}")


def cmd_build(a: argparse.Namespace) -> None:
    import torch

    from diffcam.core.models.base import load_adapter

    torch.set_num_threads(a.threads)
    rec = load_recipes(a.recipes)
    names = {e["name"] for e in rec["entries"]}
    unknown = sorted(set(a.only or ()) - names)
    if unknown:
        raise SystemExit(f"unknown zoo entries {unknown}; `python benchmarks/cue_zoo.py list` lists them")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.jobs > 1:
        return _build_in_parallel(a, rec)
    gt_path = a.out / "ground_truth.json"
    for e in rec["entries"]:
        if a.only and e["name"] not in a.only:
            continue
        t0 = time.perf_counter()
        mdir = model_dir(e, rec, a.out)
        if e["source"] == "recipe_only":
            if not a.include_expensive:
                print(f"{e['name']}: skipped (recipe only: {e['cost_note']}; --include-expensive builds it)")
                continue
            import subprocess

            cmd = [sys.executable, *e["command"][:1], "--out", str(mdir), *e["command"][1:]]
            if a.device != "cpu":
                cmd += ["--device", a.device]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=REPO)
        elif e["source"] == "train":
            if (mdir / "config.json").is_file() and not a.retrain:
                print(f"{e['name']}: {mdir} exists, not retrained (--retrain to redo)")
            else:
                train_entry(e, rec, mdir, device=a.device, threads=a.threads, steps=a.steps, n_train=a.n_train)
        if not (mdir / "config.json").is_file():
            raise SystemExit(f"{e['name']}: no checkpoint at {mdir}; build its model first: "
                             f"{build_command(e.get('model'), a.out)}")
        gt = measure_ground_truth(load_adapter(mdir, device=a.device), e, rec)
        gt["model_dir"] = str(mdir)
        gt["build_seconds"] = round(time.perf_counter() - t0, 1)
        update_json(gt_path, e["name"], gt)
        print(json.dumps(gt), flush=True)
    # git-ignored, outside the zoo's budget: cache-only recipes and the recipe-only known miss
    cached = {e["name"] for e in rec["entries"] if e.get("cache_only") or e["source"] == "recipe_only"}
    sizes = {p.parent.name: p.stat().st_size for p in a.out.glob("*/model.safetensors")}
    kept = [v for k, v in sizes.items() if k not in cached]
    print(f"zoo: {len(kept)} checkpoints, {sum(kept) / 1e6:.1f} MB of safetensors (limit {rec['zoo_limit_mb']} MB)"
          + (f"; outside the budget (git-ignored): {sorted(set(sizes) & cached)}" if set(sizes) & cached else ""))


def cmd_eval(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    rec = load_recipes(a.recipes)
    if bool(a.add) != bool(a.to):
        raise SystemExit("--add NAME ... and --to FILE go together: the held-out models to judge, and the full "
                         "evaluation whose thresholds judge them")
    if a.add:
        if a.quick or a.allow_missing:
            raise SystemExit("--add takes neither --quick nor --allow-missing")
        if not a.to.is_file():
            raise SystemExit(f"--to {a.to}: no such evaluation file (write one with `eval --json`)")
        out = evaluate_added(rec, a.zoo, a.cache, json.loads(a.to.read_text()), a.add, device=a.device,
                             threads=a.threads, jobs=a.jobs)
    else:
        out = evaluate(rec, a.zoo, a.cache, quick=a.quick, device=a.device, threads=a.threads,
                       allow_missing=a.allow_missing, jobs=a.jobs)
    for name, why in out["not_built"].items():
        print(f"NOT EVALUATED {name}: {why}", file=sys.stderr)
    text = json.dumps(out, indent=1, default=str)
    a.json.write_text(text)
    print(json.dumps(out["heldout"], indent=1))


def cmd_list(a: argparse.Namespace) -> None:
    rec = load_recipes(a.recipes)
    for e in rec["entries"]:
        cue = entry_cue(e)
        print(f"{e['split']:<11} {e['kind']:<16} {e['source']:<11} {e['name']:<30} "
              f"{'' if cue is None else json.dumps(cue)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", type=Path, default=RECIPES)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the zoo and measure each model's reliance (ground_truth.json)")
    b.add_argument("--out", type=Path, default=REPO / "models" / "zoo")
    b.add_argument("--only", nargs="+", default=None, metavar="NAME")
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--retrain", action="store_true", help="retrain models whose folder exists")
    b.add_argument("--jobs", type=int, default=1,
                   help="builds run side by side, entries dealt round-robin (a GPU: 8; this 2-core CPU: 2)")
    b.add_argument("--include-expensive", action="store_true", help="also run recipe-only entries (the known miss)")
    b.add_argument("--steps", type=int, default=None, help="smoke runs only (recorded as smoke)")
    b.add_argument("--n-train", type=int, default=None, help="smoke runs only (recorded as smoke)")
    b.set_defaults(func=cmd_build)
    e = sub.add_parser("eval", help="fit thresholds on calibration models, report on held-out ones")
    e.add_argument("--json", type=Path, required=True)
    e.add_argument("--zoo", type=Path, default=REPO / "models" / "zoo")
    e.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "diffcam-cue-zoo")
    e.add_argument("--quick", action="store_true", help="the fixed subset in recipes.json `quick`")
    e.add_argument("--jobs", type=int, default=1,
                   help="audits run side by side in worker processes of --threads each (this 2-core CPU: 2 x 1)")
    e.add_argument("--allow-missing", action="store_true",
                   help="evaluate the models that are built; list the others (and how to build them) under not_built")
    e.add_argument("--add", nargs="+", default=None, metavar="NAME",
                   help="judge these held-out models (built after the --to evaluation) with the thresholds that "
                        "evaluation fitted, and recompute its held-out figures; the result goes to --json")
    e.add_argument("--to", type=Path, default=None, metavar="FILE", help="the full evaluation --add extends")
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=1)
    e.set_defaults(func=cmd_eval)
    sub.add_parser("list", help="the recipes and their split").set_defaults(func=cmd_list)
    a = ap.parse_args(argv)
    a.func(a)


if __name__ == "__main__":
    main()
