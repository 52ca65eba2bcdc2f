"""Evidence that a word's map is about the word: chance maps and word-specificity measures.

A localisation score such as Obj-IoU only says a map sits on *some* object. The measures
here ask whether it sits on the object the word names (docs/EVALUATION.md):

- chance maps that any method must beat: `random_map`; `objectness_map` (no model at all:
  how far each cell's pixels are from the background colour); `all_objects_map` (the union
  of every object mask: word-agnostic oracle); `oracle_map` (the named object's mask, the
  ceiling);
- `specificity`: mass per area on the named object against mass per area on the image's
  other objects, as a share d_t / (d_t + d_o) in [0, 1] (0.5 = no preference);
- `multi_pointing`: the map's peak lies on the named object and on no other object;
- `swap_follows`: after two objects exchange places, does the word's map move with its
  object?

Pure numpy; maps live on the (h, w) grid, masks at image resolution (H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffcam.core.metrics import upsample_bilinear, validate_map, validate_mask

__all__ = [
    "CHANCE_METHODS",
    "cell_boxes",
    "mask_on_grid",
    "random_map",
    "objectness_map",
    "all_objects_map",
    "oracle_map",
    "background_colour",
    "cover_grid",
    "density",
    "specificity",
    "multi_pointing",
    "swap_follows",
]

#: Maps that need no model; every method table carries them as rows.
CHANCE_METHODS = ("random", "objectness", "all-objects", "oracle")


def cell_boxes(shape: tuple[int, int], grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel edges of the grid's cells: rows ``[r[i], r[i+1])``, cols ``[c[j], c[j+1])``.

    Cell (i, j) covers rows ⌊i·H/h⌋ … ⌊(i+1)·H/h⌋ (exclusive), the same rule as
    `diffcam.core.bias.windows.cell_coverage`, so a map cell and the pixels it stands for agree
    everywhere in the project.
    """
    H, W = int(shape[0]), int(shape[1])
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1 or H < h or W < w:
        raise ValueError(f"grid {grid} cannot tile an image of {H}x{W} pixels")
    return (np.floor(np.arange(h + 1) * H / h).astype(int), np.floor(np.arange(w + 1) * W / w).astype(int))


def mask_on_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Share of each cell's pixels inside ``mask`` (float (h, w) in [0, 1]); an empty mask → zeros."""
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {m.shape}")
    m = m.astype(bool)
    rows, cols = cell_boxes(m.shape, grid)
    cs = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    cs[1:, 1:] = m.cumsum(0).cumsum(1)
    tot = cs[rows[1:]][:, cols[1:]] - cs[rows[:-1]][:, cols[1:]] - cs[rows[1:]][:, cols[:-1]] + cs[rows[:-1]][:, cols[:-1]]
    area = np.diff(rows)[:, None] * np.diff(cols)[None, :]
    return tot / area


def random_map(grid: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Uniform noise on the grid: the floor every method must clear."""
    return rng.random((int(grid[0]), int(grid[1])))


def background_colour(image: np.ndarray) -> np.ndarray:
    """Per-channel median of the image's outermost pixel frame: the colour a blank image has.

    The frame is used rather than the whole image because objects rarely touch all four
    edges, while they may cover most of the centre.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"image must be a non-empty (H, W) or (H, W, C) array, got shape {np.asarray(image).shape}")
    if min(img.shape[:2]) < 3:  # no inside to leave out: every pixel is on the frame
        return np.median(img.reshape(-1, img.shape[2]), axis=0)
    frame = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]], axis=0)
    return np.median(frame, axis=0)


