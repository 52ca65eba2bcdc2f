"""`scripts/gpu_timing_llada.py` and `diffcam.training.released_layouts`: the LLaDA-V-8B-layout
cost script, checked without a GPU.

The 8B model is built on the `meta` device (shapes only, no memory) and compared with a
parameter count worked out by hand from the published layout; the timing path itself runs
at the script's `tiny` size on the CPU, in bf16 as on the GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from diffcam.training.released_layouts import build

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_timing_llada.py"


def _published_8b_parameter_count() -> int:
    """LLaDA-8B + SigLIP so400m (26 layers kept) + mlp2x_gelu, counted from the layout's numbers."""
    vocab, d, layers, mlp = 126464, 4096, 32, 12288
    # embed + untied head, q/k/v/o, gate/up/down, 2 norms; final norm
    lm = 2 * vocab * d + layers * (4 * d * d + 3 * d * mlp + 2 * d) + d
    v, v_layers, v_mlp, patch, side = 1152, 26, 4304, 14, 384
    tokens = (side // patch) ** 2
    vision = (3 * patch * patch * v + v) + tokens * v  # patch conv (+bias), position table
    vision += v_layers * (4 * (v * v + v) + (v * v_mlp + v_mlp) + (v_mlp * v + v) + 2 * 2 * v)  # attn, MLP, 2 layer norms
    vision += 2 * v  # post layer norm
    projector = (v * d + d) + (d * d + d)
    return lm + vision + projector


def test_the_8b_layout_has_the_published_shapes():
    model, tokenizer, processor = build("llada-v-8b", "meta", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == _published_8b_parameter_count()
    assert len(tokenizer) == 126464 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    names = dict(model.state_dict())
    assert names["model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight"].shape == (729, 1152)
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.25.mlp.fc2.weight" in names
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.26.mlp.fc2.weight" not in names
    assert names["model.layers.31.mlp.gate_proj.weight"].shape == (12288, 4096)
    assert processor.size["height"] == 384


def test_the_timing_path_runs_in_bf16_and_fills_the_canvas(tmp_path):
    out = tmp_path / "t.json"
    subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--n", "1", "--gen-length", "8",
                    "--block-length", "8", "--steps", "8", "--json", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["dtype"] == "bfloat16" and result["words_median"] == 8 and result["n_steps"] == 8
    assert result["grid"] == [4, 4]
    assert result["generate_s_median"] > 0 and result["attribution_over_generation"] > 0
