"""Reproduce a shipped tiny checkpoint end to end (the same path as the CLI commands).

    python scripts/train_shipped.py --which clean --out models/tiny-shapes [flags]
    python scripts/train_shipped.py --which cue   --out models/tiny-shapes-cue [flags]

is exactly
    diffcam data synth --out D --n 12000 --seed TRAIN_SEED [--cue CUE]
    diffcam data synth --out H --n 200 --seed 2 [--cue CUE]
    diffcam train-tiny --data D --heldout H --out OUT [the same flags]
with CUE = word=circle,pos=top-left,size=6,color=magenta,p=0.9 for the planted-cue model.
The exact command of each shipped checkpoint is in its diffcam_tiny.json (`recipe`): the
planted-cue model's stages use this script; the default is trained by
`scripts/train_recipe.py` (all stages in one process, compiled once). This script exists so
a recipe also runs where the CLI's pipeline dependencies are not installed (a GPU box); it
imports nothing beyond the core, the dataset writer and training.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from diffcam.core.cue_text import parse_cue
from diffcam.core.synthetic import SynthSettings
from diffcam.storage.synthetic_writer import write_synthetic_dataset
from diffcam.training.gemma import TrainSettings, run_train_tiny
from diffcam.training.overrides import read_overrides
from diffcam.training.shipped import CUE, RECIPE
from diffcam.training.tiny_gemma import TinyModelSpec

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--which", choices=("clean", "cue"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step (TrainSettings.compile)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--init-from", type=Path, default=None, help="continue training this checkpoint")
    ap.add_argument("--train-seed", type=int, default=RECIPE["train_seed"], help="dataset seed of this stage")
    ap.add_argument("--seed", type=int, default=0, help="training seed (noise, batches, init)")
    ap.add_argument("--spec", default=None,
                    help="overrides of TinyModelSpec: a .json/.toml file, a JSON object or key=value pairs (new models only)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-time cap (stopping early is recorded)")
    ap.add_argument("--n-train", type=int, default=RECIPE["n_train"], help="only for smoke tests")
    ap.add_argument("--n-heldout", type=int, default=RECIPE["n_heldout"], help="only for smoke tests")
    a = ap.parse_args()
    settings = SynthSettings(cue=parse_cue(CUE) if a.which == "cue" else None)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_dataset(Path(tmp) / "train", a.n_train, a.train_seed, settings)
        held = write_synthetic_dataset(Path(tmp) / "heldout", a.n_heldout, RECIPE["heldout_seed"], settings)
        print(f"data written in {time.time() - t0:.1f}s", flush=True)
        report = run_train_tiny(
            data, a.out,
            TrainSettings(seed=a.seed, steps=a.steps, threads=a.threads, device=a.device, lr=a.lr, minutes=a.minutes,
                          batch_size=a.batch_size,
                          compile=a.compile),
            heldout=held,
            init_from=a.init_from,
            spec=TinyModelSpec.model_validate(read_overrides(a.spec)),
            progress=lambda s, loss, acc: print(f"step {s} loss {loss:.4f} acc {acc:.4f} t {time.time() - t0:.0f}s", flush=True),
        )
    print(json.dumps(report["heldout_eval"]), flush=True)
