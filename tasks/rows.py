"""Rows for the ``samples``, ``token_maps`` and ``failures`` tables, as pure functions.

Input: one `SampleExplanation` (what `diffcam.core.cam.explain` returns) plus what the
worker knows about the sample (its work item, image size and hash, object masks).
Output: plain dicts whose keys are exactly the columns of `diffcam.storage.schemas` (the store
validates and casts them with `table_from_rows` / `conform_table`). Nothing here opens a
file, imports torch, or knows about Ray or Prefect.

Grounding words to masks (which mask does a word of the *generated* answer name?):
`ground_words` matches by word and occurrence order. The manifest's ``objects`` list holds
one ``{"word", "mask"}`` entry per grounding word in answer order (storage/synthetic_writer.py:
colour and shape word of object k share ``masks/<id>_<k>.png``). The i-th occurrence of a
word in the generated answer grounds to the i-th ``objects`` entry carrying that word, so
"a green circle and a green triangle" grounds the first "green" to object 0's mask and the
second to object 1's. An occurrence beyond the manifest's count, or a word the manifest
does not list, has no mask (``has_mask`` false, mask metrics null). Words are compared
case-insensitively with surrounding punctuation stripped. Limitation: if the model names
the objects in another order than the manifest, occurrence order still decides; it is a
positional match, not a semantic one.

Column conventions where `diffcam.core.stats` and the table schema differ (the schema is
the contract readers use):
- ``mass`` = mean of the map normalised to max 1 (= total_mass / (h·w·peak); 0 for a zero map);
- ``peak_x``/``peak_y`` = grid column/row of the first row-major maximum (null for a zero map);
- ``enrichment`` = stats ``inside_enrichment``;
- zero map with a mask: ``inside_frac`` = 0 and ``enrichment`` = 0, the §5 concentration of
  a map that points nowhere (`metrics.concentration`), where `map_stats` gives null. The
  table contract (`diffcam.storage.validation.MASK_METRICS`: a masked word has all its mask
  metrics) wins over the stats module here; ``zero_map`` tells these rows apart;
- ``contrast`` = `metrics.contrast` (``inf`` when the map is zero outside the mask and
  positive inside, as that module defines it); when the mask covers the whole image the
  contrast is undefined and ``contrast``, ``contrast_score`` and ``f3`` are null;
- ``obj_iou_any`` = best Obj-IoU over every distinct mask of the image (the reference's
  variant), only for words that have a mask of their own.
- ``specificity`` / ``multi_pointing`` (`diffcam.core.evidence`): only for a word with a
  mask in an image with at least one other distinct mask; null otherwise.
- ``deletion_auc`` / ``insertion_auc`` / ``vanished`` (`diffcam.core.faithfulness`): only
  on the samples and content words where faithfulness was measured; the AUCs are also
  null when the word's score does not depend on the image.

Samples-row summaries (``mean_inside_frac``, ``mean_obj_iou``, ``mean_f3``,
``pointing_rate``) are over the ``diffusion-cam`` maps of words with a mask; null when there
are none (zero maps count, with their 0 scores: they pull the means down rather than vanish).
"""

from __future__ import annotations

import traceback as tb_mod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diffcam.core import evidence, metrics
from diffcam.core.stats import map_stats
from diffcam.core.types import SampleExplanation
from diffcam.core.words import normalise_word
from diffcam.storage.images import SampleError
from diffcam.storage.schemas import FAILURE_STAGES, quantize_map

__all__ = [
    "SUMMARY_METHOD",
    "ground_words",
    "map_columns",
    "token_map_rows",
    "sample_row",
    "failure_row",
    "failure_stage",
]

#: The method whose maps the samples-row summaries describe.
SUMMARY_METHOD = "diffusion-cam"
#: Cap on the stored traceback (characters, the tail is kept: that is where the error is).
MAX_TRACEBACK_CHARS = 8000
MAX_MESSAGE_CHARS = 2000


