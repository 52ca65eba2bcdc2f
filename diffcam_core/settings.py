"""Typed settings for generation and attribution, saved with every run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

DISTRACTOR_MODES = ("previous", "others-mean", "none")
ATTRIBUTION_STEPS = ("commit", "final")


@dataclass(frozen=True)
class GenerationSettings:
    """The family's denoising loop parameters (DiffusionGemma defaults unless a checkpoint overrides).

    `max_new_tokens` is capped at one canvas: diffcam explains the first block of a
    block-diffusion answer (captions fit one 256-token canvas on released checkpoints).
    """

    seed: int = 0
    max_denoising_steps: int = 16
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005


@dataclass(frozen=True)
class CamSettings:
    """What Diffusion-CAM computes for each word (docs/METHOD.md §2–§4).

    `distractor`: `others-mean` by measurement (benchmarks/bench_method.py, 100 held-out
    images, projector layer): raw Diffusion-CAM Obj-IoU 25.7 / dataset F3 15.0 against
    21.1 / 13.1 for `previous` (the reference's choice) and 21.2 / 12.8 for `none`.
    `attribution_step`: `commit` by measurement: raw Obj-IoU 21.1 against 19.4 for `final`.
    `layer`: a name from `adapter.layer_names()` (`projector` = image-token embeddings
    entering the LM; `encoder.<i>`, `vision.<i>`, ... as the family's `adapter.layers()`
    describes them). `None` uses the adapter's default, chosen by the layer sweep in
    `benchmarks/bench_method.py`.
    `methods`: names registered in `diffcam_core.methods`; they include the chance maps
    `random` and `objectness` (computed from the image alone, no model): every method
    table carries them so a method can be judged against what no model achieves.
    `faithfulness`: the share of samples (chosen by a hash of the sample id, so the same
    samples in every run) whose words get deletion / insertion curves and the vanish test
    (`diffcam_core.faithfulness`); 0 skips it.
    """

    layer: str | None = None
    distractor: str = "others-mean"
    attribution_step: str = "commit"
    refine_preset: str = "full"
    methods: tuple[str, ...] = ("gradcam", "diffusion-cam-raw", "diffusion-cam", "token-gradnorm", "random", "objectness")
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    faithfulness: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.faithfulness, bool) or not 0.0 <= float(self.faithfulness) <= 1.0:
            raise ValueError(f"faithfulness must be a fraction of samples in [0, 1], got {self.faithfulness!r}")
        object.__setattr__(self, "faithfulness", float(self.faithfulness))
        from diffcam_core.methods import method_names
        from diffcam_core.refine import PRESETS

        valid = method_names()  # the registry (`diffcam_core.methods`), plug-ins included
        unknown = [m for m in self.methods if m not in valid]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown} in {list(self.methods)}; valid: {valid}")

        if self.refine_preset not in PRESETS:
            raise ValueError(f"refine_preset {self.refine_preset!r} is not one of {sorted(PRESETS)}")
        if self.distractor not in DISTRACTOR_MODES:
            raise ValueError(f"distractor {self.distractor!r} is not one of {DISTRACTOR_MODES}")
        if self.attribution_step not in ATTRIBUTION_STEPS:
            raise ValueError(f"attribution_step {self.attribution_step!r} is not one of {ATTRIBUTION_STEPS}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["methods"] = list(self.methods)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CamSettings:
        d = dict(d)
        gen = GenerationSettings(**d.pop("generation", {}))
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CamSettings fields: {sorted(unknown)}")
        if "methods" in d:
            d["methods"] = tuple(d["methods"])
        return cls(generation=gen, **d)

    def with_(self, **kw) -> CamSettings:
        return replace(self, **kw)
