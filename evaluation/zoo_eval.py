"""Judging the bias audit on the cue zoo: fit thresholds on the calibration models, then
audit the held-out models with them.

`evaluate` audits the calibration models (the gates loosened, refuted suspects kept), fits
the thresholds with `diffcam.evaluation.zoo_stats.fit_thresholds`, then audits the held-out
models with the fitted `BiasSettings` and reduces them with `zoo_stats.heldout_metrics`.
Why the split is fixed in the recipes file: a threshold fitted where it is judged measures
nothing but the fit (docs/BIAS.md "The cue zoo"). Command line: `benchmarks/cue_zoo.py eval`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from diffcam.core.synthetic import SynthSettings, cue_region
from diffcam.evaluation import zoo_stats
from diffcam.evaluation.zoo_recipes import (
    METHODS,
    NAMES_MARKER_MIN,
    audit_samples,
    build_command,
    cue_spec,
    entry_cue,
    is_moving,
    model_dir,
    write_samples,
)


def _norm_box(box: list[int] | tuple[int, ...], n: int) -> list[float]:
    return [v / n for v in box]


def entry_cue_box(entry: dict[str, Any]) -> list[float] | None:
    """The marker's box in normalised coordinates; None for a per-image marker or no marker."""
    cue = entry_cue(entry)
    if cue is None or is_moving(cue):
        return None
    settings = SynthSettings(cue=cue_spec(cue))
    return _norm_box(cue_region(settings), settings.image_size)


def _parse_region(text: str | None) -> list[float] | None:
    return None if not text else [float(v) for v in text.split(",")]


def calibration_settings():
    """The calibration audit: every saliency gate at half its default, refuted suspects kept
    (their counterfactual numbers are the negatives), no per-sample counterfactual."""
    from diffcam.core.bias.settings import BiasSettings

    d = BiasSettings()
    return d.with_(cluster_enrichment_min=d.cluster_enrichment_min / 2,
                   cluster_consistency_min=d.cluster_consistency_min / 2,
                   cluster_specificity_min=d.cluster_specificity_min / 2,
                   keep_refuted=True, region_cf_max_samples=0)


def cf_diff(evidence: dict[str, Any]) -> float | None:
    """The counterfactual's deciding difference: max(persist − persist_both, vanish − vanish_control)."""
    cf = evidence.get("counterfactual") or {}
    parts = [(cf.get("persist"), cf.get("persist_both")), (cf.get("vanish"), cf.get("vanish_control"))]
    vals = [a - b for a, b in parts if a is not None and b is not None]
    return max(vals) if vals else None


def calibration_stats(entry: dict[str, Any], rows: list[dict[str, Any]], centre: dict | None,
                      truth: dict[str, Any]) -> dict[str, Any]:
    """One calibration audit reduced to what `zoo_stats.fit_thresholds` needs."""
    cue = entry_cue(entry)
    model = {"cue_word": None if cue is None else cue["word"], "cue_box": entry_cue_box(entry)}
    cue_cands, others = [], []
    for r in rows:
        if r["sample_id"] is not None or r["kind"] != "clever_hans":
            continue
        ev = json.loads(r["evidence_json"])
        flag = {"kind": r["kind"], "word": r["word"], "region": _parse_region(r["region"]), "confirmed": None}
        if ev.get("found_by") == "scan":
            # a scan suspect has no saliency statistics (its score is a hit rate) for the saliency
            # gates; off the cue, its counterfactual difference is one more negative
            if not (entry["kind"] == "cue" and zoo_stats.is_cue_flag(flag, model)):
                others.append(cf_diff(ev))
            continue
        stats = {"cluster_enrichment": ev.get("cluster_enrichment"), "consistency": ev.get("consistency"),
                 "specificity": ev.get("specificity"), "cf_diff": cf_diff(ev), "score": r["score"],
                 "word": r["word"], "method": r["method"], "region": r["region"]}
        if entry["kind"] == "cue" and zoo_stats.is_cue_flag(flag, model):
            cue_cands.append(stats)  # the cue itself, seen by one or more methods
        else:
            others.append(stats["cf_diff"])
    best = max(cue_cands, key=lambda c: c["score"] or 0.0) if cue_cands else None
    scores = [st["score"] for st in (centre or {}).values() if st]
    return {"name": entry["name"], "kind": entry["kind"], "relies": truth.get("relies", False),
            "centre_biased": truth.get("centre_biased", False), "cue_candidate": best,
            "other_cf_diffs": [v for v in others if v is not None],
            "centre_score": max(scores) if scores else None}


