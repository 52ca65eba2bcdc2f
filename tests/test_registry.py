"""Registry sources (folder layout, hashing, containment) and the audit ledger's decisions."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from diffcam.flows.audit import model_hash
from diffcam.flows.ledger import AuditLedger, AuditRecord, new_audit_run_id, settings_key
from diffcam.flows.registry import FolderRegistry, HashCache, PathNotAllowed, contained_path, open_source
from diffcam.storage.store import RUN_ID_RE, Store


def make_ckpt(folder: Path, weights: bytes = b"w0", age_s: float = 3600.0) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "fake"}')
    (folder / "model.safetensors").write_bytes(weights)
    old = time.time() - age_s
    for p in folder.iterdir():
        os.utime(p, (old, old))
    return folder


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    make_ckpt(root / "ckpt-a", b"a")  # flat: line = "registry"
    make_ckpt(root / "shapes" / "v1", b"v1")  # nested: line = "shapes"
    make_ckpt(root / "shapes" / "v2", b"v2")
    (root / "shapes" / "notes").mkdir()  # not a checkpoint
    (root / "half-copied").mkdir()
    (root / "half-copied" / "config.json").write_text("{}")  # no weights yet
    make_ckpt(root / ".hidden-ckpt")
    return root


def test_folder_registry_lists_both_layouts_with_content_hashes(registry: Path) -> None:
    src = open_source(str(registry))
    assert isinstance(src, FolderRegistry) and src.uri == f"folder://{registry.resolve()}"
    ckpts = src.list_checkpoints()
    assert [(c.line, c.name) for c in ckpts] == [("registry", "ckpt-a"), ("shapes", "v1"), ("shapes", "v2")]
    for c in ckpts:
        assert c.content_hash == model_hash(c.path)
        assert c.path.is_absolute()
    assert len({c.content_hash for c in ckpts}) == 3


def test_unsettled_checkpoint_waits(registry: Path) -> None:
    make_ckpt(registry / "shapes" / "v3", b"v3", age_s=0)
    names = [c.name for c in FolderRegistry(registry).list_checkpoints(settle_s=60)]
    assert "v3" not in names and "v2" in names
    assert "v3" in [c.name for c in FolderRegistry(registry).list_checkpoints(settle_s=0)]


def test_symlink_out_of_the_registry_is_not_listed(registry: Path, tmp_path: Path) -> None:
    outside = make_ckpt(tmp_path / "elsewhere" / "evil")
    (registry / "linked").symlink_to(outside, target_is_directory=True)
    assert "linked" not in [c.name for c in FolderRegistry(registry).list_checkpoints()]


def test_resolve_version_and_refuse_traversal(registry: Path) -> None:
    src = FolderRegistry(registry)
    assert src.resolve("shapes", "2") == (registry / "shapes" / "v2").resolve()
    assert src.resolve("shapes", "v1") == (registry / "shapes" / "v1").resolve()
    assert src.resolve("registry", "ckpt-a") == (registry / "ckpt-a").resolve()
    for line, version in (("shapes", "9"), ("..", "x"), ("shapes", "../../etc"), ("", "1")):
        with pytest.raises(LookupError):
            src.resolve(line, version)


def test_sweep_finds_mlflow_artifact_layouts(tmp_path: Path) -> None:
    """An MLflow server's --artifacts-destination as the registry: run artifacts
    (<exp>/<run>/artifacts/[a/[b/]]) and MLflow 3 logged models (<exp>/models/<id>/artifacts)."""
    root = tmp_path / "mlartifacts"
    make_ckpt(root / "shapes" / "v1", b"plain")
    make_ckpt(root / "1" / "run-a" / "artifacts" / "model", b"a")
    make_ckpt(root / "1" / "run-b" / "artifacts", b"b")
    make_ckpt(root / "1" / "run-c" / "artifacts" / "checkpoints" / "step-100", b"c")
    make_ckpt(root / "2" / "models" / "m-0f3e" / "artifacts", b"m")
    make_ckpt(root / "1" / "run-d" / "artifacts" / "x" / "y" / "too-deep", b"d")  # 3 below artifacts: not listed
    (root / "1" / "run-e" / "artifacts" / "metrics.json").parent.mkdir(parents=True)  # no checkpoint
    found = {(c.line, c.name): c.path.relative_to(root.resolve()).as_posix()
             for c in FolderRegistry(root).list_checkpoints()}
    assert found == {
        ("shapes", "v1"): "shapes/v1",
        ("1", "run-a/model"): "1/run-a/artifacts/model",
        ("1", "run-b"): "1/run-b/artifacts",
        ("1", "run-c/checkpoints/step-100"): "1/run-c/artifacts/checkpoints/step-100",
        ("2", "m-0f3e"): "2/models/m-0f3e/artifacts",
    }


def test_resolve_source_maps_what_mlflow_sends(tmp_path: Path) -> None:
    root = tmp_path / "mlartifacts"
    v3 = make_ckpt(root / "shapes" / "v3", b"3")
    run = make_ckpt(root / "4" / "0a1b2c" / "artifacts" / "model", b"r")
    logged = make_ckpt(root / "4" / "models" / "m-77" / "artifacts", b"m")
    reg = FolderRegistry(root)
    assert reg.resolve_source("runs:/0a1b2c/model", "shapes", "9") == run.resolve()
    assert reg.resolve_source("runs:/0a1b2c/model/", "shapes", "9") == run.resolve()
    assert reg.resolve_source("mlflow-artifacts:/4/0a1b2c/artifacts/model", "shapes", "9") == run.resolve()
    assert reg.resolve_source("models:/m-77", "shapes", "9") == logged.resolve()
    assert reg.resolve_source("models:/shapes/3", "other", "9") == v3.resolve()
    # anything else (or a source that is not found) falls back to <registry>/<name>/[v]<version>
    for src in ("s3://bucket/shapes/3", "models:/shapes@champion", None, "runs:/0a1b2c/missing", "runs:/../../etc"):
        assert reg.resolve_source(src, "shapes", "3") == v3.resolve(), src
    with pytest.raises(LookupError) as e:
        reg.resolve_source("runs:/ffff/model", "shapes", "8")
    msg = str(e.value)
    assert "source 'runs:/ffff/model'" in msg and f"{root.resolve()}/<experiment>/ffff/artifacts/model" in msg
    assert f"{root.resolve()}/shapes/{{8,v8}}" in msg
    with pytest.raises(LookupError, match="no such logged model"):
        reg.resolve_source("models:/m-404", "shapes", "8")
    # a run folder that is a symlink out of the registry is refused, not followed
    outside = make_ckpt(tmp_path / "outside" / "artifacts" / "model", b"o")
    (root / "4" / "evil").symlink_to(outside.parent.parent)
    with pytest.raises(PathNotAllowed):
        reg.resolve_source("runs:/evil/model", "shapes", "3")


def test_contained_path(registry: Path, tmp_path: Path) -> None:
    inside = registry / "shapes" / "v1"
    assert contained_path(inside, [registry]) == inside.resolve()
    assert contained_path(f"file://{inside}", [registry]) == inside.resolve()
    outside = make_ckpt(tmp_path / "outside")
    (registry / "shapes" / "sneaky").symlink_to(outside, target_is_directory=True)
    bad = [outside, registry / ".." / "outside", registry / "shapes" / "sneaky", "file://otherhost/x",
           registry / "missing", "a\0b"]
    for p in bad:
        with pytest.raises(PathNotAllowed):
            contained_path(p, [registry])
    with pytest.raises(PathNotAllowed, match="no allowed roots"):
        contained_path(inside, [])


def test_unknown_scheme_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"mlflow.*known: \['folder'\]"):
        open_source("mlflow://host/models")
    with pytest.raises(ValueError, match="not a folder"):
        open_source(str(tmp_path / "nope"))


def test_hash_cache_rehashes_only_changed_folders(registry: Path, tmp_path: Path, monkeypatch) -> None:
    import diffcam.flows.audit

    calls: list[Path] = []
    real = diffcam.flows.audit.model_hash

    def counting(p):
        calls.append(Path(p))
        return real(p)

    monkeypatch.setattr(diffcam.flows.audit, "model_hash", counting)
    cache_file = tmp_path / "cache.json"
    FolderRegistry(registry, hash_cache=HashCache(cache_file)).list_checkpoints()
    assert len(calls) == 3
    FolderRegistry(registry, hash_cache=HashCache(cache_file)).list_checkpoints()  # new process, same cache
    assert len(calls) == 3
    (registry / "shapes" / "v2" / "model.safetensors").write_bytes(b"changed")
    ckpts = FolderRegistry(registry, hash_cache=HashCache(cache_file)).list_checkpoints()
    assert len(calls) == 4 and calls[-1].name == "v2"
    assert ckpts[-1].content_hash == real(registry / "shapes" / "v2")


def test_settings_key_fills_defaults_and_ignores_nothing_that_matters() -> None:
    from diffcam.core.settings import CamSettings

    h0, _ = settings_key(None, None)
    assert settings_key({}, None)[0] == h0 == settings_key(CamSettings().model_dump(), None)[0]
    assert settings_key(CamSettings(), None)[0] == h0
    assert settings_key({"distractor": "none"}, None)[0] != h0
    assert settings_key(None, 10)[0] != h0
    with pytest.raises(ValueError, match="unknown"):
        settings_key({"bogus": 1}, None)


def test_run_ids_are_valid_and_readable() -> None:
    rid = new_audit_run_id("my model/line", "v 12", datetime(2026, 11, 26, 8, 0, tzinfo=UTC))
    assert RUN_ID_RE.match(rid) and rid.startswith("my-model-line-v-12-20261126T080000-")


# ---------------------------------------------------------------------------- ledger


def _rec(run_id: str, model_hash: str = "m1", line: str = "shapes", trigger: str = "schedule") -> AuditRecord:
    return AuditRecord(run_id=run_id, model_line=line, checkpoint=f"/r/{line}/{run_id}", model_hash=model_hash,
                       dataset="/d", dataset_hash="d1", settings_hash="s1", settings_json="{}", trigger=trigger)


def _set_status(store: Store, run_id: str, status: str, started: datetime | None = None, n_results: int = 1) -> None:
    row = {"run_id": run_id, "model_uri": "file:///m", "model_hash": "m", "dataset_uri": "file:///d",
           "dataset_hash": "d", "config_json": "{}", "code_version": "test",
           "started_at": started or datetime.now(UTC), "status": status, "n_samples": 1,
           "n_results": n_results}
    if run_id in store.runs():
        store.update_run(run_id, status=status, n_results=n_results)
    else:
        store.write_run(row)


@pytest.fixture
def ledger(tmp_path: Path) -> AuditLedger:
    return AuditLedger(tmp_path / "store")


def test_claim_new_then_skip_in_progress_then_skip_done(ledger: AuditLedger) -> None:
    c1 = ledger.claim(_rec("r1"))
    assert (c1.action, c1.run_id) == ("audit", "r1")
    assert (ledger.dir / "r1.json").is_file() and ledger.status("r1") == "claimed"
    c2 = ledger.claim(_rec("r2"))  # same triple while r1 has not even written its run row
    assert c2.action == "skip" and c2.run_id == "r1" and "in progress" in c2.reason
    _set_status(ledger.store, "r1", "running")
    assert ledger.claim(_rec("r2")).action == "skip"
    _set_status(ledger.store, "r1", "succeeded")
    c3 = ledger.claim(_rec("r2"))
    assert c3.action == "skip" and "already audited" in c3.reason and c3.run_id == "r1"
    assert not (ledger.dir / "r2.json").exists()
    # another checkpoint hash is a new audit
    assert ledger.claim(_rec("r3", model_hash="m2")).action == "audit"


def test_validation_failed_counts_as_audited_and_force_makes_a_new_run(ledger: AuditLedger) -> None:
    ledger.claim(_rec("r1"))
    _set_status(ledger.store, "r1", "validation_failed")
    assert ledger.claim(_rec("r2")).action == "skip"
    forced = ledger.claim(_rec("r2"), force=True)
    assert (forced.action, forced.run_id) == ("audit", "r2") and forced.record.forced
    assert "forced" in forced.reason


def test_failed_run_is_resumed_under_its_own_id(ledger: AuditLedger) -> None:
    ledger.claim(_rec("r1"))
    _set_status(ledger.store, "r1", "failed")
    c = ledger.claim(_rec("r2", trigger="event"))
    assert (c.action, c.run_id) == ("resume", "r1")
    assert ledger.get("r1").trigger == "event"
    assert not (ledger.dir / "r2.json").exists()


def test_stale_claim_is_resumed(ledger: AuditLedger) -> None:
    then = datetime.now(UTC) - timedelta(hours=13)
    ledger.claim(_rec("r1"), now=then)
    _set_status(ledger.store, "r1", "running")
    c = ledger.claim(_rec("r2"))
    assert (c.action, c.run_id) == ("resume", "r1")


def test_release_only_drops_claims_without_a_run_row(ledger: AuditLedger) -> None:
    ledger.claim(_rec("r1"))
    assert ledger.release("r1") is True and ledger.records() == []
    ledger.claim(_rec("r2"))
    _set_status(ledger.store, "r2", "failed")
    assert ledger.release("r2") is False and [r.run_id for r in ledger.records()] == ["r2"]


def test_previous_is_the_last_finished_audit_of_the_same_line_dataset_settings(ledger: AuditLedger) -> None:
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    for i, (rid, mh, line, status) in enumerate([
        ("a1", "m1", "shapes", "succeeded"), ("a2", "m2", "shapes", "succeeded"), ("a3", "m3", "shapes", "failed"),
        ("b1", "m9", "other", "succeeded"), ("a3v", "m6", "shapes", "validation_failed"),
        ("a30", "m7", "shapes", "succeeded-empty"), ("a4", "m4", "shapes", None),
    ]):
        ledger.claim(_rec(rid, model_hash=mh, line=line), now=t0 + timedelta(hours=i))
        if status == "succeeded-empty":
            _set_status(ledger.store, rid, "succeeded", n_results=0)
        elif status:
            _set_status(ledger.store, rid, status)
    # a3 failed, a3v failed validation, a30 audited no sample (not baselines), b1 is another line
    assert ledger.previous(ledger.get("a4")).run_id == "a2"
    assert ledger.previous(ledger.get("a1")) is None
    other = _rec("a5", model_hash="m5")
    other.settings_hash = "s2"
    ledger.claim(other, now=t0 + timedelta(hours=9))
    assert ledger.previous(ledger.get("a5")) is None  # different settings: nothing comparable


def test_claims_are_exclusive_across_processes(tmp_path: Path) -> None:
    """Two processes claim the same triple at once: exactly one gets to audit."""
    import multiprocessing as mp

    store = tmp_path / "store"
    # spawn, not fork: the test process has threads by now (an ephemeral Prefect server,
    # torch's pool), and a forked child can inherit a lock held by one of them and hang
    # (seen here: a child blocked on a futex for 10 minutes).
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        actions = pool.starmap(_claim_in_child, [(str(store), f"p{i}") for i in range(8)])
    assert sorted(actions).count("audit") == 1 and actions.count("skip") == 7


def _claim_in_child(store: str, run_id: str) -> str:
    return AuditLedger(store).claim(_rec(run_id)).action
