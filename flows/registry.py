"""Checkpoint registry sources: where the checkpoints to audit are found.

A **source** lists the checkpoints of one or more model lines. Today: `FolderRegistry`, a
watched folder of checkpoint folders; a URI scheme registry (`SOURCES`, `register_source`,
`open_source`) is the seam where an MLflow model registry or an object-store prefix plugs
in (each one lists `Checkpoint`s whose ``path`` is a local folder the audit can load, e.g. a
download cache inside the registry roots).

Folder layouts (they may be mixed)::

    <root>/<checkpoint>/                                  line = the root folder's name
    <root>/<line>/<checkpoint>/                           line = <line>
    <root>/<experiment>/<run>/artifacts/[<a>/[<b>/]]      MLflow run artifacts: line = <experiment>,
                                                          name = <run>[/<a>[/<b>]]
    <root>/<experiment>/models/<model id>/artifacts/      MLflow 3 logged model: line = <experiment>,
                                                          name = <model id>

The two MLflow layouts are what an MLflow tracking server writes under its
``--artifacts-destination`` (or a local ``--default-artifact-root``): point the registry
there and both the sweep and `FolderRegistry.resolve_source` find MLflow's checkpoints.

A checkpoint folder holds ``config.json`` and ``*.safetensors`` (what `diffcam.flows.audit` loads).
Its identity is `diffcam.flows.audit.model_hash` (sha256 over every file). A folder whose newest
file is younger than ``settle_s`` is left for the next sweep: it may still be being copied
(copying to a temporary name and renaming it into the registry avoids the wait).

The audit ledger (which checkpoint was audited with what) is `diffcam.flows.ledger`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Checkpoint",
    "CheckpointSource",
    "FolderRegistry",
    "SOURCES",
    "register_source",
    "open_source",
    "is_checkpoint_dir",
    "contained_path",
    "PathNotAllowed",
    "HashCache",
]



class PathNotAllowed(ValueError):
    """A path that resolves (symlinks followed) outside every allowed root."""


def contained_path(path: str | os.PathLike[str], roots: Sequence[str | os.PathLike[str]]) -> Path:
    """``path`` resolved (symlinks followed, must exist) if it lies inside one of ``roots``
    (also resolved); else `PathNotAllowed` naming the path. ``file://`` URIs are accepted."""
    raw = os.fspath(path)
    if raw.startswith("file://"):
        from urllib.parse import unquote, urlparse

        u = urlparse(raw)
        if u.netloc not in ("", "localhost"):
            raise PathNotAllowed(f"{raw!r}: file URI with a remote host")
        raw = unquote(u.path)
    if not raw or "\0" in raw:
        raise PathNotAllowed(f"{path!r} is not a usable path")
    if not roots:
        raise PathNotAllowed(f"{raw}: no allowed roots are configured")
    try:
        resolved = Path(raw).expanduser().resolve(strict=True)
    except (OSError, RuntimeError) as e:  # missing, or a symlink loop
        raise PathNotAllowed(f"{raw}: does not exist or cannot be resolved ({type(e).__name__})") from None
    for root in roots:
        try:
            r = Path(root).expanduser().resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if resolved == r or resolved.is_relative_to(r):
            return resolved
    raise PathNotAllowed(f"{raw} (resolved: {resolved}) is outside the allowed roots {[str(r) for r in roots]}")


def is_checkpoint_dir(path: Path) -> bool:
    """A folder `diffcam.flows.audit` can load: ``config.json`` and at least one ``*.safetensors``."""
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _visible_files(root: Path) -> list[Path]:
    # The same file set as diffcam.flows.audit.model_hash (hidden files and folders are ignored).
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders, sorted; [] when ``folder`` is not a readable folder."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _mlflow_artifact_checkpoints(artifacts: Path) -> Iterator[tuple[tuple[str, ...], Path]]:
    """(path relative to ``artifacts``, folder) of the checkpoints in an MLflow run's
    ``artifacts`` folder: the folder itself, or up to two levels below it."""
    if artifacts.name != "artifacts" or not artifacts.is_dir():
        return
    if is_checkpoint_dir(artifacts):
        yield (), artifacts
        return
    for a in _subdirs(artifacts):
        if is_checkpoint_dir(a):
            yield (a.name,), a
            continue
        for b in _subdirs(a):
            if is_checkpoint_dir(b):
                yield (a.name, b.name), b


def _is_plain(part: str) -> bool:
    return bool(part) and part not in (".", "..") and not any(c in part for c in "/\\\0*?[]")


