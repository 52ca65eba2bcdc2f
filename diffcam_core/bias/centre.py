"""Centre bias of a whole run, measured against where its objects really are.

The word-level `centre_bias` (`diffcam.core.bias.dataset.centre_bias_index`) compares a
word's maps with *that word's* objects. A model that only ever names the object in the
middle passes it: its "circle" maps sit on the circles it names, which are central. The
bias is in which objects get named, and it shows only against the objects the images
hold. So, per map method, over every content word of the run:

- ``map_centre_frac``: the central box's share of the mean map (each map a mass
  distribution);
- ``prior_centre_frac``: the same share of the images' object prior (each image's union
  of object masks as a distribution, averaged): how central the run's objects are;
- ``score`` = map_centre_frac − prior_centre_frac: 0 when the maps are as central as the
  objects, > 0 when more.

Beside it, a behavioural check that needs no map: the share of central objects the
answers name minus the share of off-centre objects they name (``naming_gap``; an object
is central when most of its cells' coverage lies in the central box). It gets a flag of
its own (`run_naming_flag`, method None): on the cue zoo's centre-biased model the map
score stayed below 0 (its maps are *less* central than its objects) while the naming gap
was 0.30, so a model can be centre-biased in what it says without its maps showing it.

Pure: arrays in, numbers and `Flag`s out. The task (`diffcam.tasks.bias.step`) gathers the inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from diffcam.core.bias.flags import Flag, make_flag, round6
from diffcam.core.bias.settings import BiasSettings
from diffcam.core.bias.windows import unit_mass
from diffcam.core.metrics import upsample_bilinear
from diffcam.core.stats import centre_mask

__all__ = ["CentreSample", "naming_z", "run_centre_bias", "run_centre_flags", "run_naming_flag"]


@dataclass(frozen=True, eq=False)
class CentreSample:
    """One sample for the run-level centre statistic.

    ``maps``: method → the (h, w) maps of the answer's content words. ``objects``: the
    cell coverage (h, w) of each distinct object of the image, on the maps' grid.
    ``named``: per object, whether a word of the answer grounds to it.
    """

    sample_id: str
    maps: Mapping[str, Sequence[np.ndarray]]
    objects: Sequence[np.ndarray] = ()
    named: Sequence[bool] = field(default_factory=tuple)


def _on(a: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a if a.shape == grid else np.maximum(upsample_bilinear(a, grid), 0.0)


def run_centre_bias(samples: Sequence[CentreSample], settings: BiasSettings = BiasSettings()) -> dict[str, dict | None]:
    """Per method: the run's centre statistic (module docstring). Maps on another grid than
    the run's most common one are resampled to it; zero maps and object-less images are
    left out and counted. A method with no map or no object gets None."""
    grids = [tuple(np.asarray(m).shape) for s in samples for ms in s.maps.values() for m in ms]
    if not grids:
        return {}
    vals, counts = np.unique(np.array(grids), axis=0, return_counts=True)
    grid = cast(tuple[int, int], tuple(int(v) for v in vals[int(np.argmax(counts))]))
    c = centre_mask(grid, settings.stats_settings)
    priors = []
    central_named = central_total = off_named = off_total = 0
    for s in samples:
        covs = [_on(o, grid).clip(0, 1) for o in s.objects]
        union = unit_mass(np.max(covs, axis=0)) if covs else None
        if union is not None:
            priors.append(union)
        for cov, named in zip(covs, s.named):
            tot = float(cov.sum())
            if tot <= 0:
                continue
            if float(cov[c].sum()) / tot > 0.5:
                central_total += 1
                central_named += bool(named)
            else:
                off_total += 1
                off_named += bool(named)
    prior = np.mean(priors, axis=0) if priors else None
    naming = {"central_named": central_named, "central_objects": central_total, "off_centre_named": off_named,
              "off_centre_objects": off_total,
              "central_named_share": central_named / central_total if central_total else None,
              "off_centre_named_share": off_named / off_total if off_total else None}
    naming["naming_gap"] = (None if naming["central_named_share"] is None or naming["off_centre_named_share"] is None
                            else naming["central_named_share"] - naming["off_centre_named_share"])
    methods = sorted({m for s in samples for m in s.maps})
    out: dict[str, dict | None] = {}
    for method in methods:
        ps = [q for s in samples for m in s.maps.get(method, ()) if (q := unit_mass(_on(m, grid))) is not None]
        if not ps or prior is None:
            out[method] = None
            continue
        mean = np.mean(ps, axis=0)
        fm, fp = float(mean[c].sum()), float(prior[c].sum())
        out[method] = {"score": fm - fp, "map_centre_frac": fm, "prior_centre_frac": fp,
                       "centre_area_share": float(c.mean()), "n_maps": len(ps), "n_images_with_objects": len(priors),
                       "grid": list(grid), "mean_map": mean, "prior": prior, **naming}
    return out


def _centre_box(grid: tuple[int, int], settings: BiasSettings) -> tuple[float, float, float, float]:
    """The central box of a run-level flag (normalised x0, y0, x1, y1): the cells of `centre_mask`."""
    c = centre_mask(grid, settings.stats_settings)
    rows, cols = np.nonzero(c.any(1))[0], np.nonzero(c.any(0))[0]
    h, w = grid
    return (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)


def run_centre_flags(stats: Mapping[str, Mapping | None], settings: BiasSettings = BiasSettings()) -> list[Flag]:
    """A run-level `centre_bias` flag (word None) per method whose score is >=
    ``centre_prior_threshold`` over at least ``min_word_samples`` maps."""
    out: list[Flag] = []
    for method, st in sorted(stats.items()):
        if st is None or st["n_maps"] < settings.min_word_samples or st["score"] < settings.centre_prior_threshold:
            continue
        box = _centre_box(tuple(st["grid"]), settings)
        ev = {"level": "run", "method": method, "rule": "score >= centre_prior_threshold (score = centre share of "
              "the mean map of every content word - centre share of the images' object prior)",
              **{k: round6(v) if isinstance(v, float) else v for k, v in st.items() if k not in ("mean_map", "prior")},
              "mean_map": np.round(st["mean_map"], 6).tolist(), "prior": np.round(st["prior"], 6).tolist(),
              "centre_fraction": settings.centre_fraction,
              "meaning": "the model's maps sit at the image centre more than the run's objects do (and the "
                         "naming gap says whether central objects are named more often than off-centre ones)"}
        out.append(make_flag("centre_bias", st["score"], settings.centre_prior_threshold, ev, method=method,
                             region=box, extra="run"))
    return out


def naming_z(central_named: int, central: int, off_named: int, off: int) -> float | None:
    """One-sided two-proportion z statistic (pooled) for "central objects are named more
    often than off-centre ones"; None when a side has no object or every object agrees."""
    if central <= 0 or off <= 0:
        return None
    p = (central_named + off_named) / (central + off)
    se = (p * (1.0 - p) * (1.0 / central + 1.0 / off)) ** 0.5
    if se == 0.0:
        return None
    return (central_named / central - off_named / off) / se


