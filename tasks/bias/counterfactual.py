"""Counterfactual re-generations of the bias step: is a `clever_hans` region a cue the answer needs?

Counterfactual rule (per `clever_hans` flag; over up to ``cf_max_samples`` members with
the largest share of their map in the region, whose original answer contains the word):
  persist       = P(word | object erased, region kept)
  persist_both  = P(word | object and region erased)
  vanish        = P(no word | region erased)
  vanish_ctrl   = P(no word | a same-size off-object box elsewhere erased)
  confirmed  ⇔  persist − persist_both ≥ cf_confirm_min  or  vanish − vanish_ctrl ≥ cf_confirm_min.
"The word persists without its object (and only while the region is there)", or "the word
vanishes when only the region is erased (and not when any other patch is)". Both
differences are controls: a model that says the word whatever you erase confirms nothing.
Images are erased with `diffcam.core.inpaint` and the model re-generates with the run's own
generation settings, through an answerer (`diffcam.tasks.answers`: a model in this process or the
audit's Ray workers). The edited images of several samples go to it together, so a pool
spreads them over its workers; which regenerations run is decided exactly as one sample at
a time would: the other variants of a sample only when its original answer has the word,
and the dataset-level test stops at ``cf_max_samples`` tested samples.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffcam.core.bias.flags import Flag
from diffcam.core.bias.settings import BiasSettings
from diffcam.core.bias.verdict import NAMED_AS_OBJECT, WORD_CHANGED, answer_change, dependence_verdict
from diffcam.core.bias.windows import cell_coverage, window_box, window_sums
from diffcam.core.inpaint import box_mask, erase_mask, erase_region_around
from diffcam.core.words import normalise_word
from diffcam.tasks.answers import Answerer

__all__ = ["counterfactual", "region_counterfactuals", "words_of", "erase_box", "control_box", "sample_verdict"]

#: The run's samples rows by id (`diffcam.tasks.bias.read.load_run_maps`: prompt, answer, ...).
Samples = Mapping[str, Mapping[str, Any]]
#: Each sample's objects: [(word, boolean mask, mask path)] (`diffcam.tasks.bias.read.object_masks`).
Objects = Mapping[str, list[tuple[str, np.ndarray, str | None]]]
#: Samples whose edited images are held and sent at once by `region_counterfactuals`
#: (bounds the memory of a large dataset; enough to keep a pool's workers busy).
REGION_WAVE = 64


def words_of(text: str) -> set[str]:

    return {normalise_word(w) for w in text.split()}


def erase_box(box: Sequence[float], grid: tuple[int, int], margin: int) -> tuple[float, float, float, float]:
    """The box the erase tests erase: a suspect window grown by ``margin`` grid cells on each
    side (clipped to the image). A cue need not sit inside one window: a marker that spills
    into the next cell, erased only in part, still reads as itself and the test would
    wrongly say the answer does not depend on it. Object pixels are never erased (every
    erase excludes them), so the margin takes background only."""
    h, w = grid
    x0, y0, x1, y1 = (float(v) for v in box)
    return (max(0.0, x0 - margin / w), max(0.0, y0 - margin / h), min(1.0, x1 + margin / w), min(1.0, y1 + margin / h))


def control_box(box: Sequence[float], grid: tuple[int, int],
                proto: np.ndarray, obj_cov: np.ndarray) -> tuple[float, float, float, float] | None:
    """A window of ``box``'s size in cells, off every object and off ``box``, where the
    prototype has the least mass (ties: first row-major): the control erasure."""
    h, w = grid
    r0, c0 = int(round(box[1] * h)), int(round(box[0] * w))
    win = (max(1, int(round(box[3] * h)) - r0), max(1, int(round(box[2] * w)) - c0))
    if win[0] > h or win[1] > w:
        return None
    sums = window_sums(proto, win)
    ok = window_sums((obj_cov > 0).astype(float), win) == 0
    rr, cc = np.meshgrid(np.arange(sums.shape[0]), np.arange(sums.shape[1]), indexing="ij")
    ok &= (np.abs(rr - r0) >= win[0]) | (np.abs(cc - c0) >= win[1])
    if not ok.any():
        return None
    idx = int(np.argmin(np.where(ok, sums, np.inf)))
    r, c = divmod(idx, sums.shape[1])
    return window_box(r, c, win, grid)


def sample_verdict(vanished_region: bool, vanished_control: bool | None, change: str,
                   change_control: str | None) -> str:
    """One tested sample's own verdict on a region (`diffcam.core.bias.verdict`):
    "shortcut" (the word went, a real object's word changed, and not under the control
    erasure), "named_as_object" (a phrase about no real object went, and not under the
    control), else "none": the sample's own counterfactual shows no dependence."""
    if vanished_region and not vanished_control and change == WORD_CHANGED:
        return "shortcut"
    if change == NAMED_AS_OBJECT and change_control != NAMED_AS_OBJECT:
        return "named_as_object"
    return "none"


