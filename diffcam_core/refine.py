"""The four refinement modules of Diffusion-CAM (METHOD.md §3) as pure numpy functions.

Every function takes an (h, w) map, returns a new float64 array and never mutates its
inputs. The full method runs AKD → DACG → CBA → clip to [0, max raw] and min-max → SICD;
`refine` applies a named preset from `PRESETS`. All constants live in `RefineSettings`.

Deviations from the authors' reference code (METHOD.md §7), each repeated where it applies:
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

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

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
    "sicd",
]


@dataclass(frozen=True)
class RefineSettings:
    """Every constant of METHOD.md §3 in one saved-with-the-run object (STYLE habit 8)."""

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
    dacg_sigma: float = 1.0
    # CBA: δ = w_p50_nz·P50(nz) + w_p60_all·P60(all) + w_mean_nz·mean(nz) + w_max·max(H)
    cba_w_p50_nz: float = 0.15
    cba_w_p60_all: float = 0.15
    cba_w_mean_nz: float = 0.20
    cba_w_max: float = 0.015
    cba_floor: float = 0.5
    # clip + min-max between CBA and SICD (the §2 normalisation epsilon)
    minmax_eps: float = 1e-8
    # SICD
    sicd_alpha_max: float = 0.5
    sicd_keep_ratio: float = 0.9
    heur_repeat_coef: float = 0.05  # I = heur_repeat_coef·r + heur_spike_coef·1[H > μ + kσ]
    heur_spike_coef: float = 0.02
    heur_spike_nsigma: float = 2.0

    def __post_init__(self) -> None:
        for name in ("akd_k_min", "akd_k_max", "dacg_kernel"):
            v = getattr(self, name)
            if v < 1 or v % 2 == 0:
                raise ValueError(f"RefineSettings.{name} must be a positive odd integer, got {v}")
        if self.akd_k_min > self.akd_k_max:
            raise ValueError(f"akd_k_min {self.akd_k_min} > akd_k_max {self.akd_k_max}")
        if not 0.0 < self.cba_floor <= 1.0:
            raise ValueError(f"cba_floor must be in (0, 1], got {self.cba_floor}")
        if self.dacg_sigma <= 0:
            raise ValueError(f"dacg_sigma must be > 0, got {self.dacg_sigma}")
        if not 0.0 <= self.sicd_alpha_max:
            raise ValueError(f"sicd_alpha_max must be >= 0, got {self.sicd_alpha_max}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for saving with a run (JSON-serialisable)."""
        return asdict(self)


DEFAULT_SETTINGS = RefineSettings()


@dataclass(frozen=True)
class Preset:
    """Which modules a preset runs; the order is fixed by METHOD.md §3."""

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


def _nearest_odd(x: float) -> int:
    """Nearest odd integer to x; a tie (x an even integer) goes up."""
    return 2 * int(np.floor(x / 2.0)) + 1


def akd_kernel_size(H: np.ndarray, n_steps: int, settings: RefineSettings = DEFAULT_SETTINGS) -> int:
    """AKD kernel size k (METHOD.md §3): larger with more steps, more variation, bigger grids.

    k = nearest odd of 3·f_step·f_std·f_size (ties go up), clamped to [3, k_max] with
    f_step = min(n_steps/16, 2), f_std = min(5·std(H), 2) (population std), f_size =
    min(side/24, 1.5), side = min(h, w), k_max = min(11, largest odd ≤ side/2).

    Tiny grids (our choice; METHOD leaves k_max < 3 open): for 3 ≤ side < 6 k_max would be
    1, and we return 3 (a window still fits with one reflected cell); for side < 3 we return
    1, which makes `akd` the identity (skipped). Deviation from the reference: it used a
    constant step ratio, `side/512` and truncation, so k was always 3.
    """
    a = _as_map(H)
    n = _check_steps(n_steps)
    s = settings
    side = min(a.shape)
    if side < s.akd_k_min:
        return 1
    half = int(np.floor(side / 2.0))
    largest_odd = half if half % 2 == 1 else half - 1
    k_max = max(min(s.akd_k_max, largest_odd), s.akd_k_min)
    f_step = min(n / s.akd_step_ref, s.akd_step_cap)
    f_std = min(s.akd_std_gain * float(a.std()), s.akd_std_cap)
    f_size = min(side / s.akd_side_ref, s.akd_size_cap)
    k = _nearest_odd(s.akd_base * f_step * f_std * f_size)
    return int(min(max(k, s.akd_k_min), k_max))


