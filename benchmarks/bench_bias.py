"""Bias audit on the planted-cue benchmark: detection numbers, false positives, cost.

    .venv/bin/python benchmarks/bench_bias.py [--planted models/tiny-shapes-cue] [--clean models/tiny-shapes]
        [--n 100] [--seed 2] [--cue word=circle,pos=top-left,size=6,color=magenta,p=0.9]
        [--out /tmp/bench-bias] [--json FILE] [--threads 1] [--device cpu]

One held-out synthetic set carrying the cue (seed 2, the method benchmark's held-out
seed) is audited in-process (`diffcam.evaluation.audit_in_process`: the worker's code without
Ray/Prefect) with both checkpoints, then `diffcam.tasks.bias.step.run_dataset_flags` runs on each run.
Printed (and written with --json):

- sample level, per map method: precision / recall of `off_object` flags against the
  samples that carry the cue (a sample is predicted positive when any of its words has
  an `off_object` flag of that method; also reported for the cue word alone), and the
  false-positive rate on the clean model (share of its samples with such a flag);
- the prototype's numbers: mean share of each map's mass on the cue's grid cell(s) for
  the cue word in cue-carrying samples, and how often the map peaks there;
- dataset level: every flag of each model (kind, word, method, score, threshold,
  region, confirmed) and whether the planted word is flagged on the cue's region;
- the raw scores behind every threshold (margins: planted vs clean), for calibration;
- cost of the dataset step (read + analysis, the dataset-level counterfactual, the
  per-sample counterfactual of kept flags) per 1,000 samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from diffcam.core.bias import dataset as bias_dataset
from diffcam.core.bias import windows as bias_windows
from diffcam.core.bias.settings import BiasSettings
from diffcam.core.cue_text import parse_cue
from diffcam.core.methods import methods_for
from diffcam.core.settings import CamSettings
from diffcam.core.synthetic import SynthSettings, cue_region
from diffcam.training.gemma import training_seeds
from diffcam.training.shipped import CUE as DEFAULT_CUE

REPO = Path(__file__).resolve().parents[1]

HELDOUT_SEED = 2
METHODS = methods_for("bias-dataset")  # the maps the bias audit reads


def _check_heldout(model_dir: Path, seed: int) -> None:
    seeds = training_seeds(model_dir)
    if seed in seeds:
        raise SystemExit(f"{model_dir} was trained on synthetic seeds {sorted(set(seeds))}: "
                         f"pick another --seed for held-out data")


def _prf(pred: set[str], truth: set[str], universe: set[str]) -> dict[str, float | int | None]:
    tp = len(pred & truth)
    fp = len(pred - truth)
    fn = len(truth - pred)
    neg = len(universe - truth)
    return {"tp": tp, "fp": fp, "fn": fn, "n_pos": len(truth), "n_neg": neg,
            "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "fpr": fp / neg if neg else None}


def _cue_cells(ss: SynthSettings, grid: tuple[int, int]) -> np.ndarray:
    x0, y0, x1, y1 = cue_region(ss)
    m = np.zeros((ss.image_size, ss.image_size), dtype=bool)
    m[y0:y1, x0:x1] = True
    return bias_windows.cell_coverage(m, grid) > 0


def audit(model: Path, ds_dir: Path, store, run_id: str, threads: int, device: str, log) -> dict:
    from diffcam.evaluation.audit_in_process import audit_in_process

    cam = CamSettings(methods=METHODS)
    if run_id in store.runs():
        log(f"{run_id}: already in the store, reused")
        return {"reused": True}
    return audit_in_process(store, run_id, model, ds_dir, cam, threads=threads, device=device, log=log)


def evaluate(store, run_id: str, ds_dir: Path, model: Path, ss: SynthSettings, settings: BiasSettings,
             device: str, log) -> dict:
    from diffcam.storage.datasets import load_dataset
    from diffcam.storage.schemas import format_region
    from diffcam.tasks.bias.read import load_run_maps, object_masks
    from diffcam.tasks.bias.step import analyse_run, run_dataset_flags, write_dataset_flags

    timings: dict = {}
    t0 = time.perf_counter()
    rows = run_dataset_flags(store, run_id, model, ds_dir, settings, sample_level="always", device=device,
                             log=log, info=timings)
    timings["total_s"] = time.perf_counter() - t0
    write_dataset_flags(store, run_id, rows)
    ds = load_dataset(ds_dir)
    cue_ids = {s.sample_id for s in ds.samples if s.extra.get("cue_present")}
    run = load_run_maps(store, run_id, METHODS)
    universe = set(run["words"])
    word = ss.cue.word
    out: dict = {"run_id": run_id, "n_samples": len(universe), "n_cue_samples": len(cue_ids & universe),
                 "timings": {k: v for k, v in timings.items() if k != "refuted"},
                 "refuted_suspects": timings.get("refuted", [])}
    # answers: does the model say the cue word?
    says = {sid for sid, ws in run["words"].items() if any(w.lower() == word for _, w, _ in ws)}
    out["says_cue_word"] = {"all": len(says), "cue_samples": len(says & cue_ids),
                            "no_cue_samples": len(says - cue_ids)}
    # sample level
    sl = {}
    for method in METHODS:
        any_word = {r["sample_id"] for r in rows if r["kind"] == "off_object" and r["method"] == method}
        cue_word = {r["sample_id"] for r in rows if r["kind"] == "off_object" and r["method"] == method
                    and r["word"].lower() == word}
        border = {r["sample_id"] for r in rows if r["kind"] == "border_hotspot" and r["method"] == method}
        region = {r["sample_id"] for r in rows if r["kind"] == "suspect_region" and r["method"] == method}
        sl[method] = {"suspect_region": _prf(region, cue_ids, universe),
                      "off_object_any_word": _prf(any_word, cue_ids, universe),
                      "off_object_cue_word": _prf(cue_word, cue_ids, universe),
                      "border_hotspot_any_word": _prf(border, cue_ids, universe),
                      "n_off_object_flags": sum(1 for r in rows if r["kind"] == "off_object" and r["method"] == method),
                      "n_zero_or_flat": sum(1 for r in rows if r["kind"] in ("zero_map", "flat_map")
                                            and r["method"] == method)}
    out["sample_level"] = sl
    # prototype numbers: mass share on the cue cell(s), peak on it — cue word, cue samples / others
    proto = {}
    for method in METHODS:
        shares = defaultdict(list)
        peaks = defaultdict(list)
        for (sid, wi, m), a in run["maps"].items():
            if m != method:
                continue
            w = dict((i, t) for i, t, _ in run["words"][sid])[wi].lower()
            if w != word or not a.sum() > 0:
                continue
            cells = _cue_cells(ss, a.shape)
            key = "cue_samples" if sid in cue_ids else "no_cue_samples"
            shares[key].append(float(a[cells].sum() / a.sum()))
            peaks[key].append(bool(cells.ravel()[int(np.argmax(a))]))
        proto[method] = {k: {"n": len(v), "mean_share_on_cue_cell": float(np.mean(v)),
                             "peak_on_cue_cell": float(np.mean(peaks[k]))} for k, v in shares.items()}
    out["cue_cell"] = proto
    # dataset level
    dl = [r for r in rows if r["sample_id"] is None]
    cue_box = [v / ss.image_size for v in cue_region(ss)]
    out["dataset_flags"] = []
    for r in dl:
        reg = None if r["region"] is None else [float(v) for v in r["region"].split(",")]
        holds = reg is not None and reg[0] <= cue_box[0] and reg[1] <= cue_box[1] and cue_box[2] <= reg[2] \
            and cue_box[3] <= reg[3]
        ev = json.loads(r["evidence_json"])
        cf = ev.get("counterfactual") or {}
        out["dataset_flags"].append({
            "kind": r["kind"], "word": r["word"], "method": r["method"], "score": r["score"],
            "threshold": r["threshold"], "region": r["region"], "region_holds_cue": holds,
            "confirmed": r["confirmed"], "n_samples": ev.get("n_sample_ids"),
            "members_with_cue": len(set(ev.get("sample_ids", [])) & cue_ids),
            "cf": {k: cf.get(k) for k in ("n_tested", "persist", "persist_both", "vanish", "vanish_control",
                                         "seconds", "n_generations", "why")} if cf else None})
    # raw scores behind the thresholds (calibration margins)
    objects = object_masks(ds, sorted(run["words"]))
    t1 = time.perf_counter()
    _, _, analyses = analyse_run(run, objects, settings)
    analyse_only = time.perf_counter() - t1
    raw = {}
    for (w, m), a in analyses.items():
        raw[f"{w}/{m}"] = {
            "n": a["n"], "centre_bias": None if a["centre_bias"] is None else round(a["centre_bias"]["score"], 4),
            "centre_enrichment": None if a["centre_bias"] is None else round(a["centre_bias"]["map_centre_enrichment"], 3),
            "gap": None if a["shuffle"] is None else round(a["shuffle"]["gap"], 4),
            "similarity": None if a["content_independence"]["mean"] is None else round(a["content_independence"]["mean"], 3),
            "k": None if a["clusters"] is None else a["clusters"]["k"]}
    out["raw_dataset_scores"] = raw
    # every cluster's best off-object region with the gates at 0: share, consistency, specificity (top 10)
    loose = settings.with_(cluster_enrichment_min=0.0, cluster_consistency_min=0.0, cluster_specificity_min=0.0,
                           min_cluster_size=1, min_cluster_frac=0.0)
    _, _, loose_analyses = analyse_run(run, objects, loose.with_(sample_methods=()))
    cands = []
    for f in bias_dataset.all_dataset_flags(loose_analyses, loose):
        if f.kind != "clever_hans":
            continue
        ev = f.evidence
        cands.append({"word": f.word, "method": f.method, "region": format_region(*f.region), "share": round(f.score, 4),
                      "consistency": round(ev["consistency"], 3), "specificity": ev["specificity"],
                      "size": ev["cluster_size"], "k": ev["k"], "members_with_cue": len(set(ev["sample_ids"]) & cue_ids),
                      "enrichment": round(ev["cluster_enrichment"], 3),
                      "passes": ev["cluster_enrichment"] >= settings.cluster_enrichment_min
                      and ev["cluster_size"] >= max(settings.min_cluster_size, settings.min_cluster_frac * ev["n_maps"])
                      and ev["consistency"] >= settings.cluster_consistency_min
                      and (ev["specificity"] or 0) >= settings.cluster_specificity_min})
    cands.sort(key=lambda d: -(d["share"] * min(d["specificity"] or 0.0, 10.0) * d["consistency"]))
    out["clever_hans_candidates"] = cands[:10]
    # raw sample scores: off-object hot-spot share with every gate at 0
    loose = BiasSettings(off_object_threshold=0.0, off_object_dominance=0.0, border_threshold=0.0)
    sflags, _, _ = analyse_run(run, objects, loose.with_(dataset_methods=(), sample_methods=METHODS))
    scores = defaultdict(lambda: defaultdict(float))
    for f in sflags:
        if f.kind != "off_object":
            continue
        ev = f.evidence
        key = (f.sample_id, f.method)
        margin = f.score if f.score >= ev["inside_share"] else -1.0  # fails the dominance gate
        scores[key]["score"] = max(scores[key]["score"], margin)
    sweep = {}
    for method in METHODS:
        rowsm = []
        for thr in (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5):
            pred = {sid for (sid, m), d in scores.items() if m == method and d["score"] >= thr}
            p = _prf(pred, cue_ids, universe)
            rowsm.append({"threshold": thr, "precision": p["precision"], "recall": p["recall"], "fpr": p["fpr"]})
        sweep[method] = rowsm
    out["off_object_sweep"] = sweep
    out["timings"]["analyse_only_s"] = analyse_only
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--planted", type=Path, default=REPO / "models" / "tiny-shapes-cue")
    ap.add_argument("--clean", type=Path, default=REPO / "models" / "tiny-shapes")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=HELDOUT_SEED)
    ap.add_argument("--cue", default=DEFAULT_CUE)
    ap.add_argument("--out", type=Path, default=Path("/tmp/diffcam-bench-bias"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--report", action="store_true", help="also write the HTML report of each run")
    a = ap.parse_args(argv)

    from diffcam.storage.store import Store
    from diffcam.storage.synthetic_writer import write_synthetic_dataset

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for m in (a.planted, a.clean):
        if not (m / "config.json").is_file():
            raise SystemExit(f"model folder {m} is missing (no config.json)")
        _check_heldout(m, a.seed)
    ss = SynthSettings(cue=parse_cue(a.cue))
    ds_dir = a.out / f"heldout-seed{a.seed}-n{a.n}-{ss.cue.word}-{ss.cue.pos}-{ss.cue.color}"
    if not (ds_dir / "manifest.jsonl").is_file():
        write_synthetic_dataset(ds_dir, a.n, a.seed, ss)
    store = Store(a.out / "store")
    settings = BiasSettings()
    result: dict = {"n": a.n, "seed": a.seed, "cue": ss.cue.to_dict(), "settings": settings.model_dump(mode="json"), "models": {}}
    for label, model in (("planted", a.planted), ("clean", a.clean)):
        run_id = f"{label}-{model.name}-seed{a.seed}-n{a.n}"
        if run_id in store.runs():  # a fresh evaluation each time: flags are written once per run
            import shutil

            shutil.rmtree(store.run_dir(run_id))
        t = audit(model, ds_dir, store, run_id, a.threads, a.device, log)
        res = evaluate(store, run_id, ds_dir, model, ss, settings, a.device, log)
        res["audit"] = t
        result["models"][label] = res
        if a.report:
            from diffcam.storage.report import DEFAULT_SECTIONS, build_report
            from diffcam.tasks.bias.report import BIAS_SECTION

            html_path, _ = build_report(store, run_id, a.out / "reports" / run_id,
                                        sections=[*DEFAULT_SECTIONS, BIAS_SECTION])
            res["report"] = str(html_path)
    p, c = result["models"]["planted"], result["models"]["clean"]
    n_total = p["n_samples"] + c["n_samples"]
    step = p["timings"]["read_s"] + p["timings"]["analyse_s"] + c["timings"]["read_s"] + c["timings"]["analyse_s"]
    cf = p["timings"]["counterfactual_s"] + c["timings"]["counterfactual_s"]
    per_sample_cf = p["timings"]["sample_counterfactual_s"] + c["timings"]["sample_counterfactual_s"]
    result["cost"] = {"dataset_step_s_per_1000_samples": 1000 * step / max(n_total, 1),
                      "counterfactual_s_total": cf,
                      "sample_counterfactual_s_per_1000_samples": 1000 * per_sample_cf / max(n_total, 1),
                      "note": "read + analysis (sample flags, clustering, all words and methods) scale with samples; "
                              "the dataset-level counterfactual costs 5 generations per tested member (at most "
                              "cf_max_samples) per clever_hans flag; the per-sample counterfactual 2 generations per "
                              "sample whose answer has a kept flag's word (none without a kept flag)"}
    word = ss.cue.word
    planted_hit = [f for f in p["dataset_flags"] if f["kind"] == "clever_hans" and f["word"] == word
                   and f["region_holds_cue"]]
    result["verdict"] = {
        "planted_word_flagged_on_cue_region": bool(planted_hit),
        "planted_flag_confirmed": any(f["confirmed"] for f in planted_hit),
        "planted_flag_methods": sorted({f["method"] for f in planted_hit}),
        "clean_dataset_flags": len(c["dataset_flags"]),
    }
    text = json.dumps(result, indent=1, default=str)
    if a.json:
        a.json.write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
