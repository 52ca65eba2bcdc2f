"""The audit's discovery scan (`diffcam.tasks.bias.scan`) on the shipped calibration pair: what it finds, what it costs.

    .venv/bin/python benchmarks/bench_scan_audit.py [--n 64] [--seed 2] [--planted models/tiny-shapes-cue]
        [--clean models/tiny-shapes] [--cue SPEC] [--threads 1] [--json FILE]

For each model: audit ``n`` held-out images carrying the shipped cue in-process
(`diffcam.evaluation.audit_in_process`, the three dataset methods), then run the bias step
(`diffcam.tasks.bias.step.run_dataset_flags`) twice on the same run: with the default `BiasSettings` (scan
on) and with ``scan_max_samples=0``. Reports per model the dataset-level flags of both, the
scan's time and number of scanned images (seconds per scanned image: generation + 1 + 64
scored images on the 8×8 grid), the bias step's time with and without it, and per word the
largest hit rate of any off-object window (how close a word came to a scan suspect: the
threshold is ``scan_min_hit_rate``). Only the shipped calibration pair is used; never the
zoo's held-out models.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from diffcam.core.cue_text import parse_cue
from diffcam.core.methods import methods_for
from diffcam.training.shipped import CUE as DEFAULT_CUE

REPO = Path(__file__).resolve().parents[1]

METHODS = methods_for("bias-dataset")  # the maps the bias audit reads


def bench_model(model: Path, ds_dir: Path, store_dir: Path, threads: int) -> dict:
    import torch

    from diffcam.core.bias.settings import BiasSettings
    from diffcam.core.settings import CamSettings
    from diffcam.evaluation.audit_in_process import audit_in_process
    from diffcam.storage.store import Store
    from diffcam.tasks.bias.step import run_dataset_flags

    torch.set_num_threads(threads)
    st = Store(store_dir)
    run_id = model.name
    t0 = time.perf_counter()
    audit_in_process(st, run_id, model, ds_dir, CamSettings(methods=METHODS), threads=threads)
    out: dict = {"model": str(model), "audit_s": round(time.perf_counter() - t0, 2)}
    for label, settings in (("scan", BiasSettings()), ("no_scan", BiasSettings(scan_max_samples=0))):
        info: dict = {}
        t0 = time.perf_counter()
        rows = run_dataset_flags(st, run_id, model, ds_dir, settings, info=info)
        side = {"bias_step_s": round(time.perf_counter() - t0, 2),
                "dataset_flags": [{"kind": r["kind"], "word": r["word"], "method": r["method"], "region": r["region"],
                                   "confirmed": r["confirmed"],
                                   "found_by": json.loads(r["evidence_json"]).get("found_by", "saliency")}
                                  for r in rows if r["sample_id"] is None],
                "n_suspect_region": sum(r["kind"] == "suspect_region" for r in rows),
                "refuted": info.get("refuted")}
        if label == "scan":
            n = info["n_scanned_images"]
            side.update(scan_s=round(info["scan_s"], 2), n_scanned_images=n, n_scan_suspects=info["n_scan_suspects"],
                        s_per_scanned_image=round(info["scan_s"] / n, 3) if n else None,
                        words={w: {k: v.get(k) for k in ("n_images", "n_candidates", "n_duplicates",
                                                         "max_off_object_hit_rate", "skipped") if k in v}
                               for w, v in (info["scan"] or {}).items()})
        out[label] = side
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--planted", type=Path, default=REPO / "models" / "tiny-shapes-cue")
    ap.add_argument("--clean", type=Path, default=REPO / "models" / "tiny-shapes")
    ap.add_argument("--cue", default=DEFAULT_CUE)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from diffcam.core.bias.settings import BiasSettings
    from diffcam.core.synthetic import SynthSettings
    from diffcam.storage.synthetic_writer import write_synthetic_dataset

    s = BiasSettings()
    out = {"n": a.n, "seed": a.seed, "cue": a.cue, "threads": a.threads,
           "settings": {k: getattr(s, k) for k in ("scan_max_samples", "scan_min_drop", "scan_min_hit_rate",
                                                   "scan_words", "hotspot_size", "min_word_samples")},
           "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ds_dir = write_synthetic_dataset(Path(tmp) / "ds", a.n, a.seed, SynthSettings(cue=parse_cue(a.cue)))
        for name, model in (("planted", a.planted), ("clean", a.clean)):
            r = bench_model(model, ds_dir, Path(tmp) / f"store-{name}", a.threads)
            out["models"][name] = r
            sc = r["scan"]
            print(f"{name} ({model}): audit {r['audit_s']} s; bias step {sc['bias_step_s']} s with the scan, "
                  f"{r['no_scan']['bias_step_s']} s without; scan {sc['scan_s']} s for {sc['n_scanned_images']} "
                  f"images ({sc['s_per_scanned_image']} s each), {sc['n_scan_suspects']} scan suspect(s); "
                  f"dataset flags with the scan: {sc['dataset_flags']}; without: {r['no_scan']['dataset_flags']}; "
                  "max off-object hit rate per word: "
                  f"{ {w: v.get('max_off_object_hit_rate') for w, v in sc['words'].items()} }", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
