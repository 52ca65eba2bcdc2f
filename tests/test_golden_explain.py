"""Golden end-to-end `diffcam explain` on the shipped tiny model.

Expected values are not stored: they come from independent sources — the synthetic
generator's exact masks and reference answer, and the hook-free literal Diffusion-CAM
computation of tests/test_cam.py.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from diffcam.core.models.base import load_adapter
from diffcam.core.settings import CamSettings, GenerationSettings
from diffcam.core.synthetic import COLORS, SynthSettings, answer_groundings, make_samples
from diffcam.flows.cli import app
from diffcam.flows.paths import DEFAULT_MODEL
from tests.test_cam import _independent_projector_grads, _literal_map


def _sample():
    # A one-object held-out image (seed 2 is the benchmark's held-out seed).
    return next(s for s in make_samples(20, 2, SynthSettings()) if len(s.objects) == 1)


def test_explain_cli_writes_documented_outputs_that_match_independent_values(tmp_path):
    s = _sample()
    img = tmp_path / "x.png"
    Image.fromarray(s.image).save(img)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", str(img), "--prompt", s.prompt, "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "explain.json").read_text())
    for key in ("answer", "prompt", "image", "model", "grid", "n_steps", "layer", "attribution_step",
                "distractor", "layers", "timings", "words"):
        assert key in doc
    assert doc["layer"] == "projector" and doc["grid"] == [8, 8]
    assert [w["word"] for w in doc["words"]] == doc["answer"].split()
    for w in doc["words"]:
        assert (out / w["overlay"]).is_file()
        assert set(w["maps"]) == {"gradcam", "diffusion-cam-raw", "diffusion-cam", "token-gradnorm", "random", "objectness"}

    # The colour word is right on this model (colour accuracy is 100% on held-out data) and
    # its maps must equal the literal, hook-free computation.
    adapter = load_adapter(DEFAULT_MODEL)
    inputs = adapter.prepare(Image.open(img).convert("RGB"), s.prompt)
    gen = adapter.generate(inputs, GenerationSettings(seed=0))
    assert gen.text == doc["answer"]
    colour = next(w for w in gen.words if w.text in COLORS)
    assert colour.text == s.objects[0].color
    content = [w for w in gen.words if not w.is_function]
    others = [c for c in content if c.index != colour.index]  # the default distractor: others-mean
    F, G = _independent_projector_grads(adapter, inputs, gen, colour, others)
    expected = _literal_map(F, G, (8, 8))
    got = np.array(doc["words"][colour.index]["maps"]["diffusion-cam-raw"])
    np.testing.assert_allclose(got, expected, atol=2e-4)

    # Localisation against the generator's exact mask: the per-token gradient map of the
    # colour word puts more of its mass on the object than the object's area share.
    mask = dict(answer_groundings(s))[colour.text]
    from diffcam.core.stats import map_stats

    st = map_stats(np.array(doc["words"][colour.index]["maps"]["token-gradnorm"]), mask)
    assert st["inside_frac"] > 2 * st["mask_area_share"]


def test_explain_cli_errors_are_actionable(tmp_path):
    res = CliRunner().invoke(app, ["explain", str(tmp_path / "missing.png"), "--prompt", "describe the image"])
    assert res.exit_code == 2 and "missing.png" in res.output
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img)
    # The last encoder layer's output feeds no decoder layer (they read each layer's input).
    last = json.loads((DEFAULT_MODEL / "config.json").read_text())["text_config"]["num_hidden_layers"] - 1
    res = CliRunner().invoke(app, ["explain", str(img), "--prompt", "describe", "--layer", f"encoder.{last}"])
    assert res.exit_code == 2 and "not structurally valid" in res.output


def test_seeded_explain_is_reproducible():
    s = _sample()
    adapter = load_adapter(DEFAULT_MODEL)
    from diffcam.core.cam import explain

    a = explain(adapter, Image.fromarray(s.image), s.prompt, CamSettings())
    b = explain(load_adapter(DEFAULT_MODEL), Image.fromarray(s.image), s.prompt, CamSettings())
    assert a.answer == b.answer
    for x, y in zip(a.words, b.words):
        for m in x.maps:
            np.testing.assert_array_equal(x.maps[m], y.maps[m])