def ground_words(answer_words: Sequence[str], object_words: Sequence[str]) -> list[int | None]:
    """For each answer word, the index of the ``objects`` entry it grounds to, or None.

    The i-th occurrence of a (normalised) word in ``answer_words`` takes the i-th entry of
    ``object_words`` with the same word (see module docstring).
    """
    slots: dict[str, list[int]] = {}
    for k, w in enumerate(object_words):
        slots.setdefault(normalise_word(w), []).append(k)
    seen: dict[str, int] = {}
    out: list[int | None] = []
    for w in answer_words:
        key = normalise_word(w)
        i = seen.get(key, 0)
        seen[key] = i + 1
        cand = slots.get(key, [])
        out.append(cand[i] if key and i < len(cand) else None)
    return out


def _f(v: Any) -> float | None:
    return None if v is None else float(v)


def map_columns(
    m: np.ndarray, mask: np.ndarray | None, all_masks: Sequence[np.ndarray] = ()
) -> dict[str, Any]:
    """The ``token_maps`` columns that describe one (h, w) map (and its word's mask).

    Raises ValueError (from `quantize_map` / `map_stats`) for a non-finite or negative map:
    such a map is a bug upstream and becomes a failure row, never a number.
    """
    a = np.asarray(m)
    data, mx = quantize_map(a)
    st = map_stats(a, mask)
    h, w = a.shape
    zero = bool(st["zero_map"])
    peak = float(st["peak_value"])
    pr, pc = (None, None) if zero else divmod(int(np.argmax(a)), w)
    out: dict[str, Any] = {
        "grid_h": h,
        "grid_w": w,
        "map": data,
        "map_max": mx,
        "mass": 0.0 if zero else float(st["total_mass"]) / (h * w * peak),
        "zero_map": zero,
        "com_x": _f(st["com_x"]),
        "com_y": _f(st["com_y"]),
        "com_dist": _f(st["com_dist"]),
        "spread": _f(st["spread"]),
        "peak_x": pc,
        "peak_y": pr,
        "entropy": _f(st["entropy"]),
        "gini": _f(st["gini"]),
        "border_frac": _f(st["border_frac"]),
        "border_enrichment": _f(st["border_enrichment"]),
        "centre_frac": _f(st["centre_frac"]),
        "has_mask": mask is not None,
        "inside_frac": _f(st["inside_frac"]),
        "enrichment": _f(st["inside_enrichment"]),
        "pointing_hit": st["pointing_hit"],
        "obj_iou": _f(st["obj_iou"]),
        "obj_iou_any": None,
        "contrast": None,
        "contrast_score": None,
        "concentration": None,
        "f3": None,
        "specificity": None,
        "multi_pointing": None,
    }
    if mask is not None:
        mk = metrics.validate_mask(mask)
        out["concentration"] = metrics.concentration(a, mk)
        if zero:  # see the module docstring: the §5 value (0), not the stats module's null
            out["inside_frac"] = out["concentration"]
            out["enrichment"] = 0.0
        out["obj_iou_any"] = metrics.obj_iou_any(a, list(all_masks) or [mk])
        others = [x for x in all_masks if x is not mask]
        spec = evidence.specificity(a, mk, others) if others else None
        out["specificity"] = _f(spec)
        out["multi_pointing"] = evidence.multi_pointing(a, mk, others) if others else None
        if not mk.all():
            c = metrics.contrast(a, mk)
            cs = metrics.contrast_score(c)
            out["contrast"] = c
            out["contrast_score"] = cs
            out["f3"] = metrics.f3(out["obj_iou"], cs, out["concentration"])
    return out


def faithfulness_columns(result: Any) -> dict[str, Any]:
    """``deletion_auc``, ``insertion_auc``, ``vanished`` of one word × map (all null when not measured)."""
    if result is None:
        return {"deletion_auc": None, "insertion_auc": None, "vanished": None}
    return {"deletion_auc": _f(result.deletion_auc), "insertion_auc": _f(result.insertion_auc),
            "vanished": result.vanished}


