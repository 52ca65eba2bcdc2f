"""Family 2: LLaDA-V-style masked-diffusion dMLLMs (SigLIP tower → MLP projector → bidirectional LLaDA).

This module is the family's adapter (input path, sampler, attribution pass); the `torch`
module itself, `LladaVModel`, is `diffcam.core.models.llada_modeling`.

The model is assembled from transformers' own modules, named so that a checkpoint in the
published LLaDA-V layout (LLaVA-OneVision naming, LLaDA blocks renamed to Llama names by
the LLaDA-V authors) loads with a strict state-dict match:

    model.embed_tokens / model.layers.<i>.{self_attn,mlp,...} / model.norm   `LlamaModel`
    model.vision_tower.vision_tower.vision_model.*                             `SiglipVisionModel`
    model.mm_projector.<0,2,...>                                               `mlp<N>x_gelu`
    model.image_newline                          (only when `mm_patch_merge_type` has "unpad")
    lm_head

The LLaDA language model is a Llama-type decoder run with *full* attention: the config
gets `is_causal=False` (transformers 5.24's `create_causal_mask` then builds a
bidirectional mask) and every attention module's own `is_causal` flag is cleared, so the
SDPA path cannot fall back to a causal kernel when the mask is skipped.
`tests/test_llada.py` checks that a later canvas token changes the first position's output.

Image features follow LLaVA: the SigLIP tower's last hidden state *before* its
post-layernorm (the published tower has its last layer removed and no head), then the
projector; one view per image, with `image_newline` appended when configured.

Generation is LLaDA's low-confidence remasking in semi-autoregressive blocks: the answer
canvas (`gen_length` tokens) starts all `<|mdm_mask|>` (id 126336 on released checkpoints);
in each block of `block_length` tokens, `steps / n_blocks` steps each unmask the
`num_transfer_tokens` masked positions of the block with the highest probability of their
argmax (`mask_count // steps` per step, the first `mask_count % steps` steps one more); as
in LLaDA-V, a block's remaining steps are skipped once it has no mask left (more steps
than tokens), so `n_steps` counts the forward passes actually run. The step budget is
`settings.steps` when the settings have one, else `settings.max_denoising_steps` (used
as the exact LLaDA `steps`, not a maximum); `gen_length` / `block_length` / `temperature`
come from the settings when they carry them, else from generation_config.json.
Temperature 0 is plain argmax; above 0 the argmax is taken on Gumbel-perturbed
probabilities drawn from a local seeded generator. Committed tokens are never revised.
Logits of `suppress_tokens` (generation_config.json; LLaDA-V's own loop suppresses its
eos and header ids this way) and of the mask token are set to -inf before the argmax and
the confidence: a committed mask would leave the answer unfinished.

Feasibility rule (what `check_layer` enforces). A single-stack model re-encodes image +
prompt + canvas at every step, so each step is its own forward pass; the structurally
valid attribution point for a word is the forward pass at the step that unmasked it (its
commit step), whose canvas is `generation.canvases[commit_step - 1]`. Layers *upstream of
the point where the canvas joins the sequence* — the projector output (`projector`) and
the SigLIP encoder layers (`vision.<i>`) — do not depend on the canvas: they are computed
once per attribution pass and are the same tensor in every step's forward, so gradients
from any canvas land on them. Language-model layers (`lm.<i>`) mix image and canvas and
differ for every canvas: they are listed by `layer_names` and refused by `check_layer`.

Not supported (refused with a message, never silently approximated): code shipped in the
model folder (`auto_map` / `trust_remote_code`), a config without a `vision_config` block
(the released one names its tower by hub id; nothing is downloaded), projectors other than
`linear` / `mlp<N>x_gelu`, classifier-free guidance and `random` remasking, and the LaViDa
layout (LLaDA's original `model.transformer.blocks.*` names and OLMo-style config fields;
LaViDa also pools image features, which is not reproduced here). Checkpoints
configured for `anyres` multi-crop input are run on the single resized base view (a
warning says so; the grid is then the base view's).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, SiglipVisionConfig
from transformers.initialization import no_init_weights
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from diffcam.core.models.base import (
    IMAGE_FEATURES,
    Generation,
    ImageSpan,
    InputLimitError,
    Layer,
    LayerTable,
    captured_outputs,
    check_captured,
    register_family,
)
from diffcam.core.models.llada_modeling import (FAMILY, IMAGE_NEWLINE_INDEX, IMAGE_TOKEN_INDEX, LladaVModel,
                                                text_config_from)
from diffcam.core.types import WordSpan
from diffcam.core.words import is_function_word, segment_words

PROJECTOR = "projector"
#: `<|mdm_mask|>` on the released LLaDA / LLaDA-V tokenizers.
MASK_TOKEN_ID = 126336
MASK_TOKEN = "<|mdm_mask|>"
#: Text tokens that end an answer, besides the tokenizer's eos.
STOP_TOKENS = ("<|eot_id|>",)
#: Generation defaults of the LLaDA-V demo (one block as long as the answer).
DEFAULT_GEN_LENGTH = 128
DEFAULT_BLOCK_LENGTH = 128


def num_transfer_tokens(mask_count: int, steps: int) -> list[int]:
    """LLaDA's per-step unmasking schedule for one block: even split, remainder to the first steps."""
    base, rem = divmod(int(mask_count), int(steps))
    return [base + (1 if i < rem else 0) for i in range(int(steps))]


