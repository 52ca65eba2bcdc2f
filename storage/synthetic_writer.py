"""The synthetic dataset writer: samples of `diffcam.core.synthetic` as a manifest dataset
folder that `diffcam.storage.datasets.load_dataset` reads like any other."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from diffcam.core.synthetic import (
    SynthSettings,
    cue_region,
    make_samples,
    object_words,
    vocabulary,
)

__all__ = ["write_synthetic_dataset"]


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", optimize=False)


def write_synthetic_dataset(
    out_dir: str | Path, n: int, seed: int, settings: SynthSettings | None = None,
    *, progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``n`` synthetic samples as a dataset folder; returns the folder.

    Layout: ``images/<id>.png``, ``masks/<id>_<k>.png`` (object k in answer order, L-mode
    0/255), ``dataset.json`` (generator, seed, n, settings incl. cue, vocabulary) and
    ``manifest.jsonl`` (one line per sample: sample_id, image, prompt, objects with one
    entry per grounding word — colour and shape of object k share ``masks/<id>_<k>.png``
    — plus ``answer``, ``cue_present`` and ``cue_box`` ([x0, y0, x1, y1] or null)).

    Atomicity: everything is written into a hidden temporary sibling folder, manifest
    last, and the folder is renamed to ``out_dir`` at the end; ``out_dir`` must not exist
    or be empty (FileExistsError otherwise). A crash leaves only ``.<name>.tmp-*``.
    """
    settings = settings or SynthSettings()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        width = max(6, len(str(n - 1)))
        lines: list[str] = []
        box = list(cue_region(settings)) if settings.cue is not None else None
        for i, s in enumerate(make_samples(n, seed, settings)):
            sid = f"synth-{i:0{width}d}"
            image_rel = f"images/{sid}.png"
            _save_png(s.image, tmp / image_rel)
            objects = []
            for k, obj in enumerate(s.objects):
                mask_rel = f"masks/{sid}_{k}.png"
                _save_png(obj.mask.astype(np.uint8) * 255, tmp / mask_rel)
                objects += [{"word": w, "mask": mask_rel} for w in object_words(obj)]
            lines.append(json.dumps({
                "sample_id": sid, "image": image_rel, "prompt": s.prompt, "objects": objects,
                "answer": s.answer, "cue_present": s.cue_present,
                "cue_box": box if s.cue_present else None,
            }, separators=(",", ":")))
            if progress is not None:
                progress(i + 1)
        meta = {
            "generator": "diffcam.core.synthetic",
            "format_version": 1,
            "seed": seed,
            "n": n,
            "settings": settings.model_dump(mode="json"),
            "cue": None if settings.cue is None else settings.cue.model_dump(mode="json"),
            "vocabulary": vocabulary(settings),
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
        part = tmp / "manifest.jsonl.part"
        part.write_text("\n".join(lines) + "\n", "utf-8")
        os.replace(part, tmp / "manifest.jsonl")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
