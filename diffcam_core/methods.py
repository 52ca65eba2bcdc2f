"""Map methods as small registered objects, each declaring what it needs (docs/METHOD.md §2, §4).

Three kinds, by their input:
- `GradientMethod`: one word's map from the image-token features of one layer and the
  gradient of one score with respect to them. Its `Needs` say on which canvas the score is
  read (`attribution`: the word's attribution canvas, per `CamSettings.attribution_step`;
  `final`: the finished answer), at which layer (`chosen`: `CamSettings.layer`;
  `image-features`: the adapter's image-token embeddings) and which score (`contrastive`:
  target minus the distractors' mean; `target`: the word's own log-prob). `cam.attribute`
  groups the methods by these needs, so each canvas is decoded once and each (canvas,
  score) pair gets one batched backward whatever the number of methods.
- `WordSetMethod`: every word's map at once from another method's maps of all words (the
  refinement needs the other words' maps for SICD's interference).
- `ImageMethod`: chance maps from the image alone, no model (`cam.with_chance_maps`), so a
  method can be judged against what no model achieves.

Adding a method is one class under `@register_method`; `CamSettings` accepts exactly the
registered names, and maps are reported in registration order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from diffcam.core import evidence
from diffcam.core.refine import refine_stack
from diffcam.core.types import WordSpan

ATTRIBUTION, FINAL = "attribution", "final"
CHOSEN, IMAGE_FEATURES = "chosen", "image-features"
CONTRASTIVE, TARGET = "contrastive", "target"
_EPS = 1e-8


@dataclass(frozen=True)
class Needs:
    """Canvas, layer and score a `GradientMethod` reads (see the module docstring)."""

    canvas: str = ATTRIBUTION
    layer: str = CHOSEN
    score: str = CONTRASTIVE

    def __post_init__(self) -> None:
        for value, allowed in ((self.canvas, (ATTRIBUTION, FINAL)), (self.layer, (CHOSEN, IMAGE_FEATURES)),
                               (self.score, (CONTRASTIVE, TARGET))):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")


class MapMethod:
    """Base of every method: a registered `name`."""

    name: ClassVar[str]
    #: An all-zero map of this method marks the word (`WordMaps.zero_map`).
    flags_zero_map: ClassVar[bool] = False
    #: Where diffcam uses the method by default (`ROLES`): the one place a method joins a
    #: benchmark table or the bias audit, so adding a method is one class.
    roles: ClassVar[frozenset[str]] = frozenset()


class GradientMethod(MapMethod):
    needs: ClassVar[Needs]

    def word_map(self, features: np.ndarray, grads: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """(rows, cols) map from (n_image_tokens, channels) features and gradients in grid order."""
        raise NotImplementedError


class WordSetMethod(MapMethod):
    #: The method whose maps of every word are the input (computed even when not asked for).
    source: ClassVar[str]

    def word_maps(self, source: list[np.ndarray], words: Sequence[WordSpan], n_steps: int,
                  settings) -> list[np.ndarray]:
        raise NotImplementedError


class ModelMethod(MapMethod):
    """A map the model draws by answering perturbed images: it needs the model, not gradients
    (computed by `diffcam.core.cam.with_model_maps` from the window drops it is given)."""

    def drop_map(self, drops: np.ndarray, grid: tuple[int, int], win: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def window(self, grid: tuple[int, int]) -> tuple[int, int]:
        raise NotImplementedError


class ImageMethod(MapMethod):
    def image_maps(self, pixels: np.ndarray, grid: tuple[int, int], words: Sequence[WordSpan]) -> list[np.ndarray]:
        raise NotImplementedError


#: The default uses of a map method: a row of the paper-style method table, the maps the
#: bias audit's sample-level rules read, and those its dataset-level analysis reads.
ROLES = ("method-table", "bias-sample", "bias-dataset")

_REGISTRY: dict[str, MapMethod] = {}


def register_method(cls: type[MapMethod]) -> type[MapMethod]:
    """Class decorator: make `cls.name` a valid `CamSettings.methods` entry."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is already registered")
    if not cls.roles <= set(ROLES):
        raise ValueError(f"method {cls.name!r} has unknown roles {sorted(cls.roles - set(ROLES))}; known: {ROLES}")
    if issubclass(cls, WordSetMethod) and cls.source not in _REGISTRY:
        raise ValueError(f"method {cls.name!r} refines {cls.source!r}, which is not registered")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister_method(name: str) -> None:
    """Remove a method (a plug-in's, or a test's); its name becomes invalid in settings again."""
    del _REGISTRY[name]


