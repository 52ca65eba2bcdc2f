"""The cue zoo's recipes, split, arithmetic and JSON contract (issue 17), without training a model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from diffcam.core.synthetic import CUE_CORNERS, SynthSettings, cue_region
from diffcam.evaluation import zoo_eval, zoo_recipes, zoo_stats

REPO = Path(__file__).resolve().parents[1]

REC = zoo_recipes.load_recipes()
ENTRIES = REC["entries"]


def _kind(kind, source=None):
    return [e for e in ENTRIES if e["kind"] == kind and (source is None or e["source"] == source)]


# --------------------------------------------------------------------------- coverage


def test_counts_per_kind_meet_the_issue():
    planted = [e for e in _kind("cue") if e["source"] == "train"]
    assert len(planted) >= 10
    assert len({e["seed"] for e in _kind("clean", "train")}) >= 3  # clean models from different seeds
    assert len({e["train_seed"] for e in _kind("clean", "train")}) >= 3
    assert _kind("centre", "train")
    assert _kind("marker_as_object")
    miss = [e for e in ENTRIES if e["source"] == "recipe_only"]
    assert len(miss) == 1 and "scripts/train_recipe.py" in miss[0]["command"] and "--which" in miss[0]["command"]


def test_cues_vary_word_position_colour_size_and_p():
    cues = [e["cue"] for e in _kind("cue", "train")]
    words = {c["word"] for c in cues}
    assert words & {"red", "green", "blue", "yellow"} and words & {"circle", "square", "triangle"}
    corners = {c["pos"] for c in cues if isinstance(c["pos"], str) and c["pos"] in CUE_CORNERS}
    assert corners == set(CUE_CORNERS)
    assert any(c["pos"] == zoo_recipes.MOVING for c in cues)
    n, cell = 64, 8
    kinds = set()
    for c in cues:
        if c["pos"] == zoo_recipes.MOVING:
            continue
        x0, y0, x1, y1 = cue_region(SynthSettings(cue=zoo_recipes.cue_spec(c)))
        cells = {(x // cell, y // cell) for x in range(x0, x1) for y in range(y0, y1)}
        cx = {a for a, _ in cells}
        cy = {b for _, b in cells}
        edge = min(cx) == 0 or max(cx) == n // cell - 1 or min(cy) == 0 or max(cy) == n // cell - 1
        corner = (min(cx) == 0 or max(cx) == n // cell - 1) and (min(cy) == 0 or max(cy) == n // cell - 1)
        # next to the centre: a cell touching the central 2x2 cells (3, 4) without being one
        near = not edge and all(2 <= a <= 5 and 2 <= b <= 5 for a, b in cells) and not cells <= {(3, 3), (3, 4), (4, 3), (4, 4)}
        kinds.add("corner" if corner else "edge" if edge else "next_to_centre" if near else "other")
        kinds.add(f"cells{max(len(cx), len(cy))}")
    assert {"corner", "edge", "next_to_centre", "cells1", "cells2"} <= kinds
    ps = [c["p"] for c in cues]
    assert min(ps) == pytest.approx(0.6) and max(ps) == pytest.approx(1.0) and all(0.6 <= p <= 1.0 for p in ps)
    assert len({c["color"] for c in cues}) >= 3


def test_split_is_fixed_by_its_rule_disjoint_and_covers_every_kind():
    assert zoo_recipes.split_by_rule(ENTRIES) == {e["name"]: e["split"] for e in ENTRIES}
    calib = {e["name"] for e in ENTRIES if e["split"] == "calibration"}
    held = {e["name"] for e in ENTRIES if e["split"] == "heldout"}
    assert calib and held and not calib & held and calib | held == {e["name"] for e in ENTRIES}
    for kind in zoo_recipes.KINDS:
        assert {e["split"] for e in _kind(kind)} == {"calibration", "heldout"}, kind
    # a model and the audits that reuse it never sit on both sides
    for e in ENTRIES:
        if e["source"] == "audit_only":
            assert e["split"] == next(m["split"] for m in ENTRIES if m["name"] == e["model"])
    quick = REC["quick"]
    assert set(quick["calibration"]) <= calib and set(quick["heldout"]) <= held
    assert any(e["kind"] == "centre" for e in ENTRIES if e["name"] in quick["heldout"])


def test_every_model_declares_a_size_limit_within_the_zoo_budget():
    trained = [e for e in ENTRIES if e["source"] == "train" and not e.get("cache_only")]
    assert all(zoo_recipes.size_limit_mb(e, REC) <= 2.0 for e in trained)
    assert sum(zoo_recipes.size_limit_mb(e, REC) for e in trained) <= REC["zoo_limit_mb"]
    # a model over the limit is a recipe built into a git-ignored cache, and says why
    cached = [e for e in ENTRIES if e.get("cache_only")]
    assert all(e.get("why") for e in cached)
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert all(f"models/zoo/{e['name']}/" in ignored for e in cached)
    for e in ENTRIES:
        assert zoo_recipes.size_limit_mb(e, REC) > 0
    # the spec really fits the limit: parameters x 4 bytes (float32 safetensors)
    from transformers import DiffusionGemmaForBlockDiffusion

    from diffcam.core.synthetic import vocabulary
    from diffcam.training.tiny_gemma import TinyModelSpec, build_config, build_tokenizer

    model = DiffusionGemmaForBlockDiffusion(build_config(TinyModelSpec.model_validate(REC["spec"]),
                                                         build_tokenizer(vocabulary(SynthSettings()))))
    assert 4 * sum(p.numel() for p in model.parameters()) / 1e6 < REC["size_limit_mb"]


def test_no_training_seed_is_an_audit_or_ground_truth_seed():
    used = set(REC["seeds"].values())
    assert not {e["train_seed"] for e in ENTRIES if "train_seed" in e} & used
    assert len({e["train_seed"] for e in ENTRIES if "train_seed" in e}) == len([e for e in ENTRIES if "train_seed" in e])


# --------------------------------------------------------------------------- data


def test_moving_marker_moves_and_avoids_objects():
    cue = next(e["cue"] for e in _kind("cue", "train") if e["cue"]["pos"] == zoo_recipes.MOVING)
    samples = zoo_recipes.moving_cue_samples(40, 3, cue)
    with_marker = [s for s in samples if s.cue_present]
    assert len(with_marker) >= 5
    assert len({tuple(np.argwhere(s.cue_mask)[0]) for s in with_marker}) >= 5
    for s in with_marker:
        assert cue["word"] in s.answer.split()
        assert s.cue_mask.sum() == cue["size"] ** 2
        assert not any((o.mask & s.cue_mask).any() for o in s.objects)
    assert not any(s.cue_present for s in samples if cue["word"] not in s.answer.split())


def test_centre_data_names_only_the_object_in_the_central_box():
    settings = SynthSettings()
    for s in zoo_recipes.centre_samples(30, 4, settings):
        assert len(s.objects) == 1 and zoo_recipes.in_centre(s.objects[0], settings)
        assert s.answer == f"a {s.objects[0].color} {s.objects[0].shape}"
        assert not any(zoo_recipes.in_centre(o, settings) for o in s.unnamed)


# --------------------------------------------------------------------------- arithmetic


def test_wilson_interval_matches_hand_computation():
    z = 1.959963984540054
    # k = 0: lower 0, upper z^2 / (n + z^2)
    assert zoo_stats.wilson(0, 10) == pytest.approx([0.0, z * z / (10 + z * z)])
    # k = n: lower n / (n + z^2), upper 1
    assert zoo_stats.wilson(10, 10) == pytest.approx([10 / (10 + z * z), 1.0])
    # 5 of 10: the published Wilson interval (0.2366, 0.7634)
    lo, hi = zoo_stats.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    # 6 of 7 by hand: centre (6/7 + z^2/14) / (1 + z^2/7), half z/(1 + z^2/7) sqrt(6/49/7 + z^2/196)
    d = 1 + z * z / 7
    c = (6 / 7 + z * z / 14) / d
    h = z / d * math.sqrt((6 / 7) * (1 / 7) / 7 + z * z / 196)
    assert zoo_stats.wilson(6, 7) == pytest.approx([c - h, c + h])
    assert zoo_stats.wilson(0, 0) is None


def test_best_split_separates_and_prefers_recall_on_ties():
    assert zoo_stats.best_split([0.8, 0.9, 1.0], [0.0, 0.1]) == pytest.approx(0.45)
    assert zoo_stats.best_split([], [0.1]) is None
    # overlapping: 0.3 is a positive below a negative; the best TPR - FPR keeps it out
    t = zoo_stats.best_split([0.3, 0.8, 0.9], [0.0, 0.5])
    assert t == pytest.approx(0.65)


def _cal(name, relies, enrich=None, cons=None, spec=None, cf=None, others=(), centre=None, centre_biased=False):
    cand = None if enrich is None else {"cluster_enrichment": enrich, "consistency": cons, "specificity": spec, "cf_diff": cf}
    return {"name": name, "relies": relies, "cue_candidate": cand, "other_cf_diffs": list(others),
            "centre_score": centre, "centre_biased": centre_biased}


def test_threshold_fitting_rule_on_synthetic_statistics():
    from diffcam.core.bias.settings import BiasSettings

    d = BiasSettings()
    defaults = {k: getattr(d, k) for k in zoo_stats.THRESHOLDS}
    cal = [
        _cal("a", True, 3.0, 0.9, 1.5, 1.0, centre=-0.1),
        _cal("b", True, 2.5, 0.7, 2.0, 0.75, others=[0.0, 0.1], centre=-0.05),
        _cal("c", True),  # relies, but saliency never proposed its cue
        _cal("d", False, 4.0, 0.8, 1.3, 0.2, centre=0.0),  # a cue it does not rely on: a negative
        _cal("clean", False, others=[0.05], centre=0.02),
        _cal("centre", False, centre=0.4, centre_biased=True),
    ]
    fit = zoo_stats.fit_thresholds(cal, defaults)
    v = fit["values"]
    assert v["cluster_enrichment_min"] == pytest.approx(0.9 * 2.5)
    assert v["cluster_consistency_min"] == pytest.approx(0.9 * 0.7)
    assert v["cluster_specificity_min"] == pytest.approx(0.9 * 1.5)
    assert v["cf_confirm_min"] == pytest.approx((0.2 + 0.75) / 2)  # max negative 0.2, min positive 0.75
    assert v["centre_prior_threshold"] == pytest.approx((0.02 + 0.4) / 2)
    assert fit["unreachable_by_gates"] == ["c"]
    assert fit["provenance"]["cf_confirm_min"]["separable"] is True
    # no positives: defaults kept, and said so
    fit0 = zoo_stats.fit_thresholds([_cal("clean", False, others=[0.1], centre=0.0)], defaults)
    assert fit0["values"] == {k: defaults[k] for k in fit0["values"]}
    assert all("default" in p["rule"] for p in fit0["provenance"].values())
    # every fitted name is a real BiasSettings field, and so is every listed threshold
    assert set(v) <= set(BiasSettings.model_fields) and set(zoo_stats.THRESHOLDS) <= set(BiasSettings.model_fields)
    d.with_(**v)  # the fitted values are valid settings


# --------------------------------------------------------------------------- the JSON contract


def _flag(kind, word, region=None, confirmed=True):
    return {"kind": kind, "word": word, "method": "token-gradnorm", "region": region, "confirmed": confirmed}


def test_heldout_metrics_on_scripted_results():
    tl = [0.0, 0.0, 0.125, 0.125]
    results = [
        {"name": "c1", "kind": "cue", "relies": True, "cue_word": "circle", "cue_box": [0.03, 0.03, 0.12, 0.12],
         "dataset_flags": [_flag("clever_hans", "circle", tl)], "sample_level": {"tp": 9, "fp": 0, "fn": 1}},
        {"name": "c2", "kind": "cue", "relies": True, "cue_word": "red", "cue_box": [0.85, 0.03, 0.95, 0.12],
         "dataset_flags": [_flag("clever_hans", "red", tl)], "sample_level": {"tp": 0, "fp": 3, "fn": 8}},  # wrong region
        {"name": "c3", "kind": "cue", "relies": True, "cue_word": "red", "cue_box": None,  # moving marker
         "dataset_flags": [_flag("clever_hans", "red", [0.5, 0.5, 0.625, 0.625])]},
        {"name": "c4", "kind": "cue", "relies": False, "cue_word": "blue", "cue_box": tl, "dataset_flags": []},
        {"name": "k", "kind": "clean", "dataset_flags": [_flag("clever_hans", "circle", tl)], "sample_level": {"fp": 2}},
        {"name": "m", "kind": "marker_as_object", "dataset_flags": [_flag("hallucinated_object", "blue", tl)],
         "names_marker": True, "cue_word": "circle", "cue_box": [0.03, 0.03, 0.12, 0.12]},
        {"name": "z", "kind": "centre", "centre_biased": True,
         "dataset_flags": [_flag("centre_bias", "red", confirmed=None)]},
        # a centre recipe that did not make the model centre-biased is not a positive
        {"name": "z2", "kind": "centre", "centre_biased": False, "dataset_flags": []},
    ]
    h = zoo_stats.heldout_metrics(results)
    assert h["n_models"] == 8 and h["n_cue_models_relying"] == 3
    assert h["n_centre_models"] == 2 and h["n_centre_models_biased"] == 1 and h["centre_false_flags"] == 0
    # the marker named as an object: found on its region whatever word the model gave it, and
    # not a clean false flag
    assert h["hallucinated_object"] == {"n_audits_naming_marker": 1, "found": 1, "found_names": ["m"]}
    assert h["recall"] == pytest.approx(2 / 3) and h["recall_ci"] == pytest.approx(zoo_stats.wilson(2, 3))
    assert h["precision"] == pytest.approx(2 / 4)  # c1, c3 right; c2 wrong region; k on a clean model
    assert h["clean_false_flags"] == 1 and h["centre_bias_detected"] is True
    assert h["missed"] == ["c2"]
    assert h["sample_level"]["tp"] == 9 and h["sample_level"]["fp"] == 5 and h["sample_level"]["fn"] == 9


def _fake_zoo(tmp_path: Path) -> Path:
    zoo = tmp_path / "zoo"
    truth = {}
    for e in ENTRIES:
        if e["source"] in ("train", "recipe_only"):
            (zoo / e["name"]).mkdir(parents=True)
            (zoo / e["name"] / "config.json").write_text("{}")
        truth[e["name"]] = {"relies": e["kind"] == "cue", "centre_biased": e["kind"] == "centre"}
    (zoo / "ground_truth.json").write_text(json.dumps(truth))
    return zoo


def _fake_audit(entry, rec, zoo, cache, seed, n, settings, **kw):
    """Scripted audits: a cue model gets its cue flagged (with the gate statistics the
    calibration reads); clean / marker models get nothing; centre models a centre score."""
    rows = []
    box = zoo_eval.entry_cue_box(entry) or [0.25, 0.25, 0.375, 0.375]
    if entry["kind"] == "cue":
        ev = {"cluster_enrichment": 3.0, "consistency": 0.9, "specificity": 1.6,
              "counterfactual": {"persist": 0.5, "persist_both": 0.0, "vanish": 1.0, "vanish_control": 0.0}}
        rows.append({"sample_id": None, "kind": "clever_hans", "word": entry["cue"]["word"], "method": "token-gradnorm",
                     "region": ",".join(f"{v:.4f}" for v in box), "confirmed": True, "score": 0.05,
                     "evidence_json": json.dumps(ev)})
    if entry["kind"] == "centre":
        rows.append({"sample_id": None, "kind": "centre_bias", "word": "red", "method": "token-gradnorm", "region": None,
                     "confirmed": None, "score": 0.4, "evidence_json": "{}"})
    naming = ({"central_named": 40, "central_objects": 50, "off_centre_named": 10, "off_centre_objects": 50}
              if entry["kind"] == "centre" else
              {"central_named": 45, "central_objects": 50, "off_centre_named": 44, "off_centre_objects": 50})
    gap = naming["central_named"] / 50 - naming["off_centre_named"] / 50
    centre = {"token-gradnorm": {"score": 0.4 if entry["kind"] == "centre" else -0.1, **naming, "naming_gap": gap},
              "diffusion-cam": None}
    scan = {"blue": {"n_occurrences": 8, "skipped": "fewer than min_word_samples=10 occurrences"}}
    refuted = [{"word": "blue", "method": "token-gradnorm", "region": "0.1,0.1,0.2,0.2", "score": 0.1}]
    return {"rows": rows, "cue_ids": set(), "universe": set(), "centre": centre, "scan": scan, "refuted": refuted}


def test_evaluation_writes_the_contract_on_fake_audits(tmp_path):
    zoo = _fake_zoo(tmp_path)
    out = zoo_eval.evaluate(REC, zoo, tmp_path / "cache", quick=False, device="cpu", threads=1, audit=_fake_audit,
                           log=lambda m: None)
    h = out["heldout"]
    for key in ("n_models", "n_cue_models_relying", "recall", "recall_ci", "precision", "clean_false_flags",
                "centre_bias_detected"):
        assert key in h
    assert set(out["calibration"]) >= {"models", "seeds"}
    held = [e for e in ENTRIES if e["split"] == "heldout"]
    assert h["n_models"] == len(held)
    assert h["n_cue_models_relying"] == sum(e["kind"] == "cue" for e in held)
    assert h["recall"] == 1.0 and h["precision"] == 1.0 and h["clean_false_flags"] == 0
    assert h["centre_bias_detected"] is True and len(h["recall_ci"]) == 2
    assert out["calibration"]["models"] == [e["name"] for e in ENTRIES if e["split"] == "calibration"]
    assert out["calibration"]["seeds"] == [REC["seeds"]["calibration_audit"]]
    assert out["calibration"]["thresholds"]["values"]["cluster_enrichment_min"] == pytest.approx(2.7)
    # every held-out model keeps the centre statistics its run-level flags were decided on
    centre_model = next(r for r in out["per_model"] if r["kind"] == "centre")
    assert centre_model["centre"]["map_scores"] == {"token-gradnorm": 0.4}
    # 0.8 vs 0.2 of 50 each: pooled p 0.5, se sqrt(0.25 * 2 / 50) = 0.1, z = 6
    assert centre_model["centre"]["naming_z"] == pytest.approx(6.0)
    # and what the audit did with its cue word (the scan's record, refuted suspects on it)
    for r in out["per_model"]:
        if r["cue_word"] == "blue":
            assert r["cue_word_trace"]["scan"]["skipped"].startswith("fewer than")
            assert len(r["cue_word_trace"]["refuted"]) == 1
        elif r["cue_word"] is not None:
            assert r["cue_word_trace"] == {"scan": "the word was in no answer's maps", "refuted": []}
        else:
            assert r["cue_word_trace"] is None
    assert any(r["cue_word"] == "blue" for r in out["per_model"])
    clean_model = next(r for r in out["per_model"] if r["kind"] == "clean")
    assert clean_model["centre"]["naming_z"] < 1 and clean_model["centre"]["map_scores"]["token-gradnorm"] == -0.1
    json.dumps(out)  # serialisable
    quick = zoo_eval.evaluate(REC, zoo, tmp_path / "cache", quick=True, device="cpu", threads=1, audit=_fake_audit,
                             log=lambda m: None)
    assert quick["calibration"]["models"] == [e["name"] for e in ENTRIES if e["name"] in REC["quick"]["calibration"]]
    assert quick["heldout"]["n_models"] == len(REC["quick"]["heldout"])


def test_missing_zoo_names_the_folder_and_the_build_command(tmp_path):
    with pytest.raises(SystemExit) as err:
        zoo_eval.evaluate(REC, tmp_path / "nozoo", tmp_path / "cache", quick=True, device="cpu", threads=1,
                         audit=_fake_audit, log=lambda m: None)
    msg = str(err.value)
    assert str(tmp_path / "nozoo" / "cue-circle-tl") in msg
    assert "python benchmarks/cue_zoo.py build --out" in msg and "--only cue-circle-tl" in msg


def test_allow_missing_evaluates_the_built_models_and_lists_the_others(tmp_path):
    zoo = _fake_zoo(tmp_path)
    gone = ["cue-blue-br", "known-miss-default-recipe-cue"]
    for name in gone:
        (zoo / name / "config.json").unlink()
    out = zoo_eval.evaluate(REC, zoo, tmp_path / "cache", quick=False, device="cpu", threads=1, audit=_fake_audit,
                           log=lambda m: None, allow_missing=True)
    assert sorted(out["not_built"]) == sorted(gone)
    assert "--only cue-blue-br" in out["not_built"]["cue-blue-br"]
    assert "--include-expensive" in out["not_built"]["known-miss-default-recipe-cue"]
    assert not set(gone) & set(out["heldout_models"] + out["calibration"]["models"])
    assert out["heldout"]["n_models"] == sum(e["split"] == "heldout" for e in ENTRIES) - len(gone)


def test_every_trained_recipe_draws_its_data_and_the_cue_shows_only_with_its_word():
    for e in ENTRIES:
        if e["source"] != "train":
            continue
        samples, settings = zoo_recipes.training_samples(e, 12, e["train_seed"])
        assert len(samples) == 12, e["name"]
        cue = e.get("cue")
        if cue is not None:
            assert cue["word"] in (*settings.colors, *settings.shapes)
            assert all(cue["word"] in s.answer.split() for s in samples if s.cue_present), e["name"]
        else:
            assert not any(s.cue_present for s in samples)


def test_adding_a_heldout_model_reuses_the_recorded_thresholds_and_matches_a_full_evaluation(tmp_path):
    """`eval --add`: a model judged after a full evaluation gets that evaluation's fitted
    thresholds (no calibration audit is rerun) and the held-out figures are those a full
    evaluation with it would give; calibration entries and repeats are refused."""
    zoo = _fake_zoo(tmp_path)
    kw = dict(device="cpu", threads=1, log=lambda m: None)
    full = zoo_eval.evaluate(REC, zoo, tmp_path / "cache", quick=False, audit=_fake_audit, **kw)
    late = next(e["name"] for e in ENTRIES if e["source"] == "recipe_only")
    assert late in full["heldout_models"]
    # the evaluation as it stood before the late model existed
    before = dict(full, heldout_models=[m for m in full["heldout_models"] if m != late],
                  per_model=[r for r in full["per_model"] if r["name"] != late])
    before["heldout"] = zoo_stats.heldout_metrics(before["per_model"])
    # recorded thresholds that no default equals: the added audit must receive exactly these
    recorded = dict(before["calibration"]["thresholds"]["values"], cf_confirm_min=0.61, cluster_specificity_min=1.3)
    before["calibration"] = {**before["calibration"], "thresholds": {**before["calibration"]["thresholds"],
                                                                     "values": recorded}}
    seen = []

    def audit(entry, *a, **k):
        seen.append((entry["name"], a[-1]))  # settings is the last positional argument
        return _fake_audit(entry, *a, **k)

    out = zoo_eval.evaluate_added(REC, zoo, tmp_path / "cache", before, [late], audit=audit, **kw)
    assert [name for name, _ in seen] == [late]  # no calibration audit rerun
    assert seen[0][1].cf_confirm_min == 0.61 and seen[0][1].cluster_specificity_min == 1.3
    assert out["heldout"] == full["heldout"]
    assert out["heldout_models"][-1] == late and out["added"][0]["models"] == [late]
    assert out["calibration"] == before["calibration"]
    for bad in ([next(e["name"] for e in ENTRIES if e["split"] == "calibration")], [full["heldout_models"][0]]):
        with pytest.raises(SystemExit):
            zoo_eval.evaluate_added(REC, zoo, tmp_path / "cache", before, bad, audit=audit, **kw)
