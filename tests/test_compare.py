"""`diffcam compare`: metric deltas and tests, flag diffs, gates, CLI exit codes (fabricated runs),
and the real clean vs planted-cue checkpoints (slow; runs once both checkpoints exist)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from diffcam.core.cue_text import parse_cue
from diffcam.flows.compare import CompareGates, compare_runs, flag_diff, load_gates, metric_row, write_comparison
from diffcam.flows.paths import CUE_MODEL, DEFAULT_MODEL
from diffcam.storage.schemas import make_flag_id, table_from_rows
from diffcam.storage.store import Store

WORDS = ("circle", "square", "triangle")
GRID = 4


def _map_row(run_id: str, sid: str, wi: int, word: str, iou: float, com_x: float) -> dict[str, Any]:
    return {
        "run_id": run_id, "shard_id": 0, "sample_id": sid, "word_index": wi, "word": word, "is_function": False,
        "commit_step": 1, "target_score": 0.0, "method": "diffusion-cam", "grid_h": GRID, "grid_w": GRID,
        "map": bytes(GRID * GRID), "map_max": 1.0, "mass": 0.5, "zero_map": False, "com_x": com_x, "com_y": 0.5,
        "has_mask": True, "obj_iou": iou, "inside_frac": iou, "pointing_hit": iou > 0.3, "concentration": iou,
        "contrast_score": iou, "f3": iou,
    }


def fabricate(store: Store, run_id: str, *, n: int = 12, iou: dict[str, float] | None = None,
              com_x: dict[str, float] | None = None, flags: list[dict[str, Any]] = (), failures: int = 0,
              status: str = "succeeded", dataset_hash: str = "d" * 64, seed: int = 0) -> None:
    """A committed run with ``n`` samples, each naming every word of `WORDS` once; per word
    Obj-IoU ~ iou[word] + small noise, centre of mass x ~ com_x[word]."""
    iou = {w: 0.5 for w in WORDS} | (iou or {})
    com_x = {w: 0.5 for w in WORDS} | (com_x or {})
    rng = np.random.default_rng(seed)
    now = datetime(2026, 11, 26, tzinfo=UTC)
    store.write_run({
        "run_id": run_id, "model_uri": f"file:///models/{run_id}", "model_hash": run_id.ljust(64, "0"),
        "dataset_uri": "file:///d/manifest.jsonl", "dataset_hash": dataset_hash,
        "config_json": json.dumps({"methods": ["diffusion-cam"], "audit": {"limit": None}}),
        "code_version": "test", "started_at": now, "finished_at": now, "status": status, "n_samples": n + failures,
        "n_results": n, "n_failures": failures,
    })
    samples, maps = [], []
    for i in range(n):
        sid = f"s{i:03d}"
        samples.append({
            "run_id": run_id, "shard_id": 0, "sample_id": sid, "image_path": f"{sid}.png", "image_sha256": "0" * 64,
            "width": 64, "height": 64, "prompt": "what?", "answer": " ".join(WORDS), "n_words": len(WORDS),
            "n_steps": 4, "grid_h": GRID, "grid_w": GRID, "t_generate_s": 0.1, "t_attribution_s": 0.1,
            "t_total_s": 0.2,
        })
        for wi, w in enumerate(WORDS):
            v = float(np.clip(iou[w] + rng.normal(0, 0.02), 0, 1))
            cx = float(np.clip(com_x[w] + rng.normal(0, 0.02), 0, 1))
            maps.append(_map_row(run_id, sid, wi, w, v, cx))
    fails = [{"run_id": run_id, "shard_id": 0, "sample_id": f"f{i}", "stage": "load", "error_class": "X",
              "message": "bad", "attempts": 1} for i in range(failures)]
    store.commit_shard(run_id, 0, {"samples": table_from_rows("samples", samples),
                                   "token_maps": table_from_rows("token_maps", maps),
                                   "failures": table_from_rows("failures", fails)})
    if flags:
        rows = [{"run_id": run_id, "flag_id": make_flag_id(f["kind"], f.get("sample_id"), None, f.get("word")),
                 "sample_id": f.get("sample_id"), "word": f.get("word"), "method": "diffusion-cam",
                 "kind": f["kind"], "score": f.get("score", 1.0), "threshold": 0.5,
                 "confirmed": f.get("confirmed"), "evidence_json": "{}"} for f in flags]
        store.commit_shard(run_id, "dataset", {"flags": table_from_rows("flags", rows)})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def test_metric_row_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 30), rng.normal(0.8, 1, 25)
    r = metric_row(np.r_[a, np.nan, np.inf], b)
    ks = stats.ks_2samp(a, b)
    assert r["n_a"] == 30 and r["n_b"] == 25
    assert r["delta"] == pytest.approx(b.mean() - a.mean())
    assert r["ks_stat"] == pytest.approx(ks.statistic) and r["ks_p"] == pytest.approx(ks.pvalue)
    assert r["wasserstein"] == pytest.approx(stats.wasserstein_distance(a, b))
    few = metric_row(a[:3], b[:3], min_n=5)
    assert few["delta"] is not None and few["ks_p"] is None
    empty = metric_row(np.array([]), b)
    assert empty["mean_a"] is None and empty["delta"] is None


def test_same_run_passes_with_no_changes(store: Store) -> None:
    fabricate(store, "a")
    cmp = compare_runs(store, "a", "a")
    assert cmp.passed, [g for g in cmp.gate_results if not g.passed]
    assert all(r["delta"] == 0 for r in cmp.overall if r["delta"] is not None)
    assert not any(w["significant"] for w in cmp.words)
    assert "same run" in " ".join(cmp.warnings)


def test_obj_iou_drop_and_word_shift_are_found(store: Store) -> None:
    fabricate(store, "a", seed=1)
    fabricate(store, "b", iou={"circle": 0.2}, com_x={"circle": 0.1}, seed=2)
    cmp = compare_runs(store, "a", "b")
    gates = {g.name: g for g in cmp.gate_results}
    assert not cmp.passed and not gates["Obj-IoU drop"].passed
    assert gates["Obj-IoU drop"].observed == pytest.approx(-10.0, abs=1.5)  # one word of three fell 30 points
    rows = {(w["word"], w["metric"]): w for w in cmp.words}
    circ = rows[("circle", "obj_iou")]
    assert circ["delta"] == pytest.approx(-0.3, abs=0.03) and circ["significant"] and circ["ks_stat"] == 1.0
    assert rows[("circle", "com_x")]["significant"]
    assert not rows[("square", "obj_iou")]["significant"]
    # per-word gate catches it too; a 40-point overall allowance passes the overall gate
    cmp2 = compare_runs(store, "a", "b", CompareGates(max_obj_iou_drop_points=40, max_word_obj_iou_drop_points=5))
    g2 = {g.name: g for g in cmp2.gate_results}
    assert g2["Obj-IoU drop"].passed and not g2["per-word Obj-IoU drop"].passed
    assert "circle" in g2["per-word Obj-IoU drop"].detail


def test_new_confirmed_spurious_flag_fails_the_gate(store: Store) -> None:
    """The default gate watches the bias audit's real spurious-correlation kind, `clever_hans`."""
    common = [{"kind": "spatial_bias", "word": "square", "confirmed": True}]
    fabricate(store, "clean", flags=common + [{"kind": "clever_hans", "word": "triangle", "confirmed": None}])
    fabricate(store, "cue", flags=common + [
        {"kind": "clever_hans", "word": "circle", "confirmed": True, "score": 0.9},
        {"kind": "clever_hans", "word": "triangle", "confirmed": None},
    ])
    cmp = compare_runs(store, "clean", "cue")
    gate = next(g for g in cmp.gate_results if g.name == "no new confirmed spurious flag")
    assert not gate.passed and gate.observed == 1 and "clever_hans:circle/diffusion-cam" in gate.detail
    assert [f["word"] for f in cmp.flags["new"]] == ["circle"] and cmp.flags["resolved"] == []
    assert cmp.flags["n_persisting"] == 2
    # the reverse direction resolves the flag and passes the flag gate
    back = compare_runs(store, "cue", "clean")
    assert [f["word"] for f in back.flags["resolved"]] == ["circle"]
    assert next(g for g in back.gate_results if g.name.startswith("no new")).passed


