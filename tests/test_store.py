"""Store: schemas, atomic shard commits, crash recovery, run rows.

`build_rows` / `fabricate_run` make a small consistent run (2 audited samples, 1 failure,
4 methods per word, one sample flag, one dataset-level flag); the catalog, validation and
report tests import them from here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffcam.core.settings import CamSettings
from diffcam.storage import schemas
from diffcam.storage import store as store_mod
from diffcam.storage.schemas import (
    KEYS,
    TABLES,
    dequantize_map,
    empty_table,
    make_flag_id,
    quantize_map,
    table_from_rows,
)
from diffcam.storage.store import Store

#: The methods a default run writes (what these tables are built with).
METHODS = tuple(CamSettings().methods)

GRID = 4
IMG = 32
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


# ------------------------------------------------------------------ fabrication


def map_stats(m: np.ndarray, mask: np.ndarray | None) -> dict[str, Any]:
    """Plain per-map statistics (a simple stand-in for diffcam.core.stats)."""
    h, w = m.shape
    mx = float(m.max())
    out: dict[str, Any] = {"zero_map": mx <= 0, "has_mask": mask is not None}
    if mx <= 0:
        out.update(mass=0.0)
        return out
    n = m / mx
    p = n / n.sum()
    yc, xc = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    cx, cy = float((p * xc).sum()), float((p * yc).sum())
    border = np.zeros((h, w), bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    centre = np.zeros((h, w), bool)
    centre[h // 4: h - h // 4, w // 4: w - w // 4] = True
    py, px = np.unravel_index(int(np.argmax(n)), n.shape)
    srt = np.sort(p.ravel())
    k = np.arange(1, srt.size + 1)
    gini = float(((2 * k - srt.size - 1) * srt).sum() / (srt.size * srt.sum()))
    nz = p[p > 0]
    out.update(
        mass=float(n.mean()), com_x=cx, com_y=cy, com_dist=math.hypot(cx - 0.5, cy - 0.5),
        spread=float(np.sqrt((p * ((xc - cx) ** 2 + (yc - cy) ** 2)).sum())),
        peak_x=int(px), peak_y=int(py),
        entropy=float(-(nz * np.log(nz)).sum() / math.log(h * w)), gini=gini,
        border_frac=float(p[border].sum()), border_enrichment=float(p[border].sum() / border.mean()),
        centre_frac=float(p[centre].sum()),
    )
    if mask is not None:
        inside = float(p[mask].sum())
        inter = np.logical_and(n >= 0.5, mask).sum()
        union = np.logical_or(n >= 0.5, mask).sum()
        iou = float(inter / union)
        m_in, m_out = float(n[mask].mean()), float(n[~mask].mean())
        contrast = m_in / m_out if m_out > 0 else 20.0
        cs = min(contrast / 20.0, 1.0)
        f3 = 3 / (1 / iou + 1 / cs + 1 / inside) if min(iou, cs, inside) > 0 else 0.0
        out.update(
            inside_frac=inside, enrichment=inside / float(mask.mean()), pointing_hit=bool(mask[py, px]),
            obj_iou=iou, obj_iou_any=iou, contrast=contrast, contrast_score=cs, concentration=inside, f3=f3,
        )
    return out


def _blob(cy: int, cx: int, sharp: float) -> np.ndarray:
    yy, xx = np.mgrid[0:GRID, 0:GRID]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / sharp).astype(np.float32)


def build_rows(run_id: str, dataset_dir: Path, *, methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Rows of a consistent run: ``{"run": row, "shards": {shard: {table: [rows]}}}``.

    Writes the two sample images (a red square on grey) into ``dataset_dir``.
    s0 (shard 0): the square is top-left and diffusion-cam finds it; s1 (shard 1): the
    square is bottom-right and diffusion-cam looks top-left (bad); s2 (shard 1): failed.
    """
    dataset_dir.mkdir(parents=True, exist_ok=True)
    cell = IMG // GRID
    samples_spec = [("s0", 0, (0, 0), (0, 0)), ("s1", 1, (2, 2), (0, 0))]
    words = [("a", True), ("red", False), ("square", False)]
    shards: dict[Any, dict[str, list[dict[str, Any]]]] = {0: {}, 1: {}, "dataset": {}}
    for line_no, (sid, shard, (oy, ox), (py, px)) in enumerate(samples_spec):
        img = np.full((IMG, IMG, 3), 128, np.uint8)
        img[oy * cell:(oy + 2) * cell, ox * cell:(ox + 2) * cell] = (220, 30, 30)
        Image.fromarray(img).save(dataset_dir / f"{sid}.png")
        mask = np.zeros((GRID, GRID), bool)
        mask[oy:oy + 2, ox:ox + 2] = True
        maps_rows = []
        for wi, (word, is_fn) in enumerate(words):
            for method in methods:
                if method == "diffusion-cam":
                    m = _blob(py + 0.5, px + 0.5, 0.6)
                elif method == "token-gradnorm" and word == "a":
                    m = np.zeros((GRID, GRID), np.float32)  # a zero map is a valid result
                else:
                    m = _blob(1.5, 1.5, 4.0 + wi)
                blob, mx = quantize_map(m)
                word_mask = mask if word == "square" else None
                maps_rows.append({
                    "run_id": run_id, "shard_id": shard, "sample_id": sid, "word_index": wi, "word": word,
                    "is_function": is_fn, "commit_step": 1 + wi, "distractor": None if wi == 0 else words[wi - 1][0],
                    "target_score": -0.5 * (wi + 1), "distractor_score": None, "method": method,
                    "grid_h": GRID, "grid_w": GRID, "map": blob, "map_max": mx,
                    **map_stats(dequantize_map(blob, GRID, GRID, mx), word_mask),
                })
        dc = [r for r in maps_rows if r["method"] == "diffusion-cam" and r["has_mask"]]
        sample = {
            "run_id": run_id, "shard_id": shard, "sample_id": sid, "line_no": line_no,
            "image_path": f"{sid}.png", "image_sha256": f"{line_no:064d}", "width": IMG, "height": IMG,
            "prompt": "What is in the image?", "answer": "a red square", "reference_answer": "a red square",
            "n_objects": 1, "n_words": len(words), "n_steps": 8, "grid_h": GRID, "grid_w": GRID,
            "t_generate_s": 0.5 + line_no, "t_attribution_s": 0.25, "t_total_s": 0.75 + line_no,
            "mean_inside_frac": float(np.mean([r["inside_frac"] for r in dc])),
            "mean_obj_iou": float(np.mean([r["obj_iou"] for r in dc])),
            "mean_f3": float(np.mean([r["f3"] for r in dc])),
            "pointing_rate": float(np.mean([r["pointing_hit"] for r in dc])),
        }
        shards[shard].setdefault("samples", []).append(sample)
        shards[shard].setdefault("token_maps", []).extend(maps_rows)
    shards[1]["failures"] = [{
        "run_id": run_id, "shard_id": 1, "sample_id": "s2", "line_no": 2, "stage": "load",
        "error_class": "FileNotFoundError", "message": "image s2.png not found", "traceback": None, "attempts": 1,
    }]
    shards[1]["flags"] = [{
        "run_id": run_id, "flag_id": make_flag_id("off-object", "s1", 2, "square", "diffusion-cam"),
        "sample_id": "s1", "word_index": 2, "word": "square", "method": "diffusion-cam", "kind": "off-object",
        "score": 0.9, "threshold": 0.5, "confirmed": None, "region": schemas.format_region(0, 0, 0.5, 0.5),
        "evidence_json": json.dumps({"inside_frac": 0.0}),
    }]
    shards["dataset"]["flags"] = [{
        "run_id": run_id, "flag_id": make_flag_id("spatial-bias", word="square"), "sample_id": None,
        "word_index": None, "word": "square", "method": "diffusion-cam", "kind": "spatial-bias",
        "score": 0.7, "threshold": 0.6, "confirmed": None, "region": "0.0000,0.0000,0.5000,0.5000",
        "evidence_json": json.dumps({"com": [0.25, 0.25]}),
    }]
    run = {
        "run_id": run_id, "model_uri": "models/tiny", "model_hash": "sha256:model-a", "dataset_uri": str(dataset_dir),
        "dataset_hash": "sha256:data-1", "config_json": json.dumps({"methods": list(methods)}),
        "code_version": "0.1.0+test", "started_at": T0, "finished_at": T0.replace(minute=10), "status": "succeeded",
        "n_samples": 3, "n_shards": 2, "n_results": 2, "n_failures": 1, "validation_json": None,
        "trigger": "manual", "parent_run_id": None, "error": None,
    }
    return {"run": run, "shards": shards}


