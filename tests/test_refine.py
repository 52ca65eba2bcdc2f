"""Refinement modules (docs/METHOD.md §3): each does what it claims, and equals the literal version."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydantic
import pytest

from diffcam.core import refine as R
from tests import literal_reference as L

SEEDS = (0, 1, 2)
SHAPES = ((8, 8), (12, 16), (24, 24))


def frozen(a: np.ndarray) -> np.ndarray:
    """A read-only copy: any in-place write by the code under test raises."""
    b = np.array(a, dtype=np.float64)
    b.flags.writeable = False
    return b


def cam_like(seed: int, shape: tuple[int, int]) -> np.ndarray:
    """A raw-map-like test input: two Gaussian blobs + noise + a few zeros, min-max to [0, 1]."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    m = np.zeros(shape)
    for _ in range(2):
        cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1.0, max(h, w) / 4)
        m += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    m += 0.15 * rng.random(shape)
    m[rng.random(shape) < 0.1] = 0.0
    m = np.maximum(m - np.quantile(m, 0.05), 0)
    return frozen(m / m.max())


def checkerboard(shape: tuple[int, int], std: float) -> np.ndarray:
    """Cells alternate 0 and 2·std: population std is `std` exactly on an even cell count."""
    yy, xx = np.indices(shape)
    return frozen(((yy + xx) % 2) * 2.0 * std)


def total_variation(a: np.ndarray, region: np.ndarray) -> float:
    """Sum of |differences| between 4-neighbours that both lie in `region`."""
    dv = np.abs(np.diff(a, axis=0))[region[1:] & region[:-1]].sum()
    dh = np.abs(np.diff(a, axis=1))[region[:, 1:] & region[:, :-1]].sum()
    return float(dv + dh)


# ---------------------------------------------------------------- settings


