"""Counterfactual images: erase a box or a mask by inpainting it with the local background."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffcam.core.bias.windows import as_mask

__all__ = ["box_mask", "dilate", "erase_mask", "erase_region"]


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


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)×(2r+1) square (Chebyshev radius ``r``; r <= 0: a copy).

    Grey dilation of the 0/1 image (`scipy.ndimage.maximum_filter`, separable, pixels
    outside the image count as 0): the same result as a binary dilation, several times
    faster on the small masks the synthetic layout dilates many times per image."""
    from scipy.ndimage import maximum_filter  # here: importing scipy costs every importer of the synthetic set

    u = np.asarray(mask, dtype=bool).astype(np.uint8)
    return maximum_filter(u, size=2 * max(int(r), 0) + 1, mode="constant", cval=0).astype(bool)


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
        band = dilate(m, r) & ~m & ~ex
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


def erase_region_around(image: np.ndarray, box: Sequence[float], keep: np.ndarray, *,
                        exclude: np.ndarray | None = None, **kw: Any) -> np.ndarray:
    """`erase_region` that leaves the pixels of ``keep`` (the image's objects) untouched: only
    the box's other pixels are inpainted, from a ring that avoids ``keep`` and ``exclude``.
    The bias counterfactuals erase a suspect region *around* the objects, so that what
    changes in the answer is due to the background there, never to a clipped object."""
    img = np.asarray(image)
    k = as_mask(keep, "keep")
    ex = k if exclude is None else (k | as_mask(exclude, "exclude"))
    return erase_mask(img, box_mask(img.shape[:2], box) & ~k, exclude=ex, **kw)
