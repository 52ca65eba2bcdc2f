"""Dataset input: validated manifests (JSONL / CSV / Parquet), COCO instances, synthetic writer.

Formats (the README's "Datasets" paragraph is the user-facing summary):

- A dataset folder holds exactly one ``manifest.jsonl`` / ``manifest.csv`` /
  ``manifest.parquet`` plus the files it names, or (no manifest) one COCO
  ``instances*.json`` in the folder or in ``<folder>/annotations/``.
- Manifest rows: ``sample_id`` (string), ``image`` (path relative to the manifest's
  folder), ``prompt`` (non-empty string), optional ``objects``: a list of
  ``{"word": w, "mask": relative PNG path}`` (CSV/Parquet: the same list as a JSON string;
  Parquet may also hold a native list of structs). Any other field is kept in
  ``Sample.extra``.
- COCO: ``sample_id`` is the image id (as a string); the prompt is
  ``DEFAULT_COCO_PROMPT``; one object per category present in the image, its mask the
  union of all that category's annotations (crowd included); a multi-word category
  name ("traffic light") gives one entry per word, all grounding to the same region
  (as colour and shape words do in the synthetic data). Masks are rasterised lazily
  (`Sample.object_masks`).

Validation policy (decided here; the audit relies on it; docs/RELIABILITY.md):

- REJECT the whole manifest with one `ManifestError` listing every problem only when it is
  *structurally* broken: the file cannot be read, it is not text in UTF-8 at all, a CSV
  or Parquet manifest lacks a required column, the CSV itself is malformed, several
  manifests are present — or not a single line is a usable sample (a wrong file, most
  likely). Auditing such a file would silently change what "the dataset" means.
- ONE BAD LINE is that line's failure row, and the rest of the run proceeds: the line
  becomes a `Sample` with ``problem`` (the message, naming line and field) and
  ``problem_kind`` (a stable reason token, see `LINE_PROBLEM_KINDS`) set, and the
  pipeline writes it to ``failures`` (stage ``load``) instead of auditing it. A line whose
  ``sample_id`` is unusable (malformed JSON, not an object, missing/empty/overlong id,
  the reserved ``line:<n>`` form) or repeats an earlier id (the first line keeps the id)
  is keyed ``line:<n>``; any other bad line keeps its own id. Per-line problems: a path
  that is absolute, escapes the root with ``..`` or resolves (symlinks followed) outside
  the dataset root — such a path is never opened or hashed —, missing/empty/overlong
  prompts, text that is not valid UTF-8 (or holds lone surrogates), control characters
  in ids or prompts, malformed ``objects``, and a named file that is missing or not a
  regular file (a folder, a FIFO, a device: opening those could block).
  `Dataset.line_problems` lists them all (the CLI prints them before the run starts).
  Every non-blank manifest line therefore ends in exactly one of samples / failures.
- Content problems (zero-byte, truncated, corrupt, not an image, too large, animated,
  unsupported pixel format, mask size mismatch, non-binary or empty masks) are only found
  when the file is opened: `load_image` / `load_mask` / `Sample.object_masks` raise
  `SampleError` with ``stage`` and ``reason`` for the failure table.
- COCO files keep the strict whole-file policy (their structure is one JSON document).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffcam_core.synthetic import (
    SynthSettings,
    cue_region,
    make_samples,
    object_words,
    vocabulary,
)

__all__ = [
    "MANIFEST_NAMES",
    "DEFAULT_COCO_PROMPT",
    "ManifestProblem",
    "ManifestError",
    "LINE_PROBLEM_KINDS",
    "MAX_PROMPT_CHARS",
    "MAX_SAMPLE_ID_CHARS",
    "SampleError",
    "CocoRegion",
    "Sample",
    "Dataset",
    "load_dataset",
    "load_image",
    "load_mask",
    "dataset_hash",
    "write_synthetic_dataset",
    "decode_coco_rle",
    "coco_rle_counts_from_string",
    "rasterise_polygons",
]

MANIFEST_NAMES: dict[str, str] = {
    "manifest.jsonl": "jsonl",
    "manifest.csv": "csv",
    "manifest.parquet": "parquet",
}
DEFAULT_COCO_PROMPT = "describe the image"
REQUIRED_FIELDS = ("sample_id", "image", "prompt")
DEFAULT_MAX_PIXELS = 50_000_000
#: A prompt longer than this is a manifest error (``prompt-too-long``); a prompt that fits
#: but exceeds the model's context is refused by the worker (``input-too-long``).
MAX_PROMPT_CHARS = 4000
MAX_SAMPLE_ID_CHARS = 256
#: Failure-row keys of lines without a usable sample id; a manifest id of this form is refused.
LINE_KEY_PREFIX = "line:"
#: Reason tokens of per-line manifest problems (`Sample.problem_kind`).
LINE_PROBLEM_KINDS = (
    "malformed-line",  # unparseable JSON / CSV record, or not an object
    "bad-id",          # sample_id missing, not a string, empty, too long, control characters, reserved form
    "duplicate-id",    # sample_id seen on an earlier line
    "missing-field",   # image or prompt missing
    "bad-prompt",      # prompt not a string, empty, or with control characters
    "prompt-too-long",
    "bad-encoding",    # text that is not valid UTF-8 (or a lone surrogate from a JSON escape)
    "unsafe-path",     # absolute, escapes the root with '..', resolves outside the root, NUL byte
    "bad-path",        # not a non-empty string
    "bad-objects",     # objects malformed (not a list, bad word, no mask)
    "missing",         # a named file does not exist
    "not-a-file",      # a named path is a folder, FIFO, device, ...
)
_HASH_CHUNK = 1 << 20
_MAX_PROBLEMS_IN_MESSAGE = 50


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ManifestProblem:
    """One problem found while validating a manifest.

    ``line`` is the 1-based physical line (JSONL), line of the record (CSV, header = 1),
    1-based row (Parquet) or 1-based index into ``images`` (COCO); ``where`` says which.
    """

    line: int | None
    field: str
    message: str
    where: str = "line"
    #: Reason token (`LINE_PROBLEM_KINDS`) of a per-line problem; None for structural ones.
    kind: str | None = None

    def __str__(self) -> str:
        loc = f"{self.where} {self.line}" if self.line is not None else self.where
        return f"{loc}: {self.field}: {self.message}"


class ManifestError(ValueError):
    """The manifest (or COCO file) is rejected as a whole; ``problems`` lists every issue."""

    def __init__(self, source: str | Path, problems: Iterable[ManifestProblem]):
        self.source = str(source)
        self.problems: tuple[ManifestProblem, ...] = tuple(problems)
        shown = [str(p) for p in self.problems[:_MAX_PROBLEMS_IN_MESSAGE]]
        more = len(self.problems) - len(shown)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{self.source}: {len(self.problems)} problem(s):\n  " + "\n  ".join(shown) + tail
        )


class SampleError(Exception):
    """One sample cannot be processed. ``stage`` (e.g. "load", "mask") and ``reason`` (a short
    stable token: "missing", "not-a-file", "empty", "not-an-image", "truncated", "corrupt",
    "too-large", "animated", "unsupported-mode", "permission-denied", "unreadable",
    "size-mismatch", "unknown-labels", "empty-mask", "bad-segmentation") go to the failure
    table; the message starts with ``[stage/reason]``."""

    def __init__(self, stage: str, reason: str, message: str, *, path: str | Path | None = None):
        self.stage = stage
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"[{stage}/{reason}] {message}")


# --------------------------------------------------------------------------- COCO masks


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


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    """One validated input sample.

    ``objects``: (word, mask_path) per grounding word; mask_path is an absolute Path for
    manifest datasets and None for COCO (then ``coco_regions[i]`` holds object i's region).
    ``problem``: set when the sample is known to be unusable before opening any file (a
    bad manifest line, a missing image/mask); the pipeline records it as a failure row,
    it never drops it. ``problem_kind``: its reason token (`LINE_PROBLEM_KINDS`). Such a
    sample's other fields are placeholders (``image_path`` is the dataset root, never
    the rejected path) and must not be used.
    """

    sample_id: str
    image_path: Path
    prompt: str
    objects: tuple[tuple[str, Path | None], ...]
    line_no: int
    extra: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    coco_regions: tuple[CocoRegion, ...] | None = None
    problem_kind: str | None = None

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(w for w, _ in self.objects)

    def object_masks(self, size: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
        """(word, bool (H, W) mask) per object entry for an image of PIL ``size`` = (W, H).

        Raises SampleError(stage="mask") for missing/unreadable masks or a size mismatch.
        A mask file shared by several words is read once.
        """
        out: list[tuple[str, np.ndarray]] = []
        if self.coco_regions is not None:
            cache_r: dict[int, np.ndarray] = {}
            for (word, _), region in zip(self.objects, self.coco_regions):
                if (region.width, region.height) != tuple(size):
                    raise SampleError(
                        "mask", "size-mismatch",
                        f"COCO annotation says {region.width}x{region.height} (WxH), "
                        f"image {self.image_path} is {size[0]}x{size[1]}",
                        path=self.image_path,
                    )
                if id(region) not in cache_r:
                    try:
                        cache_r[id(region)] = region.rasterise()
                    except (ValueError, TypeError, KeyError) as e:
                        raise SampleError("mask", "bad-segmentation", f"sample {self.sample_id}: {e}") from e
                out.append((word, cache_r[id(region)]))
            return out
        cache: dict[Path, np.ndarray] = {}
        for word, path in self.objects:
            assert path is not None
            if path not in cache:
                cache[path] = load_mask(path, size)
            out.append((word, cache[path]))
        return out


@dataclass(frozen=True)
class Dataset:
    """A validated dataset. ``uri``: the manifest (or COCO json) as a file URI;
    ``format``: "jsonl" | "csv" | "parquet" | "coco"; ``meta``: ``dataset.json`` when present."""

    root: Path
    uri: str
    samples: tuple[Sample, ...]
    content_hash: str
    format: str
    manifest_path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    #: Every per-line problem (lines that become failure rows), manifest order.
    line_problems: tuple[ManifestProblem, ...] = ()

    def __len__(self) -> int:
        return len(self.samples)


# --------------------------------------------------------------------------- images


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@contextlib.contextmanager
def _decoding(stage: str, what: str, path: Path) -> Iterator[None]:
    """Turn whatever Pillow raises while decoding `path` into a `SampleError` with a reason."""
    try:
        yield
    except SampleError:
        raise
    except UnidentifiedImageError:
        raise SampleError(stage, "not-an-image", f"{what} {path} is not a recognised image", path=path) from None
    except Image.DecompressionBombError as e:
        raise SampleError(stage, "too-large", f"{what} {path}: {e}", path=path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _decode_error(stage, what, path, e) from e


def _decode_error(stage: str, what: str, path: Path, e: BaseException) -> SampleError:
    """Map a decoder exception to a precise reason token."""
    if isinstance(e, PermissionError):
        return SampleError(stage, "permission-denied", f"{what} {path}: permission denied", path=path)
    text = str(e).lower()
    if "truncat" in text:
        reason = "truncated"
    elif "broken data stream" in text or "crc" in text or "corrupt" in text or "invalid" in text:
        reason = "corrupt"
    else:
        reason = "unreadable"
    return SampleError(stage, reason, f"{what} {path}: {type(e).__name__}: {e}", path=path)


def _check_regular_file(stage: str, what: str, path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SampleError(stage, "missing", f"{what} {path} does not exist", path=path) from None
    except PermissionError:
        raise SampleError(stage, "permission-denied", f"{what} {path}: permission denied", path=path) from None
    except OSError as e:
        raise SampleError(stage, "unreadable", f"{what} {path}: {e}", path=path) from e
    if not path.is_file():  # a folder, FIFO or device: opening it could block or read forever
        raise SampleError(stage, "not-a-file", f"{what} {path} is not a regular file", path=path)
    return st


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    """RGB pixels of ``im`` (see `load_image` for the per-mode rules)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        a = np.asarray(im)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise SampleError("load", "unsupported-mode",
                              f"image {path}: {mode} pixels span {int(a.min())}..{int(a.max())}, "
                              "outside the 16-bit range 0..65535", path=path)
        grey = np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)  # 0..65535 -> 0..255
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        raise SampleError("load", "unsupported-mode",
                          f"image {path}: floating-point pixels (mode F) have no defined value range", path=path)
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise SampleError("load", "unsupported-mode", f"image {path}: cannot convert mode {mode} to RGB: {e}",
                          path=path) from e


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image fully: RGB, EXIF orientation applied, file closed.

    Raises SampleError(stage="load") with reason "missing", "not-a-file" (a folder, FIFO,
    device: never opened), "permission-denied", "empty" (zero bytes), "not-an-image",
    "too-large" (width*height > max_pixels, checked from the header before decoding; a
    decompression bomb never gets decoded), "animated" (more than one frame: which frame
    is "the image" is ambiguous, so none is picked silently), "unsupported-mode",
    "truncated", "corrupt" (e.g. a PNG CRC or zlib error) or "unreadable".

    Pixel formats: greyscale, palette, 1-bit and CMYK are converted to RGB (Pillow's
    conversions; CMYK without colour management); alpha is dropped (the stored colour
    under a transparent pixel is what is audited); 16-bit greyscale (``I;16*``, and
    ``I`` within 0..65535) is scaled to 8 bits (v / 257, rounded) — Pillow's own
    conversion clips it instead, which turns most of the image white; floating-point
    (``F``) images are refused. A JPEG whose entropy-coded data is damaged but whose
    structure is intact decodes without error (with visible artefacts): no decoder can
    tell, so it is audited.
    """
    path = Path(path)
    st = _check_regular_file("load", "image", path)
    if st.st_size == 0:
        raise SampleError("load", "empty", f"image {path} is a zero-byte file", path=path)
    with _decoding("load", "image", path):
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise SampleError(
                    "load", "too-large", f"image {path} is {w}x{h} = {w * h} px > max_pixels {max_pixels}", path=path
                )
            if getattr(im, "is_animated", False) or getattr(im, "n_frames", 1) > 1:
                raise SampleError("load", "animated",
                                  f"image {path} ({im.format}) has more than one frame; audit single frames",
                                  path=path)
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im, path)


def load_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Read a mask PNG as bool (H, W). ``size`` is the image's PIL size (W, H).

    Masks are binary: mode "1" (set bits); "L"/"RGB" (converted to L) holding only 0 and
    255, or only 0 and 1; "P" with at most two palette indices (index != 0 is inside).
    Anything else — anti-aliased edges, a label map with several classes, a colour-coded
    segmentation — is refused with reason "unknown-labels" naming the values found (a
    threshold would silently merge or drop labels). A mask with no inside pixel is
    refused ("empty-mask"): the metrics are undefined for it. Raises
    SampleError(stage="mask") also when missing, unreadable, or of another size than the
    image (both sizes named).
    """
    path = Path(path)
    _check_regular_file("mask", "mask", path)
    with _decoding("mask", "mask", path):
        with Image.open(path) as im:
            im.load()
            if tuple(im.size) != tuple(size):
                raise SampleError(
                    "mask", "size-mismatch",
                    f"mask {path} is {im.size[0]}x{im.size[1]} (WxH), image is {size[0]}x{size[1]}",
                    path=path,
                )
            if im.mode == "1":
                m = np.array(im, dtype=bool)
            elif im.mode == "P":
                a = np.array(im)
                values = np.unique(a)
                if len(values) > 2 or (len(values) == 2 and values[0] != 0):
                    raise SampleError("mask", "unknown-labels",
                                      f"mask {path} (palette) uses indices {values[:8].tolist()}: "
                                      "a binary mask has index 0 (outside) and one other index", path=path)
                m = a != 0
            else:
                a = np.array(im.convert("L"))
                values = np.unique(a)
                if set(values.tolist()) <= {0, 255}:
                    m = a == 255
                elif set(values.tolist()) <= {0, 1}:
                    m = a == 1
                else:
                    raise SampleError("mask", "unknown-labels",
                                      f"mask {path} holds values {values[:8].tolist()}"
                                      f"{' …' if len(values) > 8 else ''}: a mask must be binary (0/255 or 0/1)",
                                      path=path)
            if not m.any():
                raise SampleError("mask", "empty-mask", f"mask {path} has no object pixel", path=path)
            return m


