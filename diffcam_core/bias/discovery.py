"""Find what a word depends on without asking a saliency map: an erase scan over windows.

The bias audit's counterfactuals test regions that a map proposes; a cue the map does not
light is never tested. The scan here proposes regions from the model's behaviour alone:
for each image where the word was said, paint every window of grid cells in turn with the
background colour (the same fill as the faithfulness curves) and re-score the word on its
attribution canvas. A window whose removal lowers the word's log-probability, consistently
across the word's images and while it holds none of the word's objects, is a candidate
cue.

Pure: the model comes in as the same ``score_images`` callable the faithfulness curves use
(`diffcam.core.faithfulness.adapter_scorer`), so a scripted model can stand in for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from diffcam.core.evidence import background_colour
from diffcam.core.faithfulness import perturbed

__all__ = ["window_cells_at", "window_scan", "ScanResult", "summarise_scans"]


def window_cells_at(grid: tuple[int, int], win: tuple[int, int], r: int, c: int) -> np.ndarray:
    """Flat indices of the cells of the (win[0] × win[1]) window whose top-left cell is (r, c)."""
    h, w = int(grid[0]), int(grid[1])
    rows = np.arange(r, r + win[0])
    cols = np.arange(c, c + win[1])
    if rows[-1] >= h or cols[-1] >= w or r < 0 or c < 0:
        raise ValueError(f"window {win} at ({r}, {c}) leaves the {h}x{w} grid")
    return (rows[:, None] * w + cols[None, :]).ravel()


def window_scan(image: np.ndarray, grid: tuple[int, int], win: tuple[int, int],
                score_images: Callable[[list[np.ndarray]], np.ndarray]) -> np.ndarray:
    """Drop of the word's score (intact − erased, nats) for every window position.

    Returns (h − win_h + 1, w − win_w + 1), top-left indexed like `diffcam.core.bias.windows.window_sums`;
    positive = the word is less likely without that window. One batched call scores the
    intact image and every erased one.
    """
    img = np.asarray(image)
    h, w = int(grid[0]), int(grid[1])
    nr, nc = h - win[0] + 1, w - win[1] + 1
    if nr < 1 or nc < 1:
        raise ValueError(f"window {win} does not fit the {h}x{w} grid")
    fill = background_colour(img)
    batch = [img] + [perturbed(img, window_cells_at(grid, win, r, c), grid, fill)
                     for r in range(nr) for c in range(nc)]
    scores = np.asarray(score_images(batch), dtype=np.float64)
    if scores.shape != (len(batch),):
        raise ValueError(f"score_images returned shape {scores.shape} for {len(batch)} images")
    return (scores[0] - scores[1:]).reshape(nr, nc)


@dataclass(frozen=True)
class ScanResult:
    """Per window, over a word's scanned images: mean drop, share of images where the drop
    exceeds ``min_drop``, and whether the window is clear of the word's objects in them all."""

    mean_drop: np.ndarray
    hit_rate: np.ndarray
    off_object: np.ndarray
    n_images: int

    def candidates(self, min_hit_rate: float = 0.5) -> list[tuple[int, int, float, float]]:
        """(r, c, mean drop, hit rate) of off-object windows hit in at least ``min_hit_rate``
        of the images, strongest first."""
        rr, cc = np.nonzero(self.off_object & (self.hit_rate >= min_hit_rate))
        out = [(int(r), int(c), float(self.mean_drop[r, c]), float(self.hit_rate[r, c])) for r, c in zip(rr, cc)]
        return sorted(out, key=lambda t: (-t[3], -t[2], t[0], t[1]))


def summarise_scans(drops: Sequence[np.ndarray], object_cover: Sequence[np.ndarray], win: tuple[int, int],
                    min_drop: float = 1.0, object_overlap_max: float = 0.0) -> ScanResult:
    """Combine one word's scans. ``object_cover[i]``: share of each grid cell covered by the
    word's object(s) in image i (`diffcam.core.evidence.mask_on_grid`); a window counts as
    off-object when its covered share is at most ``object_overlap_max`` in every image."""
    if len(drops) == 0 or len(drops) != len(object_cover):
        raise ValueError(f"need one object cover per scan, got {len(drops)} scans and {len(object_cover)} covers")
    d = np.stack([np.asarray(x, dtype=np.float64) for x in drops])
    off = np.ones(d.shape[1:], dtype=bool)
    for cov in object_cover:
        cov = np.asarray(cov, dtype=np.float64)
        for r in range(d.shape[1]):
            for c in range(d.shape[2]):
                if cov[r:r + win[0], c:c + win[1]].max() > object_overlap_max:
                    off[r, c] = False
    return ScanResult(mean_drop=d.mean(axis=0), hit_rate=(d > min_drop).mean(axis=0), off_object=off,
                      n_images=int(d.shape[0]))
