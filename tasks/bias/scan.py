"""The bias step's saliency-free discovery: a window scan per word that proposes `clever_hans` suspects.

The saliency suspects of `diffcam.core.bias.dataset` only test regions that a map lights; a
cue the maps do not see is never tested. Here the model's behaviour proposes the regions
(`diffcam.core.bias.discovery`, docs/BIAS.md "Discovery scan in the audit"):

1. For each content word of the run (the words `diffcam.tasks.bias.step.analyse_run` analysed) with at
   least ``min_word_samples`` occurrences, take up to ``scan_max_samples`` samples whose
   stored answer has the word, in a fixed order (sha256 of the sample id: deterministic,
   unrelated to how the dataset is sorted).
2. Scan them through a *scanner* (`diffcam.tasks.scan`: the answer regenerated with the run's
   generation settings, every window of ``hotspot_size`` erased in turn, the word re-scored
   on its attribution canvas). A sample whose regenerated answer lacks the word is not
   scanned (counted in ``n_not_reproduced``).
3. `summarise_scans` with each image's cover by the word's objects: a window off the word's
   objects in every scanned image (``region_object_overlap_max``, the saliency regions'
   test) whose erasure lowers the word's log-probability by more than ``scan_min_drop``
   nats in at least ``scan_min_hit_rate`` of the images is a candidate.
4. Each candidate becomes a `clever_hans` suspect `Flag` with ``method`` None (the scan uses
   no map) and ``evidence["found_by"] = "scan"``, unless a saliency suspect of the same word
   already names the same region (no duplicate). It then goes through the same
   counterfactual as the saliency suspects (`diffcam.tasks.bias.counterfactual.counterfactual`:
   ``prototype`` is the positive mean-drop map, so the control window is one whose erasure
   did not lower the word; ``sample_ids`` are the scanned samples by their drop at the
   window, then the word's other samples), so it can be refuted.

``scan_words``: "all" scans every word; "unsuspected" only words without a saliency
suspect. Deviation from the issue's wording: the scan uses the saliency regions' window
(``hotspot_size``) rather than its own size, so a scan suspect and a saliency suspect of
the same region are the same box and the counterfactual's control window has the region's
size.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffcam.core.bias.discovery import summarise_scans
from diffcam.core.bias.flags import Flag, format_region, make_flag, region_box, round6
from diffcam.core.bias.settings import BiasSettings
from diffcam.core.bias.windows import cell_coverage, window_box
from diffcam.core.words import normalise_word
from diffcam.tasks.bias.counterfactual import Objects, Samples, words_of
from diffcam.tasks.scan import Scanner

__all__ = ["FOUND_BY", "scan_order", "scan_suspects", "flag_analysis", "scan_analysis"]

#: ``evidence["found_by"]`` of a suspect the scan proposed.
FOUND_BY = "scan"


def scan_order(sample_ids: Sequence[str]) -> list[str]:
    """The samples in the order the scan takes them: by sha256 of the id (ties: the id)."""
    return sorted(sample_ids, key=lambda s: (hashlib.sha256(s.encode()).digest(), s))


def _prototype(mean_drop: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A grid map for `control_box`: each window's positive mean drop at its top-left cell."""
    proto = np.zeros(grid, dtype=np.float64)
    proto[: mean_drop.shape[0], : mean_drop.shape[1]] = np.maximum(mean_drop, 0.0)
    return proto


def _grid_list(a: np.ndarray) -> list[list[float]]:
    return np.round(np.asarray(a, dtype=np.float64), 6).tolist()


