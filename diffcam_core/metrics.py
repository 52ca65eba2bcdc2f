"""Localisation metrics of docs/METHOD.md §5 as pure numpy functions.

A map lives on the patch grid (h, w); a mask at image resolution (H, W). Every metric
first upsamples the map to the mask's size with `upsample_bilinear` (the semantics of
`torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`, which is also
what the reference's `cv2.resize` does when enlarging).

Conventions chosen where docs/METHOD.md §5 leaves a gap (each repeated in its docstring):
- Quantisation for Otsu: the upsampled map is min-max normalised and truncated to uint8
  (`floor(255·x)`, the reference's `(x*255).astype(uint8)` on its [0, 1] maps); a
  constant map quantises to all zeros and so has an empty foreground.
- A zero (or constant) map is a result: Obj-IoU 0, Contrast 0, Concentration 0,
  pointing game miss, F3 0. No NaN is ever returned.
- Contrast with an all-zero outside region and a positive inside is `math.inf` (all the
  mass is on the object); `contrast_score` maps it to 1. Average `contrast_score`, not
  raw contrast, or use a median (the reference added 1e-8 and reported ~1e7 instead).
- Deviation from the reference: Obj-IoU is matched to the named object's mask
  (`obj_iou`); the reference's best-over-all-objects variant is `obj_iou_any`. The
  reference's Func-IoU used each map's own Otsu threshold; ours uses the mean threshold
  of the answer's content words, as METHOD (and TAM) define it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "concentration",
    "contrast",
    "contrast_score",
    "dataset_f3",
    "f3",
    "func_iou",
    "obj_iou",
    "obj_iou_any",
    "otsu_threshold",
    "pointing_hit",
    "to_uint8",
    "upsample_bilinear",
    "validate_map",
    "validate_mask",
]

#: Contrast is divided by this and capped at 1 to give the contrast score (docs/METHOD.md §5).
CONTRAST_SCALE = 20.0


def validate_map(map: np.ndarray, name: str = "map") -> np.ndarray:
    """Return a non-empty, finite, non-negative 2-D map as float64, or raise ValueError."""
    a = np.asarray(map)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {a.shape}")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite values")
    if float(a.min()) < 0:
        raise ValueError(f"{name} must be non-negative, min is {float(a.min())}")
    return a


def validate_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """Return a non-empty boolean 2-D mask, or raise ValueError.

    Accepts bool arrays or numeric arrays holding only 0 and 1 (a 0/255 PNG must be
    converted by the loader, so that a wrong encoding is not silently accepted).
    """
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {m.shape}")
    if m.dtype != np.bool_:
        values = np.unique(m)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or 0/1, found values {values[:8].tolist()}")
        m = m.astype(bool)
    if not m.any():
        raise ValueError(f"{name} ({m.shape[0]}x{m.shape[1]}) is empty: no object pixels")
    return m


def _axis_coords(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights along one axis, torch's align_corners=False rule."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    return i0, i1, lam


def upsample_bilinear(map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to `size` = (H, W) with align_corners=False semantics (float64).

    Matches `torch.nn.functional.interpolate(x[None, None], size, mode="bilinear",
    align_corners=False)` (no antialias), both for enlarging and shrinking; the same size
    returns an exact copy.
    """
    a = validate_map(map)
    if len(size) != 2 or min(int(size[0]), int(size[1])) < 1:
        raise ValueError(f"size must be (H, W) with H, W >= 1, got {size!r}")
    out_h, out_w = int(size[0]), int(size[1])
    h0, h1, hl = _axis_coords(a.shape[0], out_h)
    w0, w1, wl = _axis_coords(a.shape[1], out_w)
    wl0, hl0 = 1.0 - wl, 1.0 - hl
    top = a[h0][:, w0] * wl0 + a[h0][:, w1] * wl
    bottom = a[h1][:, w0] * wl0 + a[h1][:, w1] * wl
    return hl0[:, None] * top + hl[:, None] * bottom


