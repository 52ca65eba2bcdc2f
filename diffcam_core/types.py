"""Plain result types shared by the core, the workers and the storage layer.

Everything here is a frozen dataclass over numpy arrays and Python scalars so that a
result can cross a process boundary (Ray) and be written to Parquet without knowing
anything about torch or the model family that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class WordSpan:
    """One word of the generated answer and where it sits on the canvas.

    `positions` are canvas indices (0-based, within the answer block) of the word's
    sub-tokens; `token_ids` the ids generated there. `commit_step` is the denoising
    step (1-based, in the order steps were run) from which all of the word's tokens
    stayed unchanged until the end of generation.
    """

    index: int
    text: str
    positions: tuple[int, ...]
    token_ids: tuple[int, ...]
    commit_step: int
    is_function: bool


@dataclass(frozen=True)
class WordMaps:
    """All maps computed for one word of one sample, each an (h, w) float32 array.

    `maps` is keyed by method name (`gradcam`, `diffusion-cam-raw`, `diffusion-cam`,
    `token-gradnorm`, ...). Raw Diffusion-CAM maps are min-max normalised to [0, 1];
    an all-zero map is a valid result (see `zero_map`).
    """

    word: WordSpan
    distractor: str | None
    target_score: float
    distractor_score: float | None
    maps: dict[str, np.ndarray]
    zero_map: bool
    #: method -> `diffcam.core.faithfulness.FaithfulnessResult`, for the words and samples
    #: where faithfulness was measured (empty otherwise).
    faithfulness: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SampleExplanation:
    """What the core returns for one (image, prompt): the answer and every word's maps."""

    answer: str
    token_ids: tuple[int, ...]
    words: tuple[WordMaps, ...]
    grid: tuple[int, int]
    n_steps: int
    layer: str
    attribution_step: str
    timings: dict[str, float] = field(default_factory=dict)
