"""The text form of a planted cue, ``word=W,pos=top-left|X,Y,size=PX,color=NAME|R,G,B,p=P``.

How a cue is written on a command line (`diffcam data synth --cue`), in a recipe and in the
shipped-model constants; `parse_cue(cue_text(spec)) == spec`. The cue itself, and what it
validates, is `diffcam.core.synthetic.CueSpec`.
"""

from __future__ import annotations

import re
from typing import Any

from diffcam.core.synthetic import CUE_COLORS, CUE_CORNERS, CUE_KEYS, CueSpec, rgb_triple

__all__ = ["parse_cue", "cue_text"]

# split on a comma that is followed by `key=` (so `pos=3,4` and `color=1,2,3` keep their inner commas)
_SPLIT_RE = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)")


def parse_cue(text: str) -> CueSpec:
    """Parse the CLI form ``word=W,pos=top-left|...|X,Y,size=PX,color=NAME|R,G,B,p=P``.

    Raises ValueError naming the offending field (unknown, repeated, missing or bad value).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("cue spec is empty; expected word=W,pos=...,size=PX,color=...,p=P")
    values: dict[str, str] = {}
    for part in _SPLIT_RE.split(text.strip()):
        key, sep, val = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(f"cue spec part {part!r} is not key=value (in {text!r})")
        if key not in CUE_KEYS:
            raise ValueError(f"cue spec has unknown field {key!r}; fields are {list(CUE_KEYS)}")
        if key in values:
            raise ValueError(f"cue spec field {key!r} given twice (in {text!r})")
        if not val.strip():
            raise ValueError(f"cue spec field {key!r} is empty (in {text!r})")
        values[key] = val.strip()
    if "word" not in values:
        raise ValueError(f"cue spec field 'word' is missing (in {text!r})")
    kwargs: dict[str, Any] = {"word": values["word"]}
    if "pos" in values:
        kwargs["pos"] = _parse_pos(values["pos"])
    if "size" in values:
        try:
            kwargs["size"] = int(values["size"])
        except ValueError:
            raise ValueError(f"cue spec field 'size' must be an integer, got {values['size']!r}") from None
    if "color" in values:
        kwargs["color"] = _parse_color(values["color"])
    if "p" in values:
        try:
            kwargs["p"] = float(values["p"])
        except ValueError:
            raise ValueError(f"cue spec field 'p' must be a number, got {values['p']!r}") from None
    return CueSpec(**kwargs)


def cue_text(spec: CueSpec) -> str:
    """The CLI form; ``parse_cue(cue_text(spec)) == spec``."""
    pos = spec.pos if isinstance(spec.pos, str) else f"{spec.pos[0]},{spec.pos[1]}"
    color = spec.color if isinstance(spec.color, str) else ",".join(str(c) for c in spec.color)
    return f"word={spec.word},pos={pos},size={spec.size},color={color},p={spec.p!r}"


def _parse_pos(val: str) -> str | tuple[int, int]:
    if "," not in val:
        if val.strip().lower() not in CUE_CORNERS:
            raise ValueError(f"cue spec field 'pos' must be one of {list(CUE_CORNERS)} or X,Y, got {val!r}")
        return val.strip().lower()
    parts = val.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return (int(parts[0]), int(parts[1]))
    except ValueError:
        raise ValueError(f"cue spec field 'pos' X,Y must be two integers, got {val!r}") from None


def _parse_color(val: str) -> str | tuple[int, int, int]:
    if "," not in val:
        if val.strip().lower() not in CUE_COLORS:
            raise ValueError(f"cue spec field 'color' must be one of {sorted(CUE_COLORS)} or R,G,B, got {val!r}")
        return val.strip().lower()
    parts = val.split(",")
    try:
        if len(parts) != 3:
            raise ValueError
        return rgb_triple(tuple(int(p) for p in parts), "color")
    except ValueError:
        raise ValueError(f"cue spec field 'color' R,G,B must be three integers 0..255, got {val!r}") from None