def fabricate_run(
    store: Store,
    dataset_dir: Path,
    run_id: str = "run-1",
    *,
    mutate: Callable[[dict[str, Any]], None] | None = None,
    methods: tuple[str, ...] = METHODS,
) -> dict[str, Any]:
    """Write and commit the run of `build_rows` (``mutate`` may tamper with rows first)."""
    rows = build_rows(run_id, dataset_dir, methods=methods)
    if mutate is not None:
        mutate(rows)
    store.write_run(rows["run"])
    for shard, tables in rows["shards"].items():
        store.commit_shard(run_id, shard, {name: table_from_rows(name, rs) for name, rs in tables.items()})
    return rows


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


# ---------------------------------------------------------------------- schemas


def test_every_table_has_explicit_schema_and_keys() -> None:
    assert set(TABLES) == set(KEYS) == {"runs", "samples", "token_maps", "flags", "failures"}
    for name, schema in TABLES.items():
        assert schema.field("run_id").nullable is False
        for key in KEYS[name]:
            assert schema.field(key).nullable is False, (name, key)
    assert TABLES["runs"].field("started_at").type == pa.timestamp("us", tz="UTC")
    assert TABLES["runs"].field("finished_at").nullable
    assert TABLES["token_maps"].field("word_index").type == pa.int16()
    assert TABLES["token_maps"].field("pointing_hit").nullable


