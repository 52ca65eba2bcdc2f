"""Which maps a run may raise spatial flags from: those its own faithfulness test ranks above
the model-free `objectness` map.

A spatial flag (`off_object`, `border_hotspot`) says "the model looks here when it says this
word". A map whose top cells can be erased without the word leaving the answer more often
than the top cells of a map drawn without the model (`objectness`: where the objects are)
carries no evidence about where *this model* looks, so a flag read from it is noise. The
vanish rate (the word leaves the regenerated answer after its map's top 1/8 of cells is
erased, docs/EVALUATION.md) is measured on every run, so the choice is made on the run being
audited, never on a benchmark. When the reference map was not measured, no map qualifies:
nothing shows that any map beats chance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["REFERENCE", "SPATIAL_KINDS", "MapFaithfulness", "rank_maps", "spatial_methods"]

#: The model-free map a map must beat (`diffcam.core.methods.ObjectnessMap`).
REFERENCE = "objectness"
#: Flag kinds that claim a place in the image from one map.
SPATIAL_KINDS = ("off_object", "border_hotspot")


@dataclass(frozen=True)
class MapFaithfulness:
    """One method's vanish rate in a run, its rank among the measured maps (1 = highest) and
    whether it is strictly above the reference map's."""

    method: str
    vanish_rate: float | None
    n_words: int
    rank: int | None
    beats_reference: bool

    def evidence(self, reference: MapFaithfulness | None) -> dict[str, object]:
        """What a flag read from this map records about it."""
        return {"method": self.method, "vanish_rate": self.vanish_rate, "n_words": self.n_words, "rank": self.rank,
                "reference": REFERENCE, "reference_vanish_rate": None if reference is None else reference.vanish_rate}


def rank_maps(rates: Mapping[str, tuple[float | None, int]]) -> dict[str, MapFaithfulness]:
    """``rates``: method → (vanish rate or None when not measured, words measured). Ranks the
    measured maps by vanish rate (ties share a rank) and marks those above `REFERENCE`."""
    measured = sorted({r for r, _ in rates.values() if r is not None}, reverse=True)
    ref = rates.get(REFERENCE, (None, 0))[0]
    return {m: MapFaithfulness(m, r, n, None if r is None else measured.index(r) + 1,
                               r is not None and ref is not None and m != REFERENCE and r > ref)
            for m, (r, n) in rates.items()}


def spatial_methods(ranking: Mapping[str, MapFaithfulness], candidates: Iterable[str]) -> tuple[str, ...]:
    """The ``candidates`` (in their order) this run measured as more faithful than `REFERENCE`."""
    return tuple(m for m in candidates if m in ranking and ranking[m].beats_reference)
