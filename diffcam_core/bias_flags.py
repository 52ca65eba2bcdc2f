"""Flag values of the bias audit: the ``flags`` table's columns, built one way for every rule.

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
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["SAMPLE_KINDS", "flag_id", "format_region", "make_flag", "round6"]

SAMPLE_KINDS = ("off_object", "border_hotspot", "zero_map", "flat_map", "suspect_region")


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


def round6(v: float | None, nd: int = 6) -> float | None:
    return None if v is None else round(float(v), nd)


def _json(d: Mapping[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, ensure_ascii=False, allow_nan=False)


def make_flag(kind: str, score: float, threshold: float, evidence: dict[str, Any], *, sample_id: str | None = None,
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
