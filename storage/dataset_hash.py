"""The dataset's content hash: it names exactly the bytes an audit read, so two runs can
tell whether they saw the same dataset (the ``runs.dataset_hash`` column)."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from diffcam.storage.store import file_sha256

__all__ = ["dataset_hash"]


def _file_digest(path: Path) -> bytes | None:
    """sha256 of a regular file; None when it is missing, unreadable or not a regular file
    (a FIFO or device would block or never end: it is never opened)."""
    try:
        if not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # no blocking even if swapped meanwhile
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return bytes.fromhex(file_sha256(f))
    except OSError:
        return None


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
