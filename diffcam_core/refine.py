"""The four refinement modules of Diffusion-CAM (docs/METHOD.md §3) as pure numpy functions.

Every function takes an (h, w) map, returns a new float64 array and never mutates its
inputs. The full method runs AKD → DACG → CBA → clip to [0, max raw] and min-max → SICD;
`refine` applies a named preset from `PRESETS`. All constants live in `RefineSettings`.

Deviations from the authors' reference code (docs/METHOD.md §7), each repeated where it applies:
- AKD: the kernel size really adapts (reference: a constant step ratio and `side/512` gave
  k = 3 always); "nearest odd" replaces the reference's truncate-then-bump; no random noise
  is added before filtering; a window with zero variation returns its median (reference:
  division by zero → NaN → a silent fallback to a different blur).
- DACG: smooths in 2-D with a 3×3 Gaussian (reference: a (3, 1) blur on an N×1 column of
  the gathered low values, which returns its input unchanged); no 1e-6 floor on ζ when
  positive values exist (METHOD: 1e-6 only when there are none).
- CBA: the reference's extra ×0.3 on very low values is dropped: it was undone by the final
  clip to [floor, 1], so the formula v·clip(v/δ, floor, 1) is what it computed.
- SICD: α* = ⟨H,I⟩/⟨I,I⟩ in closed form (reference: `minimize_scalar`, same minimiser) and
  clipped below at 0 too; interference from the answer's function-word maps when given.
- Presets: each `+module` preset runs only that module (reference: SICD ran in every
  non-baseline ablation mode).
- No `except Exception: return heatmap`: invalid input raises `ValueError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from diffcam.core.settings import Settings

__all__ = [
    "PRESETS",
    "Preset",
    "RefineSettings",
    "akd",
    "akd_kernel_size",
    "cba",
    "cba_delta",
    "clip_minmax",
    "dacg",
    "dacg_threshold",
    "gaussian_blur",
    "heuristic_interference",
    "refine",
    "refine_stack",
    "sicd",
]


class RefineSettings(Settings):
    """Every constant of docs/METHOD.md §3 in one object, recorded in each run's config (``refine``)."""

    # AKD (kernel size: k = nearest odd of akd_base · f_step · f_std · f_size)
    akd_base: float = 3.0
    akd_step_ref: float = 16.0  # f_step = min(n_steps / akd_step_ref, akd_step_cap)
    akd_step_cap: float = 2.0
    akd_std_gain: float = 5.0  # f_std = min(akd_std_gain · std(H), akd_std_cap)
    akd_std_cap: float = 2.0
    akd_side_ref: float = 24.0  # f_size = min(side / akd_side_ref, akd_size_cap)
    akd_size_cap: float = 1.5
    akd_k_min: int = 3
    akd_k_max: int = 11
    akd_flat_cv: float = 1e-8  # σ (= std/mean of a window) below this → window median
    # DACG
    dacg_sigma_high: float = 0.22  # σ(H) > this → percentile dacg_p_high_var
    dacg_mu_high: float = 0.35  # else μ(H) > this → dacg_p_high_mean
    dacg_mu_low: float = 0.25  # else μ(H) < this → dacg_p_low_mean, else dacg_p_default
    dacg_p_high_var: float = 90.0
    dacg_p_high_mean: float = 75.0
    dacg_p_low_mean: float = 80.0
    dacg_p_default: float = 85.0
    dacg_zeta_empty: float = 1e-6  # ζ when the map has no strictly positive value
    dacg_kernel: int = 3
    dacg_sigma: float = Field(default=1.0, gt=0)
    # CBA: δ = w_p50_nz·P50(nz) + w_p60_all·P60(all) + w_mean_nz·mean(nz) + w_max·max(H)
    cba_w_p50_nz: float = 0.15
    cba_w_p60_all: float = 0.15
    cba_w_mean_nz: float = 0.20
    cba_w_max: float = 0.015
    cba_floor: float = Field(default=0.5, gt=0, le=1)  # in (0, 1]
    # clip + min-max between CBA and SICD (the §2 normalisation epsilon)
    minmax_eps: float = 1e-8
    # SICD
    sicd_alpha_max: float = Field(default=0.5, ge=0)
    sicd_keep_ratio: float = 0.9
    heur_repeat_coef: float = 0.05  # I = heur_repeat_coef·r + heur_spike_coef·1[H > μ + kσ]
    heur_spike_coef: float = 0.02
    heur_spike_nsigma: float = 2.0

    @field_validator("akd_k_min", "akd_k_max", "dacg_kernel")
    @classmethod
    def _odd(cls, v: int, info: Any) -> int:
        if v < 1 or v % 2 == 0:
            raise ValueError(f"RefineSettings.{info.field_name} must be a positive odd integer, got {v}")
        return v

    @model_validator(mode="after")
    def _kernel_range(self) -> RefineSettings:
        if self.akd_k_min > self.akd_k_max:
            raise ValueError(f"akd_k_min {self.akd_k_min} > akd_k_max {self.akd_k_max}")
        return self


