"""The DiffusionGemma adapter: input path, grid derivation, traced generation, hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcam.core.models.diffusion_gemma import PROJECTOR
from diffcam.core.settings import GenerationSettings
from tests.model_helpers import make_image, random_adapter


def _projector_out(adapter, inputs) -> torch.Tensor:
    with torch.no_grad():
        feats = adapter.model.model.encoder.get_image_features(
            inputs["pixel_values"], inputs["image_position_ids"]
        ).pooler_output
    return feats


@pytest.mark.parametrize(
    ("size", "pooling", "grid"),
    [((64, 64), 2, (8, 8)), ((48, 80), 2, (6, 10)), ((80, 48), 2, (10, 6)), ((64, 64), 4, (8, 8))],
)
def test_grid_is_derived_from_inputs_and_matches_token_order(size, pooling, grid):
    """Light one image cell; the one image token whose features change must sit at that grid cell.

    The processor resizes to fit `max_soft_tokens` (a 64×64 image with pooling 4 is
    upscaled to 128×128 → 8×8 tokens), so a token covers h/rows original pixels.
    """
    adapter = random_adapter(pooling_kernel_size=pooling)
    h, w = size
    cell = h // grid[0]
    base = adapter.prepare(make_image(h, w), "describe the image")
    span = adapter.image_span(base)
    assert span.grid == grid
    assert len(span.positions) == grid[0] * grid[1]
    ref = _projector_out(adapter, base)
    for r, c in [(0, grid[1] - 1), (grid[0] - 1, 0), (grid[0] // 2, grid[1] // 2)]:
        lit = adapter.prepare(make_image(h, w, (r, c), cell), "describe the image")
        diff = (_projector_out(adapter, lit) - ref).abs().sum(-1).reshape(grid)
        # Bicubic resizing (when the processor rescales) bleeds into neighbours:
        # the lit cell must still be the token that changed most.
        assert np.unravel_index(int(diff.argmax()), grid) == (r, c)


def test_image_span_refuses_inputs_without_image_tokens():
    adapter = random_adapter()
    inputs = adapter.prepare(make_image(64, 64), "describe the image")
    inputs["input_ids"] = inputs["input_ids"].clone()
    inputs["input_ids"][inputs["input_ids"] == adapter.config.image_token_id] = adapter.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="no image tokens|does not match"):
        adapter.image_span(inputs)


def test_traced_generation_reproduces_transformers_generate():
    """Our recorded loop is the family's loop: same seed → same tokens as `model.generate`."""
    adapter = random_adapter(seed=3)
    inputs = adapter.prepare(make_image(64, 64, (2, 3)), "describe the image")
    settings = GenerationSettings(seed=11, max_denoising_steps=6)
    ours = adapter.generate(inputs, settings)
    torch.manual_seed(settings.seed)
    ref = adapter.model.generate(
        inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        image_position_ids=inputs["image_position_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        max_new_tokens=adapter.config.canvas_length,
        max_denoising_steps=settings.max_denoising_steps,
        t_min=settings.t_min,
        t_max=settings.t_max,
        stability_threshold=settings.stability_threshold,
        confidence_threshold=settings.confidence_threshold,
        eos_token_id=None,
        pad_token_id=None,
    )
    canvas = ref.sequences[0, inputs["input_ids"].shape[1] :]
    assert torch.equal(ours.argmax[-1][0], canvas)
    assert len(ours.canvases) == ours.n_steps == len(ours.argmax)


def test_generation_is_deterministic_and_seed_sensitive():
    adapter = random_adapter(seed=5)
    inputs = adapter.prepare(make_image(64, 64), "describe the image")
    a = adapter.generate(inputs, GenerationSettings(seed=1, max_denoising_steps=5))
    b = adapter.generate(inputs, GenerationSettings(seed=1, max_denoising_steps=5))
    c = adapter.generate(inputs, GenerationSettings(seed=2, max_denoising_steps=5))
    assert all(torch.equal(x, y) for x, y in zip(a.canvases, b.canvases))
    assert not all(torch.equal(x, y) for x, y in zip(a.canvases, c.canvases))


def test_commit_step_is_first_step_of_the_final_stable_run():
    adapter = random_adapter(seed=7)
    inputs = adapter.prepare(make_image(64, 64), "describe the image")
    g = adapter.generate(inputs, GenerationSettings(seed=0, max_denoising_steps=6))
    history = torch.stack([a[0] for a in g.argmax]).numpy()
    for w in g.words:
        for p in w.positions:
            col = history[:, p]
            first_stable = next(s for s in range(len(col)) if (col[s:] == col[-1]).all()) + 1
            assert w.commit_step >= first_stable
        assert w.commit_step == max(
            next(s for s in range(len(history)) if (history[s:, p] == history[-1, p]).all()) + 1
            for p in w.positions
        )


def test_last_encoder_layer_is_refused_and_unknown_layer_named():
    adapter = random_adapter()
    last = adapter.layer_names()[-1]
    inputs = adapter.prepare(make_image(64, 64), "describe the image")
    with pytest.raises(ValueError, match="not structurally valid"):
        with adapter.attribution_pass(inputs, [last]):
            pass
    with pytest.raises(ValueError, match="unknown layer"):
        adapter.check_layer("encoder.99")


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_are_removed_even_when_the_block_raises():
    adapter = random_adapter()
    inputs = adapter.prepare(make_image(64, 64), "describe the image")
    before = _hook_count(adapter.model)
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.attribution_pass(inputs, [PROJECTOR, "encoder.0"]) as ap:
            assert _hook_count(adapter.model) == before + 2
            assert set(ap.tensors) == {PROJECTOR, "encoder.0"}
            raise RuntimeError("boom")
    assert _hook_count(adapter.model) == before


def test_gradients_reach_every_valid_layer_at_image_positions():
    adapter = random_adapter(seed=2)
    inputs = adapter.prepare(make_image(64, 64, (1, 1)), "describe the image")
    g = adapter.generate(inputs, GenerationSettings(seed=0, max_denoising_steps=3))
    layers = adapter.valid_layers()
    with adapter.attribution_pass(inputs, layers) as ap:
        lp = ap.log_probs(*g.final_canvas())
        score = lp[0, int(g.argmax[-1][0, 0])]
        grads = torch.autograd.grad(score, [ap.tensors[n] for n in layers])
        for name, grad in zip(layers, grads):
            rows = ap.image_rows(name, grad)
            assert rows.shape[0] == 64
            assert float(rows.abs().sum()) > 0, name


def test_batched_canvases_equal_one_decoder_pass_each():
    """`log_probs_many` stacks canvases on one repeated prefix cache; a canvas without
    self-conditioning (the first step's) is masked, which must equal passing None."""
    adapter = random_adapter(seed=2)
    inputs = adapter.prepare(make_image(64, 64, (1, 1)), "describe the image")
    g = adapter.generate(inputs, GenerationSettings(seed=0, max_denoising_steps=3))
    canvases = [g.step_canvas(1), g.final_canvas(), g.step_canvas(len(g.canvases))]
    assert canvases[0][1] is None and canvases[1][1] is not None  # both kinds in one batch
    with adapter.attribution_pass(inputs, [PROJECTOR]) as ap:
        many = ap.log_probs_many(canvases)
        assert many.shape[0] == 3
        for k, (canvas, cond) in enumerate(canvases):
            alone = torch.log_softmax(adapter._decode(ap.cache, ap.dec_pos, canvas, cond)[0].float(), dim=-1)
            torch.testing.assert_close(many[k], alone, rtol=1e-4, atol=1e-5)
        # the repeated cache stays in the prefix graph: a row's gradient reaches the image tokens
        grad, = torch.autograd.grad(many[2, 0].max(), ap.tensors[PROJECTOR])
        assert float(grad.abs().sum()) > 0