def _ask(answer: Answerer, word: str,
         jobs: Sequence[tuple[str, str, Mapping[str, np.ndarray]]]) -> tuple[list[dict[str, str]], int]:
    """Answers for ``jobs`` = [(sample_id, prompt, {variant: image})], "original" first.

    All originals go to ``answer`` in one call; then, in a second call, the other variants
    of the samples whose original answer has ``word`` (without it there is nothing to ask
    whether it persists or vanishes). Returns ([{variant: answer}] in job order, with the
    variants in their given order; the number of generations)."""
    if not jobs:
        return [], 0
    originals = answer([v["original"] for _, _, v in jobs], [p for _, p, _ in jobs], [sid for sid, _, _ in jobs])
    out = [{"original": a} for a in originals]
    rest = [(k, name, arr) for k, (_, _, v) in enumerate(jobs) if word in words_of(originals[k])
            for name, arr in v.items() if name != "original"]
    if rest:
        texts = answer([arr for _, _, arr in rest], [jobs[k][1] for k, _, _ in rest], [jobs[k][0] for k, _, _ in rest])
        for (k, name, _), text in zip(rest, texts):
            out[k][name] = text
    return out, len(jobs) + len(rest)


def counterfactual(answer: Answerer, flag: Flag, samples: Samples, images: Mapping[str, Path], objects: Objects,
                   settings: BiasSettings) -> dict[str, Any]:
    """Run the counterfactual of one ``clever_hans`` flag (see the module docstring).

    Members are taken in evidence order, in waves of as many as still need testing, so the
    regenerations are exactly those of testing them one by one up to ``cf_max_samples``.
    Returns the evidence dict: rule, rates, confirmed, and per tested sample its answers
    under every condition, image path, mask paths and boxes (enough to redraw them)."""
    from diffcam.storage.images import load_image

    ev = flag.evidence
    word = normalise_word(flag.word)
    grid = tuple(ev["grid"])
    box = erase_box(flag.region, grid, settings.cf_region_margin)
    proto = np.asarray(ev["prototype"], dtype=np.float64)
    tested = []
    t0 = time.perf_counter()
    n_gen = 0
    members = iter(ev["sample_ids"])
    while len(tested) < settings.cf_max_samples:
        wave = []  # (sid, variants, control box, word objects, objects)
        for sid in members:
            objs = objects.get(sid, [])
            word_objs = [(m, p) for w, m, p in objs if normalise_word(w) == word]
            if not word_objs:
                continue
            img = np.asarray(load_image(images[sid]))
            H, W = img.shape[:2]
            region = box_mask((H, W), box)
            wmask = np.logical_or.reduce([m for m, _ in word_objs])
            others = np.zeros((H, W), dtype=bool)
            for w_, m, _ in objs:
                if normalise_word(w_) != word:
                    others |= m
            all_obj = wmask | others
            ring = {"ring_fraction": settings.cf_ring_fraction}
            ctrl = control_box(box, grid, proto, cell_coverage(all_obj, grid))
            variants = {
                "original": img,
                "no_object": erase_mask(img, wmask, exclude=others | region, **ring),
                "no_region": erase_region_around(img, box, all_obj, **ring),
            }
            variants["no_both"] = erase_region_around(variants["no_object"], box, all_obj, **ring)
            if ctrl is not None:
                variants["control"] = erase_region_around(img, ctrl, all_obj, exclude=region, **ring)
            wave.append((sid, variants, ctrl, word_objs, objs))
            if len(wave) >= settings.cf_max_samples - len(tested):
                break
        if not wave:
            break
        results, n = _ask(answer, word, [(sid, samples[sid]["prompt"], v) for sid, v, _, _, _ in wave])
        n_gen += n
        for (sid, _, ctrl, word_objs, objs), answers in zip(wave, results):
            if word not in words_of(answers["original"]):
                continue
            tested.append({
                "sample_id": sid, "image_path": str(images[sid]), "prompt": samples[sid]["prompt"],
                "mask_paths": sorted({p for _, p in word_objs if p is not None}),
                "other_mask_paths": sorted({p for w_, _, p in objs if normalise_word(w_) != word and p is not None}),
                "control_region": None if ctrl is None else [round(v, 6) for v in ctrl],
                "object_words": sorted({normalise_word(w_) for w_, _, _ in objs}),
                "answers": answers,
                "word_present": {k: word in words_of(v) for k, v in answers.items()},
            })

    def rate(cond: str, present: bool) -> float | None:
        vals = [t["word_present"][cond] == present for t in tested if cond in t["word_present"]]
        return float(np.mean(vals)) if vals else None

    persist, persist_both = rate("no_object", True), rate("no_both", True)
    vanish, vanish_ctrl = rate("no_region", False), rate("control", False)
    d_persist = None if persist is None else persist - (persist_both or 0.0)
    d_vanish = None if vanish is None else vanish - (vanish_ctrl or 0.0)
    t = settings.cf_confirm_min
    confirmed = bool(tested) and ((d_persist or 0.0) >= t or (d_vanish or 0.0) >= t)
    why = []
    if d_persist is not None and d_persist >= t:
        why.append("persists without its object, only while the region is there")
    if d_vanish is not None and d_vanish >= t:
        why.append("vanishes when only the region is erased")
    verdict = dependence_verdict(tested, word, t)
    finding = "clever_hans"
    named, short = verdict["named_score"] or 0.0, verdict["shortcut_score"] or 0.0
    if verdict["kind"] == "named_as_object" or (confirmed and named > max(short, 0.0)):
        finding = "hallucinated_object"
        confirmed = True
        why.append("erasing the region drops words about no real object while the real objects' words stay: "
                   "the model names the region as an object of its own")
    return {
        "rule": "confirmed iff persist - persist_both >= cf_confirm_min or vanish - vanish_control >= cf_confirm_min "
                "or the verdict is named_as_object; finding hallucinated_object when the verdict says so or when "
                "confirmed and its named score is above its shortcut score (diffcam.core.bias.verdict)",
        "finding": finding, "verdict": verdict,
        "cf_confirm_min": t, "n_tested": len(tested), "n_generations": n_gen,
        "seconds": round(time.perf_counter() - t0, 3),
        "persist": persist, "persist_both": persist_both, "vanish": vanish, "vanish_control": vanish_ctrl,
        "persist_minus_both": d_persist, "vanish_minus_control": d_vanish,
        "confirmed": confirmed, "why": why, "region": list(flag.region), "erased_region": [round(v, 6) for v in box],
        "region_margin_cells": settings.cf_region_margin, "word": word, "examples": tested,
    }


