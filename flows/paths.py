"""Where the shipped artefacts live (resolved from the repository checkout)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "tiny-shapes"
CUE_MODEL = REPO_ROOT / "models" / "tiny-shapes-cue"
DEFAULT_STORE = Path("diffcam-store")
