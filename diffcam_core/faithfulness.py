"""Faithfulness: does removing what a map ranks first change what the model says?

A map can sit on the right object and still not be what the model *used*. These measures
perturb the image in the order a map ranks its grid cells and watch the word
(docs/EVALUATION.md):

- **deletion**: replace the top-ranked cells (a growing share f of all cells) with the
  image's background colour and re-score the word's log-probability on its attribution
  canvas. A faithful map makes the score fall fast: low area under the curve.
- **insertion**: start from a blank image (every cell background) and put the top-ranked
  cells back. A faithful map makes the score rise fast: high area under the curve.
- **vanish rate**: remove the top `vanish_fraction` of cells, regenerate the whole answer,
  and see whether the word is still said.

Curves are normalised per word between the blank image (0) and the intact image (1),
clipped to [0, 1]; the areas are trapezoids over f in [0, 1]. A word whose score barely
depends on the image (|intact − blank| < `min_gap` nats) carries no information about any
map's faithfulness and is left out of the areas (counted as `uninformative`).

Cell ranking breaks ties with a seeded random order, so a map with large flat regions (a
mask, a zero map) is not favoured by the row-major order of its cells.

The pure core (`rank_cells`, `perturbed`, `word_faithfulness`) takes the model as two
callables, so it can be tested on a scripted model; `adapter_scorer` builds them from an
adapter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from diffcam.core.evidence import background_colour, cell_boxes
from diffcam.core.metrics import validate_map

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_VANISH_FRACTION",
    "MIN_GAP_NATS",
    "FaithfulnessResult",
    "rank_cells",
    "cell_count",
    "perturbed",
    "normalised_curve",
    "curve_auc",
    "word_faithfulness",
    "adapter_scorer",
    "selected_for_faithfulness",
]

#: Shares of the grid's cells removed (deletion) or restored (insertion) along a curve.
#: Denser at the start, where a faithful map makes its difference.
DEFAULT_FRACTIONS: tuple[float, ...] = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
#: Share of cells removed before regenerating for the vanish rate (8 of 64 cells on an 8×8
#: grid: about one object of the synthetic set). It is a point of the deletion curve, so
#: its image is shared.
DEFAULT_VANISH_FRACTION = 1 / 8
#: Below this |log p(intact) − log p(blank)| the word does not depend on the image.
MIN_GAP_NATS = 0.5


@dataclass(frozen=True)
class FaithfulnessResult:
    """One word × one map. AUCs are None when the word is uninformative (see module doc)."""

    deletion_auc: float | None
    insertion_auc: float | None
    vanished: bool | None
    deletion_curve: tuple[float, ...] = field(default=())
    insertion_curve: tuple[float, ...] = field(default=())
    informative: bool = True


def rank_cells(map: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat cell indices, highest value first; ties in a random (seeded) order."""
    a = validate_map(map)
    tiebreak = rng.permutation(a.size)
    return np.lexsort((tiebreak, -a.ravel()))


