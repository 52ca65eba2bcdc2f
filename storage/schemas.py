"""Explicit Arrow schemas for every diffcam table, and the helpers that build rows for them.

One `pa.schema` per table, with nullability spelled out (inferred schemas drift between
shards: an all-null column becomes `null`-typed, an int column becomes double after a
NaN). Field metadata carries the contract that `diffcam.storage.validation` turns into
expectations, so ranges and allowed values live in exactly one place:

- ``range``  ``"lo,hi"`` (either side may be empty: ``"0,"`` means ``>= 0``),
- ``values`` comma-separated allowed values of a string column,
- ``doc``    what the column means and its unit.

Maps are stored quantised: ``map`` holds ``h*w`` uint8 bytes in row-major order with
value ``round(255 * m / max(m))`` (all zeros for an all-zero map) and ``map_max`` holds
``max(m)`` as float32, so ``dequantize_map`` recovers ``m`` to within ``max/510``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from diffcam.core.methods import method_names
from diffcam.core.stats import STAT_KEYS

__all__ = [
    "RUNS", "SAMPLES", "TOKEN_MAPS", "FLAGS", "FAILURES",
    "TABLES", "KEYS", "SHARDED_TABLES", "RUN_STATUSES", "TRIGGERS", "FAILURE_STAGES", "METHODS",
    "quantize_map", "dequantize_map", "empty_table", "table_from_rows", "conform_table",
    "make_flag_id", "format_region", "parse_region", "format_evidence", "parse_evidence", "flag_row",
    "field_range", "field_values", "SCHEMA_VERSION",
]

#: Bumped when a table gains or changes columns (2: token_maps' specificity and
#: faithfulness columns). Older runs stay readable: new columns are nullable and the
#: catalog reads files by column name.
SCHEMA_VERSION = 2
RUN_STATUSES = ("running", "succeeded", "failed", "validation_failed")
TRIGGERS = ("manual", "schedule", "event")
FAILURE_STAGES = ("load", "validate", "generate", "attribute", "write", "worker")
#: The map methods registered in the core (`diffcam.core.methods`). The column is open: a
#: plug-in's method names are valid too.
METHODS = tuple(method_names())

_UNIT = "0,1"  # the closed unit interval
_NONNEG = "0,"


def _f(
    name: str,
    type_: pa.DataType,
    nullable: bool = False,
    *,
    range: str | None = None,  # noqa: A002 - mirrors the metadata key
    values: Iterable[str] | None = None,
    doc: str | None = None,
) -> pa.Field:
    meta: dict[str, str] = {}
    if range is not None:
        meta["range"] = range
    if values is not None:
        meta["values"] = ",".join(values)
    if doc is not None:
        meta["doc"] = doc
    return pa.field(name, type_, nullable=nullable, metadata=meta or None)


#: What each per-map statistic means, from its one definition (`diffcam.core.stats.STAT_KEYS`).
_STAT_DOC = {k.name: k.doc for k in STAT_KEYS}


def _stat(name: str, type_: pa.DataType, nullable: bool = False, *, range: str | None = None) -> pa.Field:  # noqa: A002 - as _f
    """A column that stores a `diffcam.core.stats` statistic as computed: its doc is that statistic's."""
    return _f(name, type_, nullable, range=range, doc=_STAT_DOC[name])


TS = pa.timestamp("us", tz="UTC")
S, I16, I32, I64, F32, F64, B = pa.string(), pa.int16(), pa.int32(), pa.int64(), pa.float32(), pa.float64(), pa.bool_()