def token_map_rows(
    run_id: str,
    shard_id: int,
    sample_id: str,
    explanation: SampleExplanation,
    word_masks: Sequence[np.ndarray | None],
    all_masks: Sequence[np.ndarray] = (),
) -> list[dict[str, Any]]:
    """One row per (word, method) of ``explanation``, methods in sorted order.

    ``word_masks[i]`` is the mask of word i (``explanation.words[i]``) or None;
    ``all_masks`` the image's distinct masks (for ``obj_iou_any``).
    """
    if len(word_masks) != len(explanation.words):
        raise ValueError(f"{len(word_masks)} word masks for {len(explanation.words)} words")
    rows = []
    for wm, mask in zip(explanation.words, word_masks):
        w = wm.word
        for method in sorted(wm.maps):
            rows.append({
                "run_id": run_id,
                "shard_id": shard_id,
                "sample_id": sample_id,
                "word_index": w.index,
                "word": w.text,
                "is_function": w.is_function,
                "commit_step": w.commit_step,
                "distractor": wm.distractor,
                "target_score": float(wm.target_score),
                "distractor_score": _f(wm.distractor_score),
                "method": method,
                **map_columns(wm.maps[method], mask, all_masks),
                **faithfulness_columns(wm.faithfulness.get(method)),
            })
    return rows


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def sample_row(
    run_id: str,
    shard_id: int,
    item: Mapping[str, Any],
    explanation: SampleExplanation,
    *,
    width: int,
    height: int,
    image_sha256: str,
    n_objects: int | None,
    token_rows: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The ``samples`` row of one audited sample (``item`` is its `diffcam.tasks.plan.work_item`)."""
    summary = [r for r in token_rows if r["method"] == SUMMARY_METHOD and r["has_mask"]]
    t = explanation.timings
    return {
        "run_id": run_id,
        "shard_id": shard_id,
        "sample_id": item["sample_id"],
        "line_no": item.get("line_no"),
        "image_path": item["image_rel"],
        "image_sha256": image_sha256,
        "width": width,
        "height": height,
        "prompt": item["prompt"],
        "answer": explanation.answer,
        "reference_answer": item.get("reference_answer"),
        "n_objects": n_objects,
        "n_words": len(explanation.words),
        "n_steps": explanation.n_steps,
        "grid_h": explanation.grid[0],
        "grid_w": explanation.grid[1],
        "t_generate_s": float(t.get("generate_s", 0.0)),
        "t_attribution_s": float(t.get("attribution_s", 0.0)),
        "t_total_s": float(t.get("total_s", 0.0)),
        "t_faithfulness_s": _f(t.get("faithfulness_s")),
        "mean_inside_frac": _mean([r["inside_frac"] for r in summary]),
        "mean_obj_iou": _mean([r["obj_iou"] for r in summary]),
        "mean_f3": _mean([r["f3"] for r in summary]),
        "pointing_rate": _mean([None if r["pointing_hit"] is None else float(r["pointing_hit"]) for r in summary]),
    }


def failure_stage(exc: BaseException, default: str) -> str:
    """The failure-table stage of ``exc``: a `SampleError`'s own stage when the schema
    knows it (``mask`` problems are input problems: ``load``), else ``default``."""
    if isinstance(exc, SampleError):
        return exc.stage if exc.stage in FAILURE_STAGES else "load"
    return default


def _clip(text: str, n: int, tail: bool = False) -> str:
    if len(text) <= n:
        return text
    return ("…" + text[-(n - 1):]) if tail else (text[: n - 1] + "…")


def failure_row(
    run_id: str,
    shard_id: int,
    sample_id: str,
    line_no: int | None,
    stage: str,
    exc: BaseException,
    attempts: int = 1,
) -> dict[str, Any]:
    """A ``failures`` row for ``exc`` (class name, message, traceback tail)."""
    if stage not in FAILURE_STAGES:
        raise ValueError(f"stage {stage!r} is not one of {FAILURE_STAGES}")
    tb = "".join(tb_mod.format_exception(type(exc), exc, exc.__traceback__))
    return {
        "run_id": run_id,
        "shard_id": shard_id,
        "sample_id": sample_id,
        "line_no": line_no,
        "stage": stage,
        "error_class": type(exc).__name__,
        "message": _clip(str(exc) or repr(exc), MAX_MESSAGE_CHARS),
        "traceback": _clip(tb, MAX_TRACEBACK_CHARS, tail=True),
        "attempts": attempts,
    }

