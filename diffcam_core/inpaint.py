"""Counterfactual images: erase a box or a mask by inpainting it with the local background."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffcam_core.bias_windows import as_mask

__all__ = ["box_mask", "erase_mask", "erase_region"]


def box_mask(shape: tuple[int, int], box: Sequence[float]) -> np.ndarray:
    """Bool (H, W) mask of the pixels whose centres lie in the normalised ``box``
    (x0, y0, x1, y1): cols ⌊x0·W + 0.5⌋ … ⌊x1·W + 0.5⌋ (exclusive), rows likewise."""
    H, W = shape
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, c1 = int(math.floor(x0 * W + 0.5)), int(math.floor(x1 * W + 0.5))
    r0, r1 = int(math.floor(y0 * H + 0.5)), int(math.floor(y1 * H + 0.5))
    m = np.zeros((H, W), dtype=bool)
    m[max(r0, 0):min(r1, H), max(c0, 0):min(c1, W)] = True
    return m


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    """Chebyshev dilation by ``r`` pixels (a (2r+1)² square), separable max filter."""
    out = m.copy()
    for axis in (0, 1):
        acc = out.copy()
        for s in range(1, r + 1):
            acc |= np.roll(out, s, axis=axis) & _valid_shift(out.shape, s, axis)
            acc |= np.roll(out, -s, axis=axis) & _valid_shift(out.shape, -s, axis)
        out = acc
    return out


def _valid_shift(shape: tuple[int, int], s: int, axis: int) -> np.ndarray:
    v = np.ones(shape, dtype=bool)
    idx = [slice(None), slice(None)]
    idx[axis] = slice(0, s) if s > 0 else slice(shape[axis] + s, shape[axis])
    v[tuple(idx)] = False
    return v


def erase_mask(image: np.ndarray, mask: np.ndarray, *, ring: int | None = None, ring_fraction: float = 0.05,
               exclude: np.ndarray | None = None) -> np.ndarray:
    """Inpaint the pixels of ``mask`` with the local background; every other pixel is unchanged.

    The fill is the per-channel median of a ring of ``ring`` pixels around the mask
    (default max(2, round(ring_fraction · min(H, W)))), leaving out the mask, ``exclude``
    (e.g. other objects) and the image outside. The ring grows (×2, up to the image)
    until it holds pixels. A flat fill: deterministic, no texture synthesis — adequate
    for flat or noisy backgrounds (the synthetic set), a visible patch on textured photos.
    Returns a new uint8 array (H, W, 3) (or (H, W) for grey images).
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {img.shape}")
    m = as_mask(mask)
    if m.shape != img.shape[:2]:
        raise ValueError(f"mask is {m.shape[0]}x{m.shape[1]}, image is {img.shape[0]}x{img.shape[1]}")
    out = img.copy()
    if not m.any():
        return out
    H, W = m.shape
    r = ring if ring is not None else max(2, int(round(ring_fraction * min(H, W))))
    ex = np.zeros_like(m) if exclude is None else as_mask(exclude, "exclude")
    while True:
        band = _dilate(m, r) & ~m & ~ex
        if band.any() or r >= max(H, W):
            break
        r *= 2
    if not band.any():
        band = ~m
    if not band.any():
        return out
    fill = np.median(img[band].astype(np.float64), axis=0)
    out[m] = np.round(fill).astype(img.dtype)
    return out


def erase_region(image: np.ndarray, box: Sequence[float], **kw: Any) -> np.ndarray:
    """`erase_mask` over the normalised ``box`` (x0, y0, x1, y1): the suspect region."""
    img = np.asarray(image)
    return erase_mask(img, box_mask(img.shape[:2], box), **kw)