RUNS = pa.schema([
    _f("run_id", S, doc="unique run id; safe as a path component"),
    _f("model_uri", S, doc="where the model was loaded from"),
    _f("model_hash", S, doc="content hash of the model folder (the checkpoint identity)"),
    _f("dataset_uri", S),
    _f("dataset_hash", S, doc="content hash of the validated manifest"),
    _f("config_json", S, doc="every setting that shaped the run's numbers, as JSON (diffcam.core.settings."
                             "run_settings: the CamSettings fields at the top level, the refine, stats and bias "
                             "settings under those keys) and the run options under audit (audit.pool: what "
                             "happened to the Ray workers)"),
    _f("code_version", S, doc="package version + git commit of the code that ran"),
    _f("started_at", TS),
    _f("finished_at", TS, True),
    _f("status", S, values=RUN_STATUSES),
    _f("n_samples", I64, range=_NONNEG, doc="samples in the manifest (after --limit)"),
    _f("n_shards", I32, True, range=_NONNEG, doc="planned shards"),
    _f("n_results", I64, True, range=_NONNEG, doc="rows in samples once the run finished"),
    _f("n_failures", I64, True, range=_NONNEG, doc="rows in failures once the run finished"),
    _f("validation_json", S, True, doc="ValidationResult.to_json() of the last validation"),
    _f("trigger", S, True, values=TRIGGERS),
    _f("parent_run_id", S, True, doc="run this one resumes or compares against"),
    _f("error", S, True, doc="why the run failed (status=failed)"),
])

SAMPLES = pa.schema([
    _f("run_id", S),
    _f("shard_id", I32, range=_NONNEG),
    _f("sample_id", S),
    _f("line_no", I32, True, range=_NONNEG, doc="0-based line/row of the manifest"),
    _f("image_path", S, doc="as given by the manifest: absolute, or relative to the dataset folder"),
    _f("image_sha256", S),
    _f("width", I32, range="1,"),
    _f("height", I32, range="1,"),
    _f("prompt", S),
    _f("answer", S, doc="generated text"),
    _f("reference_answer", S, True),
    _f("n_objects", I16, True, range=_NONNEG, doc="object masks given for the image"),
    _f("n_words", I32, range=_NONNEG, doc="words of the answer (rows per method in token_maps)"),
    _f("n_steps", I32, range=_NONNEG, doc="denoising steps actually run"),
    _f("grid_h", I16, range="1,"),
    _f("grid_w", I16, range="1,"),
    _f("t_generate_s", F32, range=_NONNEG),
    _f("t_attribution_s", F32, range=_NONNEG),
    _f("t_total_s", F32, range=_NONNEG),
    _f("t_faithfulness_s", F32, True, range=_NONNEG, doc="faithfulness curves + vanish test; null when not measured"),
    _f("mean_inside_frac", F32, True, range=_UNIT, doc="diffusion-cam, mean over masked words"),
    _f("mean_obj_iou", F32, True, range=_UNIT, doc="diffusion-cam, mean over masked words"),
    _f("mean_f3", F32, True, range=_UNIT, doc="diffusion-cam, mean over masked words"),
    _f("pointing_rate", F32, True, range=_UNIT, doc="diffusion-cam, share of masked words hit"),
])

