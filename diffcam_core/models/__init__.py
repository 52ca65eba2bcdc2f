"""Model families. Each family module registers its adapter where it is defined
(`base.register_family`); `load_adapter` imports the modules listed here on first use, so
importing the protocol (`base`) does not import every family's transformers classes."""

from __future__ import annotations

import importlib

#: Modules of the built-in families, imported for their `register_family` side effect.
FAMILY_MODULES = ("diffusion_gemma", "llada")


def import_families() -> None:
    for name in FAMILY_MODULES:
        importlib.import_module(f"{__name__}.{name}")
