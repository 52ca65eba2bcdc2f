"""Reading a `--spec`: a JSON or TOML file, a JSON object, or key=value overrides.

One reader for every command that builds a training spec, so the same text means the same spec
everywhere; the spec's own pydantic model then validates it (unknown fields, types, ranges).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["read_overrides"]


def _value(text: str) -> Any:
    """A key=value right-hand side: a JSON scalar when it parses as one (4, 0.5, true), else the text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (int, float, bool, str)) or value is None else text


def read_overrides(text: str | None) -> dict[str, Any]:
    """The overrides `text` names: a path to a ``.json`` / ``.toml`` file, a JSON object, or
    comma-separated ``key=value`` pairs (``text_layers=6,position_init_std=0.5``); None or empty:
    no override. Raises ValueError with the form expected."""
    if text is None or not text.strip():
        return {}
    text = text.strip()
    path = Path(text)
    if path.suffix in (".json", ".toml"):
        if not path.is_file():
            raise ValueError(f"no such spec file {text!r}")
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    elif text.startswith("{"):
        data = json.loads(text)
    else:
        data = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"spec {text!r}: expected a .json/.toml file, a JSON object or key=value[,key=value...]")
            data[key.strip()] = _value(value.strip())
    if not isinstance(data, dict):
        raise ValueError(f"spec {text!r}: expected an object of spec fields, got {type(data).__name__}")
    return data
