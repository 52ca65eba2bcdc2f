"""The shipped LLaDA-V-family model through the user's commands: explain, audit, bench method.

The family's own tests (tests/test_llada.py) use random models written in code; this file
checks that the checkpoint in `models/tiny-llada-shapes` loads and runs through the three
commands a user would start with, and that what they report describes this model (a 16×16
grid, 16 denoising steps, words committed at different steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from diffcam.core.synthetic import SynthSettings, make_samples
from diffcam.flows.cli import app

LLADA_MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-llada-shapes"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    if not (LLADA_MODEL / "config.json").is_file():
        pytest.fail(f"the shipped LLaDA model is missing: {LLADA_MODEL}")
    return LLADA_MODEL


def test_explain_reports_the_models_grid_and_steps(model_dir, tmp_path):
    sample = next(iter(make_samples(1, 2, SynthSettings())))
    img = tmp_path / "img.png"
    Image.fromarray(sample.image).save(img)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", str(img), "--prompt", sample.prompt, "--model", str(model_dir),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "explain.json").read_text())
    assert report["grid"] == [16, 16] and report["n_steps"] == 16
    words = report["words"]
    assert [w["word"] for w in words] == report["answer"].split()
    # one token per step: the words of an answer commit at different steps
    assert len({w["commit_step"] for w in words}) == len(words)


@pytest.mark.slow
def test_audit_and_bench_method_run_on_the_llada_model(model_dir, make_dataset, prefect_harness, tmp_path):
    from diffcam.storage.store import Store

    root = make_dataset(n=4)
    store = tmp_path / "store"
    res = CliRunner().invoke(app, ["audit", "--model", str(model_dir), "--dataset", str(root), "--store", str(store),
                                   "--run-id", "llada", "--workers", "1", "--faithfulness", "0"])
    assert res.exit_code == 0, res.output
    samples = Store(store).read_table("samples", "llada").to_pylist()
    assert len(samples) == 4
    assert {(s["grid_h"], s["grid_w"], s["n_steps"]) for s in samples} == {(16, 16, 16)}

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "method", "--model", str(model_dir), "--n", "2", "--no-sweep",
                                   "--faith-n", "1", "--clutter-n", "0", "--json", str(out)])
    assert res.exit_code == 0, res.output
    table = json.loads(out.read_text())
    assert {"tuning_seed", "report_seed", "rows"} <= set(table)
    assert any(r["method"] == "diffusion-cam" for r in table["rows"])
