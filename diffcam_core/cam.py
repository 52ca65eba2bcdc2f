"""Diffusion-CAM and its baselines for every word of a generated answer (docs/METHOD.md §2, §4).

One call, `explain`, does: prepare → generate (recording every denoising step) → one
prefix pass with gradients → one batched decoder pass over the distinct canvases the
methods read (at most `canvas_batch` at a time) → one batched backward for every word and
kind of score of those canvases → maps → refinement → chance maps.

Deviations from the reference code (kept true here, docs/METHOD.md §7):
1. The score is class-specific: the log-prob of the generated token id at its own canvas
   position(s), summed over the word's sub-tokens (reference: a vocabulary sum at indices
   that land inside the image span).
2. Image span and grid come from the inputs (`adapter.image_span`), never a fixed slice.
3. `attribution_step="commit"` (default) scores the word on the canvas the decoder read
   at the step that committed it; `"final"` uses the final clean canvas (the reference).
4. No random noise anywhere; generation is seeded through a local generator.

Choices docs/METHOD.md leaves open, made here:
- The distractor is scored on the *same* decoder pass as the target (w's attribution
  canvas), at the distractor's own positions and generated ids. `previous` falls back to
  no contrast for the first content word (nothing precedes it).
- Which canvas, layer and score each map method reads is declared by the method itself
  (`diffcam.core.methods`); this module only groups the work by those needs. A word's
  reported `target_score` / `distractor_score` come from its attribution canvas when a
  method reads it (contrastive before plain), else from the final canvas.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
import torch

from diffcam.core import methods as registry
from diffcam.core.bias.discovery import window_scan
from diffcam.core.evidence import cover_grid
from diffcam.core.faithfulness import adapter_scorer, word_faithfulness
from diffcam.core.methods import (
    ATTRIBUTION,
    CHOSEN,
    CONTRASTIVE,
    FINAL,
    TARGET,
    GradientMethod,
    ImageMethod,
    ModelMethod,
    WordSetMethod,
)
from diffcam.core.models.base import Generation
from diffcam.core.settings import CamSettings
from diffcam.core.types import SampleExplanation, WordMaps, WordSpan


def explain(
    adapter, image, prompt: str, settings: CamSettings = CamSettings(), on_stage=None, faithfulness: bool = False,
    inputs=None,
) -> SampleExplanation:
    """Answer `prompt` about `image` and explain every word of the answer.

    `on_stage("generate" | "attribute")`, if given, is called on entering each phase so a
    caller can say where a failure happened. `faithfulness=True` also measures deletion /
    insertion curves and the vanish test for every content word under every map
    (`WordMaps.faithfulness`; timed as `faithfulness_s`). `inputs`: the result of
    `adapter.prepare(image, prompt)` when the caller already has it.
    """
    adapter.check_layer(settings.layer or adapter.default_layer)  # fail before spending a generation
    if on_stage:
        on_stage("generate")
    t0 = time.perf_counter()
    inputs = adapter.prepare(image, prompt) if inputs is None else inputs
    generation = adapter.generate(inputs, settings.generation)
    t1 = time.perf_counter()
    if on_stage:
        on_stage("attribute")
    result = attribute(adapter, inputs, generation, settings)
    pixels = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    pixels = cover_grid(pixels, result.grid)  # a tiny upload still needs a pixel per grid cell
    result = with_chance_maps(result, pixels, settings.methods)
    result = with_model_maps(adapter, result, pixels, prompt, generation, settings)
    t2 = time.perf_counter()
    result.timings.update({"generate_s": t1 - t0, "attribution_s": t2 - t1, "total_s": t2 - t0})
    if faithfulness and result.words:
        result = measure_faithfulness(adapter, pixels, prompt, generation, result, settings)
        t3 = time.perf_counter()
        result.timings.update({"faithfulness_s": t3 - t2, "total_s": t3 - t0})
    return result


def with_chance_maps(result: SampleExplanation, pixels: np.ndarray, methods) -> SampleExplanation:
    """Add the maps of the image-only methods in `methods` (`random`, `objectness`) to every word."""
    want = [m for m in registry.resolve(methods) if isinstance(m, ImageMethod)]
    if not want or not result.words:
        return result
    spans = [w.word for w in result.words]
    per_method = {m.name: m.image_maps(pixels, result.grid, spans) for m in want}
    words = tuple(replace(w, maps={**w.maps, **{name: maps[j] for name, maps in per_method.items()}})
                  for j, w in enumerate(result.words))
    return replace(result, words=words)


def with_model_maps(adapter, result: SampleExplanation, pixels: np.ndarray, prompt: str, generation: Generation,
                    settings: CamSettings) -> SampleExplanation:
    """Add the maps of the model-drawn methods in ``settings.methods`` (`occlusion`) to every
    word. Each word is re-scored on its own attribution canvas over the intact image and every
    occluded one; the log-probabilities of an (image, canvas) pair are computed once and shared
    by every word read on that canvas (one batched pass per canvas, not one per word)."""
    want = [m for m in registry.resolve(settings.methods) if isinstance(m, ModelMethod)]
    if not want or not result.words:
        return result
    cache: dict = {}
    words = []
    for w in result.words:
        canvas, cond = attribution_canvas(generation, w.word, settings.attribution_step)
        score, _ = adapter_scorer(adapter, prompt, canvas, cond, w.word, settings.generation, cache=cache,
                                  canvas_key=str(_canvas_key(ATTRIBUTION, w.word, settings.attribution_step)))
        added = {}
        for m in want:
            win = m.window(result.grid)
            added[m.name] = m.drop_map(window_scan(pixels, result.grid, win, score), result.grid, win)
        words.append(replace(w, maps={**w.maps, **added}))
    return replace(result, words=tuple(words))


def measure_faithfulness(adapter, pixels: np.ndarray, prompt: str, generation: Generation,
                         result: SampleExplanation, settings: CamSettings) -> SampleExplanation:
    """Deletion / insertion AUC and vanish for every content word under each of its maps."""
    words = []
    cache: dict = {}  # shared by the words: images they have in common run once
    for w in result.words:
        if w.word.is_function:
            words.append(w)
            continue
        canvas, cond = attribution_canvas(generation, w.word, settings.attribution_step)
        canvas_key = str(_canvas_key(ATTRIBUTION, w.word, settings.attribution_step))
        score, said = adapter_scorer(adapter, prompt, canvas, cond, w.word, settings.generation, cache=cache,
                                     canvas_key=canvas_key)
        faith = word_faithfulness(pixels, w.maps, score, said, word_key=str(w.word.index),
                                  seed=settings.generation.seed)
        words.append(replace(w, faithfulness=faith))
    return replace(result, words=tuple(words))


def _word_score(log_probs: torch.Tensor, word: WordSpan) -> torch.Tensor:
    return log_probs[list(word.positions), list(word.token_ids)].sum()


def _batched_grads(scores: list[torch.Tensor], wrt: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of each score w.r.t. each tensor, in one batched backward (vmap over rows of I).

    Equal to one `autograd.grad` per score (checked in tests) and ~1.4x faster on the tiny
    model; the graph is kept for the next batch of canvases.
    """
    stacked = torch.stack(scores)
    eye = torch.eye(len(scores), dtype=stacked.dtype, device=stacked.device)
    return list(torch.autograd.grad(stacked, wrt, grad_outputs=eye, is_grads_batched=True, retain_graph=True))


