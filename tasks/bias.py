"""The bias audit as a task: sample flags, dataset-level flags, counterfactuals, report section.

Thin layer over the pure `diffcam_core.bias_*` modules (docs/BIAS.md): load → call → write.

- `sample_flag_rows` / `sample_flag_rows_from_explanation`: the per-sample flags of one
  audited sample, as ``flags`` rows. For the worker (the lead wires it into
  `tasks.worker.CamWorker.process_one` next to `token_map_rows`).
- `run_dataset_flags(store, run_id, model_dir, dataset_path, settings)`: after all shards.
  Reads the run's ``token_maps`` (maps dequantised with `storage.schemas.dequantize_map`)
  and ``samples``, re-reads the object masks from the dataset manifest (the tables keep
  mask statistics, not masks), runs `diffcam_core.bias_dataset.analyse_word` /
  `dataset_flags` per (content word, method), and confirms or refutes every
  ``clever_hans`` flag by a counterfactual: the suspect region and/or the word's objects
  are erased (`erase_region` / `erase_mask`: inpainted with the local background) and
  the model re-generates (`adapter.prepare` + `adapter.generate` with the run's own
  generation settings). A refuted suspect is not raised (``keep_refuted``); every kept
  one adds `suspect_region` sample flags (the occurrences of the word its region
  reaches). Also computes the other sample-level flags from the stored maps when the run
  has none yet (``sample_level="auto"``: a worker that already wrote them wins, so no
  flag id is ever written twice).
- `write_dataset_flags(store, run_id, rows)`: commits the rows as shard ``"dataset"``
  (atomic; a second call for the same run is a no-op returning False).
- `bias_section(ctx)` / `BIAS_SECTION`: a `storage.report.Section` ("Bias audit"):
  flags by word, dataset-level flags with their evidence, cluster prototypes and mean
  maps as images, counterfactual before/after examples (re-drawn from the dataset images
  and the evidence; no model is run), top sample-level flags.
- `audit_in_process(...)`: the audit without Ray/Prefect (`CamWorker` called in-process),
  for benchmarks and tests on a laptop. Not the production path (that is flows/audit.py).

Counterfactual rule (per `clever_hans` flag; over up to ``cf_max_samples`` members with
the largest share of their map in the region, whose original answer contains the word):
  persist       = P(word | object erased, region kept)
  persist_both  = P(word | object and region erased)
  vanish        = P(no word | region erased)
  vanish_ctrl   = P(no word | a same-size off-object box elsewhere erased)
  confirmed  ⇔  persist − persist_both ≥ cf_confirm_min  or  vanish − vanish_ctrl ≥ cf_confirm_min.
"The word persists without its object (and only while the region is there)", or "the word
vanishes when only the region is erased (and not when any other patch is)". Both
differences are controls: a model that says the word whatever you erase confirms nothing.
"""

from __future__ import annotations

import html
import io
import json
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffcam_core.bias_dataset import WordSample, all_dataset_flags, analyse_word
from diffcam_core.bias_flags import SAMPLE_KINDS
from diffcam_core.bias_sample import region_sample_flags, sample_flags
from diffcam_core.bias_settings import BiasSettings
from diffcam_core.bias_windows import cell_coverage, window_cells, window_sums
from diffcam_core.inpaint import box_mask, erase_mask, erase_region
from diffcam_core.stats import map_stats
from storage.report import ReportContext, Section, SectionContent

__all__ = [
    "sample_flag_rows",
    "sample_flag_rows_from_explanation",
    "load_run_maps",
    "analyse_run",
    "run_dataset_flags",
    "write_dataset_flags",
    "counterfactual",
    "bias_section",
    "BIAS_SECTION",
    "audit_in_process",
]

DATASET_SHARD = "dataset"
_LOG: Callable[[str], None] = lambda msg: None  # noqa: E731


# --------------------------------------------------------------------------- sample level


def sample_flag_rows(
    run_id: str,
    sample_id: str,
    words: Sequence[tuple[int, str, Mapping[str, np.ndarray]]],
    word_masks: Sequence[np.ndarray | None],
    all_masks: Sequence[np.ndarray] = (),
    settings: BiasSettings = BiasSettings(),
    *,
    with_stats: bool = True,
) -> list[dict[str, Any]]:
    """``flags`` rows of one sample: `diffcam_core.bias_sample.sample_flags` for every word.

    ``words``: (word_index, word text, {method: (h, w) map}) per answer word;
    ``word_masks[i]``: the i-th word's object mask (None: no mask); ``all_masks``: every
    distinct object mask of the image. ``with_stats``: put `map_stats` (inside_frac,
    Obj-IoU) of masked words into the evidence.
    """
    if len(word_masks) != len(words):
        raise ValueError(f"{len(word_masks)} word masks for {len(words)} words")
    rows = []
    for (idx, text, maps), mask in zip(words, word_masks):
        used = {m: a for m, a in maps.items() if m in settings.sample_methods}
        st = ({m: map_stats(a, mask, settings.stats_settings) for m, a in used.items()}
              if with_stats and mask is not None else None)
        for f in sample_flags(used, mask, st, settings, sample_id=sample_id, word_index=idx, word=text,
                              all_masks=all_masks):
            rows.append({"run_id": run_id, **f})
    return rows


def sample_flag_rows_from_explanation(
    run_id: str,
    sample_id: str,
    explanation: Any,
    word_masks: Sequence[np.ndarray | None],
    all_masks: Sequence[np.ndarray] = (),
    settings: BiasSettings = BiasSettings(),
) -> list[dict[str, Any]]:
    """`sample_flag_rows` for a `diffcam_core.types.SampleExplanation` (the worker's call;
    ``word_masks`` as given to `tasks.rows.token_map_rows`)."""
    words = [(wm.word.index, wm.word.text, wm.maps) for wm in explanation.words]
    return sample_flag_rows(run_id, sample_id, words, word_masks, all_masks, settings)


