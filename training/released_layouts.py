"""Random-initialised models in the released LLaDA-V layout, at its real size or a tiny one.

Built from transformers' own modules through `LladaVModel` (the class real checkpoints load
into), directly on the target device and dtype, so an 8 B model never needs a float32 copy
on the host. The weights are random: these models measure cost, never quality.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, SiglipVisionConfig
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from diffcam.core.models.llada_modeling import LladaVModel
from diffcam.training.tiny_llada import SPECIAL_TOKENS, build_tokenizer

#: (language model, vision tower, vocabulary) of each size; `llada-v-8b` is the released layout.
SIZES = {
    "llada-v-8b": (dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                        intermediate_size=12288, rope_theta=500000.0, max_position_embeddings=4096),
                   dict(hidden_size=1152, num_hidden_layers=26, num_attention_heads=16, intermediate_size=4304,
                        image_size=384, patch_size=14),
                   126464),
    "tiny": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=128, rope_theta=500000.0, max_position_embeddings=512),
             dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=56, patch_size=14),
             512),
}


def build(size: str, device: str, dtype: torch.dtype):
    """(model, tokenizer, processor): a random-initialised `LladaVModel` of `size`, created on `device`
    in `dtype` (no float32 copy on the host first), its word-level tokenizer and SigLIP processor."""
    text_kw, vision_kw, vocab = SIZES[size]
    tokenizer = build_tokenizer([f"w{i}" for i in range(vocab - len(SPECIAL_TOKENS))])
    text = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **text_kw)
    vision = SiglipVisionConfig(vision_use_head=False, **vision_kw)
    torch.manual_seed(0)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LladaVModel(text, vision, "mlp2x_gelu", image_newline=False)
    finally:
        torch.set_default_dtype(old_dtype)
    side = vision_kw["image_size"]
    processor = SiglipImageProcessorPil(size={"height": side, "width": side})
    return model, tokenizer, processor
