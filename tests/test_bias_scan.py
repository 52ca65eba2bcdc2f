"""The audit's saliency-free discovery scan (`diffcam.tasks.scan`, `diffcam.tasks.bias.scan`).

A scripted model whose word depends on one known window (it says "circle", and gives it
log-probability -0.1, exactly while the magenta cue pixels are in the image; -4.0 without
them) stands in for a model: the scan must propose that window and nothing else, the
counterfactual must confirm it, and a word the model says whatever is erased must yield
nothing. The slow tests run the same path on the shipped planted-cue checkpoint and on the
audit's Ray workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcam.core.bias.flags import Flag, make_flag
from diffcam.core.bias.settings import BiasSettings
from diffcam.core.bias.windows import cell_coverage
from diffcam.core.models.base import Generation, ImageSpan
from diffcam.core.synthetic import CueSpec, SynthSettings, cue_region, make_samples
from diffcam.core.types import WordSpan

GRID = (8, 8)
CUE = CueSpec(word="circle", pos="top-left", size=6, color="magenta", p=0.9)
CUE_BOX = (0.0, 0.0, 0.125, 0.125)  # cell (0, 0): where the top-left cue sits at 64 px
REPO = Path(__file__).resolve().parents[1]


class ScriptedModel:
    """Answers "a red circle" while pixels of the cue colour are in the image, else "a red
    thing"; scores "circle" at -0.1 with them and -4.0 without, "red" at -0.2 always. The
    interface of a `diffcam.core.models.base.ModelAdapter` that the scan and the
    counterfactual use: prepare, generate (words, canvases), image_span, canvas_log_probs."""

    VOCAB = {"a": 1, "red": 2, "circle": 3, "thing": 4}

    def __init__(self, rgb: tuple[int, int, int]) -> None:
        self.rgb = np.array(rgb, dtype=np.uint8)
        self.generations = 0
        self.scored_images = 0

    def _sees_cue(self, img) -> bool:
        return bool(np.all(np.asarray(img) == self.rgb, axis=-1).any())

    def prepare(self, image, prompt):
        return {"image": np.asarray(image)}

    def generate(self, inputs, settings):
        self.generations += 1
        words = ["a", "red", "circle" if self._sees_cue(inputs["image"]) else "thing"]
        spans = tuple(WordSpan(i, w, (i,), (self.VOCAB[w],), 1, w == "a") for i, w in enumerate(words))
        canvas = torch.tensor([self.VOCAB[w] for w in words])
        return Generation(token_ids=tuple(int(t) for t in canvas), text=" ".join(words), words=spans, n_steps=1,
                          canvases=[canvas], self_cond=[None], argmax=[canvas])

    def image_span(self, inputs):
        return ImageSpan(positions=tuple(range(GRID[0] * GRID[1])), grid=GRID)

    def canvas_log_probs(self, images, prompt, canvas, self_cond):
        self.scored_images += len(images)
        lp = np.full((len(images), 3, len(self.VOCAB) + 1), -9.0)
        for i, im in enumerate(images):
            lp[i, 1, self.VOCAB["red"]] = -0.2
            lp[i, 2, self.VOCAB["circle"]] = -0.1 if self._sees_cue(im) else -4.0
        return lp


def _dataset(tmp_path: Path, n: int = 30):
    """A synthetic cue dataset and what the bias step reads of a run: samples (prompt and
    answer), image paths, object masks. The stored answers are the ground-truth ones."""
    from diffcam.storage.datasets import load_dataset
    from diffcam.storage.synthetic_writer import write_synthetic_dataset
    from diffcam.tasks.bias.read import object_masks

    ss = SynthSettings(cue=CUE)
    ds = load_dataset(write_synthetic_dataset(tmp_path / "ds", n, 4, ss))
    truth = list(make_samples(n, 4, ss))
    samples = {s.sample_id: {"prompt": t.prompt, "answer": t.answer} for s, t in zip(ds.samples, truth)}
    images = {s.sample_id: s.image_path for s in ds.samples}
    return ss, truth, samples, images, object_masks(ds, sorted(samples))


def _analyses(samples, words=("circle", "red", "blue")):
    """Only the keys and occurrence counts of `analyse_run`'s result are read by the scan."""
    return {(w, "token-gradnorm"): {"n": sum(w in s["answer"].split() for s in samples.values())} for w in words}


