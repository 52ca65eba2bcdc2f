"""Diffusion-CAM attribution: the maps equal an independent, hook-free, literal computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from diffcam.core.cam import attribute, explain
from diffcam.core.methods import raw_diffusion_cam
from diffcam.core.models.diffusion_gemma import PROJECTOR
from diffcam.core.settings import CamSettings, GenerationSettings
from tests.model_helpers import make_image, random_adapter

GEN = GenerationSettings(seed=4, max_denoising_steps=5)


def _literal_map(F: np.ndarray, G: np.ndarray, grid) -> np.ndarray:
    """docs/METHOD.md §2.7 written out with loops."""
    n, c = F.shape
    alpha = [sum(max(G[p, k], 0.0) for p in range(n)) / n for k in range(c)]
    H = np.zeros(n)
    for p in range(n):
        H[p] = sum(max(alpha[k] * F[p, k], 0.0) for k in range(c)) / c
    H = H.reshape(grid)
    if H.max() <= 0:
        return np.zeros(grid)
    return (H - H.min()) / (H.max() - H.min() + 1e-8)


def _independent_projector_grads(adapter, inputs, gen, word, distractors):
    """Gradient of s_w − mean(s_d) w.r.t. the projector output, with no hooks at all.

    The image features are computed once, made a leaf, and handed to the encoder through
    its own `mm_encoder_outputs` argument; the decoder then reads the resulting cache.
    """
    enc = adapter.model.model.encoder
    with torch.no_grad():
        feats = enc.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output
    leaf = feats.clone().requires_grad_(True)
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=adapter.config.get_text_config(decoder=True))
    seq = inputs["input_ids"].shape[1]
    positions = torch.arange(seq, dtype=torch.int32).unsqueeze(0)
    masks = enc.create_masks_for_generate(  # transformers' own mask builder, as in `generate`
        config=adapter.config,
        inputs_embeds=torch.empty((1, seq, 0)),
        attention_mask=torch.ones((1, seq), dtype=torch.bool),
        cache=cache,
        position_ids=positions,
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    enc(
        input_ids=inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        attention_mask=masks,
        cache=cache,
        position_ids=positions,
        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=leaf)},
    )
    step = word.commit_step
    logits = adapter.model(
        decoder_input_ids=gen.canvases[step - 1],
        self_conditioning_logits=gen.self_cond[step - 1],
        cache=cache,
        decoder_position_ids=torch.arange(seq, seq + adapter.config.canvas_length, dtype=torch.int32).unsqueeze(0),
    ).logits[0]
    lp = torch.log_softmax(logits.float(), -1)

    def score(w):
        return sum(lp[p, t] for p, t in zip(w.positions, w.token_ids))

    s = score(word)
    if distractors:
        s = s - sum(score(d) for d in distractors) / len(distractors)
    (g,) = torch.autograd.grad(s, [leaf])
    return feats.double().numpy(), g.double().numpy()


@pytest.mark.parametrize("distractor", ["previous", "others-mean", "none"])
def test_raw_map_matches_independent_literal_computation(distractor):
    adapter = random_adapter(seed=1)
    inputs = adapter.prepare(make_image(64, 64, (3, 5)), "describe the image")
    gen = adapter.generate(inputs, GEN)
    assert gen.words, "random model produced an empty answer; pick another seed"
    settings = CamSettings(layer=PROJECTOR, distractor=distractor, methods=("diffusion-cam-raw",), generation=GEN)
    result = attribute(adapter, inputs, gen, settings)
    content = [w for w in gen.words if not w.is_function]
    for wm in result.words:
        w = wm.word
        if distractor == "previous":
            ds = [c for c in content if c.index < w.index][-1:]
        elif distractor == "others-mean":
            ds = [c for c in content if c.index != w.index]
        else:
            ds = []
        F, G = _independent_projector_grads(adapter, inputs, gen, w, ds)
        expected = _literal_map(F, G, result.grid)
        np.testing.assert_allclose(wm.maps["diffusion-cam-raw"], expected, atol=2e-4)


def test_explain_is_deterministic_and_covers_every_word():
    adapter = random_adapter(seed=2)
    image = make_image(64, 64, (1, 6))
    settings = CamSettings(layer="encoder.0", generation=GEN)
    a = explain(adapter, image, "describe the image", settings)
    b = explain(adapter, image, "describe the image", settings)
    assert a.answer == b.answer
    assert [w.word.text for w in a.words] == a.answer.split()
    for x, y in zip(a.words, b.words):
        assert set(x.maps) == {"gradcam", "diffusion-cam-raw", "diffusion-cam", "token-gradnorm", "random", "objectness"}
        for m in x.maps:
            assert x.maps[m].shape == a.grid
            np.testing.assert_array_equal(x.maps[m], y.maps[m])


def _decoder_calls(monkeypatch, settings: CamSettings) -> tuple[list[int], object]:
    """Run `attribute` on a fixed random model; the batch size (canvases) of each decoder pass."""
    adapter = random_adapter(seed=3)
    inputs = adapter.prepare(make_image(64, 64, (2, 2)), "describe the image")
    gen = adapter.generate(inputs, GEN)
    calls = []
    original = adapter._decode
    monkeypatch.setattr(adapter, "_decode", lambda *a: calls.append(a[2].shape[0]) or original(*a))
    attribute(adapter, inputs, gen, settings)
    return calls, gen


def test_words_sharing_a_commit_step_share_one_decoded_canvas(monkeypatch):
    calls, gen = _decoder_calls(monkeypatch, CamSettings(layer="encoder.0", generation=GEN))
    distinct_steps = len({w.commit_step for w in gen.words})
    assert calls == [distinct_steps + 1]  # + the final clean canvas for the baselines, all in one pass


def test_canvas_batch_caps_the_canvases_of_one_decoder_pass(monkeypatch):
    calls, gen = _decoder_calls(monkeypatch, CamSettings(layer="encoder.0", generation=GEN, canvas_batch=1))
    assert calls == [1] * (len({w.commit_step for w in gen.words}) + 1)


def test_canvas_batch_gives_the_same_maps_as_one_canvas_at_a_time():
    adapter = random_adapter(seed=3)
    inputs = adapter.prepare(make_image(64, 64, (2, 2)), "describe the image")
    gen = adapter.generate(inputs, GEN)
    one = attribute(adapter, inputs, gen, CamSettings(layer="encoder.0", generation=GEN, canvas_batch=1))
    many = attribute(adapter, inputs, gen, CamSettings(layer="encoder.0", generation=GEN))
    assert len({w.commit_step for w in gen.words}) + 1 >= 2  # at least two canvases batched
    for a, b in zip(one.words, many.words, strict=True):
        assert a.target_score == pytest.approx(b.target_score, abs=1e-5)
        for name in a.maps:
            np.testing.assert_allclose(a.maps[name], b.maps[name], rtol=1e-3, atol=1e-4 * float(np.abs(a.maps[name]).max()))


def test_attribution_step_final_uses_one_decoder_pass(monkeypatch):
    settings = CamSettings(layer="encoder.0", attribution_step="final", methods=("diffusion-cam-raw",), generation=GEN)
    calls, _ = _decoder_calls(monkeypatch, settings)
    assert calls == [1]


def test_all_negative_gradients_give_a_zero_map_not_an_error():
    F = np.random.default_rng(0).random((4, 3))
    G = -np.ones((4, 3))
    out = raw_diffusion_cam(F, G, (2, 2))
    assert out.shape == (2, 2) and not out.any()


def test_bad_settings_are_refused_with_the_valid_choices():
    with pytest.raises(ValueError, match="previous"):
        CamSettings(distractor="nearest")
    with pytest.raises(ValueError, match="commit"):
        CamSettings(attribution_step="middle")


@pytest.mark.parametrize("kw, match", [
    ({"methods": ("diffusoin-cam",)}, "unknown method.*valid"),
    ({"refine_preset": "fulll"}, "refine_preset 'fulll' is not one of"),
    ({"faithfulness": 1.5}, "fraction of samples"),
    ({"methods": ()}, "unknown method"),
])
def test_settings_refuse_bad_names_before_any_model_work(kw, match):
    with pytest.raises(ValueError, match=match):
        CamSettings(**kw)
