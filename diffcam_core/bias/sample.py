"""Sample-level bias flags: one word of one answer, one map method (docs/BIAS.md).

Does the map sit on a compact region *off* the word's object (`off_object`), on a
hot-spot in the image's border band or a corner (`border_hotspot`), or carry no location
at all (`zero_map`, `flat_map`)? And which occurrences does a dataset-level `clever_hans`
region reach (`suspect_region`, `region_sample_flags`)? A window is *off-object* when no
cell of it has more than ``object_overlap_max`` of its pixels inside the mask(s) considered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from diffcam.core.bias.flags import Flag, make_flag, round6
from diffcam.core.bias.settings import BiasSettings
from diffcam.core.bias.windows import (
    EPS,
    as_mask,
    cell_coverage,
    hotspot,
    window_box,
    window_cells,
    window_max,
    window_sums,
)
from diffcam.core.metrics import validate_map, validate_mask
from diffcam.core.stats import border_mask, gini

__all__ = ["sample_flags", "region_sample_flags"]


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
) -> list[Flag]:
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
    out: list[Flag] = []
    masks = [as_mask(m) for m in all_masks] + ([as_mask(mask)] if mask is not None else [])
    cov_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
    for method in sorted(word_maps):
        if method not in settings.sample_methods:
            continue
        a = validate_map(word_maps[method])
        grid = a.shape
        base = {"sample_id": sample_id, "word_index": int(word_index), "word": word, "method": method}
        ident: dict[str, Any] = dict(sample_id=sample_id, word_index=int(word_index), word=word, method=method)
        peak = float(a.max())
        if peak <= settings.zero_max:
            ev = {**base, "rule": "score <= threshold", "map_max": peak, "grid": list(grid),
                  "meaning": "the map has no positive value: it points nowhere"}
            out.append(make_flag("zero_map", peak, settings.zero_max, ev, **ident))
            continue
        g = gini(a)
        if g <= settings.flat_gini_max:
            ev = {**base, "rule": "score <= threshold", "gini": g, "map_max": peak,
                  "map_min": float(a.min()), "grid": list(grid),
                  "meaning": "the map is (nearly) constant: it carries no location"}
            out.append(make_flag("flat_map", g, settings.flat_gini_max, ev, **ident))
            continue
        p = a / float(a.sum())
        win = window_cells(grid, settings.hotspot_size)
        if grid not in cov_cache:
            cov_any = np.zeros(grid)
            for m in masks:
                cov_any = np.maximum(cov_any, cell_coverage(m, grid))
            cov_cache[grid] = (cov_any, None if mask is None else cell_coverage(mask, grid))
        cov_any, cov = cov_cache[grid]
        off = window_max(cov_any, win) <= settings.object_overlap_max
        pr, pc = divmod(int(np.argmax(a)), grid[1])
        st = dict(stats.get(method, {})) if stats else {}
        common = {**base, "grid": list(grid), "window_cells": list(win),
                  "window_area_share": win[0] * win[1] / (grid[0] * grid[1]),
                  "peak_cell": [pr, pc], "inside_frac": round6(st.get("inside_frac")), "obj_iou": round6(st.get("obj_iou")),
                  "masks_avoided": len(masks)}
        if cov is not None:
            assert mask is not None  # cov is computed from mask (cov_cache above)
            inside = float((p * cov).sum())
            hs = hotspot(p, win, off)
            if hs is not None:
                share, (r, c) = hs
                box = window_box(r, c, win, grid)
                need = max(settings.off_object_threshold, settings.off_object_dominance * inside)
                if share >= need:
                    ev = {**common, "rule": "score >= threshold and score >= dominance * inside_share",
                          "hotspot_share": share, "inside_share": inside, "dominance": settings.off_object_dominance,
                          "hotspot_enrichment": share / common["window_area_share"],
                          "peak_in_hotspot": r <= pr < r + win[0] and c <= pc < c + win[1],
                          "mask_area_share": float(validate_mask(mask).mean()),
                          "meaning": "most of the map's mass sits on a compact region off the word's object"}
                    out.append(make_flag("off_object", share, settings.off_object_threshold, ev, region=box, **ident))
        band = border_mask(grid, ss)
        in_band = window_max(np.where(band, 0.0, 1.0), win) == 0.0  # every cell of the window in the band
        hs = hotspot(p, win, in_band & off)
        if hs is not None and hs[0] >= settings.border_threshold:
            share, (r, c) = hs
            h, w = grid
            corner = (r == 0 or r + win[0] == h) and (c == 0 or c + win[1] == w)
            ev = {**common, "rule": "score >= threshold", "hotspot_share": share, "corner": bool(corner),
                  "border_frac": float(p[band].sum()), "border_area_share": float(band.mean()),
                  "hotspot_enrichment": share / common["window_area_share"],
                  "meaning": "a compact hot-spot in the image's border band" + (" (a corner)" if corner else "")}
            out.append(make_flag("border_hotspot", share, settings.border_threshold, ev, region=window_box(r, c, win, grid),
                             **ident))
    return out


def _test_verdict(test: Mapping[str, Any]) -> str:
    """A tested sample's verdict ("shortcut", "named_as_object" or "none"); a test written
    before verdicts existed has only ``vanished``: the word went without the region and not
    without the control, which is a shortcut."""
    if "verdict" in test:
        return str(test["verdict"])
    return "shortcut" if test["vanished"] else "none"


def region_sample_flags(flag: Flag, analysis: Mapping[str, Any],
                        settings: BiasSettings = BiasSettings(),
                        tests: Mapping[str, Mapping[str, Any]] | None = None) -> list[Flag]:
    """Sample-level `suspect_region` flags from one dataset-level `clever_hans` flag.

    An occurrence of the flag's word is flagged when either
    - saliency: its map (the flag's method) puts at least ``member_enrichment_min`` × the
      window's area share of its mass in the flag's region — the test that makes a
      cluster member "consistent" — and the sample was not tested; or
    - counterfactual: ``tests[sample_id]`` (the sample regenerated with only the region
      erased, and with a control window erased instead, `diffcam.tasks.bias.counterfactual.region_counterfactuals`)
      shows a dependence its control erasure does not: the word vanishes as a real
      object's word changes (verdict "shortcut"), or a phrase about no real object goes
      (verdict "named_as_object", `diffcam.core.bias.verdict`).
    A tested sample whose own counterfactual shows neither is never flagged, however
    salient the region: the answer does not depend on it. Evidence ``verdict``: one of
    those two, or "saliency_only" (not tested).
    Score = the share, threshold = that minimum (so a row reached only by the
    counterfactual has score < threshold); ``confirmed`` = whether the word vanished
    (None: the sample was not tested). Evidence: the share, its enrichment over a uniform
    map, the map's own background level (median share of its off-object windows) and the
    ratio to it, both answers, the dataset flag's id and confirmation.
    ``analysis``: the word's `analyse_word` result for the flag's method.
    """
    r, c, wh, ww = flag.evidence["window"]
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
        verdict = "saliency_only" if test is None else _test_verdict(test)
        vanished = None if test is None else verdict != "none"
        if vanished is False or (share < need and not vanished):
            continue
        cov = analysis["objects_cov"][i]
        off = np.ones_like(sums, dtype=bool) if cov is None else window_max(cov, win) <= settings.object_overlap_max
        bg = float(np.median(sums[off] if off.any() else sums))
        sid, wi = analysis["sample_ids"][i], analysis["word_indices"][i]
        e = {"sample_id": sid, "word_index": int(wi), "word": flag.word, "method": flag.method,
             "rule": "untested and score >= threshold (share of the map's mass in the dataset flag's region >= "
                     "member_enrichment_min x the region's area share), or the word vanishes when only the "
                     "region is erased and not when a control window is (confirmed)",
             "reached_by": [k for k, hit in (("saliency", share >= need), ("counterfactual", bool(vanished))) if hit],
             "verdict": verdict,
             "counterfactual": None if test is None else dict(test),
             "region_share": share, "region_enrichment": share / area, "member_enrichment_min":
             settings.member_enrichment_min, "background_median_share": bg, "ratio_to_background": share / max(bg, EPS),
             "dataset_flag_id": flag.flag_id, "dataset_flag_confirmed": flag.confirmed,
             "dataset_flag_score": flag.score, "grid": list(ps.shape[1:]), "window": [r, c, wh, ww],
             "meaning": "this occurrence of the word puts an outsized share of its map on, or (confirmed) "
                        "depends on, the region a dataset-level clever_hans flag found for the word"}
        row = make_flag("suspect_region", share, need, e, sample_id=sid, word_index=int(wi), word=flag.word,
                        method=flag.method, region=flag.region)
        out.append(replace(row, confirmed=vanished))
    return out
