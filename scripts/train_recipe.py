"""Train a tiny model through a multi-stage recipe in one process (fresh data per stage).

    python scripts/train_recipe.py --which clean --out models/tiny-shapes \
        --spec '{"text_layers": 8, "position_init_std": 0.5}' \
        --stage 3000:2e-3:1:0 --stage 1100:1e-3:3:1 --stage 1100:7e-4:7:1 --threads 2 --compile

is the shipped default's recipe (58 minutes on a 2-core CPU; set TORCHINDUCTOR_CACHE_DIR to an
empty folder to time a cold compile).

Each `--stage STEPS:LR:TRAIN_SEED[:SEED]` trains on the samples `diffcam data synth --seed
TRAIN_SEED --n N_TRAIN` would write, continuing the previous stage's model in memory; every
stage is scored on the held-out set (seed 2, 200 images). The same as running one
`diffcam train-tiny --init-from PREVIOUS` per stage, except that nothing is written between
stages and, with `--compile`, the training step is compiled once for all of them (a
compile costs minutes on this CPU). The checkpoint's `diffcam_tiny.json` chains the stages'
records and holds `recipe_run` (stages, wall seconds of the whole run, threads, compile).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffcam.core.cue_text import parse_cue
from diffcam.core.synthetic import SynthSettings
from diffcam.training.gemma import Stage, TrainSettings, _stage_records, run_train_stages
from diffcam.training.overrides import read_overrides
from diffcam.training.shipped import CUE, RECIPE
from diffcam.training.tiny_gemma import TinyModelSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", choices=("clean", "cue"), required=True, help="cue: plant the shipped cue " + CUE)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stage", action="append", required=True, metavar="STEPS:LR:TRAIN_SEED[:SEED]")
    ap.add_argument("--spec", default="{}", help="JSON overrides of TinyModelSpec for the new model")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step (compiled once)")
    ap.add_argument("--stage-dir", type=Path, default=None, help="also keep each earlier stage's checkpoint here")
    ap.add_argument("--n-train", type=int, default=RECIPE["n_train"], help="images per stage")
    ap.add_argument("--n-heldout", type=int, default=RECIPE["n_heldout"])
    a = ap.parse_args()
    try:
        stages = [Stage.parse(s) for s in a.stage]
        spec = TinyModelSpec.model_validate(read_overrides(a.spec))
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        ap.error(str(e))
    synth = SynthSettings(cue=parse_cue(CUE) if a.which == "cue" else None)
    base = TrainSettings(batch_size=a.batch_size, threads=a.threads, device=a.device, compile=a.compile)
    t0 = time.time()
    report = run_train_stages(
        stages, a.out, synth, base, spec=spec, n_train=a.n_train, heldout_seed=RECIPE["heldout_seed"],
        n_heldout=a.n_heldout, stage_dir=a.stage_dir,
        progress=lambda k, s, loss, acc: print(
            f"stage {k} step {s} loss {loss:.4f} acc {acc:.4f} t {time.time() - t0:.0f}s", flush=True),
    )
    for k, record in enumerate(reversed(list(_stage_records(a.out))), start=1):
        print(f"stage {k}: " + json.dumps(record["heldout_eval"]), flush=True)
    print(f"recipe wall time {report['recipe_run']['wall_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