TOKEN_MAPS = pa.schema([
    _f("run_id", S),
    _f("shard_id", I32, range=_NONNEG),
    _f("sample_id", S),
    _f("word_index", I16, range=_NONNEG),
    _f("word", S),
    _f("is_function", B),
    _f("commit_step", I16, range=_NONNEG, doc="1-based step from which the word stayed unchanged"),
    _f("distractor", S, True),
    _f("target_score", F32),
    _f("distractor_score", F32, True),
    _f("method", S, doc=" | ".join(METHODS) + " (random, objectness: chance maps) | a plug-in's name"),
    _f("grid_h", I16, range="1,"),
    _f("grid_w", I16, range="1,"),
    _f("map", pa.binary(), doc="h*w uint8, row-major, round(255*m/max) (zeros for a zero map)"),
    _f("map_max", F32, range=_NONNEG, doc="max of the float map; 0 for a zero map"),
    # per-map statistics (diffcam.core.stats); coordinates are normalised to [0, 1]
    _f("mass", F32, range=_NONNEG, doc="mean map value (map normalised to max 1)"),
    _stat("zero_map", B),
    _stat("com_x", F32, True, range=_UNIT),
    _stat("com_y", F32, True, range=_UNIT),
    _stat("com_dist", F32, True, range=_NONNEG),
    _stat("spread", F32, True, range=_NONNEG),
    _f("peak_x", I16, True, range=_NONNEG, doc="grid column of the argmax"),
    _f("peak_y", I16, True, range=_NONNEG, doc="grid row of the argmax"),
    _stat("entropy", F32, True, range=_UNIT),
    _stat("gini", F32, True, range=_UNIT),
    _stat("border_frac", F32, True, range=_UNIT),
    _stat("border_enrichment", F32, True, range=_NONNEG),
    _stat("centre_frac", F32, True, range=_UNIT),
    # metrics against the mask of the object the word names (null when has_mask is false)
    _f("has_mask", B),
    _f("inside_frac", F32, True, range=_UNIT, doc="share of map mass inside the mask"),
    _f("enrichment", F32, True, range=_NONNEG, doc="inside_frac / mask area fraction"),
    _f("pointing_hit", B, True),
    _f("obj_iou", F32, True, range=_UNIT),
    _f("obj_iou_any", F32, True, range=_UNIT),
    _f("contrast", F32, True, range=_NONNEG, doc="mean inside / mean outside; inf when nothing is outside"),
    _f("contrast_score", F32, True, range=_UNIT, doc="min(contrast / 20, 1)"),
    _f("concentration", F32, True, range=_UNIT, doc="sum inside / total"),
    _f("f3", F32, True, range=_UNIT,
       doc="harmonic mean of obj_iou, contrast_score, concentration; null when contrast is undefined"),
    # word specificity: only for a masked word in an image with other masked objects
    _f("specificity", F32, True, range=_UNIT,
       doc="mass per area on the named object / (that + mass per area on the other objects); 0.5 = no preference"),
    _f("multi_pointing", B, True, doc="argmax on the named object and on no other object"),
    # faithfulness (diffcam.core.faithfulness): only on the samples selected by --faithfulness
    _f("deletion_auc", F32, True, range=_UNIT,
       doc="normalised area under the word's score as top-ranked cells are removed; lower = more faithful"),
    _f("insertion_auc", F32, True, range=_UNIT,
       doc="normalised area under the word's score as top-ranked cells are restored; higher = more faithful"),
    _f("vanished", B, True, doc="the word left the regenerated answer after removing the top 1/8 of cells"),
], metadata={"diffcam_schema_version": str(SCHEMA_VERSION)})

FLAGS = pa.schema([
    _f("run_id", S),
    _f("flag_id", S, doc="deterministic: make_flag_id(kind, sample_id, word_index, word, method)"),
    _f("sample_id", S, True, doc="null for dataset-level flags"),
    _f("word_index", I16, True, range=_NONNEG),
    _f("word", S, True),
    _f("method", S, True),
    _f("kind", S),
    _f("score", F64),
    _f("threshold", F64),
    _f("confirmed", B, True, doc="null: not reviewed"),
    _f("region", S, True, doc='"x0,y0,x1,y1" in normalised image coordinates'),
    _f("evidence_json", S),
])

FAILURES = pa.schema([
    _f("run_id", S),
    _f("shard_id", I32, range=_NONNEG),
    _f("sample_id", S, doc="manifest sample_id, or 'line:<n>' when the line could not be parsed"),
    _f("line_no", I32, True, range=_NONNEG),
    _f("stage", S, values=FAILURE_STAGES),
    _f("error_class", S),
    _f("message", S),
    _f("traceback", S, True),
    _f("attempts", I16, range="1,"),
])

TABLES: dict[str, pa.Schema] = {
    "runs": RUNS,
    "samples": SAMPLES,
    "token_maps": TOKEN_MAPS,
    "flags": FLAGS,
    "failures": FAILURES,
}

KEYS: dict[str, tuple[str, ...]] = {
    "runs": ("run_id",),
    "samples": ("run_id", "sample_id"),
    "token_maps": ("run_id", "sample_id", "word_index", "method"),
    "flags": ("run_id", "flag_id"),
    "failures": ("run_id", "sample_id"),
}

#: Tables written per shard by `Store.commit_shard` (``runs`` is one file per run).
SHARDED_TABLES = ("samples", "token_maps", "flags", "failures")


