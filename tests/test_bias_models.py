"""Bias audit on the shipped checkpoints (slow): the planted cue is found and confirmed, the
clean model raises nothing, sample-level off-object flags find the cue-carrying samples.

Models: ``models/tiny-shapes-cue`` (trained with the cue
``word=circle,pos=top-left,size=6,color=magenta,p=0.9``) and ``models/tiny-shapes`` (clean).
A missing model folder FAILS (with the path), it never skips. Held-out data: synthetic
seed 2 (the method benchmark's held-out seed), with the same cue spec, audited in-process
(`diffcam.evaluation.audit_in_process`, the worker's own code without Ray/Prefect).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from diffcam.core.bias.settings import BiasSettings
from diffcam.core.cue_text import parse_cue
from diffcam.core.settings import CamSettings
from diffcam.core.synthetic import SynthSettings, cue_region, make_samples

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: Overridable (e.g. to try a candidate checkpoint before it ships); the default is the shipped folder.
PLANTED = Path(os.environ.get("DIFFCAM_BIAS_PLANTED", REPO / "models" / "tiny-shapes-cue"))
CLEAN = Path(os.environ.get("DIFFCAM_BIAS_CLEAN", REPO / "models" / "tiny-shapes"))
CUE = "word=circle,pos=top-left,size=6,color=magenta,p=0.9"
N = 64
SEED = 2
METHODS = ("diffusion-cam", "token-gradnorm", "token-gradxinput")
#: The sample-level detector whose precision/recall is asserted: `suspect_region` flags of the
#: per-token gradient norm (docs/BIAS.md: Diffusion-CAM's channel-pooled maps do not see the
#: one-cell marker; the generic `off_object` flag, which has no prior on where a cue is, finds
#: only a minority of the cue samples on this checkpoint — printed, not asserted).
DETECTOR = ("suspect_region", "token-gradnorm")


def _require(model: Path) -> Path:
    if not (model / "config.json").is_file() or not any(model.glob("*.safetensors")):
        pytest.fail(f"model folder {model} is missing or incomplete (config.json + *.safetensors): "
                    "the bias acceptance test needs the shipped checkpoint", pytrace=False)
    return model


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSettings]:
    from diffcam.storage.synthetic_writer import write_synthetic_dataset

    ss = SynthSettings(cue=parse_cue(CUE))
    return write_synthetic_dataset(tmp_path_factory.mktemp("bias") / "heldout", N, SEED, ss), ss


def _audit(tmp: Path, model: Path, ds_dir: Path,
           settings: BiasSettings = BiasSettings()) -> tuple[object, str, list[dict]]:
    import torch

    from diffcam.evaluation.audit_in_process import audit_in_process
    from diffcam.storage.store import Store
    from diffcam.tasks.bias.step import run_dataset_flags, write_dataset_flags

    torch.set_num_threads(1)
    st = Store(tmp / "store")
    run_id = model.name
    audit_in_process(st, run_id, model, ds_dir, CamSettings(methods=METHODS))
    rows = run_dataset_flags(st, run_id, model, ds_dir, settings)
    assert write_dataset_flags(st, run_id, rows)
    return st, run_id, rows


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, heldout) -> tuple[object, str, list[dict]]:
    # the scan on this checkpoint is tests/test_bias_scan.py's; here it would only find the
    # region saliency already proposes (a duplicate, not raised): off, ~1 min saved
    return _audit(tmp_path_factory.mktemp("planted"), _require(PLANTED), heldout[0], BiasSettings(scan_max_samples=0))


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, heldout) -> tuple[object, str, list[dict]]:
    return _audit(tmp_path_factory.mktemp("clean"), _require(CLEAN), heldout[0])


def _cue_ids(ds_dir: Path) -> tuple[set[str], set[str]]:
    lines = [json.loads(x) for x in (ds_dir / "manifest.jsonl").read_text().splitlines() if x.strip()]
    return {d["sample_id"] for d in lines if d["cue_present"]}, {d["sample_id"] for d in lines}


def test_planted_cue_flagged_on_its_region_and_confirmed(planted, heldout) -> None:
    ds_dir, ss = heldout
    _, _, rows = planted
    x0, y0, x1, y1 = (v / ss.image_size for v in cue_region(ss))
    hits = []
    for r in rows:
        if r["sample_id"] is None and r["kind"] == "clever_hans" and r["word"] == "circle":
            rx0, ry0, rx1, ry1 = (float(v) for v in r["region"].split(","))
            if rx0 <= x0 and ry0 <= y0 and x1 <= rx1 and y1 <= ry1:
                hits.append(r)
    summary = [(r["kind"], r["word"], r["method"], round(r["score"], 3), r["region"], r["confirmed"])
               for r in rows if r["sample_id"] is None]
    print("planted dataset-level flags:", summary)
    assert hits, f"no clever_hans flag on 'circle' covering the cue {cue_region(ss)}; dataset flags: {summary}"
    assert any(r["confirmed"] is True for r in hits), summary
    cue_ids, _ = _cue_ids(ds_dir)
    for r in hits:
        ev = json.loads(r["evidence_json"])
        cf = ev["counterfactual"]
        print(r["method"], "members", ev["n_sample_ids"], "with cue", len(set(ev["sample_ids"]) & cue_ids),
              "cf", {k: cf[k] for k in ("n_tested", "persist", "persist_both", "vanish", "vanish_control")})
        assert ev["n_sample_ids"] >= 5
        assert r["threshold"] == pytest.approx(ev["settings"]["cluster_enrichment_min"] * ev["window_area_share"])
        assert cf["n_tested"] >= 3 and cf["examples"][0]["answers"]["original"]


def test_clean_model_raises_no_dataset_flag(clean) -> None:
    _, _, rows = clean
    dataset = [(r["kind"], r["word"], r["method"], round(r["score"], 3), r["region"], r["confirmed"])
               for r in rows if r["sample_id"] is None]
    print("clean dataset-level flags:", dataset)
    assert dataset == []


def _prf(rows: list[dict], kind: str, method: str, truth: set[str], universe: set[str]) -> dict[str, float]:
    pred = {r["sample_id"] for r in rows if r["kind"] == kind and r["method"] == method}
    tp, fp = len(pred & truth), len(pred - truth)
    return {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / len(truth) if truth else 0.0,
            "fpr": fp / max(len(universe - truth), 1), "flagged_share": len(pred) / len(universe)}


def test_sample_flags_precision_recall(planted, clean, heldout) -> None:
    ds_dir, _ = heldout
    cue_ids, universe = _cue_ids(ds_dir)
    report = {}
    for kind in ("suspect_region", "off_object", "border_hotspot"):
        for method in METHODS:
            report[f"{kind}/{method}"] = {"planted": _prf(planted[2], kind, method, cue_ids, universe),
                                          "clean": _prf(clean[2], kind, method, cue_ids, universe)}
    print("sample flags vs cue-carrying samples:", json.dumps(report, indent=1))
    got = report["/".join(DETECTOR)]
    # The issue's bar: precision and recall >= 0.9 against the cue-carrying samples. Reached by
    # joining the saliency rule with each sample's own counterfactual (the word vanishes when
    # only the region is erased); the saliency rule alone reached recall 0.87 here.
    assert got["planted"]["precision"] >= 0.9 and got["planted"]["recall"] >= 0.9, got
    assert got["clean"]["flagged_share"] == 0.0, got  # the clean model has no dataset flag to reach samples from


def test_per_sample_counterfactual_confirms_the_reached_samples(planted, heldout) -> None:
    ds_dir, _ = heldout
    cue_ids, _ = _cue_ids(ds_dir)
    _, _, rows = planted
    reached = [r for r in rows if r["kind"] == "suspect_region" and r["method"] == DETECTOR[1]]
    confirmed = {r["sample_id"] for r in reached if r["confirmed"] is True}
    by_saliency = {r["sample_id"] for r in reached if r["score"] >= r["threshold"]}
    print(f"suspect_region: {len(reached)} rows; confirmed by their own counterfactual {len(confirmed)}, "
          f"by saliency {len(by_saliency)}, cue samples {len(cue_ids)}")
    assert confirmed and confirmed <= cue_ids  # the word never vanished without the region in a cue-free sample
    for r in reached:
        ev = json.loads(r["evidence_json"])
        assert ev["reached_by"], ev
        if r["confirmed"] is not None:
            cf = ev["counterfactual"]
            assert "circle" in cf["answer"].split() and ("circle" not in cf["answer_without_region"].split()) == r["confirmed"]


def _off_centre_dataset(root: Path, n_keep: int = 40) -> Path:
    """Synthetic samples whose every object has < 30% of its pixels in the central box
    (the middle half of each side), and no cue."""
    from diffcam.storage.synthetic_writer import write_synthetic_dataset

    ss = SynthSettings()
    n_gen = 400
    samples = list(make_samples(n_gen, 7, ss))
    centre = np.zeros((64, 64), dtype=bool)
    centre[16:48, 16:48] = True
    keep = [i for i, s in enumerate(samples) if all((o.mask & centre).sum() < 0.3 * o.mask.sum() for o in s.objects)]
    assert len(keep) >= n_keep, len(keep)
    keep = keep[:n_keep]
    ds = write_synthetic_dataset(root, n_gen, 7, ss)
    lines = (ds / "manifest.jsonl").read_text().splitlines()
    (ds / "manifest.jsonl").write_text("\n".join(lines[i] for i in keep) + "\n")
    return ds


def test_clean_model_on_off_centre_objects_is_not_centre_biased(tmp_path: Path) -> None:
    """The positive case (centre-sitting maps on off-centre objects → flagged) is
    tests/test_bias.py::test_centre_bias_flagged_for_centre_maps_on_off_centre_objects."""
    ds = _off_centre_dataset(tmp_path / "offc")
    # the discovery scan (on in the clean fixture above) proposes no centre flag: off here (~1 min)
    _, _, rows = _audit(tmp_path, _require(CLEAN), ds, BiasSettings(scan_max_samples=0))
    flags = [(r["kind"], r["word"], r["method"], round(r["score"], 3)) for r in rows if r["sample_id"] is None]
    print("clean model, off-centre objects:", flags)
    assert not [f for f in flags if f[0] == "centre_bias"], flags
