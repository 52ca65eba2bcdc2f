"""The cue zoo's arithmetic, kept apart from models so the tests can check it by hand.

Pure Python: the Wilson interval, the threshold-fitting rule applied to calibration models,
and the held-out figures of the issue-17 contract computed from per-model audit results.
`benchmarks/cue_zoo.py` feeds these functions; docs/BIAS.md "The cue zoo" states the rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Z95 = 1.959963984540054  # two-sided 95 % normal quantile

#: Every threshold of `BiasSettings` that decides whether a flag is raised, and what the
#: zoo does with it. "fitted": set by `fit_thresholds` from calibration models only;
#: "default": kept at its BiasSettings default (not fitted: why in the value).
THRESHOLDS: dict[str, str] = {
    "cluster_enrichment_min": "fitted (saliency gate of clever_hans: keep every relying calibration cue)",
    "cluster_consistency_min": "fitted (saliency gate of clever_hans: keep every relying calibration cue)",
    "cluster_specificity_min": "fitted (saliency gate of clever_hans: keep every relying calibration cue)",
    "cf_confirm_min": "fitted (decision: best split of relying vs. other calibration candidates)",
    "centre_prior_threshold": "fitted (decision: best split of centre-biased vs. other calibration models' run-level "
                              "centre score against the object prior)",
    "centre_bias_threshold": "default (word-level centre index; the run-level score above decides the zoo's centre "
                             "models)",
    "member_enrichment_min": "default (a per-member gate inside consistency; fitting it needs per-map shares)",
    "min_cluster_size": "default (a count, not a score)",
    "min_cluster_frac": "default (a count share, not a score)",
    "region_object_overlap_max": "default (geometry: off-object by definition)",
    "centre_enrichment_min": "default (second centre gate; the score above decides)",
    "centre_naming_z_min": "default (a significance level, one-sided p ~ 0.001 when central and off-centre "
                           "objects are named alike: no biased model is needed to set it)",
    "centre_naming_gap_min": "default (an effect-size floor of 10 points, so a large audit does not flag a "
                             "negligible difference)",
    "off_object_threshold": "default (sample level; not judged by the contract)",
    "off_object_dominance": "default (sample level; not judged by the contract)",
    "border_threshold": "default (sample level; not judged by the contract)",
    "zero_max": "default (by definition)",
    "flat_gini_max": "default (by definition)",
    "ignores_object_gap_max": "default (flag off by default)",
    "ignores_object_similarity_min": "default (flag off by default)",
}

SALIENCY_GATES = ("cluster_enrichment_min", "cluster_consistency_min", "cluster_specificity_min")
#: The per-candidate statistic (a clever_hans flag's evidence key) each saliency gate compares.
GATE_STAT = {"cluster_enrichment_min": "cluster_enrichment", "cluster_consistency_min": "consistency",
             "cluster_specificity_min": "specificity"}
GATE_MARGIN = 0.1

SHORTCUT_KINDS = ("clever_hans",)
CLEAN_KINDS = ("clean", "marker_as_object")


def wilson(k: int, n: int, z: float = Z95) -> list[float] | None:
    """Wilson score interval for k successes in n trials; None when n is 0.

    Why Wilson: the zoo's held-out counts are small (a handful of models), where the
    normal interval leaves [0, 1] and collapses to a point at 0 or n.
    """
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def best_split(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    """The threshold t ("fires when value >= t") that maximises TPR − FPR on (pos, neg).

    Candidates are midpoints between consecutive distinct values and one below the
    smallest; ties go to the lowest t (recall first). When pos and neg separate, the
    result is the midpoint between max(neg) and min(pos). None without positives.
    """
    if not pos:
        return None
    values = sorted(set(pos) | set(neg))
    cands = [values[0] - 1.0 if len(values) == 1 else values[0] - (values[1] - values[0]) / 2]
    cands += [(a + b) / 2 for a, b in zip(values, values[1:])]
    best, best_score = None, -math.inf
    for t in cands:
        tpr = sum(v >= t for v in pos) / len(pos)
        fpr = sum(v >= t for v in neg) / len(neg) if neg else 0.0
        if tpr - fpr > best_score + 1e-12:
            best, best_score = t, tpr - fpr
    return best


def fit_thresholds(calibration: Sequence[Mapping[str, Any]], defaults: Mapping[str, float],
                   margin: float = GATE_MARGIN) -> dict[str, Any]:
    """Fit the "fitted" `THRESHOLDS` on calibration models only.

    Each item of ``calibration`` is one calibration audit, with
    - ``relies`` (ground truth: does the model rely on its cue), ``centre_biased``;
    - ``cue_candidate``: the statistics of the best clever_hans candidate on the cue word and
      region, found with the gates loosened (None if saliency never proposed it):
      ``cluster_enrichment``, ``consistency``, ``specificity``, ``cf_diff`` (the counterfactual's
      max(persist − persist_both, vanish − vanish_control), None if untested);
    - ``other_cf_diffs``: cf_diff of every other tested candidate of that audit;
    - ``centre_score``: the largest run-level centre score against the object prior over
      its map methods (`diffcam.core.bias.centre`).

    Rules: a saliency gate = (1 − margin) × the smallest value among relying calibration
    models' cue candidates (so every one of them passes, with room); relying models whose
    cue saliency never proposed are listed as unreachable by the gates. ``cf_confirm_min`` =
    `best_split` of the relying models' cue cf_diff against every other tested candidate's
    (non-relying models' cue candidates and all off-cue candidates). ``centre_prior_threshold`` =
    `best_split` of the centre-biased models' centre score against the others'. A
    threshold without positives keeps its default. Returns the values and their provenance.
    """
    relying = [c for c in calibration if c.get("relies")]
    reached = [c for c in relying if c.get("cue_candidate")]
    out: dict[str, Any] = {"values": {}, "provenance": {}}
    for gate in SALIENCY_GATES:
        vals = [float(c["cue_candidate"][GATE_STAT[gate]]) for c in reached
                if c["cue_candidate"].get(GATE_STAT[gate]) is not None]
        if vals:
            out["values"][gate] = round((1 - margin) * min(vals), 4)
            out["provenance"][gate] = {"rule": f"(1 - {margin}) x min over relying calibration cues",
                                       "positives": vals, "n": len(vals)}
        else:
            out["values"][gate] = float(defaults[gate])
            out["provenance"][gate] = {"rule": "default: no relying calibration cue was proposed", "n": 0}
    pos = [float(c["cue_candidate"]["cf_diff"]) for c in reached if c["cue_candidate"].get("cf_diff") is not None]
    neg = [float(c["cue_candidate"]["cf_diff"]) for c in calibration
           if not c.get("relies") and c.get("cue_candidate") and c["cue_candidate"].get("cf_diff") is not None]
    neg += [float(v) for c in calibration for v in c.get("other_cf_diffs", ()) if v is not None]
    _fit_split(out, "cf_confirm_min", pos, neg, defaults)
    cpos = [float(c["centre_score"]) for c in calibration if c.get("centre_biased") and c.get("centre_score") is not None]
    cneg = [float(c["centre_score"]) for c in calibration
            if not c.get("centre_biased") and c.get("centre_score") is not None]
    _fit_split(out, "centre_prior_threshold", cpos, cneg, defaults)
    out["unreachable_by_gates"] = sorted(c.get("name", "?") for c in relying if not c.get("cue_candidate"))
    return out


def _fit_split(out: dict, name: str, pos: list[float], neg: list[float], defaults: Mapping[str, float]) -> None:
    t = best_split(pos, neg)
    if t is None:
        out["values"][name] = float(defaults[name])
        out["provenance"][name] = {"rule": "default: no positive among the calibration models", "negatives": neg}
        return
    separable = not neg or min(pos) > max(neg)
    out["values"][name] = round(t, 4)
    out["provenance"][name] = {"rule": "best split (max TPR - FPR, ties to the lowest)", "positives": pos,
                               "negatives": neg, "separable": separable}


def boxes_overlap(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    """Whether two (x0, y0, x1, y1) boxes share area."""
    if a is None or b is None:
        return False
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def is_cue_flag(flag: Mapping[str, Any], model: Mapping[str, Any]) -> bool:
    """A dataset-level shortcut flag that names this model's cue: the cue word, on a region
    overlapping the marker (any region when the marker moves per image)."""
    if flag["kind"] not in SHORTCUT_KINDS or flag.get("confirmed") is False:
        return False
    if model.get("cue_word") is None or str(flag.get("word", "")).lower() != model["cue_word"]:
        return False
    return model.get("cue_box") is None or boxes_overlap(flag.get("region"), model["cue_box"])


def heldout_metrics(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The contract's "heldout" block from per-model held-out audit results.

    One result per audit (``n_models`` counts audits: a marker-as-object audit reuses a clean
    model). Each result: ``name``, ``kind`` (cue / clean / centre / marker_as_object), ``relies``
    (ground truth), ``cue_word``, ``cue_box`` (normalised; None when the marker moves), and
    ``dataset_flags`` (kind, word, method, region as a box, confirmed). Optional
    ``sample_level`` {tp, fp, fn} of `suspect_region` against the cue-carrying samples.
    recall: relying cue models with a cue flag / relying cue models; precision: cue flags
    on relying cue models / all kept shortcut flags on held-out models; clean_false_flags:
    kept shortcut flags on clean models (incl. those audited on marker data);
    centre_bias_detected: every held-out centre model whose ground truth is centre-biased has a
    centre_bias flag (word- or run-level); None when no held-out model is centre-biased;
    centre_false_flags: centre_bias flags on models whose ground truth is not centre-biased;
    hallucinated_object: among marker-as-object audits whose model names the marker as an extra
    object (ground truth ``names_marker``), how many got a `hallucinated_object` flag on the
    marker's region (whatever word the model gave it).
    """
    results = list(results)
    relying = [r for r in results if r["kind"] == "cue" and r.get("relies")]
    detected = [r for r in relying if any(is_cue_flag(f, r) for f in r["dataset_flags"])]
    shortcut = [(r, f) for r in results for f in r["dataset_flags"]
                if f["kind"] in SHORTCUT_KINDS and f.get("confirmed") is not False]
    correct = [1 for r, f in shortcut if r["kind"] == "cue" and r.get("relies") and is_cue_flag(f, r)]
    clean_false = sum(1 for r, f in shortcut if r["kind"] in CLEAN_KINDS)
    # judged against the measured ground truth: a centre-recipe model that did not become
    # centre-biased is not a positive (one that did not is said in n_centre_models_biased)
    centre_all = [r for r in results if r["kind"] == "centre"]
    centre = [r for r in centre_all if r.get("centre_biased")]
    centre_hit = [r for r in centre if any(f["kind"] == "centre_bias" for f in r["dataset_flags"])]
    centre_false = sum(1 for r in results if r["kind"] != "centre" and not r.get("centre_biased")
                       for f in r["dataset_flags"] if f["kind"] == "centre_bias")
    # a marker read as an object of its own (ground truth: the model names extra objects with it)
    # is a correct finding of its own kind
    naming = [r for r in results if r["kind"] == "marker_as_object" and r.get("names_marker")]
    # on the marker's region, whatever word the model gave it (the shipped clean model calls a
    # purple square "blue triangle")
    named_found = [r for r in naming if any(f["kind"] == "hallucinated_object"
                                            and boxes_overlap(f.get("region"), r.get("cue_box"))
                                            for f in r["dataset_flags"])]
    tp = sum(int(r.get("sample_level", {}).get("tp", 0)) for r in relying)
    fp = sum(int(r.get("sample_level", {}).get("fp", 0)) for r in results)
    fn = sum(int(r.get("sample_level", {}).get("fn", 0)) for r in relying)
    return {
        "n_models": len(results),
        "n_cue_models_relying": len(relying),
        "recall": len(detected) / len(relying) if relying else None,
        "recall_ci": wilson(len(detected), len(relying)),
        "precision": len(correct) / len(shortcut) if shortcut else None,
        "precision_ci": wilson(len(correct), len(shortcut)),
        "n_shortcut_flags": len(shortcut),
        "clean_false_flags": clean_false,
        "n_clean_audits": sum(1 for r in results if r["kind"] in CLEAN_KINDS),
        "centre_bias_detected": (len(centre_hit) == len(centre)) if centre else None,
        "n_centre_models": len(centre_all),
        "n_centre_models_biased": len(centre),
        "centre_false_flags": centre_false,
        "hallucinated_object": {"n_audits_naming_marker": len(naming), "found": len(named_found),
                                "found_names": sorted(r["name"] for r in named_found)},
        "detected": sorted(r["name"] for r in detected),
        "missed": sorted(r["name"] for r in relying if r not in detected),
        "sample_level": {"tp": tp, "fp": fp, "fn": fn,
                         "precision": tp / (tp + fp) if tp + fp else None, "precision_ci": wilson(tp, tp + fp),
                         "recall": tp / (tp + fn) if tp + fn else None, "recall_ci": wilson(tp, tp + fn)},
    }
