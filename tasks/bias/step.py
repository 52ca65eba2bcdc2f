"""The bias step of an audit (docs/BIAS.md): sample flags, dataset-level flags, counterfactuals.

Thin layer over the pure `diffcam.core.bias` modules: load → call → write.

- `run_dataset_flags(store, run_id, model_dir, dataset_path, settings)`: after all shards.
  Reads the run back (`diffcam.tasks.bias.read`: the ``token_maps`` maps dequantised, the
  ``samples``, the object masks re-read from the dataset manifest), runs
  `diffcam.core.bias.dataset.analyse_word` / `dataset_flags` per (content word, method),
  adds the saliency-free discovery scan's suspects (`diffcam.tasks.bias.scan`),
  and confirms or refutes every ``clever_hans`` flag by a counterfactual
  (`diffcam.tasks.bias.counterfactual`). A refuted suspect is not raised (``keep_refuted``); every
  kept one adds `suspect_region` sample flags (the occurrences of the word its region
  reaches). Also computes the other sample-level flags from the stored maps (the
  worker writes none).
- `write_dataset_flags(store, run_id, rows)`: commits the rows as shard ``"dataset"``
  (atomic; a second call for the same run is a no-op returning False).

Flags travel as typed `diffcam.core.bias.flags.Flag` values; they become ``flags`` rows
(region and evidence as stored text) once, at the end of `run_dataset_flags`, through
`diffcam.storage.schemas.flag_row`.

The report section is `diffcam.tasks.bias.report.BIAS_SECTION`; the audit without Ray/Prefect is
`diffcam.evaluation.audit_in_process`.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from diffcam.core.bias.centre import CentreSample, run_centre_bias, run_centre_flags, run_naming_flag
from diffcam.core.bias.dataset import WordSample, all_dataset_flags, analyse_word
from diffcam.core.bias.faithful import REFERENCE, SPATIAL_KINDS, spatial_methods
from diffcam.core.bias.flags import REGION_KINDS, Flag, as_hallucinated_object
from diffcam.core.bias.sample import region_sample_flags, sample_flags
from diffcam.core.bias.settings import BiasSettings
from diffcam.core.bias.windows import cell_coverage
from diffcam.core.stats import map_stats
from diffcam.core.words import normalise_word
from diffcam.storage.schemas import flag_row
from diffcam.tasks.answers import Answerer, local_answerer
from diffcam.tasks.bias.counterfactual import counterfactual, region_counterfactuals
from diffcam.tasks.bias.read import load_run_maps, map_ranking, object_masks
from diffcam.tasks.bias.scan import flag_analysis, scan_suspects
from diffcam.tasks.scan import Scanner, local_scanner

__all__ = [
    "analyse_run",
    "run_dataset_flags",
    "write_dataset_flags",
]

DATASET_SHARD = "dataset"


def _quiet(msg: str) -> None:
    """The default log: says nothing."""


# --------------------------------------------------------------------------- analysis


def analyse_run(
    run: Mapping[str, Any],
    objects: Mapping[str, list[tuple[str, np.ndarray, str | None]]],
    settings: BiasSettings,
) -> tuple[list[Flag], dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    """Pure part of the dataset step: sample-level flags and per-(word, method) analyses
    (`all_dataset_flags` turns those into dataset-level flags). Returns (sample_flags,
    grounding, analyses) where grounding[sid] = {"word_masks": [...], "all": [...]}."""
    from diffcam.tasks.rows import ground_words

    grounding: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, str], list[WordSample]] = defaultdict(list)
    sflags: list[Flag] = []
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
            if is_function:  # "a", "and": no object to look at, so no claim about where the model looks
                continue
            maps = {m: run["maps"][(sid, wi, m)] for m in settings.sample_methods if (sid, wi, m) in run["maps"]}
            st = {m: map_stats(a, mask, settings.stats_settings) for m, a in maps.items()} if mask is not None else None
            sflags.extend(sample_flags(maps, mask, st, settings, sample_id=sid, word_index=wi, word=text,
                                       all_masks=distinct))
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


def late_refutations(dflags: Sequence[Flag], settings: BiasSettings) -> dict[str, Flag]:
    """Suspects the dataset-level counterfactual did not test (over ``cf_max_candidates``:
    ``confirmed`` None) whose per-sample counterfactuals tested at least
    ``region_cf_refute_min`` samples and found no dependence in any: refuted after all
    (``confirmed`` false), by flag id. An untested suspect is otherwise raised as a suspect;
    one that every sample's own erase test contradicts is not."""
    out = {}
    for f in dflags:
        s = f.evidence.get("sample_counterfactuals")
        if (f.kind in REGION_KINDS and f.confirmed is None and s and s["n_tested"] >= settings.region_cf_refute_min
                and s.get("n_shortcut", 0) + s.get("n_named_as_object", 0) == 0):
            out[f.flag_id] = replace(f, confirmed=False, evidence={
                **f.evidence, "refuted_by": f"per-sample counterfactuals: {s['n_tested']} samples tested, none "
                                            "depends on the region (no shortcut, no region named as an object)"})
    return out


