"""Dataset-level bias statistics and flags: one word, one method, all samples of a run (docs/BIAS.md).

Is the word's mean map more central than its objects (`centre_bias`), does the map
ignore where the object is (`ignores_object`, opt-in: the mask-shuffle gap is ≈ 0), and
is there a cluster of maps whose mass sits consistently on a region off the word's
objects, more than other words' maps do (`clever_hans`, `diffcam.core.bias.clusters`)?
A `clever_hans` suspect is then confirmed or refuted by a counterfactual (done by the
task, which owns the model). Zero maps have no mass distribution: they are left out of
the statistics and counted in the evidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from diffcam.core.bias.clusters import cluster_word_maps, suspect_regions
from diffcam.core.bias.flags import Flag, format_region, make_flag, round6
from diffcam.core.bias.settings import BiasSettings
from diffcam.core.bias.windows import EPS, unit_mass
from diffcam.core.metrics import upsample_bilinear
from diffcam.core.stats import centre_mask

__all__ = [
    "WordSample", "word_mean_map", "mean_mask_map", "centre_bias_index", "content_independence",
    "mask_shuffle_gap", "analyse_word", "dataset_flags", "all_dataset_flags",
]


@dataclass(frozen=True, eq=False)
class WordSample:
    """One occurrence of a word in one sample, for the dataset-level analysis.

    ``map``: (h, w) non-negative. ``coverage``: `cell_coverage` of the word's object mask
    on the map's grid (None: the word has no mask). ``objects_coverage``: the same for the
    union of every object of the image (None: no masks; then ``coverage`` is used).
    ``object_boxes``: optional, not used in the statistics (carried for the task).
    """

    sample_id: str
    word_index: int
    map: np.ndarray
    coverage: np.ndarray | None = None
    objects_coverage: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _common_grid(items: Sequence[WordSample]) -> tuple[int, int]:
    grids = [tuple(it.map.shape) for it in items]
    vals, counts = np.unique(np.array(grids), axis=0, return_counts=True)
    best = vals[int(np.argmax(counts))]
    return int(best[0]), int(best[1])


def _on_grid(a: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a if a.shape == tuple(grid) else np.maximum(upsample_bilinear(a, grid), 0.0)


def word_mean_map(maps: Sequence[np.ndarray]) -> np.ndarray | None:
    """Mean of the maps as mass distributions (each divided by its sum; zero maps left out).
    All maps must share a grid. None when every map is zero."""
    ps = [q for q in (unit_mass(np.asarray(m, dtype=np.float64)) for m in maps) if q is not None]
    return None if not ps else np.mean(ps, axis=0)


def mean_mask_map(coverages: Sequence[np.ndarray]) -> np.ndarray | None:
    """Mean object distribution: each coverage map divided by its sum (empty ones left out)."""
    return word_mean_map(coverages)


def centre_bias_index(mean_map: np.ndarray, mean_mask: np.ndarray, settings: BiasSettings = BiasSettings()) -> dict:
    """Centre mass of the mean map vs that of the mean object-mask map.

    ``score`` = centre_frac(mean map) − centre_frac(mean mask map) (0: the saliency is as
    central as the objects; > 0: more central). Also: both fractions, their ratio, the
    central box's area share and the mean map's centre enrichment (centre_frac / area
    share; 1 = as central as a uniform map).
    """
    c = centre_mask(mean_map.shape, settings.stats_settings)
    pm = mean_map / max(float(mean_map.sum()), EPS)
    pk = mean_mask / max(float(mean_mask.sum()), EPS)
    fm, fk = float(pm[c].sum()), float(pk[c].sum())
    area = float(c.mean())
    return {"score": fm - fk, "map_centre_frac": fm, "mask_centre_frac": fk,
            "ratio": fm / fk if fk > 0 else None, "centre_area_share": area, "map_centre_enrichment": fm / area}


def content_independence(maps: Sequence[np.ndarray]) -> dict[str, Any]:
    """How similar each map is to the word's mean map: cosine similarity of each mass
    distribution with the leave-one-out mean of the others (1: every map is the same map,
    whatever the image). Returns mean, median, per-map values."""
    ps = np.array([q for q in (unit_mass(np.asarray(m, dtype=np.float64)) for m in maps) if q is not None])
    n = len(ps)
    if n < 2:
        return {"mean": None, "median": None, "n": n, "values": []}
    flat = ps.reshape(n, -1)
    total = flat.sum(0)
    loo = (total[None, :] - flat) / (n - 1)
    num = (flat * loo).sum(1)
    den = np.linalg.norm(flat, axis=1) * np.linalg.norm(loo, axis=1)
    sims = np.where(den > 0, num / np.maximum(den, EPS), 0.0)
    return {"mean": float(sims.mean()), "median": float(np.median(sims)), "n": n, "values": sims.tolist()}


def _derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point (n >= 2): a random cyclic shift of a random order."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), n]))
    order = rng.permutation(n)
    shift = int(rng.integers(1, n))
    perm = np.empty(n, dtype=int)
    perm[order] = order[(np.arange(n) + shift) % n]
    return perm


def mask_shuffle_gap(maps: Sequence[np.ndarray], coverages: Sequence[np.ndarray], seed: int = 0) -> dict[str, Any]:
    """Inside-mask share with the sample's own mask minus with another sample's mask.

    Share = Σ p·coverage for the map's mass distribution p. The other sample is given by
    a seeded derangement (deterministic). gap ≈ 0: the map does not follow the object.
    Zero maps are left out. Returns own mean, shuffled mean, gap, n and the permutation.
    """
    pairs = [(q, np.asarray(c, dtype=np.float64)) for q, c in
             ((unit_mass(np.asarray(m, dtype=np.float64)), c) for m, c in zip(maps, coverages)) if q is not None]
    n = len(pairs)
    if n < 2:
        return {"own": None, "shuffled": None, "gap": None, "n": n, "perm": []}
    perm = _derangement(n, seed)
    own = np.array([float((p * c).sum()) for p, c in pairs])
    shuf = np.array([float((pairs[i][0] * pairs[perm[i]][1]).sum()) for i in range(n)])
    return {"own": float(own.mean()), "shuffled": float(shuf.mean()), "gap": float(own.mean() - shuf.mean()),
            "n": n, "perm": perm.tolist()}


def analyse_word(word: str, method: str, items: Sequence[WordSample],
                 settings: BiasSettings = BiasSettings()) -> dict[str, Any]:
    """Everything the dataset level computes for one (word, method): mean map, mean mask
    map, centre-bias index, content independence, mask-shuffle gap, clusters and their
    suspect regions. Maps on another grid than the most common one are resampled to it
    (bilinear; coverages likewise). Zero maps are counted and left out."""
    grid = _common_grid(items) if items else (1, 1)
    keep = [it for it in items if float(np.asarray(it.map).sum()) > 0]
    maps = [_on_grid(it.map, grid) for it in keep]
    ps = np.array([m / m.sum() for m in maps]) if maps else np.zeros((0, *grid))
    cov = [None if it.coverage is None else _on_grid(it.coverage, grid).clip(0, 1) for it in keep]
    objc = [None if (oc := it.objects_coverage if it.objects_coverage is not None else it.coverage) is None
            else _on_grid(oc, grid).clip(0, 1)
            for it in keep]
    res: dict[str, Any] = {"word": word, "method": method, "grid": list(grid), "n": len(items),
                           "n_zero": len(items) - len(keep), "sample_ids": [it.sample_id for it in keep],
                           "word_indices": [int(it.word_index) for it in keep]}
    res["objects_cov"] = objc
    res["mean_map"] = ps.mean(0) if len(ps) else None
    with_mask = [i for i, c in enumerate(cov) if c is not None and c.sum() > 0]
    res["n_masked"] = len(with_mask)
    masked_cov = cast(list[np.ndarray], [cov[i] for i in with_mask])  # with_mask holds only non-None coverages
    res["mean_mask_map"] = mean_mask_map(masked_cov) if with_mask else None
    res["centre_bias"] = (centre_bias_index(ps[with_mask].mean(0), res["mean_mask_map"], settings)
                          if with_mask else None)
    res["content_independence"] = content_independence(list(ps))
    res["shuffle"] = (mask_shuffle_gap([ps[i] for i in with_mask], masked_cov, settings.shuffle_seed)
                      if len(with_mask) >= 2 else None)
    if len(ps) >= settings.min_word_samples:
        cl = cluster_word_maps(list(ps), settings)
        res["clusters"] = {"k": cl.k, "eigenvalues": list(cl.eigenvalues), "labels": cl.labels.tolist()}
        res["regions"] = suspect_regions(ps, cl.labels, objc, settings)
    else:
        res["clusters"] = None
        res["regions"] = []
    res["ps"] = ps
    return res


def _ids(ids: Sequence[str], settings: BiasSettings) -> dict[str, Any]:
    ids = list(ids)
    return {"sample_ids": ids[: settings.max_evidence_ids], "n_sample_ids": len(ids),
            "sample_ids_truncated": len(ids) > settings.max_evidence_ids}


def _grid_list(a: np.ndarray | None) -> list[list[float]] | None:
    return None if a is None else np.round(np.asarray(a, dtype=np.float64), 6).tolist()


def dataset_flags(analysis: Mapping[str, Any], settings: BiasSettings = BiasSettings(),
                  baseline: np.ndarray | None = None) -> list[Flag]:
    """Dataset-level flags of one (word, method) from `analyse_word`'s result.

    ``baseline``: (m, h, w) mass distributions of the same method's maps of the *other*
    content words of the run (`all_dataset_flags` builds it). A suspect region must hold
    ``cluster_specificity_min`` × more of the cluster's mass than of those maps' mass on
    average: a hot-spot every word's map has (a position artefact of the map method, a
    token the model always reads) is not a cue of this word. None: not assessed (said in
    the evidence).

    - `centre_bias` (needs >= ``min_word_samples`` masked maps): score = `centre_bias_index`
      score; fires when >= ``centre_bias_threshold`` and the mean map's centre enrichment
      >= ``centre_enrichment_min``.
    - `ignores_object` (same need): score = mask-shuffle gap; fires when <=
      ``ignores_object_gap_max`` and the mean leave-one-out similarity to the word's mean
      map >= ``ignores_object_similarity_min`` (the maps are the same map whatever the
      object's position).
    - `clever_hans`: one per suspect cluster (`suspect_regions`); score = the cluster mean
      map's mass share in the region; threshold ``cluster_enrichment_min`` × the window's
      area share (a uniform map's share there); also needs
      the word specificity above; ``confirmed`` stays None until the counterfactual runs.
    """
    word, method = analysis["word"], analysis["method"]
    out: list[Flag] = []
    grid = analysis["grid"]
    base = {"word": word, "method": method, "grid": grid, "n_maps": analysis["n"], "n_zero_maps": analysis["n_zero"],
            "n_masked": analysis["n_masked"], "level": "dataset"}
    ci = analysis["content_independence"]
    sh = analysis["shuffle"]
    ci_ev = {"similarity_to_mean_mean": round6(ci["mean"]), "similarity_to_mean_median": round6(ci["median"])}
    sh_ev = None if sh is None else {"own_inside": round6(sh["own"]), "shuffled_inside": round6(sh["shuffled"]),
                                     "gap": round6(sh["gap"]), "n": sh["n"], "seed": settings.shuffle_seed}
    sids = analysis["sample_ids"]
    cb = analysis["centre_bias"]
    if cb is not None and analysis["n_masked"] >= settings.min_word_samples:
        if cb["score"] >= settings.centre_bias_threshold and cb["map_centre_enrichment"] >= settings.centre_enrichment_min:
            ps = analysis["ps"]
            cmask = centre_mask(tuple(grid), settings.stats_settings)
            per = np.array([float(p[cmask].sum()) for p in ps])
            top = [sids[i] for i in np.argsort(-per, kind="stable")]
            ev = {**base, "rule": "score >= threshold and map_centre_enrichment >= centre_enrichment_min",
                  **{k: round6(v) for k, v in cb.items()}, "centre_enrichment_min": settings.centre_enrichment_min,
                  "centre_fraction": settings.centre_fraction, "content_independence": ci_ev, "shuffle": sh_ev,
                  "mean_map": _grid_list(analysis["mean_map"]), "mean_mask_map": _grid_list(analysis["mean_mask_map"]),
                  "per_sample_centre_frac_mean": round6(float(per.mean())),
                  **_ids(top, settings),
                  "meaning": "the word's saliency sits at the image centre more than its objects do"}
            h, w = grid
            rows = np.nonzero(cmask.any(1))[0]
            cols = np.nonzero(cmask.any(0))[0]
            box: tuple[float, ...] = (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)
            out.append(make_flag("centre_bias", cb["score"], settings.centre_bias_threshold, ev, word=word,
                             method=method, region=box))
    if settings.flag_ignores_object and sh is not None and sh["n"] >= settings.min_word_samples \
            and ci["mean"] is not None:
        if sh["gap"] <= settings.ignores_object_gap_max and ci["mean"] >= settings.ignores_object_similarity_min:
            ev = {**base, "rule": "score <= threshold and similarity_to_mean_mean >= similarity_min",
                  "shuffle": sh_ev, "content_independence": ci_ev,
                  "similarity_min": settings.ignores_object_similarity_min,
                  "mean_map": _grid_list(analysis["mean_map"]), **_ids(sids, settings),
                  "meaning": "the map is the same whatever the image: moving the object does not move it"}
            out.append(make_flag("ignores_object", sh["gap"], settings.ignores_object_gap_max, ev, word=word,
                             method=method))
    cl = analysis["clusters"]
    # suspect clusters that point at the same window become one flag (one region, one id)
    by_box: dict[tuple[float, ...], list[dict[str, Any]]] = {}
    for reg in analysis["regions"]:
        if reg["suspect"]:
            by_box.setdefault(tuple(reg["box"]), []).append(reg)
    centre_flag = next((f for f in out if f.kind == "centre_bias"), None)
    for box, regs in by_box.items():
        r, c, wh, ww = regs[0]["window"]
        if centre_flag is not None:
            cm = centre_mask(tuple(grid), settings.stats_settings)
            if cm[r:r + wh, c:c + ww].all():
                continue  # the same finding as the centre_bias flag: reported once, there
        idx = [i for reg in regs for i in reg["members"]]
        shares = np.array([s for reg in regs for s in reg["member_shares"]])
        sizes = np.array([reg["size"] for reg in regs], dtype=np.float64)
        share = float(np.dot(sizes, [reg["share"] for reg in regs]) / sizes.sum())
        area = wh * ww / (grid[0] * grid[1])
        consistency = float((shares >= settings.member_enrichment_min * area).mean())
        proto = np.asarray(analysis["ps"])[idx].mean(0)
        others = [i for i in range(len(sids)) if i not in set(idx)]
        rest_share = (float(np.asarray(analysis["ps"])[others][:, r:r + wh, c:c + ww].sum(axis=(1, 2)).mean())
                      if others else None)
        specificity = base_share = None
        if baseline is not None and len(baseline) and tuple(baseline.shape[1:]) == tuple(grid):
            base_share = float(baseline[:, r:r + wh, c:c + ww].sum(axis=(1, 2)).mean())
            specificity = share / max(base_share, EPS)
            if specificity < settings.cluster_specificity_min:
                continue
        order = np.argsort(-shares, kind="stable")
        ev = {**base, "rule": "score >= threshold and consistency >= consistency_min and size >= min size "
                              "and specificity >= specificity_min (clusters with the same region merged)",
              "clusters": [reg["cluster"] for reg in regs], "cluster_sizes": [reg["size"] for reg in regs],
              "cluster_shares": [round6(reg["share"]) for reg in regs], "k": cl["k"],
              "eigenvalues": [round6(v) for v in cl["eigenvalues"]],
              "cluster_size": len(idx), "cluster_share_of_word": len(idx) / max(len(sids), 1),
              "region_share": share, "consistency": consistency,
              "consistency_min": settings.cluster_consistency_min,
              "member_share_min": settings.member_enrichment_min * area, "window_area_share": area,
              "cluster_enrichment": share / area,
              "rest_share": round6(rest_share), "object_overlap": max(reg["object_overlap"] for reg in regs),
              "other_words_share": round6(base_share), "specificity": round6(specificity),
              "specificity_min": settings.cluster_specificity_min,
              "n_other_word_maps": 0 if baseline is None else int(len(baseline)),
              "region_object_overlap_max": settings.region_object_overlap_max,
              "window": [r, c, wh, ww], "prototype": _grid_list(proto),
              "mean_map": _grid_list(analysis["mean_map"]),
              "member_word_indices": [analysis["word_indices"][idx[i]] for i in order][: settings.max_evidence_ids],
              "member_region_shares": [round(float(shares[i]), 6) for i in order][: settings.max_evidence_ids],
              **_ids([sids[idx[i]] for i in order], settings),
              "content_independence": ci_ev, "shuffle": sh_ev,
              "meaning": "a cluster of this word's maps puts its mass on one region off the word's objects"}
        out.append(make_flag("clever_hans", share, settings.cluster_enrichment_min * area, ev, word=word,
                         method=method, region=box, extra=format_region(box)))
    return out


def all_dataset_flags(analyses: Mapping[tuple[str, str], Mapping[str, Any]],
                      settings: BiasSettings = BiasSettings()) -> list[Flag]:
    """`dataset_flags` for every (word, method) analysis of one run, each with the other
    words' maps of the same method (and grid) as its specificity baseline."""
    out: list[Flag] = []
    for (word, method), a in sorted(analyses.items()):
        others = [o["ps"] for (w2, m2), o in analyses.items()
                  if m2 == method and w2 != word and len(o["ps"]) and tuple(o["grid"]) == tuple(a["grid"])]
        out.extend(dataset_flags(a, settings, np.concatenate(others) if others else None))
    return out
