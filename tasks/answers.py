"""Answer images: the one thing the bias step's counterfactual regenerations ask of a model.

An *answerer* is ``answer(images, prompts, sample_ids=None) -> texts``: one generated
answer per (image, prompt), in order, with the run's generation settings bound. The
counterfactuals (`diffcam.tasks.bias.counterfactual`) depend on this callable only, so the same
code runs on a model loaded in this process (`local_answerer`: tests, benchmarks, scripts)
or on the audit's Ray workers (`pool_answerer`: the flow, where the model already is —
on the GPU when there is one — instead of a second copy loaded on the driver's CPU).

Both run `generate_answers`: each image is prepared and generated alone, with the same
`GenerationSettings` (its ``seed`` seeds a generator local to each call), so an answer
depends on the image, the prompt and the settings only, not on which process asked or
what it asked before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["Answerer", "generate_answers", "local_answerer", "pool_answerer"]


class Answerer(Protocol):
    """``answer(images, prompts, sample_ids=None)``: texts, one per image. ``sample_ids``
    name the samples the images were edited from, for error messages."""

    def __call__(self, images: Sequence[Any], prompts: Sequence[str],
                 sample_ids: Sequence[str] | None = None) -> list[str]: ...


def generate_answers(adapter: Any, generation: Any, images: Sequence[Any], prompts: Sequence[str],
                     sample_ids: Sequence[str] | None = None) -> list[str]:
    """``adapter.prepare`` + ``adapter.generate`` per image (arrays or PIL images), one at a
    time. An error names its sample so that a failed regeneration is never anonymous."""
    from PIL import Image

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    ids = list(sample_ids) if sample_ids is not None else [f"#{k}" for k in range(len(images))]
    out = []
    for img, prompt, sid in zip(images, prompts, ids):
        try:
            pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
            out.append(adapter.generate(adapter.prepare(pil, prompt), generation).text)
        except Exception as exc:
            raise RuntimeError(f"sample {sid}: regenerating an answer for an edited image failed: "
                               f"{type(exc).__name__}: {exc}") from exc
    return out


def local_answerer(adapter: Any, generation: Any) -> Answerer:
    """An answerer on a model loaded in this process."""

    def answer(images: Sequence[Any], prompts: Sequence[str], sample_ids: Sequence[str] | None = None) -> list[str]:
        return generate_answers(adapter, generation, images, prompts, sample_ids)

    return answer


def pool_answerer(pool: Any, generation: Any, log: Callable[[str], None] | None = None) -> Answerer:
    """An answerer on the workers of a `diffcam.tasks.pool.CamPool` (`CamPool.answer`).

    A pool that was not started (a resumed run whose shards were all committed) is started
    on the first call, so the workers load the model only when a counterfactual needs it;
    whoever owns the pool closes it."""

    def answer(images: Sequence[Any], prompts: Sequence[str], sample_ids: Sequence[str] | None = None) -> list[str]:
        if not pool.actors:
            if log is not None:
                log("starting the Ray workers for the bias step's counterfactual regenerations")
            pool.start()
        return pool.answer(images, prompts, generation, sample_ids)

    return answer
