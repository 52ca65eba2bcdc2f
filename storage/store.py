"""The on-disk store: Parquet files per run and shard, committed atomically.

Layout (``<root>`` is the store folder)::

    <root>/runs/run_id=<id>/runs/run.parquet                the run row (atomically replaced)
    <root>/runs/run_id=<id>/<table>/shard=<k>.parquet       samples, token_maps, failures, flags
    <root>/runs/run_id=<id>/_commits/shard=<k>.json         commit marker: rows + sha256 per file
    <root>/runs/run_id=<id>/_tmp/                           in-flight commits (ignored, cleaned)
    <root>/catalog.duckdb                                   DuckDB views for the CLI: never written here;
                                                            the flows call diffcam.storage.catalog.write_catalog_file

``<k>`` is the integer shard id, or a name such as ``dataset`` for dataset-level flags.

A shard is visible only once its marker exists. `Store.commit_shard` writes every
table's file into ``_tmp/``, fsyncs it, renames each into place, fsyncs the folders,
and only then writes the marker (temp file + rename). A crash at any point leaves
either no marker (the shard is invisible; the next commit of the shard overwrites its
files, `recover` deletes them) or a complete shard. Committing a shard that already has
a marker is a no-op returning False, so a resumed or repeated run never duplicates rows.

Concurrency: commits, run updates and recovery of one run are serialised with an
``fcntl.flock`` on ``<run dir>/_lock`` (local file systems; on NFS use one writer per
run, which is what the audit flow does: the driver commits, workers only compute).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from diffcam.storage.schemas import SHARDED_TABLES, TABLES, conform_table, empty_table, table_from_rows

__all__ = ["Store", "ShardId", "RUN_ID_RE", "write_parquet", "StoreCorruptError", "file_sha256", "file_lock",
           "write_text_atomic"]

ShardId = int | str
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHARD_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_MARKER_FORMAT = 1
_COMPRESSION = "zstd"


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write one Parquet file and fsync it. Module-level so tests can make it fail."""
    pq.write_table(table, path, compression=_COMPRESSION)
    _fsync_path(path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(source: str | os.PathLike[str] | BinaryIO) -> str:
    """Hex sha256 of a file's bytes, streamed by `hashlib.file_digest`: commit markers and
    image, model and dataset hashes all go through here. ``source``: a path, or a file the
    caller opened in binary mode (when how it is opened matters; it is read to the end, not closed)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    return hashlib.file_digest(source, "sha256").hexdigest()


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing) for the `with` block."""
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def write_text_atomic(path: Path, text: str) -> None:
    """Durable temp-write + rename: readers see the old file or the new one, never half."""
    _write_bytes_atomic(path, text.encode("utf-8"))


class StoreCorruptError(ValueError):
    """A file under the store's control is not what the store writes (tampered or damaged)."""


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _check_marker(path: Path, marker: Any, run_id: str, shard: str) -> None:
    """Refuse a commit marker that `Store.commit_shard` could not have written.

    A marker names the files readers open, so a forged one could point them anywhere
    (``"path": "../../../etc/passwd"``): each table's path must be exactly
    ``<table>/shard=<k>.parquet`` of its own shard, inside its own run."""
    def bad(why: str) -> StoreCorruptError:
        return StoreCorruptError(f"{path}: not a valid commit marker: {why}")

    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT:
        raise bad(f"format must be {_MARKER_FORMAT}")
    if marker.get("run_id") != run_id:
        raise bad(f"run_id {marker.get('run_id')!r} is not this run's {run_id!r}")
    if str(marker.get("shard")) != shard:
        raise bad(f"shard {marker.get('shard')!r} does not match its file name (shard={shard})")
    tables = marker.get("tables")
    if not isinstance(tables, dict) or set(tables) - set(SHARDED_TABLES):
        raise bad(f"tables must map some of {SHARDED_TABLES} to entries")
    for name, e in tables.items():
        if not isinstance(e, dict) or isinstance(e.get("rows"), bool) or not isinstance(e.get("rows"), int) \
                or e["rows"] < 0:
            raise bad(f"{name}: rows must be an integer >= 0")
        if e.get("path") is None:
            if e["rows"] != 0:
                raise bad(f"{name}: {e['rows']} rows but no file")
            continue
        if e["path"] != f"{name}/shard={shard}.parquet":
            raise bad(f"{name}: path {e['path']!r} is not {name}/shard={shard}.parquet")
        if not isinstance(e.get("sha256"), str) or not _SHA256_RE.match(e["sha256"]):
            raise bad(f"{name}: sha256 must be 64 hex digits")


def _read_parquet(path: Path, name: str) -> pa.Table:
    # pq.ParquetFile: no partition discovery from the hive-style folder names.
    return conform_table(name, pq.ParquetFile(path).read())


class Store:
    """A diffcam store rooted at ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ------------------------------------------------------------------ paths

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
            raise ValueError(f"run_id {run_id!r} must match {RUN_ID_RE.pattern}")
        return self.runs_dir / f"run_id={run_id}"

    def run_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "runs" / "run.parquet"

    @staticmethod
    def _shard_name(shard_id: ShardId) -> str:
        if isinstance(shard_id, bool):
            raise ValueError(f"shard id {shard_id!r} must be an int >= 0 or a name")
        if isinstance(shard_id, int):
            if shard_id < 0 or shard_id >= 2**31:
                raise ValueError(f"shard id {shard_id} out of range [0, 2^31)")
            return str(shard_id)
        if isinstance(shard_id, str) and _SHARD_NAME_RE.match(shard_id):
            return shard_id
        raise ValueError(f"shard id {shard_id!r} must be an int >= 0 or match {_SHARD_NAME_RE.pattern}")

    @staticmethod
    def _parse_shard(name: str) -> ShardId:
        return int(name) if name.isdigit() else name

    def _marker_path(self, run_id: str, shard_id: ShardId) -> Path:
        return self.run_dir(run_id) / "_commits" / f"shard={self._shard_name(shard_id)}.json"

    def table_path(self, run_id: str, table: str, shard_id: ShardId) -> Path:
        return self.run_dir(run_id) / table / f"shard={self._shard_name(shard_id)}.parquet"

    def _lock(self, run_id: str):
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        return file_lock(run_dir / "_lock")

    # ------------------------------------------------------------------- runs

    def write_run(self, row: Mapping[str, Any], *, overwrite: bool = False) -> None:
        """Write the run row (validated against RUNS). Refuses to replace an existing run
        unless ``overwrite``; to change fields of an existing run use `update_run`."""
        table = table_from_rows("runs", [row])
        run_id = row["run_id"]
        path = self.run_path(run_id)
        with self._lock(run_id):
            if path.exists() and not overwrite:
                raise FileExistsError(f"run {run_id} already exists in {self.root}; use update_run")
            self._write_run_table(path, table)

    def _write_run_table(self, path: Path, table: pa.Table) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".run.parquet.tmp-{uuid.uuid4().hex}")
        try:
            write_parquet(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_path(path.parent)

    def read_run(self, run_id: str) -> dict[str, Any]:
        path = self.run_path(run_id)
        if not path.exists():
            raise KeyError(f"run {run_id!r} not found in {self.root}")
        return _read_parquet(path, "runs").to_pylist()[0]

    def update_run(self, run_id: str, **fields: Any) -> dict[str, Any]:
        """Replace some fields of the run row atomically; returns the new row."""
        unknown = set(fields) - set(TABLES["runs"].names)
        if unknown:
            raise ValueError(f"runs: unknown column(s) {sorted(unknown)}")
        if "run_id" in fields and fields["run_id"] != run_id:
            raise ValueError("update_run cannot change run_id")
        with self._lock(run_id):
            row = self.read_run(run_id)
            row.update(fields)
            table = table_from_rows("runs", [row])
            self._write_run_table(self.run_path(run_id), table)
        return table.to_pylist()[0]

    def runs(self) -> list[str]:
        """Run ids with a run row, sorted."""
        if not self.runs_dir.is_dir():
            return []
        out = []
        for d in self.runs_dir.iterdir():
            if d.name.startswith("run_id=") and (d / "runs" / "run.parquet").is_file():
                out.append(d.name[len("run_id="):])
        return sorted(out)

    # ----------------------------------------------------------------- shards

    def shard_marker(self, run_id: str, shard_id: ShardId) -> dict[str, Any] | None:
        """The shard's commit marker, validated (`StoreCorruptError` if it is not one that
        `commit_shard` could have written), or None when the shard is not committed."""
        path = self._marker_path(run_id, shard_id)
        if not path.is_file():
            return None
        try:
            marker = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreCorruptError(f"{path}: not a commit marker (unreadable JSON: {e})") from None
        _check_marker(path, marker, run_id, self._shard_name(shard_id))
        return marker

    def is_committed(self, run_id: str, shard_id: ShardId) -> bool:
        return self._marker_path(run_id, shard_id).is_file()

    def committed_shards(self, run_id: str) -> list[ShardId]:
        """Shards of ``run_id`` with a commit marker: ints ascending, then names."""
        commits = self.run_dir(run_id) / "_commits"
        if not commits.is_dir():
            return []
        shards = [
            self._parse_shard(p.name[len("shard="):-len(".json")])
            for p in commits.iterdir()
            if p.name.startswith("shard=") and p.name.endswith(".json")
        ]
        return sorted(shards, key=lambda s: (isinstance(s, str), s if isinstance(s, str) else f"{s:012d}"))

    def committed_rows(self, run_id: str) -> dict[str, int]:
        """Rows per sharded table over the committed shards, from the markers (no file is read)."""
        counts = dict.fromkeys(SHARDED_TABLES, 0)
        for shard in self.committed_shards(run_id):
            for name, entry in (self.shard_marker(run_id, shard) or {}).get("tables", {}).items():
                counts[name] += int(entry["rows"])
        return counts

    def commit_shard(self, run_id: str, shard_id: ShardId, tables: Mapping[str, pa.Table]) -> bool:
        """Atomically commit one shard's tables. Returns False (and writes nothing) if the
        shard is already committed.

        ``tables`` maps a subset of samples / token_maps / failures / flags to Arrow tables
        (validated and cast to the schemas; every row's run_id must be ``run_id`` and its
        shard_id ``shard_id``). Zero-row tables get no file (the marker records 0 rows).
        Named shards (``"dataset"``) may hold only ``flags``. Any error raises, and no
        part of the shard becomes visible.
        """
        shard = self._shard_name(shard_id)
        if not self.run_path(run_id).exists():
            raise KeyError(f"run {run_id!r} not found in {self.root}: call write_run first")
        unknown = set(tables) - set(SHARDED_TABLES)
        if unknown:
            raise ValueError(f"commit_shard: unknown or non-shard table(s) {sorted(unknown)}; allowed {SHARDED_TABLES}")
        conformed: dict[str, pa.Table] = {}
        for name, table in tables.items():
            t = conform_table(name, table)
            self._check_ids(name, t, run_id, shard_id)
            conformed[name] = t

        run_dir = self.run_dir(run_id)
        marker_path = self._marker_path(run_id, shard_id)
        with self._lock(run_id):
            if marker_path.exists():
                return False
            tmp = run_dir / "_tmp" / f"shard={shard}.{uuid.uuid4().hex}"
            tmp.mkdir(parents=True)
            placed: list[Path] = []
            entries: dict[str, dict[str, Any]] = {}
            try:
                staged: dict[str, Path] = {}
                for name, t in conformed.items():
                    if t.num_rows == 0:
                        entries[name] = {"path": None, "rows": 0, "sha256": None, "bytes": 0}
                        continue
                    p = tmp / f"{name}.parquet"
                    write_parquet(t, p)
                    staged[name] = p
                    entries[name] = {
                        "path": f"{name}/shard={shard}.parquet",
                        "rows": t.num_rows,
                        "sha256": file_sha256(p),
                        "bytes": p.stat().st_size,
                    }
                _fsync_path(tmp)
                for name, p in staged.items():
                    final = self.table_path(run_id, name, shard_id)
                    final.parent.mkdir(exist_ok=True)
                    os.replace(p, final)
                    placed.append(final)
                for d in {f.parent for f in placed}:
                    _fsync_path(d)
                marker = {
                    "format": _MARKER_FORMAT,
                    "run_id": run_id,
                    "shard": shard_id,
                    "committed_at": datetime.now(UTC).isoformat(),
                    "tables": entries,
                }
                marker_path.parent.mkdir(exist_ok=True)
                _write_bytes_atomic(marker_path, json.dumps(marker, indent=1, sort_keys=True).encode())
            except BaseException:
                # No marker was written: the shard stays invisible. Remove what we placed
                # so that a failed commit leaves nothing behind (recover() handles crashes).
                for f in placed:
                    f.unlink(missing_ok=True)
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return True

    @staticmethod
    def _check_ids(name: str, t: pa.Table, run_id: str, shard_id: ShardId) -> None:
        if t.num_rows == 0:
            return
        bad = [v for v in t.column("run_id").unique().to_pylist() if v != run_id]
        if bad:
            raise ValueError(f"{name}: rows with run_id {bad[:3]} committed to run {run_id!r}")
        if "shard_id" in t.column_names:
            if not isinstance(shard_id, int):
                raise ValueError(f"{name} has a shard_id column; commit it to an integer shard, not {shard_id!r}")
            bad = [v for v in t.column("shard_id").unique().to_pylist() if v != shard_id]
            if bad:
                raise ValueError(f"{name}: rows with shard_id {bad[:3]} committed to shard {shard_id}")

    # ---------------------------------------------------------------- readers

    def committed_files(self, table: str, run_id: str | None = None) -> list[Path]:
        """Files of ``table`` that belong to committed shards (or the run rows for ``runs``)."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables are {sorted(TABLES)}")
        run_ids = [run_id] if run_id is not None else self.runs()
        if run_id is not None and not self.run_path(run_id).exists():
            raise KeyError(f"run {run_id!r} not found in {self.root}")
        files: list[Path] = []
        for rid in run_ids:
            if table == "runs":
                files.append(self.run_path(rid))
                continue
            for shard in self.committed_shards(rid):
                marker = self.shard_marker(rid, shard)
                entry = (marker or {}).get("tables", {}).get(table)
                if entry and entry["path"]:
                    files.append(self.run_dir(rid) / entry["path"])
        return files

    def read_table(self, name: str, run_id: str | None = None) -> pa.Table:
        """All committed rows of ``name`` (of one run, or of all runs), cast to its schema."""
        files = self.committed_files(name, run_id)
        if not files:
            return empty_table(name)
        return pa.concat_tables([_read_parquet(f, name) for f in files])

    def verify(self, run_id: str) -> list[str]:
        """Problems found re-hashing committed files against their markers (empty: all good)."""
        problems = []
        for shard in self.committed_shards(run_id):
            marker = self.shard_marker(run_id, shard) or {}
            for entry in marker.get("tables", {}).values():
                if not entry["path"]:
                    continue
                path = self.run_dir(run_id) / entry["path"]
                if not path.is_file():
                    problems.append(f"shard {shard}: {entry['path']} is missing")
                elif file_sha256(path) != entry["sha256"]:
                    problems.append(f"shard {shard}: {entry['path']} sha256 differs from its commit marker")
        return problems

    # --------------------------------------------------------------- recovery

    def recover(self, run_id: str) -> list[Path]:
        """Delete what a crashed commit or run write left behind; returns the removed paths.

        Removes ``_tmp/``, temp files of markers and run rows, and any table file that no
        commit marker references. Committed shards are untouched.
        """
        run_dir = self.run_dir(run_id)
        if not run_dir.is_dir():
            raise KeyError(f"run {run_id!r} not found in {self.root}")
        removed: list[Path] = []
        with self._lock(run_id):
            referenced = {
                (run_dir / e["path"]).resolve()
                for shard in self.committed_shards(run_id)
                for e in (self.shard_marker(run_id, shard) or {}).get("tables", {}).values()
                if e["path"]
            }
            tmp = run_dir / "_tmp"
            if tmp.exists():
                removed.extend(sorted(tmp.iterdir()))
                shutil.rmtree(tmp)
            for sub in ("_commits", "runs"):
                d = run_dir / sub
                if d.is_dir():
                    for p in d.iterdir():
                        if p.name.startswith(".") and ".tmp-" in p.name:
                            p.unlink()
                            removed.append(p)
            for table in SHARDED_TABLES:
                d = run_dir / table
                if d.is_dir():
                    for p in sorted(d.iterdir()):
                        if p.resolve() not in referenced:
                            p.unlink()
                            removed.append(p)
        return removed
