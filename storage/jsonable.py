"""Plain JSON values from what the tables, pandas and numpy hand back: one conversion for
every JSON the project writes (validation details, compare results, query output)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["jsonable"]


def jsonable(v: Any) -> Any:
    """``v`` with only dict / list / str / int / float / bool / None inside, so that
    ``json.dumps(..., allow_nan=False)`` accepts it: mapping keys become strings, tuples
    lists, bytes hex, numpy scalars Python ones, NaN and infinities None, dates and times
    ISO 8601; anything else its ``str``."""
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if hasattr(v, "item") and not isinstance(v, str):  # numpy scalars (and 0-d arrays)
        try:
            v = v.item()
        except (ValueError, TypeError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)
