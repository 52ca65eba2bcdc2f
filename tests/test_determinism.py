"""Determinism and integrity (docs/RELIABILITY.md § 4).

- Same inputs and seed → the same ``samples`` / ``token_maps`` content, byte for byte (map
  bytes included), whatever the number of workers, batch size or shard size; only the
  wall-clock columns (``VOLATILE``) differ.
- Each run records the code version, model hash, dataset hash and settings, and a resume
  with a changed model or dataset is refused.
- The GX suite (plus the store's own integrity check) catches a tampered, truncated,
  deleted or forged table instead of reporting it as a success.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from diffcam.core.settings import CamSettings
from diffcam.flows.paths import DEFAULT_MODEL
from diffcam.storage.schemas import table_from_rows
from diffcam.storage.store import Store, StoreCorruptError, file_sha256
from tests.test_faults import VOLATILE, comparable
from tests.test_store import fabricate_run


def content_digest(tables: dict[str, list[dict]]) -> str:
    """sha256 over the comparable rows (bytes as hex): one number to print and compare."""
    def enc(v):
        return v.hex() if isinstance(v, bytes) else repr(v)

    h = hashlib.sha256()
    for name in sorted(tables):
        for row in tables[name]:
            h.update(json.dumps({k: enc(v) for k, v in sorted(row.items())}).encode())
    return h.hexdigest()


def _rows_from_worker(results: list[dict]) -> dict[str, list[dict]]:
    """In-process worker results → the same shape as `comparable` (through the table schemas)."""
    samples = table_from_rows("samples", [r["samples"] for r in results if r["samples"]]).to_pylist()
    maps = table_from_rows("token_maps", [m for r in results for m in r["token_maps"]]).to_pylist()
    drop = {"run_id", "shard_id"}
    return {
        "samples": sorted(({k: v for k, v in r.items() if k not in drop | VOLATILE["samples"]} for r in samples),
                          key=lambda r: r["sample_id"]),
        "token_maps": sorted(({k: v for k, v in r.items() if k not in drop} for r in maps),
                             key=lambda r: (r["sample_id"], r["word_index"], r["method"])),
    }


@pytest.mark.slow
def test_same_inputs_same_bytes_across_workers_batches_and_shards(prefect_harness, make_dataset, tmp_path):
    """A flow run with 2 Ray workers, batches of 3 and shards of 4 equals an in-process worker
    run sample by sample; a second in-process worker (fresh model load) equals the first."""
    from diffcam.flows.audit import audit, code_version, model_hash
    from diffcam.storage.datasets import load_dataset
    from diffcam.tasks.plan import plan_shards
    from diffcam.tasks.worker import CamWorker

    root = make_dataset(n=6)
    store = tmp_path / "store"
    summary = audit(model=str(DEFAULT_MODEL), dataset=str(root), store=str(store), run_id="det",
                    workers=2, cpus_per_worker=1, batch_size=3, shard_size=4)
    assert summary["status"] == "succeeded", summary["validation_failed"]
    st = Store(store)
    run = st.read_run("det")

    # provenance: code version, model hash, dataset hash and the settings are in the run row
    ds = load_dataset(root)
    assert run["model_hash"] == model_hash(DEFAULT_MODEL) and len(run["model_hash"]) == 64
    assert run["dataset_hash"] == ds.content_hash
    # package version + git commit (+ "-dirty"); the commit itself may move if someone commits meanwhile
    assert re.fullmatch(r"\d+\.\d+\.\d+(\+[0-9a-f]{7,40}(-dirty)?)?", run["code_version"]), run["code_version"]
    assert run["code_version"].split("+")[0] == code_version().split("+")[0]
    config = json.loads(run["config_json"])
    assert config["generation"]["seed"] == 0 and config["audit"]["batch_size"] == 3
    assert config["audit"]["shard_size"] == 4 and "methods" in config

    cam = CamSettings.from_run_config(config)
    items = [{**it, "run_id": "x", "shard_id": 0} for it in plan_shards(ds.samples, shard_size=100, root=ds.root)[0].items]
    first = _rows_from_worker(CamWorker(str(DEFAULT_MODEL), cam, threads=1).process(items))
    second = _rows_from_worker(CamWorker(str(DEFAULT_MODEL), cam, threads=1).process(items[::-1]))
    assert first == second  # a fresh model load, another order: same bytes
    flow = comparable(st, "det")
    flow_rows = {
        "samples": [{k: v for k, v in r.items() if k != "shard_id"} for r in flow["samples"]],
        "token_maps": [{k: v for k, v in r.items() if k != "shard_id"} for r in flow["token_maps"]],
    }
    assert flow_rows == first
    assert sum(len(r) for r in first.values()) > 6
    print(f"\ncontent sha256 (flow, 2 workers) = (in-process) = {content_digest(first)}")


def test_hashes_change_with_any_input_byte(tmp_path, make_dataset):
    from diffcam.flows.audit import model_hash
    from diffcam.storage.datasets import load_dataset

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, model)
    h = model_hash(model)
    assert h == model_hash(DEFAULT_MODEL)  # location-independent
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg, indent=1))  # same JSON, other bytes
    assert model_hash(model) != h
    root = make_dataset(n=2)
    d = load_dataset(root).content_hash
    img = sorted((root / "images").iterdir())[1]
    data = bytearray(img.read_bytes())
    data[-20] ^= 1
    img.write_bytes(bytes(data))
    assert load_dataset(root).content_hash != d


def test_resume_with_a_changed_dataset_is_refused():
    from diffcam.flows.audit import AuditConfigError, _check_resume

    row = {"run_id": "r", "model_hash": "m", "dataset_hash": "d1",
           "config_json": json.dumps({"seed": 0, "audit": {"shard_size": 16, "limit": None}})}
    config = {"seed": 0, "audit": {"shard_size": 16, "limit": None}}
    _check_resume(row, "m", "d1", config)  # same inputs: fine
    with pytest.raises(AuditConfigError, match="dataset hash"):
        _check_resume(row, "m", "d2", config)
    with pytest.raises(AuditConfigError, match="model hash"):
        _check_resume(row, "m2", "d1", config)
    with pytest.raises(AuditConfigError, match="settings differ"):
        _check_resume(row, "m", "d1", {**config, "seed": 1})


# ----------------------------------------------------------------------------- integrity


def _verdict(tmp_path: Path, damage) -> tuple:
    from diffcam.flows.audit import validate_or_integrity_failure
    from diffcam.storage.validation import validate_run

    st = Store(tmp_path / "store")
    fabricate_run(st, tmp_path / "ds")
    damage(st)
    res = validate_or_integrity_failure(st, "run-1", lambda root, rid: validate_run(Store(root), rid))
    return res, {(e["table"], e["expectation"]) for e in res.failed}


STORE_CHECK = ("store", "committed files match their commit markers (sha256)")


def _truncate(st: Store) -> None:
    p = st.table_path("run-1", "token_maps", 0)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _delete(st: Store) -> None:
    st.table_path("run-1", "samples", 1).unlink()


def _forge_marker(st: Store) -> None:
    m = st.run_dir("run-1") / "_commits" / "shard=0.json"
    marker = json.loads(m.read_text())
    marker["tables"]["samples"]["path"] = "../../../../etc/passwd"
    m.write_text(json.dumps(marker))


def _drop_row_and_fix_marker(st: Store) -> None:
    """A 'consistent' forgery: a row removed and the marker's sha256/rows updated to match."""
    p = st.table_path("run-1", "token_maps", 0)
    t = pq.read_table(p)
    pq.write_table(t.slice(1), p, compression="zstd")
    m = st.run_dir("run-1") / "_commits" / "shard=0.json"
    marker = json.loads(m.read_text())
    marker["tables"]["token_maps"].update(rows=t.num_rows - 1, sha256=file_sha256(p))
    m.write_text(json.dumps(marker))


