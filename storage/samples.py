"""What a loaded dataset is: `Sample`, `Dataset`, and the problems found while loading one.

The loaders (`diffcam.storage.manifest`, `diffcam.storage.coco`, entry point `diffcam.storage.datasets.load_dataset`)
build these; the audit plans, runs and records them. A sample known to be unusable before
any file is opened keeps its place as a `Sample` with ``problem`` set, so that every
manifest line ends in exactly one of the ``samples`` / ``failures`` tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffcam.storage.images import SampleError, load_mask

if TYPE_CHECKING:
    from diffcam.storage.coco import CocoRegion

__all__ = ["LINE_PROBLEM_KINDS", "ManifestProblem", "ManifestError", "Sample", "Dataset"]

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
_MAX_PROBLEMS_IN_MESSAGE = 50


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

