"""Run-level centre bias against the images' own object prior (diffcam.core.bias.centre)."""

from __future__ import annotations

import numpy as np
import pytest

from diffcam.core.bias.centre import CentreSample, naming_z, run_centre_bias, run_centre_flags, run_naming_flag
from diffcam.core.bias.dataset import centre_bias_index
from diffcam.core.bias.settings import BiasSettings
from diffcam.core.stats import centre_mask

GRID = (8, 8)
CENTRE = centre_mask(GRID)


def _objects(rng, n=3):
    """n one-cell-or-bigger square objects at random cells: coverage maps."""
    out = []
    for _ in range(n):
        r, c = rng.integers(0, 7, size=2)
        cov = np.zeros(GRID)
        cov[r:r + 2, c:c + 2] = 1.0
        out.append(cov)
    return out


def _run(rng, n_samples, *, names, map_of, noise=0.01):
    samples = []
    for k in range(n_samples):
        objs = _objects(rng)
        named = [names(o) for o in objs]
        maps = [map_of(o) + noise * rng.random(GRID) for o, nm in zip(objs, named) if nm]
        samples.append(CentreSample(f"s{k}", {"m": maps}, objs, named))
    return samples


def _central(cov):
    return cov[CENTRE].sum() / cov.sum() > 0.5


def test_a_model_that_names_every_object_where_it_is_has_no_run_centre_bias():
    rng = np.random.default_rng(0)
    st = run_centre_bias(_run(rng, 200, names=lambda o: True, map_of=lambda o: o), BiasSettings())["m"]
    assert abs(st["score"]) < 0.05
    assert st["naming_gap"] == 0.0 and st["central_named_share"] == st["off_centre_named_share"] == 1.0
    assert run_centre_flags({"m": st}, BiasSettings()) == []


def test_a_model_that_names_only_central_objects_is_flagged_although_each_word_map_fits_its_object():
    """The word-level index compares a word's maps with that word's (named, central)
    objects and sees nothing; against the objects the images hold, the run is central."""
    rng = np.random.default_rng(1)
    samples = _run(rng, 200, names=_central, map_of=lambda o: o)
    st = run_centre_bias(samples, BiasSettings())["m"]
    assert st["naming_gap"] == 1.0
    assert st["score"] > 0.3 and st["map_centre_frac"] > 0.9
    flags = run_centre_flags({"m": st}, BiasSettings())
    assert [(f.kind, f.word, f.method) for f in flags] == [("centre_bias", None, "m")]
    assert flags[0].region == (0.25, 0.25, 0.75, 0.75)
    # the word-level index on the same maps: mean map vs the named objects' own mean mask
    maps = [m / m.sum() for s in samples for m in s.maps["m"]]
    masks = [o / o.sum() for s in samples for o, nm in zip(s.objects, s.named) if nm]
    word_level = centre_bias_index(np.mean(maps, 0), np.mean(masks, 0))
    assert word_level["score"] < BiasSettings().centre_bias_threshold


def test_half_of_each_map_on_a_fixed_centre_prior_is_flagged():
    """The issue's blind spot: 50 % of every map on a centre prior scored 0.18 against a
    uniform-like reference and was not flagged; against the object prior it is."""
    rng = np.random.default_rng(2)
    prior = np.zeros(GRID)
    prior[3:5, 3:5] = 1.0
    prior /= prior.sum()
    samples = _run(rng, 200, names=lambda o: True, map_of=lambda o: 0.5 * o / o.sum() + 0.5 * prior, noise=0.0)
    st = run_centre_bias(samples, BiasSettings())["m"]
    # half the mass moves from the objects (prior_centre_frac central) to the centre box
    # (up to the objects that overlap: the prior counts their union once)
    assert st["score"] == pytest.approx(0.5 * (1.0 - st["prior_centre_frac"]), abs=0.01)
    assert run_centre_flags({"m": st}, BiasSettings()) != []


def test_too_few_maps_or_no_objects_raise_nothing():
    rng = np.random.default_rng(3)
    st = run_centre_bias(_run(rng, 3, names=_central, map_of=lambda o: o), BiasSettings())["m"]
    assert run_centre_flags({"m": st}, BiasSettings(min_word_samples=50)) == []
    no_objects = [CentreSample("s", {"m": [np.ones(GRID)]}, [], [])]
    assert run_centre_bias(no_objects, BiasSettings()) == {"m": None}
    assert run_centre_bias([], BiasSettings()) == {}


def test_naming_z_is_the_pooled_two_proportion_statistic():
    # 30/40 central named vs 10/40 off: p = 0.5, se = sqrt(0.25 * 2/40) = 0.1118, z = 0.5 / se
    assert naming_z(30, 40, 10, 40) == pytest.approx(0.5 / np.sqrt(0.25 * (2 / 40)))
    assert naming_z(5, 10, 5, 10) == 0.0
    assert naming_z(3, 0, 1, 5) is None and naming_z(4, 4, 6, 6) is None  # no side / no variance


def test_naming_flag_fires_on_a_model_that_names_only_central_objects_and_not_on_maps():
    """The zoo's centre-biased model has maps *less* central than its objects; its answers
    still give it away. Here the maps sit off-centre on purpose: the map score is negative,
    the naming flag fires (method None), a model that names everything raises nothing."""
    rng = np.random.default_rng(4)
    corner = np.zeros(GRID)
    corner[0, 0] = 1.0
    st = run_centre_bias(_run(rng, 120, names=_central, map_of=lambda o: corner), BiasSettings())["m"]
    assert st["score"] < 0 and run_centre_flags({"m": st}, BiasSettings()) == []
    flags = run_naming_flag({"m": st}, BiasSettings())
    assert [(f.kind, f.word, f.method, f.region) for f in flags] == [("centre_bias", None, None, (0.25, 0.25, 0.75, 0.75))]
    ev = flags[0].evidence
    assert ev["naming_gap"] == 1.0 and ev["z"] == pytest.approx(flags[0].score) and flags[0].score >= 3.0
    assert flags[0].flag_id != run_centre_flags({"m": {**st, "score": 1.0}}, BiasSettings())[0].flag_id

    fair = run_centre_bias(_run(rng, 120, names=lambda o: True, map_of=lambda o: o), BiasSettings())["m"]
    assert run_naming_flag({"m": fair}, BiasSettings()) == []


def test_naming_flag_needs_both_significance_and_size():
    st = {"central_named": 520, "central_objects": 1000, "off_centre_named": 480, "off_centre_objects": 1000,
          "naming_gap": 0.04, "grid": [8, 8]}
    assert naming_z(520, 1000, 480, 1000) > 1.5
    assert run_naming_flag({"m": st}, BiasSettings(centre_naming_z_min=1.5)) == []  # significant, but 4 points
    few = {**st, "central_named": 9, "central_objects": 9, "off_centre_named": 0, "off_centre_objects": 9,
           "naming_gap": 1.0}
    assert run_naming_flag({"m": few}, BiasSettings()) == []  # under min_word_samples objects a side
    assert run_naming_flag({"m": few}, BiasSettings(min_word_samples=5)) != []