# --------------------------------------------------------------------------- hashing


def _file_digest(path: Path) -> bytes | None:
    """sha256 of a regular file; None when it is missing, unreadable or not a regular file
    (a FIFO or device would block or never end: it is never opened)."""
    h = hashlib.sha256()
    try:
        if not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # no blocking even if swapped meanwhile
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    except OSError:
        return None
    return h.digest()


def dataset_hash(manifest_path: Path, root: Path, files: Iterable[Path]) -> str:
    """sha256 over the manifest bytes and every referenced file (streamed).

    Framing: ``manifest digest``, then per unique file in first-reference order
    ``b"F" + relative path (posix) + NUL + file digest`` (``b"-"`` for a missing file), so
    renaming, reordering or editing any file changes the hash; absolute locations do not.
    """
    h = hashlib.sha256()
    h.update(b"diffcam-dataset-v1\0")
    h.update(_file_digest(manifest_path) or b"-")
    seen: set[Path] = set()
    for p in files:
        if p in seen:
            continue
        seen.add(p)
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            rel = p.as_posix()
        h.update(b"F" + rel.encode("utf-8") + b"\0")
        h.update(_file_digest(p) or b"-")
    return h.hexdigest()


# --------------------------------------------------------------------------- path checks


def _resolve_rel(root: Path, rel: Any, field_name: str, line: int, where: str,
                 problems: list[ManifestProblem]) -> Path | None:
    """Validate a manifest path: relative, not escaping, resolving inside ``root``."""
    if not isinstance(rel, str) or not rel.strip():
        problems.append(ManifestProblem(line, field_name, f"must be a non-empty relative path string, got {rel!r}",
                                        where, "bad-path"))
        return None
    if "\0" in rel:
        problems.append(ManifestProblem(line, field_name, f"contains a NUL byte: {rel!r}", where, "unsafe-path"))
        return None
    if not _clean_text(rel):
        problems.append(ManifestProblem(line, field_name, f"is not valid UTF-8: {rel!r}", where, "bad-encoding"))
        return None
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (
        len(rel) > 2 and rel[0].isalpha() and rel[1] == ":" and rel[2] in "/\\"
    ):
        problems.append(ManifestProblem(line, field_name, f"absolute path not allowed: {rel!r}", where, "unsafe-path"))
        return None
    lexical = os.path.normpath(rel.replace("\\", "/"))  # backslashes treated as separators here
    if lexical == ".." or lexical.startswith("../"):
        problems.append(ManifestProblem(line, field_name, f"path escapes the dataset root with '..': {rel!r}",
                                        where, "unsafe-path"))
        return None
    try:
        resolved = (root / rel).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
        problems.append(ManifestProblem(line, field_name, f"cannot resolve {rel!r}: {e}", where, "unsafe-path"))
        return None
    if not resolved.is_relative_to(root):
        problems.append(ManifestProblem(
            line, field_name, f"path resolves outside the dataset root (symlink?): {rel!r} -> {resolved}", where,
            "unsafe-path"))
        return None
    return resolved


