"""Reading an audited run back for the bias step: its maps, words and samples, and the object masks.

The tables keep mask statistics, not masks, so the masks are re-read from the dataset.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffcam.core.bias.faithful import MapFaithfulness, rank_maps

__all__ = ["load_run_maps", "map_ranking", "object_masks"]


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def load_run_maps(store: Any, run_id: str, methods: Sequence[str]) -> dict[str, Any]:
    """The run's maps and samples: ``{"samples": {sid: row}, "words": {sid: [(index, word,
    is_function)]}, "maps": {(sid, index, method): (h, w) float32}}``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from diffcam.storage.schemas import dequantize_map

    tm = store.read_table("token_maps", run_id).select(
        ["sample_id", "word_index", "word", "is_function", "method", "grid_h", "grid_w", "map", "map_max"])
    sm = store.read_table("samples", run_id).select(["sample_id", "image_path", "answer", "prompt"])
    words: dict[str, dict[int, tuple[str, bool]]] = defaultdict(dict)
    for r in tm.select(["sample_id", "word_index", "word", "is_function"]).to_pylist():
        words[r["sample_id"]][r["word_index"]] = (r["word"], r["is_function"])
    sel = tm.filter(pc.is_in(tm.column("method"), value_set=pa.array(list(methods), type=pa.string())))
    maps = {}
    for r in sel.to_pylist():
        maps[(r["sample_id"], r["word_index"], r["method"])] = dequantize_map(
            r["map"], r["grid_h"], r["grid_w"], r["map_max"])
    return {
        "samples": {r["sample_id"]: r for r in sm.to_pylist()},
        "words": {sid: [(i, *ws[i]) for i in sorted(ws)] for sid, ws in words.items()},
        "maps": maps,
    }


def map_ranking(source: Any, run_id: str) -> dict[str, MapFaithfulness]:
    """The run's maps ranked by vanish rate (`diffcam.core.bias.faithful.rank_maps`), from the same
    query the report's Faithfulness section shows. ``source``: a `Store` or a catalog connection."""
    from diffcam.storage.queries import run_query

    rows = run_query(source, "faithfulness_table", run_id=run_id).to_pylist()
    return rank_maps({r["method"]: (r["vanish_rate"], r["n_words"]) for r in rows})


def object_masks(dataset: Any, sample_ids: Sequence[str]) -> dict[str, list[tuple[str, np.ndarray, str | None]]]:
    """(word, bool mask, mask path) per manifest object entry, for the samples of the run."""
    from diffcam.storage.images import SampleError

    by_id = {s.sample_id: s for s in dataset.samples}
    out = {}
    for sid in sample_ids:
        s = by_id.get(sid)
        if s is None:
            raise ValueError(f"sample {sid!r} of the run is not in the dataset {dataset.uri}: wrong --dataset?")
        if not s.objects:
            out[sid] = []
            continue
        try:
            masks = s.object_masks(_image_size(s.image_path))
        except (SampleError, OSError) as e:
            raise ValueError(f"sample {sid}: masks cannot be read for the bias audit: {e}") from e
        paths = [None if p is None else str(p) for _, p in s.objects]
        out[sid] = [(w, m, p) for (w, m), p in zip(masks, paths)]
    return out
