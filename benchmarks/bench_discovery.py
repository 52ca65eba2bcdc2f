"""Saliency-free discovery scan on the planted-cue model vs the clean one, with its cost.

    .venv/bin/python benchmarks/bench_discovery.py [--n 40] [--seed 2] [--word circle] [--win 1]
        [--planted models/tiny-shapes-cue] [--clean models/tiny-shapes] [--cue SPEC] [--json FILE]

For each model: generate answers for ``n`` held-out images that carry the shipped cue
(seed 2, the cue spec of `benchmarks/bench_bias.py`); for every image whose answer has the
word, erase each window of ``win``×``win`` grid cells in turn and re-score the word on its
attribution canvas (`diffcam.core.bias.discovery.window_scan`, one batched pass per image).
Prints the off-object windows whose removal drops the word's log-probability by more
than 1 nat in at least half of the images, whether the cue's cell is among them, and the
cost per 1,000 scanned images (generation excluded: the audit already has it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffcam.core.bias.discovery import summarise_scans, window_scan
from diffcam.core.cam import attribution_canvas
from diffcam.core.cue_text import parse_cue
from diffcam.core.evidence import mask_on_grid
from diffcam.core.faithfulness import adapter_scorer
from diffcam.core.models.base import load_adapter
from diffcam.core.settings import CamSettings
from diffcam.core.synthetic import SynthSettings, cue_region, make_samples
from diffcam.training.shipped import CUE as DEFAULT_CUE

REPO = Path(__file__).resolve().parents[1]


def scan_model(model: Path, n: int, seed: int, word: str, win: int, ss: SynthSettings) -> dict:
    adapter = load_adapter(model)
    settings = CamSettings()
    drops, covers, t_scan, cue_ids = [], [], 0.0, []
    grid = None
    for s in make_samples(n, seed, ss):
        inputs = adapter.prepare(Image.fromarray(s.image), s.prompt)
        gen = adapter.generate(inputs, settings.generation)
        hits = [w for w in gen.words if w.text == word]
        if not hits:
            continue
        w = hits[0]
        grid = adapter.image_span(inputs).grid
        canvas, cond = attribution_canvas(gen, w, settings.attribution_step)
        score, _ = adapter_scorer(adapter, s.prompt, canvas, cond, w)
        t0 = time.perf_counter()
        drops.append(window_scan(s.image, grid, (win, win), score))
        t_scan += time.perf_counter() - t0
        objs = [o.mask for o in s.objects if word in (o.color, o.shape)]
        cover = mask_on_grid(np.logical_or.reduce(objs), grid) if objs else np.zeros(grid)
        covers.append(cover)
        cue_ids.append(bool(s.cue_present))
    if not drops:
        return {"model": str(model), "n_scanned": 0}
    res = summarise_scans(drops, covers, (win, win))
    x0, y0, x1, y1 = cue_region(ss)
    H = ss.image_size
    cue_cell = (int(y0 * grid[0] // H), int(x0 * grid[1] // H))
    cands = res.candidates()
    return {"model": str(model), "n_scanned": res.n_images, "n_with_cue": int(sum(cue_ids)),
            "candidates": [{"window": [r, c], "mean_drop": d, "hit_rate": h} for r, c, d, h in cands],
            "cue_cell": list(cue_cell), "cue_found": any((r, c) == cue_cell for r, c, _, _ in cands),
            "cue_cell_mean_drop": float(res.mean_drop[cue_cell]), "cue_cell_hit_rate": float(res.hit_rate[cue_cell]),
            "scan_s": t_scan, "s_per_1000_images": 1000 * t_scan / res.n_images,
            "windows_per_image": int(res.mean_drop.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--word", default="circle")
    ap.add_argument("--win", type=int, default=1)
    ap.add_argument("--planted", type=Path, default=REPO / "models" / "tiny-shapes-cue")
    ap.add_argument("--clean", type=Path, default=REPO / "models" / "tiny-shapes")
    ap.add_argument("--cue", default=DEFAULT_CUE)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    ss = SynthSettings(cue=parse_cue(a.cue))
    out = {"n": a.n, "seed": a.seed, "word": a.word, "win": a.win, "cue": a.cue, "models": {}}
    for name, model in (("planted", a.planted), ("clean", a.clean)):
        r = scan_model(model, a.n, a.seed, a.word, a.win, ss)
        out["models"][name] = r
        print(f"{name} ({model}): {r.get('n_scanned')} images scanned ({r.get('n_with_cue')} with the cue); "
              f"off-object windows that drop '{a.word}' by > 1 nat in >= half the images: {r.get('candidates')}; "
              f"cue cell {r.get('cue_cell')} found: {r.get('cue_found')} (mean drop {r.get('cue_cell_mean_drop')}, "
              f"hit rate {r.get('cue_cell_hit_rate')}); {r.get('s_per_1000_images', 0):.1f} s per 1,000 images "
              f"({r.get('windows_per_image')} windows each)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