def _file_problem(path: Path) -> str | None:
    """None for a regular file, else "missing" or "not-a-file" (never opens the path)."""
    try:
        if path.is_file():
            return None
        return "not-a-file" if path.exists() else "missing"
    except OSError:
        return "missing"


def _missing(path: Path) -> bool:
    return _file_problem(path) is not None


def _clean_text(s: str) -> bool:
    """True if ``s`` encodes to UTF-8: no undecodable bytes (surrogate-escaped on read) and
    no lone surrogates from JSON ``\\udXXX`` escapes. Such text could not be written to the tables."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unclean_fields(value: Any, name: str = "") -> list[str]:
    """Names of the string values (recursively) in ``value`` that are not valid UTF-8."""
    if isinstance(value, str):
        return [] if _clean_text(value) else [name or "value"]
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            key = k if _clean_text(str(k)) else repr(k)
            out += _unclean_fields(v, f"{name}.{key}" if name else key) + ([] if _clean_text(str(k)) else [key])
        return out
    if isinstance(value, (list, tuple)):
        return [f for i, v in enumerate(value) for f in _unclean_fields(v, f"{name}[{i}]")]
    return []


def _has_control(s: str, allow_whitespace: bool) -> bool:
    ok = "\t\n\r" if allow_whitespace else ""
    return any((ord(c) < 32 and c not in ok) or ord(c) == 127 for c in s)


# --------------------------------------------------------------------------- manifest rows


def _decode_text(path: Path) -> str:
    """The manifest as text. Bytes that are not UTF-8 are kept as surrogate escapes so that
    one bad line is that line's problem (`_clean_text`), not the whole file's."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\0" in data[:4096] and not data[:4096].replace(b"\0", b"").strip():
        raise ManifestError(path, [ManifestProblem(None, "encoding", "binary file, not a text manifest", "file")])
    for bom in (b"\xff\xfe", b"\xfe\xff"):
        if data.startswith(bom):
            raise ManifestError(path, [ManifestProblem(None, "encoding", "UTF-16 file; save it as UTF-8", "file")])
    return data.decode("utf-8", errors="surrogateescape")