DEFAULT_SETTINGS = RefineSettings()


@dataclass(frozen=True)
class Preset:
    """Which modules a preset runs; the order is fixed by docs/METHOD.md §3."""

    akd: bool = False
    dacg: bool = False
    cba: bool = False
    sicd: bool = False


#: name → modules. `+x` runs module x alone (the paper's ablation rows); `raw` runs nothing.
PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "raw": Preset(),
        "+akd": Preset(akd=True),
        "+dacg": Preset(dacg=True),
        "+cba": Preset(cba=True),
        "+sicd": Preset(sicd=True),
        "full": Preset(akd=True, dacg=True, cba=True, sicd=True),
    }
)


def _as_map(H: np.ndarray, name: str = "H") -> np.ndarray:
    """Validate an (h, w) finite map and return it as float64 (a copy only if needed)."""
    a = np.asarray(H)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (h, w) map, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite values")
    return a


def _check_steps(n_steps: int) -> int:
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer (real denoising steps), got {n_steps!r}")
    return int(n_steps)


# ------------------------------------------------------------------ small-map kernels
# Refinement runs on grids of 8×8 to 32×32 cells, where numpy's per-call overhead, not
# arithmetic, is the cost (`np.percentile` alone is ~40 µs, `np.pad` ~15 µs on 64 cells).
# So percentiles come from one sort, reflect padding is a cached gather index, and the 2-D
# blur is two small matrix products. Each cached array is read-only and depends only on
# its arguments (shapes and constants), never on map values.


def _tail_percentile(srt: np.ndarray, count: np.ndarray, q: np.ndarray | float) -> np.ndarray:
    """Per row, numpy's default ('linear') percentile q of the last `count` values of `srt`.

    `srt` is (m, n) sorted ascending along rows, so its last `count[i]` entries are the
    values above any threshold (e.g. the strictly positive ones). numpy interpolates as
    ``b - (b - a)·(1 - t)`` when t ≥ 0.5 and ``a + (b - a)·t`` otherwise; both forms are
    kept so a row agrees with `np.percentile` on those values. Rows with count 0 give NaN.
    `count` and `q` broadcast, so (k, m) counts with (k, 1) levels give k percentiles per
    row in one call.
    """
    m, n = srt.shape
    c = np.asarray(count, dtype=np.int64)
    last = np.maximum(c - 1, 0)  # index of the row's largest value within its tail
    pos = (np.asarray(q, dtype=np.float64) / 100.0) * last
    lo = pos.astype(np.int64)  # pos ≥ 0, so truncation is floor
    t = pos - lo
    flat = srt.ravel()
    base = np.arange(m) * n + (n - c) + lo
    a = flat[np.minimum(base, flat.size - 1)]
    b = flat[np.minimum(base + (lo < last), flat.size - 1)]
    out = np.where(t >= 0.5, b - (b - a) * (1.0 - t), a + (b - a) * t)
    return np.where(c > 0, out, np.nan)


def _reflect_index(n: int, pad: int) -> np.ndarray:
    """Source index of each cell of a length-n axis padded by `pad` (numpy `reflect` mode)."""
    i = np.arange(-pad, n + pad)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i < n, i, period - i)


