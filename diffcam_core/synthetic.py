"""Synthetic grounded samples: coloured shapes on a dark background, with exact masks.

Every sample is an RGB image with 1..3 flat-coloured objects (circle / square / triangle),
a prompt, and a reference answer that names every object LEFT-TO-RIGHT by mask centroid,
e.g. ``"a red circle and a blue square"``. Both the colour word and the shape word of an
object ground to that object's mask (`object_words`), so every content word of the answer
has a ground-truth region.

An optional spurious *cue* (`CueSpec`) — a small solid square at a fixed position — is
drawn with probability ``p`` when the answer contains the cue's word and never otherwise.
A dataset generated with a cue is the planted-bias fixture for the spurious-correlation
analysis: a model trained on it may learn to look at the cue instead of the object.

Pure: arrays only, no files, no globals mutated, deterministic by seed. Sample ``i`` of
``make_samples(n, seed, settings)`` is drawn from its own generator
``default_rng(SeedSequence([seed, i]))``, so any sample can be regenerated alone and a
longer run has the shorter one as a prefix.

Geometry conventions: pixel ``(row y, col x)``; a pixel belongs to a shape when its
centre ``(x + 0.5, y + 0.5)`` lies inside the continuous shape; ``bbox`` is
``(x0, y0, x1, y1)`` half-open, computed from the mask itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from diffcam.core.inpaint import dilate
from diffcam.core.settings import Settings

__all__ = [
    "SHAPES",
    "COLORS",
    "CUE_COLORS",
    "CUE_CORNERS",
    "CueSpec",
    "SynthSettings",
    "SynthObject",
    "SynthSample",
    "make_sample",
    "make_samples",
    "sample_rng",
    "vocabulary",
    "object_words",
    "answer_groundings",
    "cue_region",
    "swap_objects",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Object palette. Chosen far apart in RGB and in hue; purple and orange are available but
# not in the default `SynthSettings.colors` (a tiny model learns 4 colours much faster,
# and orange sits between red and yellow).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 210),
    "orange": (250, 140, 20),
}

# Colours a cue may be given by name: the object palette plus a few that no object uses.
CUE_COLORS: dict[str, tuple[int, int, int]] = {
    **COLORS,
    "white": (255, 255, 255),
    "magenta": (255, 0, 255),
    "cyan": (0, 230, 230),
    "black": (0, 0, 0),
}

CUE_CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")

ANSWER_ARTICLE = "a"
ANSWER_JOIN = "and"

DEFAULT_PROMPTS: tuple[str, ...] = (
    "describe the image",
    "what is in the image ?",
    "what shapes do you see ?",
    "name the objects",
)

_WORD_RE = re.compile(r"^[a-z?]+$")
CUE_KEYS = ("word", "pos", "size", "color", "p")


def rgb_triple(value: Any, what: str) -> tuple[int, int, int]:
    """Validate an RGB triple of ints in 0..255 (list or tuple)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
        raise ValueError(f"{what} must be 3 integers 0..255, got {value!r}")
    out = []
    for c in value:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) <= 255:
            raise ValueError(f"{what} must be 3 integers 0..255, got {value!r}")
        out.append(int(c))
    return (out[0], out[1], out[2])


# --------------------------------------------------------------------------- cue


def _xy(pos: Any) -> tuple[int, int]:
    """A pixel position: 2 non-negative integers (list or tuple)."""
    if not hasattr(pos, "__len__") or len(pos) != 2 or any(
        isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 0 for v in pos
    ):
        raise ValueError(f"cue pos (x, y) must be 2 non-negative integers, got {pos!r}")
    return (int(pos[0]), int(pos[1]))


def _name_or(value: Any, names: list[str], what: str, other: str, parse: Any) -> Any:
    """A known name (lower-cased) or, for anything but a string, ``parse(value)``."""
    if not isinstance(value, str):
        return parse(value)
    if value.strip().lower() not in names:
        raise ValueError(f"{what} must be one of {names} or {other}, got {value!r}")
    return value.strip().lower()


