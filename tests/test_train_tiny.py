"""`diffcam train-tiny`: the command that makes the shipped models (a few steps on tiny data)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import DiffusionGemmaForBlockDiffusion
from typer.testing import CliRunner

from diffcam.core.synthetic import SynthSettings, make_samples, vocabulary
from diffcam.flows.cli import app
from diffcam.storage.synthetic_writer import write_synthetic_dataset
from diffcam.training.gemma import (
    Stage,
    TrainExample,
    TrainSettings,
    evaluate_answers,
    run_train_stages,
    train_tiny,
    training_seeds,
)
from diffcam.training.tiny_gemma import TinyModelSpec, build_config, build_tokenizer, init_position_table

WORDS = ["a", "and", "red", "circle"]
TABLE = "model.encoder.vision_tower.patch_embedder.position_embedding_table"


def _table(spec: TinyModelSpec, seed: int) -> torch.Tensor:
    model = DiffusionGemmaForBlockDiffusion(build_config(spec, build_tokenizer(WORDS)))
    init_position_table(model, spec, torch.Generator().manual_seed(seed))
    return model.get_parameter(TABLE).detach().clone()


def test_position_table_is_ones_by_default_and_random_when_asked():
    assert torch.equal(_table(TinyModelSpec(), 0), torch.ones_like(_table(TinyModelSpec(), 0)))
    spec = TinyModelSpec(position_init_std=0.5)
    a, b, c = _table(spec, 0), _table(spec, 0), _table(spec, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded, and the seed matters
    assert abs(float(a.mean()) - 1.0) < 0.02 and abs(float(a.std()) - 0.5) < 0.02  # 8,192 draws


def test_spec_overrides_refuse_unknown_fields():
    assert TinyModelSpec.model_validate({"max_soft_tokens": 280}).max_soft_tokens == 280
    with pytest.raises(ValueError, match="unknown TinyModelSpec field\\(s\\) \\['pach_size'\\]"):
        TinyModelSpec.model_validate({"pach_size": 2})
    with pytest.raises(ValueError, match="patch_size\n  Input should be a valid integer"):
        TinyModelSpec.model_validate({"patch_size": "2"})  # strict: a string is not a number
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        TinyModelSpec.model_validate({"text_layers": -1})
    assert TinyModelSpec.model_validate({"position_init_std": 1}).position_init_std == 1
    with pytest.raises(ValueError, match="valid dictionary"):
        TinyModelSpec.model_validate([1, 2])


def test_spec_text_is_a_file_a_json_object_or_key_value_pairs(tmp_path):
    from diffcam.training.overrides import read_overrides

    (tmp_path / "s.toml").write_text("text_layers = 6\nposition_init_std = 0.5\n")
    (tmp_path / "s.json").write_text('{"text_layers": 6, "position_init_std": 0.5}')
    want = {"text_layers": 6, "position_init_std": 0.5}
    assert read_overrides(str(tmp_path / "s.toml")) == want
    assert read_overrides(str(tmp_path / "s.json")) == want
    assert read_overrides('{"text_layers": 6, "position_init_std": 0.5}') == want
    assert read_overrides("text_layers=6, position_init_std=0.5") == want
    assert read_overrides("projector=mlp2x_gelu,vision_identity_init=false") == {
        "projector": "mlp2x_gelu", "vision_identity_init": False}
    assert read_overrides(None) == {} and read_overrides("  ") == {}
    for bad, match in (("text_layers", "key=value"), ("=3", "key=value"), (str(tmp_path / "no.toml"), "no such spec"),
                       ("[1, 2]", "key=value")):
        with pytest.raises(ValueError, match=match):
            read_overrides(bad)
    # the same text gives the same validated spec
    assert TinyModelSpec.model_validate(read_overrides("text_layers=6,position_init_std=0.5")) == \
        TinyModelSpec.model_validate(read_overrides(str(tmp_path / "s.toml")))


@dataclass
class _Gen:
    text: str
    n_steps: int


class _ScriptedAdapter:
    """Answers from a fixed list, one per call: evaluate_answers' scoring is checked by hand."""

    def __init__(self, answers):
        self.answers = list(answers)

    def prepare(self, image, prompt):
        return None

    def generate(self, inputs, settings):
        return _Gen(self.answers.pop(0), 3)


def test_evaluate_answers_scores_colour_and_shape_words_separately():
    img = np.zeros((8, 8, 3), np.uint8)
    refs = ["a red circle", "a red circle and a blue square", "a blue square"]
    got = ["a red square", "a red circle and a blue square", "a green"]
    ev = evaluate_answers(
        _ScriptedAdapter(got), [TrainExample(img, "p", r) for r in refs],
        word_kinds={"color": frozenset({"red", "blue"}), "shape": frozenset({"circle", "square"})},
    )
    # colours: red ✓, red ✓ blue ✓, blue ✗ (green) → 3/4; shapes: circle ✗, circle ✓ square ✓,
    # square ✗ (answer too short) → 2/4; exact: only the second.
    assert ev["color_word_acc"] == 0.75 and ev["shape_word_acc"] == 0.5
    assert ev["content_word_acc"] == 5 / 8 and ev["exact_match"] == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_synthetic_dataset(root / "train", 24, 1, SynthSettings())
    held = write_synthetic_dataset(root / "held", 3, 2, SynthSettings())
    return data, held


