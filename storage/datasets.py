"""Where a dataset is read: `load_dataset` finds what a path holds and hands it to its loader.

This is the one entry point the audit, the bias step and the tools use; what each format
holds and how it is validated is in its loader's module:

- a folder with exactly one ``manifest.jsonl`` / ``manifest.csv`` / ``manifest.parquet``
  plus the files it names: `diffcam.storage.manifest` (rows, validation policy);
- a folder without a manifest but with one COCO ``instances*.json`` in it or in
  ``<folder>/annotations/``: `diffcam.storage.coco`;
- or the manifest / COCO file itself.

The result is a `diffcam.storage.samples.Dataset`; images and masks are decoded later, one sample
at a time, by `diffcam.storage.images`.
"""

from __future__ import annotations

from pathlib import Path

from diffcam.storage.coco import find_coco_files, load_coco
from diffcam.storage.manifest import load_manifest
from diffcam.storage.samples import Dataset, ManifestError, ManifestProblem

__all__ = ["MANIFEST_NAMES", "load_dataset"]

MANIFEST_NAMES: dict[str, str] = {
    "manifest.jsonl": "jsonl",
    "manifest.csv": "csv",
    "manifest.parquet": "parquet",
}


def load_dataset(path: str | Path, *, images_dir: str | Path | None = None) -> Dataset:
    """Load and validate a dataset.

    ``path``: a dataset folder (one manifest.jsonl/.csv/.parquet, or else one COCO
    ``instances*.json`` in it or in ``annotations/``), a manifest file, or a COCO
    ``instances*.json``. ``images_dir`` overrides where COCO images are looked for.
    Raises ManifestError (`diffcam.storage.manifest` says what is rejected).
    """
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in MANIFEST_NAMES if (path / n).is_file()]
        if len(found) > 1:
            raise ManifestError(path, [ManifestProblem(None, "manifest", f"ambiguous: {[p.name for p in found]}", "folder")])
        if found:
            return load_manifest(found[0], MANIFEST_NAMES[found[0].name])
        coco = find_coco_files(path)
        if len(coco) == 1:
            return load_coco(coco[0], Path(images_dir) if images_dir else None)
        what = (f"several COCO files {[str(c) for c in coco]}" if coco
                else "no manifest.jsonl/.csv/.parquet or COCO instances*.json")
        raise ManifestError(path, [ManifestProblem(None, "manifest", what, "folder")])
    if not path.is_file():
        raise ManifestError(path, [ManifestProblem(None, "path", "does not exist", "file")])
    suffix = path.suffix.lower()
    if suffix == ".json":
        return load_coco(path, Path(images_dir) if images_dir else None)
    fmt = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(suffix)
    if fmt is None:
        what = f"unknown manifest type {suffix!r} (want .jsonl/.csv/.parquet/.json)"
        raise ManifestError(path, [ManifestProblem(None, "path", what, "file")])
    return load_manifest(path, fmt)