def test_cue_region_is_one_cell() -> None:
    ss = SynthSettings(cue=CUE)
    x0, y0, x1, y1 = cue_region(ss)
    assert (x0 // 8, y0 // 8, (x1 - 1) // 8, (y1 - 1) // 8) == (0, 0, 0, 0)  # the known window of the tests below


def test_scan_proposes_the_one_window_the_word_depends_on(tmp_path: Path) -> None:
    from diffcam.tasks.bias.counterfactual import control_box
    from diffcam.tasks.bias.scan import scan_order, scan_suspects
    from diffcam.tasks.scan import local_scanner

    ss, truth, samples, images, objects = _dataset(tmp_path)
    model = ScriptedModel(ss.cue.rgb)
    settings = BiasSettings(min_word_samples=5, scan_max_samples=6)
    flags, info = scan_suspects(local_scanner(model, None, "commit", settings.hotspot_size), _analyses(samples),
                                samples, images, objects, [], settings)
    assert [(f.kind, f.word, f.method, f.region) for f in flags] == [("clever_hans", "circle", None, CUE_BOX)]
    f = flags[0]
    ev = f.evidence
    assert ev["found_by"] == "scan" and ev["grid"] == [8, 8] and ev["window"] == [0, 0, 1, 1]
    # the six circle samples in scan order; the model says "circle" only on those with the cue
    circle_ids = [sid for sid in scan_order(list(samples)) if "circle" in samples[sid]["answer"].split()]
    with_cue = {f"synth-{i:06d}" for i, t in enumerate(truth) if t.cue_present}
    scanned = circle_ids[:6]
    reproduced = [sid for sid in scanned if sid in with_cue]
    assert ev["n_scanned"] == 6 and ev["n_images"] == len(reproduced) >= 4
    assert ev["n_not_reproduced"] == 6 - len(reproduced)
    assert ev["hit_rate"] == 1.0 and ev["mean_drop"] == pytest.approx(3.9)
    assert f.score == 1.0 and f.threshold == settings.scan_min_hit_rate
    assert ev["member_drops"] == [pytest.approx(3.9)] * len(reproduced)
    # members: the scanned images by their drop (all equal: scan order), then the word's other samples
    assert ev["sample_ids"] == reproduced + [sid for sid in circle_ids if sid not in reproduced]
    # the prototype is the positive mean drop: the control window is elsewhere and off every object
    proto = np.asarray(ev["prototype"])
    assert proto[0, 0] == pytest.approx(3.9) and proto.sum() == pytest.approx(3.9)
    sid = reproduced[0]
    cov = np.max([cell_coverage(m, GRID) for _, m, _ in objects[sid]], axis=0)
    ctrl = control_box(f.region, GRID, proto, cov)
    assert ctrl is not None and ctrl != CUE_BOX
    # "red" is said whatever is erased: scanned, nothing found; "blue" is never said again
    assert info["words"]["red"]["n_images"] > 0 and info["words"]["red"]["n_candidates"] == 0
    assert info["words"]["red"]["max_off_object_hit_rate"] == 0.0
    assert info["words"]["blue"]["skipped"] == "no regenerated answer had the word"
    assert info["n_scanned_images"] == sum(w.get("n_scanned", 0) for w in info["words"].values())
    # one batched scoring per scanned image: the intact image and its 64 erased copies
    assert model.scored_images == 65 * (len(reproduced) + info["words"]["red"]["n_images"])


def test_scan_skips_a_region_saliency_already_proposed_and_rare_words(tmp_path: Path) -> None:
    from diffcam.tasks.bias.scan import scan_suspects
    from diffcam.tasks.scan import local_scanner

    ss, _, samples, images, objects = _dataset(tmp_path)
    saliency = make_flag("clever_hans", 0.5, 0.1, {"window": [0, 0, 1, 1]}, word="circle", method="token-gradnorm",
                         region=CUE_BOX)
    scan = local_scanner(ScriptedModel(ss.cue.rgb), None, "commit", 0.125)
    settings = BiasSettings(min_word_samples=5, scan_max_samples=4)
    flags, info = scan_suspects(scan, _analyses(samples), samples, images, objects, [saliency], settings)
    assert flags == [] and info["words"]["circle"]["n_duplicates"] == 1
    flags, info = scan_suspects(scan, _analyses(samples), samples, images, objects, [saliency],
                                BiasSettings(min_word_samples=5, scan_max_samples=4, scan_words="unsuspected"))
    assert flags == [] and "saliency suspect" in info["words"]["circle"]["skipped"]
    flags, info = scan_suspects(scan, _analyses(samples), samples, images, objects, [],
                                BiasSettings(min_word_samples=1000, scan_max_samples=4))
    assert flags == [] and info["n_scanned_images"] == 0
    assert all("min_word_samples" in w["skipped"] for w in info["words"].values())


def test_audit_confirms_what_only_the_scan_found(tmp_path: Path) -> None:
    """Clean maps (saliency proposes nothing) and a model that reads the cue: the scan's
    suspect is confirmed by the counterfactual, and the samples it reaches are flagged by
    their own counterfactual. With the scan off the same run raises nothing."""
    from diffcam.tasks.bias.step import run_dataset_flags
    from tests.test_bias import _fake_run

    st, ds_dir, ss, samples = _fake_run(tmp_path, "circle", "top-left", "magenta", planted=False)
    model = ScriptedModel(ss.cue.rgb)
    settings = BiasSettings(scan_max_samples=8)
    info: dict = {}
    rows = run_dataset_flags(st, "r1", None, ds_dir, settings, adapter=model, info=info)
    dataset = [r for r in rows if r["sample_id"] is None]
    assert [(r["kind"], r["word"], r["method"], r["region"], r["confirmed"]) for r in dataset] == \
        [("clever_hans", "circle", None, "0.0000,0.0000,0.1250,0.1250", True)]
    ev = json.loads(dataset[0]["evidence_json"])
    assert ev["found_by"] == "scan" and ev["counterfactual"]["confirmed"] is True
    assert ev["counterfactual"]["vanish"] == 1.0 and ev["counterfactual"]["vanish_control"] == 0.0
    assert ev["settings"]["scan_max_samples"] == 8 and ev["scan_s"] > 0
    assert info["n_scan_suspects"] == 1 and info["scan_s"] > 0
    assert info["n_scanned_images"] == sum(w.get("n_scanned", 0) for w in info["scan"].values()) > 0
    # per-sample: reached by their own counterfactual only (the scan has no map), never by saliency
    reached = [r for r in rows if r["kind"] == "suspect_region"]
    truth = {f"synth-{i:06d}" for i, s in enumerate(samples) if s.cue_present}
    assert {r["sample_id"] for r in reached} == truth
    assert all(r["method"] is None and r["confirmed"] is True for r in reached)
    assert {tuple(json.loads(r["evidence_json"])["reached_by"]) for r in reached} == {("counterfactual",)}
    assert {json.loads(r["evidence_json"])["dataset_flag_id"] for r in reached} == {dataset[0]["flag_id"]}
    # the report shows it as any other dataset flag, with what the scan measured
    from diffcam.storage.report import DEFAULT_SECTIONS, build_report
    from diffcam.tasks.bias.report import BIAS_SECTION
    from diffcam.tasks.bias.step import write_dataset_flags

    assert write_dataset_flags(st, "r1", rows)
    page = build_report(st, "r1", tmp_path / "rep", sections=[*DEFAULT_SECTIONS, BIAS_SECTION])[0].read_text()
    assert "found_by" in page and "hit_rate" in page and "region erased" in page
    assert "Calibration behind these flags" in page and "recall" in page  # the kind's held-out figures

    quiet = ScriptedModel(ss.cue.rgb)
    off: dict = {}
    assert run_dataset_flags(st, "r1", None, ds_dir, BiasSettings(scan_max_samples=0), adapter=quiet, info=off) == []
    assert quiet.generations == 0 and off["n_scanned_images"] == 0 and off["scan"] is None


def test_answer_only_stand_in_is_not_scanned_and_says_so(tmp_path: Path) -> None:
    from diffcam.tasks.bias.step import run_dataset_flags
    from tests.test_bias import _fake_run, _HansAdapter

    st, ds_dir, ss, _ = _fake_run(tmp_path, "circle", "top-left", "magenta", planted=False)
    info: dict = {}
    adapter = _HansAdapter("circle", ss.cue.rgb)
    assert run_dataset_flags(st, "r1", None, ds_dir, adapter=adapter, info=info) == []
    assert adapter.calls == 0 and "cannot score images" in info["scan"]


def test_scan_flag_reaches_samples_only_through_their_tests() -> None:
    from diffcam.core.bias.sample import region_sample_flags
    from diffcam.tasks.bias.scan import flag_analysis

    ev = {"found_by": "scan", "grid": [8, 8], "window": [0, 0, 1, 1]}
    flag = make_flag("clever_hans", 1.0, 0.5, ev, word="circle", method=None, region=CUE_BOX)
    words = {"s0": [(0, "a", True), (1, "circle", False)], "s1": [(0, "Circle,", False)], "s2": [(0, "red", False)]}
    analysis = flag_analysis(flag, {}, words)
    assert analysis["sample_ids"] == ["s0", "s1"] and analysis["word_indices"] == [1, 0]
    tests = {"s0": {"vanished": True}, "s1": {"vanished": False}}
    rows = region_sample_flags(flag, analysis, BiasSettings(), tests)
    assert [(r.sample_id, r.word_index, r.method, r.confirmed) for r in rows] == [("s0", 1, None, True)]
    assert region_sample_flags(flag, analysis, BiasSettings(), None) == []  # untested: no map to reach it
    saliency = Flag("x", "clever_hans", 1.0, 0.5, {"window": [0, 0, 1, 1]}, word="circle", method="m")
    assert flag_analysis(saliency, {("circle", "m"): {"ps": []}}, words) == {"ps": []}


# --------------------------------------------------------------------------- the shipped checkpoint


def _require(model: Path) -> Path:
    if not (model / "config.json").is_file():
        pytest.fail(f"model folder {model} is missing: the scan test needs the shipped checkpoint", pytrace=False)
    return model


@pytest.mark.slow
def test_local_scan_on_the_planted_checkpoint_finds_the_cue_cell() -> None:
    """On ``models/tiny-shapes-cue`` the erase scan of "circle" peaks on the cue's cell, and
    each drop is the word's score on the intact image minus on that window erased."""
    from PIL import Image

    from diffcam.core.bias.discovery import window_cells_at
    from diffcam.core.cam import attribution_canvas
    from diffcam.core.evidence import background_colour
    from diffcam.core.faithfulness import adapter_scorer, perturbed
    from diffcam.core.models.base import load_adapter
    from diffcam.core.settings import CamSettings
    from diffcam.tasks.scan import local_scanner

    torch.set_num_threads(1)
    adapter = load_adapter(_require(REPO / "models" / "tiny-shapes-cue"))
    cam = CamSettings()
    ss = SynthSettings(cue=CUE)
    picked = [s for s in make_samples(16, 2, ss) if s.cue_present and "circle" in s.answer.split()][:2]
    out = local_scanner(adapter, cam.generation, cam.attribution_step, 0.125)(
        [s.image for s in picked], [s.prompt for s in picked], ["circle"] * 2, ["a", "b"])
    for s, r in zip(picked, out):
        assert r is not None and r.grid == GRID and r.window == (1, 1) and r.drops.shape == GRID
        assert "circle" in r.answer.split()
        assert np.unravel_index(np.argmax(r.drops), GRID) == (0, 0) and r.drops[0, 0] > 1.0
        gen = adapter.generate(adapter.prepare(Image.fromarray(s.image), s.prompt), cam.generation)
        word = next(w for w in gen.words if w.text == "circle")
        canvas, cond = attribution_canvas(gen, word, cam.attribution_step)
        score, _ = adapter_scorer(adapter, s.prompt, canvas, cond, word)
        erased = perturbed(s.image, window_cells_at(GRID, (1, 1), 3, 5), GRID, background_colour(s.image))
        intact, without = score([s.image, erased])
        assert r.drops[3, 5] == pytest.approx(intact - without, abs=1e-4)


# The pool scanner equals the local one on the same Ray workers as the answerer:
# tests/test_answers.py (one Ray start for both).


class SharedCueModel(ScriptedModel):
    """One cue decides two words: "red" and "circle" are said (and scored -0.1) only while
    the cue colour is in the image; without it "dark thing" (-4.0 each)."""

    VOCAB = {"a": 1, "red": 2, "circle": 3, "thing": 4, "dark": 5}

    def generate(self, inputs, settings):
        self.generations += 1
        sees = self._sees_cue(inputs["image"])
        words = ["a", "red" if sees else "dark", "circle" if sees else "thing"]
        spans = tuple(WordSpan(i, w, (i,), (self.VOCAB[w],), 1, w == "a") for i, w in enumerate(words))
        canvas = torch.tensor([self.VOCAB[w] for w in words])
        return Generation(token_ids=tuple(int(t) for t in canvas), text=" ".join(words), words=spans, n_steps=1,
                          canvases=[canvas], self_cond=[None], argmax=[canvas])

    def canvas_log_probs(self, images, prompt, canvas, self_cond):
        self.scored_images += len(images)
        lp = np.full((len(images), 3, len(self.VOCAB) + 1), -9.0)
        for i, im in enumerate(images):
            sees = self._sees_cue(im)
            lp[i, 1, self.VOCAB["red"]] = -0.1 if sees else -4.0
            lp[i, 2, self.VOCAB["circle"]] = -0.1 if sees else -4.0
        return lp


def test_scan_finds_a_cue_shared_by_two_words(tmp_path: Path) -> None:
    """The saliency stage's specificity gate rejects a region that lights several words; the
    scan asks each word separately, so one cue behind two words is proposed for both."""
    from diffcam.tasks.bias.scan import scan_suspects
    from diffcam.tasks.scan import local_scanner

    ss, truth, _, images, objects = _dataset(tmp_path)
    carrying = {f"synth-{i:06d}": t for i, t in enumerate(truth) if t.cue_present}
    assert len(carrying) >= 5
    samples = {sid: {"prompt": t.prompt, "answer": "a red circle"} for sid, t in carrying.items()}
    flags, info = scan_suspects(local_scanner(SharedCueModel(ss.cue.rgb), None, "commit", 0.125),
                                _analyses(samples, ("circle", "red")), samples, images, objects, [],
                                BiasSettings(min_word_samples=5, scan_max_samples=5))
    assert sorted((f.word, f.region) for f in flags) == [("circle", CUE_BOX), ("red", CUE_BOX)]
    assert all(f.evidence["hit_rate"] == 1.0 for f in flags)


def test_scan_does_not_find_a_cue_whose_position_varies(tmp_path: Path) -> None:
    """The measured limit for position-varying cues: each image's scan finds its own marker's
    window (drop 3.9 nats there), but a window is proposed only when it is hit in at least
    `scan_min_hit_rate` of the word's images, and a marker that moves hits each window in one
    image of twelve: no suspect. (Per-sample tests still reach such samples when a map lights
    the marker; the dataset-level flag does not exist for them.)"""
    from PIL import Image

    from diffcam.tasks.bias.scan import scan_suspects
    from diffcam.tasks.scan import local_scanner

    base = list(make_samples(12, 4, SynthSettings()))
    rng = np.random.default_rng(0)
    cells = rng.permutation([(r, c) for r in range(8) for c in range(8)])[:12]
    images, samples, where = {}, {}, {}
    for i, (s, (r, c)) in enumerate(zip(base, cells)):
        img = s.image.copy()
        img[8 * r + 1:8 * r + 7, 8 * c + 1:8 * c + 7] = CUE.rgb  # inside one grid cell
        sid = f"moving-{i:02d}"
        path = tmp_path / f"{sid}.png"
        Image.fromarray(img).save(path)
        images[sid], samples[sid], where[sid] = path, {"prompt": s.prompt, "answer": "a red circle"}, (int(r), int(c))
    model = ScriptedModel(CUE.rgb)
    scan = local_scanner(model, None, "commit", 0.125)
    per_image = scan([np.asarray(Image.open(images[sid])) for sid in samples], [samples[sid]["prompt"] for sid in samples],
                     ["circle"] * len(samples), list(samples))
    for sid, res in zip(samples, per_image):
        d = np.asarray(res.drops)
        assert np.unravel_index(int(d.argmax()), d.shape) == where[sid] and d.max() == pytest.approx(3.9)
    flags, info = scan_suspects(scan, _analyses(samples, ("circle",)), samples, images, {}, [],
                                BiasSettings(min_word_samples=5, scan_max_samples=12))
    assert flags == []
    assert info["words"]["circle"]["n_images"] == 12
    assert info["words"]["circle"]["max_off_object_hit_rate"] == pytest.approx(1 / 12, abs=1e-5)  # rounded in info
