"""How much does a model's answer depend on the planted cue? Prints one JSON line per model.

    python benchmarks/cue_dependence.py models/tiny-shapes-cue models/tiny-shapes [--n 200 --seed 2]

The counting (erase, paste, control) is `diffcam.evaluation.cue_dependence`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffcam.core.cue_text import parse_cue
from diffcam.core.models.base import load_adapter
from diffcam.core.synthetic import SynthSettings, make_samples
from diffcam.evaluation.cue_dependence import cue_dependence
from diffcam.training.gemma import training_seeds
from diffcam.training.shipped import CUE as DEFAULT_CUE


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
    settings = SynthSettings(cue=parse_cue(a.cue))
    samples = list(make_samples(a.n, a.seed, settings))
    for m in a.models:
        print(json.dumps({"model": str(m), **cue_dependence(load_adapter(m), samples, settings, a.seed)}), flush=True)


if __name__ == "__main__":
    main()