# --------------------------------------------------------------------------- reading a run


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def load_run_maps(store: Any, run_id: str, methods: Sequence[str]) -> dict[str, Any]:
    """The run's maps and samples: ``{"samples": {sid: row}, "words": {sid: [(index, word,
    is_function)]}, "maps": {(sid, index, method): (h, w) float32}}``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from storage.schemas import dequantize_map

    tm = store.read_table("token_maps", run_id).select(
        ["sample_id", "word_index", "word", "is_function", "method", "grid_h", "grid_w", "map", "map_max"])
    sm = store.read_table("samples", run_id).select(["sample_id", "image_path", "answer", "prompt"])
    words: dict[str, dict[int, tuple[str, bool]]] = defaultdict(dict)
    for r in tm.select(["sample_id", "word_index", "word", "is_function"]).to_pylist():
        words[r["sample_id"]][r["word_index"]] = (r["word"], r["is_function"])
    sel = tm.filter(pc.is_in(tm.column("method"), value_set=pa.array(list(methods), type=pa.string())))
    maps = {}
    for r in sel.to_pylist():
        maps[(r["sample_id"], r["word_index"], r["method"])] = dequantize_map(
            r["map"], r["grid_h"], r["grid_w"], r["map_max"])
    return {
        "samples": {r["sample_id"]: r for r in sm.to_pylist()},
        "words": {sid: [(i, *ws[i]) for i in sorted(ws)] for sid, ws in words.items()},
        "maps": maps,
    }


def _object_masks(dataset: Any, sample_ids: Sequence[str]) -> dict[str, list[tuple[str, np.ndarray, str | None]]]:
    """(word, bool mask, mask path) per manifest object entry, for the samples of the run."""
    from storage.images import SampleError

    by_id = {s.sample_id: s for s in dataset.samples}
    out = {}
    for sid in sample_ids:
        s = by_id.get(sid)
        if s is None:
            raise ValueError(f"sample {sid!r} of the run is not in the dataset {dataset.uri}: wrong --dataset?")
        if not s.objects:
            out[sid] = []
            continue
        try:
            masks = s.object_masks(_image_size(s.image_path))
        except (SampleError, OSError) as e:
            raise ValueError(f"sample {sid}: masks cannot be read for the bias audit: {e}") from e
        paths = [None if p is None else str(p) for _, p in s.objects]
        out[sid] = [(w, m, p) for (w, m), p in zip(masks, paths)]
    return out


def analyse_run(
    run: Mapping[str, Any],
    objects: Mapping[str, list[tuple[str, np.ndarray, str | None]]],
    settings: BiasSettings,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    """Pure part of the dataset step: sample-level flags, per-(word, method) analyses and
    dataset-level flags (unconfirmed). Returns (sample_flags, grounding, analyses) where
    grounding[sid] = {"word_masks": [...], "all": [...]}; flags lack ``run_id``."""
    from tasks.rows import ground_words, normalise_word

    grounding: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, str], list[WordSample]] = defaultdict(list)
    sflags: list[dict[str, Any]] = []
    cov_cache: dict[tuple[int, tuple[int, int]], np.ndarray] = {}

    def cov(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        key = (id(mask), grid)
        if key not in cov_cache:
            cov_cache[key] = cell_coverage(mask, grid)
        return cov_cache[key]

    for sid in sorted(run["words"]):
        words = run["words"][sid]
        objs = objects.get(sid, [])
        idx = ground_words([w for _, w, _ in words], [w for w, _, _ in objs])
        word_masks = [None if k is None else objs[k][1] for k in idx]
        distinct = list({id(m): m for _, m, _ in objs}.values())
        grounding[sid] = {"word_masks": word_masks, "all": distinct, "objects": objs}
        for (wi, text, is_function), mask in zip(words, word_masks):
            maps = {m: run["maps"][(sid, wi, m)] for m in settings.sample_methods if (sid, wi, m) in run["maps"]}
            st = {m: map_stats(a, mask, settings.stats_settings) for m, a in maps.items()} if mask is not None else None
            sflags.extend(sample_flags(maps, mask, st, settings, sample_id=sid, word_index=wi, word=text,
                                       all_masks=distinct))
            if is_function:
                continue
            for method in settings.dataset_methods:
                a = run["maps"].get((sid, wi, method))
                if a is None:
                    continue
                grid = tuple(a.shape)
                any_cov = None
                if distinct:
                    any_cov = np.max([cov(m, grid) for m in distinct], axis=0)
                groups[(normalise_word(text), method)].append(WordSample(
                    sid, wi, a, None if mask is None else cov(mask, grid), any_cov))
    analyses = {key: analyse_word(key[0], key[1], items, settings) for key, items in sorted(groups.items())}
    return sflags, grounding, analyses


# --------------------------------------------------------------------------- counterfactual


def _words_of(text: str) -> set[str]:
    from tasks.rows import normalise_word

    return {normalise_word(w) for w in text.split()}


def _control_box(box: Sequence[float], grid: tuple[int, int], hotspot_size: float,
                 proto: np.ndarray, obj_cov: np.ndarray) -> tuple[float, float, float, float] | None:
    """A same-size window off every object and off the suspect region where the cluster
    prototype has the least mass (ties: first row-major): the control erasure."""
    win = window_cells(grid, hotspot_size)
    h, w = grid
    sums = window_sums(proto, win)
    ok = window_sums((obj_cov > 0).astype(float), win) == 0
    r0, c0 = int(round(box[1] * h)), int(round(box[0] * w))
    rr, cc = np.meshgrid(np.arange(sums.shape[0]), np.arange(sums.shape[1]), indexing="ij")
    ok &= (np.abs(rr - r0) >= win[0]) | (np.abs(cc - c0) >= win[1])
    if not ok.any():
        return None
    idx = int(np.argmin(np.where(ok, sums, np.inf)))
    r, c = divmod(idx, sums.shape[1])
    return (c / w, r / h, (c + win[1]) / w, (r + win[0]) / h)


def counterfactual(
    adapter: Any,
    gen_settings: Any,
    flag: Mapping[str, Any],
    samples: Mapping[str, Mapping[str, Any]],
    images: Mapping[str, Path],
    objects: Mapping[str, list[tuple[str, np.ndarray, str | None]]],
    settings: BiasSettings,
) -> dict[str, Any]:
    """Run the counterfactual of one ``clever_hans`` flag (see the module docstring).

    Returns the evidence dict: rule, rates, confirmed, and per tested sample its answers
    under every condition, image path, mask paths and boxes (enough to redraw them)."""
    from PIL import Image

    from storage.images import load_image
    from tasks.rows import normalise_word

    ev = json.loads(flag["evidence_json"])
    word = normalise_word(flag["word"])
    box = tuple(float(v) for v in flag["region"].split(","))
    grid = tuple(ev["grid"])
    proto = np.asarray(ev["prototype"], dtype=np.float64)
    tested = []
    t0 = time.perf_counter()
    n_gen = 0
    for sid in ev["sample_ids"]:
        if len(tested) >= settings.cf_max_samples:
            break
        objs = objects.get(sid, [])
        word_objs = [(m, p) for w, m, p in objs if normalise_word(w) == word]
        if not word_objs:
            continue
        img = np.asarray(load_image(images[sid]))
        H, W = img.shape[:2]
        region = box_mask((H, W), box)
        wmask = np.logical_or.reduce([m for m, _ in word_objs])
        others = np.zeros((H, W), dtype=bool)
        for w_, m, _ in objs:
            if normalise_word(w_) != word:
                others |= m
        all_obj = wmask | others
        ring = {"ring_fraction": settings.cf_ring_fraction}
        ctrl = _control_box(box, grid, settings.hotspot_size, proto, cell_coverage(all_obj, grid))
        variants = {
            "original": img,
            "no_object": erase_mask(img, wmask, exclude=others | region, **ring),
            "no_region": erase_region(img, box, exclude=all_obj, **ring),
        }
        variants["no_both"] = erase_region(variants["no_object"], box, exclude=all_obj, **ring)
        if ctrl is not None:
            variants["control"] = erase_region(img, ctrl, exclude=all_obj | region, **ring)
        answers = {}
        for name, arr in variants.items():
            inputs = adapter.prepare(Image.fromarray(arr), samples[sid]["prompt"])
            answers[name] = adapter.generate(inputs, gen_settings).text
            n_gen += 1
            if name == "original" and word not in _words_of(answers[name]):
                break  # the word must be in the answer to ask whether it persists or vanishes
        if word not in _words_of(answers["original"]):
            continue
        tested.append({
            "sample_id": sid, "image_path": str(images[sid]), "prompt": samples[sid]["prompt"],
            "mask_paths": sorted({p for _, p in word_objs if p is not None}),
            "other_mask_paths": sorted({p for w_, _, p in objs if normalise_word(w_) != word and p is not None}),
            "control_region": None if ctrl is None else [round(v, 6) for v in ctrl],
            "answers": answers,
            "word_present": {k: word in _words_of(v) for k, v in answers.items()},
        })

    def rate(cond: str, present: bool) -> float | None:
        vals = [t["word_present"][cond] == present for t in tested if cond in t["word_present"]]
        return float(np.mean(vals)) if vals else None

    persist, persist_both = rate("no_object", True), rate("no_both", True)
    vanish, vanish_ctrl = rate("no_region", False), rate("control", False)
    d_persist = None if persist is None else persist - (persist_both or 0.0)
    d_vanish = None if vanish is None else vanish - (vanish_ctrl or 0.0)
    t = settings.cf_confirm_min
    confirmed = bool(tested) and ((d_persist or 0.0) >= t or (d_vanish or 0.0) >= t)
    why = []
    if d_persist is not None and d_persist >= t:
        why.append("persists without its object, only while the region is there")
    if d_vanish is not None and d_vanish >= t:
        why.append("vanishes when only the region is erased")
    return {
        "rule": "confirmed iff persist - persist_both >= cf_confirm_min or vanish - vanish_control >= cf_confirm_min",
        "cf_confirm_min": t, "n_tested": len(tested), "n_generations": n_gen,
        "seconds": round(time.perf_counter() - t0, 3),
        "persist": persist, "persist_both": persist_both, "vanish": vanish, "vanish_control": vanish_ctrl,
        "persist_minus_both": d_persist, "vanish_minus_control": d_vanish,
        "confirmed": confirmed, "why": why, "region": list(box), "word": word, "examples": tested,
    }


def region_counterfactuals(
    adapter: Any,
    gen_settings: Any,
    flag: Mapping[str, Any],
    samples: Mapping[str, Mapping[str, Any]],
    images: Mapping[str, Path],
    objects: Mapping[str, list[tuple[str, np.ndarray, str | None]]],
    settings: BiasSettings,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Test one kept ``clever_hans`` flag on every sample whose answer has its word.

    The dataset-level `counterfactual` tests a few cluster members to decide the flag;
    this asks each sample the flag could concern (up to ``region_cf_max_samples``, in
    sample-id order): regenerate the original image, the image with only the region
    erased (object pixels excluded, as the dataset-level "no_region" variant) and, as a
    control, the image with a same-size off-object window erased instead (the dataset
    flag's `_control_box`, chosen per sample so it avoids that sample's objects). The word
    *vanished* (the sample depends on the region) when it is in the first answer, not in
    the second, and still in the control's: a model that drops the word whatever patch is
    erased shows no dependence on this region. Samples whose answer lacks the word are not
    tested (nothing can vanish). Returns ({sample_id: test}, summary);
    `diffcam_core.bias_sample.region_sample_flags` turns the tests into flags.
    """
    from PIL import Image

    from storage.images import load_image
    from tasks.rows import normalise_word

    word = normalise_word(flag["word"])
    box = tuple(float(v) for v in flag["region"].split(","))
    ev = json.loads(flag["evidence_json"])
    grid = tuple(ev["grid"]) if ev.get("grid") else None
    proto = np.asarray(ev["prototype"], dtype=np.float64) if ev.get("prototype") is not None else None
    candidates = sorted(sid for sid, s in samples.items() if word in _words_of(s.get("answer") or ""))
    todo = candidates[: settings.region_cf_max_samples]
    tests: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    n_gen = 0
    ring = settings.cf_ring_fraction
    for sid in todo:
        img = np.asarray(load_image(images[sid]))
        all_obj = np.zeros(img.shape[:2], dtype=bool)
        for _, m, _ in objects.get(sid, []):
            all_obj |= m
        ctrl = None
        if grid is not None and proto is not None:
            ctrl = _control_box(box, grid, settings.hotspot_size, proto, cell_coverage(all_obj, grid))
        variants = [("original", img), ("no_region", erase_region(img, box, exclude=all_obj, ring_fraction=ring))]
        if ctrl is not None:
            region = box_mask(img.shape[:2], box)
            variants.append(("control", erase_region(img, ctrl, exclude=all_obj | region, ring_fraction=ring)))
        answers = {}
        for name, arr in variants:
            answers[name] = adapter.generate(adapter.prepare(Image.fromarray(arr), samples[sid]["prompt"]),
                                             gen_settings).text
            n_gen += 1
            if name == "original" and word not in _words_of(answers[name]):
                break
        present = {k: word in _words_of(v) for k, v in answers.items()}
        if not present["original"]:
            continue  # the regenerated answer lost the word: nothing to ask (recorded in the summary)
        vanished_control = None if "control" not in present else not present["control"]
        tests[sid] = {"answer": answers["original"], "answer_without_region": answers["no_region"],
                      "answer_without_control": answers.get("control"),
                      "control_region": None if ctrl is None else [round(v, 6) for v in ctrl],
                      "vanished_region": not present["no_region"], "vanished_control": vanished_control,
                      "vanished": (not present["no_region"]) and not vanished_control}
    summary = {"word": word, "region": list(box), "n_candidates": len(candidates), "n_tested": len(tests),
               "n_not_reproduced": len(todo) - len(tests), "n_capped": len(candidates) - len(todo),
               "n_vanished": sum(t["vanished"] for t in tests.values()),
               "n_vanished_region": sum(t["vanished_region"] for t in tests.values()),
               "n_vanished_control": sum(bool(t["vanished_control"]) for t in tests.values()),
               "n_generations": n_gen, "seconds": round(time.perf_counter() - t0, 3)}
    return tests, summary


