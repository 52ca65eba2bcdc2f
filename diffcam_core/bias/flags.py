"""Flag values of the bias audit: one typed `Flag` per finding, built one way for every rule.

A `Flag` holds the ``flags`` table's columns except ``run_id`` as values: ``flag_id``
(deterministic, the recipe of `diffcam.storage.schemas.make_flag_id`), ``sample_id`` (None at
dataset level), ``word_index``, ``word``, ``method``, ``kind``, ``score``, ``threshold``,
``confirmed`` (None: no counterfactual run), ``region`` (a box ``(x0, y0, x1, y1)`` in
normalised image coordinates at the column's 4 decimals, or None) and ``evidence`` (the
rule that fired, every number it used and the thresholds it compared them with, the
sample ids). They become the stored text (``"x0,y0,x1,y1"``, sorted-key JSON) in one
place only, where the rows are written: `diffcam.storage.schemas.flag_row`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["SAMPLE_KINDS", "REGION_KINDS", "Flag", "as_hallucinated_object", "flag_id", "format_region", "make_flag",
           "region_box", "round6"]

SAMPLE_KINDS = ("off_object", "border_hotspot", "zero_map", "flat_map", "suspect_region")
#: Dataset-level kinds that name a region of the image a word depends on: a shortcut
#: (`clever_hans`) or a region the model names as an object of its own (`hallucinated_object`).
REGION_KINDS = ("clever_hans", "hallucinated_object")


def flag_id(kind: str, sample_id: str | None = None, word_index: int | None = None, word: str | None = None,
            method: str | None = None, extra: str | None = None) -> str:
    """Deterministic flag id; the recipe of `diffcam.storage.schemas.make_flag_id` (a test checks they agree)."""
    ident = json.dumps([kind, sample_id, word_index, word, method, extra], ensure_ascii=False)
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def _box(box: Sequence[float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)) or x0 > x1 or y0 > y1:
        raise ValueError(f"region {box} is not a box inside [0, 1]^2")
    return x0, y0, x1, y1


def format_region(box: Sequence[float]) -> str:
    """``"x0,y0,x1,y1"`` with 4 decimals: part of a `clever_hans` flag's id, as the
    ``flags.region`` text (`diffcam.storage.schemas.format_region`; a test checks they agree)."""
    return ",".join(f"{v:.4f}" for v in _box(box))


def region_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """The box as the ``flags.region`` column keeps it (each value at 4 decimals), so the
    counterfactual erases and the report draws the same pixels before and after storage."""
    return tuple(round(v, 4) for v in _box(box))  # type: ignore[return-value]


def round6(v: float | None, nd: int = 6) -> float | None:
    return None if v is None else round(float(v), nd)


@dataclass(frozen=True, eq=False)
class Flag:
    """One finding of the bias audit (see the module docstring for the fields)."""

    flag_id: str
    kind: str
    score: float
    threshold: float
    evidence: Mapping[str, Any]
    sample_id: str | None = None
    word_index: int | None = None
    word: str | None = None
    method: str | None = None
    region: tuple[float, float, float, float] | None = None
    confirmed: bool | None = None


def make_flag(kind: str, score: float, threshold: float, evidence: dict[str, Any], *, sample_id: str | None = None,
              word_index: int | None = None, word: str | None = None, method: str | None = None,
              region: Sequence[float] | None = None, extra: str | None = None) -> Flag:
    return Flag(flag_id=flag_id(kind, sample_id, word_index, word, method, extra), kind=kind, score=float(score),
                threshold=float(threshold), evidence=evidence, sample_id=sample_id, word_index=word_index,
                word=word, method=method, region=None if region is None else region_box(region))


def as_hallucinated_object(flag: Flag) -> Flag:
    """A `clever_hans` suspect whose counterfactual found the region *named as an object of
    its own* (`diffcam.core.bias.verdict`), re-kinded: its own id, its own meaning, confirmed."""
    extra = None if flag.region is None else format_region(flag.region)
    ev = {**flag.evidence, "found_as": "clever_hans suspect",
          "meaning": "the model reads this region as an object of its own: erasing it drops a phrase about no "
                     "real object while the real objects' words stay (a hallucinated object, not a shortcut "
                     "about a real object)"}
    return replace(flag, kind="hallucinated_object", confirmed=True, evidence=ev,
                   flag_id=flag_id("hallucinated_object", flag.sample_id, flag.word_index, flag.word, flag.method, extra))
