"""Which kind of dependence: a shortcut about a real object, or a region named as an object of its own."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from diffcam.core.bias.settings import BiasSettings
from diffcam.core.bias.verdict import (
    NAMED_AS_OBJECT,
    UNCHANGED,
    WORD_CHANGED,
    answer_change,
    content_words,
    dependence_verdict,
)
from tests.test_bias import _fake_run, _HansAdapter

#: The scripted models here answer but cannot be scanned (no canvas): the discovery scan
#: has its own tests (tests/test_bias_scan.py).
NO_SCAN = BiasSettings(scan_max_samples=0)


def test_content_words_leave_out_function_words_and_punctuation():
    assert content_words("A red circle, and a Red square.") == {"red": 2, "circle": 1, "square": 1}


@pytest.mark.parametrize("before, after, real, expected", [
    ("a red circle", "a red circle", {"red", "circle"}, UNCHANGED),
    # the marker was read as a second object; erased, its phrase goes and the real one stays
    ("a red circle and a green square", "a red circle", {"red", "circle"}, NAMED_AS_OBJECT),
    # a shortcut: the marker decided the real object's shape word
    ("a red circle", "a red square", {"red", "square"}, WORD_CHANGED),
    # the real object's phrase went altogether: that is about a real object, not an extra one
    ("a red circle and a blue square", "a blue square", {"red", "circle", "blue", "square"}, WORD_CHANGED),
    # the same words twice (real square + marker named "square"): one goes, the real word stays
    ("a red square and a green square", "a red square", {"red", "square"}, NAMED_AS_OBJECT),
    # measured on the shipped clean model: the marker's phrase goes and the real circle, called
    # "square" while the marker was there, is named right again
    ("a blue square and a red circle and a blue triangle", "a blue circle and a red circle",
     {"blue", "circle", "red"}, NAMED_AS_OBJECT),
    # a phrase went but what came instead is no real object's word: not only an extra object
    ("a red circle and a green square", "a red triangle", {"red", "circle"}, WORD_CHANGED),
])
def test_answer_change(before, after, real, expected):
    assert answer_change(before, after, real) == expected


def _ex(original, no_region, control, real):
    return {"answers": {"original": original, "no_region": no_region, "control": control}, "object_words": real}


def test_verdict_named_as_object_vs_shortcut_vs_none():
    real = ["red", "circle"]
    named = [_ex("a red circle and a green circle", "a red circle", "a red circle and a green circle", real)] * 4
    v = dependence_verdict(named, "circle", 0.5)
    assert v["kind"] == "named_as_object" and v["named_score"] == 1.0 and v["shortcut_score"] == 0.0

    short = [_ex("a red circle", "a red square", "a red circle", real)] * 3 + \
        [_ex("a red circle", "a red circle", "a red circle", real)]
    v = dependence_verdict(short, "circle", 0.5)
    assert v["kind"] == "shortcut" and v["shortcut_score"] == 0.75 and v["named_score"] == 0.0

    # the control erasure changes the answer as much as the region's: no dependence on the region
    fragile = [_ex("a red circle", "a red square", "a red square", real)] * 4
    v = dependence_verdict(fragile, "circle", 0.5)
    assert v["kind"] is None and v["shortcut_score"] == 0.0 and v["shortcut_rate_control"] == 1.0


class _NamerAdapter:
    """A clean model that reads the marker as an object of its own: it names every real
    object it still sees, and adds "a green <word>" while the marker colour is in the image.

    It recognises the scene by the pixels of the objects (erasing off-object windows
    keeps them; erasing an object drops that object's phrase)."""

    def __init__(self, word, rgb, samples):
        self.word, self.rgb, self.samples = word, np.array(rgb, dtype=np.uint8), samples
        self.calls = 0

    def prepare(self, image, prompt):
        return {"image": np.asarray(image)}

    def generate(self, inputs, settings):
        self.calls += 1
        img = inputs["image"]
        best = max(self.samples, key=lambda s: sum(int((img[o.mask] == s.image[o.mask]).all()) for o in s.objects))
        phrases = [f"a {o.color} {o.shape}" for o in best.objects if (img[o.mask] == best.image[o.mask]).all()]
        if np.all(img == self.rgb, axis=-1).any():
            phrases.append(f"a green {self.word}")
        return type("G", (), {"text": " and ".join(phrases)})()


def test_marker_read_as_an_object_is_a_hallucinated_object_not_a_shortcut(tmp_path: Path):
    """The issue's false finding: a clean model that names the marker as an extra object was
    reported as a confirmed clever_hans (shortcut). The same run now yields one
    `hallucinated_object` flag on the marker's region, no clever_hans, and per-sample flags
    whose own counterfactual says "named_as_object"."""
    from diffcam.tasks.bias.step import run_dataset_flags

    st, ds_dir, ss, samples = _fake_run(tmp_path, "circle", "top-left", "magenta", planted=True)
    namer = _NamerAdapter("circle", ss.cue.rgb, samples)
    rows = run_dataset_flags(st, "r1", None, ds_dir, NO_SCAN, adapter=namer, sample_level="never")
    dataset = [r for r in rows if r["sample_id"] is None]
    assert [(r["kind"], r["word"], r["confirmed"]) for r in dataset] == [("hallucinated_object", "circle", True)]
    ev = json.loads(dataset[0]["evidence_json"])
    cf = ev["counterfactual"]
    assert cf["finding"] == "hallucinated_object"
    assert cf["verdict"]["named_score"] == 1.0 and cf["verdict"]["shortcut_score"] == 0.0
    assert cf["vanish"] == 0.0  # the real circle is still named: the old vanish test saw nothing
    sample = [r for r in rows if r["kind"] == "suspect_region"]
    cue_ids = {f"synth-{i:06d}" for i, s in enumerate(samples) if s.cue_present}
    assert {r["sample_id"] for r in sample} == cue_ids
    assert {json.loads(r["evidence_json"])["verdict"] for r in sample} == {"named_as_object"}
    assert all(r["confirmed"] is True for r in sample)


def test_shortcut_model_stays_clever_hans_with_shortcut_sample_verdicts(tmp_path: Path):
    from diffcam.tasks.bias.step import run_dataset_flags

    st, ds_dir, ss, samples = _fake_run(tmp_path, "circle", "top-left", "magenta", planted=True)
    rows = run_dataset_flags(st, "r1", None, ds_dir, NO_SCAN, adapter=_HansAdapter("circle", ss.cue.rgb),
                             sample_level="never")
    dataset = [r for r in rows if r["sample_id"] is None]
    assert [(r["kind"], r["confirmed"]) for r in dataset] == [("clever_hans", True)]
    cf = json.loads(dataset[0]["evidence_json"])["counterfactual"]
    assert cf["finding"] == "clever_hans" and cf["verdict"]["kind"] == "shortcut"
    verdicts = {json.loads(r["evidence_json"])["verdict"] for r in rows if r["kind"] == "suspect_region"}
    assert verdicts == {"shortcut"}


def test_an_untested_suspect_that_every_per_sample_test_contradicts_is_refuted():
    """Over the counterfactual budget a suspect keeps confirmed=None; when its per-sample
    counterfactuals then test >= region_cf_refute_min samples and none depends on the
    region, it is refuted (the issue: such suspects were raised although each sample's own
    erase test showed no change)."""
    from diffcam.core.bias.flags import make_flag
    from diffcam.tasks.bias.step import late_refutations

    def suspect(confirmed, n_tested, n_shortcut=0, n_named=0, word="circle"):
        f = make_flag("clever_hans", 0.1, 0.05, {"sample_counterfactuals": {
            "n_tested": n_tested, "n_shortcut": n_shortcut, "n_named_as_object": n_named}},
            word=word, method="token-gradnorm", region=(0, 0, 0.125, 0.125), extra=word)
        return replace(f, confirmed=confirmed)

    settings = BiasSettings(region_cf_refute_min=10)
    flags = [suspect(None, 12, word="a"), suspect(None, 12, n_shortcut=1, word="b"),
             suspect(None, 12, n_named=2, word="c"), suspect(None, 9, word="d"), suspect(True, 40, word="e")]
    late = late_refutations(flags, settings)
    assert [f.word for f in late.values()] == ["a"]
    (refuted,) = late.values()
    assert refuted.confirmed is False and "none depends" in refuted.evidence["refuted_by"]


def test_the_erase_tests_erase_the_window_and_a_margin_and_the_control_has_that_size():
    """A 12-px marker at the top-right corner spans 2x2 cells of an 8x8 grid; the suspect
    window is one cell. Erasing that cell alone leaves most of the marker, which the model
    still reads (measured on the shipped clean model: the test saw no change at all). The
    erase box is the window grown by `cf_region_margin` cells (clipped), and the control is
    a window of the same size in cells, off the objects and off the erased box."""
    from diffcam.tasks.bias.counterfactual import control_box, erase_box

    grid = (8, 8)
    box = erase_box((0.875, 0.0, 1.0, 0.125), grid, 1)
    assert box == pytest.approx((0.75, 0.0, 1.0, 0.25))
    assert erase_box((0.5, 0.5, 0.625, 0.625), grid, 1) == pytest.approx((0.375, 0.375, 0.75, 0.75))
    assert erase_box((0.5, 0.5, 0.625, 0.625), grid, 0) == (0.5, 0.5, 0.625, 0.625)
    proto = np.ones(grid)
    obj = np.zeros(grid)
    obj[4:, :] = 1.0  # objects fill the bottom half
    ctrl = control_box(box, grid, proto, obj)
    x0, y0, x1, y1 = ctrl
    assert (round((x1 - x0) * 8), round((y1 - y0) * 8)) == (2, 2)  # the erased box's size in cells
    assert y1 <= 0.5 and not (x1 > 0.75 and y0 < 0.25)  # off the objects and off the erased box


def test_erasing_a_region_around_the_objects_leaves_their_pixels():
    """`erase_region` inpaints every pixel of its box; the counterfactuals erase around the
    objects, so a grown erase box that reaches an object cannot clip it (which the scripted
    namer above would read as a changed object)."""
    from diffcam.core.inpaint import erase_region_around

    img = np.full((64, 64, 3), 40, dtype=np.uint8)
    img[0:12, 52:64] = (160, 0, 200)  # the marker
    img[10:30, 40:60] = (200, 30, 30)  # an object reaching into the box
    obj = np.zeros((64, 64), dtype=bool)
    obj[10:30, 40:60] = True
    out = erase_region_around(img, (0.75, 0.0, 1.0, 0.25), obj)
    assert (out[obj] == img[obj]).all()
    assert (out[0:10, 52:64] == 40).all()  # the marker is gone, filled with the background
    assert (out[32:, :] == img[32:, :]).all()