def cover_grid(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The image, enlarged by pixel repetition when it has fewer pixels than the grid has cells.

    The model's processor resizes any image to its own resolution, so a 1×1 upload still
    has an 8×8 grid of image tokens; pixel-space maps and perturbations need at least one
    pixel per cell. Repetition keeps every cell a copy of the pixels the model saw there.
    """
    img = np.asarray(image)
    fy = -(-int(grid[0]) // img.shape[0])
    fx = -(-int(grid[1]) // img.shape[1])
    if fy <= 1 and fx <= 1:
        return img
    return np.repeat(np.repeat(img, fy, axis=0), fx, axis=1)


def objectness_map(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """No model: per cell, the mean absolute distance of its pixels from the background colour.

    Distance is the mean over channels of |pixel − background| (intensity levels); the
    background is `background_colour`. On flat backgrounds this lights every object and
    nothing else — exactly what a map that is "on some object" but not "on this word's
    object" looks like.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = img[..., None]
    dist = np.abs(img - background_colour(image)[None, None, :]).mean(axis=2)
    rows, cols = cell_boxes(dist.shape, grid)
    cs = np.zeros((dist.shape[0] + 1, dist.shape[1] + 1))
    cs[1:, 1:] = dist.cumsum(0).cumsum(1)
    tot = cs[rows[1:]][:, cols[1:]] - cs[rows[:-1]][:, cols[1:]] - cs[rows[1:]][:, cols[:-1]] + cs[rows[:-1]][:, cols[:-1]]
    # Box sums from a float integral image cancel large partial sums: a cell of background
    # pixels (true sum 0) can come out at -1e-12, which map validation rightly refuses.
    return np.maximum(tot, 0.0) / (np.diff(rows)[:, None] * np.diff(cols)[None, :])


def all_objects_map(masks: Sequence[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """The union of every object mask on the grid: knows where objects are, not which is named."""
    if len(masks) == 0:
        raise ValueError("all_objects_map needs at least one mask")
    union = np.zeros(np.asarray(masks[0]).shape, dtype=bool)
    for m in masks:
        union |= np.asarray(m, dtype=bool)
    return mask_on_grid(union, grid)


def oracle_map(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The named object's mask on the grid: the best a grid-resolution map can do."""
    return mask_on_grid(mask, grid)


def density(map: np.ndarray, mask: np.ndarray) -> float:
    """Mean of the upsampled map over the mask's pixels (mass per area)."""
    m = validate_mask(mask)
    return float(upsample_bilinear(map, m.shape)[m].mean())


def _others_union(target: np.ndarray, others: Sequence[np.ndarray]) -> np.ndarray | None:
    """Pixels of the other objects, minus the target's (masks may touch after resizing)."""
    if len(others) == 0:
        return None
    union = np.zeros(target.shape, dtype=bool)
    for i, o in enumerate(others):
        om = np.asarray(o, dtype=bool)
        if om.shape != target.shape:
            raise ValueError(f"others[{i}] is {om.shape[0]}x{om.shape[1]}, the target mask {target.shape[0]}x{target.shape[1]}")
        union |= om
    union &= ~target
    return union if union.any() else None


def _on_objects(map: np.ndarray, target: np.ndarray,
                others: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(upsampled map, target mask, other objects' pixels), or None when there is no other object."""
    a = validate_map(map)
    t = validate_mask(target, "target")
    o = _others_union(t, others)
    if o is None:
        return None
    return upsample_bilinear(a, t.shape), t, o


def specificity(map: np.ndarray, target: np.ndarray, others: Sequence[np.ndarray]) -> float | None:
    """d_t / (d_t + d_o): d = mass per area on the named object (t) and on all other objects (o).

    1 = only the named object lights up, 0.5 = the map does not prefer it over the others,
    0 = only the others. None when there is no other object (undefined, not 0.5) or the map
    has no mass on any object (a zero map tells nothing about which object it prefers).
    """
    parts = _on_objects(map, target, others)
    if parts is None:
        return None
    up, t, o = parts
    dt, do = float(up[t].mean()), float(up[o].mean())
    if dt + do <= 0.0:
        return None
    return dt / (dt + do)


def multi_pointing(map: np.ndarray, target: np.ndarray, others: Sequence[np.ndarray]) -> bool | None:
    """The upsampled map's peak is on the named object and on no other object.

    None without another object (the ordinary pointing game covers that case). A constant
    map has no peak: a miss. Ties go to the first maximum in row-major order.
    """
    parts = _on_objects(map, target, others)
    if parts is None:
        return None
    up, t, o = parts
    if float(up.max()) <= float(up.min()):
        return False
    k = int(np.argmax(up))
    return bool(t.ravel()[k] and not o.ravel()[k])


def swap_follows(
    map_before: np.ndarray, map_after: np.ndarray,
    own_before: np.ndarray, other_before: np.ndarray,
    own_after: np.ndarray, other_after: np.ndarray,
) -> bool:
    """Swap test: two objects exchange places; does the word's map move with its own object?

    True when the map prefers its object (higher mass per area than on the other object)
    both before and after the swap. A map tied to a place, to image content in general, or
    to answer order passes at most one of the two.
    """
    before = density(map_before, own_before) > density(map_before, other_before)
    after = density(map_after, own_after) > density(map_after, other_after)
    return bool(before and after)
