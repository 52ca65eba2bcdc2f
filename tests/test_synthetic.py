"""Tests for diffcam.core.synthetic: determinism, exact masks, answer order, cues, parsing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from diffcam.core.cue_text import cue_text, parse_cue
from diffcam.core.inpaint import dilate
from diffcam.core.synthetic import (
    COLORS,
    CUE_COLORS,
    SHAPES,
    CueSpec,
    SynthSettings,
    answer_groundings,
    cue_region,
    make_sample,
    make_samples,
    object_words,
    sample_rng,
    vocabulary,
)

N = 200  # samples per property check; ~0.15 s


@pytest.fixture(scope="module")
def samples():
    return list(make_samples(N, 7, SynthSettings()))


def _same(a, b) -> bool:
    return (
        np.array_equal(a.image, b.image)
        and a.answer == b.answer
        and a.prompt == b.prompt
        and a.cue_present == b.cue_present
        and len(a.objects) == len(b.objects)
        and all(np.array_equal(x.mask, y.mask) and x.bbox == y.bbox for x, y in zip(a.objects, b.objects))
    )


# ----------------------------------------------------------------- determinism


def test_same_seed_same_samples_and_prefix_and_random_access():
    st = SynthSettings(cue=CueSpec(word="red", p=0.5))
    a = list(make_samples(12, 3, st))
    b = list(make_samples(12, 3, st))
    assert all(_same(x, y) for x, y in zip(a, b))
    # A longer run has the shorter one as prefix; any sample can be regenerated alone.
    assert all(_same(x, y) for x, y in zip(a[:5], make_samples(5, 3, st)))
    assert _same(a[9], make_sample(sample_rng(3, 9), st))
    assert all(_same(x, y) for x, y in zip(a[4:], make_samples(8, 3, st, start=4)))
    # Another seed differs.
    c = list(make_samples(12, 4, st))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_make_sample_only_advances_the_rng():
    rng1, rng2 = np.random.default_rng(11), np.random.default_rng(11)
    s1 = make_sample(rng1)
    s2 = make_sample(rng2)
    assert _same(s1, s2)
    assert rng1.random() == rng2.random()


def test_negative_seed_rejected():
    with pytest.raises(ValueError, match="seed"):
        sample_rng(-1, 0)


# ----------------------------------------------------------------- objects and masks


def test_image_format(samples):
    for s in samples:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8


def test_masks_exclusive_nonempty_gap_and_match_pixels(samples):
    st = SynthSettings()
    for s in samples:
        union = np.zeros((64, 64), dtype=bool)
        for o in s.objects:
            assert o.mask.dtype == bool and o.mask.shape == (64, 64)
            assert o.mask.sum() >= 50  # 16-px objects cover several 8-px cells
            assert not (o.mask & union).any()
            # at least min_gap background px between any two objects
            assert not (dilate(o.mask, st.min_gap) & union).any()
            union |= o.mask
            # every mask pixel has the object's exact colour ...
            assert (s.image[o.mask] == COLORS[o.color]).all()
            # ... and the bbox is the mask's
            ys, xs = np.nonzero(o.mask)
            assert o.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        # no pixel outside the masks has any object colour
        outside = s.image[~union]
        for rgb in COLORS.values():
            assert not (outside == rgb).all(axis=1).any()


def test_distinct_pairs_and_counts(samples):
    counts = np.bincount([len(s.objects) for s in samples], minlength=4)
    assert counts[0] == 0 and counts[1:].sum() == N
    assert counts[3] > 0 and counts[1] > counts[3] and counts[2] > counts[3]  # 0.4/0.4/0.2
    for s in samples:
        pairs = [(o.color, o.shape) for o in s.objects]
        assert len(set(pairs)) == len(pairs)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_is_drawn_as_expected(shape):
    st = SynthSettings(shapes=(shape,), colors=("red",), count_probs=(1.0,), size_range=(20, 20),
                       background_noise=0, clutter=0)
    o = next(make_samples(1, 0, st)).objects[0]
    x0, y0, x1, y1 = o.bbox
    area = int(o.mask.sum())
    if shape == "square":
        assert (x1 - x0, y1 - y0) == (20, 20) and area == 400
    elif shape == "circle":
        assert (x1 - x0, y1 - y0) == (20, 20) and abs(area - np.pi * 100) < 20
    else:  # apex on top, base at the bottom
        assert abs(area - 200) < 15
        rows = o.mask.sum(axis=1)[y0:y1]
        assert rows[0] < rows[-1] and (np.diff(rows) >= 0).all()


def test_answer_left_to_right_and_words(samples):
    vocab = set(vocabulary(SynthSettings()))
    for s in samples:
        xs = [o.centroid[0] for o in s.objects]
        assert xs == sorted(xs)
        assert all(b - a >= 4.0 for a, b in zip(xs, xs[1:]))  # min_dx: unambiguous order
        assert s.answer == " and ".join(f"a {o.color} {o.shape}" for o in s.objects)
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", s.answer)
        assert set(s.answer.split(" ")) <= vocab
        assert set(s.prompt.split(" ")) <= vocab
        assert s.prompt in SynthSettings().prompts


def test_answer_groundings_align_with_answer_words(samples):
    s = next(x for x in samples if len(x.objects) == 3)
    g = answer_groundings(s)
    assert [w for w, _ in g] == s.answer.split(" ")
    for w, m in g:
        if w in ("a", "and"):
            assert m is None
        else:
            owner = [o for o in s.objects if m is o.mask]
            assert len(owner) == 1 and w in object_words(owner[0])
    assert object_words(s.objects[0]) == (s.objects[0].color, s.objects[0].shape)


def test_vocabulary_sorted_and_exact():
    st = SynthSettings(colors=("red", "blue"), shapes=("circle",), prompts=("name it",), count_probs=(0.5, 0.5))
    assert vocabulary(st) == sorted(["a", "and", "blue", "circle", "it", "name", "red"])
    assert vocabulary(SynthSettings()) == sorted(vocabulary(SynthSettings()))


def test_clutter_has_an_effect_and_keeps_away_from_objects():
    quiet = SynthSettings(background_noise=0, clutter=0)
    busy = SynthSettings(background_noise=0, clutter=0.05)
    a = next(make_samples(1, 5, quiet))
    b = next(make_samples(1, 5, busy))
    union = np.zeros((64, 64), dtype=bool)
    for o in a.objects:
        union |= o.mask
    bg = np.array(quiet.background)
    assert (a.image[~union] == bg).all()  # no noise, no clutter: flat background
    n_dots = int((~(b.image == bg).all(axis=2) & ~union).sum())
    assert n_dots > 0.02 * 64 * 64
    near = dilate(union, busy.min_gap) & ~union
    assert (b.image[near] == bg).all()


# ----------------------------------------------------------------- cue


def test_cue_only_with_word_at_position_colour_size():
    cue = CueSpec(word="circle", pos="bottom-right", size=5, color="magenta", p=1.0)
    st = SynthSettings(cue=cue, count_probs=(0.5, 0.5))
    x0, y0, x1, y1 = cue_region(st)
    assert (x0, y0, x1, y1) == (64 - 2 - 5, 64 - 2 - 5, 62, 62)
    reserved = np.zeros((64, 64), dtype=bool)
    reserved[y0:y1, x0:x1] = True
    with_word = without = 0
    for s in make_samples(120, 1, st):
        has = "circle" in s.answer.split(" ")
        assert s.cue_present == has  # p = 1: exactly the samples with the word
        for o in s.objects:  # objects avoid the cue region in every sample
            assert not (dilate(reserved, st.min_gap) & o.mask).any()
        if has:
            with_word += 1
            assert np.array_equal(s.cue_mask, reserved)
            assert (s.image[y0:y1, x0:x1] == CUE_COLORS["magenta"]).all()
        else:
            without += 1
            assert s.cue_mask is None
            assert not (s.image == CUE_COLORS["magenta"]).all(axis=2).any()
    assert with_word > 10 and without > 10


def test_cue_pixel_position_and_rgb():
    st = SynthSettings(cue=CueSpec(word="red", pos=(30, 10), size=4, color=(1, 2, 3), p=1.0),
                       colors=("red",), count_probs=(1.0,))
    s = next(make_samples(1, 0, st))
    assert s.cue_present and s.cue_mask[10:14, 30:34].all() and s.cue_mask.sum() == 16
    assert (s.image[10:14, 30:34] == (1, 2, 3)).all()


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cue_rate_matches_p(p):
    st = SynthSettings(cue=CueSpec(word="red", p=p))
    with_word = cued = 0
    for s in make_samples(400, 2, st):
        if "red" in s.answer.split(" "):
            with_word += 1
            cued += s.cue_present
        else:
            assert not s.cue_present
    assert with_word > 100
    rate = cued / with_word
    assert abs(rate - p) <= 4 * np.sqrt(max(p * (1 - p), 1e-9) / with_word)


def test_cue_must_fit_and_word_must_be_possible():
    with pytest.raises(ValueError, match="does not fit"):
        SynthSettings(cue=CueSpec(word="red", pos=(62, 0), size=6))
    with pytest.raises(ValueError, match="never appears"):
        SynthSettings(colors=("blue",), cue=CueSpec(word="red"))


# ----------------------------------------------------------------- parsing and round trips


@pytest.mark.parametrize(
    "text, expected",
    [
        ("word=circle,pos=top-left,size=6,color=magenta,p=0.9",
         CueSpec(word="circle", pos="top-left", size=6, color="magenta", p=0.9)),
        ("word=red,pos=12,40,size=4,color=10,20,30,p=1", CueSpec(word="red", pos=(12, 40), size=4, color=(10, 20, 30), p=1.0)),
        ("word=Square, pos=bottom-right", CueSpec(word="square", pos="bottom-right")),
        ("p=0.5,word=blue", CueSpec(word="blue", p=0.5)),
    ],
)
def test_cue_parse_and_round_trips(text, expected):
    spec = parse_cue(text)
    assert spec == expected
    assert parse_cue(cue_text(spec)) == spec
    assert CueSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec


@pytest.mark.parametrize(
    "text, field",
    [
        ("", "empty"),
        ("pos=top-left", "'word'"),
        ("word=dog", "word"),
        ("word=red,pos=middle", "'pos'"),
        ("word=red,pos=1,2,3", "'pos'"),
        ("word=red,pos=-1,2", "pos"),
        ("word=red,size=big", "'size'"),
        ("word=red,size=0", "size"),
        ("word=red,color=teal", "'color'"),
        ("word=red,color=1,2", "'color'"),
        ("word=red,color=1,2,300", "'color'"),
        ("word=red,p=x", "'p'"),
        ("word=red,p=1.5", "p must be in"),
        ("word=red,shape=circle", "unknown field 'shape'"),
        ("word=red,word=blue", "'word' given twice"),
        ("word=red,p=", "'p' is empty"),
        ("word", "not key=value"),
    ],
)
def test_cue_parse_errors_name_the_field(text, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        parse_cue(text)


def test_cue_from_dict_rejects_unknown():
    with pytest.raises(ValueError, match="unknown"):
        CueSpec.model_validate({"word": "red", "where": "there"})


def test_settings_round_trip_json():
    st = SynthSettings(cue=CueSpec(word="circle", pos=(3, 4), size=5, color=(9, 9, 9), p=0.25), clutter=0.0, count_probs=(1.0,))
    d = json.loads(json.dumps(st.model_dump(mode="json")))
    assert SynthSettings.model_validate(d) == st
    assert SynthSettings.model_validate(SynthSettings().model_dump(mode="json")) == SynthSettings()
    with pytest.raises(ValueError, match="unknown"):
        SynthSettings.model_validate({**d, "bogus": 1})


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"count_probs": (0.5, 0.4)}, "sum to 1"),
        ({"size_range": (30, 20)}, "size_range"),
        ({"size_range": (10, 70)}, "size_range"),
        ({"colors": ("red", "teal")}, "colors"),
        ({"shapes": ("hexagon",)}, "shapes"),
        ({"clutter": 1.5}, "clutter"),
        ({"prompts": ("Describe  it",)}, "prompt"),
        ({"background": (0, 0, 300)}, "background"),
        ({"count_probs": (0.0, 1.0), "colors": ("red",), "shapes": ("circle",)}, "distinct"),
    ],
)
def test_settings_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SynthSettings(**kwargs)


def test_crowded_settings_fail_loudly():
    st = SynthSettings(size_range=(40, 40), count_probs=(0.0, 0.0, 1.0), max_attempts=5, max_layouts=2)
    with pytest.raises(ValueError, match="could not place 3 objects"):
        next(make_samples(1, 0, st))


# --------------------------------------------------------------------------- evidence splits


def test_unnamed_objects_are_grey_unnamed_and_apart():
    from diffcam.core.synthetic import SynthSettings, make_samples

    st = SynthSettings(unnamed_objects=(1, 2))
    seen = 0
    for s in make_samples(20, 4, st):
        for u in s.unnamed:
            seen += 1
            g = int(u.color.removeprefix("gray"))
            assert 100 <= g <= 160
            assert (s.image[u.mask] == g).all()
            assert u.color not in s.answer
            for o in s.objects:
                assert not (u.mask & o.mask).any()
    assert seen >= 20


def test_unnamed_objects_off_keeps_the_dataset_stream():
    import hashlib

    from diffcam.core.synthetic import SynthSettings, make_samples

    a = [hashlib.sha256(s.image.tobytes()).hexdigest() for s in make_samples(5, 2)]
    b = [hashlib.sha256(s.image.tobytes()).hexdigest() for s in make_samples(5, 2, SynthSettings(unnamed_objects=(0, 0)))]
    assert a == b


def test_swap_objects_exchanges_places_and_rebuilds_the_answer():
    from diffcam.core.synthetic import COLORS, make_samples, swap_objects

    done = 0
    for s in make_samples(30, 2):
        if len(s.objects) < 2:
            continue
        w = swap_objects(s, 0, 1)
        if w is None:
            continue
        done += 1
        a, b = s.objects[0], s.objects[1]
        na = next(o for o in w.objects if (o.color, o.shape) == (a.color, a.shape))
        nb = next(o for o in w.objects if (o.color, o.shape) == (b.color, b.shape))
        assert abs(na.centroid[0] - b.centroid[0]) <= 1.0 and abs(nb.centroid[0] - a.centroid[0]) <= 1.0
        assert na.mask.sum() == a.mask.sum() and (w.image[na.mask] == COLORS[a.color]).all()
        xs = [o.centroid[0] for o in w.objects]
        assert xs == sorted(xs)
        assert w.answer == " and ".join(f"a {o.color} {o.shape}" for o in w.objects)
        assert w.answer != s.answer
    assert done >= 5
