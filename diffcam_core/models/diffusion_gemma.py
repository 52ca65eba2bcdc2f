"""Adapter for transformers' native `DiffusionGemmaForBlockDiffusion`.

Structure that matters for attribution (read off transformers 5.24's modeling code):
- The image lives only in the *prompt encoder*: vision tower → `embed_vision` projector →
  scattered into the prompt at the `image_token_id` placeholders → encoder layers, which
  write a KV cache. The canvas decoder never sees image tokens directly; it attends to
  the cached K/V of every encoder layer. So the prefix pass is the one structurally valid
  pass for Diffusion-CAM, and gradients of a canvas log-prob reach the image tokens
  through the cache.
- Layer i's K/V are computed from layer i's *input*, so the output of the last encoder
  layer feeds nothing the decoder reads: it gets no gradient and is not a valid layer.
- Sampling is uniform-noise diffusion (`EntropyBoundSampler`): the canvas starts as
  random tokens; each step accepts low-entropy predictions and re-randomises the rest,
  with self-conditioning on the previous step's logits.

`generate` re-implements the family's single-canvas loop with a local `torch.Generator`
(so it is deterministic without touching global RNG state) and records the canvas and
self-conditioning logits at every step. `tests/test_diffusion_gemma.py` checks that it
produces exactly what `model.generate` produces under the same seed.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import torch
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion, Gemma4ImageProcessorPil, PreTrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from diffcam.core.models.base import (
    IMAGE_FEATURES,
    Generation,
    ImageSpan,
    Layer,
    LayerTable,
    captured_outputs,
    check_captured,
    register_family,
)
from diffcam.core.settings import GenerationSettings
from diffcam.core.types import WordSpan
from diffcam.core.words import is_function_word, segment_words

PROJECTOR = "projector"


@register_family("diffusion_gemma")
class DiffusionGemmaAdapter(LayerTable):
    family = "diffusion_gemma"

    def __init__(self, model: DiffusionGemmaForBlockDiffusion, tokenizer, image_processor) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = model.config
        self.device = next(model.parameters()).device
        # the config's __post_init__ turns dict sub-configs into config objects
        text_config = cast(DiffusionGemmaTextConfig, self.config.text_config)
        vision_config = cast(PreTrainedConfig, self.config.vision_config)
        n_layers = text_config.num_hidden_layers
        self.grid_info = {
            "patch_size": vision_config.patch_size,
            "pooling_kernel_size": vision_config.pooling_kernel_size,
            "encoder_layers": n_layers,
        }
        # The layer sweep (benchmarks/bench_method.py) put every encoder layer below chance for
        # channel-pooled CAMs on the shipped model (image tokens attend to each other, so
        # encoder features are no longer local); the projector output is the best layer.
        self.default_layer = PROJECTOR

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: Path, device: str = "cpu", trust_remote_code: bool = False):
        if trust_remote_code:
            raise ValueError("diffusion_gemma is native to transformers: trust_remote_code is never needed")
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        image_processor = Gemma4ImageProcessorPil.from_pretrained(model_dir)
        for attr in ("image_token", "boi_token", "eoi_token"):
            if getattr(tokenizer, attr, None) is None:
                raise ValueError(f"{model_dir}: tokenizer defines no {attr}; cannot place the image in the prompt")
        return cls(model.to(device), tokenizer, image_processor)  # type: ignore[arg-type]  # transformers' wrapped `to` loses self

    # ------------------------------------------------------------------ inputs
    def prepare(self, image, prompt: str) -> dict[str, torch.Tensor]:
        """Family input path: `Gemma4ImageProcessorPil` patches + `<boi><image>×n<eoi>` placeholders.

        (`Gemma4Processor` itself cannot be built without torchvision — its video
        processor requires it — so the two halves are combined here exactly as it does.)
        """
        if not prompt or not prompt.strip():
            raise ValueError("prompt is empty")
        img = self.image_processor(images=[image], return_tensors="pt")
        n_soft = int(img["num_soft_tokens_per_image"][0])
        tok = self.tokenizer
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = [tok.bos_token_id, tok.convert_tokens_to_ids(tok.boi_token)]
        ids += [tok.image_token_id] * n_soft + [tok.convert_tokens_to_ids(tok.eoi_token)] + list(prompt_ids)
        input_ids = torch.tensor([ids], dtype=torch.long)
        return {
            "input_ids": input_ids.to(self.device),
            "pixel_values": img["pixel_values"].to(self.device),
            "image_position_ids": img["image_position_ids"].to(self.device),
            "mm_token_type_ids": (input_ids == tok.image_token_id).long().to(self.device),
        }

    def image_span(self, inputs: dict[str, torch.Tensor]) -> ImageSpan:
        """Image-token positions and their (rows, cols) grid, from the inputs themselves.

        The vision pooler averages k×k patches and emits pooled tokens row-major with
        `(max_x + 1) / k` tokens per row (`Gemma4VisionPooler._avg_pool_by_positions`);
        the grid is read off `image_position_ids` (x, y per patch, -1 for padding).
        """
        ids = inputs["input_ids"][0]
        positions = torch.nonzero(ids == cast(int, self.config.image_token_id)).flatten().tolist()
        pos = inputs["image_position_ids"][0]
        valid = pos[(pos >= 0).all(-1)]
        if not positions or valid.numel() == 0:
            raise ValueError("inputs carry no image tokens: nothing to attribute to")
        k = self.grid_info["pooling_kernel_size"]
        cols = (int(valid[:, 0].max()) + 1) // k
        rows = (int(valid[:, 1].max()) + 1) // k
        if rows * cols != len(positions):
            raise ValueError(
                f"image grid {rows}x{cols} from image_position_ids does not match {len(positions)} image tokens"
            )
        return ImageSpan(positions=tuple(positions), grid=(rows, cols))

    # ------------------------------------------------------------------ layers
    def layers(self) -> tuple[Layer, ...]:
        """The projector output, then every prompt-encoder layer (the last one feeds nothing the decoder reads)."""
        n = self.grid_info["encoder_layers"]
        last = ("the decoder reads each encoder layer's K/V from its input, so the last encoder layer's output "
                "never reaches the canvas")
        return (Layer(PROJECTOR, IMAGE_FEATURES, "image-token embeddings entering the prompt encoder (`embed_vision`)"),
                *(Layer(f"encoder.{i}", "encoder", f"output of prompt-encoder layer {i} (image + prompt tokens)",
                        invalid=last if i == n - 1 else "") for i in range(n)))

    # ------------------------------------------------------------------ generation
    def run_encoder(self, inputs: dict[str, torch.Tensor]) -> DynamicCache:
        """The prefix pass (batched or not): vision tower → projector → encoder → KV cache.

        The attention-mask mapping is built here, as `generate` does: the encoder's own
        forward computes it but discards the result (transformers 5.24), which silently
        drops the bidirectional mask over image tokens that `use_bidirectional_attention`
        asks for.
        """
        encoder = self.model.model.encoder
        ids = inputs["input_ids"]
        cache = DynamicCache(config=self.config.get_text_config(decoder=True))
        positions = torch.arange(0, ids.shape[1], dtype=torch.int32, device=ids.device).unsqueeze(0)
        masks = encoder.create_masks_for_generate(
            config=self.config,
            inputs_embeds=torch.empty((ids.shape[0], ids.shape[1], 0), dtype=self.model.dtype, device=ids.device),
            attention_mask=torch.ones(ids.shape, dtype=torch.bool, device=ids.device),
            cache=cache,
            position_ids=positions,
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        encoder(
            input_ids=ids,
            pixel_values=inputs["pixel_values"],
            image_position_ids=inputs["image_position_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            attention_mask=masks,
            cache=cache,
            position_ids=positions,
        )
        return cache

    def _encode(self, inputs: dict[str, torch.Tensor]) -> tuple[DynamicCache, torch.Tensor]:
        cache = self.run_encoder(inputs)
        seq_len = inputs["input_ids"].shape[1]
        dec_pos = torch.arange(
            seq_len, seq_len + cast(int, self.config.canvas_length), dtype=torch.int32, device=self.device
        ).unsqueeze(0)
        return cache, dec_pos

    def _decode(self, cache, dec_pos, canvas, self_cond, self_cond_mask=None) -> torch.Tensor:
        out = self.model(
            decoder_input_ids=canvas,
            self_conditioning_logits=self_cond,
            self_conditioning_mask=self_cond_mask,
            cache=cache,
            decoder_position_ids=dec_pos,
        )
        return out.logits

    @torch.no_grad()
    def generate(self, inputs: dict[str, torch.Tensor], settings: GenerationSettings) -> Generation:
        """One canvas of the family's denoising loop, recorded step by step."""
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("generate explains one sample at a time (batch size 1)")
        gen = torch.Generator(device=self.device).manual_seed(settings.seed)
        vocab = cast(DiffusionGemmaTextConfig, self.config.text_config).vocab_size
        length = cast(int, self.config.canvas_length)
        sampler = EntropyBoundSampler(
            EntropyBoundSamplerConfig(entropy_bound=float(settings.entropy_bound)),
            canvas_length=length,
            vocab_size=vocab,
            max_denoising_steps=settings.max_denoising_steps,
        )
        temperature = LinearTemperatureScheduleLogitsProcessor(
            settings.t_min, settings.t_max, settings.max_denoising_steps
        )
        stopper = StableAndConfidentStoppingCriteria(settings.stability_threshold, settings.confidence_threshold)

        cache, dec_pos = self._encode(inputs)
        canvas = torch.randint(0, vocab, (1, length), generator=gen, device=self.device)
        self_cond = None
        canvases: list[torch.Tensor] = []
        conds: list[torch.Tensor | None] = []
        argmaxes: list[torch.Tensor] = []
        for cur_step in reversed(range(1, settings.max_denoising_steps + 1)):
            canvases.append(canvas.clone())
            conds.append(None if self_cond is None else self_cond.clone())
            logits = self._decode(cache, dec_pos, canvas, self_cond)
            step_t = torch.tensor(cur_step, dtype=torch.int32, device=self.device)
            processed = temperature(inputs["input_ids"], logits, cur_step=step_t)  # type: ignore[arg-type]  # LongTensor, int
            probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
            denoised = torch.multinomial(probs.view(-1, vocab), 1, generator=gen).view(1, length)
            argmax = processed.argmax(-1)
            accepted = sampler.accept_canvas(canvas, denoised, processed, step_t)  # type: ignore[arg-type]  # LongTensor, int
            noise = torch.randint(0, vocab, (1, length), generator=gen, device=self.device)
            canvas = torch.where(~cast(torch.Tensor, sampler.accepted_token_mask), noise, accepted)  # set by accept_canvas
            argmaxes.append(argmax.clone())
            self_cond = processed.to(self.model.model.decoder.embed_tokens.weight.dtype)
            if bool(stopper(argmax, processed).all()):  # type: ignore[arg-type]  # transformers annotates LongTensor
                break

        final = argmaxes[-1][0]
        token_ids, words = self._words(final, argmaxes)
        return Generation(
            token_ids=token_ids,
            text=" ".join(w.text for w in words) if self._word_level() else self.tokenizer.decode(list(token_ids)),
            words=words,
            n_steps=len(argmaxes),
            canvases=canvases,
            self_cond=conds,
            argmax=argmaxes,
            final_self_cond=self_cond,
        )

    def _word_level(self) -> bool:
        return type(self.tokenizer.backend_tokenizer.model).__name__ == "WordLevel"

    def _words(self, final: torch.Tensor, argmaxes: list[torch.Tensor]) -> tuple[tuple[int, ...], tuple[WordSpan, ...]]:
        """Answer tokens up to EOS, grouped into words, each with its commit step.

        Commit step of a position = first step from which its argmax never changed again.
        """
        eos = self.tokenizer.eos_token_id
        ids = final.tolist()
        if eos in ids:
            ids = ids[: ids.index(eos)]
        special = set(self.tokenizer.all_special_ids)
        history = torch.stack([a[0] for a in argmaxes])  # (steps, length)
        n = history.shape[0]
        changed = history[1:] != history[:-1]  # (steps-1, length)
        commit = np.ones(history.shape[1], dtype=int)
        for pos in range(history.shape[1]):
            idx = torch.nonzero(changed[:, pos]).flatten()
            commit[pos] = int(idx.max()) + 2 if idx.numel() else 1
        pieces = [(p, t) for p, t in enumerate(ids) if t not in special]
        words = []
        for w_idx, group in enumerate(segment_words(self.tokenizer, pieces)):
            positions = tuple(p for p, _ in group)
            token_ids = tuple(t for _, t in group)
            text = self.tokenizer.decode(list(token_ids)).strip()
            words.append(
                WordSpan(
                    index=w_idx,
                    text=text,
                    positions=positions,
                    token_ids=token_ids,
                    commit_step=int(max(commit[p] for p in positions)),
                    is_function=is_function_word(text),
                )
            )
        assert n >= 1
        return tuple(ids), tuple(words)

    @torch.no_grad()
    def canvas_log_probs(self, images: list, prompt: str, canvas: torch.Tensor,
                         self_cond: torch.Tensor | None) -> torch.Tensor:
        """Log-probabilities (B, L, V) of one recorded canvas given each of ``images``.

        One batched prefix pass for all images (same prompt, so the same token layout),
        then one decoder pass over the canvas repeated per image: what faithfulness curves
        need to re-score a word on many perturbed images at once.
        """
        if not images:
            raise ValueError("canvas_log_probs needs at least one image")
        prepared = [self.prepare(im, prompt) for im in images]
        shapes = {tuple(p["input_ids"].shape) for p in prepared}
        if len(shapes) != 1:
            raise ValueError(f"images give different token layouts {sorted(shapes)}: use images of one size")
        batch = {k: torch.cat([p[k] for p in prepared]) for k in prepared[0]}
        n = len(images)
        cache, dec_pos = self._encode(batch)
        cond = None if self_cond is None else self_cond.expand(n, *self_cond.shape[1:])
        logits = self._decode(cache, dec_pos, canvas.expand(n, -1), cond)
        return torch.log_softmax(logits.float(), dim=-1)

    # ------------------------------------------------------------------ attribution
    @contextlib.contextmanager
    def attribution_pass(self, inputs: dict[str, torch.Tensor], layers: list[str]) -> Iterator[_Pass]:
        """Re-run the prefix pass with gradients; capture `layers` at the image positions.

        Hooks are registered for the duration of the block and always removed.
        """
        for layer in layers:
            self.check_layer(layer)
        span = self.image_span(inputs)
        pos_idx = torch.tensor(span.positions, device=self.device)
        encoder = self.model.model.encoder
        modules = {layer: encoder.embed_vision if layer == PROJECTOR
                   else encoder.language_model.layers[int(layer.split(".")[1])] for layer in layers}
        with captured_outputs(modules) as captured:
            with torch.enable_grad():
                cache, dec_pos = self._encode(inputs)
            check_captured(captured, layers, "prefix pass")
            for name in layers:
                feat = _image_rows(captured[name], name, pos_idx)
                if feat.shape[0] != len(span.positions):
                    raise ValueError(
                        f"layer {name} exposes {feat.shape[0]} image tokens, the inputs carry {len(span.positions)}: "
                        "the pass does not contain the whole image span (feasibility rule)"
                    )
            yield _Pass(self, cache, dec_pos, captured, span, pos_idx)


