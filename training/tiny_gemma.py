"""Build the pieces of the tiny embedded DiffusionGemma: tokenizer, image processor, config.

The tiny model is a real `DiffusionGemmaForBlockDiffusion`, only small; it goes through
exactly the same input path as a released checkpoint (tokenizer placeholders + the
family's `Gemma4ImageProcessorPil`). Nothing here touches files: saving is the caller's
job (`training/gemma.py`).

Why these sizes (measured on the 2-core development machine): with a 2-layer vision tower a
briefly trained tiny ViT keeps no locality and every CAM is at chance; with **0 vision
layers** (patch embedding + 2-D position table only) the image tokens stay local and
Grad-CAM localises. Pooling must be ≥ 2 (pooling 1 drops every image feature in
transformers 5.24).
"""

from __future__ import annotations

import torch
from pydantic import ConfigDict, NonNegativeFloat, NonNegativeInt
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DiffusionGemmaConfig,
    Gemma4ImageProcessorPil,
    Gemma4VisionConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig

from diffcam.core.settings import Settings

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>", "<boi>", "<eoi>")
PAD, EOS, BOS, UNK, IMAGE, BOI, EOI = SPECIAL_TOKENS


class TinyModelSpec(Settings):
    """Architecture of the tiny model. Saved with the checkpoint (`diffcam_tiny.json`); built from
    JSON or TOML overrides with `model_validate` (strict: "4" is not an int, unknown fields refused)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    image_size: NonNegativeInt = 64
    patch_size: NonNegativeInt = 4
    pooling_kernel_size: NonNegativeInt = 2
    max_soft_tokens: NonNegativeInt = 70  # smallest value Gemma4ImageProcessor accepts; 64x64 -> 8x8 = 64 tokens
    vision_hidden: NonNegativeInt = 64
    vision_layers: NonNegativeInt = 0
    text_hidden: NonNegativeInt = 128
    text_layers: NonNegativeInt = 4
    text_heads: NonNegativeInt = 4
    text_kv_heads: NonNegativeInt = 2
    head_dim: NonNegativeInt = 32
    intermediate: NonNegativeInt = 256
    num_experts: NonNegativeInt = 2
    moe_intermediate: NonNegativeInt = 64
    canvas_length: NonNegativeInt = 16
    # transformers initialises the Gemma 4 vision position table to ones, so every patch
    # starts with the same position code and the LM sees image layout only through the
    # token order. >0 draws the table from N(1, std) instead (see `init_position_table`).
    position_init_std: NonNegativeFloat = 0.0


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one token per whitespace-separated word.

    The image placeholders are registered as the named special tokens the Gemma 4
    processor convention expects (`image_token`, `boi_token`, `eoi_token`), so code that
    builds prompts reads them from the tokenizer, never from constants.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(words)):
        if w not in vocab:
            vocab[w] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )


def build_image_processor(spec: TinyModelSpec) -> Gemma4ImageProcessorPil:
    """The family's own image processor (PIL backend: the torchvision one would pull a CUDA torch)."""
    return Gemma4ImageProcessorPil(
        patch_size=spec.patch_size,
        pooling_kernel_size=spec.pooling_kernel_size,
        max_soft_tokens=spec.max_soft_tokens,
    )


def build_config(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> DiffusionGemmaConfig:
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec.text_layers)]
    layer_types[-1] = "full_attention"
    text = DiffusionGemmaTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=spec.head_dim,
        global_head_dim=spec.head_dim,
        layer_types=layer_types,
        # Wider than the whole sequence (image tokens + prompt), so the sliding layers see
        # every image token like the full ones do; 16x16-token images are 256 tokens alone.
        sliding_window=1024,
        num_experts=spec.num_experts,
        top_k_experts=1,
        moe_intermediate_size=spec.moe_intermediate,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        max_position_embeddings=512,
        # Image tokens attend to each other in both directions (as in the larger Gemma 4
        # checkpoints); with the default causal mask a top-left token never sees the rest
        # of its object, and the tiny model learned shapes far more slowly (measured: 51%
        # shape/colour words right after 3,000 steps).
        use_bidirectional_attention="vision",
    )
    vision = Gemma4VisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=spec.vision_hidden // 2,
        patch_size=spec.patch_size,
        pooling_kernel_size=spec.pooling_kernel_size,
        position_embedding_size=max(64, spec.image_size // spec.patch_size),
    )
    return DiffusionGemmaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.image_token_id,
        boi_token_id=tokenizer.convert_tokens_to_ids(BOI),
        eoi_token_id=tokenizer.convert_tokens_to_ids(EOI),
        canvas_length=spec.canvas_length,
    )


def init_position_table(model, spec: TinyModelSpec, generator: torch.Generator) -> None:
    """Draw the vision position table from N(1, spec.position_init_std) (no-op at 0).

    Why: with the library's all-ones table the pooled image tokens carry no position of
    their own; a random table gives each patch a distinct code from step 0 (measured on
    8x8 tokens: content words 61.5 % vs 46.4 % after the same 2,000 steps).
    """
    if spec.position_init_std <= 0:
        return
    table = model.model.encoder.vision_tower.patch_embedder.position_embedding_table
    with torch.no_grad():
        table.copy_(1.0 + spec.position_init_std * torch.randn(table.shape, generator=generator))