#: A line that could not be parsed: (line, _BadLine(message)).
class _BadLine:
    def __init__(self, message: str, kind: str = "malformed-line", field: str = "row") -> None:
        self.message = message
        self.kind = kind
        self.field = field


def _read_jsonl(path: Path, problems: list[ManifestProblem]) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    text = _decode_text(path)
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            kind = "malformed-line" if _clean_text(line) else "bad-encoding"
            msg = f"malformed JSON: {e.msg} at column {e.colno}" + ("" if kind == "malformed-line" else
                                                                    " (the line is not valid UTF-8)")
            rows.append((i, _BadLine(msg, kind, "json")))
    return rows


def _read_csv(path: Path, problems: list[ManifestProblem]) -> list[tuple[int, Any]]:
    text = _decode_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[tuple[int, Any]] = []
    try:
        header = reader.fieldnames or []
        absent = [f for f in REQUIRED_FIELDS if f not in header]
        if absent:
            raise ManifestError(path, [ManifestProblem(1, "header", f"required column(s) {absent} missing; "
                                                       f"header is {header}")])
        for rec in reader:
            line = reader.line_num
            if None in rec:
                rows.append((line, _BadLine(f"row has {len(rec[None])} more value(s) than the header", field="columns")))
                continue
            row = {k: v for k, v in rec.items() if v is not None}  # short rows -> missing fields
            if "objects" in row:
                row["objects"] = _json_objects(row["objects"])
            rows.append((line, row))
    except csv.Error as e:
        raise ManifestError(path, [ManifestProblem(reader.line_num, "csv", f"malformed CSV: {e}")]) from None
    return rows


