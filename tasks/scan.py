"""Scan images: the one thing the bias step's discovery scan asks of a model.

A *scanner* is ``scan(images, prompts, words, sample_ids=None) -> [ImageScan | None]``:
for each (image, prompt, word), in order, the answer is generated with the run's
generation settings, the word's first occurrence in it is found (compared as
`diffcam.core.words.normalise_word` forms), and every window of the image-token grid is
erased in turn and the word re-scored on its attribution canvas
(`diffcam.core.bias.discovery.window_scan` with `diffcam.core.faithfulness.adapter_scorer`'s
score function, the same scoring as the faithfulness curves). None where the regenerated
answer lacks the word: there is nothing to score.

The scan is the saliency-free discovery step of the bias audit (`diffcam.tasks.bias.scan`); this
module mirrors `diffcam.tasks.answers`: the same code runs on a model loaded in this process
(`local_scanner`) or on the audit's Ray workers (`pool_scanner` → `diffcam.tasks.pool.CamPool.scan`
→ `diffcam.tasks.worker.CamWorker.scan`). The window side is derived from each image's own grid
(`diffcam.core.bias.windows.window_cells` of ``window_size``, the fraction of the image side
the saliency regions use), never a constant.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["ImageScan", "Scanner", "scan_images", "local_scanner", "pool_scanner"]


@dataclass(frozen=True)
class ImageScan:
    """One image's scan: ``drops[r, c]`` = the word's log-probability on the intact image
    minus on the image with the window whose top-left cell is (r, c) erased (nats; positive:
    the word is less likely without it); ``grid``: the image-token grid; ``window``: the
    window side in cells; ``answer``: the regenerated answer; ``seconds``: generation and
    scoring of this image."""

    drops: np.ndarray
    grid: tuple[int, int]
    window: tuple[int, int]
    answer: str
    seconds: float


class Scanner(Protocol):
    """``scan(images, prompts, words, sample_ids=None)``: one `ImageScan` (or None: the
    regenerated answer lacks the word) per image. ``sample_ids`` name the samples, for
    error messages."""

    def __call__(self, images: Sequence[Any], prompts: Sequence[str], words: Sequence[str],
                 sample_ids: Sequence[str] | None = None) -> list[ImageScan | None]: ...


def scan_one(adapter: Any, generation: Any, attribution_step: str, window_size: float, image: Any, prompt: str,
             word: str) -> ImageScan | None:
    """Generate, find ``word``'s first occurrence, scan every window (module docstring)."""
    import torch
    from PIL import Image

    from diffcam.core.bias.discovery import window_scan
    from diffcam.core.bias.windows import window_cells
    from diffcam.core.cam import attribution_canvas
    from diffcam.core.faithfulness import adapter_scorer
    from diffcam.core.words import normalise_word

    t0 = time.perf_counter()
    arr = np.asarray(image)
    pil = image if isinstance(image, Image.Image) else Image.fromarray(arr)
    target = normalise_word(word)
    with torch.no_grad():
        inputs = adapter.prepare(pil, prompt)
        gen = adapter.generate(inputs, generation)
        span = next((w for w in gen.words if normalise_word(w.text) == target), None)
        if span is None:
            return None
        grid = tuple(int(v) for v in adapter.image_span(inputs).grid)
        win = window_cells(grid, window_size)
        canvas, cond = attribution_canvas(gen, span, attribution_step)
        score, _ = adapter_scorer(adapter, prompt, canvas, cond, span)
        drops = window_scan(np.asarray(pil.convert("RGB")), grid, win, score)
    return ImageScan(drops=drops, grid=grid, window=win, answer=gen.text, seconds=time.perf_counter() - t0)


def scan_images(adapter: Any, generation: Any, attribution_step: str, window_size: float, images: Sequence[Any],
                prompts: Sequence[str], words: Sequence[str],
                sample_ids: Sequence[str] | None = None) -> list[ImageScan | None]:
    """`scan_one` per (image, prompt, word), one at a time. An error names its sample."""
    if not (len(images) == len(prompts) == len(words)):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(words)} words: one of each per scan")
    ids = list(sample_ids) if sample_ids is not None else [f"#{k}" for k in range(len(images))]
    out = []
    for img, prompt, word, sid in zip(images, prompts, words, ids):
        try:
            out.append(scan_one(adapter, generation, attribution_step, window_size, img, prompt, word))
        except Exception as exc:
            raise RuntimeError(f"sample {sid}: the discovery scan of {word!r} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
    return out


def local_scanner(adapter: Any, generation: Any, attribution_step: str, window_size: float) -> Scanner:
    """A scanner on a model loaded in this process."""

    def scan(images: Sequence[Any], prompts: Sequence[str], words: Sequence[str],
             sample_ids: Sequence[str] | None = None) -> list[ImageScan | None]:
        return scan_images(adapter, generation, attribution_step, window_size, images, prompts, words, sample_ids)

    return scan


def pool_scanner(pool: Any, generation: Any, attribution_step: str, window_size: float,
                 log: Callable[[str], None] | None = None) -> Scanner:
    """A scanner on the workers of a `diffcam.tasks.pool.CamPool` (`CamPool.scan`); a pool that was
    not started is started on the first call (as `diffcam.tasks.answers.pool_answerer`)."""

    def scan(images: Sequence[Any], prompts: Sequence[str], words: Sequence[str],
             sample_ids: Sequence[str] | None = None) -> list[ImageScan | None]:
        if not pool.actors:
            if log is not None:
                log("starting the Ray workers for the bias step's discovery scan")
            pool.start()
        return pool.scan(images, prompts, words, generation, attribution_step, window_size, sample_ids)

    return scan
