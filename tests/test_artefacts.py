"""Hostile artefacts (docs/RELIABILITY.md § 5): checkpoints, user SQL, store metadata.

- Checkpoints load only from safetensors: pickle weights are refused with a clear error and
  never unpickled (a sentinel file that the pickle would create never appears), a pickle
  renamed ``*.safetensors`` is refused before anything parses it, pickles next to real
  safetensors weights are ignored; code shipped in the folder (``auto_map``) is never
  imported and ``trust_remote_code`` needs an explicit argument that no command passes.
- ``diffcam sql`` is read-only: writing statements, ATTACH, COPY, INSTALL/LOAD, SET,
  multi-statements are refused (exit 2, no file created); reading outside the store fails;
  a forged commit marker pointing outside the store is refused, never followed.

The webhook receiver's checks (body size, signature, staleness, replay, secret never
logged) belong to flows/webhook.py and are tested in tests/test_webhook.py.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcam.core.models.base import check_safetensors, load_adapter
from diffcam.flows.paths import DEFAULT_MODEL


class _Evil:
    """Unpickling this runs ``touch <sentinel>``."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.fixture(scope="module")
def hostile_models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    sentinel = root / "PWNED"
    evil = pickle.dumps(_Evil(sentinel))

    def variant(name: str) -> Path:
        d = root / name
        shutil.copytree(DEFAULT_MODEL, d)
        return d

    d = variant("pickle-only")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(evil)
    variant("renamed-pickle").joinpath("model.safetensors").write_bytes(evil)
    variant("both").joinpath("pytorch_model.bin").write_bytes(evil)
    code = f"import pathlib\npathlib.Path({str(sentinel)!r}).touch()\n"
    for name, model_type in (("auto-map", None), ("custom-type", "evil_model")):
        d = variant(name)
        (d / "evil.py").write_text(code + "class EvilConfig: pass\nclass EvilModel: pass\nclass EvilTok: pass\n")
        cfg = json.loads((d / "config.json").read_text())
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
        if model_type:
            cfg["model_type"] = model_type
        (d / "config.json").write_text(json.dumps(cfg))
        tok = json.loads((d / "tokenizer_config.json").read_text())
        tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTok", "evil.EvilTok"]}
        (d / "tokenizer_config.json").write_text(json.dumps(tok))
    return root, sentinel


@pytest.mark.parametrize("name, error", [
    ("pickle-only", r"no \*\.safetensors weights \(found pickle weights \['pytorch_model\.bin'\].*safetensors only"),
    ("renamed-pickle", r"model\.safetensors is not a safetensors file: .*it looks like a pickle"),
    ("custom-type", r"model_type 'evil_model' has no adapter"),
])
def test_hostile_checkpoints_are_refused_without_running_code(hostile_models, name, error):
    root, sentinel = hostile_models
    with pytest.raises(ValueError, match=error):
        load_adapter(root / name)
    assert not sentinel.exists(), "a pickle was unpickled or shipped code imported"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["both", "auto-map"])
def test_pickles_and_shipped_code_next_to_safetensors_are_ignored(hostile_models, name):
    root, sentinel = hostile_models
    adapter = load_adapter(root / name)
    assert adapter.family == "diffusion_gemma"
    assert not sentinel.exists(), "a pickle was unpickled or shipped code imported"


def test_trust_remote_code_needs_an_explicit_flag_no_command_passes():
    with pytest.raises(ValueError, match="trust_remote_code is never needed"):
        load_adapter(DEFAULT_MODEL, trust_remote_code=True)
    from diffcam.flows.cli import app

    for cmd in (["audit", "--help"], ["explain", "--help"], ["bench", "method", "--help"]):
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 0 and "trust" not in res.output.lower(), cmd


def test_check_safetensors_rejects_truncated_and_zip(tmp_path):
    real = DEFAULT_MODEL / "model.safetensors"
    check_safetensors(real)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(real.read_bytes()[:100])
    with pytest.raises(ValueError, match="does not fit"):
        check_safetensors(cut)
    z = tmp_path / "zip.safetensors"
    z.write_bytes(b"PK\x03\x04" + b"\0" * 200)
    with pytest.raises(ValueError, match="zip"):
        check_safetensors(z)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01")
    with pytest.raises(ValueError, match="only 1 bytes"):
        check_safetensors(tiny)


def test_audit_refuses_a_model_folder_without_safetensors(tmp_path):
    from diffcam.flows.audit import AuditConfigError, _resolve_model

    d = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(AuditConfigError, match="no \\*.safetensors"):
        _resolve_model(d)


# ----------------------------------------------------------------------------- diffcam sql


@pytest.fixture
def store(tmp_path) -> Path:
    from diffcam.storage.store import Store
    from tests.test_store import fabricate_run

    st = Store(tmp_path / "store")
    fabricate_run(st, tmp_path / "ds")
    return st.root


@pytest.mark.parametrize("sql", [
    "COPY samples TO '{out}'",
    "COPY (SELECT * FROM samples) TO '/tmp/diffcam-leak.csv'",
    "ATTACH '{db}' AS x",
    "ATTACH ':memory:' AS m",
    "DETACH catalog",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "RESET allowed_directories",
    "SET VARIABLE x = 1",
    "CREATE MACRO leak(x) AS x",
    "CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 's')",
    "DROP VIEW samples",
    "CHECKPOINT",
    "VACUUM",
    "USE memory",
    "EXPORT DATABASE '{out}'",
    "SELECT 1; COPY (SELECT 1) TO '{out}'",
    "WITH x AS (SELECT 1) INSERT INTO samples SELECT * FROM samples",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}'",
])
def test_sql_refuses_every_writing_statement(store, tmp_path, sql):
    from diffcam.flows.cli import app

    out, db = store / "leak.csv", tmp_path / "x.duckdb"
    res = CliRunner().invoke(app, ["sql", sql.format(out=out, db=db), "--store", str(store)])
    assert res.exit_code == 2 and "refused" in res.output, res.output
    assert not out.exists() and not db.exists() and not Path("/tmp/diffcam-leak.csv").exists()


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_parquet('{store}/../ds/../../../etc/passwd')",
])
def test_sql_cannot_read_outside_the_store(store, sql):
    from diffcam.flows.cli import app

    res = CliRunner().invoke(app, ["sql", sql.format(store=store), "--store", str(store)])
    assert res.exit_code == 2 and ("query failed" in res.output or "refused" in res.output), res.output
    assert "root:" not in res.output


def test_sql_refuses_to_follow_a_forged_marker(store):
    from diffcam.flows.cli import app

    m = store / "runs" / "run_id=run-1" / "_commits" / "shard=0.json"
    marker = json.loads(m.read_text())
    marker["tables"]["samples"]["path"] = "../../../../../etc/passwd"
    m.write_text(json.dumps(marker))
    res = CliRunner().invoke(app, ["sql", "SELECT * FROM samples", "--store", str(store)])
    assert res.exit_code == 1 and "the store is damaged" in res.output and "not a valid commit marker" in res.output
    assert "root:" not in res.output