def _read_parquet(path: Path, problems: list[ManifestProblem]) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        absent = [f for f in REQUIRED_FIELDS if f not in table.column_names]
        if absent:
            raise ManifestError(path, [ManifestProblem(None, "columns", f"required column(s) {absent} missing; "
                                                       f"columns are {table.column_names}", "file")])
        records = table.to_pylist()
    except ManifestError:
        raise
    except Exception as e:  # pyarrow raises several types for a bad file; reported, not hidden
        raise ManifestError(path, [ManifestProblem(None, "parquet", f"cannot read: {type(e).__name__}: {e}", "file")]) from e
    rows: list[tuple[int, Any]] = []
    for i, rec in enumerate(records, start=1):
        row = {k: v for k, v in rec.items() if v is not None}
        if isinstance(row.get("objects"), str):
            row["objects"] = _json_objects(row["objects"])
        rows.append((i, row))
    return rows


class _BadObjects:
    def __init__(self, message: str) -> None:
        self.message = message


def _json_objects(text: str) -> Any:
    if not text.strip():
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return _BadObjects(f"not a JSON list: {e.msg}")


def _line_key(line: int) -> str:
    return f"{LINE_KEY_PREFIX}{line}"


def _is_line_key(sid: str) -> bool:
    return sid.startswith(LINE_KEY_PREFIX) and sid[len(LINE_KEY_PREFIX):].isdigit()