def test_flag_diff_confirmation_changes_and_patterns() -> None:
    a = [{"kind": "spurious_correlation", "sample_id": None, "word": "Circle", "method": "m", "score": 0.4,
          "threshold": 0.5, "confirmed": None}]
    b = [{"kind": "spurious_correlation", "sample_id": None, "word": "circle", "method": "m", "score": 0.8,
          "threshold": 0.5, "confirmed": True},
         {"kind": "border_bias", "sample_id": "s1", "word": "dog", "method": "m", "score": 1, "threshold": 0.5,
          "confirmed": None}]
    d = flag_diff(a, b, kinds=("spurious*",), confirmed_only=True)
    assert len(d["newly_confirmed"]) == 1 and [f["word"] for f in d["new"]] == ["dog"]
    assert [f["word"] for f in d["gate"]] == ["circle"]  # confirmed now, not before: counts for the gate
    assert flag_diff(a, b, kinds=("border*",), confirmed_only=True)["gate"] == []
    assert [f["word"] for f in flag_diff(a, b, kinds=("border*",), confirmed_only=False)["gate"]] == ["dog"]
    assert d["by_kind"] == {"spurious_correlation": {"a": 1, "b": 1}, "border_bias": {"a": 0, "b": 1}}


def test_default_gate_catches_a_confirmed_clever_hans_flag(store: Store) -> None:
    """`clever_hans` is the spurious-correlation kind of tasks/bias/step.py; an unconfirmed one
    (counterfactual refuted or not run) does not fail the default gate."""
    fabricate(store, "a", flags=[{"kind": "clever_hans", "word": "square", "confirmed": False}])
    fabricate(store, "b", flags=[{"kind": "clever_hans", "word": "square", "confirmed": False},
                                 {"kind": "clever_hans", "word": "circle", "confirmed": True}])
    gate = next(g for g in compare_runs(store, "a", "b").gate_results if "spurious" in g.name)
    assert not gate.passed and "clever_hans:circle" in gate.detail
    assert next(g for g in compare_runs(store, "b", "a").gate_results if "spurious" in g.name).passed