def cell_count(n_cells: int, fraction: float) -> int:
    """How many cells a share of the grid is: round half up, within [0, n_cells]."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return int(min(n_cells, max(0, np.floor(fraction * n_cells + 0.5))))


def perturbed(image: np.ndarray, cells: np.ndarray, grid: tuple[int, int], fill: np.ndarray,
              keep: bool = False) -> np.ndarray:
    """A copy of ``image`` with the listed flat cell indices painted ``fill`` (``keep=False``),
    or with every *other* cell painted (``keep=True``: insertion)."""
    img = np.asarray(image)
    rows, cols = cell_boxes(img.shape[:2], grid)
    w = int(grid[1])
    sel = np.zeros(int(grid[0]) * w, dtype=bool)
    sel[np.asarray(cells, dtype=int)] = True
    if keep:
        sel = ~sel
    out = img.copy()
    fill_px = np.round(np.asarray(fill, dtype=np.float64)).astype(img.dtype)
    if img.ndim == 2:
        fill_px = fill_px.reshape(-1)[0]
    for k in np.nonzero(sel)[0]:
        i, j = divmod(int(k), w)
        out[rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = fill_px
    return out


def normalised_curve(scores: Sequence[float], intact: float, blank: float) -> np.ndarray:
    """(s − blank) / (intact − blank), clipped to [0, 1]; needs intact ≠ blank."""
    gap = float(intact) - float(blank)
    if gap == 0.0:
        raise ValueError("intact and blank scores are equal: the curve cannot be normalised")
    return np.clip((np.asarray(scores, dtype=np.float64) - float(blank)) / gap, 0.0, 1.0)


def curve_auc(fractions: Sequence[float], values: Sequence[float] | np.ndarray) -> float:
    """Trapezoid area under ``values`` over ``fractions`` (which must run from 0 to 1)."""
    f = np.asarray(fractions, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if f.shape != v.shape or f.size < 2 or f[0] != 0.0 or f[-1] != 1.0 or np.any(np.diff(f) <= 0):
        raise ValueError(f"fractions must increase from 0 to 1 and match the values, got {f.tolist()}")
    return float(np.sum(np.diff(f) * (v[1:] + v[:-1]) / 2.0))


def _seed(seed: int, *parts: str) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def word_faithfulness(
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    score_images: Callable[[list[np.ndarray]], np.ndarray],
    still_said: Callable[[np.ndarray], bool] | None,
    *,
    word_key: str = "",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    vanish_fraction: float | None = DEFAULT_VANISH_FRACTION,
    min_gap: float = MIN_GAP_NATS,
    seed: int = 0,
) -> dict[str, FaithfulnessResult]:
    """Deletion/insertion AUC and vanish for one word under each of ``maps`` (same grid).

    ``score_images(images)`` returns the word's log-probability for each image, in one
    batched call (the intact and blank images and every curve point of every map go in
    together). ``still_said(image)`` regenerates and says whether the word is still in the
    answer; None skips the vanish test. ``word_key`` names the word in the tie-break seed.
    """
    if not maps:
        return {}
    fr = [float(f) for f in fractions]
    if fr[0] != 0.0 or fr[-1] != 1.0 or any(b <= a for a, b in zip(fr, fr[1:])):
        raise ValueError(f"fractions must increase from 0 to 1, got {fr}")
    if vanish_fraction is not None and not any(abs(vanish_fraction - f) < 1e-12 for f in fr[1:-1]):
        raise ValueError(f"vanish_fraction {vanish_fraction} must be an inner point of {fr} (its image is shared)")
    img = np.asarray(image)
    grids = {np.asarray(m).shape for m in maps.values()}
    if len(grids) != 1:
        raise ValueError(f"maps must share one grid, got {sorted(grids)}")
    grid = grids.pop()
    n_cells = grid[0] * grid[1]
    fill = background_colour(img)
    blank = perturbed(img, np.arange(n_cells), grid, fill)
    inner = fr[1:-1]
    counts = [cell_count(n_cells, f) for f in inner]

    batch: list[np.ndarray] = [img, blank]
    layout: dict[str, tuple[int, int, np.ndarray]] = {}
    for method, m in maps.items():
        order = rank_cells(m, _seed(seed, word_key, method))
        start = len(batch)
        batch += [perturbed(img, order[:k], grid, fill) for k in counts]
        batch += [perturbed(img, order[:k], grid, fill, keep=True) for k in counts]
        layout[method] = (start, len(counts), order)
    scores = np.asarray(score_images(batch), dtype=np.float64)
    if scores.shape != (len(batch),):
        raise ValueError(f"score_images returned shape {scores.shape} for {len(batch)} images")
    intact, empty = float(scores[0]), float(scores[1])
    informative = abs(intact - empty) >= min_gap

    said_cache: dict[bytes, bool] = {}
    out: dict[str, FaithfulnessResult] = {}
    for method, (start, n, _order) in layout.items():
        dele = [intact, *scores[start:start + n], empty]
        ins = [empty, *scores[start + n:start + 2 * n], intact]
        vanished = None
        if still_said is not None and vanish_fraction is not None:
            k = inner.index(next(f for f in inner if abs(f - vanish_fraction) < 1e-12))
            vimg = batch[start + k]
            key = hashlib.sha256(vimg.tobytes()).digest()
            if key not in said_cache:
                said_cache[key] = bool(still_said(vimg))
            vanished = not said_cache[key]
        if informative:
            dc, ic = normalised_curve(dele, intact, empty), normalised_curve(ins, intact, empty)
            out[method] = FaithfulnessResult(curve_auc(fr, dc), curve_auc(fr, ic), vanished,
                                             tuple(dc.tolist()), tuple(ic.tolist()), True)
        else:
            out[method] = FaithfulnessResult(None, None, vanished, informative=False)
    return out


def adapter_scorer(adapter, prompt: str, canvas, self_cond, word, settings=None, batch_size: int = 64,
                   cache: dict | None = None, canvas_key: str = ""):
    """(score_images, still_said) for one word of a generation, built on a model adapter.

    ``score_images`` re-runs the prefix pass on each image and scores ``word`` (its
    generated token ids at its canvas positions, summed log-probabilities) on the given
    attribution canvas; ``still_said`` regenerates the answer with ``settings`` (a
    `GenerationSettings`) and checks whether the word's text is among its words.

    ``cache``: one dict shared by the words of a sample. The log-probabilities of an image
    on a canvas (``canvas_key`` names it) and the regenerated answer of an image do not
    depend on the word, so images that several words share (intact, blank, the objectness
    map's perturbations) run once.
    """
    import torch
    from PIL import Image

    positions, token_ids = list(word.positions), list(word.token_ids)
    cache = {} if cache is None else cache

    def key(kind: str, image: np.ndarray) -> tuple[str, str, bytes]:
        return (kind, canvas_key if kind == "lp" else "", hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest())

    def score_images(images: list[np.ndarray]) -> np.ndarray:
        keys = [key("lp", im) for im in images]
        todo = list(dict.fromkeys(k for k in keys if k not in cache))
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            pil = [Image.fromarray(np.asarray(images[first[k]])) for k in chunk]
            lp = adapter.canvas_log_probs(pil, prompt, canvas, self_cond)
            for k, row in zip(chunk, lp):
                cache[k] = row
        return np.array([float(cache[k][positions, token_ids].sum()) for k in keys])

    def still_said(image: np.ndarray) -> bool:
        k = key("answer", image)
        if k not in cache:
            with torch.no_grad():
                inputs = adapter.prepare(Image.fromarray(np.asarray(image)), prompt)
                cache[k] = {w.text for w in adapter.generate(inputs, settings).words}
        return word.text in cache[k]

    return score_images, (still_said if settings is not None else None)


def selected_for_faithfulness(sample_id: str, fraction: float) -> bool:
    """Whether an audit measures faithfulness on this sample: a hash of its id below
    ``fraction``, so every run (and every resume) picks the same samples."""
    if fraction <= 0.0:
        return False
    h = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2.0**64
    return h < fraction