def _plain_parts(rel: str) -> tuple[str, ...] | None:
    """``rel`` split on "/" when every part is a plain name (no "..", no glob characters)."""
    parts = tuple(p for p in rel.split("/") if p)
    return parts if all(_is_plain(p) for p in parts) else None


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint found by a source."""

    line: str  #: model line (MLflow: the registered model name)
    name: str  #: checkpoint name within its line (folder name; MLflow run artifacts: <run>/<path>)
    path: Path  #: local folder (resolved)
    content_hash: str  #: diffcam.flows.audit.model_hash of the folder
    source: str  #: URI of the source that found it

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@runtime_checkable
class CheckpointSource(Protocol):
    """What the sweep and the webhook need from a registry."""

    uri: str

    @property
    def roots(self) -> tuple[Path, ...]:
        """Local folders every checkpoint path of this source lies in (containment checks)."""

    def list_checkpoints(self, settle_s: float = 0.0) -> list[Checkpoint]:
        """Every ready checkpoint, in a stable order (line, name)."""

    def resolve(self, line: str, version: str) -> Path:
        """The local folder of ``version`` of ``line`` (MLflow alias/version notifications);
        `LookupError` if there is none."""


class HashCache:
    """Content hashes keyed by a fingerprint of (relative path, size, mtime_ns) of every file,
    so a nightly sweep re-hashes only new or changed checkpoints. JSON file, atomic writes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._data: dict[str, str] = {}
        if path is not None and path.is_file():
            try:
                self._data = dict(json.loads(path.read_text()))
            except (ValueError, TypeError):
                self._data = {}  # a corrupt cache only costs re-hashing

    @staticmethod
    def fingerprint(folder: Path) -> str:
        h = hashlib.sha256(b"diffcam-fingerprint-v1\0" + str(folder).encode() + b"\0")
        for p in _visible_files(folder):
            st = p.stat()
            h.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def content_hash(self, folder: Path) -> str:
        from diffcam.flows.audit import model_hash

        fp = self.fingerprint(folder)
        if fp not in self._data:
            self._data[fp] = model_hash(folder)
            self._save()
        return self._data[fp]

    def _save(self) -> None:
        if self.path is None:
            return
        from diffcam.storage.store import write_text_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self._data, sort_keys=True))


# ----------------------------------------------------------------------------- sources

SOURCES: dict[str, Callable[..., CheckpointSource]] = {}


def register_source(scheme: str) -> Callable[[Callable[..., CheckpointSource]], Callable[..., CheckpointSource]]:
    """Class decorator: ``open_source("<scheme>://...")`` builds it with ``(spec, **options)``."""

    def deco(cls: Callable[..., CheckpointSource]) -> Callable[..., CheckpointSource]:
        SOURCES[scheme] = cls
        return cls

    return deco


