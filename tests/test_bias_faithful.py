"""Spatial flags come only from maps this run measured as more faithful than the model-free
`objectness` map, and never for function words."""

from __future__ import annotations

import numpy as np

from diffcam.core.bias.faithful import REFERENCE, rank_maps, spatial_methods
from diffcam.core.bias.settings import BiasSettings


def test_only_maps_above_objectness_may_raise_spatial_flags():
    rates = {"diffusion-cam": (0.16, 400), "token-gradnorm": (0.55, 400), REFERENCE: (0.49, 400),
             "random": (0.13, 400), "gradcam": (None, 0)}
    ranking = rank_maps(rates)
    assert [ranking[m].rank for m in ("token-gradnorm", REFERENCE, "diffusion-cam", "random")] == [1, 2, 3, 4]
    assert ranking["gradcam"].rank is None and not ranking["gradcam"].beats_reference  # not measured
    assert not ranking[REFERENCE].beats_reference  # the reference never beats itself
    assert spatial_methods(ranking, ("diffusion-cam", "token-gradnorm", "gradcam")) == ("token-gradnorm",)
    ev = ranking["token-gradnorm"].evidence(ranking[REFERENCE])
    assert ev == {"method": "token-gradnorm", "vanish_rate": 0.55, "n_words": 400, "rank": 1,
                  "reference": REFERENCE, "reference_vanish_rate": 0.49}


def test_a_tie_with_objectness_or_an_unmeasured_reference_qualifies_nothing():
    tie = rank_maps({"token-gradnorm": (0.5, 10), REFERENCE: (0.5, 10)})
    assert spatial_methods(tie, ["token-gradnorm"]) == ()  # strictly above chance, not level with it
    no_ref = rank_maps({"token-gradnorm": (0.9, 10), REFERENCE: (None, 0)})
    assert spatial_methods(no_ref, ["token-gradnorm"]) == ()
    assert spatial_methods(rank_maps({"token-gradnorm": (0.9, 10)}), ["token-gradnorm"]) == ()


def test_function_words_are_never_flagged():
    """The same corner hot-spot map on "a" and on "circle": only the content word can be flagged."""
    from diffcam.tasks.bias.step import analyse_run

    hot = np.zeros((8, 8), dtype=np.float32)
    hot[0, 0] = 1.0  # all the mass in a corner cell, off the object
    mask = np.zeros((64, 64), dtype=bool)
    mask[40:56, 40:56] = True
    run = {"words": {"s1": [(0, "a", True), (1, "circle", False)]},
           "maps": {("s1", 0, "token-gradnorm"): hot, ("s1", 1, "token-gradnorm"): hot},
           "samples": {"s1": {"sample_id": "s1"}}}
    settings = BiasSettings(sample_methods=("token-gradnorm",), dataset_methods=("token-gradnorm",))
    flags, _, _ = analyse_run(run, {"s1": [("circle", mask, None)]}, settings)
    assert {f.kind for f in flags} >= {"border_hotspot", "off_object"}
    assert {(f.word, f.word_index) for f in flags} == {("circle", 1)}
