"""Bias audit: sample-level and dataset-level flags over saliency maps (docs/BIAS.md).

Pure numpy / scikit-learn functions, no I/O: `tasks/bias.py` reads the maps and masks,
calls these, runs the counterfactual re-generation with the model, and writes the rows.

Two questions are asked of a checkpoint's maps:

1. **Sample level** (one word of one answer, one map method): does the map sit on a
   compact region *off* the word's object (`off_object`), on a hot-spot in the image's
   border band or a corner (`border_hotspot`), or carry no location at all (`zero_map`,
   `flat_map`)?
2. **Dataset level** (one word, one method, all samples of a run = one checkpoint):
   is the word's mean map more central than its objects (`centre_bias`), does the map
   ignore where the object is (`ignores_object`, opt-in: the mask-shuffle gap is ≈ 0),
   and is there a cluster of maps whose mass sits consistently on a region off the
   word's objects, more than other words' maps do (`clever_hans`, in the spirit of
   SpRAy: Lapuschkin et al. 2019, spectral clustering of heatmaps with an eigengap
   choice of k)? A `clever_hans` suspect is then confirmed or refuted by a counterfactual
   (`erase_region` / `erase_mask` + re-generate; done by the task, which owns the model),
   and the occurrences its region reaches get `suspect_region` sample flags
   (`region_sample_flags`).

Geometry. A map lives on its patch grid (h, w), which tiles the whole image. A mask
(H, W) is brought to the grid as the share of each cell's pixels inside it
(`cell_coverage`). A *window* is a square of ``round(hotspot_size · side)`` cells
(at least 1) per axis — the same share of the image on every grid (1 cell on 8×8, 3 on
24×24 at the default 0.125). Regions are boxes ``(x0, y0, x1, y1)`` in normalised image
coordinates (x right, y down, [0, 1]). A window is *off-object* when no cell of it has
more than ``object_overlap_max`` of its pixels inside the mask(s) considered.

Maps are compared as mass distributions (each map divided by its sum; a zero map has
no distribution and is left out of dataset statistics, counted in the evidence).

Every flag is a dict with the columns of the ``flags`` table except ``run_id`` (the task
adds it): ``flag_id`` (deterministic, the recipe of `storage.schemas.make_flag_id`),
``sample_id`` (None at dataset level), ``word_index``, ``word``, ``method``, ``kind``,
``score``, ``threshold``, ``confirmed`` (None: no counterfactual run), ``region``
(``"x0,y0,x1,y1"`` or None) and ``evidence_json`` (sorted-key JSON: the rule that fired,
every number it used and the thresholds it compared them with, the sample ids).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from diffcam_core.metrics import upsample_bilinear, validate_map, validate_mask
from diffcam_core.stats import StatsSettings, border_mask, centre_mask

__all__ = [
    "BiasSettings",
    "SAMPLE_KINDS",
    "WordSample",
    "ClusterResult",
    "cell_coverage",
    "window_cells",
    "window_sums",
    "hotspot",
    "sample_flags",
    "word_mean_map",
    "mean_mask_map",
    "centre_bias_index",
    "content_independence",
    "mask_shuffle_gap",
    "cluster_word_maps",
    "suspect_regions",
    "erase_mask",
    "erase_region",
    "box_mask",
    "analyse_word",
    "dataset_flags",
    "all_dataset_flags",
    "region_sample_flags",
    "flag_id",
    "format_region",
]

SAMPLE_KINDS = ("off_object", "border_hotspot", "zero_map", "flat_map", "suspect_region")
_EPS = 1e-12


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BiasSettings:
    """Every threshold and parameter of the bias audit, saved with the flags' evidence.

    Defaults were calibrated on the synthetic planted-cue benchmark (docs/BIAS.md says
    how and with which numbers). Score conventions: a ``*_threshold`` fires when the
    score is >= it, a ``*_max`` when the score is <= it.
    """

    # which maps are audited
    sample_methods: tuple[str, ...] = ("diffusion-cam", "token-gradnorm")
    dataset_methods: tuple[str, ...] = ("diffusion-cam", "token-gradnorm", "token-gradxinput")
    # geometry
    hotspot_size: float = 0.125
    object_overlap_max: float = 0.05
    border_fraction: float = 0.125
    centre_fraction: float = 0.5
    # sample-level flags
    off_object_threshold: float = 0.15
    off_object_dominance: float = 1.0
    border_threshold: float = 0.15
    zero_max: float = 0.0
    flat_gini_max: float = 0.02
    # dataset level: which words are analysed
    min_word_samples: int = 10
    # centre bias
    centre_bias_threshold: float = 0.25
    centre_enrichment_min: float = 1.5
    # mask-shuffle gap (ignores_object)
    shuffle_seed: int = 0
    ignores_object_gap_max: float = 0.02
    ignores_object_similarity_min: float = 0.9
    flag_ignores_object: bool = False
    # clever-hans clustering
    k_max: int = 6
    knn: int = 7
    cluster_max_maps: int = 2000
    cluster_seed: int = 0
    min_cluster_size: int = 5
    min_cluster_frac: float = 0.1
    cluster_enrichment_min: float = 2.0
    member_enrichment_min: float = 1.5
    cluster_consistency_min: float = 0.6
    cluster_specificity_min: float = 1.2
    region_object_overlap_max: float = 0.05
    # counterfactual confirmation
    cf_max_candidates: int = 10
    cf_max_samples: int = 12
    # per-sample counterfactual of a kept clever_hans flag: every sample whose answer has
    # the flag's word (up to this many; 0 = off) gets the region erased and is regenerated
    region_cf_max_samples: int = 2000
    keep_refuted: bool = False
    cf_ring_fraction: float = 0.05
    cf_confirm_min: float = 0.5
    max_evidence_ids: int = 200

    def __post_init__(self) -> None:
        for name in ("sample_methods", "dataset_methods"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unit = ("hotspot_size", "object_overlap_max", "off_object_threshold", "border_threshold",
                "cluster_consistency_min",
                "region_object_overlap_max", "min_cluster_frac", "cf_confirm_min", "flat_gini_max")
        for name in unit:
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if not 0.0 < self.hotspot_size <= 1.0:
            raise ValueError(f"hotspot_size must be in (0, 1], got {self.hotspot_size}")
        if not 0.0 < self.border_fraction <= 0.5:
            raise ValueError(f"border_fraction must be in (0, 0.5], got {self.border_fraction}")
        if not 0.0 < self.centre_fraction <= 1.0:
            raise ValueError(f"centre_fraction must be in (0, 1], got {self.centre_fraction}")
        for name in ("min_word_samples", "k_max", "knn", "min_cluster_size", "cf_max_samples", "max_evidence_ids",
                     "cf_max_candidates", "cluster_max_maps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.region_cf_max_samples) < 0:
            raise ValueError(f"region_cf_max_samples must be >= 0 (0: off), got {self.region_cf_max_samples!r}")
        if self.zero_max < 0 or self.off_object_dominance < 0 or self.cf_ring_fraction <= 0:
            raise ValueError("zero_max and off_object_dominance must be >= 0, cf_ring_fraction > 0")
        for name in ("cluster_specificity_min", "cluster_enrichment_min", "member_enrichment_min",
                     "centre_enrichment_min"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def stats_settings(self) -> StatsSettings:
        return StatsSettings(border_fraction=self.border_fraction, centre_fraction=self.centre_fraction)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BiasSettings:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown BiasSettings fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --------------------------------------------------------------------------- helpers


def flag_id(kind: str, sample_id: str | None = None, word_index: int | None = None, word: str | None = None,
            method: str | None = None, extra: str | None = None) -> str:
    """Deterministic flag id; the recipe of `storage.schemas.make_flag_id` (a test checks they agree)."""
    ident = json.dumps([kind, sample_id, word_index, word, method, extra], ensure_ascii=False)
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def format_region(box: Sequence[float]) -> str:
    """``"x0,y0,x1,y1"`` with 4 decimals (the ``flags.region`` format)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)) or x0 > x1 or y0 > y1:
        raise ValueError(f"region {box} is not a box inside [0, 1]^2")
    return ",".join(f"{v:.4f}" for v in (x0, y0, x1, y1))