def test_settings_hold_the_method_constants() -> None:
    s = R.RefineSettings()
    expected = {
        "akd_base": 3.0, "akd_step_ref": 16.0, "akd_step_cap": 2.0, "akd_std_gain": 5.0, "akd_std_cap": 2.0,
        "akd_side_ref": 24.0, "akd_size_cap": 1.5, "akd_k_min": 3, "akd_k_max": 11,
        "dacg_sigma_high": 0.22, "dacg_mu_high": 0.35, "dacg_mu_low": 0.25, "dacg_p_high_var": 90.0,
        "dacg_p_high_mean": 75.0, "dacg_p_low_mean": 80.0, "dacg_p_default": 85.0, "dacg_zeta_empty": 1e-6,
        "dacg_kernel": 3, "dacg_sigma": 1.0,
        "cba_w_p50_nz": 0.15, "cba_w_p60_all": 0.15, "cba_w_mean_nz": 0.20, "cba_w_max": 0.015, "cba_floor": 0.5,
        "minmax_eps": 1e-8, "sicd_alpha_max": 0.5, "sicd_keep_ratio": 0.9,
        "heur_repeat_coef": 0.05, "heur_spike_coef": 0.02, "heur_spike_nsigma": 2.0,
    }  # fmt: skip
    d = s.model_dump()
    for k, v in expected.items():
        assert d[k] == v, k
    assert R.RefineSettings.model_validate(d) == s
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        s.akd_k_max = 13  # type: ignore[misc]


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("akd_k_max", 10, "akd_k_max must be a positive odd"),
        ("dacg_kernel", 4, "dacg_kernel must be a positive odd"),
        ("cba_floor", 0.0, "cba_floor"),
        ("akd_k_min", 13, "akd_k_min 13 > akd_k_max 11"),
    ],
)
def test_settings_reject_invalid(field: str, value: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        R.RefineSettings(**{field: value})


# ---------------------------------------------------------------- AKD


@pytest.mark.parametrize(
    "shape,n_steps,std,k",
    [
        ((24, 24), 16, 0.2, 3),  # 3·1·1·1 = 3
        ((24, 24), 24, 0.2, 5),  # 3·1.5·1·1 = 4.5 → 5
        ((24, 24), 32, 0.25, 7),  # 3·2·1.25·1 = 7.5 → 7 (nearest odd)
        ((24, 24), 32, 0.3, 9),  # 3·2·1.5·1 = 9
        ((24, 24), 64, 0.3, 9),  # f_step capped at 2
        ((24, 24), 8, 0.3, 3),  # 2.25 → 3
        ((24, 24), 32, 0.1, 3),  # 3·2·0.5 = 3: less variation, smaller kernel
        ((24, 24), 32, 0.4, 11),  # 12 → 13 → clamp 11
        ((24, 48), 32, 0.25, 7),  # side = min(h, w)
        ((36, 36), 32, 0.25, 11),  # 3·2·1.25·1.5 = 11.25 → 11: bigger grid, bigger kernel
        ((48, 48), 32, 0.4, 11),  # 18 → clamp to 11 though side/2 = 24
        ((16, 16), 28, 0.4, 7),  # 3·1.75·2·(2/3) = 7
        ((16, 16), 32, 0.4, 7),  # 8 → k_max = 7 (largest odd <= 8)
        ((12, 12), 32, 0.4, 5),  # 6 → k_max = 5
        ((8, 8), 32, 0.4, 3),  # 4 → k_max = 3
    ],
)
def test_akd_kernel_size_follows_steps_std_and_side(shape, n_steps, std, k) -> None:
    H = checkerboard(shape, std)
    assert R.akd_kernel_size(H, n_steps) == k
    assert L.kernel_size(H, n_steps) == k


@pytest.mark.parametrize("shape,k", [((6, 6), 3), ((5, 5), 3), ((3, 40), 3), ((2, 8), 1), ((1, 1), 1)])
def test_akd_kernel_size_on_tiny_grids(shape, k) -> None:
    H = frozen(np.random.default_rng(0).random(shape))
    assert R.akd_kernel_size(H, 64) == k == L.kernel_size(H, 64)
    if k == 1:  # side < 3: AKD is skipped (identity)
        assert np.array_equal(R.akd(H, 64), H)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16"])
def test_akd_rejects_bad_step_counts(bad) -> None:
    with pytest.raises(ValueError, match="n_steps"):
        R.akd_kernel_size(checkerboard((8, 8), 0.2), bad)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_steps", [16, 48])
def test_akd_equals_literal(seed, shape, n_steps) -> None:
    H = cam_like(seed, shape)
    np.testing.assert_allclose(R.akd(H, n_steps), L.akd(H, n_steps), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_akd_equals_literal_at_fixed_kernel(k) -> None:
    H = frozen(np.random.default_rng(k).random((10, 13)) ** 2)
    np.testing.assert_allclose(R.akd(H, 16, kernel_size=k), L.akd(H, 16, k=k), rtol=0, atol=1e-12)


def test_akd_removes_an_isolated_spike() -> None:
    H = np.full((16, 16), 0.2)
    H[8, 8] = 1.0
    out = R.akd(frozen(H), 16)
    assert R.akd_kernel_size(H, 16) == 3
    # a 3×3 mean would leave 0.2 + 0.8/9 ≈ 0.289 at the spike; the rank filter all but erases it
    assert abs(out[8, 8] - 0.2) < 1e-3
    assert out.max() < 0.2 + 1e-3


def test_akd_leaves_flat_regions_unchanged() -> None:
    const = np.full((12, 12), 0.37)
    assert np.array_equal(R.akd(frozen(const), 32), const)  # σ = 0 → exact window median
    H = np.random.default_rng(3).random((16, 16))
    H[:, :8] = 0.3  # flat left half; a 3×3 window is flat for columns 0..6 (reflect at col 0)
    k = R.akd_kernel_size(H, 16)
    out = R.akd(frozen(H), 16)
    assert np.array_equal(out[:, : 8 - k // 2], H[:, : 8 - k // 2])
    assert not np.array_equal(out[:, 8:], H[:, 8:])


def test_akd_zero_windows_give_zero() -> None:
    H = np.zeros((10, 10))
    H[0, 0] = 1.0
    out = R.akd(frozen(H), 16)
    assert np.all(out[3:, 3:] == 0.0)
    assert np.array_equal(R.akd(frozen(np.zeros((8, 8))), 16), np.zeros((8, 8)))


# ---------------------------------------------------------------- DACG


def test_dacg_percentile_choice() -> None:
    rng = np.random.default_rng(0)
    small = 0.01 * rng.standard_normal((8, 8))
    cases = [
        (checkerboard((8, 8), 0.3), 90.0),  # σ = 0.3 > 0.22
        (0.5 + small, 75.0),  # μ = 0.5 > 0.35
        (0.1 + small, 80.0),  # μ = 0.1 < 0.25
        (0.3 + small, 85.0),  # otherwise
    ]
    for H, pct in cases:
        assert R.dacg_threshold(frozen(H))[0] == pct
        assert L.dacg_percentile(H) == pct


def test_dacg_zeta_is_the_percentile_of_positive_values() -> None:
    H = np.zeros((4, 4))
    H.ravel()[:11] = np.arange(1, 12) / 100.0  # positives 0.01..0.11, μ < 0.25 → P80
    pct, zeta = R.dacg_threshold(frozen(H))
    assert pct == 80.0
    assert zeta == pytest.approx(0.09, abs=1e-15)  # rank 0.8·(11 − 1) = 8 → the 9th positive value
    assert R.dacg_threshold(frozen(np.zeros((4, 4))))[1] == 1e-6


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_dacg_equals_literal(seed, shape) -> None:
    H = cam_like(seed, shape)
    np.testing.assert_allclose(R.dacg(H), L.dacg(H), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_dacg_keeps_high_confidence_bits_and_smooths_the_rest(seed) -> None:
    H = cam_like(seed, (24, 24))
    _, zeta = R.dacg_threshold(H)
    out = R.dacg(H)
    high = H > zeta
    assert high.any() and (~high).any()
    assert np.array_equal(out[high].view(np.uint64), H[high].view(np.uint64))
    assert total_variation(out, ~high) < total_variation(H, ~high)
    assert np.abs(out - H)[~high].max() > 1e-3


def reference_column_blur(H: np.ndarray, zeta: float) -> np.ndarray:
    """The reference's DACG: gather low values into an N×1 column and blur it with a (3, 1)
    kernel (cv2 ksize = (width 3, height 1), σ 0.3) — i.e. across the singleton axis, where
    every tap reads the pixel itself."""
    out = np.array(H, dtype=np.float64)
    low = ~(H > zeta)
    col = H[low].reshape(-1, 1)
    g = np.exp(-(np.array([-1.0, 0.0, 1.0]) ** 2) / (2 * 0.3**2))
    g /= g.sum()
    blurred = sum(g[t] * col[:, [0]] for t in range(3))  # column index clamps/reflects to 0
    out[low] = blurred.ravel()
    return out


def test_reference_column_blur_is_a_no_op_and_ours_is_not() -> None:
    H = cam_like(5, (16, 16))
    _, zeta = R.dacg_threshold(H)
    np.testing.assert_allclose(reference_column_blur(H, zeta), H, rtol=0, atol=1e-15)
    assert np.abs(R.dacg(H) - H).max() > 1e-2


def test_gaussian_blur_kernel_by_hand() -> None:
    H = np.zeros((5, 5))
    H[2, 2] = 1.0
    out = R.gaussian_blur(frozen(H), 3, 1.0)
    e = np.exp(-0.5)
    tot = (1 + 2 * e) ** 2
    assert out[2, 2] == pytest.approx(1 / tot, abs=1e-15)
    assert out[1, 2] == pytest.approx(e / tot, abs=1e-15)
    assert out[1, 1] == pytest.approx(e * e / tot, abs=1e-15)
    assert out.sum() == pytest.approx(1.0, abs=1e-14)


# ---------------------------------------------------------------- CBA


def test_cba_delta_by_hand() -> None:
    H = np.array([[0.0, 0.2, 0.4], [0.6, 0.8, 1.0]])
    # nz = .2 .4 .6 .8 1: P50 = 0.6, mean = 0.6; all: P60 at pos 3 → 0.6; max 1
    expected = 0.15 * 0.6 + 0.15 * 0.6 + 0.20 * 0.6 + 0.015 * 1.0
    assert R.cba_delta(frozen(H)) == pytest.approx(expected, abs=1e-15)
    assert L.cba_delta(H) == pytest.approx(expected, abs=1e-15)


def test_cba_branches_by_hand() -> None:
    H = np.array([[0.0, 0.2, 0.4], [0.6, 0.8, 1.0]])
    d = 0.315
    out = R.cba(frozen(H))
    assert out[0, 0] == 0.0
    assert out[0, 1] == pytest.approx(0.2 * 0.2 / d, abs=1e-15)  # δ/2 <= v < δ → v²/δ
    assert np.array_equal(out.ravel()[2:], H.ravel()[2:])  # v >= δ unchanged
    low = np.array([[0.1, 0.2], [0.5, 1.0]])  # δ = .15·.35 + .15·.44 + .2·.45 + .015 = .2235
    assert R.cba(frozen(low))[0, 0] == pytest.approx(0.05, abs=1e-15)  # v < δ/2 → v/2


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cba_equals_literal_and_keeps_its_promises(seed, shape) -> None:
    H = cam_like(seed, shape)
    out = R.cba(H)
    np.testing.assert_allclose(out, L.cba(H), rtol=0, atol=1e-12)
    delta = R.cba_delta(H)
    keep = H >= delta
    assert np.array_equal(out[keep], H[keep])
    order = np.argsort(H, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)  # monotone
    bg = (H > 0) & (H < delta)
    assert bg.any() and out[bg].sum() < H[bg].sum()  # background mass strictly lower
    assert np.all(out <= H)


def test_cba_is_monotone_and_continuous_on_a_ramp() -> None:
    v = np.linspace(0, 1, 2001)[None, :]
    out = R.cba(frozen(v))
    assert np.all(np.diff(out) >= 0)
    assert np.abs(np.diff(out)).max() < 2 * (v[0, 1] - v[0, 0]) + 1e-12


# ---------------------------------------------------------------- SICD


def blob(shape: tuple[int, int], cy: float, cx: float, s: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))


def test_sicd_removes_a_planted_interference_component() -> None:
    target = blob((16, 16), 4, 4, 1.5)
    target[target < 1e-3] = 0.0
    interf = blob((16, 16), 12, 12, 1.5)
    interf[target > 0] = 0.0  # disjoint supports: ⟨T, I⟩ = 0, so α* = 0.4 exactly
    H = target + 0.4 * interf
    out = R.sicd(frozen(H), frozen(interf))
    np.testing.assert_allclose(out, target, rtol=0, atol=1e-12)
    np.testing.assert_allclose(L.sicd(H, interf), out, rtol=0, atol=1e-12)


def test_sicd_alpha_is_clipped_to_half() -> None:
    target = blob((16, 16), 4, 4, 1.5)
    target[target < 1e-3] = 0.0
    interf = blob((16, 16), 12, 12, 1.5)
    interf[target > 0] = 0.0
    H = target + 0.8 * interf
    np.testing.assert_allclose(R.sicd(frozen(H), frozen(interf)), target + 0.3 * interf, rtol=0, atol=1e-12)


def test_sicd_keeps_the_map_when_the_subtraction_eats_its_range() -> None:
    interf = blob((12, 12), 6, 6, 2.0)
    H = frozen(interf)  # all interference: α* = 1 → 0.5, range halves (< 0.9) → keep H
    out = R.sicd(H, frozen(interf))
    assert np.array_equal(out, H)


@pytest.mark.parametrize("interf", [np.zeros((8, 8)), -blob((8, 8), 2, 2, 1.0)])
def test_sicd_zero_or_anticorrelated_interference_changes_nothing(interf) -> None:
    H = cam_like(0, (8, 8))
    assert np.array_equal(R.sicd(H, frozen(interf)), H)


def test_heuristic_interference_by_hand() -> None:
    H = np.zeros((10, 10))
    H[0, 0] = 1.0  # μ = 0.01, σ = √(0.01 − 0.0001) ≈ 0.0995: only (0, 0) is above μ + 2σ
    out = R.heuristic_interference(frozen(H), 0.25)
    expected = np.full((10, 10), 0.05 * 0.25)
    expected[0, 0] += 0.02
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="repeat_share"):
        R.heuristic_interference(frozen(H), 1.5)


def test_sicd_rejects_mismatched_interference() -> None:
    with pytest.raises(ValueError, match="interference is 4x4, map is 8x8"):
        R.sicd(cam_like(0, (8, 8)), np.zeros((4, 4)))


# ---------------------------------------------------------------- refine


def test_presets_registry() -> None:
    assert list(R.PRESETS) == ["raw", "+akd", "+dacg", "+cba", "+sicd", "full"]
    assert R.PRESETS["full"] == R.Preset(akd=True, dacg=True, cba=True, sicd=True)
    for name in ("+akd", "+dacg", "+cba", "+sicd"):
        assert sum(dataclasses.astuple(R.PRESETS[name])) == 1
    with pytest.raises(ValueError, match=r"unknown refine preset 'fancy'; valid: raw, \+akd, \+dacg, \+cba, \+sicd, full"):
        R.refine(cam_like(0, (8, 8)), "fancy", n_steps=16)


@pytest.mark.parametrize("preset", list(R.PRESETS))
@pytest.mark.parametrize("shape", [(8, 8), (3, 5), (1, 1)])
def test_all_zero_map_gives_all_zero(preset, shape) -> None:
    out = R.refine(frozen(np.zeros(shape)), preset, n_steps=16, repeat_share=0.5)
    assert out.shape == shape and np.array_equal(out, np.zeros(shape))


@pytest.mark.parametrize("preset", list(R.PRESETS))
def test_refine_never_mutates_and_stays_in_unit_range(preset) -> None:
    H = cam_like(7, (16, 16))
    interf = frozen(blob((16, 16), 3, 3, 2.0))
    before = H.copy()
    out = R.refine(H, preset, n_steps=24, interference=interf)
    assert np.array_equal(H, before) and out is not H
    assert out.dtype == np.float64 and out.min() >= 0 and out.max() <= 1
    assert np.array_equal(out, R.refine(H, preset, n_steps=24, interference=interf))  # deterministic


def test_refine_order_matches_method() -> None:
    H = cam_like(2, (24, 24))
    s = R.RefineSettings()
    x = R.clip_minmax(R.cba(R.dacg(R.akd(H, 32))), float(H.max()), s)
    expected = R.sicd(x, R.heuristic_interference(x, 0.2))
    assert np.array_equal(R.refine(H, "full", n_steps=32, repeat_share=0.2), expected)
    assert np.array_equal(R.refine(H, "+akd", n_steps=32), R.clip_minmax(R.akd(H, 32), float(H.max())))
    assert np.array_equal(R.refine(H, "raw", n_steps=32), H)
    interf = frozen(blob((24, 24), 20, 3, 3.0))
    with_i = R.refine(H, "+sicd", n_steps=32, interference=interf)
    assert np.array_equal(with_i, R.sicd(R.clip_minmax(H, float(H.max())), interf))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(8, 8), (16, 12), (24, 24)])
def test_refine_full_equals_literal(seed, shape) -> None:
    H = cam_like(seed + 10, shape)
    np.testing.assert_allclose(
        R.refine(H, "full", n_steps=32, repeat_share=0.3), L.refine_full(H, 32, repeat_share=0.3), rtol=0, atol=1e-9
    )


def test_clip_minmax_leaves_constant_maps() -> None:
    assert np.array_equal(R.clip_minmax(frozen(np.full((4, 4), 0.3)), 1.0), np.full((4, 4), 0.3))
    out = R.clip_minmax(frozen(np.array([[0.2, 0.7], [1.4, 0.2]])), 1.0)
    np.testing.assert_allclose(out, np.array([[0, 0.5 / 0.8], [1, 0]]), atol=1e-7)


@pytest.mark.parametrize(
    "H,match",
    [
        (np.zeros((2, 2, 2)), r"shape \(2, 2, 2\)"),
        (np.zeros((0, 4)), r"shape \(0, 4\)"),
        (np.array([[0.5, np.nan]]), "non-finite"),
        (np.array([[0.5, -0.1]]), "non-negative"),
    ],
)
def test_refine_validates_its_input(H, match) -> None:
    with pytest.raises(ValueError, match=match):
        R.refine(H, "full", n_steps=16)


def test_refine_accepts_float32_and_validates_interference_shape() -> None:
    H = np.asarray(cam_like(1, (8, 8)), dtype=np.float32)
    assert R.refine(H, "full", n_steps=16).dtype == np.float64
    with pytest.raises(ValueError, match="interference is 8x9, map is 8x8"):
        R.refine(H, "raw", n_steps=16, interference=np.zeros((8, 9)))


# ---------------------------------------------------------------- refine_stack


def odd_stack(shape: tuple[int, int]) -> list[np.ndarray]:
    """Maps that take every branch: blobs of different spread (different AKD k), an all-zero
    map, a constant map, a single spike, a checkerboard (DACG's high-variance percentile)."""
    maps = [cam_like(s, shape) for s in range(5)]
    maps.append(frozen(np.zeros(shape)))
    maps.append(frozen(np.full(shape, 0.4)))
    spike = np.zeros(shape)
    spike[1, 2] = 1.0
    maps.append(frozen(spike))
    maps.append(checkerboard(shape, 0.3))
    maps.append(frozen(cam_like(7, shape) ** 4))  # low mean: DACG's low-mean percentile
    return maps


@pytest.mark.parametrize("preset", list(R.PRESETS))
@pytest.mark.parametrize("shape", [(8, 8), (24, 24)])
def test_refine_stack_equals_one_map_at_a_time(preset, shape) -> None:
    maps = odd_stack(shape)
    ks = {R.akd_kernel_size(m, 48) for m in maps}
    if shape == (24, 24):
        assert len(ks) > 1, "the stack must mix AKD kernel sizes to test the grouping"
    interf = [None if i % 3 else frozen(cam_like(100 + i, shape) * 0.2) for i in range(len(maps))]
    shares = [0.1 * (i % 4) for i in range(len(maps))]
    steps = [16 + 8 * (i % 3) for i in range(len(maps))]
    out = R.refine_stack(np.stack(maps), preset, n_steps=steps, interference=interf, repeat_share=shares)
    for i, m in enumerate(maps):
        one = R.refine(m, preset, n_steps=steps[i], interference=interf[i], repeat_share=shares[i])
        np.testing.assert_allclose(out[i], one, rtol=0, atol=1e-12, err_msg=f"map {i}")


@pytest.mark.parametrize("shape", [(8, 8), (16, 12)])
def test_refine_stack_full_equals_literal(shape) -> None:
    maps = odd_stack(shape)
    out = R.refine_stack(maps, "full", n_steps=32, repeat_share=0.3)
    for i, m in enumerate(maps):
        np.testing.assert_allclose(out[i], L.refine_full(m, 32, repeat_share=0.3), rtol=0, atol=1e-9, err_msg=f"map {i}")


def test_refine_stack_does_not_mutate_its_inputs() -> None:
    maps = np.stack(odd_stack((8, 8)))
    maps.flags.writeable = False
    before = maps.copy()
    R.refine_stack(maps, "full", n_steps=32)
    assert np.array_equal(maps, before)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"maps": np.zeros((0, 4, 4))}, r"non-empty \(m, h, w\)"),
        ({"maps": np.zeros((4, 4))}, r"non-empty \(m, h, w\)"),
        ({"n_steps": [16, 16]}, "n_steps has 2 entries for 3 maps"),
        ({"repeat_share": [0.1]}, "repeat_share has 1 entries for 3 maps"),
        ({"repeat_share": 1.5}, r"repeat_share must be in \[0, 1\]"),
        ({"interference": [None]}, "interference has 1 entries for 3 maps"),
        ({"interference": [None, np.zeros((3, 3)), None]}, "interference is 3x3, map is 4x4"),
        ({"n_steps": 0}, "n_steps must be a positive integer"),
        ({"preset": "sharp"}, "unknown refine preset 'sharp'"),
    ],
)
def test_refine_stack_rejects_bad_input(kwargs, match) -> None:
    call = {"maps": np.full((3, 4, 4), 0.5), "preset": "full", "n_steps": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        R.refine_stack(call.pop("maps"), call.pop("preset"), **call)