def _check_id(sid: Any) -> str | None:
    """Why ``sid`` cannot be a sample id, or None."""
    if not isinstance(sid, str):
        return f"must be a string, got {type(sid).__name__} {sid!r}"
    if not sid.strip():
        return "is empty"
    if not _clean_text(sid):
        return f"is not valid UTF-8: {sid!r}"
    if len(sid) > MAX_SAMPLE_ID_CHARS:
        return f"is {len(sid)} characters long (max {MAX_SAMPLE_ID_CHARS})"
    if _has_control(sid, allow_whitespace=False):
        return f"contains control characters: {sid!r}"
    if _is_line_key(sid):
        return f"{sid!r} has the reserved form {LINE_KEY_PREFIX}<n> (used for lines without a usable id)"
    return None


def _check_prompt(prompt: Any) -> tuple[str, str] | None:
    """(kind, message) when ``prompt`` is unusable, else None."""
    if not isinstance(prompt, str) or not prompt.strip():
        return "bad-prompt", f"must be a non-empty string, got {prompt!r}"
    if not _clean_text(prompt):
        return "bad-encoding", f"is not valid UTF-8: {prompt[:80]!r}"
    if len(prompt) > MAX_PROMPT_CHARS:
        return "prompt-too-long", f"is {len(prompt)} characters long (max {MAX_PROMPT_CHARS})"
    if _has_control(prompt, allow_whitespace=True):
        return "bad-prompt", f"contains control characters: {prompt[:80]!r}"
    return None


def _placeholder(root: Path, sid: str, line: int, problems: list[ManifestProblem]) -> Sample:
    """The `Sample` standing for a bad line: only its id, line and problem are meaningful."""
    return Sample(sample_id=sid, image_path=root, prompt="", objects=(), line_no=line,
                  problem="; ".join(str(p) for p in problems), problem_kind=problems[0].kind or "malformed-line")


