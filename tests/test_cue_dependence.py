"""`diffcam.evaluation.cue_dependence` counts what it says, on scripted models with known behaviour."""

from __future__ import annotations

import numpy as np

from diffcam.core.cue_text import parse_cue
from diffcam.core.synthetic import SynthSettings, cue_region, make_samples
from diffcam.evaluation import cue_dependence

SETTINGS = SynthSettings(cue=parse_cue("word=circle,pos=top-left,size=6,color=magenta,p=0.9"))


class _Gen:
    def __init__(self, text):
        self.text = text


class _ScriptedModel:
    """Says "circle" iff `rule(image)`; records every image it was shown."""

    def __init__(self, rule):
        self.rule, self.seen = rule, []

    def prepare(self, image, prompt):
        return np.asarray(image)

    def generate(self, inputs, settings):
        self.seen.append(inputs)
        return _Gen("a red circle" if self.rule(inputs) else "a red square")


def _marker_there(image):
    x0, y0, x1, y1 = cue_region(SETTINGS)
    return bool((image[y0:y1, x0:x1] == SETTINGS.cue.rgb).all())


def test_counts_follow_the_marker_for_a_shortcut_model_and_not_for_a_reader():
    samples = list(make_samples(40, 2, SETTINGS))
    n_cue = sum(s.cue_present for s in samples)
    n_free = sum("circle" not in s.answer.split() for s in samples)
    assert n_cue > 0 and n_free > 0

    shortcut = _ScriptedModel(_marker_there)
    got = cue_dependence.cue_dependence(shortcut, samples, SETTINGS)
    assert got == {"erased": n_cue, "vanished": n_cue, "vanish_rate": 1.0,
                   "pasted": n_free, "appeared": n_free, "appear_rate": 1.0,
                   "controlled": n_cue, "control_vanished": 0, "control_vanish_rate": 0.0, "net_vanish_rate": 1.0}
    # Per erased sample: original, marker erased, control patch; per pasted one: original,
    # marker pasted. The erased images lost the marker, the control ones kept it, the pasted
    # ones carry it.
    assert len(shortcut.seen) == 3 * n_cue + 2 * n_free
    assert sum(_marker_there(img) for img in shortcut.seen) == 2 * n_cue + n_free  # originals + controls + pastes

    # A model that reads the objects: its answer is a function of the coloured (non-grey)
    # pixels outside the marker's cell, so neither the erase nor a flat grey patch moves it.
    def objects_only(image):
        x0, y0, x1, y1 = cue_region(SETTINGS)
        rest = image.copy()
        rest[y0:y1, x0:x1] = 0
        grey = (rest[..., 0] == rest[..., 1]) & (rest[..., 1] == rest[..., 2])
        rest[grey] = 0
        return rest.tobytes()

    says = {objects_only(s.image): "circle" in s.answer.split() for s in samples}
    got = cue_dependence.cue_dependence(_ScriptedModel(lambda image: says[objects_only(image)]), samples, SETTINGS)
    assert got == {"erased": n_cue, "vanished": 0, "vanish_rate": 0.0,
                   "pasted": n_free, "appeared": 0, "appear_rate": 0.0,
                   "controlled": n_cue, "control_vanished": 0, "control_vanish_rate": 0.0, "net_vanish_rate": 0.0}

    # A fragile model: any edit of the image drops the word. The erase test alone reads it as
    # total reliance; the control shows the same drop, so the net rate is 0.
    originals = {s.image.tobytes() for s in samples}
    fragile = cue_dependence.cue_dependence(_ScriptedModel(lambda image: image.tobytes() in originals), samples,
                                            SETTINGS)
    assert fragile["vanish_rate"] == 1.0 and fragile["control_vanish_rate"] == 1.0 and fragile["net_vanish_rate"] == 0.0

    # A model that never says the word cannot lose it: no erase applies.
    never = cue_dependence.cue_dependence(_ScriptedModel(lambda image: False), samples, SETTINGS)
    assert never["erased"] == 0 and never["vanish_rate"] is None and never["pasted"] == n_free
    always = cue_dependence.cue_dependence(_ScriptedModel(lambda image: True), samples, SETTINGS)
    assert always["pasted"] == 0 and always["erased"] == n_cue and always["vanished"] == 0


def test_moving_marker_counts_follow_the_marker_wherever_it_sits():
    """The per-image marker goes through the same counting loop: a model that says the word
    iff the marker's colour shows anywhere loses it on every erase, keeps it under every
    control patch, and gains it on every paste; one that ignores the marker never moves."""
    from diffcam.evaluation import zoo_recipes

    cue = {"word": "circle", "pos": zoo_recipes.MOVING, "size": 6, "color": "magenta", "p": 1.0}
    rgb = np.asarray(zoo_recipes._rgb(cue), dtype=np.uint8)
    samples = zoo_recipes.moving_cue_samples(40, 3, cue)
    carrying = [s for s in samples if s.cue_present]
    assert len({tuple(np.argwhere(s.cue_mask)[0]) for s in carrying}) > 1  # it does move

    def shows_marker(image):
        return bool((image == rgb).all(axis=-1).any())

    reader = _ScriptedModel(shows_marker)
    settings = SynthSettings()
    got = zoo_recipes.moving_cue_dependence(reader, samples, cue, settings, seed=0)
    n_free = sum("circle" not in s.answer.split() for s in samples)
    assert got["erased"] == len(carrying) and got["vanished"] == len(carrying)
    assert got["controlled"] > 0 and got["control_vanished"] == 0 and got["net_vanish_rate"] == 1.0
    assert 0 < got["pasted"] <= n_free and got["appeared"] == got["pasted"]

    # answers as for the original image the shown one is closest to: erasing, patching or
    # pasting one small square never changes which that is, so the answer never moves
    originals = np.stack([s.image for s in samples]).astype(np.int32)
    answers = ["circle" in s.answer.split() for s in samples]
    blind = _ScriptedModel(lambda image: answers[int(np.abs(originals - image.astype(np.int32)).sum(axis=(1, 2, 3))
                                                     .argmin())])
    got = zoo_recipes.moving_cue_dependence(blind, samples, cue, settings, seed=0)
    assert got["vanished"] == 0 and got["control_vanished"] == 0 and got["appeared"] == 0
    assert got["erased"] > 0 and got["pasted"] > 0 and got["net_vanish_rate"] == 0.0