@register_source("folder")
class FolderRegistry:
    """A folder of checkpoint folders (see the module doc for the layout)."""

    def __init__(self, spec: str | os.PathLike[str], *, hash_cache: HashCache | None = None) -> None:
        raw = os.fspath(spec)
        if raw.startswith("folder://"):
            raw = raw[len("folder://"):]
        root = Path(raw).expanduser()
        if not root.is_dir():
            raise ValueError(f"registry {spec}: not a folder")
        self.root = root.resolve()
        self.uri = f"folder://{self.root}"
        self.hash_cache = hash_cache or HashCache(None)

    def __repr__(self) -> str:
        return f"FolderRegistry({str(self.root)!r})"

    @property
    def roots(self) -> tuple[Path, ...]:
        return (self.root,)

    def _candidates(self) -> Iterator[tuple[str, str, Path]]:
        """(line, name, folder) of every checkpoint folder of the layouts in the module doc."""
        for child in _subdirs(self.root):
            if is_checkpoint_dir(child):
                yield self.root.name, child.name, child
                continue
            for grandchild in _subdirs(child):
                if is_checkpoint_dir(grandchild):
                    yield child.name, grandchild.name, grandchild
                    continue
                if grandchild.name == "models":  # MLflow 3 logged models: <exp>/models/<id>/artifacts
                    for model in _subdirs(grandchild):
                        if is_checkpoint_dir(model / "artifacts"):
                            yield child.name, model.name, model / "artifacts"
                    continue
                # MLflow run artifacts: <exp>/<run>/artifacts, a checkpoint itself or up to two below
                for rel, folder in _mlflow_artifact_checkpoints(grandchild / "artifacts"):
                    yield child.name, "/".join((grandchild.name, *rel)), folder

    def list_checkpoints(self, settle_s: float = 0.0) -> list[Checkpoint]:
        out: list[Checkpoint] = []
        now = time.time()
        for line, name, folder in self._candidates():
            try:
                path = contained_path(folder, self.roots)  # a symlink out of the registry is not ours
            except PathNotAllowed:
                continue
            files = _visible_files(path)
            if settle_s > 0 and files and now - max(p.stat().st_mtime for p in files) < settle_s:
                continue
            out.append(Checkpoint(line=line, name=name, path=path,
                                  content_hash=self.hash_cache.content_hash(path), source=self.uri))
        return out

    def resolve(self, line: str, version: str) -> Path:
        """``<root>/<line>/<version>`` or ``<root>/<line>/v<version>`` (or ``<root>/<version>``
        when ``line`` is the root's own name), contained in the root and a checkpoint folder."""
        for part in (line, version):
            if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
                raise LookupError(f"model {line!r} version {version!r}: not a plain name")
        bases = [self.root / line]
        if line == self.root.name:
            bases.append(self.root)
        for base in bases:
            for name in (version, f"v{version}"):
                candidate = base / name
                if is_checkpoint_dir(candidate):
                    return contained_path(candidate, self.roots)
        raise LookupError(f"model {line!r} version {version!r}: no checkpoint folder "
                          f"{self.root}/{line}/{{{version},v{version}}}")

    def resolve_source(self, source: str | None, name: str, version: str) -> Path:
        """The local checkpoint folder of an MLflow model version whose ``source`` is not a
        local path, tried in this order (the first checkpoint folder found wins):

        - ``runs:/<run id>/<path>`` → ``<root>/<experiment>/<run id>/artifacts/<path>``
          (whichever experiment folder holds that run);
        - ``mlflow-artifacts:/<experiment>/<run id>/artifacts/<path>`` (an MLflow server
          whose ``--artifacts-destination`` is this registry) → ``<root>/<that path>``;
        - ``models:/<model id>`` (an MLflow 3 logged model) →
          ``<root>/<experiment>/models/<model id>/artifacts``;
        - ``models:/<name>/<version>`` → `resolve` of that name and version;
        - finally, for any source (``s3://…``, ``models:/<name>@<alias>``, none), `resolve` of
          the notification's own ``name`` and ``version``.

        `LookupError` lists every place looked at; `PathNotAllowed` if a match resolves
        (symlinks followed) outside the registry."""
        tried: list[str] = []
        src = (source or "").strip()
        for candidate, where in self._source_candidates(src):
            tried.append(where)
            if candidate is not None and is_checkpoint_dir(candidate):
                return contained_path(candidate, self.roots)
        try:
            return self.resolve(name, version)
        except LookupError as e:
            tried.append(self._version_folders(name, version, e))
        shown = "; ".join(tried)
        raise LookupError(f"model {name!r} version {version!r} (source {src or None!r}): no checkpoint folder "
                          f"(config.json + *.safetensors) at {shown}")

    def _source_candidates(self, src: str) -> Iterator[tuple[Path | None, str]]:
        if src.startswith("runs:/"):
            run_id, _, rel = src[len("runs:/"):].strip("/").partition("/")
            parts = _plain_parts(rel)
            if _is_plain(run_id) and parts is not None:
                matches = sorted(self.root.glob(f"*/{run_id}/artifacts"))
                if not matches:
                    yield None, f"{self.root}/<experiment>/{run_id}/artifacts/{rel} (no such run folder)"
                for m in matches:
                    yield m.joinpath(*parts), str(m.joinpath(*parts))
            else:
                yield None, f"{src!r} (expected runs:/<run id>/<artifact path>)"
        elif src.startswith("mlflow-artifacts:"):
            from urllib.parse import urlparse

            parts = _plain_parts(urlparse(src).path)
            if parts and len(parts) >= 3 and parts[2] == "artifacts":
                yield self.root.joinpath(*parts), str(self.root.joinpath(*parts))
            else:
                yield None, f"{src!r} (expected mlflow-artifacts:/<experiment>/<run id>/artifacts/<path>)"
        elif src.startswith("models:/"):
            ref = src[len("models:/"):].strip("/")
            model_name, sep, model_version = ref.partition("/")
            if not sep and _is_plain(ref) and "@" not in ref:  # models:/<model id>
                matches = sorted(self.root.glob(f"*/models/{ref}/artifacts"))
                if not matches:
                    yield None, f"{self.root}/<experiment>/models/{ref}/artifacts (no such logged model)"
                for m in matches:
                    yield m, str(m)
            elif sep and _is_plain(model_name) and _is_plain(model_version):  # models:/<name>/<version>
                try:
                    yield self.resolve(model_name, model_version), f"{self.root}/{model_name}/{model_version}"
                except LookupError as e:
                    yield None, self._version_folders(model_name, model_version, e)

    def _version_folders(self, name: str, version: str, error: LookupError) -> str:
        if _is_plain(name) and _is_plain(version):
            return f"{self.root}/{name}/{{{version},v{version}}}"
        return str(error)

    def line_of(self, path: Path) -> str:
        """The model line of a checkpoint folder inside this registry (the experiment folder
        for MLflow's layouts)."""
        rel = path.resolve().relative_to(self.root)
        return self.root.name if len(rel.parts) == 1 else rel.parts[0]


def open_source(spec: str | os.PathLike[str], **options: Any) -> CheckpointSource:
    """A source from ``scheme://...`` (a plain path means ``folder://``)."""
    raw = os.fspath(spec)
    scheme = raw.split("://", 1)[0] if "://" in raw else "folder"
    try:
        factory = SOURCES[scheme]
    except KeyError:
        raise ValueError(f"registry {raw!r}: no source for scheme {scheme!r}; known: {sorted(SOURCES)}") from None
    return factory(raw, **options)
