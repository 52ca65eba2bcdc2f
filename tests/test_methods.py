"""The method registry: a new method is one class, and settings accept exactly the registered names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcam.core import methods
from diffcam.core.cam import attribute, explain
from diffcam.core.methods import ATTRIBUTION, IMAGE_FEATURES, TARGET, GradientMethod, Needs, register_method
from diffcam.core.models.base import IMAGE_FEATURES as IMAGE_FEATURES_KIND
from diffcam.core.settings import CamSettings, GenerationSettings
from tests.model_helpers import make_image, random_adapter
from tests.test_cam import _decoder_calls

GEN = GenerationSettings(seed=4, max_denoising_steps=5)


@pytest.fixture
def gradient_sign():
    """A toy method, registered in a few lines: where the word's own score rises with the image token."""

    @register_method
    class GradientSign(GradientMethod):
        name = "gradient-sign"
        needs = Needs(canvas=ATTRIBUTION, layer=IMAGE_FEATURES, score=TARGET)

        def word_map(self, features, grads, grid):
            return (grads.sum(axis=1) > 0).reshape(grid).astype(np.float32)

    yield GradientSign.name
    methods.unregister_method(GradientSign.name)


def test_a_registered_method_is_computed_by_attribute(gradient_sign):
    adapter = random_adapter(seed=1)
    inputs = adapter.prepare(make_image(64, 64, (3, 5)), "describe the image")
    gen = adapter.generate(inputs, GEN)
    assert gen.words, "random model produced an empty answer; pick another seed"
    settings = CamSettings(methods=("diffusion-cam-raw", gradient_sign), generation=GEN)
    result = attribute(adapter, inputs, gen, settings)
    layer = adapter.image_feature_layer
    with adapter.attribution_pass(inputs, [layer]) as ap:
        for wm in result.words:
            assert list(wm.maps) == ["diffusion-cam-raw", gradient_sign]
            w = wm.word
            lp = ap.log_probs(*gen.step_canvas(w.commit_step))
            score = lp[list(w.positions), list(w.token_ids)].sum()
            (g,) = torch.autograd.grad(score, [ap.tensors[layer]], retain_graph=True)
            rows = ap.image_rows(layer, g).double().numpy()
            expected = (rows.sum(axis=1) > 0).reshape(result.grid).astype(np.float32)
            np.testing.assert_array_equal(wm.maps[gradient_sign], expected)
    assert any(0 < float(wm.maps[gradient_sign].mean()) < 1 for wm in result.words)  # not a constant map


def test_unknown_method_fails_at_settings_construction_with_the_registered_names(gradient_sign):
    with pytest.raises(ValueError, match="unknown method") as err:
        CamSettings(methods=("gradcam", "gradient-sing"))
    assert all(name in str(err.value) for name in methods.method_names())
    assert CamSettings(methods=(gradient_sign,)).methods == (gradient_sign,)


def test_an_unregistered_method_is_refused_again():
    @register_method
    class Once(GradientMethod):
        name = "once"
        needs = Needs()

    methods.unregister_method("once")
    with pytest.raises(ValueError, match="unknown method.*valid"):
        CamSettings(methods=("once",))


def test_every_shipped_method_is_registered_with_its_kind():
    kinds = {m.name: type(m).__mro__[1].__name__ for m in methods.resolve(methods.method_names())}
    assert kinds == {
        "diffusion-cam-raw": "GradientMethod", "diffusion-cam": "WordSetMethod", "gradcam": "GradientMethod",
        "token-gradnorm": "GradientMethod", "token-gradxinput": "GradientMethod",
        "random": "ImageMethod", "objectness": "ImageMethod", "occlusion": "ModelMethod",
    }


def test_a_refined_method_computes_its_source_without_reporting_it():
    adapter = random_adapter(seed=1)
    inputs = adapter.prepare(make_image(64, 64, (3, 5)), "describe the image")
    gen = adapter.generate(inputs, GEN)
    result = attribute(adapter, inputs, gen, CamSettings(methods=("diffusion-cam",), generation=GEN))
    assert result.words and all(list(w.maps) == ["diffusion-cam"] for w in result.words)


def test_final_attribution_reads_the_final_canvas_once_for_every_method(monkeypatch):
    calls, _ = _decoder_calls(monkeypatch, CamSettings(attribution_step="final", generation=GEN))
    assert calls == [1]  # every default method, contrastive or plain, on one decode of the final canvas


def test_families_name_their_image_feature_layer():
    adapter = random_adapter()
    kinds = {lay.name: lay.kind for lay in adapter.layers()}
    assert adapter.image_feature_layer == "projector" and kinds["projector"] == IMAGE_FEATURES_KIND
    assert adapter.valid_layers() == [lay.name for lay in adapter.layers() if lay.valid]
    assert not adapter.layers()[-1].valid  # the last encoder layer feeds nothing the decoder reads


def test_chance_maps_alone_still_score_every_word():
    adapter = random_adapter(seed=1)
    result = explain(adapter, make_image(64, 64, (3, 5)), "describe the image",
                     CamSettings(methods=("random", "objectness"), generation=GEN))
    assert result.words
    for wm in result.words:
        assert list(wm.maps) == ["random", "objectness"] and np.isfinite(wm.target_score)
