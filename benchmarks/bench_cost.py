"""What explaining an answer costs next to producing it, per model family.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cost.py [--n 40] [--model DIR ...] [--methods M,...] [--json FILE]

For each model (default: both shipped tiny models, one per family) and each of N held-out
synthetic images (seed 2): `prepare` + `generate` (one generation, timed), then
`cam.attribute` for every word of the answer with the default settings (one prefix/decoder
pass with gradients per canvas the methods read, batched backward; timed). Images are
processed in the same order for both timings, alternating nothing: the two numbers of a
sample are measured back to back, so a load change on a shared machine hits both.

The default method set is the audit's: Diffusion-CAM and its baselines. The baselines read
the final canvas with the plain target score, Diffusion-CAM the commit-step canvas with the
contrastive score, so each word takes two cotangents through the backward.
`--methods diffusion-cam` times the method alone.

Printed per model: median generation and attribution seconds, the ratio of the medians
(target: attribution of all words <= 3x one generation), the ratio of the sums, words
per answer, denoising steps, and distinct attribution canvases per answer (what the
attribution pass has to decode). One torch thread (`--threads`).

Measured 3 Dec 2026 (40 images, 1 thread, two runs, a `bench method` run on the other core):
default set, `tiny-shapes` 3.33-3.49x (sums 3.47-3.51x), `tiny-llada-shapes` 1.05-1.24x
(sums 1.26-1.29x); `--methods diffusion-cam`, `tiny-shapes` 1.97-2.24x (sums 2.16-2.18x),
`tiny-llada-shapes` 0.73-0.79x. The canvas count is the default set's (commit steps + final).

Tried and measured slower (3 Dec 2026, `tiny-shapes`, 3 x 20 images interleaved in one
process, 1 thread, the other core busy with a training run): decoding each canvas on its
own view of the prefix cache and back-propagating in two stages (each canvas's scores to
its cache view, then all rows through the prefix pass), so that no word's cotangent runs
through another canvas's decoder rows. Same maps (largest relative difference 1e-5), but
the ratio of sums went from 3.74x to 4.00x: the backward saved less than the unbatched
decoder passes cost. Swapping the MoE experts' kernel (`eager`, `batched_mm` instead of
`grouped_mm`) did not help either (`batched_mm`: 6.9-7.4x).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch
from PIL import Image

from diffcam.core.cam import attribute
from diffcam.core.models.base import load_adapter
from diffcam.core.settings import CamSettings
from diffcam.core.synthetic import SynthSettings, make_samples

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = (ROOT / "models" / "tiny-shapes", ROOT / "models" / "tiny-llada-shapes")


def measure(model: Path, n: int, seed: int = 2, methods: tuple[str, ...] | None = None) -> dict:
    adapter = load_adapter(model)
    settings = CamSettings() if methods is None else CamSettings(methods=methods)
    t_gen, t_att, n_words, n_steps, n_canvases = [], [], [], [], []
    for i, s in enumerate(make_samples(n, seed, SynthSettings())):
        t0 = time.perf_counter()
        inputs = adapter.prepare(Image.fromarray(s.image), s.prompt)
        gen = adapter.generate(inputs, settings.generation.model_copy(update={"seed": settings.generation.seed + i}))
        t1 = time.perf_counter()
        attribute(adapter, inputs, gen, settings)
        t2 = time.perf_counter()
        t_gen.append(t1 - t0)
        t_att.append(t2 - t1)
        n_words.append(len(gen.words))
        n_steps.append(gen.n_steps)
        n_canvases.append(len({w.commit_step for w in gen.words}) + (1 if gen.words else 0))  # commit steps + final
    return {
        "model": str(model), "family": adapter.family, "methods": list(settings.methods),
        "n": n, "generate_s_median": median(t_gen), "attribute_s_median": median(t_att),
        "ratio_of_medians": median(t_att) / median(t_gen), "ratio_of_sums": sum(t_att) / sum(t_gen),
        "words_mean": float(np.mean(n_words)), "steps_mean": float(np.mean(n_steps)),
        "canvases_mean": float(np.mean(n_canvases)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="held-out images per model (default 40)")
    ap.add_argument("--model", type=Path, action="append", default=None,
                    help="checkpoint folder, repeatable (default: both shipped tiny models)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=None,
                    help="comma-separated map methods to time (default: CamSettings' default set, the "
                         "audit's: Diffusion-CAM with its baselines); e.g. diffusion-cam for the method alone")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    methods = None if a.methods is None else tuple(m.strip() for m in a.methods.split(",") if m.strip())
    if methods is not None:
        try:
            CamSettings(methods=methods)
        except ValueError as e:  # pydantic's ValidationError lists the registered names
            ap.error(str(e))
    torch.set_num_threads(a.threads)
    out = []
    for model in a.model or DEFAULT_MODELS:
        r = measure(model, a.n, methods=methods)
        out.append(r)
        print(f"{Path(r['model']).name}: generation {r['generate_s_median']:.4f} s, attribution of all words "
              f"{r['attribute_s_median']:.4f} s (medians) -> {r['ratio_of_medians']:.2f}x "
              f"(sums {r['ratio_of_sums']:.2f}x); {r['words_mean']:.1f} words, {r['steps_mean']:.1f} steps, "
              f"{r['canvases_mean']:.1f} canvases per answer", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
