"""The LLaDA-V family (`llava_llada`): loading, sampler, feasibility rule, end-to-end maps.

Every model here is random-initialised in code at tiny sizes (real transformers Llama and
SigLIP modules), written to a temp folder in the published LLaDA-V parameter layout and
loaded back through the registry; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast, SiglipVisionConfig, SiglipVisionModel

from diffcam.core import cam
from diffcam.core.models.base import families, load_adapter
from diffcam.core.models.llada import LladaVAdapter, num_transfer_tokens
from diffcam.core.models.llada_modeling import IMAGE_NEWLINE_INDEX, IMAGE_TOKEN_INDEX, LladaVModel
from diffcam.core.settings import CamSettings, GenerationSettings

SPECIALS = ["<pad>", "<|endoftext|>", "<|startoftext|>", "<unk>", "<|mdm_mask|>", "<|eot_id|>",
            "<|start_header_id|>", "<|end_header_id|>"]
WORDS = "a and red blue green circle square triangle describe the image user assistant".split()
PROMPT = "describe the image"
#: The turn format of the LLaDA-V tokenizer: bos, role headers, `<|eot_id|>` after each turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def tiny_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|endoftext|>",
                                  bos_token="<|startoftext|>", unk_token="<unk>",
                                  additional_special_tokens=["<|mdm_mask|>", "<|eot_id|>", "<|start_header_id|>",
                                                             "<|end_header_id|>"])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def write_tiny(folder, image_size: int = 32, patch: int = 8, seed: int = 3, newline: bool = True,
               gen_length: int = 12, block_length: int = 6, chat: bool = False, vision_layers: int = 1):
    """A 2-layer LM (hidden 32) + 1-layer SigLIP tower, saved in the LLaDA-V layout.

    Seed 3 answers with content words (other seeds can answer only special tokens).
    """
    tok = tiny_tokenizer(chat)
    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       rope_theta=500000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=vision_layers,
                                num_attention_heads=2,
                                image_size=image_size, patch_size=patch, vision_use_head=False)
    model = LladaVModel(text, vision, "mlp2x_gelu", image_newline=newline)
    with torch.no_grad():
        if newline:
            model.model.image_newline.normal_()
        # Sharper logits than the init's so the random model says several distinct words.
        model.lm_head.weight.mul_(20.0)
    return model.save_pretrained(folder, tok, image_aspect_ratio="pad",
                                 generation={"gen_length": gen_length, "block_length": block_length})


def image(h: int = 40, w: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folder32(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("llada32"))


@pytest.fixture(scope="module")
def adapter(folder32) -> LladaVAdapter:
    return load_adapter(folder32)


def settings(steps: int = 8, seed: int = 0) -> GenerationSettings:
    return GenerationSettings(seed=seed, max_denoising_steps=steps)


# ---------------------------------------------------------------------- loading


def test_loads_through_registry_in_the_published_layout(folder32, adapter):
    assert "llava_llada" in families()
    assert isinstance(adapter, LladaVAdapter)
    assert isinstance(adapter.model.model, LlamaModel) and isinstance(adapter.model.siglip, SiglipVisionModel)
    with safe_open(str(folder32 / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for name in (
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
        "model.image_newline",
        "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
        "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    ):
        assert name in names, name
    config = json.loads((folder32 / "config.json").read_text())
    assert config["model_type"] == "llava_llada" and config["mm_projector_type"] == "mlp2x_gelu"
    assert adapter.mask_token_id == tiny_tokenizer().convert_tokens_to_ids("<|mdm_mask|>")
    assert (adapter.gen_length, adapter.block_length) == (12, 6)


def test_language_model_attends_in_both_directions(adapter):
    inputs = adapter.prepare(image(), PROMPT)
    m = adapter.model
    with torch.no_grad():
        feats = m.image_features(inputs["pixel_values"])
        canvas = torch.full((1, 12), adapter.mask_token_id)
        later = canvas.clone()
        later[0, -1] = 7
        a = m.canvas_logits(inputs["input_ids"], feats, canvas)
        b = m.canvas_logits(inputs["input_ids"], feats, later)
    assert not torch.allclose(a[0, 0], b[0, 0]), "a later canvas token must change the first position (non-causal)"


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(auto_map={"AutoModel": "modeling_llada.LLaDAModelLM"}), "remote code"),
    (lambda c: c.pop("vision_config"), "vision_config"),
    (lambda c: c.update(mm_projector_type="qformer"), "mm_projector_type"),
])
def test_unsupported_configs_are_refused_with_a_message(folder32, tmp_path, edit, match):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder32, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_adapter(dst)


def test_trust_remote_code_is_refused(folder32):
    with pytest.raises(ValueError, match="remote code"):
        load_adapter(folder32, trust_remote_code=True)


def test_weights_in_another_layout_are_refused(folder32, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "ckpt"
    shutil.copytree(folder32, dst)
    state = load_file(str(dst / "model.safetensors"))
    state["model.transformer.wte.weight"] = state.pop("model.embed_tokens.weight")  # LLaDA's original name
    save_file(state, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match="LLaDA-V layout.*model.embed_tokens.weight.*original block names"):
        load_adapter(dst)


def test_a_bf16_checkpoint_runs_in_float32_on_cpu(folder32, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "ckpt"
    shutil.copytree(folder32, dst)
    state = load_file(str(dst / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(dst / "model.safetensors"))
    adapter = load_adapter(dst)
    assert {p.dtype for p in adapter.model.parameters()} == {torch.float32}
    assert adapter.generate(adapter.prepare(image(), PROMPT), settings(4)).n_steps == 4


def test_original_llada_config_fields_are_refused(folder32, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder32, dst)
    config = json.loads((dst / "config.json").read_text())
    config["d_model"], config["n_layers"] = config.pop("hidden_size"), config.pop("num_hidden_layers")
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LaViDa layout"):
        load_adapter(dst)


# ---------------------------------------------------------------------- inputs


def test_grid_and_span_come_from_the_inputs(adapter, tmp_path):
    inputs = adapter.prepare(image(), PROMPT)
    span = adapter.image_span(inputs)
    assert span.grid == (4, 4) and len(span.positions) == 16
    ids = inputs["input_ids"][0].tolist()
    assert ids[span.positions[-1] + 1] == IMAGE_NEWLINE_INDEX
    other = load_adapter(write_tiny(tmp_path / "llada48", image_size=48, newline=False))
    inputs48 = other.prepare(image(50, 70), PROMPT)
    span48 = other.image_span(inputs48)
    assert span48.grid == (6, 6) and len(span48.positions) == 36
    assert tuple(inputs48["pixel_values"].shape[-2:]) == (48, 48)
    assert IMAGE_NEWLINE_INDEX not in inputs48["input_ids"][0].tolist()
    with pytest.raises(ValueError, match="no image tokens"):
        adapter.image_span({"input_ids": torch.tensor([[2, 12, 13]]), "pixel_values": inputs["pixel_values"]})


def test_chat_template_wraps_the_image_and_prompt_in_one_user_turn(tmp_path):
    adapter = load_adapter(write_tiny(tmp_path / "chat", chat=True))
    tok = adapter.tokenizer
    ids = adapter.prepare(image(), PROMPT)["input_ids"][0].tolist()
    t = tok.convert_tokens_to_ids
    head = [t("<|startoftext|>"), t("<|start_header_id|>"), t("user"), t("<|end_header_id|>")]
    tail = [t(w) for w in PROMPT.split()] + [t("<|eot_id|>"), t("<|start_header_id|>"), t("assistant"),
                                             t("<|end_header_id|>")]
    assert ids == head + [IMAGE_TOKEN_INDEX] * 16 + [IMAGE_NEWLINE_INDEX] + tail
    # An answer stops at `<|eot_id|>` as well as at eos.
    assert t("<|eot_id|>") in adapter.stop_ids and tok.eos_token_id in adapter.stop_ids


def test_numpy_images_are_accepted(adapter):
    arr = np.asarray(image())
    a, b = adapter.prepare(arr, PROMPT), adapter.prepare(image(), PROMPT)
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])


# ---------------------------------------------------------------------- sampler


def test_transfer_schedule_splits_evenly_with_the_remainder_first():
    assert num_transfer_tokens(6, 4) == [2, 2, 1, 1]
    assert num_transfer_tokens(8, 8) == [1] * 8
    assert sum(num_transfer_tokens(13, 5)) == 13


def _reference_generate(model: LladaVModel, input_ids, pixel_values, gen_length, block_length, steps, mask_id):
    """LLaDA's loop as published, on the full sequence (prompt + answer), temperature 0."""
    with torch.no_grad():
        siglip = model.model.vision_tower.vision_tower.vision_model
        feats = model.model.mm_projector(siglip(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1])
        n = input_ids.shape[1]
        x = torch.cat([input_ids, torch.full((1, gen_length), mask_id)], dim=1)
        unmasked_at = {}
        step = 0
        per_block = steps // (gen_length // block_length)
        for b in range(gen_length // block_length):
            lo, hi = n + b * block_length, n + (b + 1) * block_length
            count = int((x[0, lo:hi] == mask_id).sum())
            plan = [count // per_block + (1 if i < count % per_block else 0) for i in range(per_block)]
            for k in plan:
                if not bool((x[0, lo:hi] == mask_id).any()):
                    break
                step += 1
                mask_index = x == mask_id
                emb = model.model.embed_tokens(x.clamp(min=0)).clone()
                emb[0, (x[0] == IMAGE_TOKEN_INDEX).nonzero().flatten()] = feats[0]
                emb[0, (x[0] == IMAGE_NEWLINE_INDEX).nonzero().flatten()] = model.model.image_newline
                logits = model.lm_head(model.model(inputs_embeds=emb).last_hidden_state)
                logits[..., mask_id] = -np.inf
                x0 = logits.argmax(-1)
                p = torch.softmax(logits.double(), dim=-1).gather(-1, x0[..., None])[..., 0]
                p[:, hi:] = -np.inf
                x0 = torch.where(mask_index, x0, x)
                confidence = torch.where(mask_index, p, torch.tensor(-np.inf, dtype=p.dtype))
                idx = torch.topk(confidence[0], k).indices
                x[0, idx] = x0[0, idx]
                for i in idx.tolist():
                    unmasked_at[i - n] = step
        return x[0, n:], unmasked_at


@pytest.mark.parametrize("steps,forwards", [(4, 4), (8, 8), (16, 12)])
def test_generation_equals_the_plain_reference_loop(adapter, steps, forwards):
    inputs = adapter.prepare(image(), PROMPT)
    gen = adapter.generate(inputs, settings(steps))
    ref, unmasked_at = _reference_generate(adapter.model, inputs["input_ids"], inputs["pixel_values"],
                                           12, 6, steps, adapter.mask_token_id)
    assert gen.argmax[-1][0].tolist() == ref.tolist()
    # 16 steps over two 6-token blocks: each block is full after 6 passes.
    assert gen.n_steps == forwards == len(gen.canvases) == len(gen.argmax)
    assert gen.self_cond == [None] * forwards and gen.final_self_cond is None
    # canvases[s] is what step s+1 read: exactly the positions unmasked later are still masked.
    for s, canvas in enumerate(gen.canvases):
        still = {p for p, at in unmasked_at.items() if at > s}
        assert {int(p) for p in (canvas[0] == adapter.mask_token_id).nonzero().flatten()} == still
    for w in gen.words:
        assert w.commit_step == max(unmasked_at[p] for p in w.positions)
        assert all(int(gen.canvases[w.commit_step - 1][0, p]) == adapter.mask_token_id for p in w.positions)
    assert len({w.commit_step for w in gen.words}) > 1, "words should commit at different steps"


def test_suppressed_tokens_are_never_said(adapter):
    inputs = adapter.prepare(image(), PROMPT)
    said = adapter.generate(inputs, settings(8)).argmax[-1][0]
    top = int(said[0])
    adapter.suppress_tokens = (top,)
    try:
        again = adapter.generate(inputs, settings(8)).argmax[-1][0]
    finally:
        adapter.suppress_tokens = ()
    assert top not in again.tolist() and adapter.mask_token_id not in again.tolist()


def test_sampling_with_temperature_is_seeded(adapter):
    inputs = adapter.prepare(image(), PROMPT)
    adapter.temperature = 1.0
    try:
        a = adapter.generate(inputs, settings(8, seed=1)).argmax[-1]
        b = adapter.generate(inputs, settings(8, seed=1)).argmax[-1]
    finally:
        adapter.temperature = 0.0
    assert torch.equal(a, b)


def test_bad_schedules_are_refused(adapter):
    inputs = adapter.prepare(image(), PROMPT)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        adapter.generate(inputs, settings(5))


# ---------------------------------------------------------------------- attribution


def test_language_model_layers_are_refused_and_unknown_layers_named(adapter):
    assert adapter.default_layer == adapter.image_feature_layer == "projector"
    assert adapter.valid_layers() == ["projector", "vision.0"]
    adapter.check_layer("vision.0")
    with pytest.raises(ValueError, match="differ per canvas"):
        adapter.check_layer("lm.0")
    with pytest.raises(ValueError, match="unknown layer"):
        adapter.check_layer("encoder.0")


def _hooks(model) -> dict[str, set[int]]:
    return {name: set(m._forward_hooks) for name, m in model.named_modules() if m._forward_hooks}


def test_hooks_are_removed_even_when_the_block_raises(adapter):
    inputs = adapter.prepare(image(), PROMPT)
    # transformers installs its own persistent output-capturing hooks on the first
    # `output_hidden_states` call; only the adapter's hooks must come and go.
    adapter.model.image_features(inputs["pixel_values"])
    before = _hooks(adapter.model)
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.attribution_pass(inputs, ["projector", "vision.0"]) as ap:
            assert set(ap.tensors) == {"projector", "vision.0"}
            during = _hooks(adapter.model)
            assert during["model.mm_projector"] and during != before
            raise RuntimeError("boom")
    assert _hooks(adapter.model) == before


def test_gradients_of_a_word_reach_the_projector_and_vision_features(adapter):
    inputs = adapter.prepare(image(), PROMPT)
    gen = adapter.generate(inputs, settings(8))
    word = gen.words[0]
    with adapter.attribution_pass(inputs, ["projector", "vision.0"]) as ap:
        lp = ap.log_probs(gen.canvases[word.commit_step - 1], None)
        assert lp.shape == (12, len(tiny_tokenizer()))
        score = lp[list(word.positions), list(word.token_ids)].sum()
        g_proj, g_vis = torch.autograd.grad(score, [ap.tensors["projector"], ap.tensors["vision.0"]])
    assert ap.image_rows("projector", g_proj).shape == (16, 32)
    assert float(g_proj.abs().sum()) > 0 and float(g_vis.abs().sum()) > 0


@pytest.mark.parametrize("size,grid", [(32, (4, 4)), (48, (6, 6))])
def test_explain_runs_end_to_end_with_the_inputs_grid(folder32, tmp_path, size, grid):
    # seed 1: a 48-px model that answers with content words
    adapter = load_adapter(folder32 if size == 32 else write_tiny(tmp_path / "ckpt", image_size=size, seed=1))
    result = cam.explain(adapter, image(), PROMPT, CamSettings(generation=settings(8)))
    assert result.grid == grid and result.n_steps == 8
    assert result.words
    for w in result.words:
        assert set(w.maps) == set(CamSettings().methods)
        assert all(m.shape == grid for m in w.maps.values())
    assert any(float(w.maps["diffusion-cam-raw"].max()) > 0 for w in result.words)


def test_canvas_log_probs_batches_images_and_matches_the_attribution_pass(adapter):
    inputs = adapter.prepare(image(), PROMPT)
    gen = adapter.generate(inputs, settings(8))
    canvas = gen.canvases[3]
    batched = adapter.canvas_log_probs([image(), image(seed=1)], PROMPT, canvas, None)
    assert batched.shape == (2, 12, len(tiny_tokenizer()))
    with adapter.attribution_pass(inputs, ["projector"]) as ap:
        single = ap.log_probs(canvas, None).detach()
    torch.testing.assert_close(batched[0], single, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])


def test_attribution_pass_decodes_several_canvases_as_one_batch(adapter):
    inputs = adapter.prepare(image(), PROMPT)
    gen = adapter.generate(inputs, settings(8))
    canvases = [(gen.canvases[1], None), (gen.canvases[5], None)]
    with adapter.attribution_pass(inputs, ["projector"]) as ap:
        assert ap.max_canvases == 1  # cam.attribute decodes one canvas a pass for this family
        many = ap.log_probs_many(canvases).detach()
        for k, (canvas, _) in enumerate(canvases):
            torch.testing.assert_close(many[k], ap.log_probs(canvas, None).detach(), atol=1e-4, rtol=1e-4)


def test_a_tower_without_transformer_layers_uses_its_patch_embeddings(tmp_path):
    """0 SigLIP layers (what a tiny model trained from scratch needs to keep tokens local) loads,
    generates, and each image token's feature depends only on its own patch."""
    folder = write_tiny(tmp_path / "v0", vision_layers=0)
    ad = load_adapter(folder)
    img = np.asarray(image(32, 32))
    inputs = ad.prepare(Image.fromarray(img), "describe the image")
    gen = ad.generate(inputs, settings())
    assert gen.n_steps >= 1
    other = img.copy()
    other[:8, :8] = 255 - other[:8, :8]  # change the first 8x8 patch only
    with torch.no_grad():
        a = ad.model.image_features(ad.prepare(Image.fromarray(img), "describe the image")["pixel_values"])
        b = ad.model.image_features(ad.prepare(Image.fromarray(other), "describe the image")["pixel_values"])
    changed = (a - b).abs().amax(dim=-1)[0] > 1e-6
    assert changed[0] and not changed[1:].any()


def test_a_saved_preprocessor_config_of_the_right_size_loads(folder32, tmp_path):
    import shutil

    from transformers import SiglipImageProcessorPil

    folder = tmp_path / "with-proc"
    shutil.copytree(folder32, folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    assert load_adapter(folder).image_span(load_adapter(folder).prepare(image(), "describe the image")).grid == (4, 4)
    SiglipImageProcessorPil(size={"height": 48, "width": 48}).save_pretrained(folder)
    with pytest.raises(ValueError, match="does not match vision_config.image_size"):
        load_adapter(folder)