class CueSpec(Settings):
    """A spurious cue: a solid ``size``×``size`` square drawn at ``pos`` in ``color``.

    Drawn with probability ``p`` when the sample's answer contains ``word`` (a colour or
    shape word); never drawn otherwise. ``pos`` is a corner name (the square sits
    ``SynthSettings.cue_margin`` px from both edges) or ``(x, y)``: the pixel of the
    square's top-left corner. ``color`` is a `CUE_COLORS` name or an RGB triple. Its text
    form (``word=circle,pos=top-left,...``) is `diffcam.core.cue_text`.
    """

    word: str
    pos: str | tuple[int, int] = "top-left"
    size: int = 6
    color: str | tuple[int, int, int] = "white"
    p: float = 1.0

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        """Names lower-cased and checked against the known words, corners and colours; lists
        (JSON) become tuples; every refusal names the field and what it accepts."""
        if not isinstance(data, Mapping):
            return data
        d = dict(data)
        if "word" in d:
            word = d["word"]
            if not isinstance(word, str) or word.strip().lower() not in (*COLORS, *SHAPES):
                raise ValueError(f"cue word must be a colour {sorted(COLORS)} or shape {list(SHAPES)}, got {word!r}")
            d["word"] = word.strip().lower()
        if "pos" in d:
            d["pos"] = _name_or(d["pos"], list(CUE_CORNERS), "cue pos", "(x, y)", _xy)
        if "size" in d:
            size = d["size"]
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
                raise ValueError(f"cue size must be a positive integer, got {size!r}")
            d["size"] = int(size)
        if "color" in d:
            d["color"] = _name_or(d["color"], sorted(CUE_COLORS), "cue color", "R,G,B",
                                  lambda v: rgb_triple(v, "cue color"))
        if "p" in d:
            p = d["p"]
            if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)):
                raise ValueError(f"cue p must be a number in [0, 1], got {p!r}")
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"cue p must be in [0, 1], got {p!r}")
            d["p"] = float(p)
        return d

    @property
    def rgb(self) -> tuple[int, int, int]:
        return CUE_COLORS[self.color] if isinstance(self.color, str) else self.color


# --------------------------------------------------------------------------- settings


#: An 8-bit intensity.
Byte = Annotated[int, Field(ge=0, le=255)]