def scan_suspects(scan: Scanner, analyses: Mapping[tuple[str, str], Mapping[str, Any]], samples: Samples,
                  images: Mapping[str, Path], objects: Objects, existing: Sequence[Flag],
                  settings: BiasSettings = BiasSettings(),
                  log: Callable[[str], None] | None = None) -> tuple[list[Flag], dict[str, Any]]:
    """Scan suspects of one run (module docstring). ``analyses``: `analyse_run`'s, keyed by
    (word, method): only their words and occurrence counts are read. ``existing``: the
    saliency dataset flags (their `clever_hans` suspects are not duplicated; with
    ``scan_words="unsuspected"`` their words are not scanned). Returns (flags, info): info
    has ``scan_s``, ``n_scanned_images``, ``n_scan_calls`` and per word what was scanned,
    found and skipped."""
    from diffcam.storage.images import load_image

    info: dict[str, Any] = {"scan_s": 0.0, "n_scanned_images": 0, "n_scan_calls": 0, "words": {}}
    if settings.scan_max_samples <= 0:
        return [], info
    n_occ: dict[str, int] = {}
    for (word, _method), a in analyses.items():
        n_occ[word] = max(n_occ.get(word, 0), int(a["n"]))
    suspects = [f for f in existing if f.kind == "clever_hans"]
    suspected_words = {f.word for f in suspects}
    suspected_regions = {(f.word, f.region) for f in suspects}
    order = scan_order(list(samples))
    out: list[Flag] = []
    t_all = time.perf_counter()
    for word in sorted(n_occ):
        w_info: dict[str, Any] = {"n_occurrences": n_occ[word]}
        info["words"][word] = w_info
        if n_occ[word] < settings.min_word_samples:
            w_info["skipped"] = f"fewer than min_word_samples={settings.min_word_samples} occurrences"
            continue
        if settings.scan_words == "unsuspected" and word in suspected_words:
            w_info["skipped"] = "has a saliency suspect (scan_words='unsuspected')"
            continue
        with_word = [sid for sid in order if word in words_of(samples[sid].get("answer") or "")]
        todo = with_word[: settings.scan_max_samples]
        if not todo:
            w_info["skipped"] = "no stored answer has the word"
            continue
        t0 = time.perf_counter()
        res = scan([np.asarray(load_image(images[sid])) for sid in todo], [samples[sid]["prompt"] for sid in todo],
                   [word] * len(todo), todo)
        w_info["scan_s"] = round(time.perf_counter() - t0, 3)
        info["n_scan_calls"] += 1
        info["n_scanned_images"] += len(todo)
        done = [(sid, r) for sid, r in zip(todo, res) if r is not None]
        w_info.update(n_scanned=len(todo), n_not_reproduced=len(todo) - len(done))
        if not done:
            w_info["skipped"] = "no regenerated answer had the word"
            continue
        # one grid per summary: images on another grid than the most common one are left out
        (grid, win), _ = Counter((r.grid, r.window) for _, r in done).most_common(1)[0]
        same = [(sid, r) for sid, r in done if (r.grid, r.window) == (grid, win)]
        w_info["n_other_grid"] = len(done) - len(same)
        covers = []
        for sid, _ in same:
            masks = [m for w_, m, _ in objects.get(sid, []) if normalise_word(w_) == word]
            covers.append(cell_coverage(np.logical_or.reduce(masks), grid) if masks else np.zeros(grid))
        summary = summarise_scans([r.drops for _, r in same], covers, win, settings.scan_min_drop,
                                  settings.region_object_overlap_max)
        cands = summary.candidates(settings.scan_min_hit_rate)
        w_info.update(n_images=summary.n_images, n_candidates=len(cands), n_duplicates=0,
                      n_off_object_windows=int(summary.off_object.sum()),
                      max_off_object_hit_rate=round6(float(summary.hit_rate[summary.off_object].max()))
                      if summary.off_object.any() else None)
        per_image_s = float(np.mean([r.seconds for _, r in same]))
        for r, c, mean_drop, hit_rate in cands:
            box = region_box(window_box(r, c, win, grid))
            if (word, box) in suspected_regions:
                w_info["n_duplicates"] += 1
                continue
            at = np.array([float(s.drops[r, c]) for _, s in same])
            by_drop = np.argsort(-at, kind="stable")
            scanned = [same[i][0] for i in by_drop]
            seen = set(scanned)
            ids = scanned + [sid for sid in with_word if sid not in seen]
            ev = {"found_by": FOUND_BY, "level": "dataset", "word": word, "method": None,
                  "rule": "off the word's objects in every scanned image (object cover <= region_object_overlap_max) "
                          "and hit_rate >= scan_min_hit_rate, hit = erasing the window lowers the word's "
                          "log-probability by more than scan_min_drop nats",
                  "grid": list(grid), "window": [r, c, int(win[0]), int(win[1])],
                  "window_area_share": win[0] * win[1] / (grid[0] * grid[1]),
                  "mean_drop": round6(mean_drop), "hit_rate": round6(hit_rate), "n_images": summary.n_images,
                  "n_scanned": len(todo), "n_not_reproduced": len(todo) - len(done),
                  "n_word_samples": len(with_word), "n_maps": n_occ[word],
                  "member_drops": [round(float(at[i]), 6) for i in by_drop],
                  "scan_min_drop": settings.scan_min_drop, "scan_min_hit_rate": settings.scan_min_hit_rate,
                  "scan_max_samples": settings.scan_max_samples,
                  "region_object_overlap_max": settings.region_object_overlap_max,
                  "scan_s": w_info["scan_s"], "scan_s_per_image": round(per_image_s, 4),
                  "n_windows": int(summary.mean_drop.size),
                  "prototype": _grid_list(_prototype(summary.mean_drop, grid)),
                  "mean_drop_map": _grid_list(summary.mean_drop), "hit_rate_map": _grid_list(summary.hit_rate),
                  "sample_ids": ids[: settings.max_evidence_ids], "n_sample_ids": len(ids),
                  "sample_ids_truncated": len(ids) > settings.max_evidence_ids,
                  "meaning": "erasing this region, off the word's objects, lowers the word's probability in most "
                             "of the scanned images (found by erasing every window, no saliency map)"}
            out.append(make_flag("clever_hans", hit_rate, settings.scan_min_hit_rate, ev, word=word, method=None,
                                 region=box, extra=format_region(box)))
        if log is not None:
            log(f"bias scan: '{word}' {summary.n_images} images scanned ({w_info['scan_s']:.1f} s), "
                f"{len(cands)} candidate window(s), {w_info['n_duplicates']} already saliency suspects")
    info["scan_s"] = time.perf_counter() - t_all
    return out, info


