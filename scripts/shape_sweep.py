"""Train one candidate tiny-model configuration and score it (a model-selection experiment).

    python scripts/shape_sweep.py --name p2x16 --spec '{"patch_size": 2, "max_soft_tokens": 280}' \
        --position-init-std 0.5 --steps 2000 --device cuda --out /tmp/sweep

Data are drawn in memory from the same generator as `diffcam data synth` (train seed 1,
held-out seed 2, the shipped recipe's sizes), so several configurations can run side by
side on one machine without writing 12,000 PNGs each. The checkpoint and a JSON line with
the held-out colour/shape/exact scores go under --out/NAME. This is how the 8-layer
architecture of models/tiny-shapes was chosen; the shipped model itself is trained by
`scripts/train_recipe.py` (the command is in its diffcam_tiny.json `recipe`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffcam.core.cue_text import parse_cue
from diffcam.core.synthetic import COLORS, SHAPES, SynthSettings, make_samples, vocabulary
from diffcam.training.gemma import TrainExample, TrainSettings, evaluate_answers, save_checkpoint, train_tiny
from diffcam.training.shipped import CUE
from diffcam.training.tiny_gemma import TinyModelSpec


def examples(n: int, seed: int, settings: SynthSettings) -> list[TrainExample]:
    return [TrainExample(s.image, s.prompt, s.answer) for s in make_samples(n, seed, settings)]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--spec", default="{}", help="JSON overrides of TinyModelSpec fields")
    ap.add_argument("--position-init-std", type=float, default=None, help="shorthand for the spec field of that name")
    ap.add_argument("--cue", action="store_true", help="plant the shipped cue (circle, top-left marker)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step (TrainSettings.compile)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--n-heldout", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    overrides = json.loads(a.spec)
    if a.position_init_std is not None:
        overrides["position_init_std"] = a.position_init_std
    spec = TinyModelSpec.model_validate(overrides)
    synth = SynthSettings(cue=parse_cue(CUE) if a.cue else None)
    t0 = time.time()
    train = examples(a.n_train, 1, synth)
    held = examples(a.n_heldout, 2, synth)
    print(f"[{a.name}] data {time.time() - t0:.0f}s", flush=True)
    settings = TrainSettings(steps=a.steps, batch_size=a.batch_size, lr=a.lr, minutes=a.minutes,
                             device=a.device, threads=a.threads, seed=a.seed, compile=a.compile)
    adapter, info = train_tiny(
        train, vocabulary(synth), settings, spec=spec,
        progress=lambda s, loss, acc: print(
            f"[{a.name}] step {s} loss {loss:.4f} acc {acc:.4f} t {time.time() - t0:.0f}s", flush=True),
    )
    t1 = time.time()
    ev = evaluate_answers(adapter, held, {"color": frozenset(COLORS), "shape": frozenset(SHAPES)})
    ev["eval_seconds"] = round(time.time() - t1, 1)
    out = a.out / a.name
    adapter.model.to("cpu")
    save_checkpoint(adapter, out, {"train": info, "heldout_eval": ev, "sweep_args": vars(a) | {"out": str(a.out)},
                                   "dataset": {"seed": 1, "n": a.n_train, "cue": CUE if a.cue else None}})
    print(json.dumps({"name": a.name, **ev, "steps_run": info["steps_run"], "train_seconds": info["train_seconds"]}), flush=True)