def _unit(a: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1]; a constant map becomes all zeros."""
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros_like(a, dtype=np.float64)
    return (a - lo) / (hi - lo)


def to_uint8(map: np.ndarray) -> np.ndarray:
    """uint8 quantisation used before Otsu: floor(255 · min-max(map)); constant → zeros."""
    return np.floor(_unit(validate_map(map)) * 255.0).clip(0, 255).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold t of a uint8 array: foreground is `values > t`.

    Maximises the between-class variance n0·n1·(μ0 − μ1)² over t ∈ [0, 255] with exact
    integer counts; ties go to the smallest t (as OpenCV's strict `>` search). An array
    with a single distinct value returns that value, so its foreground is empty (OpenCV
    would return 0 and make a constant non-zero image all foreground).
    """
    v = np.asarray(values)
    if v.dtype != np.uint8 or v.size == 0:
        raise ValueError(f"otsu_threshold needs a non-empty uint8 array, got dtype {v.dtype}, shape {v.shape}")
    hist = np.bincount(v.ravel(), minlength=256).astype(np.int64)
    if np.count_nonzero(hist) < 2:
        return int(v.ravel()[0])
    levels = np.arange(256, dtype=np.int64)
    n0 = np.cumsum(hist)
    s0 = np.cumsum(hist * levels)
    n = int(n0[-1])
    total = int(s0[-1])
    n1 = n - n0
    valid = (n0 > 0) & (n1 > 0)
    mu0 = np.divide(s0, n0, out=np.zeros(256), where=valid)
    mu1 = np.divide(total - s0, n1, out=np.zeros(256), where=valid)
    between = np.where(valid, n0.astype(np.float64) * n1 * (mu0 - mu1) ** 2, 0.0)
    return int(np.argmax(between))