def _validate_rows(
    rows: list[tuple[int, Any]], root: Path, where: str, problems: list[ManifestProblem]
) -> list[Sample]:
    """One `Sample` per row, manifest order: a valid sample, or (``problem`` set) a failure to be.

    ``problems`` receives every per-line problem (each with its ``kind``)."""
    samples: list[Sample] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        mine: list[ManifestProblem] = []
        if isinstance(row, _BadLine):
            mine.append(ManifestProblem(line, row.field, row.message, where, row.kind))
        elif not isinstance(row, dict):
            mine.append(ManifestProblem(line, "row", f"must be a JSON object, got {type(row).__name__}", where,
                                        "malformed-line"))
        if mine:
            problems.extend(mine)
            samples.append(_placeholder(root, _line_key(line), line, mine))
            continue
        sid = row.get("sample_id")
        why = "missing required field" if "sample_id" not in row else _check_id(sid)
        if why is None and sid in first_line:
            mine.append(ManifestProblem(line, "sample_id", f"duplicate {sid!r} (first on {where} {first_line[sid]})",
                                        where, "duplicate-id"))
        elif why is not None:
            mine.append(ManifestProblem(line, "sample_id", why, where, "bad-id"))
        key = sid if not mine else _line_key(line)
        if not mine:
            first_line[sid] = line
        for name in ("image", "prompt"):
            if name not in row:
                mine.append(ManifestProblem(line, name, "missing required field", where, "missing-field"))
        if "prompt" in row:
            bad = _check_prompt(row["prompt"])
            if bad is not None:
                mine.append(ManifestProblem(line, "prompt", bad[1], where, bad[0]))
        image = None
        if "image" in row:
            image = _resolve_rel(root, row["image"], "image", line, where, mine)
        objects: list[tuple[str, Path | None]] = []
        raw_objects = row.get("objects", [])
        if isinstance(raw_objects, _BadObjects):
            mine.append(ManifestProblem(line, "objects", raw_objects.message, where, "bad-objects"))
        elif not isinstance(raw_objects, list):
            mine.append(ManifestProblem(line, "objects", f"must be a list, got {type(raw_objects).__name__}", where,
                                        "bad-objects"))
        else:
            for k, obj in enumerate(raw_objects):
                fname = f"objects[{k}]"
                if not isinstance(obj, dict):
                    mine.append(ManifestProblem(line, fname, f"must be an object with word and mask, got {obj!r}",
                                                where, "bad-objects"))
                    continue
                word = obj.get("word")
                if not isinstance(word, str) or not word.strip() or len(word.split()) != 1 \
                        or not _clean_text(word) or _has_control(word, allow_whitespace=False):
                    mine.append(ManifestProblem(line, f"{fname}.word", f"must be one non-empty word, got {word!r}",
                                                where, "bad-objects"))
                if "mask" not in obj:
                    mine.append(ManifestProblem(line, f"{fname}.mask", "missing", where, "bad-objects"))
                    continue
                mpath = _resolve_rel(root, obj["mask"], f"{fname}.mask", line, where, mine)
                if isinstance(word, str) and mpath is not None:
                    objects.append((word.strip(), mpath))
        if not mine:  # any other text field (kept in extra) must be writable too
            for f in _unclean_fields({k: v for k, v in row.items() if k not in (*REQUIRED_FIELDS, "objects")}):
                mine.append(ManifestProblem(line, f, "is not valid UTF-8", where, "bad-encoding"))
        if mine:
            problems.extend(mine)
            samples.append(_placeholder(root, key, line, mine))
            continue
        assert image is not None
        file_problems: list[ManifestProblem] = []
        missing: list[str] = []
        reported: set[Path] = set()
        for name, fpath in [("image", image)] + [(f"objects[{k}].mask", m) for k, (_, m) in enumerate(objects)]:
            kind = _file_problem(fpath)
            if kind is None or fpath in reported:  # a mask shared by several words is reported once
                continue
            reported.add(fpath)
            if kind == "missing":
                missing.append(str(fpath))
            what = "does not exist" if kind == "missing" else "is not a regular file"
            file_problems.append(ManifestProblem(line, name, f"{fpath} {what}", where, kind))
        problems.extend(file_problems)
        problem = kind = None
        if file_problems:
            kind = file_problems[0].kind
            problem = (f"missing file(s): {', '.join(missing)}" if len(missing) == len(file_problems)
                       else "; ".join(str(fp) for fp in file_problems))
        extra = {k: v for k, v in row.items() if k not in (*REQUIRED_FIELDS, "objects")}
        samples.append(Sample(
            sample_id=sid, image_path=image, prompt=row["prompt"].strip(), objects=tuple(objects),
            line_no=line, extra=extra, problem=problem, problem_kind=kind,
        ))
    return samples