class SynthSettings(Settings):
    """Everything that shapes a synthetic sample; saved with every generated dataset.

    - ``count_probs[k]``: probability of ``k + 1`` objects (must sum to 1).
    - ``size_range``: inclusive range of an object's bounding-box side in px (circle
      diameter, square side, triangle base and height). Default 16–24 so an object
      covers several cells of an 8-px patch grid at 64×64.
    - ``background`` + ``background_noise``: dark grey with Gaussian grey noise (std, in
      intensity levels) on background pixels only; objects are flat colour.
    - ``clutter``: probability that a background pixel seeds a small grey dot
      (``clutter_dot`` px square, intensity in ``clutter_gray``). Dots never touch an
      object or the cue region (they stay ``min_gap`` px away).
    - ``min_gap``: objects (and the cue region) are at least this many background pixels
      apart (Chebyshev distance between masks > ``min_gap``).
    - ``min_dx``: centroids of two objects differ by at least this many px in x, so the
      left-to-right answer order is unambiguous from the image.
    - ``edge_margin``: objects keep this many px from the image border.
    - ``cue`` / ``cue_margin``: optional spurious cue and its distance from the edges for
      corner positions. When a cue is set its region is reserved in EVERY sample (objects
      avoid it whether or not the cue is drawn), so cue pixels are the only difference.
    - ``max_attempts``: placement retries per object; ``max_layouts``: full layout
      restarts before giving up with ValueError (settings too crowded).
    - ``unnamed_objects``: inclusive range of extra flat-grey shapes (intensity in
      ``unnamed_gray``) that the answer never names: clutter an image-only saliency map
      lights as much as the named objects, so it fails word-specificity by construction.
      ``(0, 0)`` (default) draws none and leaves the random stream as before.
    """

    image_size: int = Field(default=64, ge=8)
    count_probs: tuple[Annotated[float, Field(ge=0.0)], ...] = (0.45, 0.45, 0.1)
    size_range: tuple[int, int] = (18, 26)
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = SHAPES
    background: tuple[Byte, Byte, Byte] = (40, 40, 40)
    background_noise: float = Field(default=4.0, ge=0.0)
    clutter: float = Field(default=0.01, ge=0.0, le=1.0)
    clutter_dot: tuple[int, int] = (1, 2)
    clutter_gray: tuple[Byte, Byte] = (70, 130)
    min_gap: int = Field(default=2, ge=0)
    min_dx: float = Field(default=4.0, ge=0.0)
    edge_margin: int = Field(default=1, ge=0)
    prompts: tuple[str, ...] = Field(default=DEFAULT_PROMPTS, min_length=1)
    cue: CueSpec | None = None
    cue_margin: int = Field(default=2, ge=0)
    max_attempts: int = Field(default=100, ge=1)
    max_layouts: int = Field(default=50, ge=1)
    unnamed_objects: tuple[int, int] = (0, 0)
    unnamed_gray: tuple[Byte, Byte] = (100, 160)

    @field_validator("size_range", "clutter_dot", "clutter_gray", "unnamed_objects", "unnamed_gray")
    @classmethod
    def _ordered(cls, v: tuple[int, int], info: Any) -> tuple[int, int]:
        lowest = _RANGE_MIN[info.field_name]
        if not lowest <= v[0] <= v[1]:
            raise ValueError(f"{info.field_name} must satisfy {lowest} <= lo <= hi, got {v!r}")
        return v

    @field_validator("colors", "shapes")
    @classmethod
    def _distinct_names(cls, v: tuple[str, ...], info: Any) -> tuple[str, ...]:
        valid = COLORS if info.field_name == "colors" else SHAPES
        if not v or len(set(v)) != len(v) or any(x not in valid for x in v):
            raise ValueError(f"{info.field_name} must be distinct names from {sorted(valid)}, got {v!r}")
        return v

    @field_validator("count_probs")
    @classmethod
    def _distribution(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"count_probs must be non-negative and sum to 1, got {v!r}")
        return v

    @field_validator("prompts")
    @classmethod
    def _lower_case_words(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if any(not _WORD_RE.match(w) for w in p.split(" ")):
                raise ValueError(f"prompt {p!r} must be lower-case words (a-z or '?') separated by single spaces")
        return v

    @model_validator(mode="after")
    def _fits(self) -> SynthSettings:
        """The constraints between fields: objects, their sizes and the cue fit the image."""
        max_count = max(k + 1 for k, p in enumerate(self.count_probs) if p > 0)
        if max_count > len(self.colors) * len(self.shapes):
            raise ValueError(f"count_probs allows {max_count} objects but only {len(self.colors) * len(self.shapes)} "
                             "distinct (colour, shape) pairs exist")
        room = self.image_size - 2 * self.edge_margin
        if self.size_range[1] > room:
            raise ValueError(f"size_range must satisfy 2 <= lo <= hi <= image_size - 2*edge_margin ({room}), "
                             f"got {self.size_range!r}")
        if self.cue is not None:
            if self.cue.word not in (*self.colors, *self.shapes):
                raise ValueError(f"cue word {self.cue.word!r} never appears in an answer: "
                                 f"colors are {list(self.colors)}, shapes are {list(self.shapes)}")
            x0, y0, x1, y1 = cue_region(self)
            n = self.image_size
            if x0 < 0 or y0 < 0 or x1 > n or y1 > n:
                raise ValueError(f"cue square {(x0, y0, x1, y1)} does not fit in a {n}x{n} image")
        return self


#: The lowest ``lo`` of each (lo, hi) range of `SynthSettings`.
_RANGE_MIN = {"size_range": 2, "clutter_dot": 1, "clutter_gray": 0, "unnamed_objects": 0, "unnamed_gray": 0}


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True, eq=False)
class SynthObject:
    """One drawn object: its words, its exclusive mask (bool H×W) and half-open bbox."""

    color: str
    shape: str
    mask: np.ndarray
    bbox: tuple[int, int, int, int]

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) of the mask's pixel centres."""
        ys, xs = np.nonzero(self.mask)
        return (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)


@dataclass(frozen=True, eq=False)
class SynthSample:
    """One synthetic sample. ``objects`` are in answer order (left to right)."""

    image: np.ndarray
    objects: tuple[SynthObject, ...]
    prompt: str
    answer: str
    cue_present: bool
    cue_mask: np.ndarray | None
    unnamed: tuple[SynthObject, ...] = ()


def object_words(obj: SynthObject) -> tuple[str, str]:
    """The answer words that ground to ``obj.mask``: its colour word and its shape word."""
    return (obj.color, obj.shape)