def test_quantize_roundtrip_and_zero_map() -> None:
    m = np.array([[0.0, 0.5], [2.0, 1.0]], np.float32)
    data, mx = quantize_map(m)
    assert list(data) == [0, 64, 255, 128] and mx == 2.0  # round(255*v/2), row-major
    back = dequantize_map(data, 2, 2, mx)
    assert back.dtype == np.float32 and back.max() == 2.0
    assert np.abs(back - m).max() <= mx / 510 + 1e-7
    zdata, zmax = quantize_map(np.zeros((3, 2)))
    assert zdata == bytes(6) and zmax == 0.0
    assert not dequantize_map(zdata, 3, 2, zmax).any()
    with pytest.raises(ValueError, match="negative"):
        quantize_map(np.array([[-0.1, 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_map(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="2x2 needs 4"):
        dequantize_map(b"abc", 2, 2, 1.0)


def test_table_from_rows_validates(tmp_path: Path) -> None:
    rows = build_rows("r", tmp_path / "ds")["shards"][1]["failures"]
    t = table_from_rows("failures", rows)
    assert t.schema == TABLES["failures"] and t.num_rows == 1
    bad = dict(rows[0])
    del bad["stage"]
    with pytest.raises(ValueError, match="'stage'"):
        table_from_rows("failures", [bad])
    with pytest.raises(ValueError, match="'message'"):
        table_from_rows("failures", [{**rows[0], "message": None}])
    with pytest.raises(ValueError, match=r"unknown column.*'bogus'"):
        table_from_rows("failures", [{**rows[0], "bogus": 1}])
    with pytest.raises(ValueError, match="attempts"):
        table_from_rows("failures", [{**rows[0], "attempts": "many"}])
    nullable_missing = dict(rows[0])
    del nullable_missing["traceback"]
    assert table_from_rows("failures", [nullable_missing]).column("traceback").null_count == 1
    run = build_rows("r", tmp_path / "ds")["run"]
    with pytest.raises(ValueError, match="naive datetime"):
        table_from_rows("runs", [{**run, "started_at": datetime(2026, 1, 1)}])
    assert empty_table("token_maps").schema == TABLES["token_maps"]
    with pytest.raises(ValueError, match="unknown table"):
        empty_table("nope")


def test_flag_ids_are_deterministic() -> None:
    a = make_flag_id("off-object", "s1", 2, "square", "diffusion-cam")
    assert a == make_flag_id("off-object", "s1", 2, "square", "diffusion-cam")
    assert a != make_flag_id("off-object", "s1", 1, "square", "diffusion-cam")
    assert schemas.parse_region("0.1,0.2,0.3,0.4") == (0.1, 0.2, 0.3, 0.4)
    with pytest.raises(ValueError):
        schemas.format_region(0.5, 0, 0.4, 1)


# ------------------------------------------------------------------------ store


def test_layout_and_read_back(store: Store, tmp_path: Path) -> None:
    rows = fabricate_run(store, tmp_path / "ds")
    rd = store.root / "runs" / "run_id=run-1"
    assert (rd / "runs" / "run.parquet").is_file()
    assert (rd / "samples" / "shard=0.parquet").is_file()
    assert (rd / "flags" / "shard=dataset.parquet").is_file()
    assert not (rd / "failures" / "shard=0.parquet").exists()  # shard 0 had no failures
    marker = json.loads((rd / "_commits" / "shard=1.json").read_text())
    assert marker["tables"]["samples"]["rows"] == 1 and len(marker["tables"]["samples"]["sha256"]) == 64
    assert store.committed_shards("run-1") == [0, 1, "dataset"]
    assert store.runs() == ["run-1"]
    samples = store.read_table("samples", "run-1")
    assert samples.schema == TABLES["samples"]
    assert sorted(samples.column("sample_id").to_pylist()) == ["s0", "s1"]
    assert store.read_table("token_maps").num_rows == 2 * 3 * len(METHODS)
    assert store.read_table("flags").num_rows == 2
    assert store.read_run("run-1")["started_at"] == rows["run"]["started_at"]
    assert store.verify("run-1") == []
    assert store.committed_rows("run-1") == {"samples": 2, "token_maps": 2 * 3 * len(METHODS), "flags": 2, "failures": 1}
    assert not (store.root / "catalog.duckdb").exists()  # a step of the flows (write_catalog_file), not of writes


def test_commit_is_idempotent(store: Store, tmp_path: Path) -> None:
    rows = fabricate_run(store, tmp_path / "ds")
    again = {n: table_from_rows(n, rs) for n, rs in rows["shards"][0].items()}
    assert store.commit_shard("run-1", 0, again) is False
    assert store.read_table("samples", "run-1").num_rows == 2
    assert store.read_table("token_maps", "run-1").num_rows == 2 * 3 * len(METHODS)


def test_commit_validates_before_writing(store: Store, tmp_path: Path) -> None:
    rows = build_rows("run-1", tmp_path / "ds")
    store.write_run(rows["run"])
    samples = table_from_rows("samples", rows["shards"][0]["samples"])
    with pytest.raises(ValueError, match="shard_id"):
        store.commit_shard("run-1", 1, {"samples": samples})
    with pytest.raises(ValueError, match="run_id"):
        store.commit_shard("run-1", 0, {"samples": samples.set_column(0, "run_id", pa.array(["x"]))})
    with pytest.raises(ValueError, match="non-shard"):
        store.commit_shard("run-1", 0, {"runs": table_from_rows("runs", [rows["run"]])})
    with pytest.raises(ValueError, match="integer shard"):
        store.commit_shard("run-1", "dataset", {"samples": samples})
    with pytest.raises(ValueError, match="null"):
        store.commit_shard("run-1", 0, {"samples": samples.set_column(2, "sample_id", pa.nulls(1, pa.string()))})
    with pytest.raises(KeyError, match="write_run"):
        store.commit_shard("other", 0, {})
    with pytest.raises(ValueError, match="run_id"):
        store.run_dir("../escape")
    assert store.committed_shards("run-1") == []


def test_failed_write_leaves_no_visible_shard(store: Store, tmp_path: Path, monkeypatch) -> None:
    rows = build_rows("run-1", tmp_path / "ds")
    store.write_run(rows["run"])
    tables = {n: table_from_rows(n, rs) for n, rs in rows["shards"][1].items()}
    real = store_mod.write_parquet
    calls = []

    def disk_full(table: pa.Table, path: Path) -> None:
        calls.append(path)
        if len(calls) == 3:  # the third file of the shard: two are already staged
            raise OSError(28, "No space left on device")
        real(table, path)

    monkeypatch.setattr(store_mod, "write_parquet", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.commit_shard("run-1", 1, tables)
    assert store.committed_shards("run-1") == []
    assert store.read_table("samples", "run-1").num_rows == 0
    rd = store.run_dir("run-1")
    assert not any((rd / t).exists() and any((rd / t).iterdir()) for t in ("samples", "token_maps"))
    assert not (rd / "_tmp").exists() or not any((rd / "_tmp").iterdir())
    monkeypatch.setattr(store_mod, "write_parquet", real)
    assert store.commit_shard("run-1", 1, tables) is True  # retry succeeds
    assert store.read_table("samples", "run-1").num_rows == 1


def test_failure_after_rename_before_marker(store: Store, tmp_path: Path, monkeypatch) -> None:
    """Files renamed into place but the marker write fails: nothing visible, nothing left."""
    rows = build_rows("run-1", tmp_path / "ds")
    store.write_run(rows["run"])
    tables = {n: table_from_rows(n, rs) for n, rs in rows["shards"][0].items()}

    def no_marker(path: Path, data: bytes) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(store_mod, "_write_bytes_atomic", no_marker)
    with pytest.raises(OSError):
        store.commit_shard("run-1", 0, tables)
    assert store.read_table("token_maps", "run-1").num_rows == 0
    assert not store.table_path("run-1", "samples", 0).exists()


def test_crash_leftovers_ignored_and_recovered(store: Store, tmp_path: Path) -> None:
    fabricate_run(store, tmp_path / "ds")
    rd = store.run_dir("run-1")
    # simulate a crash of shard 7: staged temp dir + a renamed file without a marker
    (rd / "_tmp" / "shard=7.dead").mkdir(parents=True)
    (rd / "_tmp" / "shard=7.dead" / "samples.parquet").write_bytes(b"partial")
    orphan = store.table_path("run-1", "samples", 7)
    pq.write_table(table_from_rows("samples", [{**build_rows("run-1", tmp_path / "ds")["shards"][0]["samples"][0],
                                                 "shard_id": 7, "sample_id": "ghost"}]), orphan)
    (rd / "_commits" / ".shard=7.json.tmp-abc").write_text("{")
    assert "ghost" not in store.read_table("samples", "run-1").column("sample_id").to_pylist()
    assert store.committed_shards("run-1") == [0, 1, "dataset"]
    removed = store.recover("run-1")
    assert orphan in removed and not orphan.exists()
    assert not (rd / "_tmp").exists()
    assert not (rd / "_commits" / ".shard=7.json.tmp-abc").exists()
    assert store.read_table("samples", "run-1").num_rows == 2  # committed data untouched
    assert store.verify("run-1") == []


def test_verify_detects_tampered_file(store: Store, tmp_path: Path) -> None:
    fabricate_run(store, tmp_path / "ds")
    path = store.table_path("run-1", "samples", 0)
    t = pq.read_table(path)
    pq.write_table(t.set_column(t.schema.get_field_index("answer"), "answer", pa.array(["changed"])), path)
    assert any("sha256" in p for p in store.verify("run-1"))


def test_run_row_write_update(store: Store, tmp_path: Path) -> None:
    rows = build_rows("run-1", tmp_path / "ds")
    run = {**rows["run"], "status": "running", "finished_at": None, "n_results": None}
    store.write_run(run)
    with pytest.raises(FileExistsError):
        store.write_run(run)
    new = store.update_run("run-1", status="succeeded", n_results=2, finished_at=T0.replace(hour=4))
    assert new["status"] == "succeeded" and store.read_run("run-1")["n_results"] == 2
    assert store.read_table("runs").num_rows == 1
    with pytest.raises(ValueError, match="bogus"):
        store.update_run("run-1", bogus=1)
    with pytest.raises(ValueError, match="status"):  # null in a non-nullable column
        store.update_run("run-1", status=None)
    assert store.read_run("run-1")["status"] == "succeeded"  # failed update changed nothing
    assert not [p for p in (store.run_dir("run-1") / "runs").iterdir() if p.name != "run.parquet"]
    with pytest.raises(KeyError):
        store.read_run("nope")


def test_empty_store_reads_typed_empty(tmp_path: Path) -> None:
    st = Store(tmp_path / "none")
    assert st.runs() == []
    for name, schema in TABLES.items():
        t = st.read_table(name)
        assert t.num_rows == 0 and t.schema == schema
