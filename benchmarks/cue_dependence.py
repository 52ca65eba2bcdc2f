"""How much does a model's answer depend on the planted cue? (ground truth for bias checks)

    python benchmarks/cue_dependence.py models/tiny-shapes-cue models/tiny-shapes [--n 200 --seed 2]

On held-out synthetic images drawn with the cue spec, two interventions, no saliency map:
- *erase*: every image that carries the marker, and whose answer says the cue word, gets the
  marker painted over with the background colour; count the answers that lose the word;
- *paste*: every image without the cue word in its reference answer, whose answer does not
  say it either, gets the marker painted in; count the answers that gain it.
A model that learned the shortcut loses and gains the word often; one that reads the object
does neither. This is what the bias audit's flags should agree with (docs/BIAS.md), and how
a candidate planted-cue checkpoint is checked before it replaces `models/tiny-shapes-cue`.
Generation is seeded (GenerationSettings(seed=0)), so the counts are deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffcam_core.models.base import load_adapter  # noqa: E402
from diffcam_core.settings import GenerationSettings  # noqa: E402
from diffcam_core.synthetic import CueSpec, SynthSettings, cue_region, make_samples  # noqa: E402
from benchmarks.bench_bias import DEFAULT_CUE  # noqa: E402  (the shipped cue, one definition)
from tasks.train_tiny import training_seeds  # noqa: E402


def cue_dependence(adapter, samples, settings: SynthSettings) -> dict[str, int | float]:
    """Counts of the word vanishing when the marker is erased and appearing when it is pasted.

    Each count is over the samples where the change is possible: the original answer says
    the word (erase) or does not (paste).
    """
    from PIL import Image

    cue = settings.cue
    x0, y0, x1, y1 = cue_region(settings)
    background = np.asarray(settings.background, dtype=np.uint8)

    def says_word(image: np.ndarray, prompt: str) -> bool:
        gen = adapter.generate(adapter.prepare(Image.fromarray(image), prompt), GenerationSettings(seed=0))
        return cue.word in gen.text.split()

    vanished = n_erased = appeared = n_pasted = 0
    for s in samples:
        carries = s.cue_present
        if not carries and cue.word in s.answer.split():
            continue  # the word is there without the marker: neither intervention applies
        if says_word(s.image, s.prompt) != carries:
            continue  # only answers that say the word with the marker and not without it can change
        image = s.image.copy()
        if carries:
            image[y0:y1, x0:x1] = background
            n_erased += 1
            vanished += not says_word(image, s.prompt)
        else:
            image[y0:y1, x0:x1] = cue.rgb
            n_pasted += 1
            appeared += says_word(image, s.prompt)
    return {
        "erased": n_erased, "vanished": vanished, "vanish_rate": vanished / n_erased if n_erased else None,
        "pasted": n_pasted, "appeared": appeared, "appear_rate": appeared / n_pasted if n_pasted else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="checkpoint folders")
    ap.add_argument("--n", type=int, default=200, help="held-out images drawn (default 200)")
    ap.add_argument("--seed", type=int, default=2, help="held-out data seed (default 2); refused if a model trained on it")
    ap.add_argument("--cue", default=DEFAULT_CUE, help=f"cue spec (default {DEFAULT_CUE})")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    for m in a.models:
        if a.seed in training_seeds(m):
            ap.error(f"{m} was trained on synthetic seed {a.seed}: pick another --seed")
    settings = SynthSettings(cue=CueSpec.parse(a.cue))
    samples = list(make_samples(a.n, a.seed, settings))
    for m in a.models:
        print(json.dumps({"model": str(m), **cue_dependence(load_adapter(m), samples, settings)}), flush=True)


if __name__ == "__main__":
    main()
