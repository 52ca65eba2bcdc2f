"""Image and mask decoding: a file becomes RGB pixels or a bool mask, or a `SampleError`
whose stage and reason token go to the ``failures`` table."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "SampleError", "load_image", "load_image_sha256", "load_mask"]

DEFAULT_MAX_PIXELS = 50_000_000


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
    path = _check_image_file(path)
    return _decode_image(path, path, max_pixels)


def load_image_sha256(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str]:
    """`load_image` and the sha256 of the file's bytes, from one read of the file (the
    worker records both). Same checks and reasons as `load_image`."""
    from diffcam.storage.store import file_sha256

    path = _check_image_file(path)
    with _decoding("load", "image", path):
        data = path.read_bytes()
    return _decode_image(path, io.BytesIO(data), max_pixels), file_sha256(io.BytesIO(data))


def _check_image_file(path: str | Path) -> Path:
    path = Path(path)
    st = _check_regular_file("load", "image", path)
    if st.st_size == 0:
        raise SampleError("load", "empty", f"image {path} is a zero-byte file", path=path)
    return path


def _decode_image(path: Path, source: Path | BinaryIO, max_pixels: int) -> Image.Image:
    """The RGB image in ``source`` (``path`` itself or its bytes), as `load_image` says."""
    with _decoding("load", "image", path):
        with Image.open(source) as im:
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

