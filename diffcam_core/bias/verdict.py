"""What kind of dependence a counterfactual found: a shortcut, a region named as an object, or none.

Erasing a region can change an answer in two ways that mean different things to an auditor:

- **shortcut**: a word about a real object changes or goes (the marker decided "circle"
  for the circle that is there; without the marker the model says "square", or drops the
  object): the region drives what the model says *about an object*;
- **named as an object**: a whole phrase goes while every word about the real objects
  stays ("a red circle and a green square" → "a red circle", where the image holds only
  the red circle): the model reads the region as an object of its own — a hallucinated
  object, not a shortcut.

Both are dependences; a flag that mixes them up tells the auditor the wrong story (a clean
model that reads a logo as an extra object is not "relying on a shortcut"). The rules here
compare answers as multisets of content words (`diffcam.core.words`: function words left
out), so they need no parser for the answer's phrases. Pure: answers in, verdict out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from diffcam.core.words import is_function_word, normalise_word

__all__ = ["UNCHANGED", "NAMED_AS_OBJECT", "WORD_CHANGED", "content_words", "answer_change", "dependence_verdict"]

UNCHANGED = "unchanged"
#: a phrase left the answer, every real object's word in it stayed (gains: real words only)
NAMED_AS_OBJECT = "phrase_dropped"
#: a real object's word left the answer, or another word took a word's place
WORD_CHANGED = "word_changed"


def content_words(text: str | None) -> Counter:
    """The answer's content words with their counts (normalised; function words left out)."""
    words = (normalise_word(w) for w in (text or "").split())
    return Counter(w for w in words if w and not is_function_word(w))


def answer_change(before: str | None, after: str | None, real_words: Iterable[str]) -> str:
    """How ``after`` (an edited image's answer) differs from ``before``.

    ``real_words``: the words of the objects really in the edited image (its masks'
    words). `UNCHANGED`: the same content words. `NAMED_AS_OBJECT`: the answer got shorter
    (more content words lost than gained: a phrase went), every real-object word of
    ``before`` is still in ``after``, and whatever was gained is a real object's word (the
    model may describe a real object *correctly* once the region is gone: measured on the
    shipped clean model, whose marker phrase also turned a real circle's "circle" into
    "square"). `WORD_CHANGED`: anything else (a real object's word lost, or a word replaced
    by one no real object has, with no phrase gone).
    """
    b, a = content_words(before), content_words(after)
    lost, gained = b - a, a - b
    if not lost and not gained:
        return UNCHANGED
    real = {normalise_word(w) for w in real_words}
    kept = all(w in a for w in b if w in real)
    shorter = sum(lost.values()) > sum(gained.values())
    return NAMED_AS_OBJECT if shorter and kept and all(w in real for w in gained) else WORD_CHANGED


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def dependence_verdict(examples: Sequence[Mapping[str, Any]], word: str, confirm_min: float) -> dict[str, Any]:
    """Which kind of dependence the tested samples of one region show.

    Each example: ``answers`` {"original", "no_region", optionally "control"} (the image
    with the region erased, with a same-size off-object window erased instead) and
    ``object_words`` (the words of the sample's real objects; erasing the region keeps
    them). Per sample, with the object present:
      shortcut  ⇔ the region's erasure is `WORD_CHANGED` and the word's count drops;
      named     ⇔ the region's erasure is `NAMED_AS_OBJECT`;
    and the same two events for the control erasure. Scores are rate(region) −
    rate(control). ``kind`` is "named_as_object" when its score is ≥ ``confirm_min`` and
    above the shortcut score, "shortcut" when the shortcut score is ≥ ``confirm_min``,
    else None (no dependence of either kind with the object present).
    """
    w = normalise_word(word)
    short, named, short_c, named_c = [], [], [], []
    for ex in examples:
        ans = ex["answers"]
        real = ex.get("object_words", ())
        ch = answer_change(ans["original"], ans.get("no_region"), real)
        drop = content_words(ans.get("no_region"))[w] < content_words(ans["original"])[w]
        short.append(ch == WORD_CHANGED and drop)
        named.append(ch == NAMED_AS_OBJECT)
        if ans.get("control") is not None:
            chc = answer_change(ans["original"], ans["control"], real)
            drop_c = content_words(ans["control"])[w] < content_words(ans["original"])[w]
            short_c.append(chc == WORD_CHANGED and drop_c)
            named_c.append(chc == NAMED_AS_OBJECT)
    rs, rn = _rate(short), _rate(named)
    cs, cn = _rate(short_c), _rate(named_c)
    s_score = None if rs is None else rs - (cs or 0.0)
    n_score = None if rn is None else rn - (cn or 0.0)
    kind = None
    if n_score is not None and n_score >= confirm_min and n_score > (s_score or 0.0):
        kind = "named_as_object"
    elif s_score is not None and s_score >= confirm_min:
        kind = "shortcut"
    return {"rule": "per tested sample, with its object present: shortcut = erasing the region changes a real "
                    "object's word (the word's count drops); named = erasing it drops words while every real "
                    "object's word stays; score = rate - rate under the control erasure; named_as_object when its "
                    "score >= confirm_min and above the shortcut score, shortcut when its score >= confirm_min",
            "kind": kind, "shortcut_rate": rs, "named_rate": rn, "shortcut_rate_control": cs,
            "named_rate_control": cn, "shortcut_score": s_score, "named_score": n_score,
            "confirm_min": confirm_min, "n": len(examples)}