def centre_samples(run: Mapping[str, Any], grounding: Mapping[str, Mapping[str, Any]],
                   settings: BiasSettings) -> list[CentreSample]:
    """The inputs of `diffcam.core.bias.centre.run_centre_bias`: per sample, the content
    words' maps of the dataset methods, each object's coverage and whether it is named."""
    out = []
    for sid in sorted(run["words"]):
        g = grounding.get(sid, {"word_masks": [], "all": []})
        maps: dict[str, list[np.ndarray]] = defaultdict(list)
        grid = None
        for (wi, _text, is_function) in run["words"][sid]:
            if is_function:
                continue
            for method in settings.dataset_methods:
                a = run["maps"].get((sid, wi, method))
                if a is not None:
                    maps[method].append(a)
                    grid = grid or tuple(a.shape)
        if grid is None:
            continue
        named_ids = {id(m) for m in g["word_masks"] if m is not None}
        out.append(CentreSample(sid, dict(maps), [cell_coverage(m, grid) for m in g["all"]],
                                [id(m) in named_ids for m in g["all"]]))
    return out


# --------------------------------------------------------------------------- the dataset step


def _spatial_flags_from_faithful_maps(sflags: list[Flag], store: Any, run_id: str, settings: BiasSettings,
                                      spatial_maps: str, tm: dict[str, Any], log: Callable[[str], None]) -> list[Flag]:
    """Keep a spatial sample flag only when its map beats `objectness` on this run's vanish test
    (`diffcam.core.bias.faithful`); each kept one records its map's faithfulness. ``spatial_maps``
    "all": every sample method (for runs without a faithfulness test, e.g. fabricated ones)."""
    if spatial_maps == "all":
        return sflags
    ranking = map_ranking(store, run_id)
    keep = spatial_methods(ranking, settings.sample_methods)
    ref = ranking.get(REFERENCE)
    tm["map_faithfulness"] = {m: f.evidence(ref) for m, f in sorted(ranking.items())}
    tm["spatial_methods"] = list(keep)
    dropped = Counter(f.method for f in sflags if f.kind in SPATIAL_KINDS and f.method not in keep)
    if dropped:
        why = ("this run measured no faithfulness for objectness" if ref is None or ref.vanish_rate is None else
               f"vanish rate not above objectness's {ref.vanish_rate:.2f}")
        log(f"bias: {sum(dropped.values())} spatial sample flag(s) not raised, read from maps that do not beat "
            f"the model-free objectness map ({why}): {dict(dropped)}")
    tm["n_spatial_flags_dropped"] = dict(dropped)
    return [f if f.kind not in SPATIAL_KINDS else
            replace(f, evidence={**f.evidence, "map_faithfulness": ranking[f.method].evidence(ref)})
            for f in sflags if f.kind not in SPATIAL_KINDS or f.method in keep]