def method_names() -> list[str]:
    return list(_REGISTRY)


def methods_for(role: str) -> tuple[str, ...]:
    """The registered methods with `role` (one of `ROLES`), in registration order."""
    if role not in ROLES:
        raise ValueError(f"unknown method role {role!r}; known: {ROLES}")
    return tuple(n for n, m in _REGISTRY.items() if role in m.roles)


def resolve(names: Sequence[str]) -> list[MapMethod]:
    """The methods to compute for `names`: those, plus the sources they refine, in registration order."""
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {method_names()}")
    todo = set(names)
    for n in names:
        m = _REGISTRY[n]
        while isinstance(m, WordSetMethod):
            todo.add(m.source)
            m = _REGISTRY[m.source]
    return [m for n, m in _REGISTRY.items() if n in todo]


def _scale_by_max(heat: np.ndarray) -> np.ndarray:
    hi = float(heat.max())
    return (heat / hi).astype(np.float32) if hi > 0 else np.zeros_like(heat, dtype=np.float32)


def raw_diffusion_cam(features: np.ndarray, grads: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """§2.7: α_c = mean_p G⁺_pc; H_p = mean_c ReLU(α_c F_pc); min-max to [0, 1].

    An all-zero H stays all zero (a result, flagged downstream, not an error).
    """
    alpha = np.maximum(grads, 0.0).mean(axis=0)
    heat = np.maximum(alpha[None, :] * features, 0.0).mean(axis=1).reshape(grid)
    lo, hi = float(heat.min()), float(heat.max())
    if hi <= 0.0:
        return np.zeros(grid, dtype=np.float32)
    return ((heat - lo) / (hi - lo + _EPS)).astype(np.float32)


@register_method
class DiffusionCamRaw(GradientMethod):
    """Diffusion-CAM before refinement: the contrastive score on the word's attribution canvas."""

    name = "diffusion-cam-raw"
    roles = frozenset({"method-table"})
    needs = Needs(ATTRIBUTION, CHOSEN, CONTRASTIVE)
    flags_zero_map = True

    def word_map(self, features, grads, grid):
        return raw_diffusion_cam(features, grads, grid)


@register_method
class DiffusionCam(WordSetMethod):
    """Diffusion-CAM refined (`CamSettings.refine_preset`) over the raw maps of the whole answer.

    SICD's interference for a word is the mean of the *other* function words' raw maps;
    the share of repeated content tokens feeds the same step.
    """

    name = "diffusion-cam"
    roles = frozenset({"method-table", "bias-sample", "bias-dataset"})
    source = "diffusion-cam-raw"

    def word_maps(self, source, words, n_steps, settings):
        raw = {w.index: m for w, m in zip(words, source)}
        function_idx = [w.index for w in words if w.is_function]
        content_ids = [t for w in words if not w.is_function for t in w.token_ids]
        repeat_share = 1.0 - len(set(content_ids)) / len(content_ids) if content_ids else 0.0
        interference = []
        for w in words:
            others = [raw[i] for i in function_idx if i != w.index]
            interference.append(np.mean(others, axis=0) if others else None)
        stack = refine_stack(np.stack(source), settings.refine_preset, n_steps=n_steps, interference=interference,
                             repeat_share=repeat_share).astype(np.float32)
        return list(stack)


@register_method
class GradCam(GradientMethod):
    """Classic Grad-CAM (§4) on the reference's canvas: signed α_c = mean_p G_pc, H = ReLU(Σ_c α_c F_pc).

    Divided by its maximum (not min-max) so that a map that is zero everywhere stays zero
    and the baseline keeps its own shape.
    """

    name = "gradcam"
    roles = frozenset({"method-table"})
    needs = Needs(FINAL, CHOSEN, TARGET)

    def word_map(self, features, grads, grid):
        heat = np.maximum((grads.mean(axis=0)[None, :] * features).sum(axis=1), 0.0).reshape(grid)
        return _scale_by_max(heat)


@register_method
class TokenGradNorm(GradientMethod):
    """Per-image-token ‖G_p‖₂ at the image features: no channel pooling, so a one-token cue is not washed out."""

    name = "token-gradnorm"
    roles = frozenset({"method-table", "bias-sample", "bias-dataset"})
    needs = Needs(FINAL, IMAGE_FEATURES, TARGET)

    def word_map(self, features, grads, grid):
        return _scale_by_max(np.linalg.norm(grads, axis=1).reshape(grid))


@register_method
class TokenGradXInput(GradientMethod):
    """Per-image-token ReLU(Σ_c G_pc F_pc) at the image features."""

    name = "token-gradxinput"
    roles = frozenset({"bias-dataset"})
    needs = Needs(FINAL, IMAGE_FEATURES, TARGET)

    def word_map(self, features, grads, grid):
        return _scale_by_max(np.maximum((grads * features).sum(axis=1), 0.0).reshape(grid))


@register_method
class RandomMap(ImageMethod):
    """Uniform noise seeded by the image's bytes and the word's index: a rerun draws the same map."""

    name = "random"

    def image_maps(self, pixels, grid, words):
        digest = int.from_bytes(hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).digest()[:8], "little")
        return [evidence.random_map(grid, np.random.default_rng([digest, w.index])).astype(np.float32) for w in words]


