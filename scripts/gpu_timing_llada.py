"""What one sample costs on a real-size LLaDA-V: random weights in the published 8B layout (GPU check).

    python scripts/gpu_timing_llada.py --device cuda --json out.json            # the 8B layout, bf16
    python scripts/gpu_timing_llada.py --size tiny --device cpu --dtype float32  # the same code path, seconds

`llada-v-8b` is the layout of the released LLaDA-V checkpoint, built from transformers' own
modules through `LladaVModel` (the class real checkpoints load into):
- language model (LLaDA-8B): hidden 4096, 32 layers, 32 attention heads and 32 key/value
  heads, MLP 12288, vocabulary 126,464, RoPE theta 500,000, full (bidirectional) attention;
- vision tower (SigLIP so400m, patch 14, 384 px, its last layer dropped as LLaVA-OneVision
  does): hidden 1152, 26 layers, 16 heads, MLP 4304, so a 384x384 image is 27x27 = 729
  image tokens;
- projector `mlp2x_gelu` (1152 -> 4096 -> 4096).
About 8.4 B parameters, 17 GB in bf16. The weights are random (built directly on the device
in the chosen dtype, no download): the numbers are costs, not quality. The tokenizer is a
word-level one of the same vocabulary size; eos is suppressed, so every answer fills the
canvas and the work per sample is fixed (`--gen-length` words, `--steps` forward passes).

What is timed: the real `explain` path (prepare -> LLaDA low-confidence-remasking generation
-> attribution of every word with the default methods), one warm-up sample, then the median
of `--n` samples; the ratio all-words attribution / generation is issue 16's cost measure.
Nothing here needs a GPU to run (`--size tiny` is what the test suite runs), but the 8B layout
needs one with about 40 GB free.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffcam.core.cam as cam
from diffcam.core.models.llada import LladaVAdapter
from diffcam.core.settings import CamSettings, GenerationSettings
from diffcam.training.released_layouts import SIZES, build


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="llada-v-8b", choices=sorted(SIZES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--n", type=int, default=3, help="timed samples after one warm-up (default 3)")
    ap.add_argument("--gen-length", type=int, default=32, help="answer canvas length in tokens = words (default 32)")
    ap.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block length (default 32)")
    ap.add_argument("--steps", type=int, default=32, help="denoising steps (default 32: one word committed per step)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error("--n must be >= 1")
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    model, tokenizer, processor = build(a.size, a.device, dtype)
    adapter = LladaVAdapter(model, tokenizer, processor, image_aspect_ratio="square", gen_length=a.gen_length,
                            block_length=a.block_length, suppress_tokens=(tokenizer.eos_token_id,))
    build_s = time.perf_counter() - t0
    side = SIZES[a.size][1]["image_size"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(a.n + 1)]
    settings = CamSettings(generation=GenerationSettings(max_denoising_steps=a.steps))
    cuda = a.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    rows = []
    for k, image in enumerate(images):  # the first is the warm-up
        sync()
        r = cam.explain(adapter, image, "w1 w2 w3 w4", settings)
        sync()
        if k:
            rows.append({**r.timings, "n_words": len(r.words), "n_steps": r.n_steps, "grid": list(r.grid)})
        print(f"sample {k}{' (warm-up)' if not k else ''}: generate {r.timings['generate_s']:.2f}s, "
              f"attribution of {len(r.words)} words {r.timings['attribution_s']:.2f}s", flush=True)
    gen = statistics.median(x["generate_s"] for x in rows)
    att = statistics.median(x["attribution_s"] for x in rows)
    out = {
        "size": a.size, "device": a.device, "dtype": a.dtype, "params": sum(p.numel() for p in model.parameters()),
        "build_s": round(build_s, 1), "n": a.n, "grid": rows[0]["grid"], "n_steps": rows[0]["n_steps"],
        "words_median": statistics.median(x["n_words"] for x in rows), "methods": list(settings.methods),
        "generate_s_median": gen, "attribution_s_median": att,
        "total_s_median": statistics.median(x["total_s"] for x in rows),
        "attribution_over_generation": att / gen, "torch": torch.__version__,
    }
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(0)
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