def _load_manifest(path: Path, fmt: str) -> Dataset:
    root = path.parent.resolve()
    problems: list[ManifestProblem] = []
    try:
        if fmt == "jsonl":
            rows, where = _read_jsonl(path, problems), "line"
        elif fmt == "csv":
            rows, where = _read_csv(path, problems), "line"
        else:
            rows, where = _read_parquet(path, problems), "row"
    except OSError as e:
        raise ManifestError(path, [ManifestProblem(None, "file", f"cannot read: {e}", "file")]) from e
    samples = _validate_rows(rows, root, where, problems)
    if not samples:
        raise ManifestError(path, [ManifestProblem(None, "samples", "manifest has no samples", "file")])
    usable = [s for s in samples if s.problem_kind in (None, "missing", "not-a-file")]
    if not usable:  # not one line is a sample: a wrong file, most likely; refuse, listing every line
        raise ManifestError(path, [*problems, ManifestProblem(None, "samples", "no line is a usable sample", "file")])
    files = [p for s in usable for p in (s.image_path, *(m for _, m in s.objects if m is not None))]
    meta = _read_meta(root)
    return Dataset(root=root, uri=path.resolve().as_uri(), samples=tuple(samples),
                   content_hash=dataset_hash(path, root, files), format=fmt,
                   manifest_path=path.resolve(), meta=meta, line_problems=tuple(problems))


def _read_meta(root: Path) -> dict[str, Any]:
    p = root / "dataset.json"
    if not p.is_file():
        return {}
    try:
        meta = json.loads(p.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(p, [ManifestProblem(None, "dataset.json", f"unreadable: {e}", "file")]) from e
    return meta if isinstance(meta, dict) else {}


# --------------------------------------------------------------------------- COCO


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


def _load_coco(path: Path, images_dir: Path | None) -> Dataset:
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
                problems.append(ManifestProblem(line, name, f"must be {'an' if name == 'id' else 'a positive'} integer, got {v!r}", where))
                bad = True
        if not isinstance(im.get("file_name"), str) or not im["file_name"].strip():
            problems.append(ManifestProblem(line, "file_name", f"missing or empty: {im.get('file_name')!r}", where))
            bad = True
        if bad:
            continue
        if im["id"] in images:
            problems.append(ManifestProblem(line, "id", f"duplicate image id {im['id']} (first at images {images[im['id']][0]})", where))
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
        ipath = _resolve_rel(root, im["file_name"], "file_name", line, "images", problems)
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
        samples.append(Sample(
            sample_id=str(iid), image_path=ipath, prompt=DEFAULT_COCO_PROMPT, objects=tuple(objects),
            line_no=line, extra=extra, problem=f"missing file(s): {ipath}" if _missing(ipath) else None,
            problem_kind=_file_problem(ipath),
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


# --------------------------------------------------------------------------- entry point


def _find_coco(folder: Path) -> list[Path]:
    return sorted([*folder.glob("instances*.json"), *(folder / "annotations").glob("instances*.json")])


def load_dataset(path: str | Path, *, images_dir: str | Path | None = None) -> Dataset:
    """Load and validate a dataset.

    ``path``: a dataset folder (one manifest.jsonl/.csv/.parquet, or else one COCO
    ``instances*.json`` in it or in ``annotations/``), a manifest file, or a COCO
    ``instances*.json``. ``images_dir`` overrides where COCO images are looked for.
    Raises ManifestError (see the module docstring for what is rejected).
    """
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in MANIFEST_NAMES if (path / n).is_file()]
        if len(found) > 1:
            raise ManifestError(path, [ManifestProblem(None, "manifest", f"ambiguous: {[p.name for p in found]}", "folder")])
        if found:
            return _load_manifest(found[0], MANIFEST_NAMES[found[0].name])
        coco = _find_coco(path)
        if len(coco) == 1:
            return _load_coco(coco[0], Path(images_dir) if images_dir else None)
        what = f"several COCO files {[str(c) for c in coco]}" if coco else "no manifest.jsonl/.csv/.parquet or COCO instances*.json"
        raise ManifestError(path, [ManifestProblem(None, "manifest", what, "folder")])
    if not path.is_file():
        raise ManifestError(path, [ManifestProblem(None, "path", "does not exist", "file")])
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _load_coco(path, Path(images_dir) if images_dir else None)
    fmt = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(suffix)
    if fmt is None:
        raise ManifestError(path, [ManifestProblem(None, "path", f"unknown manifest type {suffix!r} (want .jsonl/.csv/.parquet/.json)", "file")])
    return _load_manifest(path, fmt)


# --------------------------------------------------------------------------- synthetic writer


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
            "generator": "diffcam_core.synthetic",
            "format_version": 1,
            "seed": seed,
            "n": n,
            "settings": settings.to_dict(),
            "cue": None if settings.cue is None else settings.cue.to_dict(),
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
