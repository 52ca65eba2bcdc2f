"""The report's calibration record: complete, and its held-out figures those of the
committed cue-zoo evaluation (recomputed here, so the text cannot drift from the file)."""

from __future__ import annotations

import json
from pathlib import Path

from diffcam_core.bias_flags import REGION_KINDS, SAMPLE_KINDS
from diffcam_core.bias_settings import BiasSettings
from tasks.bias_calibration import CALIBRATION, ZOO_RESULTS, calibration_rows, heldout_summary

REPO = Path(__file__).resolve().parents[1]


def test_every_flag_kind_has_a_calibration_record_naming_real_settings() -> None:
    kinds = (*SAMPLE_KINDS, *REGION_KINDS, "centre_bias", "ignores_object")
    assert set(kinds) <= set(CALIBRATION)
    for c in CALIBRATION.values():
        assert c.thresholds and set(c.thresholds) <= set(BiasSettings.model_fields), c.kind
        assert c.calibrated_on and c.heldout


def test_heldout_figures_are_those_of_the_committed_zoo_evaluation() -> None:
    result = json.loads((REPO / ZOO_RESULTS).read_text())
    assert result["quick"] is False  # the full held-out split, not the quick subset
    for kind, text in heldout_summary(result).items():
        assert CALIBRATION[kind].heldout == text, kind


def test_report_rows_follow_the_run_and_say_when_a_kind_has_no_record() -> None:
    rows = calibration_rows(["suspect_region", "clever_hans", "made_up"])
    assert [r["kind"] for r in rows] == ["suspect_region", "clever_hans", "made_up"]
    assert rows[1]["thresholds"].startswith("cluster_enrichment_min")
    assert rows[2]["calibrated on"] == "no calibration record"
