"""Per-sample Diffusion-CAM cost on a larger random-init DiffusionGemma (GPU check).

    python scripts/gpu_timing.py --device cuda --json out.json [--size mid|tiny]

`mid`: text hidden 1024 × 8 layers (MoE 4 experts), vision hidden 512 × 4 layers,
patch 16, pooling 3, 32k-word vocabulary, a 672×448 image (280 image tokens), canvas 64.
Random weights: the numbers are costs, not quality. Times the real `explain` path
(prepare → traced generation → attribution with batched gradients), and the same
attribution with one backward per word, so the batching choice is measured on the GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import DiffusionGemmaForBlockDiffusion

import diffcam.core.cam as cam
from diffcam.core.models.diffusion_gemma import DiffusionGemmaAdapter
from diffcam.core.settings import CamSettings, GenerationSettings
from diffcam.training.tiny_gemma import TinyModelSpec, build_config, build_image_processor, build_tokenizer

SIZES = {
    "mid": dict(image_size=672, patch_size=16, pooling_kernel_size=3, max_soft_tokens=280, vision_hidden=512,
                vision_layers=4, text_hidden=1024, text_layers=8, text_heads=8, text_kv_heads=4, head_dim=128,
                intermediate=4096, num_experts=4, moe_intermediate=1024, canvas_length=64),
    "tiny": dict(),
}


def looped_grads(scores, wrt):
    per = [torch.autograd.grad(s, wrt, retain_graph=True) for s in scores]
    return [torch.stack([p[i] for p in per]) for i in range(len(wrt))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="mid", choices=sorted(SIZES))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.manual_seed(0)
    spec = TinyModelSpec(**SIZES[a.size])
    words = [f"w{i}" for i in range(a.vocab)]
    tok = build_tokenizer(words)
    model = DiffusionGemmaForBlockDiffusion(build_config(spec, tok)).to(a.device).eval()
    adapter = DiffusionGemmaAdapter(model, tok, build_image_processor(spec))
    n_params = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    h, w = (448, 672) if a.size == "mid" else (64, 64)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(a.n + 1)]
    settings = CamSettings(layer="encoder.2", generation=GenerationSettings(max_denoising_steps=16))
    out = {"device": a.device, "size": a.size, "params": n_params, "spec": spec.model_dump(), "vocab": len(tok)}
    if a.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    cam.explain(adapter, images[-1], "w1 w2 w3", settings)  # warm-up
    rows = {"batched": [], "looped": []}
    for mode in ("batched", "looped"):
        if mode == "looped":
            cam._batched_grads = looped_grads
        for img in images[:-1]:
            sync()
            r = cam.explain(adapter, img, "w1 w2 w3", settings)
            sync()
            rows[mode].append({**r.timings, "n_words": len(r.words), "n_steps": r.n_steps,
                               "grid": list(r.grid)})
    for mode, rs in rows.items():
        out[mode] = {
            "generate_s_median": statistics.median(x["generate_s"] for x in rs),
            "attribution_s_median": statistics.median(x["attribution_s"] for x in rs),
            "total_s_median": statistics.median(x["total_s"] for x in rs),
            "words_median": statistics.median(x["n_words"] for x in rs),
            "grid": rs[0]["grid"],
        }
    out["attribution_speedup_batched_vs_looped"] = (
        out["looped"]["attribution_s_median"] / out["batched"]["attribution_s_median"])
    if a.device.startswith("cuda"):
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
