"""One import name: everything diffcam installs lives under `diffcam.*`, so a project that has
its own top-level `tasks`, `flows` or `storage` package on the path neither shadows diffcam's
nor is shadowed by it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAPPING = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def _module_names() -> list[str]:
    names = []
    for package, folder in MAPPING.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            names.append(".".join([package, *parts]))
    return names


def test_every_package_folder_is_mapped_and_listed():
    """pyproject's package list and its folder mapping name the same packages, and every folder
    with Python files under a mapped folder is a listed package (nothing left uninstalled)."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for package, folder in MAPPING.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]))
        for py in (REPO / folder).rglob("*.py"):
            assert (py.parent / "__init__.py").is_file(), f"{py} is in a folder without __init__.py: not installed"
    assert found == listed


def test_installed_package_imports_beside_foreign_top_level_packages(tmp_path):
    """Foreign `tasks`, `flows`, `storage` and `diffcam_core` packages first on the path: every
    diffcam module still imports, and none of the foreign ones is imported by it."""
    for name in ("tasks", "flows", "storage", "diffcam_core", "training", "evaluation"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('foreign {name} imported')\n")
    script = textwrap.dedent(f"""
        import importlib, json, sys
        names = {_module_names()!r}
        failed = {{}}
        for n in names:
            try:
                importlib.import_module(n)
            except Exception as e:
                failed[n] = repr(e)
        foreign = sorted(m for m in sys.modules if m.split(".")[0] in
                         ("tasks", "flows", "storage", "diffcam_core", "training", "evaluation"))
        files = {{n: sys.modules[n].__file__ for n in names if n in sys.modules}}
        print(json.dumps({{"failed": failed, "foreign": foreign, "files": files}}))
    """)
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "PREFECT_HOME": str(tmp_path / "prefect"), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["failed"] == {}
    assert out["foreign"] == []
    assert len(out["files"]) == len(_module_names()) > 50
    for name, file in out["files"].items():
        folder = MAPPING[next(p for p in sorted(MAPPING, key=len, reverse=True) if name == p or name.startswith(p + "."))]
        assert Path(file).resolve().is_relative_to(REPO / folder), (name, file)


def test_console_script_points_into_the_package():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"diffcam": "diffcam.flows.cli:main"}