def answer_groundings(sample: SynthSample) -> tuple[tuple[str, np.ndarray | None], ...]:
    """Per word of ``sample.answer.split()``: (word, mask) for colour/shape words, (word, None)
    for the function words ("a", "and")."""
    out: list[tuple[str, np.ndarray | None]] = []
    for i, obj in enumerate(sample.objects):
        if i:
            out.append((ANSWER_JOIN, None))
        out.append((ANSWER_ARTICLE, None))
        out.extend((w, obj.mask) for w in object_words(obj))
    return tuple(out)


def vocabulary(settings: SynthSettings) -> list[str]:
    """Every word that can appear in a prompt or an answer under ``settings`` (sorted)."""
    words = {ANSWER_ARTICLE, ANSWER_JOIN, *settings.colors, *settings.shapes}
    for p in settings.prompts:
        words.update(p.split(" "))
    return sorted(words)


def cue_region(settings: SynthSettings) -> tuple[int, int, int, int]:
    """Half-open (x0, y0, x1, y1) of the cue square; ValueError when ``settings.cue`` is None."""
    cue = settings.cue
    if cue is None:
        raise ValueError("settings have no cue")
    n, s, m = settings.image_size, cue.size, settings.cue_margin
    if isinstance(cue.pos, str):
        x0 = m if cue.pos.endswith("left") else n - m - s
        y0 = m if cue.pos.startswith("top") else n - m - s
    else:
        x0, y0 = cue.pos
    return (x0, y0, x0 + s, y0 + s)


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for sample ``index`` of a dataset with ``seed`` (both >= 0)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def make_samples(
    n: int, seed: int, settings: SynthSettings | None = None, *, start: int = 0
) -> Iterator[SynthSample]:
    """Samples ``start .. start+n-1`` of the dataset defined by (``seed``, ``settings``)."""
    settings = settings or SynthSettings()
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for i in range(start, start + n):
        yield make_sample(sample_rng(seed, i), settings)


def _shape_mask(shape: str, x0: int, y0: int, s: int, n: int) -> np.ndarray:
    """Pixel-centre rasterisation of a shape whose bounding box is (x0, y0, x0+s, y0+s)."""
    yc = np.arange(n, dtype=np.float64)[:, None] + 0.5
    xc = np.arange(n, dtype=np.float64)[None, :] + 0.5
    if shape == "square":
        return (xc >= x0) & (xc < x0 + s) & (yc >= y0) & (yc < y0 + s)
    if shape == "circle":
        r = s / 2.0
        return (xc - (x0 + r)) ** 2 + (yc - (y0 + r)) ** 2 <= r * r
    if shape == "triangle":
        # Apex at (x0 + s/2, y0), base from (x0, y0+s) to (x0+s, y0+s): half width at depth d is d/2.
        d = yc - y0
        return (d >= 0) & (d <= s) & (np.abs(xc - (x0 + s / 2.0)) <= d / 2.0)
    raise ValueError(f"unknown shape {shape!r}")


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _layout(
    rng: np.random.Generator, settings: SynthSettings, pairs: list[tuple[str, str]], reserved: np.ndarray
) -> list[tuple[str, str, np.ndarray]] | None:
    """Place each (colour, shape) once; None when some object found no free spot."""
    n = settings.image_size
    lo, hi = settings.size_range
    m = settings.edge_margin
    occupied = reserved.copy()  # already dilated by min_gap
    placed: list[tuple[str, str, np.ndarray]] = []
    centroids_x: list[float] = []
    sizes = rng.integers(lo, hi + 1, size=len(pairs))
    for (color, shape), s in zip(pairs, sizes):
        s = int(s)
        for _ in range(settings.max_attempts):
            x0 = int(rng.integers(m, n - m - s + 1))
            y0 = int(rng.integers(m, n - m - s + 1))
            mask = _shape_mask(shape, x0, y0, s, n)
            if not mask.any() or (mask & occupied).any():
                continue
            cx = float(np.nonzero(mask)[1].mean())
            if any(abs(cx - c) < settings.min_dx for c in centroids_x):
                continue
            placed.append((color, shape, mask))
            centroids_x.append(cx)
            occupied |= dilate(mask, settings.min_gap)
            break
        else:
            return None
    return placed


