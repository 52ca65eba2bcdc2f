"""The LLaDA-V module: SigLIP tower → MLP projector → bidirectional LLaDA, in the released layout.

Assembled from transformers' own modules, named so that a checkpoint in the published LLaDA-V
layout (LLaVA-OneVision naming, LLaDA blocks renamed to Llama names by the LLaDA-V authors)
loads with a strict state-dict match (the table is in `diffcam.core.models.llada`'s docstring).
The language model is a Llama-type decoder run with full attention (`is_causal=False` in its
config, and cleared on every attention module so SDPA cannot fall back to a causal kernel).
The adapter that generates and attributes with it is `diffcam.core.models.llada`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

FAMILY = "llava_llada"
#: LLaVA's placeholder id for an image token in `input_ids` (never embedded).
IMAGE_TOKEN_INDEX = -200
#: diffcam's placeholder for the `image_newline` slot that follows the image tokens.
IMAGE_NEWLINE_INDEX = -201
#: Top-level config.json fields that describe the LLaDA language model (LLaDA-V layout).
_TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings",
    "pad_token_id", "bos_token_id", "eos_token_id",
)


class _SiglipShell(nn.Module):
    """The `vision_model` level of the checkpoint names: transformers 5.24's `SiglipVisionModel`
    no longer has it (it renames keys on its own `from_pretrained`), LLaVA checkpoints do."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.vision_model = SiglipVisionModel(config)


class _VisionTowerHolder(nn.Module):
    """LLaVA's tower wrapper: holds the SigLIP model as `.vision_tower` (hence the doubled name)."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.vision_tower = _SiglipShell(config)


def build_projector(kind: str, mm_hidden: int, hidden: int) -> nn.Module:
    """The LLaVA projector named by `mm_projector_type` (`linear` or `mlp<N>x_gelu`)."""
    if kind == "linear":
        return nn.Linear(mm_hidden, hidden)
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind or "")
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"mm_projector_type {kind!r} is not supported; use 'linear' or 'mlp<N>x_gelu' "
                         "(LLaDA-V: mlp2x_gelu)")
    mods: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
    for _ in range(int(m.group(1)) - 1):
        mods += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*mods)


class LladaVModel(nn.Module):
    """SigLIP tower + projector + bidirectional Llama stack + LM head, in LLaDA-V's parameter layout."""

    def __init__(self, text_config: LlamaConfig, vision_config: SiglipVisionConfig,
                 projector_type: str = "mlp2x_gelu", image_newline: bool = False) -> None:
        super().__init__()
        text_config.is_causal = False
        self.text_config = text_config
        self.vision_config = vision_config
        self.model = LlamaModel(text_config)
        for layer in self.model.layers:
            cast(LlamaDecoderLayer, layer).self_attn.is_causal = False
        self.model.vision_tower = _VisionTowerHolder(vision_config)
        self.model.mm_projector = build_projector(projector_type, vision_config.hidden_size, text_config.hidden_size)
        if image_newline:
            self.model.image_newline = nn.Parameter(torch.zeros(text_config.hidden_size))
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self.projector_type = projector_type

    def save_pretrained(self, folder: str | Path, tokenizer=None, image_aspect_ratio: str = "square",
                        generation: dict | None = None) -> Path:
        """Write a folder `from_pretrained` reads: flat LLaDA-V config.json (+ `vision_config`),
        model.safetensors in the published parameter layout, tokenizer, generation defaults."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tc = self.text_config
        rope: Mapping[str, Any] = tc.rope_parameters or {}
        config = {
            "architectures": ["LlavaLLaDAModelLM"],
            "model_type": FAMILY,
            **{k: getattr(tc, k) for k in _TEXT_FIELDS if k not in ("rope_theta", "rope_scaling")
               and getattr(tc, k, None) is not None},
            "rope_theta": float(rope.get("rope_theta", 10000.0)),
            "mm_projector_type": self.projector_type,
            "mm_hidden_size": self.vision_config.hidden_size,
            "mm_patch_merge_type": "spatial_unpad" if hasattr(self.model, "image_newline") else "flat",
            "image_aspect_ratio": image_aspect_ratio,
            "vision_config": {k: v for k, v in self.vision_config.to_dict().items()
                              if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                       "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps",
                                       "vision_use_head")},
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", "utf-8")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        if generation:
            (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", "utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return folder

    @property
    def siglip(self) -> SiglipVisionModel:
        return cast(_VisionTowerHolder, self.model.vision_tower).vision_tower.vision_model

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, n_patches, hidden): SigLIP's last hidden state before post-layernorm, projected.

        A tower with no transformer layers (patch embedding + positions only: image tokens
        stay local, what a tiny model trained from scratch needs) has no hidden states to
        return, so its embeddings are that last state.
        """
        pixels = pixel_values.to(self.lm_head.weight.dtype)
        projector = cast(nn.Module, self.model.mm_projector)
        if not self.siglip.config.num_hidden_layers:
            return projector(self.siglip.embeddings(pixels))
        out = self.siglip(pixel_values=pixels, output_hidden_states=True)
        return projector(out.hidden_states[-1])

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image features scattered in at the image placeholders."""
        emb = self.model.embed_tokens(input_ids.clamp(min=0))
        img = (input_ids == IMAGE_TOKEN_INDEX).unsqueeze(-1)
        n_img = int(img.sum())
        if n_img != image_features.shape[0] * image_features.shape[1]:
            raise ValueError(f"{n_img} image placeholders for {tuple(image_features.shape[:2])} image features")
        emb = emb.masked_scatter(img, image_features.to(emb.dtype).reshape(-1, emb.shape[-1]))
        newline = (input_ids == IMAGE_NEWLINE_INDEX).unsqueeze(-1)
        if bool(newline.any()):
            emb = torch.where(newline, cast(torch.Tensor, self.model.image_newline).to(emb.dtype), emb)
        return emb

    def canvas_logits(self, input_ids: torch.Tensor, image_features: torch.Tensor,
                      canvas: torch.Tensor) -> torch.Tensor:
        """(B, canvas_len, vocab) logits of one full pass over prompt (with image) + canvas."""
        ids = torch.cat([input_ids, canvas], dim=1)
        hidden = self.model(inputs_embeds=self.embed(ids, image_features)).last_hidden_state
        return self.lm_head(hidden[:, -canvas.shape[1]:])


def text_config_from(config: dict) -> LlamaConfig:
    """The LLaDA language model's Llama config from the flat LLaDA-V config.json."""
    fields = {k: config[k] for k in _TEXT_FIELDS if k in config and config[k] is not None}
    cfg = LlamaConfig(**fields)
    cfg.is_causal = False
    return cfg