def _mean_std(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-map mean and population std of an (m, h, w) stack, as (m, 1, 1) arrays.

    The same two-pass arithmetic as `np.std`, without its Python-level wrappers.
    """
    n = X.shape[1] * X.shape[2]
    mean = X.sum(axis=(1, 2), keepdims=True) / n
    dev = X - mean
    return mean, np.sqrt((dev * dev).sum(axis=(1, 2), keepdims=True) / n)


@lru_cache(maxsize=128)
def _window_index(h: int, w: int, k: int) -> np.ndarray:
    """(h·w, k·k) flat indices of every cell's k×k reflect-padded window, row-major."""
    p = k // 2
    rows = _reflect_index(h, p)[np.arange(h)[:, None] + np.arange(k)[None, :]]  # (h, k)
    cols = _reflect_index(w, p)[np.arange(w)[:, None] + np.arange(k)[None, :]]  # (w, k)
    idx = (rows[:, None, :, None] * w + cols[None, :, None, :]).reshape(h * w, k * k)
    idx.flags.writeable = False
    return idx


@lru_cache(maxsize=128)
def _blur_matrix(n: int, size: int, sigma: float) -> np.ndarray:
    """(n, n) matrix of a normalised 1-D Gaussian with reflect padding: B @ x blurs x."""
    d = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(d**2) / (2.0 * sigma**2))
    g /= g.sum()
    src = _reflect_index(n, size // 2)
    B = np.zeros((n, n))
    for tap in range(size):  # one vectorised add per tap; built once per (n, size, sigma)
        np.add.at(B, (np.arange(n), src[np.arange(n) + tap]), g[tap])
    B.flags.writeable = False
    return B


def akd_kernel_size(H: np.ndarray, n_steps: int, settings: RefineSettings = DEFAULT_SETTINGS) -> int:
    """AKD kernel size k (docs/METHOD.md §3): larger with more steps, more variation, bigger grids.

    k = nearest odd of 3·f_step·f_std·f_size (ties go up), clamped to [3, k_max] with
    f_step = min(n_steps/16, 2), f_std = min(5·std(H), 2) (population std), f_size =
    min(side/24, 1.5), side = min(h, w), k_max = min(11, largest odd ≤ side/2).

    Tiny grids (our choice; METHOD leaves k_max < 3 open): for 3 ≤ side < 6 k_max would be
    1, and we return 3 (a window still fits with one reflected cell); for side < 3 we return
    1, which makes `akd` the identity (skipped). Deviation from the reference: it used a
    constant step ratio, `side/512` and truncation, so k was always 3.
    """
    a = _as_map(H)
    return int(_akd_kernel_sizes(a[None], np.array([_check_steps(n_steps)]), settings)[0])


def _akd_kernel_sizes(X: np.ndarray, n_steps: np.ndarray, s: RefineSettings) -> np.ndarray:
    """`akd_kernel_size` for every map of an (m, h, w) stack; n_steps is (m,)."""
    side = min(X.shape[1:])
    if side < s.akd_k_min:
        return np.ones(X.shape[0], dtype=np.int64)
    half = int(np.floor(side / 2.0))
    largest_odd = half if half % 2 == 1 else half - 1
    k_max = max(min(s.akd_k_max, largest_odd), s.akd_k_min)
    f_step = np.minimum(n_steps / s.akd_step_ref, s.akd_step_cap)
    f_std = np.minimum(s.akd_std_gain * _mean_std(X)[1].ravel(), s.akd_std_cap)
    f_size = min(side / s.akd_side_ref, s.akd_size_cap)
    k = 2 * np.floor(s.akd_base * f_step * f_std * f_size / 2.0).astype(np.int64) + 1  # nearest odd, ties up
    return np.minimum(np.maximum(k, s.akd_k_min), k_max)


def akd(
    H: np.ndarray,
    n_steps: int,
    settings: RefineSettings = DEFAULT_SETTINGS,
    *,
    kernel_size: int | None = None,
) -> np.ndarray:
    """Adaptive Kernel Denoising: rank-Gaussian filter (docs/METHOD.md §3, AKD).

    Each pixel's k×k window (numpy `reflect` padding, as the reference) is sorted; with
    m = mean and σ = std/m of the window, weights w_j ∝ exp(−(j − ⌊k²/2⌋)²/(2σ²)) over the
    ranks give Σ w_j s_j: a quiet window returns ~its median (spikes removed, flat regions
    unchanged), a busy window ~its mean. Output 0 where m ≤ 0; the exact median where
    σ < `akd_flat_cv` (reference: NaN there). k from `akd_kernel_size` unless
    `kernel_size` (odd) is given. Vectorised: one gather of all windows + one sort.
    Deviation: no 1e-6 random noise is injected first (the reference's was unseeded).
    """
    a = _as_map(H)
    if kernel_size is None:
        k = int(_akd_kernel_sizes(a[None], np.array([_check_steps(n_steps)]), settings)[0])
    else:
        k = int(kernel_size)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    return _akd(a[None], np.array([k]), settings)[0]


_AKD_CHUNK_VALUES = 32768


def _akd(X: np.ndarray, ks: np.ndarray, settings: RefineSettings) -> np.ndarray:
    """AKD on an (m, h, w) stack, map i with kernel ks[i]: one gather + one sort per k."""
    out = X.copy()
    m, h, w = X.shape
    flat_maps = X.reshape(m, h * w)
    for k in (ks[:1] if ks.min() == ks.max() else np.unique(ks)):
        k = int(k)
        if k == 1:
            continue
        kk = k * k
        same_k = np.flatnonzero(ks == k)
        # Chunks of ≤ ~256 KiB of windows: large grids stay in cache, small ones still batch.
        chunk = max(1, _AKD_CHUNK_VALUES // (h * w * kk))
        for start in range(0, len(same_k), chunk):
            sel = same_k[start : start + chunk]
            rows = flat_maps if len(sel) == m else flat_maps[sel]
            s = np.take(rows, _window_index(h, w, k), axis=1)  # (m_k, h·w, k·k) windows
            s.sort(axis=2)
            ones = np.ones(kk)  # sums over the short last axis as products: far less overhead
            mean = (s @ ones) / kk
            dev = s - mean[..., None]
            std = np.sqrt(((dev * dev) @ ones) / kk)
            positive = mean > 0
            cv = std / np.where(positive, mean, 1.0)
            flat = ~positive | (cv < settings.akd_flat_cv)
            safe_cv = np.where(flat, 1.0, cv)
            ranks_sq = (np.arange(kk, dtype=np.float64) - kk // 2) ** 2
            wts = np.exp(ranks_sq * (-0.5 / (safe_cv * safe_cv))[..., None])
            smooth = np.einsum("ijk,ijk->ij", s, wts) / (wts @ ones)
            res = np.where(flat, s[..., kk // 2], smooth)
            out[sel] = np.where(positive, res, 0.0).reshape(len(sel), h, w)
    return out


def gaussian_blur(H: np.ndarray, size: int = 3, sigma: float = 1.0) -> np.ndarray:
    """Normalised size×size Gaussian blur with `reflect` padding (the 2-D blur DACG needs)."""
    a = _as_map(H)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd integer, got {size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return _blur(a[None], size, float(sigma))[0]


def _blur(X: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Blur every map of an (m, h, w) stack. The Gaussian is separable (outer(g, g)/Σ =
    outer(g/Σg, g/Σg)), so it is one matrix product per axis."""
    if size == 1:
        return X.copy()
    h, w = X.shape[1:]
    return _blur_matrix(h, size, sigma) @ X @ _blur_matrix(w, size, sigma).T


def dacg_threshold(H: np.ndarray, settings: RefineSettings = DEFAULT_SETTINGS) -> tuple[float, float]:
    """DACG's (percentile, ζ): percentile from μ, σ of the map; ζ over its positive values.

    σ > 0.22 → 90; else μ > 0.35 → 75; else μ < 0.25 → 80; else 85 (population std).
    ζ = that percentile (numpy 'linear') of the strictly positive values, 1e-6 if none.
    """
    pct, zeta = _dacg_thresholds(_as_map(H)[None], settings)
    return float(pct[0]), float(zeta[0])


def _dacg_thresholds(X: np.ndarray, s: RefineSettings) -> tuple[np.ndarray, np.ndarray]:
    """(percentile, ζ) of every map of an (m, h, w) stack."""
    mu, sd = (v.ravel() for v in _mean_std(X))
    pct = np.where(
        sd > s.dacg_sigma_high,
        s.dacg_p_high_var,
        np.where(mu > s.dacg_mu_high, s.dacg_p_high_mean, np.where(mu < s.dacg_mu_low, s.dacg_p_low_mean, s.dacg_p_default)),
    )
    srt = np.sort(X.reshape(X.shape[0], -1), axis=1)
    count = np.count_nonzero(srt > 0, axis=1)
    zeta = np.where(count > 0, _tail_percentile(srt, count, pct), s.dacg_zeta_empty)
    return pct, zeta


def dacg(H: np.ndarray, settings: RefineSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Distribution-Aware Confidence Gating (docs/METHOD.md §3, DACG).

    Pixels > ζ (see `dacg_threshold`) are high-confidence and returned bit-identical;
    pixels ≤ ζ take the value of the whole map blurred with a 3×3 Gaussian (σ_g = 1.0,
    `reflect` padding) at that pixel, so low-confidence noise is smoothed while peaks keep
    their exact values. Deviation: the reference blurred the gathered low values as an
    N×1 column with a (3, 1) kernel, i.e. across the singleton axis — a no-op.
    """
    return _dacg(_as_map(H)[None], settings)[0]


def _dacg(X: np.ndarray, settings: RefineSettings) -> np.ndarray:
    _, zeta = _dacg_thresholds(X, settings)
    smooth = _blur(X, settings.dacg_kernel, settings.dacg_sigma)
    return np.where(X > zeta[:, None, None], X, smooth)


def cba_delta(H: np.ndarray, settings: RefineSettings = DEFAULT_SETTINGS) -> float:
    """CBA's background level δ = 0.15·P50(nz) + 0.15·P60(all) + 0.20·mean(nz) + 0.015·max(H).

    nz = strictly positive values; with none, the nz terms are 0 (reference: δ = 1e-6;
    either way nothing positive exists to attenuate).
    """
    return float(_cba_deltas(_as_map(H)[None], settings)[0])


_CBA_LEVELS = np.array([[50.0], [60.0]])  # P50 of the positive values, P60 of all


def _cba_deltas(X: np.ndarray, s: RefineSettings) -> np.ndarray:
    """δ of every map of an (m, h, w) stack (one sort per stack)."""
    m = X.shape[0]
    srt = np.sort(X.reshape(m, -1), axis=1)
    n = srt.shape[1]
    positive = srt > 0
    count = np.count_nonzero(positive, axis=1)
    has_nz = count > 0
    p50_nz, p60_all = _tail_percentile(srt, np.stack([count, np.full(m, n)]), _CBA_LEVELS)
    p50_nz = np.where(has_nz, p50_nz, 0.0)
    mean_nz = np.where(has_nz, (srt * positive) @ np.ones(n) / np.maximum(count, 1), 0.0)
    return s.cba_w_p50_nz * p50_nz + s.cba_w_p60_all * p60_all + s.cba_w_mean_nz * mean_nz + s.cba_w_max * srt[:, -1]


def cba(H: np.ndarray, settings: RefineSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Contextual Background Attenuation (docs/METHOD.md §3, CBA).

    v < δ → v·clip(v/δ, floor, 1): values ≥ δ unchanged, δ·floor ≤ v < δ become v²/δ,
    lower values are multiplied by floor. Monotone and continuous, so ranking is kept
    while background mass drops. δ ≤ 0 (no positive values) → map unchanged.
    Deviation: the reference's extra ×0.3 below 0.2·δ is omitted — its own final clip to
    [0.5, 1] undid it.
    """
    return _cba(_as_map(H)[None], settings)[0]


def _cba(X: np.ndarray, settings: RefineSettings) -> np.ndarray:
    delta = _cba_deltas(X, settings)[:, None, None]
    active = delta > 0  # δ ≤ 0 (nothing positive): the map is left unchanged
    factor = np.minimum(np.maximum(X / np.where(active, delta, 1.0), settings.cba_floor), 1.0)
    return np.where(active & (X < delta), X * factor, X)


def clip_minmax(H: np.ndarray, raw_max: float, settings: RefineSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Clip to [0, raw_max], then (H − min)/(max − min + eps) — the step between CBA and SICD.

    As in the reference, a constant map is left as it is (min-max would turn a uniform map
    into an all-zero one); an all-zero map stays all-zero.
    """
    return _clip_minmax(_as_map(H)[None], np.array([float(raw_max)]), settings)[0]


def _clip_minmax(X: np.ndarray, raw_max: np.ndarray, settings: RefineSettings) -> np.ndarray:
    """Per map of an (m, h, w) stack, with raw_max (m,)."""
    a = np.minimum(np.maximum(X, 0.0), np.maximum(raw_max, 0.0)[:, None, None])
    lo, hi = a.min(axis=(1, 2), keepdims=True), a.max(axis=(1, 2), keepdims=True)
    scaled = (a - lo) / (hi - lo + settings.minmax_eps)
    return np.where(hi > lo, scaled, a)


def heuristic_interference(
    H: np.ndarray, repeat_share: float, settings: RefineSettings = DEFAULT_SETTINGS
) -> np.ndarray:
    """Reference SICD interference when the answer has no function words (docs/METHOD.md §3).

    I = 0.05·r + 0.02·1[H > μ + 2σ], r = share of repeated content tokens (the caller
    excludes padding and end tokens). Computed on the map SICD receives.
    """
    r = float(repeat_share)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"repeat_share must be in [0, 1], got {repeat_share!r}")
    return _heuristic_interference(_as_map(H)[None], np.array([r]), settings)[0]


def _heuristic_interference(X: np.ndarray, r: np.ndarray, s: RefineSettings) -> np.ndarray:
    """Per map of an (m, h, w) stack, with repeat shares r (m,)."""
    mean, std = _mean_std(X)
    spikes = X > mean + s.heur_spike_nsigma * std
    return s.heur_repeat_coef * r[:, None, None] + s.heur_spike_coef * spikes.astype(np.float64)


def sicd(H: np.ndarray, interference: np.ndarray, settings: RefineSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Single-Instance Causal Debiasing (docs/METHOD.md §3, SICD): subtract the non-specific part.

    α* = ⟨H,I⟩/⟨I,I⟩ (least squares of H ≈ α·I) clipped to [0, 0.5]; H′ = max(H − α*·I, 0);
    H is kept instead if range(H′) < 0.9·range(H) (the subtraction ate the signal). An
    all-zero I leaves H unchanged. No renormalisation afterwards (METHOD's order ends here).
    """
    a = _as_map(H)
    i = _as_map(interference, "interference")
    if i.shape != a.shape:
        raise ValueError(f"interference is {i.shape[0]}x{i.shape[1]}, map is {a.shape[0]}x{a.shape[1]}")
    return _sicd(a[None], i[None], settings)[0]


def _sicd(X: np.ndarray, Z: np.ndarray, settings: RefineSettings) -> np.ndarray:
    """Per map of an (m, h, w) stack with its own (m, h, w) interference."""
    ii = (Z * Z).sum(axis=(1, 2))
    active = ii > 0.0  # an all-zero interference leaves the map unchanged
    alpha = np.minimum(np.maximum((X * Z).sum(axis=(1, 2)) / np.where(active, ii, 1.0), 0.0), settings.sicd_alpha_max)
    out = np.maximum(X - alpha[:, None, None] * Z, 0.0)
    def ptp(a: np.ndarray) -> np.ndarray:
        return a.max(axis=(1, 2)) - a.min(axis=(1, 2))

    keep = ptp(out) >= settings.sicd_keep_ratio * ptp(X)
    return np.where((active & keep)[:, None, None], out, X)


def refine(
    H: np.ndarray,
    preset: str,
    *,
    n_steps: int,
    interference: np.ndarray | None = None,
    repeat_share: float = 0.0,
    settings: RefineSettings = DEFAULT_SETTINGS,
) -> np.ndarray:
    """Apply a refinement preset to a raw map: AKD → DACG → CBA → clip/min-max → SICD.

    `raw` returns a float64 copy of H. Every other preset runs its modules in docs/METHOD.md §3
    order, then the clip to [0, max raw] and min-max, then SICD if enabled, with the
    function-word `interference` map or, when None, `heuristic_interference(·, repeat_share)`.
    `n_steps` is the real number of denoising steps (drives AKD's kernel size). An all-zero
    map returns all zeros. Raises ValueError for an unknown preset, a map that is not a
    finite non-negative (h, w) array, or an interference map of another shape.
    For many maps (every word of an answer) `refine_stack` does the same in one call.
    """
    a = _as_map(H)
    return refine_stack(a[None], preset, n_steps=n_steps, interference=[interference],
                        repeat_share=repeat_share, settings=settings)[0]


def refine_stack(
    maps: np.ndarray | Sequence[np.ndarray],
    preset: str,
    *,
    n_steps: int | Sequence[int],
    interference: Sequence[np.ndarray | None] | None = None,
    repeat_share: float | Sequence[float] = 0.0,
    settings: RefineSettings = DEFAULT_SETTINGS,
) -> np.ndarray:
    """`refine` for m maps of one grid at once: (m, h, w) in, (m, h, w) float64 out.

    Row i equals `refine(maps[i], preset, n_steps=n_steps[i], interference=interference[i],
    repeat_share=repeat_share[i])`; scalars apply to every map, and `interference` is one
    entry (a map or None) per map. Every per-map quantity (AKD's k, DACG's ζ, CBA's δ,
    SICD's α) is still computed per map; batching only shares numpy's call overhead, which
    dominates on 8×8 grids.
    """
    spec = PRESETS.get(preset) if isinstance(preset, str) else None
    if spec is None:
        raise ValueError(f"unknown refine preset {preset!r}; valid: {', '.join(PRESETS)}")
    X = np.asarray(maps)
    if X.ndim != 3 or X.shape[0] == 0 or X.shape[1] == 0 or X.shape[2] == 0:
        raise ValueError(f"maps must be a non-empty (m, h, w) stack, got shape {X.shape}")
    m = X.shape[0]
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"maps must be a real numeric array, got dtype {X.dtype}")
    X = X.astype(np.float64, copy=False)
    finite = np.isfinite(X)
    if not finite.all():
        bad = int(np.flatnonzero(~finite.all(axis=(1, 2)))[0])
        raise ValueError(f"map {bad} has {int((~finite[bad]).sum())} non-finite values")
    if float(X.min()) < 0:
        raise ValueError(f"H must be non-negative (a §2 map in [0, 1]), min is {float(X.min())}")
    steps = np.array([_check_steps(n) for n in _per_map(n_steps, m, "n_steps")])
    shares = np.array([float(r) for r in _per_map(repeat_share, m, "repeat_share")])
    if not ((shares >= 0.0) & (shares <= 1.0)).all():
        raise ValueError(f"repeat_share must be in [0, 1], got {repeat_share!r}")
    given: list[np.ndarray | None] = [None] * m if interference is None else list(interference)
    if len(given) != m:
        raise ValueError(f"interference has {len(given)} entries for {m} maps")
    for j, i in enumerate(given):
        if i is not None:
            given[j] = i = _as_map(i, "interference")
            if i.shape != X.shape[1:]:
                raise ValueError(f"interference is {i.shape[0]}x{i.shape[1]}, map is {X.shape[1]}x{X.shape[2]}")
    if spec == PRESETS["raw"]:
        return X.copy()
    # Inputs are validated once above; the modules below run unchecked on the whole stack.
    raw_max = X.max(axis=(1, 2))
    if spec.akd:
        X = _akd(X, _akd_kernel_sizes(X, steps, settings), settings)
    if spec.dacg:
        X = _dacg(X, settings)
    if spec.cba:
        X = _cba(X, settings)
    X = _clip_minmax(X, raw_max, settings)
    if spec.sicd:
        if all(i is None for i in given):
            Z = _heuristic_interference(X, shares, settings)
        else:
            Z = np.stack([_heuristic_interference(X[j : j + 1], shares[j : j + 1], settings)[0] if i is None else i
                          for j, i in enumerate(given)])
        X = _sicd(X, Z, settings)
    return X


def _per_map(value, m: int, name: str) -> list:
    """A scalar repeated m times, or a sequence that must have m entries."""
    if np.ndim(value) == 0:
        return [value] * m
    values = list(value)
    if len(values) != m:
        raise ValueError(f"{name} has {len(values)} entries for {m} maps")
    return values