@register_family(FAMILY)
class LladaVAdapter(LayerTable):
    """Diffusion-CAM adapter for LLaDA-V-layout checkpoints (see the module docstring)."""

    family = FAMILY

    def __init__(self, model: LladaVModel, tokenizer, image_processor, *, image_aspect_ratio: str = "square",
                 gen_length: int = DEFAULT_GEN_LENGTH, block_length: int = DEFAULT_BLOCK_LENGTH,
                 temperature: float = 0.0, mask_token_id: int | None = None,
                 suppress_tokens: tuple[int, ...] = ()) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_aspect_ratio = image_aspect_ratio or "square"
        self.gen_length = int(gen_length)
        self.block_length = int(block_length)
        self.temperature = float(temperature)
        self.suppress_tokens = tuple(int(t) for t in suppress_tokens)
        self.device = next(model.parameters()).device
        self.config = model.text_config
        # `base.check_inputs` reads the canvas length from here.
        self.config.canvas_length = self.gen_length
        vocab = self.config.vocab_size
        self.mask_token_id = self._resolve_mask_id(mask_token_id)
        if not 0 <= self.mask_token_id < vocab:
            raise ValueError(f"mask token id {self.mask_token_id} is outside the vocabulary ({vocab}): "
                             f"give the tokenizer a {MASK_TOKEN} token or set mask_token_id in config.json")
        stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        for tok in STOP_TOKENS:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                stop.add(tid)
        self.stop_ids = stop
        vc = model.vision_config
        self.grid_info: dict[str, Any] = {
            "image_size": vc.image_size,
            "patch_size": vc.patch_size,
            "vision_layers": vc.num_hidden_layers,
            "lm_layers": self.config.num_hidden_layers,
            "image_newline": hasattr(model.model, "image_newline"),
            "views": "base view only" if "anyres" in self.image_aspect_ratio else "single view",
        }
        # The projector output is the last point the image passes before it meets the
        # canvas: the deepest layer that is valid for every step (module docstring).
        self.default_layer = PROJECTOR

    def _resolve_mask_id(self, explicit: int | None) -> int:
        if explicit is not None:
            return int(explicit)
        tid = self.tokenizer.convert_tokens_to_ids(MASK_TOKEN)
        if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
            return tid
        return MASK_TOKEN_ID

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: Path, device: str = "cpu", trust_remote_code: bool = False, **kw):
        """Load a local LLaDA-V-layout folder: config.json, *.safetensors, tokenizer files."""
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text("utf-8"))
        if trust_remote_code or config.get("auto_map"):
            raise ValueError(
                f"{model_dir}: this config asks for remote code (auto_map={config.get('auto_map')!r}, "
                f"trust_remote_code={trust_remote_code}); diffcam never imports code shipped in a model folder. "
                f"The {FAMILY} family is built from transformers' own Llama and SigLIP modules: if the weights "
                "follow the LLaDA-V layout, delete `auto_map` from config.json and load again"
            )
        if config.get("model_type") != FAMILY:
            raise ValueError(f"{model_dir}: model_type {config.get('model_type')!r} is not {FAMILY!r}")
        if "hidden_size" not in config or "num_hidden_layers" not in config:
            olmo = [k for k in ("d_model", "n_layers", "n_heads") if k in config]
            raise ValueError(
                f"{model_dir}: config.json has no Llama-style hidden_size / num_hidden_layers"
                + (f" but LLaDA's original fields {olmo} (the LaViDa layout: original LLaDA block names and "
                   "pooled image features, which this family does not reproduce)" if olmo else "")
                + "; the llava_llada family reads the LLaDA-V layout"
            )
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise ValueError(
                f"{model_dir}: config.json has no `vision_config` block (mm_vision_tower="
                f"{config.get('mm_vision_tower')!r}); diffcam downloads nothing, so add the tower's SigLIP config "
                "(hidden_size, intermediate_size, num_hidden_layers as stored in the checkpoint, "
                "num_attention_heads, image_size, patch_size) under `vision_config`"
            )
        for key in ("cfg_scale", "remasking"):
            if key in config and config[key] not in (0, 0.0, "low_confidence", None):
                raise ValueError(f"{model_dir}: {key}={config[key]!r} is not supported "
                                 "(low-confidence remasking, no CFG)")
        vision = {k: v for k, v in vision.items() if k not in ("model_type", "architectures")}
        vision_cfg = SiglipVisionConfig(**{"vision_use_head": False, **vision})
        mm_hidden = config.get("mm_hidden_size", vision_cfg.hidden_size)
        if mm_hidden != vision_cfg.hidden_size:
            raise ValueError(f"{model_dir}: mm_hidden_size {mm_hidden} != vision_config.hidden_size "
                             f"{vision_cfg.hidden_size}")
        merge = config.get("mm_patch_merge_type", "flat") or "flat"
        state: dict[str, torch.Tensor] = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            state.update(load_file(str(f)))
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        # float32 on CPU (bf16 matmuls there are slow and imprecise); the checkpoint's dtype elsewhere.
        dtype = torch.float32 if str(device) == "cpu" or not floats else floats[0]
        # Every weight is overwritten from the checkpoint: skip the random init (minutes at 8B).
        with no_init_weights(), torch.device(device):
            model = LladaVModel(text_config_from(config), vision_cfg, config.get("mm_projector_type", "mlp2x_gelu"),
                                image_newline="unpad" in merge)
        model = model.to(dtype)
        missing, unexpected = _state_mismatch(model, state)
        if missing or unexpected:
            if any(k.startswith("model.transformer.") for k in unexpected):
                unexpected.insert(0, "(model.transformer.* are LLaDA's original block names: rename them to the "
                                     "Llama names LLaDA-V uses, e.g. attn_out -> self_attn.o_proj, ff_out -> "
                                     "mlp.down_proj, wte -> embed_tokens)")
            raise ValueError(
                f"{model_dir}: weights do not follow the LLaDA-V layout: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''} "
                f"({len(missing)} missing, {len(unexpected)} unexpected)"
            )
        model.load_state_dict(state, strict=True)
        del state
        # `config=` keeps AutoTokenizer from parsing config.json as a transformers config it
        # does not know (`llava_llada` is not a transformers model type).
        tokenizer = AutoTokenizer.from_pretrained(model_dir, config=model.text_config, trust_remote_code=False)
        processor = cls._image_processor(model_dir, vision_cfg)
        gen = _generation_defaults(model_dir)
        aspect = config.get("image_aspect_ratio", "square") or "square"
        if "anyres" in aspect:
            warnings.warn(f"{model_dir}: image_aspect_ratio={aspect!r}: anyres multi-crop input is not implemented; "
                          "diffcam runs the single resized base view", stacklevel=2)
        return cls(model, tokenizer, processor, image_aspect_ratio=aspect,
                   gen_length=kw.get("gen_length", gen.get("gen_length", DEFAULT_GEN_LENGTH)),
                   block_length=kw.get("block_length", gen.get("block_length", DEFAULT_BLOCK_LENGTH)),
                   temperature=kw.get("temperature", gen.get("temperature", 0.0)),
                   suppress_tokens=tuple(kw.get("suppress_tokens", gen.get("suppress_tokens") or ())),
                   mask_token_id=config.get("mask_token_id"))

    @staticmethod
    def _image_processor(model_dir: Path, vision_cfg: SiglipVisionConfig) -> SiglipImageProcessorPil:
        """SigLIP's PIL/numpy processor (the default backend needs torchvision), sized to the tower."""
        side = cast(int, vision_cfg.image_size)  # SigLIP towers are square: one int
        size = {"height": side, "width": side}
        if (model_dir / "preprocessor_config.json").is_file():
            proc = SiglipImageProcessorPil.from_pretrained(model_dir)
            got = proc.size  # a SizeDict (attributes), a plain dict, or one int for a square
            hw = ((got, got) if isinstance(got, int) else
                  (got.get("height"), got.get("width")) if isinstance(got, dict) else (got.height, got.width))
            if hw != (size["height"], size["width"]):
                raise ValueError(f"{model_dir}: preprocessor size {got} does not match vision_config.image_size "
                                 f"{vision_cfg.image_size} (the SigLIP position table is fixed)")
            return proc
        return SiglipImageProcessorPil(size=size)

    # ------------------------------------------------------------------ inputs
    def prepare(self, image, prompt: str) -> dict[str, torch.Tensor]:
        """Pixels from the SigLIP processor; ids = chat template around `<image>×n (+ newline)` and the prompt.

        The number of image placeholders is read off the processed pixels (rows, cols of
        patches), so another image size gives another grid without code changes.
        """
        if not prompt or not prompt.strip():
            raise ValueError("prompt is empty")
        img = (image if hasattr(image, "convert") else _pil(image)).convert("RGB")
        if self.image_aspect_ratio == "pad":
            img = _expand_to_square(img, self.image_processor.image_mean)
        pixel_values = self.image_processor(images=[img], return_tensors="pt")["pixel_values"]
        rows, cols = self._grid_of(pixel_values)
        image_ids = [IMAGE_TOKEN_INDEX] * (rows * cols)
        if self.grid_info["image_newline"]:
            image_ids.append(IMAGE_NEWLINE_INDEX)
        before, after = self._prompt_pieces(prompt)
        ids = before + image_ids + after
        max_pos = self.config.max_position_embeddings
        if len(ids) + self.gen_length > max_pos:
            raise InputLimitError("input-too-long", f"prompt and image take {len(ids)} tokens + {self.gen_length} "
                                  f"canvas > max_position_embeddings {max_pos}; shorten the prompt")
        return {"input_ids": torch.tensor([ids], dtype=torch.long, device=self.device),
                "pixel_values": pixel_values.to(self.device)}

    def _prompt_pieces(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the image: the tokenizer's chat template when it has one."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + prompt}],
                                           add_generation_prompt=True, tokenize=False)
            head, _, tail = text.partition("<image>")
            def enc(s: str) -> list[int]:
                return tok(s, add_special_tokens=False)["input_ids"] if s else []

            return enc(head), enc(tail)
        head = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return head, list(tok(prompt, add_special_tokens=False)["input_ids"])

    def _grid_of(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        p = cast(int, self.model.vision_config.patch_size)  # SigLIP's is one int
        h, w = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
        if h % p or w % p:
            raise ValueError(f"pixel size {h}x{w} is not a multiple of the patch size {p}")
        n_pos = self.model.siglip.embeddings.num_patches
        if (h // p) * (w // p) != n_pos:
            raise InputLimitError("image-aspect", f"the image becomes {h // p}x{w // p} patches; this tower's position "
                                  f"table holds {n_pos} (image_size {self.model.vision_config.image_size})")
        return h // p, w // p

    def image_span(self, inputs: dict[str, torch.Tensor]) -> ImageSpan:
        """Image-token positions (row-major patches, as SigLIP's patch conv flattens them) and grid."""
        positions = torch.nonzero(inputs["input_ids"][0] == IMAGE_TOKEN_INDEX).flatten().tolist()
        if not positions or "pixel_values" not in inputs:
            raise ValueError("inputs carry no image tokens: nothing to attribute to")
        rows, cols = self._grid_of(inputs["pixel_values"])
        if rows * cols != len(positions):
            raise ValueError(f"pixel grid {rows}x{cols} does not match {len(positions)} image placeholders")
        return ImageSpan(positions=tuple(positions), grid=(rows, cols))

    # ------------------------------------------------------------------ layers
    def layers(self) -> tuple[Layer, ...]:
        """Projector output, SigLIP layers (upstream of the canvas: valid), LM layers (per canvas: refused)."""
        per_canvas = (f"language-model layers mix image, prompt and canvas and are re-run at every step of "
                      f"{FAMILY}, so they differ per canvas and no single pass serves all words; use a layer "
                      f"upstream of the canvas")
        return (Layer(PROJECTOR, IMAGE_FEATURES, "image-token embeddings entering the language model (`mm_projector`)"),
                *(Layer(f"vision.{i}", "vision", f"output of SigLIP vision layer {i} (image patches only)")
                  for i in range(self.grid_info["vision_layers"])),
                *(Layer(f"lm.{i}", "lm", f"output of language-model layer {i} (image, prompt and canvas)",
                        invalid=per_canvas) for i in range(self.grid_info["lm_layers"])))

    def _module(self, layer: str) -> nn.Module:
        if layer == PROJECTOR:
            return cast(nn.Module, self.model.model.mm_projector)
        return self.model.siglip.encoder.layers[int(layer.split(".")[1])]

    # ------------------------------------------------------------------ generation
    def _schedule(self, settings) -> tuple[int, int, int]:
        """(gen_length, block_length, steps per block) from settings, falling back to the adapter's."""
        gen_length = int(getattr(settings, "gen_length", None) or self.gen_length)
        block_length = int(getattr(settings, "block_length", None) or self.block_length)
        steps = int(getattr(settings, "steps", None) or settings.max_denoising_steps)
        if block_length < 1 or gen_length % block_length:
            raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
        n_blocks = gen_length // block_length
        if steps < n_blocks or steps % n_blocks:
            raise ValueError(f"steps {steps} must be a positive multiple of the number of blocks {n_blocks} "
                             f"(gen_length {gen_length} / block_length {block_length})")
        return gen_length, block_length, steps // n_blocks

    @torch.no_grad()
    def generate(self, inputs: dict[str, torch.Tensor], settings) -> Generation:
        """Low-confidence remasking, recorded step by step; the image features are computed once."""
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("generate explains one sample at a time (batch size 1)")
        gen_length, block_length, steps = self._schedule(settings)
        max_pos = self.config.max_position_embeddings
        if inputs["input_ids"].shape[1] + gen_length > max_pos:
            raise InputLimitError("input-too-long", f"{inputs['input_ids'].shape[1]} prompt tokens + {gen_length} "
                                  f"canvas > max_position_embeddings {max_pos}")
        temperature = float(getattr(settings, "temperature", None) or self.temperature)
        rng = torch.Generator(device=self.device).manual_seed(int(settings.seed))
        feats = self.model.image_features(inputs["pixel_values"])
        mask_id = self.mask_token_id
        x = torch.full((1, gen_length), mask_id, dtype=torch.long, device=self.device)
        commit = torch.zeros(gen_length, dtype=torch.long)
        canvases, argmaxes = [], []
        suppress = sorted({mask_id, *self.suppress_tokens})
        step = 0
        for b in range(gen_length // block_length):
            end = (b + 1) * block_length
            schedule = num_transfer_tokens(int((x[0, b * block_length:end] == mask_id).sum()), steps)
            for k in schedule:
                if not bool((x[0, b * block_length:end] == mask_id).any()):
                    break  # more steps than tokens: LLaDA-V moves on once its block is full
                step += 1
                masked = x[0] == mask_id
                canvases.append(x.clone())
                logits = self.model.canvas_logits(inputs["input_ids"], feats, x)[0].double()
                logits[:, suppress] = -np.inf
                probs = torch.softmax(logits, dim=-1)
                if temperature > 0:
                    noise = torch.rand(probs.shape, dtype=torch.float64, generator=rng, device=self.device)
                    pred = (probs / (-torch.log(noise)) ** temperature).argmax(-1)
                else:
                    pred = logits.argmax(-1)
                conf = probs.gather(-1, pred[:, None])[:, 0]
                conf[end:] = -np.inf
                conf = torch.where(masked, conf, torch.full_like(conf, -np.inf))
                pred = torch.where(masked, pred, x[0])
                chosen = torch.topk(conf, k).indices if k else torch.empty(0, dtype=torch.long, device=x.device)
                x[0, chosen] = pred[chosen]
                commit[chosen.cpu()] = step
                argmaxes.append(pred[None].clone())
        if bool((x == mask_id).any()):
            raise RuntimeError("generation left masked positions: the unmasking schedule is inconsistent")
        argmaxes[-1] = x.clone()  # the answer: every position committed
        token_ids, words = self._words(x[0], commit)
        return Generation(
            token_ids=token_ids,
            text=(" ".join(w.text for w in words) if self._word_level()
                  else self.tokenizer.decode(list(token_ids)).strip()),
            words=words,
            n_steps=step,
            canvases=canvases,
            self_cond=[None] * step,
            argmax=argmaxes,
            extra={"commit_steps": commit.tolist(), "mask_token_id": mask_id,
                   "gen_length": gen_length, "block_length": block_length},
        )

    def _word_level(self) -> bool:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        return backend is not None and type(backend.model).__name__ == "WordLevel"

    def _words(self, final: torch.Tensor, commit: torch.Tensor) -> tuple[tuple[int, ...], tuple[WordSpan, ...]]:
        """Answer tokens up to the first stop token, grouped into words; commit step = unmask step."""
        ids = final.tolist()
        cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        ids = ids[:cut]
        special = set(self.tokenizer.all_special_ids) | {self.mask_token_id}
        pieces = [(p, t) for p, t in enumerate(ids) if t not in special]
        words = []
        for w_idx, group in enumerate(segment_words(self.tokenizer, pieces)):
            positions = tuple(p for p, _ in group)
            token_ids = tuple(t for _, t in group)
            text = self.tokenizer.decode(list(token_ids)).strip()
            words.append(WordSpan(index=w_idx, text=text, positions=positions, token_ids=token_ids,
                                  commit_step=int(max(int(commit[p]) for p in positions)),
                                  is_function=is_function_word(text)))
        return tuple(ids), tuple(words)

    @torch.no_grad()
    def canvas_log_probs(self, images: list, prompt: str, canvas: torch.Tensor,
                         self_cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, V) log-probs of one recorded canvas given each image, in one batched pass."""
        if not images:
            raise ValueError("canvas_log_probs needs at least one image")
        prepared = [self.prepare(im, prompt) for im in images]
        shapes = {tuple(p["input_ids"].shape) for p in prepared} | {tuple(p["pixel_values"].shape) for p in prepared}
        if len(shapes) != 2:
            raise ValueError("images give different token layouts: use images of one size")
        ids = torch.cat([p["input_ids"] for p in prepared])
        feats = self.model.image_features(torch.cat([p["pixel_values"] for p in prepared]))
        logits = self.model.canvas_logits(ids, feats, canvas.to(self.device).expand(len(images), -1))
        return torch.log_softmax(logits.float(), dim=-1)

    # ------------------------------------------------------------------ attribution
    @contextlib.contextmanager
    def attribution_pass(self, inputs: dict[str, torch.Tensor], layers: list[str]) -> Iterator[_Pass]:
        """Image features with gradients, captured at `layers`; any canvas can be decoded on top.

        Hooks live for the duration of the block and are always removed.
        """
        for layer in layers:
            self.check_layer(layer)
        span = self.image_span(inputs)
        with captured_outputs({layer: self._module(layer) for layer in layers}) as captured:
            with torch.enable_grad():
                feats = self.model.image_features(inputs["pixel_values"])
            check_captured(captured, layers, "image pass")
            for name in layers:
                if captured[name].shape[-2] != len(span.positions):
                    raise ValueError(f"layer {name} exposes {captured[name].shape[-2]} image tokens, the inputs carry "
                                     f"{len(span.positions)}: the pass does not contain the whole image span")
            yield _Pass(self, inputs["input_ids"], feats, captured, span)


class _Pass:
    """Image features (with graph) plus a decoder for any recorded canvas.

    `tensors[name]` is the captured layer output as the graph uses it, shape (1, n, C);
    `image_rows(name, t)` cuts that tensor or its gradient to (n, C) in grid order.
    `max_canvases` is 1: every canvas is a full forward of its own, and batching them made
    all-word attribution 5x slower on the shipped model (0.49 -> 2.58 s a sample), since
    each word's cotangent then runs through every canvas's rows.
    """

    def __init__(self, adapter: LladaVAdapter, input_ids, feats, tensors, span: ImageSpan) -> None:
        self.adapter = adapter
        self.input_ids = input_ids
        self.feats = feats
        self.tensors = tensors
        self.span = span
        self.max_canvases: int | None = 1

    def image_rows(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[0]

    def log_probs(self, canvas: torch.Tensor, self_cond: torch.Tensor | None = None) -> torch.Tensor:
        """(canvas_len, vocab) log-probs of one full forward over image + prompt + `canvas`."""
        return self.log_probs_many([(canvas, self_cond)])[0]

    def log_probs_many(self, canvases: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """(n, canvas_len, vocab): the full forwards of all canvases as one batch, the
        image features (and their graph) shared by every row."""
        if not canvases:
            raise ValueError("log_probs_many needs at least one canvas")
        n = len(canvases)
        stacked = torch.cat([c.to(self.adapter.device) for c, _ in canvases])
        with torch.enable_grad():
            logits = self.adapter.model.canvas_logits(self.input_ids.expand(n, -1),
                                                      self.feats.expand(n, *self.feats.shape[1:]), stacked)
            return torch.log_softmax(logits.float(), dim=-1)


def _state_mismatch(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    want = set(model.state_dict())
    return sorted(want - set(state)), sorted(set(state) - want)


def _generation_defaults(model_dir: Path) -> dict:
    """`gen_length` / `block_length` / `temperature` / `suppress_tokens` from generation_config.json."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return {k: data[k] for k in ("gen_length", "block_length", "temperature", "suppress_tokens") if k in data}


def _pil(image):
    from PIL import Image

    return Image.fromarray(np.asarray(image))


def _expand_to_square(img, mean) -> object:
    """LLaVA's `pad` aspect mode: centre the image on a square of the processor's mean colour."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    fill = tuple(int(round(m * 255)) for m in mean)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas
