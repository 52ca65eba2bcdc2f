"""A model that reads a marker as an object of its own: does the audit say so, and not "shortcut"?

    .venv/bin/python benchmarks/bench_marker_object.py [--model models/tiny-shapes] [--n 100] [--seed 2]
        [--cue '{"word": "circle", "pos": "top-right", "size": 12, "color": "purple", "p": 1.0}']
        [--json FILE] [--threads 1]

Issue 17's false finding: the shipped *clean* model, audited on images carrying a marker it
never saw, reads the marker as an extra object in some answers; the audit used to raise a
confirmed `clever_hans` (shortcut) flag for it, exactly as for a model trained on the
shortcut. This audits the model on such data (the cue zoo's machinery,
`diffcam.evaluation.zoo_eval.audit_entry`, default `BiasSettings`), measures the behaviour directly
(erase the marker: does the word vanish? does the answer name fewer objects?
`diffcam.evaluation.cue_dependence`, `zoo_recipes.extra_object_count`, on the same images) and prints
the dataset-level flags by kind with their counterfactual verdicts. The default marker is
the cue zoo's calibration `marker-object-b` marker; the default model is the shipped clean
checkpoint, a calibration model (the zoo's held-out models are not used here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from diffcam.evaluation import zoo_eval, zoo_recipes

REPO = Path(__file__).resolve().parents[1]

DEFAULT_CUE = {"word": "circle", "pos": "top-right", "size": 12, "color": "purple", "p": 1.0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "tiny-shapes")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--cue", type=json.loads, default=DEFAULT_CUE, help="the marker, as a JSON cue dict")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)

    import torch

    from diffcam.core.bias.settings import BiasSettings
    from diffcam.core.models.base import load_adapter
    from diffcam.evaluation.cue_dependence import cue_dependence

    torch.set_num_threads(a.threads)
    entry = {"name": f"{a.model.name}-marker", "kind": "marker_as_object", "source": "shipped", "split": "calibration",
             "path": str(a.model), "data": "fixed_cue", "audit_cue": a.cue}
    rec = zoo_recipes.load_recipes()
    t0 = time.perf_counter()
    samples, synth = zoo_recipes.audit_samples(entry, a.n, a.seed)
    adapter = load_adapter(a.model)
    truth = {"cue_dependence": cue_dependence(adapter, samples, synth, a.seed),
             "extra_objects": zoo_recipes.extra_object_count(adapter, samples, synth)}
    t_truth = time.perf_counter() - t0
    cache = Path(tempfile.mkdtemp(prefix="diffcam-marker-object-"))
    res = zoo_eval.audit_entry(entry, rec, REPO / "models" / "zoo", cache, a.seed, a.n, BiasSettings(), device="cpu",
                              threads=a.threads, log=lambda m: print(m, file=sys.stderr, flush=True))
    dataset = []
    for r in res["rows"]:
        if r["sample_id"] is not None:
            continue
        ev = json.loads(r["evidence_json"])
        cf = ev.get("counterfactual") or {}
        dataset.append({"kind": r["kind"], "word": r["word"], "method": r["method"], "region": r["region"],
                        "score": round(r["score"], 4), "confirmed": r["confirmed"], "found_by": ev.get("found_by"),
                        "finding": cf.get("finding"),
                        "verdict": {k: v for k, v in (cf.get("verdict") or {}).items() if k in (
                            "kind", "named_score", "shortcut_score", "named_rate", "shortcut_rate", "n")},
                        "refuted_by": ev.get("refuted_by")})
    verdicts: dict[str, int] = {}
    for r in res["rows"]:
        if r["kind"] == "suspect_region":
            v = json.loads(r["evidence_json"]).get("verdict")
            verdicts[v] = verdicts.get(v, 0) + 1
    out = {"model": str(a.model), "n": a.n, "seed": a.seed, "cue": a.cue, "ground_truth": truth,
           "dataset_flags": dataset, "suspect_region_verdicts": verdicts,
           "seconds": {"ground_truth": round(t_truth, 1), **res["seconds"]}}
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if a.json:
        a.json.write_text(text)
    return out


if __name__ == "__main__":
    main()
