"""Manifest datasets (JSONL / CSV / Parquet): reading the rows and validating each one.

Manifest rows: ``sample_id`` (string), ``image`` (path relative to the manifest's folder),
``prompt`` (non-empty string), optional ``objects``: a list of ``{"word": w, "mask":
relative PNG path}`` (CSV/Parquet: the same list as a JSON string; Parquet may also hold a
native list of structs). Any other field is kept in ``Sample.extra``.

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

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from diffcam.storage.dataset_hash import dataset_hash
from diffcam.storage.samples import Dataset, ManifestError, ManifestProblem, Sample

__all__ = ["MAX_PROMPT_CHARS", "MAX_SAMPLE_ID_CHARS", "load_manifest", "resolve_rel", "file_problem"]

REQUIRED_FIELDS = ("sample_id", "image", "prompt")
#: A prompt longer than this is a manifest error (``prompt-too-long``); a prompt that fits
#: but exceeds the model's context is refused by the worker (``input-too-long``).
MAX_PROMPT_CHARS = 4000
MAX_SAMPLE_ID_CHARS = 256
#: Failure-row keys of lines without a usable sample id; a manifest id of this form is refused.
LINE_KEY_PREFIX = "line:"


# --------------------------------------------------------------------------- path checks


def resolve_rel(root: Path, rel: Any, field_name: str, line: int, where: str,
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


def file_problem(path: Path) -> str | None:
    """None for a regular file, else "missing" or "not-a-file" (never opens the path)."""
    try:
        if path.is_file():
            return None
        return "not-a-file" if path.exists() else "missing"
    except OSError:
        return "missing"


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


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
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


def _read_csv(path: Path) -> list[tuple[int, Any]]:
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


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
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
            image = resolve_rel(root, row["image"], "image", line, where, mine)
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
                mpath = resolve_rel(root, obj["mask"], f"{fname}.mask", line, where, mine)
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
            kind = file_problem(fpath)
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


def load_manifest(path: Path, fmt: str) -> Dataset:
    """Read and validate the manifest ``path`` of format ``fmt`` (jsonl / csv / parquet).
    Raises ManifestError only for what the module docstring's policy rejects."""
    root = path.parent.resolve()
    problems: list[ManifestProblem] = []
    try:
        if fmt == "jsonl":
            rows, where = _read_jsonl(path), "line"
        elif fmt == "csv":
            rows, where = _read_csv(path), "line"
        else:
            rows, where = _read_parquet(path), "row"
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

