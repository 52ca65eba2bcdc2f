"""Where each bias flag's thresholds come from, and what they achieved on models they were
not fitted to: printed by the report next to the flags.

A flag is only as trustworthy as its calibration, and an auditor reading a run cannot see
it in the numbers of that run. The held-out figures of the kinds the cue zoo judges are
written from the committed evaluation (`benchmarks/results/cue_zoo_full.json`,
`python benchmarks/cue_zoo.py eval`) each time a report is built, never copied into code, so a
new evaluation changes the report by itself. docs/BIAS.md explains the fitting rule and the split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Calibration", "CALIBRATION", "ZOO_RESULTS", "ZOO_KINDS", "calibration_rows", "heldout_summary",
           "load_zoo_results"]

#: The repository checkout this package runs from (tasks/bias/ is two folders down).
_REPO = Path(__file__).resolve().parents[2]
#: The evaluation the held-out figures come from (repository path).
ZOO_RESULTS = "benchmarks/results/cue_zoo_full.json"
#: The kinds whose held-out figures come from that evaluation (`heldout_summary`).
ZOO_KINDS = ("clever_hans", "hallucinated_object", "centre_bias", "suspect_region")

_SHIPPED = "the shipped pair (models/tiny-shapes-cue, models/tiny-shapes) on synthetic seeds 2 and 3"


@dataclass(frozen=True)
class Calibration:
    """One flag kind: the settings it is decided on, the models and seeds that chose them,
    and its result on held-out models (or why there is none)."""

    kind: str
    thresholds: tuple[str, ...]
    calibrated_on: str
    #: None: written from the cue-zoo evaluation (`heldout_summary`).
    heldout: str | None = None


CALIBRATION: dict[str, Calibration] = {c.kind: c for c in (
    Calibration(
        "clever_hans",
        ("cluster_enrichment_min", "cluster_consistency_min", "cluster_specificity_min", "cf_confirm_min",
         "scan_min_hit_rate", "scan_min_drop"),
        f"{_SHIPPED}; checked (not refitted) on the cue zoo's calibration split, seed 2 "
        "(the zoo had one relying calibration model, so every fitted gate kept its default)",
        None,
    ),
    Calibration(
        "hallucinated_object",
        ("cf_confirm_min",),
        "the verdict rule of diffcam.core.bias.verdict (no threshold of its own): the shipped clean model "
        "with an unseen 12-px purple marker, seed 2",
        None,
    ),
    Calibration(
        "centre_bias",
        ("centre_naming_z_min", "centre_naming_gap_min", "centre_prior_threshold", "centre_bias_threshold",
         "centre_enrichment_min"),
        "naming flag (method none): a significance level (z 3, one-sided p ~ 0.001) and a 10-point floor, set "
        "without a biased model but after the zoo's first evaluation showed the map score missing one; map "
        "score: default 0.15 (the zoo's calibration split has no centre-biased model to fit it on); word-level "
        "index: synthetic centre-sitting maps",
        None,
    ),
    Calibration(
        "suspect_region",
        ("cf_confirm_min", "off_object_threshold", "member_enrichment_min"),
        f"{_SHIPPED}; raised only when the sample's own erase test shows dependence",
        None,
    ),
    Calibration(
        "off_object",
        ("off_object_threshold", "off_object_dominance"),
        f"swept 0.10-0.50 on {_SHIPPED}",
        "not evaluated on held-out models (a map statistic, not a dependence claim)",
    ),
    Calibration(
        "border_hotspot",
        ("border_threshold", "border_fraction"),
        f"swept with off_object_threshold on {_SHIPPED}",
        "not evaluated on held-out models",
    ),
    Calibration(
        "zero_map", ("zero_max",), "by definition (no positive value)", "not applicable",
    ),
    Calibration(
        "flat_map", ("flat_gini_max",), "by definition (a near-constant map)", "not applicable",
    ),
    Calibration(
        "ignores_object",
        ("ignores_object_gap_max", "ignores_object_similarity_min"),
        f"{_SHIPPED}; off by default (flag_ignores_object)",
        "not evaluated on held-out models",
    ),
)}


def _ci(ci) -> str:
    return "–" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def heldout_summary(result: dict) -> dict[str, str]:
    """The held-out sentences of the dependence flag kinds, from a zoo evaluation's JSON
    (`benchmarks/cue_zoo.py eval`): what `CALIBRATION` quotes, recomputed by the tests."""
    h = result["heldout"]
    models = result["heldout_models"]
    n_relying, n_flags = h["n_cue_models_relying"], h["n_shortcut_flags"]
    found = len(h["detected"])
    right = round(h["precision"] * n_flags) if h["precision"] is not None else 0
    centre = h["centre_bias_detected"]
    hal = h["hallucinated_object"]
    sl = h["sample_level"]
    return {
        "clever_hans": (f"cue zoo, {len(models)} held-out audits (seed {result['heldout_seed']}): recall {found} of "
                        f"{n_relying} relying cue models {_ci(h['recall_ci'])}, precision {right} of {n_flags} flags "
                        f"{_ci(h.get('precision_ci'))}, {h['clean_false_flags']} shortcut flags on "
                        f"{h['n_clean_audits']} clean audits"),
        "hallucinated_object": (f"cue zoo: found on {hal['found']} of {hal['n_audits_naming_marker']} held-out "
                                "audits whose model names the marker as an object"),
        "centre_bias": (f"cue zoo: {h['n_centre_models_biased']} of {h['n_centre_models']} held-out centre models "
                        "measured centre-biased, "
                        + ("flagged" if centre else "not flagged" if centre is False else "none to judge")
                        + f"; {h['centre_false_flags']} centre flags on models that are not"),
        "suspect_region": (f"cue zoo, pooled over held-out models: {sl['tp']} true, {sl['fp']} false, {sl['fn']} missed "
                           f"(precision {_ci(sl.get('precision_ci'))}, recall {_ci(sl.get('recall_ci'))})"),
    }


def load_zoo_results(root: Path = _REPO) -> dict[str, Any] | None:
    """The committed cue-zoo evaluation, or None where this installation does not carry it."""
    path = root / ZOO_RESULTS
    return json.loads(path.read_text()) if path.is_file() else None


def calibration_rows(kinds: list[str], zoo_result: dict[str, Any] | None) -> list[dict[str, str]]:
    """Report rows for the flag kinds of a run, in the order given; unknown kinds say so.
    ``zoo_result``: the cue-zoo evaluation the zoo-judged kinds' held-out figures are written from."""
    summary = heldout_summary(zoo_result) if zoo_result is not None else {}
    out = []
    for kind in kinds:
        c = CALIBRATION.get(kind)
        if c is None:
            out.append({"kind": kind, "thresholds": "–", "calibrated on": "no calibration record", "held-out": "–"})
            continue
        heldout = c.heldout if c.heldout is not None else summary.get(
            kind, f"not available: {ZOO_RESULTS} is not in this installation")
        out.append({"kind": kind, "thresholds": ", ".join(c.thresholds), "calibrated on": c.calibrated_on,
                    "held-out": heldout})
    return out