@register_method
class ObjectnessMap(ImageMethod):
    """Where the image differs from its background (`evidence.objectness_map`): the same map for every word."""

    name = "objectness"

    def image_maps(self, pixels, grid, words):
        return [evidence.objectness_map(pixels, grid).astype(np.float32)] * len(words)


def occlusion_window(grid: tuple[int, int]) -> tuple[int, int]:
    """The occluder, set from the grid: a quarter of each side, at least one cell (2x2 cells on
    an 8x8 grid, 4x4 on 16x16), slid one cell at a time."""
    return max(1, round(grid[0] / 4)), max(1, round(grid[1] / 4))


def occlusion_map(drops: np.ndarray, grid: tuple[int, int], win: tuple[int, int]) -> np.ndarray:
    """Cell map from window drops: each cell gets the mean of the positive drops (nats the word
    loses when the window is painted over) of the windows that cover it, scaled to max 1; a word
    that loses nothing under any window gets an all-zero map."""
    d = np.maximum(np.asarray(drops, dtype=np.float64), 0.0)
    h, w = int(grid[0]), int(grid[1])
    if d.shape != (h - win[0] + 1, w - win[1] + 1):
        raise ValueError(f"drops of shape {d.shape} do not fit a {win} window on a {h}x{w} grid")
    total = np.zeros((h, w))
    count = np.zeros((h, w))
    for r in range(d.shape[0]):
        for c in range(d.shape[1]):
            total[r:r + win[0], c:c + win[1]] += d[r, c]
            count[r:r + win[0], c:c + win[1]] += 1
    return _scale_by_max(total / count).astype(np.float32)


@register_method
class OcclusionMap(ModelMethod):
    """Occlusion: paint each window of cells with the background fill the counterfactuals use and
    re-score every word on its attribution canvas; a cell is as hot as the score it costs the word.
    A behavioural map (no gradients), so the faithfulness reference the gradient maps are read against."""

    name = "occlusion"

    def window(self, grid):
        return occlusion_window(grid)

    def drop_map(self, drops, grid, win):
        return occlusion_map(drops, grid, win)