def make_sample(rng: np.random.Generator, settings: SynthSettings | None = None) -> SynthSample:
    """Draw one sample from ``rng`` (the generator is advanced; nothing else is touched)."""
    settings = settings or SynthSettings()
    n = settings.image_size

    count = int(rng.choice(len(settings.count_probs), p=np.asarray(settings.count_probs))) + 1
    all_pairs = [(c, s) for c in settings.colors for s in settings.shapes]
    pick = rng.choice(len(all_pairs), size=count, replace=False)
    pairs = [all_pairs[int(i)] for i in pick]

    reserved = np.zeros((n, n), dtype=bool)
    cue_box = None
    if settings.cue is not None:
        cue_box = cue_region(settings)
        x0, y0, x1, y1 = cue_box
        reserved[y0:y1, x0:x1] = True
        reserved = dilate(reserved, settings.min_gap)

    for _ in range(settings.max_layouts):
        placed = _layout(rng, settings, pairs, reserved)
        if placed is not None:
            break
    else:
        raise ValueError(
            f"could not place {count} objects of size {settings.size_range} in a {n}x{n} image "
            f"with min_gap={settings.min_gap}, min_dx={settings.min_dx} after "
            f"{settings.max_layouts} layouts x {settings.max_attempts} attempts; "
            "reduce object sizes or counts"
        )

    unnamed: tuple[SynthObject, ...] = ()
    if settings.unnamed_objects[1] > 0:  # only then: datasets without them keep their stream
        unnamed = _place_unnamed(rng, settings, placed, reserved)

    # Left to right by centroid x; ties (only possible with min_dx == 0) by y, then names.
    placed.sort(key=_order_key)
    objects = tuple(SynthObject(c, s, mask, _bbox(mask)) for c, s, mask in placed)
    answer = f" {ANSWER_JOIN} ".join(f"{ANSWER_ARTICLE} {o.color} {o.shape}" for o in objects)
    prompt = settings.prompts[int(rng.integers(len(settings.prompts)))]

    cue_coin = float(rng.random()) if settings.cue is not None else 1.0  # always drawn: stable stream
    cue_present = bool(settings.cue is not None and settings.cue.word in answer.split(" ")
                       and cue_coin < settings.cue.p)

    # Background: grey + grey noise.
    noise = rng.normal(0.0, settings.background_noise, size=(n, n, 1)) if settings.background_noise else 0.0
    image = np.clip(np.asarray(settings.background, dtype=np.float64)[None, None, :] + noise, 0, 255)
    image = np.rint(image).astype(np.uint8)
    if image.shape != (n, n, 3):
        image = np.broadcast_to(image, (n, n, 3)).copy()

    # Clutter: small grey dots away from objects and the cue region.
    if settings.clutter > 0:
        keep_out = reserved.copy()
        for o in (*objects, *unnamed):
            keep_out |= dilate(o.mask, settings.min_gap)
        seeds = np.argwhere(rng.random((n, n)) < settings.clutter)
        dlo, dhi = settings.clutter_dot
        glo, ghi = settings.clutter_gray
        sizes = rng.integers(dlo, dhi + 1, size=len(seeds))
        grays = rng.integers(glo, ghi + 1, size=len(seeds))
        for (y, x), d, g in zip(seeds, sizes, grays):
            if not keep_out[y : y + d, x : x + d].any():
                image[y : y + d, x : x + d] = g

    for o in unnamed:
        image[o.mask] = _gray_value(o.color)
    for o in objects:
        image[o.mask] = COLORS[o.color]

    cue_mask = None
    if cue_present:
        assert settings.cue is not None and cue_box is not None
        x0, y0, x1, y1 = cue_box
        cue_mask = np.zeros((n, n), dtype=bool)
        cue_mask[y0:y1, x0:x1] = True
        image[cue_mask] = settings.cue.rgb

    return SynthSample(
        image=image,
        objects=objects,
        prompt=prompt,
        answer=answer,
        cue_present=cue_present,
        cue_mask=cue_mask,
        unnamed=unnamed,
    )


def _order_key(item: tuple[str, str, np.ndarray]) -> tuple[float, float, str, str]:
    ys, xs = np.nonzero(item[2])
    return (float(xs.mean()), float(ys.mean()), item[0], item[1])


def _gray_value(color: str) -> tuple[int, int, int]:
    g = int(color.removeprefix("gray"))
    return (g, g, g)