def _train(out: Path, data: Path, held: Path, *extra: str):
    res = CliRunner().invoke(app, ["train-tiny", "--data", str(data), "--heldout", str(held), "--out", str(out),
                                   "--steps", "2", "--batch-size", "4", "--threads", "1", *extra])
    return res


def test_train_tiny_is_deterministic_and_records_its_recipe(tmp_path, tiny_data):
    data, held = tiny_data
    spec = '{"position_init_std": 0.5}'
    r1 = _train(tmp_path / "a", data, held, "--spec", spec, "--lr", "1e-3")
    r2 = _train(tmp_path / "b", data, held, "--spec", spec, "--lr", "1e-3")
    assert r1.exit_code == 0, r1.output
    assert r2.exit_code == 0, r2.output
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    meta = json.loads((tmp_path / "a" / "diffcam_tiny.json").read_text())
    assert meta["train"]["spec"]["position_init_std"] == 0.5
    assert meta["train"]["settings"]["lr"] == 1e-3 and meta["train"]["settings"]["batch_size"] == 4
    ev = meta["heldout_eval"]
    assert ev["n"] == 3 and 0.0 <= ev["color_word_acc"] <= 1.0 and 0.0 <= ev["shape_word_acc"] <= 1.0
    assert float(np.std(wa[TABLE])) > 0.3  # the random table survived two small steps (ones: std 0)

    # A second stage on fresh data continues the first and records the architecture it
    # inherited; both stages' data seeds count as seen (a held-out check must refuse both).
    data2 = write_synthetic_dataset(tmp_path / "data2", 24, 5, SynthSettings())
    r3 = _train(tmp_path / "c", data2, held, "--init-from", str(tmp_path / "a"), "--seed", "1")
    assert r3.exit_code == 0, r3.output
    meta3 = json.loads((tmp_path / "c" / "diffcam_tiny.json").read_text())
    assert meta3["train"]["spec"]["position_init_std"] == 0.5
    assert meta3["train"]["init_from"] == str(tmp_path / "a")
    assert meta3["previous_stage"]["train"]["settings"]["lr"] == 1e-3
    assert training_seeds(tmp_path / "c") == [5, 1] and training_seeds(tmp_path / "a") == [1]
    assert training_seeds(tmp_path / "no-such-checkpoint") == []


def test_train_tiny_refuses_bad_spec_and_spec_with_init_from(tmp_path, tiny_data):
    data, held = tiny_data
    bad = _train(tmp_path / "x", data, held, "--spec", '{"patch": 2}')
    assert bad.exit_code == 2 and "unknown TinyModelSpec field(s) ['patch']" in bad.output
    bad_json = _train(tmp_path / "y", data, held, "--spec", "{patch")
    assert bad_json.exit_code == 2 and "--spec" in bad_json.output
    both = _train(tmp_path / "z", data, held, "--spec", '{"position_init_std": 0.5}', "--init-from", str(tmp_path))
    assert both.exit_code == 2 and "architecture is fixed" in both.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_stage_parse_reads_the_recipe_syntax_and_refuses_bad_stages():
    assert Stage.parse("2250:2e-3:1:0") == Stage(steps=2250, lr=2e-3, train_seed=1, seed=0)
    assert Stage.parse("10:1e-3:5") == Stage(steps=10, lr=1e-3, train_seed=5, seed=0)
    for bad, why in [("10:1e-3", "expected STEPS:LR:TRAIN_SEED"), ("x:1e-3:1", "are integers"),
                     ("0:1e-3:1", "steps >= 1"), ("10:-1:1", "lr > 0"), ("10:1e-3:1:2:3", "expected")]:
        with pytest.raises(ValueError, match=why):
            Stage.parse(bad)


def _weights(folder: Path) -> dict:
    return load_file(Path(folder) / "model.safetensors")


