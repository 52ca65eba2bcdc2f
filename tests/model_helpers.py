"""Small random-init DiffusionGemmas for tests (real transformers model code, tiny sizes)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import DiffusionGemmaForBlockDiffusion

from diffcam.core.models.diffusion_gemma import DiffusionGemmaAdapter
from diffcam.training.tiny_gemma import TinyModelSpec, build_config, build_image_processor, build_tokenizer

WORDS = "a and red blue circle square describe the image".split()


def random_adapter(seed: int = 0, **spec_kw) -> DiffusionGemmaAdapter:
    torch.manual_seed(seed)
    spec = TinyModelSpec(text_hidden=64, text_layers=3, intermediate=64, moe_intermediate=32, **spec_kw)
    tok = build_tokenizer(WORDS)
    return DiffusionGemmaAdapter(DiffusionGemmaForBlockDiffusion(build_config(spec, tok)), tok, build_image_processor(spec))


def make_image(h: int, w: int, block: tuple[int, int] | None = None, cell: int = 8) -> Image.Image:
    arr = np.full((h, w, 3), 40, dtype=np.uint8)
    if block is not None:
        r, c = block
        arr[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = 255
    return Image.fromarray(arr)