def _r(v: float | None, nd: int = 6) -> float | None:
    return None if v is None else round(float(v), nd)


def _json(d: Mapping[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, ensure_ascii=False, allow_nan=False)


def _flag(kind: str, score: float, threshold: float, evidence: dict[str, Any], *, sample_id: str | None = None,
          word_index: int | None = None, word: str | None = None, method: str | None = None,
          region: Sequence[float] | None = None, extra: str | None = None) -> dict[str, Any]:
    return {
        "flag_id": flag_id(kind, sample_id, word_index, word, method, extra),
        "sample_id": sample_id,
        "word_index": word_index,
        "word": word,
        "method": method,
        "kind": kind,
        "score": float(score),
        "threshold": float(threshold),
        "confirmed": None,
        "region": None if region is None else format_region(region),
        "evidence_json": _json(evidence),
    }


def _unit_mass(m: np.ndarray) -> np.ndarray | None:
    s = float(m.sum())
    return None if not s > 0 else m / s


def _mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
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
    m = _mask(mask).astype(np.float64)
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


def _window_max(a: np.ndarray, win: tuple[int, int]) -> np.ndarray:
    """Max of ``a`` over every window (same indexing as `window_sums`)."""
    h, w = a.shape
    wh, ww = win
    out = np.full((h - wh + 1, w - ww + 1), -np.inf)
    for dr in range(wh):
        for dc in range(ww):
            out = np.maximum(out, a[dr:dr + h - wh + 1, dc:dc + w - ww + 1])
    return out


def _box(r: int, c: int, win: tuple[int, int], grid: tuple[int, int]) -> tuple[float, float, float, float]:
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


def _gini(a: np.ndarray) -> float:
    n = a.size
    total = float(a.sum())
    if not total > 0 or n < 2:
        return 0.0
    srt = np.sort(a.ravel())
    return max(0.0, float(2.0 * (np.arange(1, n + 1) * srt).sum() / (n * total) - (n + 1.0) / n))


# --------------------------------------------------------------------------- sample level


def sample_flags(
    word_maps: Mapping[str, np.ndarray],
    mask: np.ndarray | None,
    stats: Mapping[str, Mapping[str, Any]] | None = None,
    settings: BiasSettings = BiasSettings(),
    *,
    sample_id: str,
    word_index: int,
    word: str,
    all_masks: Sequence[np.ndarray] = (),
) -> list[dict[str, Any]]:
    """Sample-level flags of one word: `off_object`, `border_hotspot`, `zero_map`, `flat_map`.

    ``word_maps``: method → (h, w) map (methods outside ``settings.sample_methods`` are
    ignored). ``mask``: the word's object mask (H, W) or None (no `off_object` then).
    ``all_masks``: every object mask of the image; hot-spot windows must avoid all of
    them (attention on *another* object is a grounding error, not a spurious cue) — when
    empty, only ``mask`` is avoided. ``stats``: optional method → `map_stats` dict, copied
    into the evidence (``inside_frac``, ``obj_iou``) when present.

    Rules (score, threshold, when it fires):
    - `zero_map`: score = map max; fires when <= ``zero_max`` (no positive value).
    - `flat_map`: score = Gini of the cell values; fires when <= ``flat_gini_max`` (a
      constant or near-constant map has no location).
    - `off_object` (needs ``mask``): score = share of the map's mass in the densest
      off-object window; fires when >= ``off_object_threshold`` and >= ``off_object_dominance``
      × the share inside the word's mask (cell-coverage weighted), i.e. the hot-spot holds
      at least as much as the whole object.
    - `border_hotspot`: score = share in the densest off-object window lying inside the
      border band; fires when >= ``border_threshold``. Evidence says whether it is a corner.
    A zero or flat map gets only its own flag.
    """
    ss = settings.stats_settings
    out: list[dict[str, Any]] = []
    masks = [_mask(m) for m in all_masks] + ([_mask(mask)] if mask is not None else [])
    cov_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
    for method in sorted(word_maps):
        if method not in settings.sample_methods:
            continue
        a = validate_map(word_maps[method])
        grid = a.shape
        base = {"sample_id": sample_id, "word_index": int(word_index), "word": word, "method": method}
        ident = dict(sample_id=sample_id, word_index=int(word_index), word=word, method=method)
        peak = float(a.max())
        if peak <= settings.zero_max:
            ev = {**base, "rule": "score <= threshold", "map_max": peak, "grid": list(grid),
                  "meaning": "the map has no positive value: it points nowhere"}
            out.append(_flag("zero_map", peak, settings.zero_max, ev, **ident))
            continue
        g = _gini(a)
        if g <= settings.flat_gini_max:
            ev = {**base, "rule": "score <= threshold", "gini": g, "map_max": peak,
                  "map_min": float(a.min()), "grid": list(grid),
                  "meaning": "the map is (nearly) constant: it carries no location"}
            out.append(_flag("flat_map", g, settings.flat_gini_max, ev, **ident))
            continue
        p = a / float(a.sum())
        win = window_cells(grid, settings.hotspot_size)
        if grid not in cov_cache:
            cov_any = np.zeros(grid)
            for m in masks:
                cov_any = np.maximum(cov_any, cell_coverage(m, grid))
            cov_cache[grid] = (cov_any, None if mask is None else cell_coverage(mask, grid))
        cov_any, cov = cov_cache[grid]
        off = _window_max(cov_any, win) <= settings.object_overlap_max
        pr, pc = divmod(int(np.argmax(a)), grid[1])
        st = dict(stats.get(method, {})) if stats else {}
        common = {**base, "grid": list(grid), "window_cells": list(win),
                  "window_area_share": win[0] * win[1] / (grid[0] * grid[1]),
                  "peak_cell": [pr, pc], "inside_frac": _r(st.get("inside_frac")), "obj_iou": _r(st.get("obj_iou")),
                  "masks_avoided": len(masks)}
        if cov is not None:
            inside = float((p * cov).sum())
            hs = hotspot(p, win, off)
            if hs is not None:
                share, (r, c) = hs
                box = _box(r, c, win, grid)
                need = max(settings.off_object_threshold, settings.off_object_dominance * inside)
                if share >= need:
                    ev = {**common, "rule": "score >= threshold and score >= dominance * inside_share",
                          "hotspot_share": share, "inside_share": inside, "dominance": settings.off_object_dominance,
                          "hotspot_enrichment": share / common["window_area_share"],
                          "peak_in_hotspot": r <= pr < r + win[0] and c <= pc < c + win[1],
                          "mask_area_share": float(validate_mask(mask).mean()),
                          "meaning": "most of the map's mass sits on a compact region off the word's object"}
                    out.append(_flag("off_object", share, settings.off_object_threshold, ev, region=box, **ident))
        band = border_mask(grid, ss)
        in_band = _window_max(np.where(band, 0.0, 1.0), win) == 0.0  # every cell of the window in the band
        hs = hotspot(p, win, in_band & off)
        if hs is not None and hs[0] >= settings.border_threshold:
            share, (r, c) = hs
            h, w = grid
            corner = (r == 0 or r + win[0] == h) and (c == 0 or c + win[1] == w)
            ev = {**common, "rule": "score >= threshold", "hotspot_share": share, "corner": bool(corner),
                  "border_frac": float(p[band].sum()), "border_area_share": float(band.mean()),
                  "hotspot_enrichment": share / common["window_area_share"],
                  "meaning": "a compact hot-spot in the image's border band" + (" (a corner)" if corner else "")}
            out.append(_flag("border_hotspot", share, settings.border_threshold, ev, region=_box(r, c, win, grid),
                             **ident))
    return out


# --------------------------------------------------------------------------- dataset level


@dataclass(frozen=True, eq=False)
class WordSample:
    """One occurrence of a word in one sample, for the dataset-level analysis.

    ``map``: (h, w) non-negative. ``coverage``: `cell_coverage` of the word's object mask
    on the map's grid (None: the word has no mask). ``objects_coverage``: the same for the
    union of every object of the image (None: no masks; then ``coverage`` is used).
    ``object_boxes``: optional, not used in the statistics (carried for the task).
    """

    sample_id: str
    word_index: int
    map: np.ndarray
    coverage: np.ndarray | None = None
    objects_coverage: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _common_grid(items: Sequence[WordSample]) -> tuple[int, int]:
    grids = [tuple(it.map.shape) for it in items]
    vals, counts = np.unique(np.array(grids), axis=0, return_counts=True)
    best = vals[int(np.argmax(counts))]
    return int(best[0]), int(best[1])


def _on_grid(a: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a if a.shape == tuple(grid) else np.maximum(upsample_bilinear(a, grid), 0.0)


def word_mean_map(maps: Sequence[np.ndarray]) -> np.ndarray | None:
    """Mean of the maps as mass distributions (each divided by its sum; zero maps left out).
    All maps must share a grid. None when every map is zero."""
    ps = [q for q in (_unit_mass(np.asarray(m, dtype=np.float64)) for m in maps) if q is not None]
    return None if not ps else np.mean(ps, axis=0)


def mean_mask_map(coverages: Sequence[np.ndarray]) -> np.ndarray | None:
    """Mean object distribution: each coverage map divided by its sum (empty ones left out)."""
    return word_mean_map(coverages)


def centre_bias_index(mean_map: np.ndarray, mean_mask: np.ndarray, settings: BiasSettings = BiasSettings()) -> dict:
    """Centre mass of the mean map vs that of the mean object-mask map.

    ``score`` = centre_frac(mean map) − centre_frac(mean mask map) (0: the saliency is as
    central as the objects; > 0: more central). Also: both fractions, their ratio, the
    central box's area share and the mean map's centre enrichment (centre_frac / area
    share; 1 = as central as a uniform map).
    """
    c = centre_mask(mean_map.shape, settings.stats_settings)
    pm = mean_map / max(float(mean_map.sum()), _EPS)
    pk = mean_mask / max(float(mean_mask.sum()), _EPS)
    fm, fk = float(pm[c].sum()), float(pk[c].sum())
    area = float(c.mean())
    return {"score": fm - fk, "map_centre_frac": fm, "mask_centre_frac": fk,
            "ratio": fm / fk if fk > 0 else None, "centre_area_share": area, "map_centre_enrichment": fm / area}


def content_independence(maps: Sequence[np.ndarray]) -> dict[str, Any]:
    """How similar each map is to the word's mean map: cosine similarity of each mass
    distribution with the leave-one-out mean of the others (1: every map is the same map,
    whatever the image). Returns mean, median, per-map values."""
    ps = np.array([q for q in (_unit_mass(np.asarray(m, dtype=np.float64)) for m in maps) if q is not None])
    n = len(ps)
    if n < 2:
        return {"mean": None, "median": None, "n": n, "values": []}
    flat = ps.reshape(n, -1)
    total = flat.sum(0)
    loo = (total[None, :] - flat) / (n - 1)
    num = (flat * loo).sum(1)
    den = np.linalg.norm(flat, axis=1) * np.linalg.norm(loo, axis=1)
    sims = np.where(den > 0, num / np.maximum(den, _EPS), 0.0)
    return {"mean": float(sims.mean()), "median": float(np.median(sims)), "n": n, "values": sims.tolist()}


def _derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point (n >= 2): a random cyclic shift of a random order."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), n]))
    order = rng.permutation(n)
    shift = int(rng.integers(1, n))
    perm = np.empty(n, dtype=int)
    perm[order] = order[(np.arange(n) + shift) % n]
    return perm


def mask_shuffle_gap(maps: Sequence[np.ndarray], coverages: Sequence[np.ndarray], seed: int = 0) -> dict[str, Any]:
    """Inside-mask share with the sample's own mask minus with another sample's mask.

    Share = Σ p·coverage for the map's mass distribution p. The other sample is given by
    a seeded derangement (deterministic). gap ≈ 0: the map does not follow the object.
    Zero maps are left out. Returns own mean, shuffled mean, gap, n and the permutation.
    """
    pairs = [(q, np.asarray(c, dtype=np.float64)) for q, c in
             ((_unit_mass(np.asarray(m, dtype=np.float64)), c) for m, c in zip(maps, coverages)) if q is not None]
    n = len(pairs)
    if n < 2:
        return {"own": None, "shuffled": None, "gap": None, "n": n, "perm": []}
    perm = _derangement(n, seed)
    own = np.array([float((p * c).sum()) for p, c in pairs])
    shuf = np.array([float((pairs[i][0] * pairs[perm[i]][1]).sum()) for i in range(n)])
    return {"own": float(own.mean()), "shuffled": float(shuf.mean()), "gap": float(own.mean() - shuf.mean()),
            "n": n, "perm": perm.tolist()}


@dataclass(frozen=True)
class ClusterResult:
    """Spectral clustering of one word's maps: ``labels`` per map, ``k`` chosen by the
    largest eigengap of the normalised Laplacian among the first ``k_max`` + 1 eigenvalues."""

    labels: np.ndarray
    k: int
    eigenvalues: tuple[float, ...]
    affinity: np.ndarray


def _affinity(ps: np.ndarray, knn: int) -> np.ndarray:
    """Locally scaled Gaussian affinity (Zelnik-Manor & Perona 2004) on the Hellinger
    distance between mass distributions: A_ij = exp(−d_ij² / (σ_i σ_j)), σ_i = distance
    to the ``knn``-th nearest neighbour (floored to avoid 0 for duplicate maps)."""
    n = len(ps)
    x = np.sqrt(ps.reshape(n, -1)) / math.sqrt(2.0)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    np.fill_diagonal(d2, 0.0)
    d = np.sqrt(d2)
    kk = min(max(1, knn), n - 1)
    sigma = np.sort(d, axis=1)[:, kk]
    sigma = np.maximum(sigma, max(float(np.median(sigma)) * 1e-3, 1e-6))
    a = np.exp(-d2 / (sigma[:, None] * sigma[None, :]))
    np.fill_diagonal(a, 0.0)
    return a


def _smallest_laplacian_eigenvalues(a: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` smallest eigenvalues of L = I − D^-1/2 A D^-1/2, ascending. Dense
    `eigvalsh` up to 300 maps; above, ARPACK on the ``m`` largest of D^-1/2 A D^-1/2
    (λ_L = 1 − μ) — O(n²) per iteration instead of O(n³)."""
    n = len(a)
    deg = a.sum(1)
    dinv = 1.0 / np.sqrt(np.maximum(deg, _EPS))
    norm = dinv[:, None] * a * dinv[None, :]
    if n <= 300:
        return np.sort(np.linalg.eigvalsh(np.eye(n) - norm))[:m]
    from scipy.sparse.linalg import eigsh

    mu = eigsh(norm, k=min(m, n - 1), which="LA", v0=np.full(n, 1.0 / math.sqrt(n)), return_eigenvectors=False)
    return np.sort(1.0 - mu)


def cluster_word_maps(maps: Sequence[np.ndarray], settings: BiasSettings = BiasSettings()) -> ClusterResult:
    """Cluster one word's maps (same grid, none zero) by spectral clustering (SpRAy).

    Affinity: `_affinity`. k: 1 + argmax of the gaps λ_{i+1} − λ_i, i = 0..k_max−1, of the
    symmetric normalised Laplacian's smallest eigenvalues (k = 1 when the first gap is the
    largest: one cluster). Labels for k > 1: scikit-learn's SpectralClustering on the
    precomputed affinity with ``assign_labels="cluster_qr"`` (deterministic).

    Scale: with more than ``cluster_max_maps`` maps, the clustering runs on a seeded
    subset of that size (the affinity is dense, n² memory) and every other map joins the
    cluster whose mean map is nearest in Hellinger distance. ``affinity`` is then the
    subset's.
    """
    ps = np.array([np.asarray(m, dtype=np.float64) / float(np.sum(m)) for m in maps])
    n = len(ps)
    if n < 3:
        return ClusterResult(np.zeros(n, dtype=int), 1, (), np.ones((n, n)))
    sub = np.arange(n)
    if n > settings.cluster_max_maps:
        rng = np.random.default_rng(np.random.SeedSequence([settings.cluster_seed, n]))
        sub = np.sort(rng.choice(n, size=settings.cluster_max_maps, replace=False))
    a = _affinity(ps[sub], settings.knn)
    kmax = min(settings.k_max, len(sub) - 1)
    ev = _smallest_laplacian_eigenvalues(a, kmax + 2)
    gaps = np.diff(ev[: kmax + 1])
    k = int(np.argmax(gaps)) + 1 if len(gaps) else 1
    if k == 1:
        labels = np.zeros(n, dtype=int)
    else:
        from sklearn.cluster import SpectralClustering

        lab_sub = SpectralClustering(
            n_clusters=k, affinity="precomputed", assign_labels="cluster_qr", random_state=settings.cluster_seed
        ).fit_predict(a + 1e-12)
        labels = np.full(n, -1)
        labels[sub] = lab_sub
        if len(sub) < n:
            roots = np.sqrt(ps.reshape(n, -1))
            means = np.array([np.sqrt(ps[sub][lab_sub == c].mean(0).ravel()) for c in range(k)])
            rest = np.setdiff1d(np.arange(n), sub)
            d = ((roots[rest][:, None, :] - means[None, :, :]) ** 2).sum(-1)
            labels[rest] = np.argmin(d, axis=1)
        # relabel by size (largest first), ties by first member: stable ids for flag ids
        order = sorted(set(labels.tolist()), key=lambda lab: (-(labels == lab).sum(), int(np.argmax(labels == lab))))
        remap = {old: new for new, old in enumerate(order)}
        labels = np.array([remap[v] for v in labels.tolist()])
    return ClusterResult(labels, k, tuple(float(v) for v in ev[: kmax + 2]), a)


def suspect_regions(
    ps: np.ndarray,
    labels: np.ndarray,
    obj_cov: Sequence[np.ndarray | None],
    settings: BiasSettings = BiasSettings(),
) -> list[dict[str, Any]]:
    """Per cluster: its mean map, and the densest window off the word's objects.

    ``ps``: (n, h, w) mass distributions; ``obj_cov[i]``: object coverage of sample i
    (None: unknown). A window is off-object when, averaged over the cluster's members with
    a known coverage, no cell of it has a mean coverage above ``region_object_overlap_max``;
    a cluster with no known coverage is never suspect (no masks: on- and off-object
    cannot be told apart; its ``reason`` says so). Returns one dict per cluster:
    cluster, size, members (indices), prototype (mean map), and when an off-object
    window exists: box, share (cluster mean mass in it), consistency (share of members
    whose own map has >= ``member_enrichment_min`` × the window's area share of its mass
    there), rest_share (mean share
    there in the word's other clusters, None if none), object_overlap, suspect (bool:
    size, share and consistency all pass their thresholds).
    """
    n, h, w = ps.shape
    grid = (h, w)
    win = window_cells(grid, settings.hotspot_size)
    area = win[0] * win[1] / (h * w)
    known = np.array([c is not None for c in obj_cov], dtype=bool)
    covs = np.array([np.zeros(grid) if c is None else c for c in obj_cov])
    out = []
    for lab in sorted(set(labels.tolist())):
        idx = np.nonzero(labels == lab)[0]
        proto = ps[idx].mean(0)
        rec: dict[str, Any] = {"cluster": int(lab), "size": int(len(idx)), "members": idx.tolist(),
                               "prototype": proto, "suspect": False, "box": None}
        kn = idx[known[idx]]
        if len(kn) == 0:
            rec["reason"] = "no member has object masks: on- and off-object cannot be told apart"
            out.append(rec)
            continue
        overlap = _window_max(covs[kn].mean(0), win)
        allowed = overlap <= settings.region_object_overlap_max
        hs = hotspot(proto, win, allowed)
        if hs is not None:
            share, (r, c) = hs
            member_share = np.array([window_sums(ps[i], win)[r, c] for i in idx])
            rest = np.nonzero(labels != lab)[0]
            rest_share = float(np.mean([window_sums(ps[i], win)[r, c] for i in rest])) if len(rest) else None
            consistency = float((member_share >= settings.member_enrichment_min * area).mean())
            big = len(idx) >= settings.min_cluster_size and len(idx) >= settings.min_cluster_frac * n
            rec.update(
                box=_box(r, c, win, grid), window=[int(r), int(c), int(win[0]), int(win[1])], share=share,
                consistency=consistency, rest_share=rest_share, object_overlap=float(overlap[r, c]),
                member_shares=member_share.tolist(),
                suspect=bool(big and share >= settings.cluster_enrichment_min * area
                             and consistency >= settings.cluster_consistency_min),
            )
        out.append(rec)
    return out


def analyse_word(word: str, method: str, items: Sequence[WordSample],
                 settings: BiasSettings = BiasSettings()) -> dict[str, Any]:
    """Everything the dataset level computes for one (word, method): mean map, mean mask
    map, centre-bias index, content independence, mask-shuffle gap, clusters and their
    suspect regions. Maps on another grid than the most common one are resampled to it
    (bilinear; coverages likewise). Zero maps are counted and left out."""
    grid = _common_grid(items) if items else (1, 1)
    keep = [it for it in items if float(np.asarray(it.map).sum()) > 0]
    maps = [_on_grid(it.map, grid) for it in keep]
    ps = np.array([m / m.sum() for m in maps]) if maps else np.zeros((0, *grid))
    cov = [None if it.coverage is None else _on_grid(it.coverage, grid).clip(0, 1) for it in keep]
    objc = [None if (it.objects_coverage if it.objects_coverage is not None else it.coverage) is None
            else _on_grid(it.objects_coverage if it.objects_coverage is not None else it.coverage, grid).clip(0, 1)
            for it in keep]
    res: dict[str, Any] = {"word": word, "method": method, "grid": list(grid), "n": len(items),
                           "n_zero": len(items) - len(keep), "sample_ids": [it.sample_id for it in keep],
                           "word_indices": [int(it.word_index) for it in keep]}
    res["objects_cov"] = objc
    res["mean_map"] = ps.mean(0) if len(ps) else None
    with_mask = [i for i, c in enumerate(cov) if c is not None and c.sum() > 0]
    res["n_masked"] = len(with_mask)
    res["mean_mask_map"] = mean_mask_map([cov[i] for i in with_mask]) if with_mask else None
    res["centre_bias"] = (centre_bias_index(ps[with_mask].mean(0), res["mean_mask_map"], settings)
                          if with_mask else None)
    res["content_independence"] = content_independence(list(ps))
    res["shuffle"] = (mask_shuffle_gap([ps[i] for i in with_mask], [cov[i] for i in with_mask], settings.shuffle_seed)
                      if len(with_mask) >= 2 else None)
    if len(ps) >= settings.min_word_samples:
        cl = cluster_word_maps(list(ps), settings)
        res["clusters"] = {"k": cl.k, "eigenvalues": list(cl.eigenvalues), "labels": cl.labels.tolist()}
        res["regions"] = suspect_regions(ps, cl.labels, objc, settings)
    else:
        res["clusters"] = None
        res["regions"] = []
    res["ps"] = ps
    return res


def _ids(ids: Sequence[str], settings: BiasSettings) -> dict[str, Any]:
    ids = list(ids)
    return {"sample_ids": ids[: settings.max_evidence_ids], "n_sample_ids": len(ids),
            "sample_ids_truncated": len(ids) > settings.max_evidence_ids}


def _grid_list(a: np.ndarray | None) -> list[list[float]] | None:
    return None if a is None else np.round(np.asarray(a, dtype=np.float64), 6).tolist()


def dataset_flags(analysis: Mapping[str, Any], settings: BiasSettings = BiasSettings(),
                  baseline: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Dataset-level flags of one (word, method) from `analyse_word`'s result.

    ``baseline``: (m, h, w) mass distributions of the same method's maps of the *other*
    content words of the run (`all_dataset_flags` builds it). A suspect region must hold
    ``cluster_specificity_min`` × more of the cluster's mass than of those maps' mass on
    average: a hot-spot every word's map has (a position artefact of the map method, a
    token the model always reads) is not a cue of this word. None: not assessed (said in
    the evidence).

    - `centre_bias` (needs >= ``min_word_samples`` masked maps): score = `centre_bias_index`
      score; fires when >= ``centre_bias_threshold`` and the mean map's centre enrichment
      >= ``centre_enrichment_min``.
    - `ignores_object` (same need): score = mask-shuffle gap; fires when <=
      ``ignores_object_gap_max`` and the mean leave-one-out similarity to the word's mean
      map >= ``ignores_object_similarity_min`` (the maps are the same map whatever the
      object's position).
    - `clever_hans`: one per suspect cluster (`suspect_regions`); score = the cluster mean
      map's mass share in the region; threshold ``cluster_enrichment_min`` × the window's
      area share (a uniform map's share there); also needs
      the word specificity above; ``confirmed`` stays None until the counterfactual runs.
    """
    word, method = analysis["word"], analysis["method"]
    out: list[dict[str, Any]] = []
    grid = analysis["grid"]
    base = {"word": word, "method": method, "grid": grid, "n_maps": analysis["n"], "n_zero_maps": analysis["n_zero"],
            "n_masked": analysis["n_masked"], "level": "dataset"}
    ci = analysis["content_independence"]
    sh = analysis["shuffle"]
    ci_ev = {"similarity_to_mean_mean": _r(ci["mean"]), "similarity_to_mean_median": _r(ci["median"])}
    sh_ev = None if sh is None else {"own_inside": _r(sh["own"]), "shuffled_inside": _r(sh["shuffled"]),
                                     "gap": _r(sh["gap"]), "n": sh["n"], "seed": settings.shuffle_seed}
    sids = analysis["sample_ids"]
    cb = analysis["centre_bias"]
    if cb is not None and analysis["n_masked"] >= settings.min_word_samples:
        if cb["score"] >= settings.centre_bias_threshold and cb["map_centre_enrichment"] >= settings.centre_enrichment_min:
            ps = analysis["ps"]
            cmask = centre_mask(tuple(grid), settings.stats_settings)
            per = np.array([float(p[cmask].sum()) for p in ps])
            top = [sids[i] for i in np.argsort(-per, kind="stable")]
            ev = {**base, "rule": "score >= threshold and map_centre_enrichment >= centre_enrichment_min",
                  **{k: _r(v) for k, v in cb.items()}, "centre_enrichment_min": settings.centre_enrichment_min,
                  "centre_fraction": settings.centre_fraction, "content_independence": ci_ev, "shuffle": sh_ev,
                  "mean_map": _grid_list(analysis["mean_map"]), "mean_mask_map": _grid_list(analysis["mean_mask_map"]),
                  "per_sample_centre_frac_mean": _r(float(per.mean())),
                  **_ids(top, settings),
                  "meaning": "the word's saliency sits at the image centre more than its objects do"}
            h, w = grid
            rows = np.nonzero(cmask.any(1))[0]
            cols = np.nonzero(cmask.any(0))[0]
            box = (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)
            out.append(_flag("centre_bias", cb["score"], settings.centre_bias_threshold, ev, word=word,
                             method=method, region=box))
    if settings.flag_ignores_object and sh is not None and sh["n"] >= settings.min_word_samples \
            and ci["mean"] is not None:
        if sh["gap"] <= settings.ignores_object_gap_max and ci["mean"] >= settings.ignores_object_similarity_min:
            ev = {**base, "rule": "score <= threshold and similarity_to_mean_mean >= similarity_min",
                  "shuffle": sh_ev, "content_independence": ci_ev,
                  "similarity_min": settings.ignores_object_similarity_min,
                  "mean_map": _grid_list(analysis["mean_map"]), **_ids(sids, settings),
                  "meaning": "the map is the same whatever the image: moving the object does not move it"}
            out.append(_flag("ignores_object", sh["gap"], settings.ignores_object_gap_max, ev, word=word,
                             method=method))
    cl = analysis["clusters"]
    # suspect clusters that point at the same window become one flag (one region, one id)
    by_box: dict[tuple[float, ...], list[dict[str, Any]]] = {}
    for reg in analysis["regions"]:
        if reg["suspect"]:
            by_box.setdefault(tuple(reg["box"]), []).append(reg)
    centre_flag = next((f for f in out if f["kind"] == "centre_bias"), None)
    for box, regs in by_box.items():
        r, c, wh, ww = regs[0]["window"]
        if centre_flag is not None:
            cm = centre_mask(tuple(grid), settings.stats_settings)
            if cm[r:r + wh, c:c + ww].all():
                continue  # the same finding as the centre_bias flag: reported once, there
        idx = [i for reg in regs for i in reg["members"]]
        shares = np.array([s for reg in regs for s in reg["member_shares"]])
        sizes = np.array([reg["size"] for reg in regs], dtype=np.float64)
        share = float(np.dot(sizes, [reg["share"] for reg in regs]) / sizes.sum())
        area = wh * ww / (grid[0] * grid[1])
        consistency = float((shares >= settings.member_enrichment_min * area).mean())
        proto = np.asarray(analysis["ps"])[idx].mean(0)
        others = [i for i in range(len(sids)) if i not in set(idx)]
        rest_share = (float(np.asarray(analysis["ps"])[others][:, r:r + wh, c:c + ww].sum(axis=(1, 2)).mean())
                      if others else None)
        specificity = base_share = None
        if baseline is not None and len(baseline) and tuple(baseline.shape[1:]) == tuple(grid):
            base_share = float(baseline[:, r:r + wh, c:c + ww].sum(axis=(1, 2)).mean())
            specificity = share / max(base_share, _EPS)
            if specificity < settings.cluster_specificity_min:
                continue
        order = np.argsort(-shares, kind="stable")
        ev = {**base, "rule": "score >= threshold and consistency >= consistency_min and size >= min size "
                              "and specificity >= specificity_min (clusters with the same region merged)",
              "clusters": [reg["cluster"] for reg in regs], "cluster_sizes": [reg["size"] for reg in regs],
              "cluster_shares": [_r(reg["share"]) for reg in regs], "k": cl["k"],
              "eigenvalues": [_r(v) for v in cl["eigenvalues"]],
              "cluster_size": len(idx), "cluster_share_of_word": len(idx) / max(len(sids), 1),
              "region_share": share, "consistency": consistency,
              "consistency_min": settings.cluster_consistency_min,
              "member_share_min": settings.member_enrichment_min * area, "window_area_share": area,
              "cluster_enrichment": share / area,
              "rest_share": _r(rest_share), "object_overlap": max(reg["object_overlap"] for reg in regs),
              "other_words_share": _r(base_share), "specificity": _r(specificity),
              "specificity_min": settings.cluster_specificity_min,
              "n_other_word_maps": 0 if baseline is None else int(len(baseline)),
              "region_object_overlap_max": settings.region_object_overlap_max,
              "window": [r, c, wh, ww], "prototype": _grid_list(proto),
              "mean_map": _grid_list(analysis["mean_map"]),
              "member_word_indices": [analysis["word_indices"][idx[i]] for i in order][: settings.max_evidence_ids],
              "member_region_shares": [round(float(shares[i]), 6) for i in order][: settings.max_evidence_ids],
              **_ids([sids[idx[i]] for i in order], settings),
              "content_independence": ci_ev, "shuffle": sh_ev,
              "meaning": "a cluster of this word's maps puts its mass on one region off the word's objects"}
        out.append(_flag("clever_hans", share, settings.cluster_enrichment_min * area, ev, word=word,
                         method=method, region=box, extra=format_region(box)))
    return out


def all_dataset_flags(analyses: Mapping[tuple[str, str], Mapping[str, Any]],
                      settings: BiasSettings = BiasSettings()) -> list[dict[str, Any]]:
    """`dataset_flags` for every (word, method) analysis of one run, each with the other
    words' maps of the same method (and grid) as its specificity baseline."""
    out: list[dict[str, Any]] = []
    for (word, method), a in sorted(analyses.items()):
        others = [o["ps"] for (w2, m2), o in analyses.items()
                  if m2 == method and w2 != word and len(o["ps"]) and tuple(o["grid"]) == tuple(a["grid"])]
        out.extend(dataset_flags(a, settings, np.concatenate(others) if others else None))
    return out


def region_sample_flags(flag: Mapping[str, Any], analysis: Mapping[str, Any],
                        settings: BiasSettings = BiasSettings(),
                        tests: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Sample-level `suspect_region` flags from one dataset-level `clever_hans` flag.

    An occurrence of the flag's word is flagged when either
    - saliency: its map (the flag's method) puts at least ``member_enrichment_min`` × the
      window's area share of its mass in the flag's region — the test that makes a
      cluster member "consistent" — and the sample was not tested; or
    - counterfactual: ``tests[sample_id]`` (the sample regenerated with only the region
      erased, and with a control window erased instead, `tasks.bias.region_counterfactuals`)
      shows the word vanish without the region and not without the control.
    A tested sample whose word did not vanish is never flagged, however salient the region:
    its own counterfactual says the answer does not depend on it.
    Score = the share, threshold = that minimum (so a row reached only by the
    counterfactual has score < threshold); ``confirmed`` = whether the word vanished
    (None: the sample was not tested). Evidence: the share, its enrichment over a uniform
    map, the map's own background level (median share of its off-object windows) and the
    ratio to it, both answers, the dataset flag's id and confirmation.
    ``analysis``: the word's `analyse_word` result for the flag's method.
    """
    ev = json.loads(flag["evidence_json"])
    r, c, wh, ww = ev["window"]
    ps = np.asarray(analysis["ps"])
    if not len(ps):
        return []
    win = (wh, ww)
    area = wh * ww / (ps.shape[1] * ps.shape[2])
    need = settings.member_enrichment_min * area
    out = []
    tests = tests or {}
    for i, p in enumerate(ps):
        sums = window_sums(p, win)
        share = float(sums[r, c])
        test = tests.get(analysis["sample_ids"][i])
        vanished = None if test is None else bool(test["vanished"])
        if vanished is False or (share < need and not vanished):
            continue
        cov = analysis["objects_cov"][i]
        off = np.ones_like(sums, dtype=bool) if cov is None else _window_max(cov, win) <= settings.object_overlap_max
        bg = float(np.median(sums[off] if off.any() else sums))
        sid, wi = analysis["sample_ids"][i], analysis["word_indices"][i]
        e = {"sample_id": sid, "word_index": int(wi), "word": flag["word"], "method": flag["method"],
             "rule": "untested and score >= threshold (share of the map's mass in the dataset flag's region >= "
                     "member_enrichment_min x the region's area share), or the word vanishes when only the "
                     "region is erased and not when a control window is (confirmed)",
             "reached_by": [k for k, hit in (("saliency", share >= need), ("counterfactual", bool(vanished))) if hit],
             "counterfactual": None if test is None else dict(test),
             "region_share": share, "region_enrichment": share / area, "member_enrichment_min":
             settings.member_enrichment_min, "background_median_share": bg, "ratio_to_background": share / max(bg, _EPS),
             "dataset_flag_id": flag["flag_id"], "dataset_flag_confirmed": flag.get("confirmed"),
             "dataset_flag_score": flag["score"], "grid": list(ps.shape[1:]), "window": [r, c, wh, ww],
             "meaning": "this occurrence of the word puts an outsized share of its map on, or (confirmed) "
                        "depends on, the region a dataset-level clever_hans flag found for the word"}
        row = _flag("suspect_region", share, need, e, sample_id=sid, word_index=int(wi), word=flag["word"],
                    method=flag["method"], region=[float(v) for v in flag["region"].split(",")])
        row["confirmed"] = vanished
        out.append(row)
    return out


# --------------------------------------------------------------------------- counterfactual images


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
    m = _mask(mask)
    if m.shape != img.shape[:2]:
        raise ValueError(f"mask is {m.shape[0]}x{m.shape[1]}, image is {img.shape[0]}x{img.shape[1]}")
    out = img.copy()
    if not m.any():
        return out
    H, W = m.shape
    r = ring if ring is not None else max(2, int(round(ring_fraction * min(H, W))))
    ex = np.zeros_like(m) if exclude is None else _mask(exclude, "exclude")
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