def centre_summary(centre: dict | None) -> dict[str, Any] | None:
    """What the run-level centre flags were decided on, kept for every held-out model (flagged
    or not): each method's map score against the objects' prior, and the naming test's z and gap."""
    from diffcam.core.bias.centre import naming_z

    stats = {m: st for m, st in sorted((centre or {}).items()) if st}
    if not stats:
        return None
    st = next(iter(stats.values()))
    counts = [int(st[k]) for k in ("central_named", "central_objects", "off_centre_named", "off_centre_objects")]
    z = naming_z(*counts)
    return {"map_scores": {m: v.get("score") for m, v in stats.items()},
            "naming_z": None if z is None else round(z, 3), "naming_gap": st.get("naming_gap"),
            "named": dict(zip(("central_named", "central_objects", "off_centre_named", "off_centre_objects"), counts))}


def cue_word_trace(word: str | None, scan: dict | str | None, refuted: list[dict] | None) -> dict[str, Any] | None:
    """What the audit did with the cue word, so a miss can be explained with numbers: the
    discovery scan's record for the word (skipped and why, or images scanned and candidate
    windows found) and the word's suspects that the counterfactual refuted."""
    if word is None:
        return None
    return {"scan": scan.get(word, "the word was in no answer's maps") if isinstance(scan, dict) else scan,
            "refuted": [r for r in (refuted or []) if str(r.get("word", "")).lower() == word]}


def heldout_result(entry: dict[str, Any], rows: list[dict[str, Any]], cue_ids: set[str], universe: set[str],
                   truth: dict[str, Any], centre: dict | None = None, scan: dict | str | None = None,
                   refuted: list[dict] | None = None) -> dict[str, Any]:
    """One held-out audit reduced to what `zoo_stats.heldout_metrics` needs (plus, for the
    reader, the centre statistics behind the run-level flags and the cue word's trace)."""
    cue = entry_cue(entry)
    flags = [{"kind": r["kind"], "word": r["word"], "method": r["method"], "region": _parse_region(r["region"]),
              "confirmed": r["confirmed"], "score": r["score"]} for r in rows if r["sample_id"] is None]
    # a sample whose own counterfactual says it names the marker as an object is not a shortcut finding
    flagged = {r["sample_id"] for r in rows if r["kind"] == "suspect_region"
               and json.loads(r["evidence_json"]).get("verdict") != "named_as_object"}
    relies = bool(truth.get("relies")) and entry["kind"] == "cue"
    sample = ({"tp": len(flagged & cue_ids), "fp": len(flagged - cue_ids), "fn": len((cue_ids & universe) - flagged)}
              if relies else {"tp": 0, "fp": len(flagged), "fn": 0})
    return {"name": entry["name"], "kind": entry["kind"], "relies": relies, "cue_word": None if cue is None else cue["word"],
            "cue_box": entry_cue_box(entry), "dataset_flags": flags, "sample_level": sample,
            "centre_biased": truth.get("centre_biased"),
            "names_marker": ((truth.get("extra_objects") or {}).get("extra_object_rate") or 0.0) >= NAMES_MARKER_MIN,
            "centre": centre_summary(centre),
            "cue_word_trace": cue_word_trace(None if cue is None else cue["word"], scan, refuted)}


def audit_entry(entry: dict[str, Any], rec: dict[str, Any], zoo: Path, cache: Path, seed: int, n: int, settings,
                *, device: str, threads: int, log) -> dict[str, Any]:
    """Audit one entry in-process (the machinery `benchmarks/bench_bias.py` uses) and run the
    bias step with ``settings``; returns the flags rows and what the reducers need."""
    from diffcam.core.settings import CamSettings
    from diffcam.evaluation.audit_in_process import audit_in_process
    from diffcam.storage.datasets import load_dataset
    from diffcam.storage.store import Store
    from diffcam.tasks.bias.step import run_dataset_flags

    mdir = model_dir(entry, rec, zoo)
    samples, synth = audit_samples(entry, n, seed)
    key = hashlib.sha256(json.dumps([entry.get("data"), entry_cue(entry)], sort_keys=True).encode()).hexdigest()[:8]
    ds_dir = write_samples(cache / "data" / f"{entry['name']}-seed{seed}-n{n}-{key}", samples, seed, synth)
    store = Store(cache / "store" / entry["name"])  # one store per entry: parallel audits share nothing
    run_id = f"{entry['name']}-seed{seed}-n{n}"
    if run_id in store.runs():
        shutil.rmtree(store.run_dir(run_id))
    t0 = time.perf_counter()
    audit_in_process(store, run_id, mdir, ds_dir, CamSettings(methods=METHODS), threads=threads, device=device, log=log)
    t1 = time.perf_counter()
    info: dict[str, Any] = {}
    rows = run_dataset_flags(store, run_id, mdir, ds_dir, settings, sample_level="always", device=device, log=log,
                             info=info)
    ds = load_dataset(ds_dir)
    cue_ids = {s.sample_id for s in ds.samples if s.extra.get("cue_present")}
    out = {"rows": rows, "cue_ids": cue_ids, "universe": {s.sample_id for s in ds.samples}, "centre": info.get("centre"),
           "scan": info.get("scan"), "refuted": info.get("refuted"),
           "seconds": {"audit": round(t1 - t0, 1), "bias_step": round(time.perf_counter() - t1, 1)}}
    return out