def _foreground(map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    u8 = to_uint8(upsample_bilinear(map, size))
    return u8 > otsu_threshold(u8)


def obj_iou(map: np.ndarray, mask: np.ndarray) -> float:
    """Obj-IoU (docs/METHOD.md §5): IoU of the Otsu foreground of the upsampled map with the mask.

    The mask is the named object's; a zero or constant map has an empty foreground → 0.
    """
    m = validate_mask(mask)
    fg = _foreground(map, m.shape)
    return float(np.count_nonzero(fg & m) / np.count_nonzero(fg | m))


def obj_iou_any(map: np.ndarray, masks: Sequence[np.ndarray]) -> float:
    """The reference's Obj-IoU: the best IoU over all object masks of the image.

    The Otsu foreground is computed once; every mask must have the same (H, W).
    """
    if len(masks) == 0:
        raise ValueError("obj_iou_any needs at least one mask")
    ms = [validate_mask(mk, f"masks[{i}]") for i, mk in enumerate(masks)]
    shapes = {mk.shape for mk in ms}
    if len(shapes) != 1:
        raise ValueError(f"masks must share one shape, got {sorted(shapes)}")
    fg = _foreground(map, ms[0].shape)
    return max(float(np.count_nonzero(fg & mk) / np.count_nonzero(fg | mk)) for mk in ms)


def _inside_outside(map: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = validate_mask(mask)
    up = upsample_bilinear(map, m.shape)
    return up, m


def contrast(map: np.ndarray, mask: np.ndarray) -> float:
    """Contrast (docs/METHOD.md §5): mean of the upsampled map inside the mask / mean outside.

    Defined values: inside and outside both 0 (zero map) → 0.0; outside 0 and inside > 0
    → `math.inf` (explicit: all the mass is on the object; `contrast_score` gives 1). A mask
    covering the whole image has no outside → ValueError. Deviation: the reference divided
    by (outside + 1e-8).
    """
    up, m = _inside_outside(map, mask)
    if m.all():
        raise ValueError(f"mask covers the whole {m.shape[0]}x{m.shape[1]} image: contrast needs an outside")
    inside, outside = float(up[m].mean()), float(up[~m].mean())
    if outside == 0.0:
        return math.inf if inside > 0.0 else 0.0
    return inside / outside


def contrast_score(contrast_value: float) -> float:
    """min(Contrast / 20, 1) (docs/METHOD.md §5); `inf` → 1.0. Negative or NaN → ValueError."""
    c = float(contrast_value)
    if math.isnan(c) or c < 0:
        raise ValueError(f"contrast must be >= 0, got {contrast_value!r}")
    return min(c / CONTRAST_SCALE, 1.0)


def concentration(map: np.ndarray, mask: np.ndarray) -> float:
    """Concentration (docs/METHOD.md §5): share of the upsampled map's mass inside the mask.

    A zero map has no mass → 0.0 (reference: 0/(0 + 1e-8) = 0 too).
    """
    up, m = _inside_outside(map, mask)
    total = float(up.sum())
    return float(up[m].sum()) / total if total > 0 else 0.0


def f3(iou: float, contrast_score: float, concentration: float) -> float:
    """F3: harmonic mean of Obj-IoU, contrast score and concentration; 0 if any term is 0.

    Each term must lie in [0, 1] (ValueError otherwise, naming it).
    """
    terms = {"iou": iou, "contrast_score": contrast_score, "concentration": concentration}
    for name, v in terms.items():
        fv = float(v)
        if math.isnan(fv) or not 0.0 <= fv <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    vals = [float(v) for v in terms.values()]
    if min(vals) == 0.0:
        return 0.0
    return 3.0 / sum(1.0 / v for v in vals)


def dataset_f3(means: Sequence[float]) -> float:
    """Dataset-level F3: harmonic mean of the dataset *means* (mean Obj-IoU, mean contrast
    score, mean concentration), which is how the paper's tables are computed — not the mean
    of per-sample F3, which is lower whenever one sample has a zero term."""
    if len(means) != 3:
        raise ValueError(f"dataset_f3 needs 3 means (obj_iou, contrast_score, concentration), got {len(means)}")
    return f3(means[0], means[1], means[2])


def pointing_hit(map: np.ndarray, mask: np.ndarray) -> bool:
    """Pointing game: is the upsampled map's argmax inside the mask?

    Ties go to the first maximum in row-major order; a constant (incl. all-zero) map has
    no peak and is a miss.
    """
    up, m = _inside_outside(map, mask)
    if float(up.max()) <= float(up.min()):
        return False
    return bool(m.ravel()[int(np.argmax(up))])


def func_iou(
    function_maps: Sequence[np.ndarray],
    content_maps: Sequence[np.ndarray],
    size: tuple[int, int] | None = None,
) -> float:
    """Func-IoU (TAM; docs/METHOD.md §5): how much function words stay quiet where content lights up.

    T = mean over content words of the Otsu threshold of their uint8 map; for each function
    word, the fraction of pixels of its min-max normalised map below T/255; returns the mean
    over function words (higher = function words less active). All maps must share one
    shape; with `size` they are first upsampled to it. Either list empty → ValueError (the
    metric is undefined: callers skip such answers).
    """
    if len(function_maps) == 0 or len(content_maps) == 0:
        raise ValueError(
            f"func_iou needs function and content maps, got {len(function_maps)} and {len(content_maps)}"
        )
    maps = [validate_map(x, f"function_maps[{i}]") for i, x in enumerate(function_maps)]
    maps += [validate_map(x, f"content_maps[{i}]") for i, x in enumerate(content_maps)]
    shapes = {x.shape for x in maps}
    if len(shapes) != 1:
        raise ValueError(f"func_iou maps must share one shape, got {sorted(shapes)}")
    if size is not None:
        maps = [upsample_bilinear(x, size) for x in maps]
    n_func = len(function_maps)
    thr = float(np.mean([otsu_threshold(to_uint8(x)) for x in maps[n_func:]])) / 255.0
    return float(np.mean([np.mean(_unit(x) < thr) for x in maps[:n_func]]))