def _image_rows(tensor: torch.Tensor, name: str, pos_idx: torch.Tensor) -> torch.Tensor:
    """(n_image_tokens, channels) view of a captured tensor or of its gradient."""
    if name == PROJECTOR:
        return tensor  # the projector sees image tokens only, already in grid order
    return tensor[0, pos_idx]


class _Pass:
    """One prefix pass with gradients; decode any recorded canvas on top of it.

    Canvases batch well (`max_canvases` None): they share the prefix pass, and a decoder
    pass over a 16-token canvas is cheap next to it.

    `tensors[name]` is the captured layer output as the graph uses it (differentiate
    with respect to it); `image_rows(name, t)` cuts a tensor of that shape — the output
    or its gradient — down to the image tokens, in grid order.
    """

    def __init__(self, adapter: DiffusionGemmaAdapter, cache, dec_pos, tensors, span: ImageSpan, pos_idx) -> None:
        self.adapter = adapter
        self.cache = cache
        self.dec_pos = dec_pos
        self.tensors = tensors
        self.span = span
        self._pos_idx = pos_idx
        self.max_canvases: int | None = None

    def image_rows(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return _image_rows(tensor, name, self._pos_idx)

    def log_probs(self, canvas: torch.Tensor, self_cond: torch.Tensor | None) -> torch.Tensor:
        return self.log_probs_many([(canvas, self_cond)])[0]

    def log_probs_many(self, canvases: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """One decoder pass over the canvases stacked as a batch, on the encoder cache
        repeated per canvas (the decoder only reads the cache, so a shallow copy whose
        tensors are repeated stays in the prefix pass's graph)."""
        if not canvases:
            raise ValueError("log_probs_many needs at least one canvas")
        n = len(canvases)
        conds = [c for _, c in canvases]
        cond = mask = None
        if any(c is not None for c in conds):
            # one self-conditioning input for the batch; a canvas without one (the first
            # step's) is masked out, which the decoder defines as the same zero signal as None
            ref = next(c for c in conds if c is not None)
            cond = torch.cat([torch.zeros_like(ref) if c is None else c for c in conds])
            mask = None if all(c is not None for c in conds) else torch.tensor(
                [c is not None for c in conds], device=cond.device)
        cache = self.cache
        if n > 1:
            cache = copy.copy(self.cache)
            cache.layers = [copy.copy(layer) for layer in self.cache.layers]
            cache.batch_repeat_interleave(n)
        with torch.enable_grad():
            logits = self.adapter._decode(cache, self.dec_pos.expand(n, -1), torch.cat([c for c, _ in canvases]),
                                          cond, mask)
            return torch.log_softmax(logits.float(), dim=-1)
