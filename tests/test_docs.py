"""docs/ARCHITECTURE.md's module tables name exactly the modules each package folder holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCH = (REPO / "docs" / "ARCHITECTURE.md").read_text()
FOLDERS = ("diffcam_core", "tasks", "storage", "flows", "training", "evaluation")


def _section(folder: str) -> str:
    m = re.search(r"^### `" + re.escape(folder) + r"/`[^\n]*\n(.*?)(?=^##)", ARCH, flags=re.M | re.S)
    assert m, f"docs/ARCHITECTURE.md has no section for {folder}/"
    return m.group(1)


def _listed(section: str) -> set[str]:
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names |= set(re.findall(r"`([\w/]+\.py)`", first))
    return names


@pytest.mark.parametrize("folder", FOLDERS)
def test_module_table_matches_the_folder(folder):
    on_disk = {p.relative_to(REPO / folder).as_posix() for p in (REPO / folder).rglob("*.py")
               if p.name != "__init__.py"}
    listed = _listed(_section(folder))
    assert sorted(on_disk - listed) == [], "modules missing from docs/ARCHITECTURE.md"
    assert sorted(listed - on_disk) == [], "docs/ARCHITECTURE.md lists modules that do not exist"


def test_package_table_matches_pyproject():
    import tomllib

    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    rows = dict(re.findall(r"^\| `(\w+)/` \| `(diffcam\.\w+)` \|", ARCH, flags=re.M))
    assert {v: k for k, v in rows.items()} == mapping


def test_statistic_columns_carry_the_statistics_own_definition():
    """A token_maps column that stores a per-map statistic as computed is documented by that
    statistic's one definition (it once described `spread` as something it is not)."""
    from diffcam.core.stats import STAT_KEYS
    from diffcam.storage.schemas import TOKEN_MAPS

    defs = {k.name: k.doc for k in STAT_KEYS}
    shared = [f for f in TOKEN_MAPS if f.name in defs and f.name not in ("grid_h", "grid_w")]
    assert {f.name for f in shared} >= {"spread", "com_x", "entropy", "gini", "border_frac", "centre_frac"}
    for f in shared:
        if f.name in ("inside_frac", "pointing_hit", "obj_iou"):
            continue  # computed on the mask of the word's object in rows.py, documented there
        assert (f.metadata or {}).get(b"doc", b"").decode() == defs[f.name], f.name
