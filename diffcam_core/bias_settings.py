"""Settings of the bias audit (docs/BIAS.md): every threshold, saved with each flag's evidence."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from diffcam_core.stats import StatsSettings

__all__ = ["BiasSettings"]


@dataclass(frozen=True)
class BiasSettings:
    """Every threshold and parameter of the bias audit, saved with the flags' evidence.

    Defaults were calibrated on the synthetic planted-cue benchmark (docs/BIAS.md says
    how and with which numbers). Score conventions: a ``*_threshold`` fires when the
    score is >= it, a ``*_max`` when the score is <= it.
    """

    # which maps are audited
    sample_methods: tuple[str, ...] = ("diffusion-cam", "token-gradnorm")
    dataset_methods: tuple[str, ...] = ("diffusion-cam", "token-gradnorm", "token-gradxinput")
    # geometry
    hotspot_size: float = 0.125
    object_overlap_max: float = 0.05
    border_fraction: float = 0.125
    centre_fraction: float = 0.5
    # sample-level flags
    off_object_threshold: float = 0.15
    off_object_dominance: float = 1.0
    border_threshold: float = 0.15
    zero_max: float = 0.0
    flat_gini_max: float = 0.02
    # dataset level: which words are analysed
    min_word_samples: int = 10
    # centre bias
    centre_bias_threshold: float = 0.25
    centre_enrichment_min: float = 1.5
    # mask-shuffle gap (ignores_object)
    shuffle_seed: int = 0
    ignores_object_gap_max: float = 0.02
    ignores_object_similarity_min: float = 0.9
    flag_ignores_object: bool = False
    # clever-hans clustering
    k_max: int = 6
    knn: int = 7
    cluster_max_maps: int = 2000
    cluster_seed: int = 0
    min_cluster_size: int = 5
    min_cluster_frac: float = 0.1
    cluster_enrichment_min: float = 2.0
    member_enrichment_min: float = 1.5
    cluster_consistency_min: float = 0.6
    cluster_specificity_min: float = 1.2
    region_object_overlap_max: float = 0.05
    # counterfactual confirmation
    cf_max_candidates: int = 10
    cf_max_samples: int = 12
    # per-sample counterfactual of a kept clever_hans flag: every sample whose answer has
    # the flag's word (up to this many; 0 = off) gets the region erased and is regenerated
    region_cf_max_samples: int = 2000
    keep_refuted: bool = False
    cf_ring_fraction: float = 0.05
    cf_confirm_min: float = 0.5
    max_evidence_ids: int = 200

    def __post_init__(self) -> None:
        for name in ("sample_methods", "dataset_methods"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unit = ("hotspot_size", "object_overlap_max", "off_object_threshold", "border_threshold",
                "cluster_consistency_min",
                "region_object_overlap_max", "min_cluster_frac", "cf_confirm_min", "flat_gini_max")
        for name in unit:
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if not 0.0 < self.hotspot_size <= 1.0:
            raise ValueError(f"hotspot_size must be in (0, 1], got {self.hotspot_size}")
        if not 0.0 < self.border_fraction <= 0.5:
            raise ValueError(f"border_fraction must be in (0, 0.5], got {self.border_fraction}")
        if not 0.0 < self.centre_fraction <= 1.0:
            raise ValueError(f"centre_fraction must be in (0, 1], got {self.centre_fraction}")
        for name in ("min_word_samples", "k_max", "knn", "min_cluster_size", "cf_max_samples", "max_evidence_ids",
                     "cf_max_candidates", "cluster_max_maps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.region_cf_max_samples) < 0:
            raise ValueError(f"region_cf_max_samples must be >= 0 (0: off), got {self.region_cf_max_samples!r}")
        if self.zero_max < 0 or self.off_object_dominance < 0 or self.cf_ring_fraction <= 0:
            raise ValueError("zero_max and off_object_dominance must be >= 0, cf_ring_fraction > 0")
        for name in ("cluster_specificity_min", "cluster_enrichment_min", "member_enrichment_min",
                     "centre_enrichment_min"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def stats_settings(self) -> StatsSettings:
        return StatsSettings(border_fraction=self.border_fraction, centre_fraction=self.centre_fraction)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BiasSettings:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown BiasSettings fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
