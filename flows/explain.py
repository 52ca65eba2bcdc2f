"""`diffcam explain`: one image → answer, per-word overlays, `explain.json`.

`explain.json` keys (stable; numbers as numbers):
  answer, prompt, image, model, grid [rows, cols], n_steps, layer, attribution_step,
  distractor, layers (valid layer names), timings {generate_s, attribution_s, total_s},
  words: [{index, word, is_function, commit_step, distractor, target_score,
           distractor_score, zero_map, overlay (file name),
           maps {method: [[float]] grid rows}, stats {method: {stat: value}}}]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffcam.core.cam import explain
from diffcam.core.metrics import upsample_bilinear
from diffcam.core.models.base import load_adapter
from diffcam.core.settings import CamSettings, GenerationSettings
from diffcam.core.stats import map_stats
from diffcam.storage.images import load_image
from diffcam.storage.report import heat_colors


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Blend a grid map, upsampled bilinearly to the image size, over the image."""
    w, h = image.size
    up = upsample_bilinear(np.asarray(heat, dtype=np.float64), (h, w))
    if up.max() > 0:
        up = up / up.max()
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    mixed = (1 - alpha) * base + alpha * heat_colors(up).astype(np.float32)
    return Image.fromarray(mixed.clip(0, 255).astype(np.uint8))


def side_by_side(image: Image.Image, panels: list[tuple[str, np.ndarray]], scale: int = 4) -> Image.Image:
    """Image, then one overlay per (title, map), each upscaled `scale`× for viewing, titled."""
    w, h = image.size
    big = (w * scale, h * scale)
    tiles = [("image", image.convert("RGB"))] + [(t, overlay(image, m)) for t, m in panels]
    pad = 14
    canvas = Image.new("RGB", (big[0] * len(tiles), big[1] + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, tile) in enumerate(tiles):
        canvas.paste(tile.resize(big, Image.NEAREST), (i * big[0], pad))
        draw.text((i * big[0] + 2, 1), title, fill="black")
    return canvas


def run_explain(
    image_path: Path,
    prompt: str,
    model_dir: Path,
    out: Path,
    *,
    layer: str | None = None,
    distractor: str = "others-mean",
    attribution_step: str = "commit",
    seed: int = 0,
) -> dict:
    image = load_image(Path(image_path))
    adapter = load_adapter(model_dir)
    settings = CamSettings(
        layer=layer,
        distractor=distractor,
        attribution_step=attribution_step,
        generation=GenerationSettings(seed=seed),
    )
    result = explain(adapter, image, prompt, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    words = []
    for wm in result.words:
        name = f"word{wm.word.index:02d}_{_safe(wm.word.text)}.png"
        panels = [(m, wm.maps[m]) for m in ("diffusion-cam-raw", "diffusion-cam") if m in wm.maps]
        side_by_side(image, panels).save(out / name)
        words.append(
            {
                "index": wm.word.index,
                "word": wm.word.text,
                "is_function": wm.word.is_function,
                "commit_step": wm.word.commit_step,
                "distractor": wm.distractor,
                "target_score": wm.target_score,
                "distractor_score": wm.distractor_score,
                "zero_map": wm.zero_map,
                "overlay": name,
                "maps": {m: np.round(v.astype(np.float64), 6).tolist() for m, v in wm.maps.items()},
                "stats": {m: map_stats(v) for m, v in wm.maps.items()},
            }
        )
    summary = {
        "answer": result.answer,
        "prompt": prompt,
        "image": str(image_path),
        "model": str(model_dir),
        "grid": list(result.grid),
        "n_steps": result.n_steps,
        "layer": result.layer,
        "attribution_step": result.attribution_step,
        "distractor": distractor,
        "layers": adapter.valid_layers(),
        "timings": result.timings,
        "words": words,
    }
    (out / "explain.json").write_text(json.dumps(summary, indent=2))
    return summary


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)[:24] or "_"