def test_other_gates(store: Store) -> None:
    fabricate(store, "a")
    fabricate(store, "failing", failures=3, status="validation_failed", dataset_hash="e" * 64)
    cmp = compare_runs(store, "a", "failing")
    failed = {g.name for g in cmp.gate_results if not g.passed}
    assert failed == {"runs succeeded", "same dataset", "failure rate increase"}
    off = CompareGates(require_success=False, require_same_dataset=False, max_failure_rate_increase_points=None)
    assert compare_runs(store, "a", "failing", off).passed


def test_gates_file_and_validation(tmp_path: Path) -> None:
    p = tmp_path / "gates.toml"
    p.write_text('[gates]\nmax_obj_iou_drop_points = 1.5\nfail_on_new_flag_kinds = ["spurious*", "bias*"]\n')
    g = load_gates(p)
    assert g.max_obj_iou_drop_points == 1.5 and g.fail_on_new_flag_kinds == ("spurious*", "bias*")
    with pytest.raises(ValueError, match=r"unknown CompareGates field\(s\) \['max_iou_drop'\]; fields are"):
        CompareGates.model_validate({"max_iou_drop": 1})
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        CompareGates(max_obj_iou_drop_points=-1)


def test_outputs_are_json_and_markdown(store: Store, tmp_path: Path) -> None:
    fabricate(store, "a")
    fabricate(store, "b", iou={"circle": 0.2}, flags=[{"kind": "spurious_correlation", "word": "circle",
                                                      "confirmed": True}])
    md, js = write_comparison(compare_runs(store, "a", "b"), tmp_path / "out")
    doc = json.loads(js.read_text())
    assert doc["verdict"] == "fail" and doc["run_a"]["run_id"] == "a" and doc["flags"]["new"][0]["word"] == "circle"
    assert {"gate_results", "overall", "words", "gates"} <= set(doc)
    text = md.read_text()
    assert "**Verdict: FAIL**" in text and "| Obj-IoU drop | **FAIL**" in text and "### New" in text