def _distractors(words: tuple[WordSpan, ...], mode: str) -> dict[int, list[WordSpan]]:
    content = [w for w in words if not w.is_function]
    out: dict[int, list[WordSpan]] = {}
    for w in words:
        if mode == "previous":
            prev = [c for c in content if c.index < w.index]
            out[w.index] = prev[-1:]
        elif mode == "others-mean":
            out[w.index] = [c for c in content if c.index != w.index]
        else:
            out[w.index] = []
    return out


def _canvas(generation: Generation, key: int | str):
    return generation.final_canvas() if key == "final" else generation.step_canvas(cast(int, key))


def attribution_canvas(generation: Generation, word: WordSpan, attribution_step: str):
    """(canvas, self-conditioning) the word is scored on: its commit step's, or the final one."""
    return _canvas(generation, _canvas_key(ATTRIBUTION, word, attribution_step))


def _canvas_key(canvas: str, word: WordSpan, attribution_step: str) -> int | str:
    return "final" if canvas == FINAL or attribution_step == "final" else word.commit_step


@dataclass
class _Group:
    """Words scored on one canvas with one kind of score, and the methods that read their gradients."""

    words: list[WordSpan] = field(default_factory=list)
    methods: list[GradientMethod] = field(default_factory=list)


#: Which (canvas, score) a word's reported scores come from, first one computed.
_REPORT_ORDER = ((ATTRIBUTION, CONTRASTIVE), (ATTRIBUTION, TARGET), (FINAL, CONTRASTIVE), (FINAL, TARGET))