def missing_entries(entries: list[dict[str, Any]], rec: dict[str, Any], zoo: Path) -> dict[str, str]:
    """Entry name -> what is missing for it and the command that builds it."""
    gt_path = Path(zoo) / "ground_truth.json"
    truth = json.loads(gt_path.read_text()) if gt_path.is_file() else {}
    problems = {}
    for e in entries:
        mdir = model_dir(e, rec, zoo)
        if not (mdir / "config.json").is_file():
            problems[e["name"]] = (f"model folder {mdir} is missing: {build_command(e.get('model', e['name']), zoo)}"
                                   + (" --include-expensive" if e["source"] == "recipe_only" else ""))
        elif e["name"] not in truth:
            problems[e["name"]] = f"no ground truth for {e['name']} in {gt_path}: {build_command(e['name'], zoo)}"
    return problems


def require_zoo(entries: list[dict[str, Any]], rec: dict[str, Any], zoo: Path) -> dict[str, Any]:
    """Every model folder and ground-truth record the evaluation needs, or SystemExit naming
    what is missing and the command that builds it."""
    problems = missing_entries(entries, rec, zoo)
    if problems:
        raise SystemExit("the cue zoo is not built:\n  " + "\n  ".join(problems.values())
                         + "\n(--allow-missing evaluates the built models and lists the others in the JSON)")
    gt_path = Path(zoo) / "ground_truth.json"
    return json.loads(gt_path.read_text()) if gt_path.is_file() else {}


def _audit_in_worker(args: tuple) -> dict[str, Any]:
    """One `audit_entry` in a worker process of `evaluate(jobs=N)` (log lines prefixed with the entry)."""
    import torch

    entry, rec, zoo, cache, seed, n, settings, device, threads = args
    torch.set_num_threads(threads)
    return audit_entry(entry, rec, zoo, cache, seed, n, settings, device=device, threads=threads,
                       log=lambda msg: print(f"[{entry['name']}] {msg}", file=sys.stderr, flush=True))


def _audit_all(audit, entries, rec, zoo, cache, seed, n, settings, *, device, threads, log, jobs):
    """`audit` of every entry, in order; with ``jobs`` > 1 (and the real `audit_entry`) in that
    many worker processes of ``threads`` each: on a small CPU two 1-thread audits of tiny
    models run about twice as fast as one 2-thread audit."""
    if jobs <= 1 or audit is not audit_entry:
        return [audit(e, rec, zoo, cache, seed, n, settings, device=device, threads=threads, log=log) for e in entries]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_audit_in_worker,
                             [(e, rec, zoo, cache, seed, n, settings, device, threads) for e in entries]))


