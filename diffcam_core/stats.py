"""Per-map statistics for dataset-scale audits (issue 4 §1): where a map's mass sits.

`map_stats` describes one (h, w) map on its patch grid — mass, centre of mass, spread,
peak, entropy, Gini, border and centre energy — and, given the named object's mask at
image resolution, how much of it lands on the object (docs/METHOD.md §5 metrics on the map
upsampled with `metrics.upsample_bilinear`). `STAT_KEYS` lists every key with its type
and nullability so the storage layer can build an explicit schema from it.

Coordinates are normalised image coordinates: x = (col + 0.5)/w, y = (row + 0.5)/h, so
cell centres lie in (0, 1) and the image centre is (0.5, 0.5); y grows downwards.

Zero map (no positive value; a valid result, docs/METHOD.md §2): `zero_map` True,
`total_mass` 0, `peak_value` 0, every distribution statistic (centre of mass, spread,
peak location, entropy, Gini, border/centre/inside fractions and enrichments) None —
a zero map has no location or shape, and a null is skipped by SQL aggregates where a
made-up 0 or 0.5 would bias them. With a mask: `pointing_hit` False and `obj_iou` 0.0
(the §5 metric values for a map that points nowhere). Without a mask every mask key is
None. No value is ever NaN or infinite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from diffcam.core import metrics
from diffcam.core.settings import Settings

__all__ = ["STAT_KEYS", "StatKey", "StatsSettings", "band_cells", "border_mask", "centre_mask", "gini", "map_stats"]


@dataclass(frozen=True)
class StatKey:
    """One statistic: its dict key, Python type (float, int or bool), nullability, meaning."""

    name: str
    dtype: type
    nullable: bool
    doc: str


_Z = " None for a zero map."
_M = " None without a mask."

#: Every key `map_stats` returns, in order. dtype ∈ {float, int, bool}.
STAT_KEYS: tuple[StatKey, ...] = (
    StatKey("grid_h", int, False, "map rows (patch grid height)"),
    StatKey("grid_w", int, False, "map columns (patch grid width)"),
    StatKey("total_mass", float, False, "sum of the map's values on its grid"),
    StatKey("peak_value", float, False, "maximum value"),
    StatKey("zero_map", bool, False, "True when the map has no positive value"),
    StatKey("com_x", float, True, "centre of mass x in [0, 1]." + _Z),
    StatKey("com_y", float, True, "centre of mass y in [0, 1] (down)." + _Z),
    StatKey("com_dist", float, True, "distance of the centre of mass from (0.5, 0.5), in [0, 0.707]." + _Z),
    StatKey(
        "spread",
        float,
        True,
        "radius of gyration / that of a uniform map on the same grid: 0 = one cell, 1 = uniform,"
        " > 1 = mass pushed to the corners; 0 on a 1x1 grid." + _Z,
    ),
    StatKey("peak_x_frac", float, True, "x of the first (row-major) maximum's cell centre, a fraction of the width "
            "(token_maps.peak_x is the grid column)." + _Z),
    StatKey("peak_y_frac", float, True, "y of the first (row-major) maximum's cell centre, a fraction of the height "
            "(token_maps.peak_y is the grid row)." + _Z),
    StatKey("entropy", float, True, "Shannon entropy of the mass distribution / log(h·w), in [0, 1]." + _Z),
    StatKey("gini", float, True, "Gini coefficient of the cell values, in [0, 1 - 1/(h·w)]." + _Z),
    StatKey("border_frac", float, True, "share of mass in the outer band (see StatsSettings)." + _Z),
    StatKey("border_area_share", float, False, "share of cells in the outer band"),
    StatKey("border_enrichment", float, True, "border_frac / border_area_share: 1 = uniform, > 1 border-biased." + _Z),
    StatKey("centre_frac", float, True, "share of mass in the central box (see StatsSettings)." + _Z),
    StatKey("centre_area_share", float, False, "share of cells in the central box"),
    StatKey("centre_enrichment", float, True, "centre_frac / centre_area_share." + _Z),
    StatKey("mask_area_share", float, True, "share of image pixels inside the mask." + _M),
    StatKey(
        "inside_frac",
        float,
        True,
        "energy pointing game: share of the upsampled map's mass inside the mask (= §5 concentration)." + _M + _Z,
    ),
    StatKey("inside_enrichment", float, True, "inside_frac / mask_area_share: 1 = chance." + _M + _Z),
    StatKey("pointing_hit", bool, True, "argmax of the upsampled map inside the mask; False for a zero map." + _M),
    StatKey("obj_iou", float, True, "§5 Obj-IoU with the mask; 0.0 for a zero map." + _M),
)


class StatsSettings(Settings):
    """Region definitions for the border and centre statistics.

    border_fraction: the outer band is round(border_fraction · side) cells wide per axis
    (at least 1), so it covers the same share of the image on every grid: 12.5% → 1 cell
    on 8×8, 2 on 16×16, 3 on 24×24. A fixed one-cell band would shrink from 44% of an
    8×8 grid to 16% of a 24×24 one and make models with different grids incomparable.
    centre_fraction: the central box holds the cells whose centres lie within
    ±centre_fraction/2 of 0.5 on both axes (0.5 → the middle half of each side).
    """

    border_fraction: float = Field(default=0.125, gt=0.0, le=0.5)
    centre_fraction: float = Field(default=0.5, gt=0.0, le=1.0)


DEFAULT_STATS_SETTINGS = StatsSettings()


def band_cells(side: int, border_fraction: float) -> int:
    """Band width in cells along one axis: max(1, round-half-up(border_fraction · side))."""
    return max(1, int(math.floor(border_fraction * side + 0.5)))


def border_mask(shape: tuple[int, int], settings: StatsSettings = DEFAULT_STATS_SETTINGS) -> np.ndarray:
    """Boolean (h, w) mask of the outer band."""
    h, w = shape
    bh, bw = band_cells(h, settings.border_fraction), band_cells(w, settings.border_fraction)
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    return (rows < bh) | (rows >= h - bh) | (cols < bw) | (cols >= w - bw)


def centre_mask(shape: tuple[int, int], settings: StatsSettings = DEFAULT_STATS_SETTINGS) -> np.ndarray:
    """Boolean (h, w) mask of the central box; |(i + 0.5)/n − 0.5| ≤ c/2 ⇔ |2i + 1 − n| ≤ c·n."""
    h, w = shape
    c = settings.centre_fraction
    rows = np.abs(2 * np.arange(h) + 1 - h) <= c * h
    cols = np.abs(2 * np.arange(w) + 1 - w) <= c * w
    return rows[:, None] & cols[None, :]


def gini(a: np.ndarray) -> float:
    """Gini coefficient of the cell values, in [0, 1 - 1/n]; 0 for a zero map or a single cell
    (one definition for the ``gini`` statistic and the bias audit's flat-map rule)."""
    n = a.size
    total = float(a.sum())
    if not total > 0 or n < 2:
        return 0.0
    srt = np.sort(a.ravel())
    return max(0.0, float(2.0 * (np.arange(1, n + 1) * srt).sum() / (n * total) - (n + 1.0) / n))


def map_stats(
    map: np.ndarray,
    mask: np.ndarray | None = None,
    settings: StatsSettings = DEFAULT_STATS_SETTINGS,
) -> dict[str, float | bool | int | None]:
    """Statistics of one non-negative (h, w) map, keys and types as in `STAT_KEYS`.

    The mask, if given, is the named object's at image resolution (bool or 0/1); the map is
    upsampled to it for the mask keys. See the module docstring for zero-map values.
    """
    a = metrics.validate_map(map)
    h, w = a.shape
    n = h * w
    total = float(a.sum())
    zero = not total > 0.0
    border = border_mask((h, w), settings)
    centre = centre_mask((h, w), settings)
    out: dict[str, float | bool | int | None] = {
        "grid_h": h,
        "grid_w": w,
        "total_mass": total,
        "peak_value": float(a.max()),
        "zero_map": zero,
        "border_area_share": float(border.mean()),
        "centre_area_share": float(centre.mean()),
    }
    if zero:
        out.update(dict.fromkeys(("com_x", "com_y", "com_dist", "spread", "peak_x_frac", "peak_y_frac", "entropy",
                                  "gini")))
        out.update(dict.fromkeys(("border_frac", "border_enrichment", "centre_frac", "centre_enrichment")))
    else:
        p = a / total
        xs = (np.arange(w) + 0.5) / w
        ys = (np.arange(h) + 0.5) / h
        cx = float((p.sum(axis=0) * xs).sum())
        cy = float((p.sum(axis=1) * ys).sum())
        var = float((p.sum(axis=0) * (xs - cx) ** 2).sum() + (p.sum(axis=1) * (ys - cy) ** 2).sum())
        rg_uniform = math.sqrt((w * w - 1) / (12.0 * w * w) + (h * h - 1) / (12.0 * h * h))
        peak = int(np.argmax(a))
        pr, pc = divmod(peak, w)
        nzp = p[p > 0]
        entropy = float(-(nzp * np.log(nzp)).sum() / math.log(n)) if n > 1 else 0.0
        border_frac = float(a[border].sum()) / total
        centre_frac = float(a[centre].sum()) / total
        out.update(
            com_x=cx,
            com_y=cy,
            com_dist=math.hypot(cx - 0.5, cy - 0.5),
            spread=math.sqrt(max(var, 0.0)) / rg_uniform if rg_uniform > 0 else 0.0,
            peak_x_frac=(pc + 0.5) / w,
            peak_y_frac=(pr + 0.5) / h,
            entropy=min(max(entropy, 0.0), 1.0),
            gini=gini(a),
            border_frac=border_frac,
            border_enrichment=border_frac / out["border_area_share"],  # type: ignore[operator]
            centre_frac=centre_frac,
            centre_enrichment=centre_frac / out["centre_area_share"],  # type: ignore[operator]
        )
    if mask is None:
        out.update(dict.fromkeys(("mask_area_share", "inside_frac", "inside_enrichment", "pointing_hit", "obj_iou")))
    else:
        m = metrics.validate_mask(mask)
        share = float(m.mean())
        inside = None if zero else metrics.concentration(a, m)
        out.update(
            mask_area_share=share,
            inside_frac=inside,
            inside_enrichment=None if inside is None else inside / share,
            pointing_hit=metrics.pointing_hit(a, m),
            obj_iou=metrics.obj_iou(a, m),
        )
    return {k.name: out[k.name] for k in STAT_KEYS}