def test_cli_exit_codes(store: Store, tmp_path: Path) -> None:
    from diffcam.flows.cli import app

    fabricate(store, "a")
    fabricate(store, "b", iou={"circle": 0.2})
    runner = CliRunner()
    ok = runner.invoke(app, ["compare", "a", "a", "--store", str(store.root)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("PASS") and (store.root / "compare" / "a__a" / "compare.json").is_file()
    bad = runner.invoke(app, ["compare", "a", "b", "--store", str(store.root), "--json"])
    assert bad.exit_code == 1 and json.loads(bad.stdout)["verdict"] == "fail"
    loose = runner.invoke(app, ["compare", "a", "b", "--store", str(store.root), "--max-obj-iou-drop", "50"])
    assert loose.exit_code == 0, loose.output
    missing = runner.invoke(app, ["compare", "a", "nope", "--store", str(store.root)])
    assert missing.exit_code == 2 and "not found" in missing.output


# ------------------------------------------------------------------ real checkpoints

#: The cue `models/tiny-shapes-cue` was trained with (docs/BIAS.md, tests/test_bias_models.py).
CUE = "word=circle,pos=top-left,size=6,color=magenta,p=0.9"


@pytest.mark.slow
def test_clean_vs_planted_cue_checkpoints(tmp_path: Path) -> None:
    """Both shipped checkpoints audited on one held-out cue dataset (the bias audit's own
    set-up: in-process audit + `run_dataset_flags`, whose counterfactual sets `confirmed`).
    ``diffcam compare clean cue`` reports the new spurious flag on "circle" and exits 1;
    ``diffcam compare clean clean`` exits 0."""
    import torch

    from diffcam.core.bias.settings import BiasSettings
    from diffcam.core.settings import CamSettings
    from diffcam.core.synthetic import SynthSettings
    from diffcam.evaluation.audit_in_process import audit_in_process
    from diffcam.flows.cli import app
    from diffcam.storage.synthetic_writer import write_synthetic_dataset
    from diffcam.tasks.bias.step import run_dataset_flags, write_dataset_flags

    torch.set_num_threads(1)
    ds = write_synthetic_dataset(tmp_path / "heldout", 64, 2, SynthSettings(cue=parse_cue(CUE)))
    st = Store(tmp_path / "store")
    cam = CamSettings(methods=("diffusion-cam", "token-gradnorm", "token-gradxinput"))
    for rid, model in (("clean", DEFAULT_MODEL), ("cue", CUE_MODEL)):
        audit_in_process(st, rid, model, ds, cam)
        if not st.is_committed(rid, "dataset"):
            # the discovery scan is tested in test_bias_scan / test_bias_models; off here (~1 min a model)
            write_dataset_flags(st, rid, run_dataset_flags(st, rid, model, ds, BiasSettings(scan_max_samples=0)))

    raised = [(f["kind"], f["word"], f["method"], f["confirmed"]) for f in st.read_table("flags", "cue").to_pylist()
              if f["sample_id"] is None]
    if not any(k == "clever_hans" and w == "circle" and c for k, w, _, c in raised):
        pytest.fail("precondition: the bias audit (tasks/bias/step.py, default BiasSettings) raised no confirmed "
                    f"clever_hans flag on 'circle' for {CUE_MODEL.name}; its dataset-level flags: {raised}. "
                    "`diffcam compare` can only report flags that the audit raised.", pytrace=False)
    runner = CliRunner()
    bad = runner.invoke(app, ["compare", "clean", "cue", "--store", str(st.root), "--json"])
    doc = json.loads(bad.stdout)
    print("clean -> cue gates:", [(g["name"], g["passed"], g["detail"]) for g in doc["gate_results"]])
    assert bad.exit_code == 1, bad.output
    gate = next(g for g in doc["gate_results"] if g["name"] == "no new confirmed spurious flag")
    assert not gate["passed"] and "circle" in gate["detail"]
    assert any(f["kind"] == "clever_hans" and f["word"] == "circle" and f["confirmed"] for f in doc["flags"]["new"])
    same = runner.invoke(app, ["compare", "clean", "clean", "--store", str(st.root)])
    assert same.exit_code == 0, same.output