def run_naming_flag(stats: Mapping[str, Mapping | None], settings: BiasSettings = BiasSettings()) -> list[Flag]:
    """A run-level `centre_bias` flag from the answers alone (method None): central objects
    are named more often than off-centre ones, with z >= ``centre_naming_z_min`` and a gap
    >= ``centre_naming_gap_min``, over at least ``min_word_samples`` objects on each side.

    Why a test and a floor rather than a fitted threshold: a clean model names central and
    off-centre objects alike (gap ~0 up to sampling noise), so the null is known; the z
    level bounds false flags (one-sided p ~ 0.001 at 3) whatever the model, and the floor
    keeps a large audit from flagging a negligible difference."""
    st = next((v for _, v in sorted(stats.items()) if v is not None), None)
    if st is None:
        return []
    cn, ct, on, ot = (int(st[k]) for k in ("central_named", "central_objects", "off_centre_named",
                                              "off_centre_objects"))
    z = naming_z(cn, ct, on, ot)
    gap = st["naming_gap"]
    if (z is None or gap is None or min(ct, ot) < settings.min_word_samples or z < settings.centre_naming_z_min
            or gap < settings.centre_naming_gap_min):
        return []
    box = _centre_box(tuple(st["grid"]), settings)
    ev = {"level": "run", "method": None, "found_by": "naming",
          "rule": "z >= centre_naming_z_min and naming_gap >= centre_naming_gap_min (z: one-sided two-proportion "
                  "test of central vs off-centre objects named)",
          "z": round6(z), "naming_gap": round6(gap), "central_named": cn, "central_objects": ct,
          "off_centre_named": on, "off_centre_objects": ot, "centre_naming_gap_min": settings.centre_naming_gap_min,
          "centre_fraction": settings.centre_fraction,
          "meaning": "the answers name objects at the image centre more often than objects elsewhere: what is "
                     "said depends on where an object sits"}
    return [make_flag("centre_bias", z, settings.centre_naming_z_min, ev, method=None, region=box, extra="naming")]