def akd(
    H: np.ndarray,
    n_steps: int,
    settings: RefineSettings = DEFAULT_SETTINGS,
    *,
    kernel_size: int | None = None,
) -> np.ndarray:
    """Adaptive Kernel Denoising: rank-Gaussian filter (METHOD.md §3, AKD).

    Each pixel's k×k window (numpy `reflect` padding, as the reference) is sorted; with
    m = mean and σ = std/m of the window, weights w_j ∝ exp(−(j − ⌊k²/2⌋)²/(2σ²)) over the
    ranks give Σ w_j s_j: a quiet window returns ~its median (spikes removed, flat regions
    unchanged), a busy window ~its mean. Output 0 where m ≤ 0; the exact median where
    σ < `akd_flat_cv` (reference: NaN there). k from `akd_kernel_size` unless
    `kernel_size` (odd) is given. Vectorised with `sliding_window_view` + sort.
    Deviation: no 1e-6 random noise is injected first (the reference's was unseeded).
    """
    a = _as_map(H)
    k = akd_kernel_size(a, n_steps, settings) if kernel_size is None else int(kernel_size)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    if k == 1:
        return a.copy()
    h, w = a.shape
    p = k // 2
    padded = np.pad(a, p, mode="reflect")
    s = np.sort(sliding_window_view(padded, (k, k)).reshape(h, w, k * k), axis=-1)
    mean = s.mean(axis=-1)
    std = s.std(axis=-1)
    positive = mean > 0
    cv = np.divide(std, mean, out=np.zeros_like(std), where=positive)
    flat = cv < settings.akd_flat_cv
    safe_cv = np.where(flat, 1.0, cv)
    ranks = np.arange(k * k, dtype=np.float64) - (k * k) // 2
    wts = np.exp(-(ranks**2) / (2.0 * safe_cv[..., None] ** 2))
    wts /= wts.sum(axis=-1, keepdims=True)
    out = (s * wts).sum(axis=-1)
    out = np.where(flat, s[..., (k * k) // 2], out)
    return np.where(positive, out, 0.0)


def gaussian_blur(H: np.ndarray, size: int = 3, sigma: float = 1.0) -> np.ndarray:
    """Normalised size×size Gaussian blur with `reflect` padding (the 2-D blur DACG needs)."""
    a = _as_map(H)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd integer, got {size}")
    if size == 1:
        return a.copy()
    d = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(d**2) / (2.0 * sigma**2))
    kernel = np.outer(g, g)
    kernel /= kernel.sum()
    padded = np.pad(a, size // 2, mode="reflect")
    h, w = a.shape
    out = np.zeros((h, w))
    for di in range(size):  # a loop over the size² kernel taps, each a whole-map operation
        for dj in range(size):
            out += kernel[di, dj] * padded[di : di + h, dj : dj + w]
    return out


def dacg_threshold(H: np.ndarray, settings: RefineSettings = DEFAULT_SETTINGS) -> tuple[float, float]:
    """DACG's (percentile, ζ): percentile from μ, σ of the map; ζ over its positive values.

    σ > 0.22 → 90; else μ > 0.35 → 75; else μ < 0.25 → 80; else 85 (population std).
    ζ = that percentile (numpy 'linear') of the strictly positive values, 1e-6 if none.
    """
    a = _as_map(H)
    s = settings
    mu, sd = float(a.mean()), float(a.std())
    if sd > s.dacg_sigma_high:
        pct = s.dacg_p_high_var
    elif mu > s.dacg_mu_high:
        pct = s.dacg_p_high_mean
    elif mu < s.dacg_mu_low:
        pct = s.dacg_p_low_mean
    else:
        pct = s.dacg_p_default
    pos = a[a > 0]
    zeta = float(np.percentile(pos, pct)) if pos.size else s.dacg_zeta_empty
    return pct, zeta


def dacg(H: np.ndarray, settings: RefineSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Distribution-Aware Confidence Gating (METHOD.md §3, DACG).

    Pixels > ζ (see `dacg_threshold`) are high-confidence and returned bit-identical;
    pixels ≤ ζ take the value of the whole map blurred with a 3×3 Gaussian (σ_g = 1.0,
    `reflect` padding) at that pixel, so low-confidence noise is smoothed while peaks keep
    their exact values. Deviation: the reference blurred the gathered low values as an
    N×1 column with a (3, 1) kernel, i.e. across the singleton axis — a no-op.
    """
    a = _as_map(H)
    _, zeta = dacg_threshold(a, settings)
    smooth = gaussian_blur(a, settings.dacg_kernel, settings.dacg_sigma)
    return np.where(a > zeta, a, smooth)


def cba_delta(H: np.ndarray, settings: RefineSettings = DEFAULT_SETTINGS) -> float:
    """CBA's background level δ = 0.15·P50(nz) + 0.15·P60(all) + 0.20·mean(nz) + 0.015·max(H).

    nz = strictly positive values; with none, the nz terms are 0 (reference: δ = 1e-6;
    either way nothing positive exists to attenuate).
    """
    a = _as_map(H)
    s = settings
    nz = a[a > 0]
    p50_nz = float(np.percentile(nz, 50)) if nz.size else 0.0
    mean_nz = float(nz.mean()) if nz.size else 0.0
    return (
        s.cba_w_p50_nz * p50_nz
        + s.cba_w_p60_all * float(np.percentile(a, 60))
        + s.cba_w_mean_nz * mean_nz
        + s.cba_w_max * float(a.max())
    )


def cba(H: np.ndarray, settings: RefineSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Contextual Background Attenuation (METHOD.md §3, CBA).

    v < δ → v·clip(v/δ, floor, 1): values ≥ δ unchanged, δ·floor ≤ v < δ become v²/δ,
    lower values are multiplied by floor. Monotone and continuous, so ranking is kept
    while background mass drops. δ ≤ 0 (no positive values) → map unchanged.
    Deviation: the reference's extra ×0.3 below 0.2·δ is omitted — its own final clip to
    [0.5, 1] undid it.
    """
    a = _as_map(H)
    delta = cba_delta(a, settings)
    if delta <= 0:
        return a.copy()
    factor = np.clip(a / delta, settings.cba_floor, 1.0)
    return np.where(a < delta, a * factor, a)


def clip_minmax(H: np.ndarray, raw_max: float, settings: RefineSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Clip to [0, raw_max], then (H − min)/(max − min + eps) — the step between CBA and SICD.

    As in the reference, a constant map is left as it is (min-max would turn a uniform map
    into an all-zero one); an all-zero map stays all-zero.
    """
    a = np.clip(_as_map(H), 0.0, max(float(raw_max), 0.0))
    lo, hi = float(a.min()), float(a.max())
    if hi > lo:
        return (a - lo) / (hi - lo + settings.minmax_eps)
    return a


def heuristic_interference(
    H: np.ndarray, repeat_share: float, settings: RefineSettings = DEFAULT_SETTINGS
) -> np.ndarray:
    """Reference SICD interference when the answer has no function words (METHOD.md §3).

    I = 0.05·r + 0.02·1[H > μ + 2σ], r = share of repeated content tokens (the caller
    excludes padding and end tokens). Computed on the map SICD receives.
    """
    a = _as_map(H)
    r = float(repeat_share)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"repeat_share must be in [0, 1], got {repeat_share!r}")
    s = settings
    spikes = a > a.mean() + s.heur_spike_nsigma * a.std()
    return s.heur_repeat_coef * r + s.heur_spike_coef * spikes.astype(np.float64)


def sicd(H: np.ndarray, interference: np.ndarray, settings: RefineSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Single-Instance Causal Debiasing (METHOD.md §3, SICD): subtract the non-specific part.

    α* = ⟨H,I⟩/⟨I,I⟩ (least squares of H ≈ α·I) clipped to [0, 0.5]; H′ = max(H − α*·I, 0);
    H is kept instead if range(H′) < 0.9·range(H) (the subtraction ate the signal). An
    all-zero I leaves H unchanged. No renormalisation afterwards (METHOD's order ends here).
    """
    a = _as_map(H)
    i = _as_map(interference, "interference")
    if i.shape != a.shape:
        raise ValueError(f"interference is {i.shape[0]}x{i.shape[1]}, map is {a.shape[0]}x{a.shape[1]}")
    ii = float(np.sum(i * i))
    if ii == 0.0:
        return a.copy()
    alpha = min(max(float(np.sum(a * i)) / ii, 0.0), settings.sicd_alpha_max)
    out = np.maximum(a - alpha * i, 0.0)
    if np.ptp(out) < settings.sicd_keep_ratio * np.ptp(a):
        return a.copy()
    return out


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

    `raw` returns a float64 copy of H. Every other preset runs its modules in METHOD.md §3
    order, then the clip to [0, max raw] and min-max, then SICD if enabled, with the
    function-word `interference` map or, when None, `heuristic_interference(·, repeat_share)`.
    `n_steps` is the real number of denoising steps (drives AKD's kernel size). An all-zero
    map returns all zeros. Raises ValueError for an unknown preset, a map that is not a
    finite non-negative (h, w) array, or an interference map of another shape.
    """
    spec = PRESETS.get(preset) if isinstance(preset, str) else None
    if spec is None:
        raise ValueError(f"unknown refine preset {preset!r}; valid: {', '.join(PRESETS)}")
    a = _as_map(H)
    if float(a.min()) < 0:
        raise ValueError(f"H must be non-negative (a §2 map in [0, 1]), min is {float(a.min())}")
    _check_steps(n_steps)
    if interference is not None:
        i = _as_map(interference, "interference")
        if i.shape != a.shape:
            raise ValueError(f"interference is {i.shape[0]}x{i.shape[1]}, map is {a.shape[0]}x{a.shape[1]}")
    if spec == PRESETS["raw"]:
        return a.copy()
    raw_max = float(a.max())
    x = a
    if spec.akd:
        x = akd(x, n_steps, settings)
    if spec.dacg:
        x = dacg(x, settings)
    if spec.cba:
        x = cba(x, settings)
    x = clip_minmax(x, raw_max, settings)
    if spec.sicd:
        interf = interference if interference is not None else heuristic_interference(x, repeat_share, settings)
        x = sicd(x, interf, settings)
    return x
