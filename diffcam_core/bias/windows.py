"""Window geometry of the bias audit: masks on a map's grid, hot-spot windows, their boxes.

A map lives on its patch grid (h, w), which tiles the whole image. A mask (H, W) is
brought to the grid as the share of each cell's pixels inside it (`cell_coverage`). A
*window* is a square of ``round(hotspot_size · side)`` cells (at least 1) per axis — the
same share of the image on every grid (1 cell on 8×8, 3 on 24×24 at the default 0.125).
Regions are boxes ``(x0, y0, x1, y1)`` in normalised image coordinates (x right, y down,
[0, 1]). Maps are compared as mass distributions (each map divided by its sum).
"""

from __future__ import annotations

import math

import numpy as np

from diffcam.core.metrics import validate_mask

__all__ = ["EPS", "as_mask", "cell_coverage", "hotspot", "unit_mass", "window_box", "window_cells", "window_max",
           "window_sums"]

EPS = 1e-12


def unit_mass(m: np.ndarray) -> np.ndarray | None:
    s = float(m.sum())
    return None if not s > 0 else m / s


def as_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """`metrics.validate_mask` but an empty mask is allowed (no object pixels: coverage 0)."""
    m = np.asarray(mask)
    if m.ndim == 2 and m.size and not m.any():
        return m.astype(bool)
    return validate_mask(m, name)


def cell_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Share of each grid cell's pixels inside ``mask`` (bool (H, W)) → float (h, w) in [0, 1].

    Cell (i, j) covers rows ``[⌊i·H/h⌋, ⌊(i+1)·H/h⌋)`` and the same for columns (the grid
    tiles the image; when H < h a cell may be empty and gets the nearest row's value).
    """
    m = as_mask(mask).astype(np.float64)
    H, W = m.shape
    h, w = int(grid[0]), int(grid[1])
    re = np.floor(np.arange(h + 1) * H / h).astype(int)
    ce = np.floor(np.arange(w + 1) * W / w).astype(int)
    cs = np.zeros((H + 1, W + 1))
    cs[1:, 1:] = m.cumsum(0).cumsum(1)
    r0, r1 = re[:-1], np.maximum(re[1:], re[:-1] + 1).clip(max=H)
    r0 = np.minimum(r0, r1 - 1)
    c0, c1 = ce[:-1], np.maximum(ce[1:], ce[:-1] + 1).clip(max=W)
    c0 = np.minimum(c0, c1 - 1)
    tot = cs[r1][:, c1] - cs[r0][:, c1] - cs[r1][:, c0] + cs[r0][:, c0]
    area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    return tot / area


def window_cells(grid: tuple[int, int], hotspot_size: float) -> tuple[int, int]:
    """Window side in cells per axis: max(1, round-half-up(hotspot_size · side))."""
    return tuple(max(1, min(n, int(math.floor(hotspot_size * n + 0.5)))) for n in grid)  # type: ignore[return-value]


def window_sums(a: np.ndarray, win: tuple[int, int]) -> np.ndarray:
    """Sum of ``a`` over every (wh, ww) window: (h - wh + 1, w - ww + 1), top-left indexed."""
    wh, ww = win
    cs = np.zeros((a.shape[0] + 1, a.shape[1] + 1))
    cs[1:, 1:] = np.asarray(a, dtype=np.float64).cumsum(0).cumsum(1)
    return cs[wh:, ww:] - cs[:-wh, ww:] - cs[wh:, :-ww] + cs[:-wh, :-ww]


def window_max(a: np.ndarray, win: tuple[int, int]) -> np.ndarray:
    """Max of ``a`` over every window (same indexing as `window_sums`)."""
    h, w = a.shape
    wh, ww = win
    out = np.full((h - wh + 1, w - ww + 1), -np.inf)
    for dr in range(wh):
        for dc in range(ww):
            out = np.maximum(out, a[dr:dr + h - wh + 1, dc:dc + w - ww + 1])
    return out


def window_box(r: int, c: int, win: tuple[int, int], grid: tuple[int, int]) -> tuple[float, float, float, float]:
    h, w = grid
    return (c / w, r / h, (c + win[1]) / w, (r + win[0]) / h)


def hotspot(
    p: np.ndarray,
    win: tuple[int, int],
    allowed: np.ndarray | None = None,
) -> tuple[float, tuple[int, int]] | None:
    """Densest window of the mass distribution ``p`` among windows whose top-left is
    ``allowed`` (bool, `window_sums` shape; None: all). Returns (share, (row, col)) or
    None when no window is allowed. Ties: the first in row-major order."""
    sums = window_sums(p, win)
    if allowed is not None:
        if not allowed.any():
            return None
        sums = np.where(allowed, sums, -np.inf)
    idx = int(np.argmax(sums))
    r, c = divmod(idx, sums.shape[1])
    return float(sums[r, c]), (r, c)

