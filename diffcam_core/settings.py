"""Typed settings for generation and attribution, saved with every run.

Every settings object of the project derives from `Settings`: a frozen pydantic model that
refuses unknown fields (naming the known ones), validates at construction and in `with_`,
and round-trips through ``model_dump(mode="json")`` / ``model_validate`` — the form a
Prefect parameter and the run row's ``config_json`` take.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["Settings", "GenerationSettings", "CamSettings", "Distractor", "AttributionStep", "DISTRACTOR_MODES",
           "ATTRIBUTION_STEPS", "run_settings"]

Distractor = Literal["previous", "others-mean", "none"]
AttributionStep = Literal["commit", "final"]
DISTRACTOR_MODES: tuple[str, ...] = get_args(Distractor)
ATTRIBUTION_STEPS: tuple[str, ...] = get_args(AttributionStep)


class Settings(BaseModel):
    """Base of every settings model: frozen, unknown fields refused with the valid names."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_fields(cls, data: Any) -> Any:
        # pydantic's own "extra_forbidden" error does not say which fields exist
        if isinstance(data, Mapping):
            unknown = sorted(str(k) for k in set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; fields are {sorted(cls.model_fields)}")
        return data

    def with_(self, **kw: Any) -> Any:
        """A copy with ``kw`` changed, validated (``model_copy(update=...)`` alone is not)."""
        return type(self).model_validate({**dict(self), **kw})


class GenerationSettings(Settings):
    """The family's denoising loop parameters (DiffusionGemma defaults unless a checkpoint overrides).

    `max_new_tokens` is capped at one canvas: diffcam explains the first block of a
    block-diffusion answer (captions fit one 256-token canvas on released checkpoints).
    """

    seed: int = 0
    max_denoising_steps: int = Field(default=16, ge=1)
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005


class CamSettings(Settings):
    """What Diffusion-CAM computes for each word (docs/METHOD.md §2–§4).

    `distractor`: `others-mean` by measurement (`diffcam bench method` on the shipped
    tiny model, tuning seed 11, 313 words; benchmarks/results/bench_method_tiny-shapes.json):
    raw Diffusion-CAM Obj-IoU 33.8 / dataset F3 18.5 against 31.8 / 17.2 for `previous`
    (the reference's choice) and 31.4 / 17.1 for `none`.
    `attribution_step`: `commit` by the same measurement: raw Obj-IoU 33.8 against 32.5 for `final`.
    `layer`: a name from `adapter.layer_names()` (`projector` = image-token embeddings
    entering the LM; `encoder.<i>`, `vision.<i>`, ... as the family's `adapter.layers()`
    describes them). `None` uses the adapter's default, chosen by the layer sweep in
    `benchmarks/bench_method.py`.
    `methods`: names registered in `diffcam.core.methods`; they include the chance maps
    `random` and `objectness` (computed from the image alone, no model): every method
    table carries them so a method can be judged against what no model achieves.
    `faithfulness`: the share of samples (chosen by a hash of the sample id, so the same
    samples in every run) whose words get deletion / insertion curves and the vanish test
    (`diffcam.core.faithfulness`); 0 skips it.
    `canvas_batch`: how many denoising canvases are decoded, and back-propagated, as one
    batch when attributing an answer's words (a cost knob, not a result one: lower it when
    a large model runs out of memory in attribution).
    """

    layer: str | None = None
    distractor: Distractor = "others-mean"
    attribution_step: AttributionStep = "commit"
    refine_preset: str = "full"
    methods: tuple[str, ...] = ("gradcam", "diffusion-cam-raw", "diffusion-cam", "token-gradnorm", "random", "objectness")
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    faithfulness: float = 0.1
    canvas_batch: int = Field(default=8, ge=1)

    @field_validator("faithfulness", mode="before")
    @classmethod
    def _fraction(cls, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"faithfulness must be a fraction of samples in [0, 1], got {v!r}")
        return float(v)

    @field_validator("methods")
    @classmethod
    def _registered_methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from diffcam.core.methods import method_names

        valid = method_names()  # the registry (`diffcam.core.methods`), plug-ins included
        unknown = [m for m in v if m not in valid]
        if unknown or not v:
            raise ValueError(f"unknown method(s) {unknown} in {list(v)}; valid: {valid}")
        return v

    @field_validator("refine_preset")
    @classmethod
    def _preset(cls, v: str) -> str:
        from diffcam.core.refine import PRESETS

        if v not in PRESETS:
            raise ValueError(f"refine_preset {v!r} is not one of {sorted(PRESETS)}")
        return v

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> CamSettings:
        """The CamSettings of a run row's config (`run_settings`; older rows hold only these)."""
        return cls.model_validate({k: v for k, v in config.items() if k in cls.model_fields})


def run_settings(cam: CamSettings, bias: Any = None) -> dict[str, Any]:
    """Every setting that shapes a run's numbers, as the run row's config records them:
    CamSettings at the top level (as before) plus ``refine`` (`RefineSettings`), ``stats``
    (`StatsSettings`) and ``bias`` (`BiasSettings`; None: the defaults)."""
    from diffcam.core.bias.settings import BiasSettings
    from diffcam.core.refine import DEFAULT_SETTINGS
    from diffcam.core.stats import DEFAULT_STATS_SETTINGS

    return {
        **cam.model_dump(mode="json"),
        "refine": DEFAULT_SETTINGS.model_dump(mode="json"),
        "stats": DEFAULT_STATS_SETTINGS.model_dump(mode="json"),
        "bias": (bias if bias is not None else BiasSettings()).model_dump(mode="json"),
    }

