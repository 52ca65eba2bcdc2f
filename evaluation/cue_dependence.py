"""How much does a model's answer depend on the planted cue? (ground truth for bias checks)

Command line: `benchmarks/cue_dependence.py`.

On held-out synthetic images drawn with the cue spec, two interventions, no saliency map:
- *erase*: every image that carries the marker, and whose answer says the cue word, gets the
  marker painted over with the background colour; count the answers that lose the word;
- *paste*: every image without the cue word in its reference answer, whose answer does not
  say it either, gets the marker painted in; count the answers that gain it;
- *control*: every image of the erase test also gets, instead, a patch of the same size
  painted flat background at a seeded free spot (clear of the objects and the marker);
  count the answers that lose the word there. It measures how often the answer changes
  under *any* such edit, so reliance is read net of it (`net_vanish_rate`).
A model that learned the shortcut loses and gains the word often, and keeps it under the
control; one that reads the object does neither. This is what the bias audit's flags should agree with (docs/BIAS.md), and how
a candidate planted-cue checkpoint is checked before it replaces `models/tiny-shapes-cue`.
Generation is seeded (GenerationSettings(seed=0)), so the counts are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from diffcam.core.settings import GenerationSettings
from diffcam.core.synthetic import SynthSample, SynthSettings, cue_region

#: Salt of the per-sample generator that places the control patch.
CONTROL_SALT = 3


def free_box(sample: SynthSample, size: int, settings: SynthSettings, rng: np.random.Generator,
             avoid: np.ndarray | None = None) -> tuple[int, int, int, int] | None:
    """A random size×size box clear of every object and of `avoid` (by ``min_gap``), and
    ``cue_margin`` from the edges; None when there is no room. Places markers whose position
    varies per image, and control patches."""
    from diffcam.core.inpaint import dilate

    n, m = settings.image_size, settings.cue_margin
    taken = np.zeros((n, n), dtype=bool)
    for o in (*sample.objects, *sample.unnamed):
        taken |= o.mask
    if avoid is not None:
        taken |= avoid
    taken = dilate(taken, settings.min_gap + 1)
    # a box at (x, y) is free iff the summed-area table says it holds no taken pixel
    sat = np.pad(taken.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ys, xs = np.mgrid[m:n - m - size + 1, m:n - m - size + 1]
    inside = sat[ys + size, xs + size] - sat[ys, xs + size] - sat[ys + size, xs] + sat[ys, xs]
    free = np.argwhere(inside == 0)
    if len(free) == 0:
        return None
    y, x = free[int(rng.integers(len(free)))]
    x0, y0 = int(xs[y, x]), int(ys[y, x])
    return (x0, y0, x0 + size, y0 + size)


def control_image(sample: SynthSample, marker: np.ndarray, settings: SynthSettings, seed: int, index: int
                  ) -> np.ndarray | None:
    """The sample's image with a flat background patch the size of the marker's bounding box
    at a seeded free spot, or None when there is no room."""
    ys, xs = np.nonzero(marker)
    size = int(max(ys.max() - ys.min(), xs.max() - xs.min())) + 1
    box = free_box(sample, size, settings, np.random.default_rng(np.random.SeedSequence([seed, index, CONTROL_SALT])),
                   avoid=marker)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    image = sample.image.copy()
    image[y0:y1, x0:x1] = np.asarray(settings.background, dtype=np.uint8)
    return image


def rates(counts: dict[str, int]) -> dict[str, int | float | None]:
    """The counts plus their rates, and the vanish rate net of the control's."""
    def rate(k: str, n: str) -> float | None:
        return counts[k] / counts[n] if counts[n] else None

    out: dict[str, int | float | None] = {**counts, "vanish_rate": rate("vanished", "erased"),
                                          "appear_rate": rate("appeared", "pasted"),
                                          "control_vanish_rate": rate("control_vanished", "controlled")}
    v, c = out["vanish_rate"], out["control_vanish_rate"]
    out["net_vanish_rate"] = None if v is None or c is None else v - c
    return out


def count_dependence(says: Callable[[np.ndarray, str], str], samples: Sequence[SynthSample], word: str, *,
                     erase: Callable[[int, SynthSample], np.ndarray],
                     paste: Callable[[int, SynthSample], np.ndarray | None],
                     control: Callable[[int, SynthSample], np.ndarray | None]) -> dict[str, int | float | None]:
    """The one counting loop behind every reliance measurement (fixed or per-image marker).

    Each count is over the samples where the change is possible: the original answer says
    the word with the marker (erase, control) or does not say it without (paste); a sample
    whose answer already disagrees with its marker cannot change and is skipped. ``erase``
    gives the image without the marker, ``paste`` with one added (None: nowhere to put it),
    ``control`` with a patch of the same size erased elsewhere (None: no free spot)."""
    def says_word(image: np.ndarray, prompt: str) -> bool:
        return word in says(image, prompt).split()

    vanished = n_erased = appeared = n_pasted = control_vanished = n_controlled = 0
    for i, s in enumerate(samples):
        carries = s.cue_present
        if not carries and word in s.answer.split():
            continue  # the word is there without the marker: neither intervention applies
        if says_word(s.image, s.prompt) != carries:
            continue  # only answers that say the word with the marker and not without it can change
        if carries:
            n_erased += 1
            vanished += not says_word(erase(i, s), s.prompt)
            patched = control(i, s)
            if patched is not None:
                n_controlled += 1
                control_vanished += not says_word(patched, s.prompt)
        else:
            pasted = paste(i, s)
            if pasted is None:
                continue
            n_pasted += 1
            appeared += says_word(pasted, s.prompt)
    return rates({"erased": n_erased, "vanished": vanished, "pasted": n_pasted, "appeared": appeared,
                  "controlled": n_controlled, "control_vanished": control_vanished})


def generated_text(adapter) -> Callable[[np.ndarray, str], str]:
    """The model's answer to an image (greedy, seed 0): what the counts are measured on."""
    from PIL import Image

    def says(image: np.ndarray, prompt: str) -> str:
        return adapter.generate(adapter.prepare(Image.fromarray(image), prompt), GenerationSettings(seed=0)).text

    return says


def cue_dependence(adapter, samples, settings: SynthSettings, seed: int = 0) -> dict[str, int | float | None]:
    """Counts of the word vanishing when the fixed marker is erased (and under the control
    patch) and appearing when it is pasted (`count_dependence`). `seed` places the control
    patches."""
    cue = settings.cue
    x0, y0, x1, y1 = cue_region(settings)
    background = np.asarray(settings.background, dtype=np.uint8)
    marker = np.zeros((settings.image_size, settings.image_size), dtype=bool)
    marker[y0:y1, x0:x1] = True

    def painted(s: SynthSample, rgb) -> np.ndarray:
        image = s.image.copy()
        image[marker] = rgb
        return image

    return count_dependence(generated_text(adapter), samples, cue.word,
                            erase=lambda i, s: painted(s, background), paste=lambda i, s: painted(s, cue.rgb),
                            control=lambda i, s: control_image(s, marker, settings, seed, i))
