"""Settings of the bias audit (docs/BIAS.md): every threshold, saved with each flag's evidence."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from diffcam.core.methods import methods_for
from diffcam.core.settings import Settings
from diffcam.core.stats import StatsSettings

__all__ = ["BiasSettings"]

#: A share or a score in [0, 1].
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
#: A count of at least one.
Count = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0.0)]


class BiasSettings(Settings):
    """Every threshold and parameter of the bias audit, saved with the flags' evidence.

    Defaults were calibrated on the synthetic planted-cue benchmark (docs/BIAS.md says
    how and with which numbers). Score conventions: a ``*_threshold`` fires when the
    score is >= it, a ``*_max`` when the score is <= it.
    """

    # which maps are audited
    sample_methods: tuple[str, ...] = Field(default_factory=lambda: methods_for("bias-sample"))
    dataset_methods: tuple[str, ...] = Field(default_factory=lambda: methods_for("bias-dataset"))
    # geometry
    hotspot_size: float = Field(default=0.125, gt=0.0, le=1.0)
    object_overlap_max: Unit = 0.05
    border_fraction: float = Field(default=0.125, gt=0.0, le=0.5)
    centre_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    # sample-level flags
    off_object_threshold: Unit = 0.15
    off_object_dominance: NonNegative = 1.0
    border_threshold: Unit = 0.15
    zero_max: NonNegative = 0.0
    flat_gini_max: Unit = 0.02
    # dataset level: which words are analysed
    min_word_samples: Count = 10
    # centre bias
    centre_bias_threshold: float = 0.25
    centre_enrichment_min: NonNegative = 1.5
    # run-level centre bias against the images' object prior (diffcam.core.bias.centre)
    centre_prior_threshold: float = 0.15
    # run-level centre bias in what is named (no map): central objects named more often than
    # off-centre ones, by a one-sided two-proportion z-test and an effect-size floor
    centre_naming_z_min: NonNegative = 3.0
    centre_naming_gap_min: Unit = 0.1
    # mask-shuffle gap (ignores_object)
    shuffle_seed: int = 0
    ignores_object_gap_max: float = 0.02
    ignores_object_similarity_min: float = 0.9
    flag_ignores_object: bool = False
    # clever-hans clustering
    k_max: Count = 6
    knn: Count = 7
    cluster_max_maps: Count = 2000
    cluster_seed: int = 0
    min_cluster_size: Count = 5
    min_cluster_frac: Unit = 0.1
    cluster_enrichment_min: NonNegative = 2.0
    member_enrichment_min: NonNegative = 1.5
    cluster_consistency_min: Unit = 0.6
    cluster_specificity_min: NonNegative = 1.2
    region_object_overlap_max: Unit = 0.05
    # counterfactual confirmation
    cf_max_candidates: Count = 10
    cf_max_samples: Count = 12
    # per-sample counterfactual of a kept clever_hans flag: every sample whose answer has
    # the flag's word (up to this many; 0 = off) gets the region erased and is regenerated
    region_cf_max_samples: int = Field(default=2000, ge=0)
    # a suspect left untested by the dataset-level counterfactual (over cf_max_candidates)
    # is refuted when at least this many per-sample tests show no dependence at all
    region_cf_refute_min: Count = 10
    keep_refuted: bool = False
    cf_ring_fraction: float = Field(default=0.05, gt=0.0)
    # grid cells added on each side of a suspect window for the erase tests (the marker may
    # spill past the window; object pixels are never erased)
    cf_region_margin: int = Field(default=1, ge=0)
    cf_confirm_min: Unit = 0.5
    max_evidence_ids: Count = 200
    # discovery scan (saliency-free; tasks/bias/scan.py)
    # per content word, up to scan_max_samples images whose answer has it (0 = off) get every
    # hotspot_size window erased in turn; a window off the word's objects whose erasure lowers
    # the word's log-probability by more than scan_min_drop nats in at least scan_min_hit_rate
    # of them becomes a clever_hans suspect, confirmed or refuted by the counterfactual
    scan_max_samples: int = Field(default=12, ge=0)
    scan_min_drop: NonNegative = 1.0
    scan_min_hit_rate: Unit = 0.5
    scan_words: Literal["all", "unsuspected"] = "all"

    @property
    def stats_settings(self) -> StatsSettings:
        return StatsSettings(border_fraction=self.border_fraction, centre_fraction=self.centre_fraction)