def region_counterfactuals(answer: Answerer, flag: Flag, samples: Samples, images: Mapping[str, Path],
                           objects: Objects, settings: BiasSettings) -> tuple[dict[str, dict], dict[str, Any]]:
    """Test one kept ``clever_hans`` flag on every sample whose answer has its word.

    The dataset-level `counterfactual` tests a few cluster members to decide the flag;
    this asks each sample the flag could concern (up to ``region_cf_max_samples``, in
    sample-id order): regenerate the original image, the image with only the region
    erased (object pixels excluded, as the dataset-level "no_region" variant) and, as a
    control, the image with a same-size off-object window erased instead (the dataset
    flag's `control_box`, chosen per sample so it avoids that sample's objects). The word
    *vanished* (the sample depends on the region) when it is in the first answer, not in
    the second, and still in the control's: a model that drops the word whatever patch is
    erased shows no dependence on this region. Samples whose answer lacks the word are not
    tested (nothing can vanish). The samples go to ``answer`` ``REGION_WAVE`` at a time.
    Returns ({sample_id: test}, summary);
    `diffcam.core.bias.sample.region_sample_flags` turns the tests into flags.
    """
    from diffcam.storage.images import load_image

    word = normalise_word(flag.word)
    ev = flag.evidence
    grid = tuple(ev["grid"]) if ev.get("grid") else None
    box = flag.region if grid is None else erase_box(flag.region, grid, settings.cf_region_margin)
    proto = np.asarray(ev["prototype"], dtype=np.float64) if ev.get("prototype") is not None else None
    candidates = sorted(sid for sid, s in samples.items() if word in words_of(s.get("answer") or ""))
    todo = candidates[: settings.region_cf_max_samples]
    tests: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    n_gen = 0
    ring = settings.cf_ring_fraction
    for w0 in range(0, len(todo), REGION_WAVE):
        wave = []  # (sid, variants, control box)
        for sid in todo[w0:w0 + REGION_WAVE]:
            img = np.asarray(load_image(images[sid]))
            all_obj = np.zeros(img.shape[:2], dtype=bool)
            for _, m, _ in objects.get(sid, []):
                all_obj |= m
            ctrl = None
            if grid is not None and proto is not None:
                ctrl = control_box(box, grid, proto, cell_coverage(all_obj, grid))
            variants = {"original": img, "no_region": erase_region_around(img, box, all_obj, ring_fraction=ring)}
            if ctrl is not None:
                region = box_mask(img.shape[:2], box)
                variants["control"] = erase_region_around(img, ctrl, all_obj, exclude=region, ring_fraction=ring)
            wave.append((sid, variants, ctrl))
        results, n = _ask(answer, word, [(sid, samples[sid]["prompt"], v) for sid, v, _ in wave])
        n_gen += n
        for (sid, _, ctrl), answers in zip(wave, results):
            present = {k: word in words_of(v) for k, v in answers.items()}
            if not present["original"]:
                continue  # the regenerated answer lost the word: nothing to ask (recorded in the summary)
            vanished_control = None if "control" not in present else not present["control"]
            real = sorted({normalise_word(w) for w, _, _ in objects.get(sid, [])})
            change = answer_change(answers["original"], answers["no_region"], real)
            change_ctrl = None if "control" not in answers else answer_change(answers["original"], answers["control"], real)
            tests[sid] = {"answer": answers["original"], "answer_without_region": answers["no_region"],
                          "answer_without_control": answers.get("control"),
                          "control_region": None if ctrl is None else [round(v, 6) for v in ctrl],
                          "vanished_region": not present["no_region"], "vanished_control": vanished_control,
                          "vanished": (not present["no_region"]) and not vanished_control,
                          "object_words": real, "change": change, "change_control": change_ctrl,
                          "verdict": sample_verdict(not present["no_region"], vanished_control, change, change_ctrl)}
    summary = {"word": word, "region": list(flag.region), "erased_region": [round(v, 6) for v in box],
               "n_candidates": len(candidates), "n_tested": len(tests),
               "n_not_reproduced": len(todo) - len(tests), "n_capped": len(candidates) - len(todo),
               "n_vanished": sum(t["vanished"] for t in tests.values()),
               "n_shortcut": sum(t["verdict"] == "shortcut" for t in tests.values()),
               "n_named_as_object": sum(t["verdict"] == "named_as_object" for t in tests.values()),
               "n_vanished_region": sum(t["vanished_region"] for t in tests.values()),
               "n_vanished_control": sum(bool(t["vanished_control"]) for t in tests.values()),
               "n_generations": n_gen, "seconds": round(time.perf_counter() - t0, 3)}
    return tests, summary
