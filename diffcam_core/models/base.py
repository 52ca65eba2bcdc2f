"""The model-adapter protocol and the family registry.

Diffusion-CAM needs four things from a model family (docs/METHOD.md §2):
prepare inputs with the family's own processor, generate while recording the canvas at
every denoising step, re-run one structurally valid pass with gradients, and say which
passes are valid. `ModelAdapter` lists everything the core calls; a family implements it
in its own module and registers itself there with `register_family` (the package's
`FAMILY_MODULES` names the modules `load_adapter` imports). Nothing else in the core
knows a family by name.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from diffcam.core.types import WordSpan


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
    self-conditioning logits it read with it (None at the first step, and always for
    families without self-conditioning). `argmax[s]` is the decoder's argmax after step
    s+1; the answer is `argmax[-1]`, and `final_self_cond` the conditioning a decoder
    pass over that final canvas reads. `extra`: family-specific facts for reports only
    (the core never reads it).
    """

    token_ids: tuple[int, ...]
    text: str
    words: tuple[WordSpan, ...]
    n_steps: int
    canvases: list[torch.Tensor]
    self_cond: list[torch.Tensor | None]
    argmax: list[torch.Tensor]
    final_self_cond: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def step_canvas(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(canvas, self-conditioning) the decoder read at `step` (1-based, as `WordSpan.commit_step`)."""
        return self.canvases[step - 1], self.self_cond[step - 1]

    def final_canvas(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(canvas, self-conditioning) of the finished answer (the reference's attribution canvas)."""
        return self.argmax[-1], self.final_self_cond


#: `Layer.kind` of the image-token embeddings as they enter the language model: the layer
#: the per-token baselines read, whatever a family calls the module that produces them.
IMAGE_FEATURES = "image-features"


@dataclass(frozen=True)
class Layer:
    """One hookable layer, named by what it is rather than by a family's module path.

    `name` is what settings and results use (`projector`, `encoder.<i>`, `vision.<i>`,
    `lm.<i>`); `kind` is `image-features` or the stack it belongs to (`vision`, `encoder`,
    `lm`); `about` says what the tensor holds. `invalid` is empty for a structurally valid
    layer, else why no single attribution pass can use it.
    """

    name: str
    kind: str
    about: str
    invalid: str = ""

    @property
    def valid(self) -> bool:
        return not self.invalid


class LayerTable:
    """`layer_names` / `valid_layers` / `check_layer` / `image_feature_layer` from a family's `layers()`.

    A mixin, so each family writes its layer list once and every family refuses a layer
    with the same kind of message.
    """

    def layers(self) -> tuple[Layer, ...]:
        raise NotImplementedError

    def layer_names(self) -> list[str]:
        return [lay.name for lay in self.layers()]

    def valid_layers(self) -> list[str]:
        return [lay.name for lay in self.layers() if lay.valid]

    @property
    def image_feature_layer(self) -> str:
        (name,) = [lay.name for lay in self.layers() if lay.kind == IMAGE_FEATURES]
        return name

    def check_layer(self, layer: str) -> None:
        """Refuse an unknown or structurally invalid layer before any model work."""
        known = {lay.name: lay for lay in self.layers()}
        if layer not in known:
            raise ValueError(f"unknown layer {layer!r}; this model has {list(known)}")
        if not known[layer].valid:
            raise ValueError(f"layer {layer!r} is not structurally valid: {known[layer].invalid}. "
                             f"Valid: {self.valid_layers()}")


class AttributionPass(Protocol):
    """What `ModelAdapter.attribution_pass` yields: one pass with gradients over the image.

    `tensors[name]` is the captured output of each requested layer as the graph uses it
    (differentiate with respect to it); `image_rows(name, t)` cuts that tensor, or its
    gradient, to (n_image_tokens, channels) in grid order; `log_probs(canvas, self_cond)`
    decodes one recorded canvas on top of the pass: (canvas_len, vocab), in the same graph;
    `log_probs_many([(canvas, self_cond), ...])` decodes several in one batched pass:
    (n_canvases, canvas_len, vocab), row k equal to `log_probs` of the k-th (so one backward
    serves every canvas: the cost of attributing all words of an answer). `max_canvases`:
    how many canvases are worth one batch (None: any number). A family whose canvases
    share the graph's expensive part (an encoder-decoder's prefix) gains from batching;
    one that re-runs the whole model per canvas does not, because the batched backward
    carries every word's cotangent through every canvas's rows, so it says 1.
    """

    tensors: dict[str, torch.Tensor]
    max_canvases: int | None

    def image_rows(self, name: str, tensor: torch.Tensor) -> torch.Tensor: ...

    def log_probs(self, canvas: torch.Tensor, self_cond: torch.Tensor | None) -> torch.Tensor: ...

    def log_probs_many(self, canvases: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor: ...


class ModelAdapter(Protocol):
    """Everything the core (`diffcam.core.cam`, faithfulness, the tasks) calls on a family."""

    family: str
    grid_info: dict[str, Any]
    #: Layer used when `CamSettings.layer` is None (chosen per family by the layer sweep).
    default_layer: str
    #: Name of the `image-features` layer (the per-token baselines' input).
    image_feature_layer: str

    @classmethod
    def from_pretrained(cls, model_dir: Path, device: str = "cpu", trust_remote_code: bool = False) -> ModelAdapter: ...

    def prepare(self, image, prompt: str) -> dict[str, torch.Tensor]: ...

    def image_span(self, inputs: dict[str, torch.Tensor]) -> ImageSpan: ...

    def generate(self, inputs: dict[str, torch.Tensor], settings) -> Generation: ...

    def layers(self) -> tuple[Layer, ...]: ...

    def layer_names(self) -> list[str]: ...

    def valid_layers(self) -> list[str]: ...

    def check_layer(self, layer: str) -> None: ...

    def attribution_pass(self, inputs: dict[str, torch.Tensor],
                         layers: list[str]) -> AbstractContextManager[AttributionPass]:
        """Hooks `layers` for the duration of the block (always removed) and yields the pass."""
        ...

    def canvas_log_probs(self, images: list, prompt: str, canvas: torch.Tensor,
                         self_cond: torch.Tensor | None) -> torch.Tensor:
        """(B, L, V) log-probs of one recorded canvas given each image (faithfulness curves)."""
        ...


_FAMILIES: dict[str, type[ModelAdapter]] = {}


def register_family(model_type: str):
    """Decorator: map a checkpoint's `config.json` `model_type` to an adapter class."""

    def deco(cls):
        _FAMILIES[model_type] = cls
        return cls

    return deco


def families() -> list[str]:
    """`model_type`s with an adapter: the built-in families and any registered since."""
    from diffcam.core.models import import_families

    import_families()
    return sorted(_FAMILIES)


def load_adapter(model_dir: str | Path, device: str = "cpu", trust_remote_code: bool = False) -> ModelAdapter:
    """Load a checkpoint folder through its family's adapter (`from_pretrained`, safetensors only).

    Refuses pickle weights: a `*.bin`/`*.pt` checkpoint can execute code on load; pickle
    files next to safetensors weights are never opened (adapters load with
    ``use_safetensors=True``), and a file named ``*.safetensors`` that is not one (a renamed
    pickle) is refused before anything parses it (`check_safetensors`). The family comes
    from ``config.json``'s ``model_type`` through the registry, never from ``auto_map``:
    code shipped in the folder is not imported unless ``trust_remote_code=True`` is passed
    explicitly (no CLI command passes it; the built-in family refuses it).
    """
    from diffcam.core.models import import_families

    import_families()

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder: no config.json")
    if not any(model_dir.glob("*.safetensors")):
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"})
        hint = f" (found pickle weights {pickles}: convert them to safetensors first)" if pickles else ""
        raise ValueError(f"{model_dir} has no *.safetensors weights{hint}; diffcam loads safetensors only")
    for f in sorted(model_dir.glob("*.safetensors")):
        check_safetensors(f)
    try:
        config = json.loads(cfg_path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in _FAMILIES:
        raise ValueError(f"{model_dir}: model_type {model_type!r} has no adapter; known: {families()}")
    return _FAMILIES[model_type].from_pretrained(model_dir, device=device, trust_remote_code=trust_remote_code)


#: Largest safetensors JSON header accepted (the format's own readers cap it at 100 MB).
MAX_SAFETENSORS_HEADER = 100_000_000


def check_safetensors(path: str | Path) -> None:
    """Refuse a file that is not a safetensors file, with a clear error, without unpickling.

    Layout: 8-byte little-endian header length N, then N bytes of JSON (an object), then
    the tensor data. A pickle (``\\x80`` protocol byte), a zip-based ``torch.save`` file
    (``PK``) or a truncated file fails here.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: only {size} bytes")
        n = int.from_bytes(head, "little")
        kind = "a pickle" if head[:1] == b"\x80" else "a zip (torch.save) archive" if head[:2] == b"PK" else None
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            hint = f" (it looks like {kind}: renamed pickle weights are refused)" if kind else ""
            raise ValueError(f"{path} is not a safetensors file: header length {n} does not fit a "
                             f"{size}-byte file{hint}")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: header is not a JSON object")


class InputLimitError(ValueError):
    """Prepared inputs the model cannot represent. ``reason``: ``input-too-long`` (prompt +
    image tokens + canvas beyond the model's positions) or ``image-aspect`` (more patches
    along one axis than the vision position table holds). Raised before the model runs,
    instead of an index error deep inside it — or, worse, a silently extrapolated answer."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"[generate/{reason}] {message}")


def check_inputs(adapter: Any, inputs: dict[str, torch.Tensor]) -> None:
    """Refuse inputs beyond the model's position tables (`InputLimitError`).

    Family-agnostic: reads the limits from ``adapter.config`` when it has them
    (``max_position_embeddings`` of the text config, ``canvas_length``,
    ``vision_config.position_embedding_size``); a family without them is not checked.
    Measured on the tiny DiffusionGemma: a prompt that overflows the 512 positions ran
    and answered "" with no error; a 10x200 image failed with "index out of range in self".
    """
    cfg = getattr(adapter, "config", None)
    if cfg is None:
        return
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    max_pos = getattr(text_cfg, "max_position_embeddings", None)
    canvas = int(getattr(cfg, "canvas_length", 0) or 0)
    ids = inputs.get("input_ids")
    if ids is not None and isinstance(max_pos, int) and max_pos > 0:
        n = int(ids.shape[-1])
        if n + canvas > max_pos:
            raise InputLimitError(
                "input-too-long",
                f"prompt and image take {n} tokens + {canvas} canvas = {n + canvas} positions > the model's "
                f"max_position_embeddings {max_pos}; shorten the prompt",
            )
    pes = getattr(getattr(cfg, "vision_config", None), "position_embedding_size", None)
    pos = inputs.get("image_position_ids")
    if pos is not None and isinstance(pes, int) and pes > 0:
        valid = pos[(pos >= 0).all(-1)]
        if valid.numel():
            mx, my = int(valid[:, 0].max()) + 1, int(valid[:, 1].max()) + 1
            if max(mx, my) > pes:
                raise InputLimitError(
                    "image-aspect",
                    f"the image becomes {mx}x{my} patches (WxH); this model's vision position table holds "
                    f"{pes} per axis: the aspect ratio is too extreme for it",
                )


@contextlib.contextmanager
def captured_outputs(modules: Mapping[str, torch.nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that keep each named module's output while the block runs; always removed.

    The tensor kept is the one the graph uses: a slice taken in the hook would be a new leaf
    that nothing downstream reads, and would get no gradient. The caller runs its forward
    pass inside the block; `check_captured` then says which hook did not fire.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module, _args, output):
            captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for h in handles:
            h.remove()


def check_captured(captured: Mapping[str, torch.Tensor], layers: list[str], where: str) -> None:
    missing = [lay for lay in layers if lay not in captured]
    if missing:
        raise RuntimeError(f"hooks for {missing} did not fire in the {where}")
