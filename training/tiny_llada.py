"""The tiny LLaDA-V-layout architecture (`llava_llada` family): its spec, word-level tokenizer and
random-initialised model, built from the family's own `LladaVModel` so a checkpoint goes through
exactly the loader and sampler a released LLaDA-V checkpoint does. Training: `diffcam.training.llada`.

Why these sizes (see `LladaSpec`): 64x64 images with SigLIP patch 4 give a 16x16 image-token grid;
the tower is shallow because a trained-from-scratch tiny ViT with global attention loses locality.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import ConfigDict, NonNegativeInt, model_validator
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast, SiglipVisionConfig
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from diffcam.core.models.llada import MASK_TOKEN, LladaVAdapter
from diffcam.core.models.llada_modeling import LladaVModel
from diffcam.core.settings import Settings

PAD, EOS, BOS, UNK = "<pad>", "<|endoftext|>", "<|startoftext|>", "<unk>"
#: LLaDA's names for eos / bos / mask, so the adapter finds them the way it does on released checkpoints.
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, MASK_TOKEN)


class LladaSpec(Settings):
    """Architecture and generation defaults of the tiny LLaDA-V model; recorded with the checkpoint.

    `vision_layers`: SigLIP encoder layers. transformers 5.24 accepts 0 in the config, but then
    `SiglipVisionModel` returns an empty `hidden_states` tuple and `LladaVModel.image_features`
    (which reads `hidden_states[-1]`) fails, so the smallest tower that loads today has 1 layer.
    `vision_identity_init` zeroes that layer's two residual branches (attention out_proj, MLP
    fc2), so at step 0 every image token is its own patch embedding + position and locality
    is only lost if training pays for it.
    `steps` / `block_length`: LLaDA sampler defaults written to generation_config.json; with
    `steps == gen_length` one token is committed per step, so the words of an answer get
    different commit steps.
    Built from JSON or TOML overrides with `model_validate` (strict: "4" is not an int).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    image_size: NonNegativeInt = 64
    patch_size: NonNegativeInt = 4
    vision_hidden: NonNegativeInt = 64
    vision_layers: NonNegativeInt = 1
    vision_heads: NonNegativeInt = 2
    vision_identity_init: bool = True
    text_hidden: NonNegativeInt = 128
    text_layers: NonNegativeInt = 4
    text_heads: NonNegativeInt = 4
    text_kv_heads: NonNegativeInt = 4
    intermediate: NonNegativeInt = 384
    projector: str = "mlp2x_gelu"
    max_positions: NonNegativeInt = 512
    gen_length: NonNegativeInt = 16
    block_length: NonNegativeInt = 16
    steps: NonNegativeInt = 16

    @model_validator(mode="after")
    def _consistent(self) -> LladaSpec:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length {self.gen_length} is not a multiple of block_length {self.block_length}")
        n_blocks = self.gen_length // self.block_length
        if self.steps < n_blocks or self.steps % n_blocks:
            raise ValueError(f"steps {self.steps} must be a positive multiple of the number of blocks {n_blocks}")
        if self.text_hidden % self.text_heads or self.text_heads % self.text_kv_heads:
            raise ValueError(f"text_hidden {self.text_hidden} / text_heads {self.text_heads} / text_kv_heads "
                             f"{self.text_kv_heads} must divide evenly")
        if self.vision_hidden % self.vision_heads:
            raise ValueError(f"vision_hidden {self.vision_hidden} is not a multiple of vision_heads {self.vision_heads}")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size



def build_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: the special tokens, then every word of `words` (sorted)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                   unk_token=UNK, additional_special_tokens=[MASK_TOKEN])


def build_model(spec: LladaSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LladaVModel:
    """A random-initialised `LladaVModel` of `spec` (seeded: same seed, same weights)."""
    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                       num_key_value_heads=spec.text_kv_heads, max_position_embeddings=spec.max_positions,
                       rope_theta=10000.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id)
    vision = SiglipVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                                num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                                image_size=spec.image_size, patch_size=spec.patch_size, vision_use_head=False)
    model = LladaVModel(text, vision, spec.projector, image_newline=False)
    if spec.vision_identity_init:
        with torch.no_grad():
            for layer in model.siglip.encoder.layers:
                for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                    lin.weight.zero_()
                    lin.bias.zero_()
    return model


def build_adapter(spec: LladaSpec, words: Sequence[str], seed: int) -> LladaVAdapter:
    """Model + tokenizer + SigLIP processor, wrapped in the family's adapter (its input path)."""
    tokenizer = build_tokenizer(words)
    processor = SiglipImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    model = build_model(spec, tokenizer, seed)
    return LladaVAdapter(model, tokenizer, processor, image_aspect_ratio="square", gen_length=spec.gen_length,
                         block_length=spec.block_length)