@pytest.mark.parametrize("damage, must_fail", [
    (_truncate, {STORE_CHECK}),
    (_delete, {STORE_CHECK}),
    (_forge_marker, {STORE_CHECK}),
    (_drop_row_and_fix_marker, {("token_maps", f"every word has all {len(CamSettings().methods)} methods (run config)")}),
], ids=["truncated-file", "deleted-file", "forged-marker-path", "row-dropped-marker-rewritten"])
def test_damaged_tables_fail_validation_never_pass(tmp_path, damage, must_fail):
    res, failed = _verdict(tmp_path, damage)
    assert not res.success and must_fail <= failed, failed


def test_forged_marker_is_refused_by_every_reader(tmp_path):
    st = Store(tmp_path / "store")
    fabricate_run(st, tmp_path / "ds")
    _forge_marker(st)
    with pytest.raises(StoreCorruptError, match=r"path '\.\./\.\./\.\./\.\./etc/passwd' is not samples/shard=0"):
        st.read_table("samples", "run-1")
    m = st.run_dir("run-1") / "_commits" / "shard=1.json"
    m.write_text("{ truncated")
    with pytest.raises(StoreCorruptError, match="unreadable JSON"):
        st.shard_marker("run-1", 1)


def test_clean_fabricated_run_passes_through_the_same_path(tmp_path):
    res, failed = _verdict(tmp_path, lambda st: None)
    assert res.success, failed