def _place_unnamed(rng: np.random.Generator, settings: SynthSettings,
                   placed: list[tuple[str, str, np.ndarray]], reserved: np.ndarray) -> tuple[SynthObject, ...]:
    """Grey shapes the answer does not name, placed clear of the named objects (best effort:
    one that finds no free spot within ``max_attempts`` is left out)."""
    n = settings.image_size
    lo, hi = settings.size_range
    m = settings.edge_margin
    occupied = reserved.copy()
    for _, _, mask in placed:
        occupied |= dilate(mask, settings.min_gap)
    count = int(rng.integers(settings.unnamed_objects[0], settings.unnamed_objects[1] + 1))
    out = []
    for _ in range(count):
        shape = settings.shapes[int(rng.integers(len(settings.shapes)))]
        gray = int(rng.integers(settings.unnamed_gray[0], settings.unnamed_gray[1] + 1))
        s = int(rng.integers(lo, hi + 1))
        for _ in range(settings.max_attempts):
            x0 = int(rng.integers(m, n - m - s + 1))
            y0 = int(rng.integers(m, n - m - s + 1))
            mask = _shape_mask(shape, x0, y0, s, n)
            if mask.any() and not (mask & occupied).any():
                out.append(SynthObject(f"gray{gray}", shape, mask, _bbox(mask)))
                occupied |= dilate(mask, settings.min_gap)
                break
    return tuple(out)


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray | None:
    """The mask moved by (dy, dx) pixels, or None when part of it would leave the image."""
    ys, xs = np.nonzero(mask)
    ys, xs = ys + dy, xs + dx
    H, W = mask.shape
    if ys.min() < 0 or xs.min() < 0 or ys.max() >= H or xs.max() >= W:
        return None
    out = np.zeros_like(mask)
    out[ys, xs] = True
    return out


def swap_objects(sample: SynthSample, i: int, j: int, settings: SynthSettings | None = None) -> SynthSample | None:
    """The same scene with objects ``i`` and ``j`` (answer order) moved to each other's places.

    Each object keeps its colour and shape and is shifted so that its centroid lands
    (rounded to a pixel) on the other's; the vacated pixels are painted the background
    colour (flat, without the background noise). The answer is rebuilt left to right. None
    when the swapped layout is invalid: an object would leave the image, or two objects
    would come closer than ``min_gap`` or ``min_dx`` (such a scene is not in the dataset's
    distribution).
    """
    settings = settings or SynthSettings()
    objs = list(sample.objects)
    if not (0 <= i < len(objs) and 0 <= j < len(objs)) or i == j:
        raise ValueError(f"swap needs two distinct object indices below {len(objs)}, got {i}, {j}")
    a, b = objs[i], objs[j]
    (ax, ay), (bx, by) = a.centroid, b.centroid
    new_a = _shift(a.mask, int(round(by - ay)), int(round(bx - ax)))
    new_b = _shift(b.mask, int(round(ay - by)), int(round(ax - bx)))
    if new_a is None or new_b is None:
        return None
    moved = {i: new_a, j: new_b}
    items = [(o.color, o.shape, moved.get(k, o.mask)) for k, o in enumerate(objs)]
    gap_ok = all(
        not (dilate(m1, settings.min_gap) & m2).any()
        for k1, (_, _, m1) in enumerate(items) for k2, (_, _, m2) in enumerate(items) if k1 < k2
    ) and all(not (dilate(moved[k], settings.min_gap) & u.mask).any() for k in moved for u in sample.unnamed)
    xs = sorted(float(np.nonzero(m)[1].mean()) for _, _, m in items)
    if not gap_ok or any(x2 - x1 < settings.min_dx for x1, x2 in zip(xs, xs[1:])):
        return None
    image = sample.image.copy()
    image[a.mask | b.mask] = settings.background
    for k in (i, j):
        image[moved[k]] = COLORS[objs[k].color]
    items.sort(key=_order_key)
    objects = tuple(SynthObject(c, s, m, _bbox(m)) for c, s, m in items)
    answer = f" {ANSWER_JOIN} ".join(f"{ANSWER_ARTICLE} {o.color} {o.shape}" for o in objects)
    return SynthSample(image=image, objects=objects, prompt=sample.prompt, answer=answer,
                       cue_present=sample.cue_present, cue_mask=sample.cue_mask, unnamed=sample.unnamed)