def test_stages_in_one_process_equal_stage_by_stage_commands(tmp_path):
    """`run_train_stages` (in-memory data, model continued in memory) makes the same weights
    as one `diffcam data synth` + `diffcam train-tiny [--init-from]` per stage."""
    spec = TinyModelSpec(text_layers=2, position_init_std=0.5)
    stages = [Stage(steps=3, lr=1e-3, train_seed=1, seed=0), Stage(steps=2, lr=5e-4, train_seed=3, seed=1)]
    base = TrainSettings(batch_size=4, threads=1)
    report = run_train_stages(stages, tmp_path / "recipe", SynthSettings(), base, spec=spec, n_train=16,
                              n_heldout=2, stage_dir=tmp_path / "stages")

    held = write_synthetic_dataset(tmp_path / "held", 2, 2, SynthSettings())
    d1 = write_synthetic_dataset(tmp_path / "d1", 16, 1, SynthSettings())
    d2 = write_synthetic_dataset(tmp_path / "d2", 16, 3, SynthSettings())
    common = ["--batch-size", "4", "--threads", "1"]
    r1 = CliRunner().invoke(app, ["train-tiny", "--data", str(d1), "--heldout", str(held), "--out", str(tmp_path / "s1"),
                                  "--steps", "3", "--lr", "1e-3", "--seed", "0", "--spec", json.dumps(spec.model_dump()),
                                  *common])
    assert r1.exit_code == 0, r1.output
    r2 = CliRunner().invoke(app, ["train-tiny", "--data", str(d2), "--heldout", str(held), "--out", str(tmp_path / "s2"),
                                  "--steps", "2", "--lr", "5e-4", "--seed", "1", "--init-from", str(tmp_path / "s1"), *common])
    assert r2.exit_code == 0, r2.output

    for a, b in [(tmp_path / "stages" / "stage1", tmp_path / "s1"), (tmp_path / "recipe", tmp_path / "s2")]:
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa), (a, b)
    s2 = json.loads((tmp_path / "s2" / "diffcam_tiny.json").read_text())
    assert report["train"]["train_data_sha256"] == s2["train"]["train_data_sha256"]
    assert report["previous_stage"]["train"]["train_data_sha256"] == s2["previous_stage"]["train"]["train_data_sha256"]
    assert {k: v for k, v in report["heldout_eval"].items() if k != "eval_seconds"} == s2["heldout_eval"]

    saved = json.loads((tmp_path / "recipe" / "diffcam_tiny.json").read_text())
    assert training_seeds(tmp_path / "recipe") == [3, 1]
    assert saved["recipe_run"]["stages"] == [{"steps": 3, "lr": 1e-3, "train_seed": 1, "seed": 0},
                                             {"steps": 2, "lr": 5e-4, "train_seed": 3, "seed": 1}]
    assert saved["train"]["spec"]["text_layers"] == 2 and saved["previous_stage"]["train"]["spec"]["text_layers"] == 2
    assert not (tmp_path / "stages" / "stage2").exists()  # the last stage is the checkpoint itself


def test_stages_refuse_a_heldout_seed_that_is_also_trained_on(tmp_path):
    with pytest.raises(ValueError, match="held-out seed 2 is also a training seed"):
        run_train_stages([Stage(steps=1, lr=1e-3, train_seed=2)], tmp_path / "x", SynthSettings(), TrainSettings(),
                         heldout_seed=2)
    assert not (tmp_path / "x").exists()


def test_continuing_an_adapter_needs_its_own_spec(tmp_path):
    spec = TinyModelSpec(text_layers=2)
    ex = [TrainExample(s.image, s.prompt, s.answer) for s in make_samples(4, 1, SynthSettings())]
    adapter, _ = train_tiny(ex, vocabulary(SynthSettings()), TrainSettings(steps=1, batch_size=4, threads=1), spec=spec)
    with pytest.raises(ValueError, match="does not describe the adapter"):
        train_tiny(ex, vocabulary(SynthSettings()), TrainSettings(steps=1, batch_size=4, threads=1),
                   spec=TinyModelSpec(text_layers=4), init_from=adapter)


@pytest.mark.slow
def test_compiled_stages_track_eager_and_leave_torch_as_they_found_it(tmp_path):
    """The compiled step computes the same objective (each stage's loss agrees with eager to
    float rounding) and the deterministic mode it needs is switched off again afterwards."""
    spec = TinyModelSpec(text_layers=1)
    stages = [Stage(steps=3, lr=1e-3, train_seed=1), Stage(steps=2, lr=5e-4, train_seed=3, seed=1)]
    runs = {}
    for name, compiled in [("eager", False), ("compiled", True)]:
        assert not torch.are_deterministic_algorithms_enabled()
        runs[name] = run_train_stages(stages, tmp_path / name, SynthSettings(), TrainSettings(batch_size=4, threads=1,
                                      compile=compiled), spec=spec, n_train=12, n_heldout=1)
        assert not torch.are_deterministic_algorithms_enabled()
    assert runs["compiled"]["recipe_run"]["compile"] and runs["compiled"]["train"]["settings"]["compile"]
    # Same batches and noise, fused kernels: the losses agree to float rounding, stage by stage
    # (weights are not compared: Adam turns a rounding-size gradient into a full-size step).
    e, c = runs["eager"], runs["compiled"]
    while e:
        assert c["train"]["train_data_sha256"] == e["train"]["train_data_sha256"]
        assert c["train"]["final_loss"] == pytest.approx(e["train"]["final_loss"], rel=1e-3)
        e, c = e["previous_stage"], c["previous_stage"]
    assert c is None