# --------------------------------------------------------------------------- the dataset step


def _existing_sample_flags(store: Any, run_id: str) -> int:
    t = store.read_table("flags", run_id)
    if t.num_rows == 0:
        return 0
    return sum(1 for sid in t.column("sample_id").to_pylist() if sid is not None)


def run_dataset_flags(
    store: Any,
    run_id: str,
    model_dir: str | Path | None,
    dataset_path: str | Path | None = None,
    settings: BiasSettings = BiasSettings(),
    *,
    sample_level: str = "auto",
    device: str = "cpu",
    adapter: Any = None,
    log: Callable[[str], None] | None = None,
    info: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The dataset-level bias step of one run (= one checkpoint); returns ``flags`` rows.

    ``dataset_path``: the dataset folder or manifest (None: the run's ``dataset_uri``).
    ``model_dir`` (or a loaded ``adapter``): for the counterfactuals; None and no adapter:
    ``clever_hans`` flags keep ``confirmed`` None and their evidence says why.
    ``sample_level``: "auto" (compute sample flags from the stored maps unless the run
    already has sample-level flags), "always", "never"; `suspect_region` sample flags
    (the samples a kept `clever_hans` flag reaches) are always added. A `clever_hans`
    suspect that the counterfactual refutes is dropped unless ``settings.keep_refuted``
    (then it stays with ``confirmed`` false). ``info`` (optional dict) gets ``read_s``,
    ``analyse_s``, ``counterfactual_s``, ``n_samples``, ``n_dataset_flags``,
    ``n_sample_flags`` and ``refuted`` (word, method, region, score of each refuted suspect).
    """
    from diffcam_core.settings import CamSettings
    from storage.datasets import load_dataset

    log = log or _LOG
    if sample_level not in ("auto", "always", "never"):
        raise ValueError(f"sample_level must be auto|always|never, got {sample_level!r}")
    tm: dict[str, Any] = {} if info is None else info
    t0 = time.perf_counter()
    run_row = store.read_run(run_id)
    if dataset_path is None:
        uri = run_row["dataset_uri"]
        dataset_path = Path(uri.removeprefix("file://")) if uri.startswith("file://") else Path(uri)
    ds = load_dataset(dataset_path)
    methods = sorted(set(settings.sample_methods) | set(settings.dataset_methods))
    run = load_run_maps(store, run_id, methods)
    objects = _object_masks(ds, sorted(run["words"]))
    tm["read_s"] = time.perf_counter() - t0
    tm["n_samples"] = len(run["words"])

    t1 = time.perf_counter()
    sflags, grounding, analyses = analyse_run(run, objects, settings)
    dflags = all_dataset_flags(analyses, settings)
    tm["analyse_s"] = time.perf_counter() - t1
    log(f"bias: {len(run['words'])} samples, {len(analyses)} (word, method) groups, "
        f"{len(sflags)} sample flags, {len(dflags)} dataset flags before confirmation")

    t2 = time.perf_counter()
    suspects = [f for f in dflags if f["kind"] == "clever_hans"]
    if suspects:
        if adapter is None and model_dir is not None:
            from diffcam_core.models.base import load_adapter

            adapter = load_adapter(model_dir, device=device)
        config = json.loads(run_row["config_json"] or "{}")
        cam = CamSettings.from_dict({k: v for k, v in config.items() if k != "audit"}) if config else CamSettings()
        by_id = {s.sample_id: s for s in ds.samples}
        images = {sid: by_id[sid].image_path for sid in run["words"]}
        def rank(f: Mapping[str, Any]) -> float:
            ev = json.loads(f["evidence_json"])
            return -float(f["score"]) * float(ev.get("specificity") or 1.0) * float(ev.get("consistency") or 1.0)

        tested = {id(f) for f in sorted(suspects, key=rank)[: settings.cf_max_candidates]}
        for f in suspects:
            ev = json.loads(f["evidence_json"])
            if adapter is None:
                ev["counterfactual"] = {"confirmed": None, "why": ["not run: no model given"]}
            elif id(f) not in tested:
                ev["counterfactual"] = {"confirmed": None, "why": [
                    f"not run: more than cf_max_candidates={settings.cf_max_candidates} suspects; "
                    "this one ranked lower (score x specificity x consistency)"]}
            else:
                cf = counterfactual(adapter, cam.generation, f, run["samples"], images, objects, settings)
                ev["counterfactual"] = cf
                f["confirmed"] = cf["confirmed"]
                log(f"bias: clever_hans {f['word']}/{f['method']} region {f['region']}: "
                    f"confirmed={cf['confirmed']} ({cf['n_tested']} samples, {cf['why']})")
            f["evidence_json"] = json.dumps(ev, sort_keys=True, ensure_ascii=False, allow_nan=False)
    tm["counterfactual_s"] = time.perf_counter() - t2

    refuted = [f for f in dflags if f["kind"] == "clever_hans" and f["confirmed"] is False]
    tm["refuted"] = [{k: f[k] for k in ("word", "method", "region", "score")} for f in refuted]
    if refuted and not settings.keep_refuted:
        log(f"bias: {len(refuted)} clever_hans suspect(s) refuted by the counterfactual, not raised "
            "(BiasSettings.keep_refuted=True keeps them with confirmed=false)")
        dflags = [f for f in dflags if not (f["kind"] == "clever_hans" and f["confirmed"] is False)]
    t3 = time.perf_counter()
    per_sample: dict[tuple[str, str], tuple[dict, dict]] = {}  # (word, region) -> tests: methods share them
    for f in dflags:  # the samples each kept clever_hans flag reaches
        if f["kind"] == "clever_hans" and f["confirmed"] is not False:
            tests = None
            if adapter is not None and settings.region_cf_max_samples > 0:
                key = (f["word"], f["region"])
                if key not in per_sample:
                    per_sample[key] = region_counterfactuals(adapter, cam.generation, f, run["samples"], images,
                                                             objects, settings)
                tests, summary = per_sample[key]
                ev = json.loads(f["evidence_json"])
                ev["sample_counterfactuals"] = summary
                f["evidence_json"] = json.dumps(ev, sort_keys=True, ensure_ascii=False, allow_nan=False)
                log(f"bias: clever_hans {f['word']}/{f['method']}: {summary['n_tested']} samples tested one by "
                    f"one, the word vanished in {summary['n_vanished']} without the region")
            sflags.extend(region_sample_flags(f, analyses[(f["word"], f["method"])], settings, tests))
    tm["sample_counterfactual_s"] = time.perf_counter() - t3

    settings_json = settings.to_dict()
    rows = []
    for f in dflags:
        ev = json.loads(f["evidence_json"])
        ev["settings"] = settings_json
        rows.append({"run_id": run_id, **f, "evidence_json": json.dumps(ev, sort_keys=True, allow_nan=False)})
    worker_flags = _existing_sample_flags(store, run_id) if sample_level == "auto" else 0
    for f in sflags:
        if f["kind"] == "suspect_region" or sample_level == "always" or (sample_level == "auto" and worker_flags == 0):
            rows.append({"run_id": run_id, **f})
    tm["n_dataset_flags"] = len(dflags)
    tm["n_sample_flags"] = len(rows) - len(dflags)
    return rows


def write_dataset_flags(store: Any, run_id: str, rows: Sequence[Mapping[str, Any]]) -> bool:
    """Commit ``rows`` as the run's ``dataset`` shard of ``flags`` (atomic). False when
    the run already has a dataset shard (nothing written: a re-run never duplicates)."""
    from storage.schemas import table_from_rows

    return store.commit_shard(run_id, DATASET_SHARD, {"flags": table_from_rows("flags", list(rows))})


# --------------------------------------------------------------------------- in-process audit


def audit_in_process(
    store: Any,
    run_id: str,
    model_dir: str | Path,
    dataset_path: str | Path,
    cam_settings: Any = None,
    *,
    shard_size: int = 16,
    threads: int = 1,
    device: str = "cpu",
    limit: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Audit ``dataset_path`` with ``model_dir`` into ``store`` without Ray or Prefect:
    one `tasks.worker.CamWorker` called in-process, shards committed with `Store`.
    For benchmarks and tests; returns timings. The run row is written (status
    ``succeeded`` at the end); an existing run id raises (use a new one)."""
    from datetime import datetime, timezone

    from diffcam_core.settings import CamSettings
    from storage.datasets import load_dataset
    from storage.schemas import table_from_rows
    from tasks.plan import plan_shards
    from tasks.worker import CamWorker

    log = log or _LOG
    cam = cam_settings or CamSettings()
    ds = load_dataset(dataset_path)
    shards = plan_shards(ds.samples, shard_size=shard_size, limit=limit, root=ds.root)
    n = sum(len(s) for s in shards)
    config = {**cam.to_dict(), "audit": {"shard_size": shard_size, "limit": limit, "in_process": True}}
    store.write_run({
        "run_id": run_id, "model_uri": Path(model_dir).resolve().as_uri(), "model_hash": "in-process",
        "dataset_uri": ds.uri, "dataset_hash": ds.content_hash, "config_json": json.dumps(config, sort_keys=True),
        "code_version": "in-process", "started_at": datetime.now(timezone.utc), "status": "running",
        "n_samples": n, "n_shards": len(shards), "trigger": "manual",
    })
    t0 = time.perf_counter()
    worker = CamWorker(str(model_dir), cam.to_dict(), threads=threads, device=device)
    t1 = time.perf_counter()
    n_ok = n_fail = 0
    for shard in shards:
        items = [{**it, "run_id": run_id, "shard_id": shard.shard_id} for it in shard.items]
        results = worker.process(items)
        samples = [r["samples"] for r in results if r["samples"] is not None]
        maps = [row for r in results for row in r["token_maps"]]
        fails = [r["failures"] for r in results if r["failures"] is not None]
        fails += [{**f, "run_id": run_id} for f in shard.failures]
        n_ok += len(samples)
        n_fail += len(fails)
        store.commit_shard(run_id, shard.shard_id, {
            "samples": table_from_rows("samples", samples), "token_maps": table_from_rows("token_maps", maps),
            "failures": table_from_rows("failures", fails)})
        log(f"shard {shard.shard_id}: {len(samples)} ok, {len(fails)} failed ({time.perf_counter() - t1:.0f} s)")
    store.update_run(run_id, status="succeeded", finished_at=datetime.now(timezone.utc), n_results=n_ok,
                     n_failures=n_fail)
    return {"load_s": t1 - t0, "explain_s": time.perf_counter() - t1, "n_ok": n_ok, "n_failures": n_fail}


# --------------------------------------------------------------------------- report section

_MAX_SAMPLE_FLAG_ROWS = 30
_MAX_CF_EXAMPLES = 3
_PX = 144


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    import base64

    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(alt)}">'


def _heat_png(grid_values: Sequence[Sequence[float]], box: Sequence[float] | None = None,
              base: np.ndarray | None = None) -> bytes:
    """A (h, w) map drawn with ``jet`` at _PX px (nearest: one block per cell, the map as
    stored), blended on ``base`` when given, ``box`` (normalised) outlined in white."""
    from PIL import Image

    from storage.report import heat_colors

    a = np.asarray(grid_values, dtype=np.float64)
    mx = float(a.max()) if a.size else 0.0
    u = a / mx if mx > 0 else a
    rgb = heat_colors(u)
    im = Image.fromarray(rgb).resize((_PX, _PX), Image.Resampling.NEAREST)
    if base is not None:
        b = Image.fromarray(np.asarray(base, dtype=np.uint8)).convert("RGB").resize((_PX, _PX), Image.Resampling.NEAREST)
        im = Image.blend(b, im, 0.5)
    out = np.asarray(im).copy()
    if box is not None:
        _outline(out, box)
    return _png(out)


def _outline(arr: np.ndarray, box: Sequence[float], color: tuple[int, int, int] = (255, 255, 255)) -> None:
    H, W = arr.shape[:2]
    x0, y0 = int(round(box[0] * W)), int(round(box[1] * H))
    x1, y1 = max(x0 + 1, int(round(box[2] * W))) - 1, max(y0 + 1, int(round(box[3] * H))) - 1
    x1, y1 = min(x1, W - 1), min(y1, H - 1)
    arr[y0, x0:x1 + 1] = color
    arr[y1, x0:x1 + 1] = color
    arr[y0:y1 + 1, x0] = color
    arr[y0:y1 + 1, x1] = color


def _image_png(arr: np.ndarray, box: Sequence[float] | None = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("RGB").resize((_PX, _PX), Image.Resampling.NEAREST)
    out = np.asarray(im).copy()
    if box is not None:
        _outline(out, box, (255, 255, 0))
    return _png(out)


def _cf_images(ex: Mapping[str, Any], region: Sequence[float], ring_fraction: float) -> dict[str, bytes]:
    """Redraw a counterfactual example's images from the dataset files and the evidence."""
    from storage.images import load_image, load_mask

    img = np.asarray(load_image(ex["image_path"]))
    H, W = img.shape[:2]
    size = (W, H)
    wmask = np.zeros((H, W), dtype=bool)
    for p in ex["mask_paths"]:
        wmask |= load_mask(p, size)
    others = np.zeros((H, W), dtype=bool)
    for p in ex.get("other_mask_paths", []):
        others |= load_mask(p, size)
    reg = box_mask((H, W), region)
    no_obj = erase_mask(img, wmask, exclude=others | reg, ring_fraction=ring_fraction)
    out = {
        "original": _image_png(img, region),
        "no_region": _image_png(erase_region(img, region, exclude=wmask | others, ring_fraction=ring_fraction)),
        "no_object": _image_png(no_obj, region),
    }
    return out


def _table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        return "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows])


_MEAN_MAP_METHODS = ("diffusion-cam", "token-gradnorm", "token-gradxinput")
_MAX_MEAN_MAP_WORDS = 24


def _word_mean_maps(ctx: ReportContext) -> str:
    """A table of mean maps (mass distributions averaged over the run), one row per content
    word, one column per audited map method; dataset-level flag regions are outlined."""
    from storage.schemas import dequantize_map
    from tasks.rows import normalise_word

    rows = ctx.con.execute(
        "SELECT word, method, grid_h, grid_w, map, map_max FROM token_maps "
        "WHERE run_id = $run_id AND NOT is_function AND list_contains($methods, method) AND map_max > 0",
        {"run_id": ctx.run_id, "methods": list(_MEAN_MAP_METHODS)},
    ).fetchall()
    if not rows:
        return ""
    acc: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    for word, method, h, w, data, mx in rows:
        m = dequantize_map(data, h, w, mx).astype(np.float64)
        if m.sum() > 0:
            acc[(normalise_word(word), method)].append(m / m.sum())
    regions = dict(((w, m), [float(v) for v in r.split(",")]) for w, m, r in ctx.con.execute(
        "SELECT word, method, region FROM flags WHERE run_id = $run_id AND sample_id IS NULL AND region IS NOT NULL",
        {"run_id": ctx.run_id}).fetchall())
    methods = [m for m in _MEAN_MAP_METHODS if any(k[1] == m for k in acc)]
    words = sorted({k[0] for k in acc}, key=lambda w: -sum(len(v) for k, v in acc.items() if k[0] == w))
    words = sorted(words[:_MAX_MEAN_MAP_WORDS])
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    body = []
    for w in words:
        cells = []
        for m in methods:
            got = acc.get((w, m), [])
            maps = [a for a in got if a.shape == got[0].shape] if got else []
            if not maps:
                cells.append("<td>–</td>")
                continue
            png = _heat_png(np.mean(maps, axis=0), regions.get((w, m)))
            cells.append(f"<td>{_img(png, f'{w} {m}')}<br>n={len(maps)}</td>")
        body.append(f"<tr><th>{html.escape(w)}</th>{''.join(cells)}</tr>")
    return ("<h3>Mean map per word</h3><p>Each map divided by its sum, averaged over the run (a word's "
            "typical saliency); the region of a dataset-level flag is outlined.</p>"
            f"<table><thead><tr><th>word</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _flag_method_faithfulness(ctx: ReportContext, methods: Sequence[str]) -> str | None:
    """How faithful the maps the flags were raised on are, measured in this same run."""
    from storage.queries import run_query

    rows = run_query(ctx.con, "faithfulness_table", run_id=ctx.run_id).to_pylist()
    ranked = [r for r in rows if r["vanish_rate"] is not None]
    if not ranked or not methods:
        return None
    parts = []
    for m in methods:
        pos = next((i for i, r in enumerate(ranked) if r["method"] == m), None)
        if pos is None:
            parts.append(f"{m}: not measured")
            continue
        r = ranked[pos]
        auc = "–" if r["deletion_auc"] is None else f"{r['deletion_auc']:.3f}"
        parts.append(f"{m}: vanish rate {r['vanish_rate']:.2f} (rank {pos + 1} of {len(ranked)} maps), "
                     f"deletion AUC {auc}")
    return ("Faithfulness of the maps these flags were raised on, measured in this run (see the Faithfulness "
            "section): " + "; ".join(parts) + ".")


def bias_section(ctx: ReportContext) -> SectionContent:
    """The "Bias audit" report section (`storage.report.Section` builder).

    Everything shown comes from the ``flags`` table (scores, thresholds, regions and the
    evidence JSON) and the dataset files the evidence names; nothing is re-run."""
    rows = ctx.con.execute(
        "SELECT flag_id, kind, sample_id, word_index, word, method, score, threshold, confirmed, region, evidence_json "
        "FROM flags WHERE run_id = $run_id ORDER BY score DESC, kind, flag_id", {"run_id": ctx.run_id},
    ).fetchall()
    cols = ["flag_id", "kind", "sample_id", "word_index", "word", "method", "score", "threshold", "confirmed",
            "region", "evidence_json"]
    flags = [dict(zip(cols, r)) for r in rows]
    dataset = [f for f in flags if f["sample_id"] is None]
    sample = [f for f in flags if f["sample_id"] is not None]
    parts: list[str] = []
    md: list[str] = []

    # flags by word
    counts: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for f in flags:
        counts[(f["word"] or "–", f["method"] or "–", "dataset" if f["sample_id"] is None else "sample", f["kind"])] += 1
    by_word = [{"word": k[0], "method": k[1], "level": k[2], "kind": k[3], "n_flags": v} for k, v in sorted(counts.items())]
    n_conf = sum(1 for f in dataset if f["confirmed"])
    verdict = (f"{len(dataset)} dataset-level flag(s) ({n_conf} confirmed by a counterfactual), "
               f"{len(sample)} sample-level flag(s).")
    parts.append(f"<p><b>{html.escape(verdict)}</b> Thresholds and their calibration: docs/BIAS.md; "
                 "every row's evidence_json holds the numbers it was decided on.</p>")
    md.append(verdict)
    faith = _flag_method_faithfulness(ctx, sorted({f["method"] for f in flags if f["method"]}))
    if faith:
        parts.append(f"<p>{html.escape(faith)}</p>")
        md.append(faith)
    if by_word:
        parts.append("<h3>Flags by word</h3>" + _table(by_word, ["word", "method", "level", "kind", "n_flags"]))
        md.append(_md(by_word, ["word", "method", "level", "kind", "n_flags"]))
    else:
        parts.append("<p>No flags: no map was off-object, on a border hot-spot, zero or flat, and no word was "
                     "centre-biased, object-independent or had a Clever-Hans cluster.</p>")

    # dataset-level flags
    for f in dataset:
        ev = json.loads(f["evidence_json"])
        head = (f"{f['kind']} · word “{f['word']}” · {f['method']} · score {f['score']:.4g} "
                f"(threshold {f['threshold']:.4g}) · region {f['region'] or '–'} · confirmed {f['confirmed']}")
        parts.append(f'<div class="card"><h4>{html.escape(head)}</h4><p>{html.escape(ev.get("meaning", ""))}; '
                     f'rule: <code>{html.escape(ev.get("rule", ""))}</code></p>')
        keys = ["n_maps", "n_masked", "cluster_size", "k", "region_share", "consistency", "rest_share",
                "other_words_share", "specificity", "object_overlap", "map_centre_frac", "mask_centre_frac",
                "map_centre_enrichment"]
        facts = [{"key": k, "value": ev[k]} for k in keys if k in ev]
        for sub in ("shuffle", "content_independence"):
            if isinstance(ev.get(sub), dict):
                facts += [{"key": f"{sub}.{k}", "value": v} for k, v in ev[sub].items()]
        parts.append(_table(facts, ["key", "value"]))
        figs = []
        box = [float(v) for v in f["region"].split(",")] if f["region"] else None
        for name in ("prototype", "mean_map", "mean_mask_map"):
            if ev.get(name) is not None:
                figs.append(f"<figure>{_img(_heat_png(ev[name], box if name != 'mean_mask_map' else None), name)}"
                            f"<figcaption>{html.escape(name.replace('_', ' '))}</figcaption></figure>")
        if figs:
            parts.append(f'<div class="figs">{"".join(figs)}</div>')
        ids = ev.get("sample_ids", [])
        parts.append(f"<p>samples ({ev.get('n_sample_ids', len(ids))}): {html.escape(', '.join(ids[:40]))}"
                     f"{' …' if len(ids) > 40 else ''}</p>")
        cf = ev.get("counterfactual")
        if cf:
            ctab = [{"quantity": k, "value": cf.get(k)} for k in
                    ("n_tested", "persist", "persist_both", "persist_minus_both", "vanish", "vanish_control",
                     "vanish_minus_control", "cf_confirm_min", "confirmed")]
            parts.append("<h4>Counterfactual</h4>" + _table(ctab, ["quantity", "value"])
                         + f"<p>{html.escape('; '.join(cf.get('why', [])) or 'not confirmed')}</p>")
            ring = ev.get("settings", {}).get("cf_ring_fraction", 0.05)
            for ex in cf.get("examples", [])[:_MAX_CF_EXAMPLES]:
                try:
                    pngs = _cf_images(ex, box, ring)
                except Exception as e:  # noqa: BLE001 - a missing file is shown, not hidden
                    parts.append(f'<p class="bad">{html.escape(ex["sample_id"])}: images not readable: '
                                 f'{html.escape(f"{type(e).__name__}: {e}")}</p>')
                    continue
                cap = {"original": "original", "no_region": "region erased", "no_object": "object erased"}
                figs = "".join(
                    f"<figure>{_img(pngs[k], k)}<figcaption>{html.escape(cap[k])}: "
                    f"“{html.escape(ex['answers'].get(k, '–'))}”</figcaption></figure>" for k in cap)
                parts.append(f'<div class="card"><h4>{html.escape(ex["sample_id"])} · “{html.escape(ex["prompt"])}”'
                             f'</h4><div class="figs">{figs}</div></div>')
        parts.append("</div>")
    if dataset:
        md.append(_md([{**f, "n": json.loads(f["evidence_json"]).get("n_sample_ids")} for f in dataset],
                      ["kind", "word", "method", "score", "threshold", "confirmed", "region", "n"]))

    # mean map per word and method (from token_maps; no masks needed)
    parts.append(_word_mean_maps(ctx))

    # top sample-level flags
    if sample:
        top = []
        for kind in SAMPLE_KINDS:
            ks = [f for f in sample if f["kind"] == kind][:_MAX_SAMPLE_FLAG_ROWS // len(SAMPLE_KINDS) + 1]
            for f in ks:
                ev = json.loads(f["evidence_json"])
                top.append({**f, "inside_share": ev.get("inside_share"), "inside_frac": ev.get("inside_frac")})
        parts.append("<h3>Sample-level flags (highest scores per kind)</h3>" + _table(
            top, ["kind", "sample_id", "word", "method", "score", "threshold", "region", "inside_share", "inside_frac"]))
    return SectionContent("".join(parts), "\n\n".join(md))


#: Register with ``build_report(..., sections=[*DEFAULT_SECTIONS, BIAS_SECTION])``.
BIAS_SECTION = Section("bias", "Bias audit", bias_section)