def run_dataset_flags(
    store: Any,
    run_id: str,
    model_dir: str | Path | None,
    dataset_path: Any = None,
    settings: BiasSettings = BiasSettings(),
    *,
    sample_level: str = "always",
    spatial_maps: str = "faithful",
    device: str = "cpu",
    adapter: Any = None,
    answerer: Callable[[Any], Answerer] | None = None,
    scanner: Callable[[Any, str, float], Scanner] | None = None,
    log: Callable[[str], None] | None = None,
    info: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The dataset-level bias step of one run (= one checkpoint); returns ``flags`` rows.

    ``dataset_path``: the dataset folder or manifest, or the `diffcam.storage.samples.Dataset` the
    flow already loaded (not read again); None: the run's ``dataset_uri``.
    The counterfactuals regenerate answers through ``answerer(generation settings)``
    (`diffcam.tasks.answers`: the flow passes its Ray workers' `pool_answerer`), else through a
    loaded ``adapter``, else through the model in ``model_dir`` loaded here on ``device``
    (`local_answerer`); none of them: ``clever_hans`` flags keep ``confirmed`` None and
    their evidence says why. The discovery scan (`diffcam.tasks.bias.scan`, on when
    ``settings.scan_max_samples`` > 0 and a word has ``min_word_samples`` occurrences) adds
    its `clever_hans` suspects (``evidence["found_by"] == "scan"``, method None) before the
    counterfactuals, through ``scanner(generation settings, attribution step, window size)``
    (`diffcam.tasks.scan`: the flow passes `pool_scanner`), else the same ``adapter`` / model; with
    no model, or a given ``adapter`` that can answer but not score (no ``canvas_log_probs``:
    the tests' scripted stand-ins), it is not run and ``info["scan"]`` and the log say so.
    Nothing is loaded or started unless a suspect or the scan needs it.
    ``spatial_maps``: "faithful" (default: `off_object` / `border_hotspot` only from maps this
    run's vanish test ranks above `objectness`; `info["map_faithfulness"]` says how each
    ranked) or "all" (every sample method, for runs with no faithfulness test).
    Function words are never flagged.
    ``sample_level``: "always" (compute sample flags from the stored maps) or "never"; `suspect_region` sample flags
    (the samples a kept `clever_hans` flag reaches) are always added. A `clever_hans`
    suspect that the counterfactual refutes is dropped unless ``settings.keep_refuted``
    (then it stays with ``confirmed`` false). ``info`` (optional dict) gets ``read_s``,
    ``analyse_s``, ``scan_s``, ``n_scanned_images``, ``n_scan_suspects``, ``scan`` (per word:
    what the scan did), ``counterfactual_s``, ``n_samples``, ``n_dataset_flags``,
    ``n_sample_flags`` and ``refuted`` (word, method, region, score of each refuted suspect).
    """
    from diffcam.core.settings import CamSettings
    from diffcam.storage.datasets import load_dataset

    log = log or _quiet
    if sample_level not in ("always", "never"):
        raise ValueError(f"sample_level must be always|never, got {sample_level!r}")
    if spatial_maps not in ("faithful", "all"):
        raise ValueError(f"spatial_maps must be faithful|all, got {spatial_maps!r}")
    tm: dict[str, Any] = {} if info is None else info
    t0 = time.perf_counter()
    run_row = store.read_run(run_id)
    if dataset_path is None:
        uri = run_row["dataset_uri"]
        dataset_path = Path(uri.removeprefix("file://")) if uri.startswith("file://") else Path(uri)
    ds = dataset_path if hasattr(dataset_path, "samples") else load_dataset(dataset_path)
    methods = sorted(set(settings.sample_methods) | set(settings.dataset_methods))
    run = load_run_maps(store, run_id, methods)
    objects = object_masks(ds, sorted(run["words"]))
    tm["read_s"] = time.perf_counter() - t0
    tm["n_samples"] = len(run["words"])

    t1 = time.perf_counter()
    sflags, grounding, analyses = analyse_run(run, objects, settings)
    sflags = _spatial_flags_from_faithful_maps(sflags, store, run_id, settings, spatial_maps, tm, log)
    dflags = all_dataset_flags(analyses, settings)
    centre = run_centre_bias(centre_samples(run, grounding, settings), settings)
    dflags += run_centre_flags(centre, settings) + run_naming_flag(centre, settings)
    tm["centre"] = {m: None if st is None else {k: v for k, v in st.items() if k not in ("mean_map", "prior")}
                    for m, st in centre.items()}
    tm["analyse_s"] = time.perf_counter() - t1
    log(f"bias: {len(run['words'])} samples, {len(analyses)} (word, method) groups, "
        f"{len(sflags)} sample flags, {len(dflags)} dataset flags before confirmation")

    by_id = {s.sample_id: s for s in ds.samples}
    images = {sid: by_id[sid].image_path for sid in run["words"]}
    cam = CamSettings.from_run_config(json.loads(run_row["config_json"] or "{}"))
    scanning = settings.scan_max_samples > 0 and any(a["n"] >= settings.min_word_samples for a in analyses.values())
    answer: Answerer | None = None
    scan: Scanner | None = None
    if scanning or any(f.kind == "clever_hans" for f in dflags):  # a model is needed: get it once
        if adapter is None and model_dir is not None and (answerer is None or (scanning and scanner is None)):
            from diffcam.core.models.base import load_adapter

            adapter = load_adapter(model_dir, device=device)
        if answerer is None and adapter is not None:
            answerer = partial(local_answerer, adapter)
        if scanner is None and adapter is not None and hasattr(adapter, "canvas_log_probs"):
            scanner = partial(local_scanner, adapter)  # (an answer-only stand-in cannot score: no scan)
        if answerer is not None:
            answer = answerer(cam.generation)  # the run's own generation settings
        if scanning and scanner is not None:
            scan = scanner(cam.generation, cam.attribution_step, settings.hotspot_size)

    t_scan = time.perf_counter()  # the discovery scan's suspects join the saliency ones (diffcam.tasks.bias.scan)
    tm.update(n_scanned_images=0, n_scan_suspects=0, scan=None)
    if scan is not None:
        found, scan_info = scan_suspects(scan, analyses, run["samples"], images, objects, dflags, settings, log=log)
        dflags = dflags + found
        tm.update(n_scanned_images=scan_info["n_scanned_images"], n_scan_suspects=len(found), scan=scan_info["words"])
    elif scanning:
        tm["scan"] = ("not run: no model given" if adapter is None else
                      f"not run: the given adapter ({type(adapter).__name__}) answers but cannot score images "
                      "(no canvas_log_probs)")
        log(f"bias: discovery scan {tm['scan']}")
    tm["scan_s"] = time.perf_counter() - t_scan

    t2 = time.perf_counter()
    suspects = [f for f in dflags if f.kind == "clever_hans"]
    checked: dict[int, Flag] = {}
    if suspects:

        def rank(f: Flag) -> float:
            ev = f.evidence
            return -float(f.score) * float(ev.get("specificity") or 1.0) * float(ev.get("consistency") or 1.0)

        tested = {id(f) for f in sorted(suspects, key=rank)[: settings.cf_max_candidates]}
        for f in suspects:
            confirmed = f.confirmed
            if answer is None:
                cf = {"confirmed": None, "why": ["not run: no model given"]}
            elif id(f) not in tested:
                cf = {"confirmed": None, "why": [
                    f"not run: more than cf_max_candidates={settings.cf_max_candidates} suspects; "
                    "this one ranked lower (score x specificity x consistency)"]}
            else:
                cf = counterfactual(answer, f, run["samples"], images, objects, settings)
                confirmed = cf["confirmed"]
                log(f"bias: clever_hans {f.word}/{f.method} region {f.region}: "
                    f"confirmed={cf['confirmed']} finding={cf['finding']} ({cf['n_tested']} samples, {cf['why']})")
            checked[id(f)] = replace(f, evidence={**f.evidence, "counterfactual": cf}, confirmed=confirmed)
            if cf.get("finding") == "hallucinated_object":
                checked[id(f)] = as_hallucinated_object(checked[id(f)])
    dflags = [checked.get(id(f), f) for f in dflags]
    tm["counterfactual_s"] = time.perf_counter() - t2

    refuted = [f for f in dflags if f.kind == "clever_hans" and f.confirmed is False]
    tm["refuted"] = [{"word": f.word, "method": f.method, "region": f.region, "score": f.score} for f in refuted]
    if refuted and not settings.keep_refuted:
        log(f"bias: {len(refuted)} clever_hans suspect(s) refuted by the counterfactual, not raised "
            "(BiasSettings.keep_refuted=True keeps them with confirmed=false)")
        dflags = [f for f in dflags if not (f.kind == "clever_hans" and f.confirmed is False)]
    t3 = time.perf_counter()
    per_sample: dict[tuple[Any, ...], tuple[dict, dict]] = {}  # (word, region) -> tests: methods share them
    for k, f in enumerate(dflags):  # the samples each kept clever_hans flag reaches
        if f.kind in REGION_KINDS and f.confirmed is not False:
            tests = None
            if answer is not None and settings.region_cf_max_samples > 0:
                key = (f.word, f.region)
                if key not in per_sample:
                    per_sample[key] = region_counterfactuals(answer, f, run["samples"], images, objects,
                                                             settings)
                tests, summary = per_sample[key]
                f = dflags[k] = replace(f, evidence={**f.evidence, "sample_counterfactuals": summary})
                log(f"bias: clever_hans {f.word}/{f.method}: {summary['n_tested']} samples tested one by "
                    f"one, the word vanished in {summary['n_vanished']} without the region")
            sflags.extend(region_sample_flags(f, flag_analysis(f, analyses, run["words"]), settings, tests))
    late = late_refutations(dflags, settings)
    if late:
        log(f"bias: {len(late)} untested suspect(s) refuted by their per-sample counterfactuals (no tested sample "
            "depends on the region)")
        dflags = [late.get(f.flag_id, f) for f in dflags]
        sflags = [x for x in sflags if not (x.kind == "suspect_region" and x.evidence.get("dataset_flag_id") in late)]
        tm["refuted"] = tm.get("refuted", []) + [{"word": f.word, "method": f.method, "region": f.region,
                                                   "score": f.score} for f in late.values()]
        if not settings.keep_refuted:
            dflags = [f for f in dflags if f.flag_id not in late]
    tm["sample_counterfactual_s"] = time.perf_counter() - t3

    settings_json = settings.model_dump(mode="json")
    rows = [flag_row(run_id, replace(f, evidence={**f.evidence, "settings": settings_json})) for f in dflags]
    rows += [flag_row(run_id, f) for f in sflags if f.kind == "suspect_region" or sample_level == "always"]
    tm["n_dataset_flags"] = len(dflags)
    tm["n_sample_flags"] = len(rows) - len(dflags)
    return rows


def write_dataset_flags(store: Any, run_id: str, rows: Sequence[Mapping[str, Any]]) -> bool:
    """Commit ``rows`` as the run's ``dataset`` shard of ``flags`` (atomic). False when
    the run already has a dataset shard (nothing written: a re-run never duplicates)."""
    from diffcam.storage.schemas import table_from_rows

    return store.commit_shard(run_id, DATASET_SHARD, {"flags": table_from_rows("flags", list(rows))})