def _groups(words, grad_methods: list[GradientMethod], attribution_step: str):
    """Words and methods by (canvas key, score): each gets one batched backward.

    Also returns the (canvas, score) pair each word's reported scores come from. With no
    gradient method (chance maps only) the words are still scored, on their attribution
    canvas, so every `WordMaps` has a score.
    """
    needs = list(dict.fromkeys((m.needs.canvas, m.needs.score) for m in grad_methods)) or [(ATTRIBUTION, CONTRASTIVE)]
    groups: dict[tuple[int | str, str], _Group] = {}
    for w in words:
        for canvas, score in needs:
            group = groups.setdefault((_canvas_key(canvas, w, attribution_step), score), _Group())
            if w not in group.words:  # with `final` attribution both canvases are one
                group.words.append(w)
            group.methods.extend(m for m in grad_methods if (m.needs.canvas, m.needs.score) == (canvas, score)
                                 and m not in group.methods)
    return groups, next(pair for pair in _REPORT_ORDER if pair in needs)


def attribute(adapter, inputs, generation: Generation, settings: CamSettings) -> SampleExplanation:
    """Maps for every word of `generation` (see module docstring for the passes run)."""
    layer = settings.layer or adapter.default_layer
    grid = adapter.image_span(inputs).grid
    words = generation.words
    base = dict(
        answer=generation.text,
        token_ids=generation.token_ids,
        grid=grid,
        n_steps=generation.n_steps,
        layer=layer,
        attribution_step=settings.attribution_step,
    )
    if not words:
        return SampleExplanation(words=(), **base)

    plan = registry.resolve(settings.methods)
    grad_methods = [m for m in plan if isinstance(m, GradientMethod)]
    layer_of = {m.name: layer if m.needs.layer == CHOSEN else adapter.image_feature_layer for m in grad_methods}
    step = settings.attribution_step
    groups, report = _groups(words, grad_methods, step)
    distractors = _distractors(words, settings.distractor)

    maps: dict[int, dict[str, np.ndarray]] = {w.index: {} for w in words}
    scores: dict[int, tuple[float, float | None]] = {}
    with adapter.attribution_pass(inputs, list(dict.fromkeys([layer, *layer_of.values()]))) as ap:

        def rows(name: str, t: torch.Tensor) -> np.ndarray:
            return ap.image_rows(name, t).detach().double().cpu().numpy()

        features = {name: rows(name, t) for name, t in ap.tensors.items()}
        canvas_keys = list(dict.fromkeys(key for key, _ in groups))
        batch = min(settings.canvas_batch, ap.max_canvases or settings.canvas_batch)
        for start in range(0, len(canvas_keys), batch):
            chunk = canvas_keys[start:start + batch]
            log_probs = ap.log_probs_many([_canvas(generation, key) for key in chunk])
            # every (group, word) score of the chunk's canvases, then one backward for all
            values, slots = [], []
            for c, canvas_key in enumerate(chunk):
                for score in (CONTRASTIVE, TARGET):
                    group = groups.get((canvas_key, score))
                    if group is None:
                        continue
                    for w in group.words:
                        target = _word_score(log_probs[c], w)
                        ds = distractors[w.index] if score == CONTRASTIVE else []
                        distractor = torch.stack([_word_score(log_probs[c], d) for d in ds]).mean() if ds else None
                        if _canvas_key(report[0], w, step) == canvas_key and report[1] == score:
                            scores[w.index] = (float(target.detach()),
                                               None if distractor is None else float(distractor.detach()))
                        if group.methods:
                            values.append(target - distractor if distractor is not None else target)
                            slots.append((group, w))
            if not values:
                continue
            layers = list(dict.fromkeys(layer_of[m.name] for group, _ in slots for m in group.methods))
            grads = dict(zip(layers, _batched_grads(values, [ap.tensors[name] for name in layers])))
            for j, (group, w) in enumerate(slots):
                g_rows = {name: rows(name, g[j]) for name, g in grads.items()}
                for m in group.methods:
                    name = layer_of[m.name]
                    maps[w.index][m.name] = m.word_map(features[name], g_rows[name], grid)

    for m in plan:
        if isinstance(m, WordSetMethod):
            out = m.word_maps([maps[w.index][m.source] for w in words], words, generation.n_steps, settings)
            for w, word_map in zip(words, out):
                maps[w.index][m.name] = word_map

    wanted = set(settings.methods)
    result = []
    for w in words:
        target_score, distractor_score = scores[w.index]
        ds = distractors[w.index]
        result.append(
            WordMaps(
                word=w,
                distractor=(ds[0].text if len(ds) == 1 else f"mean of {len(ds)} words") if ds else None,
                target_score=target_score,
                distractor_score=distractor_score,
                # image-only methods are added by `with_chance_maps`, not here
                maps={m.name: maps[w.index][m.name] for m in plan if m.name in wanted and m.name in maps[w.index]},
                zero_map=any(m.flags_zero_map and float(maps[w.index][m.name].max()) <= 0.0
                             for m in plan if m.name in maps[w.index]),
            )
        )
    return SampleExplanation(words=tuple(result), **base)