def scan_analysis(flag: Flag, run_words: Mapping[str, Sequence[tuple[int, str, bool]]]) -> dict[str, Any]:
    """The "analysis" `diffcam.core.bias.sample.region_sample_flags` reads, for a scan flag:
    every content occurrence of the flag's word in the run (`load_run_maps`'s ``words``),
    with all-zero maps. The scan has no map, so an occurrence is reached only by its own
    per-sample counterfactual (the word vanishes without the region and not without the
    control), never by saliency."""
    grid = tuple(flag.evidence["grid"])
    sids, wis = [], []
    for sid in sorted(run_words):
        for wi, text, is_function in run_words[sid]:
            if not is_function and normalise_word(text) == flag.word:
                sids.append(sid)
                wis.append(int(wi))
    return {"word": flag.word, "method": None, "grid": list(grid), "sample_ids": sids, "word_indices": wis,
            "ps": np.zeros((len(sids), *grid)), "objects_cov": [None] * len(sids)}


def flag_analysis(flag: Flag, analyses: Mapping[tuple[str, str], Mapping[str, Any]],
                  run_words: Mapping[str, Sequence[tuple[int, str, bool]]]) -> Mapping[str, Any]:
    """The analysis a region flag's sample flags are read from: its (word, method)'s for a
    saliency flag, `scan_analysis` for a scan flag."""
    if flag.evidence.get("found_by") == FOUND_BY:
        return scan_analysis(flag, run_words)
    return analyses[(flag.word, flag.method)]