def _schema(name: str) -> pa.Schema:
    try:
        return TABLES[name]
    except KeyError:
        raise ValueError(f"unknown table {name!r}; tables are {sorted(TABLES)}") from None


def field_range(field: pa.Field) -> tuple[float | None, float | None] | None:
    """The ``(lo, hi)`` range declared in a field's metadata (None for an open side)."""
    meta = field.metadata or {}
    raw = meta.get(b"range")
    if raw is None:
        return None
    lo, hi = raw.decode().split(",")
    return (float(lo) if lo else None, float(hi) if hi else None)


def field_values(field: pa.Field) -> tuple[str, ...] | None:
    """The allowed values declared in a field's metadata, if any."""
    raw = (field.metadata or {}).get(b"values")
    return tuple(raw.decode().split(",")) if raw is not None else None


# --------------------------------------------------------------------------- maps


def quantize_map(arr: np.ndarray) -> tuple[bytes, float]:
    """Quantise a non-negative 2-D map to ``(h*w uint8 bytes row-major, max)``.

    value = round(255 * m / max(m)); an all-zero map gives zero bytes and max 0.0.
    Raises ValueError for a non-2-D, non-finite or negative map (maps are ReLU'd or
    min-max normalised upstream; a negative value means a bug there, not here).
    """
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(f"map must be 2-D (h, w), got shape {a.shape}")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"map has {int(np.size(a) - np.isfinite(a).sum())} non-finite values")
    mn = float(a.min()) if a.size else 0.0
    if mn < 0:
        raise ValueError(f"map has negative values (min {mn})")
    mx = float(a.max()) if a.size else 0.0
    # map_max is stored as float32: quantise against that value so that
    # dequantize_map(quantize_map(m)) is exact at the peak.
    mx32 = float(np.float32(mx))
    if mx32 <= 0.0:
        return bytes(a.size), 0.0
    q = np.clip(np.rint(a * (255.0 / mx32)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(q).tobytes(order="C"), mx32


def dequantize_map(data: bytes, h: int, w: int, max_value: float) -> np.ndarray:
    """Inverse of `quantize_map`: an (h, w) float32 array with ``max == max_value``."""
    if len(data) != h * w:
        raise ValueError(f"map has {len(data)} bytes, grid {h}x{w} needs {h * w}")
    q = np.frombuffer(data, dtype=np.uint8).reshape(h, w)
    return q.astype(np.float32) * np.float32(float(max_value) / 255.0)


# ------------------------------------------------------------------------- flags


def make_flag_id(
    kind: str,
    sample_id: str | None = None,
    word_index: int | None = None,
    word: str | None = None,
    method: str | None = None,
    extra: str | None = None,
) -> str:
    """Deterministic flag id: sha256 of the flag's identity, 20 hex chars.

    The same analysis over the same rows yields the same ids, so re-running a
    dataset-level analysis replaces rather than duplicates flags.
    """
    ident = json.dumps([kind, sample_id, word_index, word, method, extra], ensure_ascii=False)
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def format_region(x0: float, y0: float, x1: float, y1: float) -> str:
    """``"x0,y0,x1,y1"`` in normalised coordinates (4 decimals); validates the box."""
    box = (x0, y0, x1, y1)
    if not all(0.0 <= v <= 1.0 for v in box) or x0 > x1 or y0 > y1:
        raise ValueError(f"region {box} is not a box inside [0, 1]^2 with x0<=x1, y0<=y1")
    return ",".join(f"{v:.4f}" for v in box)


def parse_region(region: str) -> tuple[float, float, float, float]:
    parts = region.split(",")
    if len(parts) != 4:
        raise ValueError(f"region {region!r} is not 'x0,y0,x1,y1'")
    x0, y0, x1, y1 = (float(p) for p in parts)
    format_region(x0, y0, x1, y1)  # validates
    return x0, y0, x1, y1


def format_evidence(evidence: Mapping[str, Any], *, ascii_only: bool = False) -> str:
    """The ``flags.evidence_json`` text: sorted keys, no NaN (``ascii_only``: non-ASCII escaped)."""
    return json.dumps(evidence, sort_keys=True, ensure_ascii=ascii_only, allow_nan=False)


def parse_evidence(text: str) -> dict[str, Any]:
    """A ``flags.evidence_json`` text back as a dict (the one reader of the column)."""
    return json.loads(text)


def flag_row(run_id: str, flag: Any) -> dict[str, Any]:
    """A ``flags`` row from a typed flag (`diffcam.core.bias.flags.Flag`): the one place a
    flag's region and evidence become the stored text. Dataset-level evidence (no
    ``sample_id``) has always been stored ASCII-escaped and sample-level evidence as UTF-8;
    both are kept so the stored strings do not change."""
    return {
        "run_id": run_id, "flag_id": flag.flag_id, "sample_id": flag.sample_id, "word_index": flag.word_index,
        "word": flag.word, "method": flag.method, "kind": flag.kind, "score": flag.score,
        "threshold": flag.threshold, "confirmed": flag.confirmed,
        "region": None if flag.region is None else format_region(*flag.region),
        "evidence_json": format_evidence(flag.evidence, ascii_only=flag.sample_id is None),
    }


# ------------------------------------------------------------------------ tables


def empty_table(name: str) -> pa.Table:
    """A zero-row table with the schema of ``name``."""
    return _schema(name).empty_table()


def _check_value(name: str, field: pa.Field, value: Any, row_no: int) -> None:
    if isinstance(value, datetime) and pa.types.is_timestamp(field.type):
        if value.tzinfo is None:
            raise ValueError(f"{name}.{field.name} row {row_no}: naive datetime {value}; pass a tz-aware (UTC) one")
    if isinstance(value, float) and math.isnan(value) and not field.nullable:
        raise ValueError(f"{name}.{field.name} row {row_no}: NaN in a non-nullable column")


def table_from_rows(name: str, rows: list[Mapping[str, Any]]) -> pa.Table:
    """Build a table of ``name`` from dict rows, validated against its schema.

    Unknown column → ValueError naming it; a missing or None value in a non-nullable
    column → ValueError naming it; a missing nullable column → null. Type errors name
    the column too.
    """
    schema = _schema(name)
    names = set(schema.names)
    for i, row in enumerate(rows):
        unknown = set(row) - names
        if unknown:
            raise ValueError(f"{name} row {i}: unknown column(s) {sorted(unknown)}")
        for field in schema:
            value = row.get(field.name)
            if value is None and not field.nullable:
                what = "missing" if field.name not in row else "None in"
                raise ValueError(f"{name} row {i}: {what} non-nullable column {field.name!r}")
            if value is not None:
                _check_value(name, field, value, i)
    arrays = []
    for field in schema:
        try:
            arrays.append(pa.array([row.get(field.name) for row in rows], type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
            raise ValueError(f"{name}.{field.name}: cannot convert to {field.type}: {exc}") from exc
    return pa.Table.from_arrays(arrays, schema=schema)


def conform_table(name: str, table: pa.Table) -> pa.Table:
    """Validate an Arrow table against the schema of ``name`` and return it cast to it.

    Unknown column → ValueError; missing non-nullable column → ValueError; missing
    nullable column → added as nulls; nulls in a non-nullable column → ValueError;
    columns reordered and cast (a failed cast → ValueError naming the column).
    """
    schema = _schema(name)
    unknown = [c for c in table.column_names if c not in schema.names]
    if unknown:
        raise ValueError(f"{name}: unknown column(s) {unknown}")
    if len(set(table.column_names)) != len(table.column_names):
        raise ValueError(f"{name}: duplicate column names {table.column_names}")
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise ValueError(f"{name}: missing non-nullable column {field.name!r}")
            columns.append(pa.nulls(table.num_rows, type=field.type))
            continue
        col = table.column(field.name)
        if not field.nullable and col.null_count:
            raise ValueError(f"{name}: {col.null_count} null(s) in non-nullable column {field.name!r}")
        if col.type != field.type:
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise ValueError(f"{name}.{field.name}: cannot cast {col.type} to {field.type}: {exc}") from exc
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)
