"""The model-adapter protocol and the family registry.

Diffusion-CAM needs four things from a model family (ARCHITECTURE.md § Model adapters):
prepare inputs with the family's own processor, generate while recording the canvas at
every denoising step, re-run one structurally valid pass with gradients, and say which
passes are valid. Everything else in the core is family-agnostic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from diffcam_core.types import WordSpan


@dataclass(frozen=True)
class ImageSpan:
    """Where the image tokens sit in the attribution pass and how they tile the image.

    `positions` index the pass's sequence; `grid` is (rows, cols) of image tokens in
    row-major order, derived from the model inputs (never a constant).
    """

    positions: tuple[int, ...]
    grid: tuple[int, int]


@dataclass
class Generation:
    """A finished generation plus the trace Diffusion-CAM needs to re-run any step.

    `canvases[s]` is the canvas the decoder *read* at step s+1 and `self_cond[s]` the
    self-conditioning logits it read with it (None at the first step).
    `argmax[s]` is the decoder's argmax after step s+1; the answer is `argmax[-1]`.
    """

    token_ids: tuple[int, ...]
    text: str
    words: tuple[WordSpan, ...]
    n_steps: int
    canvases: list[torch.Tensor]
    self_cond: list[torch.Tensor | None]
    argmax: list[torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttributionPass:
    """Features at the hooked layer (image positions only) and canvas log-probs, in one graph."""

    features: dict[str, torch.Tensor]  # layer name -> (n_image_tokens, channels), requires grad path
    log_probs: Callable[[int], torch.Tensor]  # step -> (canvas_len, vocab) log-probs on that step's canvas


class ModelAdapter(Protocol):
    family: str
    grid_info: dict[str, Any]

    def prepare(self, image, prompt: str) -> dict[str, torch.Tensor]: ...

    def image_span(self, inputs: dict[str, torch.Tensor]) -> ImageSpan: ...

    def generate(self, inputs: dict[str, torch.Tensor], settings) -> Generation: ...

    def layer_names(self) -> list[str]: ...

    def valid_layers(self) -> list[str]: ...


_FAMILIES: dict[str, Callable[..., ModelAdapter]] = {}


def register_family(model_type: str):
    """Decorator: map a checkpoint's `config.json` `model_type` to an adapter class."""

    def deco(cls):
        _FAMILIES[model_type] = cls
        return cls

    return deco


def families() -> list[str]:
    return sorted(_FAMILIES)


def load_adapter(model_dir: str | Path, device: str = "cpu", trust_remote_code: bool = False) -> ModelAdapter:
    """Load a checkpoint folder through its family's adapter (`from_pretrained`, safetensors only).

    Refuses pickle weights: a `*.bin`/`*.pt` checkpoint can execute code on load.
    """
    # Import for the registration side effect of the built-in families.
    from diffcam_core.models import diffusion_gemma  # noqa: F401

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder: no config.json")
    if not any(model_dir.glob("*.safetensors")):
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"})
        hint = f" (found pickle weights {pickles}: convert them to safetensors first)" if pickles else ""
        raise ValueError(f"{model_dir} has no *.safetensors weights{hint}; diffcam loads safetensors only")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(f"{model_dir}: model_type {model_type!r} has no adapter; known: {families()}")
    return _FAMILIES[model_type].from_pretrained(model_dir, device=device, trust_remote_code=trust_remote_code)
