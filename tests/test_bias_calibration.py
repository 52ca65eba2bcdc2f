"""The report's calibration record: complete, and its held-out figures those of the
committed cue-zoo evaluation (recomputed here, so the text cannot drift from the file)."""

from __future__ import annotations

import json
from pathlib import Path

from diffcam.core.bias.flags import REGION_KINDS, SAMPLE_KINDS
from diffcam.core.bias.settings import BiasSettings
from diffcam.tasks.bias.calibration import (
    CALIBRATION,
    ZOO_KINDS,
    ZOO_RESULTS,
    calibration_rows,
    heldout_summary,
    load_zoo_results,
)

REPO = Path(__file__).resolve().parents[1]


def test_every_flag_kind_has_a_calibration_record_naming_real_settings() -> None:
    kinds = (*SAMPLE_KINDS, *REGION_KINDS, "centre_bias", "ignores_object")
    assert set(kinds) <= set(CALIBRATION)
    for c in CALIBRATION.values():
        assert c.thresholds and set(c.thresholds) <= set(BiasSettings.model_fields), c.kind
        assert c.calibrated_on
        assert (c.heldout is None) == (c.kind in ZOO_KINDS), c.kind  # zoo kinds' figures come from the file


def test_heldout_figures_are_written_from_the_committed_zoo_evaluation() -> None:
    result = json.loads((REPO / ZOO_RESULTS).read_text())
    assert result["quick"] is False  # the full held-out split, not the quick subset
    assert load_zoo_results() == result
    assert set(heldout_summary(result)) == set(ZOO_KINDS)
    rows = {r["kind"]: r["held-out"] for r in calibration_rows(list(ZOO_KINDS), result)}
    h = result["heldout"]
    assert f"recall {len(h['detected'])} of {h['n_cue_models_relying']} relying" in rows["clever_hans"]
    sl = h["sample_level"]
    assert f"{sl['tp']} true, {sl['fp']} false, {sl['fn']} missed" in rows["suspect_region"]


def test_a_new_evaluation_changes_the_report_text() -> None:
    """The figures follow the file: an evaluation with other counts gives other sentences."""
    result = json.loads((REPO / ZOO_RESULTS).read_text())
    changed = json.loads(json.dumps(result))
    changed["heldout"]["sample_level"].update(tp=99, fp=0, fn=1)
    before = calibration_rows(["suspect_region"], result)[0]["held-out"]
    after = calibration_rows(["suspect_region"], changed)[0]["held-out"]
    assert "99 true, 0 false, 1 missed" in after and before != after
    missing = calibration_rows(["suspect_region", "zero_map"], None)
    assert missing[0]["held-out"].startswith("not available") and missing[1]["held-out"] == "not applicable"


def test_report_rows_follow_the_run_and_say_when_a_kind_has_no_record() -> None:
    rows = calibration_rows(["suspect_region", "clever_hans", "made_up"], load_zoo_results())
    assert [r["kind"] for r in rows] == ["suspect_region", "clever_hans", "made_up"]
    assert rows[1]["thresholds"].startswith("cluster_enrichment_min")
    assert rows[2]["calibrated on"] == "no calibration record"
