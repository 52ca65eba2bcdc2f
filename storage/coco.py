"""COCO instances files: decoding their masks (RLE, polygons) and loading one as a `Dataset`.

A dataset folder with no manifest holds one COCO ``instances*.json``, in the folder or in
``<folder>/annotations/``. ``sample_id`` is the image id (as a string); the prompt is
``DEFAULT_COCO_PROMPT``; one object per category present in the image, its mask the union
of all that category's annotations (crowd included); a multi-word category name ("traffic
light") gives one entry per word, all grounding to the same region (as colour and shape
words do in the synthetic data). Masks are rasterised lazily (`Sample.object_masks`).
Unlike manifests, a COCO file is accepted or rejected as a whole: its structure is one
JSON document.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffcam.storage.dataset_hash import dataset_hash
from diffcam.storage.manifest import file_problem, resolve_rel
from diffcam.storage.samples import Dataset, ManifestError, ManifestProblem, Sample

__all__ = [
    "DEFAULT_COCO_PROMPT",
    "CocoRegion",
    "coco_rle_counts_from_string",
    "decode_coco_rle",
    "rasterise_polygons",
    "find_coco_files",
    "load_coco",
]

DEFAULT_COCO_PROMPT = "describe the image"


# --------------------------------------------------------------------------- masks


def coco_rle_counts_from_string(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools ``rleFrString``) to run lengths.

    Each count is a little-endian sequence of 5-bit groups in chars ``48 + v`` (bit 0x20 =
    more groups follow, bit 0x10 of the last group = sign); from the third count on the
    value is stored as a difference to the count two places earlier.
    """
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(s):
                raise ValueError("compressed RLE string ends inside a count")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE has an invalid character {s[p]!r} at {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_coco_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """COCO RLE (``{"size": [h, w], "counts": list | str}``) → bool (h, w) mask.

    Runs alternate background/foreground starting with background, over the image in
    column-major (Fortran) order.
    """
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = coco_rle_counts_from_string(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any():
        raise ValueError("RLE has a negative run length")
    if int(counts.sum()) != h * w:
        raise ValueError(f"RLE runs sum to {int(counts.sum())}, expected h*w = {h}*{w} = {h * w}")
    values = (np.arange(len(counts)) % 2).astype(bool)
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T.copy()


def rasterise_polygons(polygons: Iterable[Iterable[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` → bool (height, width) mask, the union.

    A pixel (row r, col c) is inside when its centre ``(c + 0.5, r + 0.5)`` is inside the
    polygon (even-odd rule), COCO's continuous pixel coordinates. Deviation from the
    brief's "PIL.ImageDraw": ImageDraw.polygon treats vertices as pixel indices and fills
    boundary pixels inclusively, which adds about one pixel row/column (a 3x2 box becomes
    4x3 = 12 px instead of 6); this scanline fill matches the polygon's area.
    """
    out = np.zeros((height, width), dtype=bool)
    yc = np.arange(height, dtype=np.float64) + 0.5
    for poly in polygons:
        pts = np.asarray(list(poly), dtype=np.float64)
        if pts.size < 6 or pts.size % 2:
            raise ValueError(f"polygon needs an even number (>= 6) of coordinates, got {pts.size}")
        xy = pts.reshape(-1, 2)
        x1, y1 = xy[:, 0], xy[:, 1]
        x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
        # Edge crosses the row centre y when min(y1,y2) <= y < max(y1,y2) (half-open: each
        # vertex counted once; horizontal edges never cross).
        lo, hi = np.minimum(y1, y2), np.maximum(y1, y2)
        crosses = (yc[:, None] >= lo[None, :]) & (yc[:, None] < hi[None, :])
        dy = np.where(y2 != y1, y2 - y1, 1.0)
        xs = x1[None, :] + (yc[:, None] - y1[None, :]) * ((x2 - x1) / dy)[None, :]
        xs = np.where(crosses, xs, np.inf)
        xs.sort(axis=1)
        n_cross = crosses.sum(axis=1)
        for r in np.nonzero(n_cross)[0]:
            row = xs[r, : n_cross[r]]
            for a, b in zip(row[0::2], row[1::2]):
                c0 = max(int(math.ceil(a - 0.5)), 0)
                c1 = min(int(math.ceil(b - 0.5)), width)  # exclusive
                if c1 > c0:
                    out[r, c0:c1] = True  # pairs of one polygon are disjoint; polygons are unioned
    return out


@dataclass(frozen=True)
class CocoRegion:
    """One object of a COCO image: the union of its annotations' segmentations.

    ``segmentations`` holds COCO segmentation values as loaded (polygon lists or RLE
    dicts); `rasterise` turns them into a bool (height, width) mask on demand.
    """

    height: int
    width: int
    segmentations: tuple[Any, ...]

    def rasterise(self) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        for seg in self.segmentations:
            if isinstance(seg, Mapping):
                m = decode_coco_rle(seg)
                if m.shape != mask.shape:
                    raise ValueError(f"RLE size {m.shape[0]}x{m.shape[1]} differs from image {self.height}x{self.width}")
            else:
                m = rasterise_polygons(seg, self.height, self.width)
            mask |= m
        return mask


# --------------------------------------------------------------------------- loading


def find_coco_files(folder: Path) -> list[Path]:
    """The ``instances*.json`` files in ``folder`` and in ``folder/annotations``, sorted."""
    return sorted([*folder.glob("instances*.json"), *(folder / "annotations").glob("instances*.json")])


def _coco_images_dir(ann: Path) -> Path:
    """Where a COCO file's images live: ``<ann dir>/images``, ``<ann dir>/<split>``,
    ``<ann dir>/../<split>`` (standard ``annotations/instances_val2017.json`` +
    ``val2017/``), ``<ann dir>/../images``, else the annotation file's folder."""
    split = ann.stem.split("_", 1)[1] if "_" in ann.stem else None
    cands = [ann.parent / "images"]
    if split:
        cands += [ann.parent / split, ann.parent.parent / split]
    cands += [ann.parent.parent / "images"]
    for c in cands:
        if c.is_dir():
            return c
    return ann.parent


def load_coco(path: Path, images_dir: Path | None) -> Dataset:
    """Load and validate the COCO instances file ``path``; every problem found raises one
    ManifestError. ``images_dir`` None: looked for next to the file (`_coco_images_dir`)."""
    where_file = "file"
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(path, [ManifestProblem(None, "json", f"unreadable COCO file: {e}", where_file)]) from e
    problems: list[ManifestProblem] = []
    if not isinstance(data, dict):
        raise ManifestError(path, [ManifestProblem(None, "json", "top level must be an object", where_file)])
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problems.append(ManifestProblem(None, key, "missing or not a list", where_file))
    if problems:
        raise ManifestError(path, problems)
    root = (images_dir or _coco_images_dir(path)).resolve()

    cats: dict[int, list[str]] = {}
    for k, c in enumerate(data["categories"]):
        where = f"categories[{k}]"
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str) \
                or not c["name"].split():
            problems.append(ManifestProblem(None, "id/name", f"needs int id and non-empty name, got {c!r}", where))
            continue
        if c["id"] in cats:
            problems.append(ManifestProblem(None, "id", f"duplicate category id {c['id']}", where))
        cats[c["id"]] = c["name"].lower().split()

    images: dict[int, tuple[int, dict]] = {}
    for k, im in enumerate(data["images"]):
        where = "images"
        line = k + 1
        if not isinstance(im, dict):
            problems.append(ManifestProblem(line, "image", f"must be an object, got {im!r}", where))
            continue
        bad = False
        for name in ("id", "width", "height"):
            v = im.get(name)
            if isinstance(v, bool) or not isinstance(v, int) or (name != "id" and v <= 0):
                kind = "an" if name == "id" else "a positive"
                problems.append(ManifestProblem(line, name, f"must be {kind} integer, got {v!r}", where))
                bad = True
        if not isinstance(im.get("file_name"), str) or not im["file_name"].strip():
            problems.append(ManifestProblem(line, "file_name", f"missing or empty: {im.get('file_name')!r}", where))
            bad = True
        if bad:
            continue
        if im["id"] in images:
            first = images[im["id"]][0]
            problems.append(ManifestProblem(line, "id", f"duplicate image id {im['id']} (first at images {first})", where))
            continue
        images[im["id"]] = (line, im)

    per_image: dict[int, dict[int, list[Any]]] = {}
    for k, a in enumerate(data["annotations"]):
        where = f"annotations[{k}]"
        if not isinstance(a, dict):
            problems.append(ManifestProblem(None, "annotation", f"must be an object, got {a!r}", where))
            continue
        iid, cid, seg = a.get("image_id"), a.get("category_id"), a.get("segmentation")
        if iid not in images:
            problems.append(ManifestProblem(None, "image_id", f"unknown image id {iid!r}", where))
            continue
        if cid not in cats:
            problems.append(ManifestProblem(None, "category_id", f"unknown category id {cid!r}", where))
            continue
        h, w = images[iid][1]["height"], images[iid][1]["width"]
        msg = _check_segmentation(seg, h, w)
        if msg:
            problems.append(ManifestProblem(None, "segmentation", msg, where))
            continue
        per_image.setdefault(iid, {}).setdefault(cid, []).append(seg)

    samples: list[Sample] = []
    for iid, (line, im) in images.items():
        ipath = resolve_rel(root, im["file_name"], "file_name", line, "images", problems)
        if ipath is None:
            continue
        objects: list[tuple[str, Path | None]] = []
        regions: list[CocoRegion] = []
        for cid in sorted(per_image.get(iid, {})):
            region = CocoRegion(im["height"], im["width"], tuple(per_image[iid][cid]))
            for word in cats[cid]:
                objects.append((word, None))
                regions.append(region)
        extra = {k: v for k, v in im.items() if k not in ("id", "file_name")}
        kind = file_problem(ipath)
        samples.append(Sample(
            sample_id=str(iid), image_path=ipath, prompt=DEFAULT_COCO_PROMPT, objects=tuple(objects),
            line_no=line, extra=extra, problem=None if kind is None else f"missing file(s): {ipath}",
            problem_kind=kind,
            coco_regions=tuple(regions),
        ))
    if not problems and not samples:
        problems.append(ManifestProblem(None, "images", "COCO file has no images", where_file))
    if problems:
        raise ManifestError(path, problems)
    return Dataset(root=root, uri=path.resolve().as_uri(), samples=tuple(samples),
                   content_hash=dataset_hash(path, root, [s.image_path for s in samples]),
                   format="coco", manifest_path=path.resolve())


def _check_segmentation(seg: Any, h: int, w: int) -> str | None:
    if isinstance(seg, list):
        if not seg:
            return "empty polygon list"
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly
            ):
                return f"polygon must be a list of >= 6 numbers (even count), got {str(poly)[:80]}"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            return f"RLE size must be [h, w], got {size!r}"
        if list(size) != [h, w]:
            return f"RLE size {size} differs from the image's [height, width] [{h}, {w}]"
        if isinstance(counts, list):
            if not all(isinstance(v, int) and v >= 0 for v in counts) or sum(counts) != h * w:
                return f"uncompressed RLE counts must be non-negative ints summing to {h * w}"
        elif not isinstance(counts, str):
            return f"RLE counts must be a list or a string, got {type(counts).__name__}"
        return None
    return f"must be a polygon list or an RLE dict, got {type(seg).__name__}"

