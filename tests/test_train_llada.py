"""`training/llada.py`: the LLaDA objective, training, saving in the LLaDA-V layout, determinism.

Everything runs at toy size (4x4 image tokens, a 2-layer LM of hidden 32) on a handful of
synthetic images; the shipped size is only built by `scripts/train_llada_shipped.py`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffcam.core.models.base import load_adapter
from diffcam.core.models.llada import LladaVAdapter
from diffcam.core.settings import GenerationSettings
from diffcam.core.synthetic import SHAPES, SynthObject, SynthSample, SynthSettings, make_samples, vocabulary
from diffcam.training.gemma import Stage, training_seeds
from diffcam.training.llada import (
    LladaTrainSettings,
    VisionStage,
    encode_examples,
    heldout_examples,
    llada_loss,
    mask_canvas,
    pretrain_vision_tower,
    run_llada_stages,
    token_shape_labels,
    train_llada,
)
from diffcam.training.tiny_llada import LladaSpec, build_adapter

ROOT = Path(__file__).resolve().parents[1]
SPEC = LladaSpec(image_size=32, patch_size=8, vision_hidden=16, vision_heads=2, text_hidden=32, text_layers=2,
                 text_heads=4, text_kv_heads=4, intermediate=64)
SYNTH = SynthSettings()
WORDS = vocabulary(SYNTH)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _settings(**kw) -> LladaTrainSettings:
    return LladaTrainSettings(**{"steps": 3, "batch_size": 4, "warmup": 2, "threads": 1, **kw})


# ---------------------------------------------------------------------- objective


def test_loss_is_ce_on_masked_positions_over_t_divided_by_batch_times_length():
    vocab = 4
    target = torch.tensor([[0, 1, 2], [3, 3, 3]])
    masked = torch.tensor([[True, False, True], [False, False, False]])
    t = torch.tensor([0.5, 0.9])
    logits = torch.zeros(2, 3, vocab)  # uniform: CE = log 4 at every position
    expected = (math.log(4) / 0.5 + math.log(4) / 0.5) / (2 * 3)
    assert float(llada_loss(logits, target, masked, t)) == pytest.approx(expected, rel=1e-6)
    # Unmasked positions (row 0 position 1, all of row 1) do not count, whatever their logits.
    other = logits.clone()
    other[0, 1] = torch.tensor([9.0, -9.0, 3.0, 0.0])
    other[1] = torch.randn(3, vocab)
    assert float(llada_loss(other, target, masked, t)) == pytest.approx(expected, rel=1e-6)
    # A masked position's weight is 1/t: a confident right answer there costs ~0.
    right = logits.clone()
    right[0, 0, 0] = right[0, 2, 2] = 50.0
    assert float(llada_loss(right, target, masked, t)) < 1e-6


def test_masking_draws_t_per_row_and_masks_only_the_canvas_with_the_mask_id():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(5, 20, (64, 4000))
    noisy, masked, t = mask_canvas(target, mask_id=4, gen=gen, eps=1e-3)
    assert t.shape == (64,) and float(t.min()) >= 1e-3 and float(t.max()) <= 1.0
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], 4))
    assert torch.equal(noisy[~masked], target[~masked])
    # Each row's masked share is its own t (4,000 draws a row: within 0.03).
    assert float((masked.float().mean(1) - t).abs().max()) < 0.03


def test_canvas_is_answer_then_eos_and_prompt_has_no_mask():
    adapter = build_adapter(SPEC, WORDS, seed=0)
    groups = encode_examples(adapter, heldout_examples(6, 1, SYNTH))
    tok = adapter.tokenizer
    for g in groups:
        assert g["tgt"].shape[1] == SPEC.gen_length
        assert not bool((g["ids"] == adapter.mask_token_id).any()), "image/prompt ids must never hold the mask"
        assert int(g["tgt"][0, -1]) == tok.eos_token_id
        assert int((g["ids"] < 0).sum(1)[0]) == SPEC.grid ** 2  # image placeholders: the whole grid


# ---------------------------------------------------------------------- training


def test_a_few_steps_lower_the_loss_on_a_fixed_masked_batch():
    train = heldout_examples(8, 1, SYNTH)
    adapter = build_adapter(SPEC, WORDS, seed=0)
    g = max(encode_examples(adapter, train), key=lambda g: len(g["ids"]))
    noisy, masked, t = mask_canvas(g["tgt"], adapter.mask_token_id, torch.Generator().manual_seed(5))

    def fixed_loss():
        with torch.no_grad():
            m = adapter.model
            return float(llada_loss(m.canvas_logits(g["ids"], m.image_features(g["pix"]), noisy), g["tgt"], masked, t))

    before = fixed_loss()
    _, info = train_llada(train, WORDS, _settings(steps=25, lr=3e-3), SPEC, init_from=adapter)
    assert info["steps_run"] == 25 and len(info["loss_curve_every_25"]) == 1
    assert fixed_loss() < 0.7 * before


def test_same_seed_same_weights_other_seed_other_weights():
    train = heldout_examples(8, 1, SYNTH)
    a, _ = train_llada(train, WORDS, _settings(seed=3), SPEC)
    b, _ = train_llada(train, WORDS, _settings(seed=3), SPEC)
    c, _ = train_llada(train, WORDS, _settings(seed=4), SPEC)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_saved_checkpoint_loads_through_the_registry_and_generates(tmp_path):
    out = tmp_path / "tiny-llada"
    seen = []
    report = run_llada_stages([Stage(steps=3, lr=2e-3, train_seed=1)], out, SYNTH, _settings(eval_every=2), SPEC,
                              n_train=8, n_heldout=2, on_eval=lambda stage, point: seen.append((stage, point["step"])))
    adapter = load_adapter(out)
    assert isinstance(adapter, LladaVAdapter)
    assert (adapter.gen_length, adapter.block_length) == (SPEC.gen_length, SPEC.block_length)
    sample = heldout_examples(1, 2, SYNTH)[0]
    inputs = adapter.prepare(sample.image, sample.prompt)
    assert adapter.image_span(inputs).grid == (SPEC.grid, SPEC.grid)
    gen = adapter.generate(inputs, GenerationSettings(max_denoising_steps=SPEC.steps))
    assert gen.n_steps == SPEC.steps
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.embed_tokens.weight", "model.mm_projector.2.weight", "lm_head.weight",
            "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"} <= names
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["steps"] == SPEC.steps and generation["gen_length"] == SPEC.gen_length
    record = json.loads((out / "diffcam_tiny.json").read_text())
    assert record["train"]["spec"] == SPEC.model_dump() and record["heldout"] == {"seed": 2, "n": 2}
    assert set(record["heldout_eval"]) >= {"color_word_acc", "shape_word_acc", "commit_steps"}
    assert report["recipe_run"]["stages"][0]["train_seed"] == 1
    assert training_seeds(out) == [1]
    # The held-out trajectory during training: every `eval_every` steps, recorded and reported.
    assert [p["step"] for p in record["train"]["heldout_trajectory"]] == [2] and seen == [(1, 2)]


# ---------------------------------------------------------------------- vision pretraining

TOWER = "model.vision_tower."


def _object(shape: str, rows: slice, cols: slice, size: int = 16) -> SynthObject:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = True
    return SynthObject("red", shape, mask, (cols.start, rows.start, cols.stop, rows.stop))


def test_token_labels_give_each_cell_the_shape_covering_a_quarter_of_it():
    # 16x16 pixels, a 4x4 grid of 4-pixel cells, counted by hand:
    objects = (_object("square", slice(4, 8), slice(8, 12)),      # all of cell (1, 2)
               _object("triangle", slice(12, 14), slice(12, 14)),  # 4 of cell (3, 3)'s 16 pixels: exactly a quarter
               _object("circle", slice(0, 1), slice(0, 3)))        # 3 of cell (0, 0)'s 16: under a quarter
    sample = SynthSample(np.zeros((16, 16, 3), np.uint8), objects, "p", "a", False, None)
    want = np.zeros(16, dtype=np.int64)
    want[1 * 4 + 2] = 1 + SHAPES.index("square")
    want[3 * 4 + 3] = 1 + SHAPES.index("triangle")
    assert token_shape_labels([sample], grid=4, min_coverage=0.25)[0].tolist() == want.tolist()
    with pytest.raises(ValueError, match="does not split into a 5x5 grid"):
        token_shape_labels([sample], grid=5, min_coverage=0.25)


def test_vision_pretraining_changes_only_the_tower_learns_and_repeats():
    samples = list(make_samples(24, 1, SYNTH))
    stage = VisionStage(steps=40, lr=3e-3, train_seed=1, batch_size=8, warmup=5)
    a = build_adapter(SPEC, WORDS, seed=0)
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    record = pretrain_vision_tower(a, samples, stage, heldout=samples[:4])
    after = a.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(TOWER) for k in changed), sorted(changed)
    assert any("encoder.layers.0.self_attn.out_proj" in k for k in changed)
    curve = record["loss_curve_every_25"]
    assert len(curve) == 2 and curve[1] < 0.8 * curve[0]
    assert record["n_heldout"] == 4
    b = build_adapter(SPEC, WORDS, seed=0)
    pretrain_vision_tower(b, samples, stage)
    assert all(torch.equal(after[k], b.model.state_dict()[k]) for k in after)


def test_vision_pretraining_learns_the_shapes_of_the_tokens_it_is_trained_on():
    # Scored on its own training images: the accuracy is the record's, and it must rise from the
    # untrained tower's (0 steps: a random head) to well above guessing among the three shapes.
    samples = list(make_samples(24, 1, SYNTH))

    def accuracy(steps: int) -> float:
        stage = VisionStage(steps=steps, lr=3e-3, train_seed=1, batch_size=8, warmup=5)
        return pretrain_vision_tower(build_adapter(SPEC, WORDS, seed=0), samples, stage,
                                     heldout=samples[:4])["heldout_object_token_accuracy"]

    untrained, trained = accuracy(0), accuracy(150)  # measured: 0.27 and 0.64
    assert trained > 0.5 and trained > untrained + 0.2, (untrained, trained)


def test_a_frozen_tower_stays_bit_for_bit_while_the_language_model_trains():
    train = heldout_examples(8, 1, SYNTH)
    a = build_adapter(SPEC, WORDS, seed=0)
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    train_llada(train, WORDS, _settings(freeze_vision=True), SPEC, init_from=a)
    after = a.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(TOWER))
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert not torch.equal(before["model.mm_projector.0.weight"], after["model.mm_projector.0.weight"])
    assert all(q.requires_grad for q in a.model.parameters())  # frozen for that training only


def test_a_recipe_with_a_vision_stage_records_it_and_keeps_its_images_off_the_heldout_seed(tmp_path):
    report = run_llada_stages([Stage(steps=2, lr=2e-3, train_seed=1)], tmp_path / "m", SYNTH,
                              _settings(freeze_vision=True), SPEC, n_train=8, n_heldout=2, n_trajectory=2,
                              vision_stage=VisionStage(steps=3, lr=2e-3, train_seed=3, batch_size=4))
    run = report["recipe_run"]
    assert run["freeze_vision"] is True and run["vision_stage"]["stage"]["train_seed"] == 3
    assert run["vision_stage"]["n_train"] == 8 and len(run["vision_stage"]["train_data_sha256"]) == 64
    with pytest.raises(ValueError, match="held-out seed 2 is also a training seed"):
        run_llada_stages([Stage(steps=1, lr=1e-3, train_seed=1)], tmp_path / "x", SYNTH, _settings(), SPEC,
                         n_train=4, n_heldout=2, vision_stage=VisionStage(steps=1, lr=1e-3, train_seed=2))


def test_a_saved_checkpoint_is_continued_with_its_spec_record_and_seeds(tmp_path):
    first = tmp_path / "first"
    spec = LladaSpec(**{**SPEC.model_dump(), "vision_layers": 2})
    run_llada_stages([Stage(steps=2, lr=2e-3, train_seed=1)], first, SYNTH, _settings(), spec, n_train=8, n_heldout=2)
    out = tmp_path / "continued"
    with pytest.raises(ValueError, match="keeps its own spec"):  # SPEC has 1 tower layer, the checkpoint 2
        run_llada_stages([Stage(steps=1, lr=1e-3, train_seed=7)], tmp_path / "x", SYNTH, _settings(), SPEC,
                         n_train=8, n_heldout=2, init_from=first)
    report = run_llada_stages([Stage(steps=2, lr=1e-3, train_seed=7, seed=1)], out, SYNTH, _settings(freeze_vision=True),
                              None, n_train=8, n_heldout=2, init_from=first)
    assert report["train"]["spec"]["vision_layers"] == 2
    assert report["recipe_run"]["continued_from"] == str(first) and training_seeds(out) == [7, 1]
    before, after = load_adapter(first).model.state_dict(), load_adapter(out).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(TOWER))  # frozen tower
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    with pytest.raises(ValueError, match="no vision stage with init_from"):
        run_llada_stages([Stage(steps=1, lr=1e-3, train_seed=3)], tmp_path / "x", SYNTH, _settings(), SPEC,
                         init_from=first, vision_stage=VisionStage(steps=1, lr=1e-3, train_seed=5))
    with pytest.raises(ValueError, match="held-out seed 1 is also a training seed"):  # seen by the first run
        run_llada_stages([Stage(steps=1, lr=1e-3, train_seed=3)], tmp_path / "x", SYNTH, _settings(), None,
                         heldout_seed=1, init_from=first)
    with pytest.raises(ValueError, match="no diffcam_tiny.json"):
        run_llada_stages([Stage(steps=1, lr=1e-3, train_seed=3)], tmp_path / "x", SYNTH, _settings(), SPEC,
                         init_from=tmp_path)


def test_heldout_seed_may_not_be_a_training_seed(tmp_path):
    with pytest.raises(ValueError, match="held-out seed 2 is also a training seed"):
        run_llada_stages([Stage(steps=1, lr=1e-3, train_seed=2)], tmp_path / "x", SYNTH, _settings(), SPEC,
                         n_train=4, n_heldout=2)


def test_spec_overrides_refuse_unknown_fields_and_bad_schedules():
    assert LladaSpec.model_validate({"text_layers": 6}).text_layers == 6
    with pytest.raises(ValueError, match=r"unknown LladaSpec field\(s\) \['txt_layers'\]"):
        LladaSpec.model_validate({"txt_layers": 6})
    with pytest.raises(ValueError, match="Input should be a valid integer"):
        LladaSpec.model_validate({"patch_size": "4"})
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        LladaSpec(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="not a multiple of block_length"):
        LladaSpec(gen_length=16, block_length=6)


def test_the_one_command_explains_itself():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_llada_shipped.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tiny-llada-shapes" in out.stdout and "minutes" in out.stdout