def evaluate(rec: dict[str, Any], zoo: Path, cache: Path, *, quick: bool, device: str, threads: int,
             audit=None, log=None, allow_missing: bool = False, jobs: int = 1) -> dict[str, Any]:
    """Fit on calibration entries, judge on held-out entries; the contract's JSON.

    ``audit`` (default `audit_entry`) is injectable so the tests can run the whole
    evaluation on scripted per-model results without training or auditing a model.
    ``allow_missing``: entries not built are left out of both splits and listed, with the
    command that builds them, under ``not_built`` (never silently).
    """
    from diffcam.core.bias.settings import BiasSettings

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    audit = audit or audit_entry
    entries = rec["entries"]
    if quick:
        keep = set(rec["quick"]["calibration"]) | set(rec["quick"]["heldout"])
        entries = [e for e in entries if e["name"] in keep]
    not_built = missing_entries(entries, rec, zoo) if allow_missing else {}
    entries = [e for e in entries if e["name"] not in not_built]
    calib = [e for e in entries if e["split"] == "calibration"]
    held = [e for e in entries if e["split"] == "heldout"]
    truth = require_zoo(entries, rec, zoo)
    n = rec["audit"]["quick_n"] if quick else rec["audit"]["n"]
    cs, hs = rec["seeds"]["calibration_audit"], rec["seeds"]["heldout_audit"]
    t0 = time.perf_counter()
    cal_res = _audit_all(audit, calib, rec, zoo, cache, cs, n, calibration_settings(), device=device,
                         threads=threads, log=log, jobs=jobs)
    cal_stats = [calibration_stats(e, res["rows"], res.get("centre"), truth[e["name"]]) for e, res in zip(calib, cal_res)]
    defaults = BiasSettings()
    fit = zoo_stats.fit_thresholds(cal_stats, {k: getattr(defaults, k) for k in zoo_stats.THRESHOLDS})
    fitted = defaults.with_(**fit["values"])
    held_res = _audit_all(audit, held, rec, zoo, cache, hs, n, fitted, device=device, threads=threads, log=log,
                          jobs=jobs)
    results = [heldout_result(e, res["rows"], res["cue_ids"], res["universe"], truth[e["name"]], res.get("centre"),
                              res.get("scan"), res.get("refuted"))
               for e, res in zip(held, held_res)]
    return {
        "heldout": zoo_stats.heldout_metrics(results),
        "calibration": {"models": [e["name"] for e in calib], "seeds": [cs], "n_samples_per_model": n,
                        "thresholds": fit, "threshold_roles": zoo_stats.THRESHOLDS, "per_model": cal_stats},
        "heldout_models": [e["name"] for e in held], "heldout_seed": hs, "per_model": results,
        "quick": quick, "seconds": round(time.perf_counter() - t0, 1), "jobs": jobs,
        "audit_seconds": {e["name"]: r.get("seconds") for e, r in zip([*calib, *held], [*cal_res, *held_res])},
        "not_built": not_built,
    }


def evaluate_added(rec: dict[str, Any], zoo: Path, cache: Path, previous: dict[str, Any], names: list[str], *,
                   device: str, threads: int, audit=None, log=None, jobs: int = 1) -> dict[str, Any]:
    """Add held-out models to a full evaluation without redoing it.

    The thresholds are a function of the calibration split alone, so a held-out model built
    after an evaluation is judged with the thresholds that evaluation fitted (read back from
    ``previous``, the JSON `evaluate` wrote), on the same seed and number of images; the
    held-out figures are then recomputed over the previous held-out results plus the new
    ones. Calibration entries cannot be added this way (they would change the fit: run the
    full `eval`), nor quick evaluations, nor models already judged."""
    from diffcam.core.bias.settings import BiasSettings

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    audit = audit or audit_entry
    by_name = {e["name"]: e for e in rec["entries"]}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise SystemExit(f"unknown zoo entries {unknown}; `python benchmarks/cue_zoo.py list` lists them")
    if previous.get("quick"):
        raise SystemExit("--add extends a full evaluation; the --to file is a --quick one")
    calib = sorted(n for n in names if by_name[n]["split"] != "heldout")
    if calib:
        raise SystemExit(f"{calib} are calibration entries: adding one changes the fitted thresholds, so run the "
                         "full `eval` instead")
    done = sorted(set(names) & set(previous["heldout_models"]))
    if done:
        raise SystemExit(f"{done} are already judged in the --to file")
    entries = [by_name[n] for n in names]
    truth = require_zoo(entries, rec, zoo)
    n, hs = previous["calibration"]["n_samples_per_model"], previous["heldout_seed"]
    fitted = BiasSettings().with_(**previous["calibration"]["thresholds"]["values"])
    t0 = time.perf_counter()
    res = _audit_all(audit, entries, rec, zoo, cache, hs, n, fitted, device=device, threads=threads, log=log,
                     jobs=jobs)
    added = [heldout_result(e, r["rows"], r["cue_ids"], r["universe"], truth[e["name"]], r.get("centre"),
                            r.get("scan"), r.get("refuted")) for e, r in zip(entries, res)]
    results = [*previous["per_model"], *added]
    return {
        **previous,
        "heldout": zoo_stats.heldout_metrics(results),
        "heldout_models": [*previous["heldout_models"], *names],
        "per_model": results,
        "audit_seconds": {**previous.get("audit_seconds", {}), **{e["name"]: r.get("seconds")
                                                                   for e, r in zip(entries, res)}},
        "not_built": {k: v for k, v in previous.get("not_built", {}).items() if k not in names},
        "added": [*previous.get("added", []),
                  {"models": names, "seconds": round(time.perf_counter() - t0, 1),
                   "thresholds": "the calibration thresholds recorded in this file (not refitted)"}],
    }
