"""Stable shard plans: which samples go to which shard, and which fail before any model runs.

A plan is a pure function of (dataset samples in manifest order, shard size, limit):
shard ``k`` holds samples ``[k*size, (k+1)*size)`` of the (limited) manifest. The same
dataset with the same settings therefore gives the same shard ids on every run, which is
what lets a re-run of a run id skip the shards that are already committed
(`diffcam.storage.store.Store.is_committed`). Changing ``shard_size`` or ``limit`` changes the
plan; the audit flow refuses to resume a run with different plan settings.

Samples whose `Sample.problem` is set (a bad manifest line: unsafe path, duplicate or
unusable id, bad prompt, malformed objects; or a file named by the manifest is missing or
not a regular file — storage/manifest.py) are not sent to a worker: they become failure
rows (stage ``load``, message ``[load/<kind>] line <n>: …``) of the shard they belong to, so
every non-blank manifest line is in exactly one of ``samples`` / ``failures``.

Work items are plain dicts (picklable, no images): workers open the files themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffcam.storage.samples import Sample

__all__ = ["DEFAULT_SHARD_SIZE", "Shard", "plan_shards", "work_item", "item_sample"]

#: Samples per shard. A shard is the unit of commit and of resume: smaller shards lose
#: less work to a crash, larger ones write fewer (bigger) Parquet files.
DEFAULT_SHARD_SIZE = 16


@dataclass(frozen=True)
class Shard:
    """One shard of a plan.

    ``items``: work items to send to workers (manifest order). ``failures``: failure
    rows (without run_id) for samples known to be unusable before any file is opened.
    ``sample_ids``: every sample of the shard, manifest order (items + failures).
    """

    shard_id: int
    items: tuple[dict[str, Any], ...]
    failures: tuple[dict[str, Any], ...]
    sample_ids: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.sample_ids)


def _rel(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


def work_item(sample: Sample, root: Path | None = None) -> dict[str, Any]:
    """The picklable description of one sample that a worker needs to audit it.

    ``image_path`` is absolute (workers open it); ``image_rel`` is what the ``samples``
    table stores (relative to the dataset root when the image lies inside it).
    """
    return {
        "sample_id": sample.sample_id,
        "line_no": sample.line_no,
        "image_path": str(sample.image_path),
        "image_rel": _rel(sample.image_path, root),
        "prompt": sample.prompt,
        "objects": [(w, None if p is None else str(p)) for w, p in sample.objects],
        "coco_regions": sample.coco_regions,
        "reference_answer": sample.extra.get("answer") if isinstance(sample.extra.get("answer"), str) else None,
    }


def item_sample(item: dict[str, Any]) -> Sample:
    """Rebuild the `Sample` a work item came from (for `Sample.object_masks`)."""
    return Sample(
        sample_id=item["sample_id"],
        image_path=Path(item["image_path"]),
        prompt=item["prompt"],
        objects=tuple((w, None if p is None else Path(p)) for w, p in item["objects"]),
        line_no=item["line_no"],
        coco_regions=item.get("coco_regions"),
    )


#: error_class of a planned failure, by `Sample.problem_kind`.
_FILE_KINDS = {"missing": "MissingFile", "not-a-file": "NotARegularFile"}


def _problem_row(sample: Sample, shard_id: int) -> dict[str, Any]:
    kind = sample.problem_kind or "missing"
    problem = str(sample.problem)
    where = "" if problem.startswith(("line ", "row ")) else f"line {sample.line_no}: "
    return {
        "shard_id": shard_id,
        "sample_id": sample.sample_id,
        "line_no": sample.line_no,
        "stage": "load",
        "error_class": _FILE_KINDS.get(kind, "ManifestProblem"),
        "message": f"[load/{kind}] {where}{problem}"[:2000],
        "traceback": None,
        "attempts": 1,
    }


def plan_shards(
    samples: Sequence[Sample],
    shard_size: int = DEFAULT_SHARD_SIZE,
    limit: int | None = None,
    root: Path | None = None,
) -> list[Shard]:
    """Split ``samples`` (manifest order) into shards of ``shard_size``.

    ``limit`` keeps the first ``limit`` samples (None: all). ``root`` is the dataset
    folder, used to store image paths relative to it. Raises ValueError for a
    non-positive shard size or a negative limit, or duplicate sample ids (a validated
    manifest has none; a hand-built list might).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    chosen = list(samples if limit is None else samples[:limit])
    seen: set[str] = set()
    for s in chosen:
        if s.sample_id in seen:
            raise ValueError(f"duplicate sample_id {s.sample_id!r} (line {s.line_no})")
        seen.add(s.sample_id)
    shards = []
    for shard_id, start in enumerate(range(0, len(chosen), shard_size)):
        part = chosen[start:start + shard_size]
        shards.append(Shard(
            shard_id=shard_id,
            items=tuple(work_item(s, root) for s in part if s.problem is None),
            failures=tuple(_problem_row(s, shard_id) for s in part if s.problem is not None),
            sample_ids=tuple(s.sample_id for s in part),
        ))
    return shards
