"""Metrics of docs/METHOD.md §5 on hand-made maps and masks with answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffcam.core import metrics as M


def frozen(a: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    b = np.array(a, dtype=dtype)
    b.flags.writeable = False
    return b


def torch_bilinear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.array(a))[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


# ---------------------------------------------------------------- upsampling


@pytest.mark.parametrize(
    "shape,size",
    [((8, 8), (64, 64)), ((5, 7), (33, 20)), ((24, 24), (10, 13)), ((1, 4), (5, 9)), ((3, 1), (7, 2)), ((6, 6), (6, 6))],
)
def test_upsample_equals_torch(shape, size) -> None:
    rng = np.random.default_rng(sum(shape) + sum(size))
    a = rng.random(shape)
    np.testing.assert_allclose(M.upsample_bilinear(frozen(a), size), torch_bilinear(a, size), rtol=0, atol=1e-12)
    a32 = a.astype(np.float32)  # torch computes float32 weights for float32 input; we use float64
    np.testing.assert_allclose(M.upsample_bilinear(frozen(a32, np.float32), size), torch_bilinear(a32, size), atol=1e-5)


def test_upsample_by_hand_and_identity() -> None:
    # 1×2 → 1×4: source x = (j + 0.5)/2 − 0.5 = −0.25 (→ 0), 0.25, 0.75, 1.25 (→ last cell)
    np.testing.assert_allclose(M.upsample_bilinear(frozen([[0.0, 1.0]]), (1, 4)), [[0, 0.25, 0.75, 1]], atol=1e-15)
    a = np.random.default_rng(0).random((5, 6))
    assert np.array_equal(M.upsample_bilinear(frozen(a), (5, 6)), a)


@pytest.mark.parametrize(
    "a,size,match",
    [
        (np.zeros((2, 2, 2)), (4, 4), r"shape \(2, 2, 2\)"),
        (np.zeros((2, 2)), (0, 4), r"\(0, 4\)"),
        (np.array([[1.0, np.inf]]), (2, 2), "non-finite"),
        (np.array([[1.0, -1.0]]), (2, 2), "non-negative"),
    ],
)
def test_upsample_validates(a, size, match) -> None:
    with pytest.raises(ValueError, match=match):
        M.upsample_bilinear(a, size)


# ---------------------------------------------------------------- Otsu


def brute_force_otsu(v: np.ndarray) -> int:
    """Between-class variance for every t, written out; first maximum wins."""
    best_t, best = 0, -1.0
    flat = v.ravel().astype(np.int64)
    for t in range(256):
        c0, c1 = flat[flat <= t], flat[flat > t]
        var = 0.0 if c0.size == 0 or c1.size == 0 else c0.size * c1.size * (c0.mean() - c1.mean()) ** 2
        if var > best:
            best_t, best = t, var
    return best_t


def test_otsu_by_hand() -> None:
    # levels 0 ×4, 100 ×4, 200 ×8. t in [0, 99]: 4·12·(0 − 166.7)² ≈ 1.33e6;
    # t in [100, 199]: 8·8·(50 − 200)² = 1.44e6 (max); so t = 100 (smallest of the tie)
    v = np.array([0] * 4 + [100] * 4 + [200] * 8, dtype=np.uint8)
    assert M.otsu_threshold(v) == 100
    assert M.otsu_threshold(np.array([10] * 5 + [200] * 5, dtype=np.uint8)) == 10  # tie over [10, 199]
    assert M.otsu_threshold(np.full((3, 3), 7, dtype=np.uint8)) == 7  # one level: empty foreground


@pytest.mark.parametrize("seed", range(4))
def test_otsu_equals_brute_force(seed) -> None:
    rng = np.random.default_rng(seed)
    v = np.concatenate([rng.normal(60, 20, 300), rng.normal(180, 30, 200)]).clip(0, 255).astype(np.uint8)
    assert M.otsu_threshold(v.reshape(20, 25)) == brute_force_otsu(v)


def test_otsu_rejects_non_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        M.otsu_threshold(np.zeros((4, 4)))


def test_to_uint8_truncates_the_normalised_map() -> None:
    assert M.to_uint8(frozen([[0.0, 0.25], [0.75, 1.0]])).tolist() == [[0, 63], [191, 255]]
    assert M.to_uint8(frozen([[2.0, 2.5], [3.5, 4.0]])).tolist() == [[0, 63], [191, 255]]
    assert M.to_uint8(frozen(np.full((2, 2), 0.4))).tolist() == [[0, 0], [0, 0]]


# ---------------------------------------------------------------- Obj-IoU


def test_obj_iou_at_mask_resolution() -> None:
    cam = np.zeros((8, 8))
    cam[2:5, 2:5] = 1.0  # 9 cells; Otsu on {0, 255} → t = 0 → foreground = the block
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True  # 16 cells ⊇ block
    assert M.obj_iou(frozen(cam), mask) == 9 / 16


def test_obj_iou_after_upsampling() -> None:
    # 2×2 [[1, 1], [0, 0]] → 4×4 rows 1, .75, .25, 0 → uint8 255, 191, 63, 0 (4 pixels each).
    # t in [63, 190]: 8·8·(31.5 − 223)² beats the other splits → t = 63, foreground = top 2 rows.
    cam = frozen([[1.0, 1.0], [0.0, 0.0]])
    top_half = np.zeros((4, 4), bool)
    top_half[:2] = True
    top_row = np.zeros((4, 4), bool)
    top_row[:1] = True
    assert M.obj_iou(cam, top_half) == 1.0
    assert M.obj_iou(cam, top_row) == 4 / 8
    assert M.obj_iou_any(cam, [top_row, top_half]) == 1.0


def test_obj_iou_of_a_zero_map_is_zero() -> None:
    mask = np.eye(6, dtype=bool)
    assert M.obj_iou(frozen(np.zeros((3, 3))), mask) == 0.0
    assert M.obj_iou(frozen(np.full((3, 3), 0.5)), mask) == 0.0


@pytest.mark.parametrize(
    "mask,match",
    [
        (np.zeros((4, 4), bool), r"empty"),
        (np.zeros((2, 2, 2), bool), r"shape \(2, 2, 2\)"),
        (np.array([[0, 255], [0, 0]], np.uint8), r"0/1"),
    ],
)
def test_masks_are_validated(mask, match) -> None:
    with pytest.raises(ValueError, match=match):
        M.obj_iou(frozen(np.eye(2)), mask)


def test_obj_iou_any_needs_same_shaped_masks() -> None:
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        M.obj_iou_any(frozen(np.eye(2)), [np.ones((4, 4), bool), np.ones((4, 5), bool)])
    with pytest.raises(ValueError, match="at least one"):
        M.obj_iou_any(frozen(np.eye(2)), [])


# ---------------------------------------------------------------- contrast, concentration, F3, pointing


CAM = frozen([[4.0, 2.0], [1.0, 1.0]])
MASK = np.array([[True, False], [False, False]])


def test_contrast_and_concentration_by_hand() -> None:
    assert M.contrast(CAM, MASK) == pytest.approx(4 / ((2 + 1 + 1) / 3), abs=1e-15)  # = 3
    assert M.contrast_score(3.0) == pytest.approx(0.15, abs=1e-15)
    assert M.contrast_score(40.0) == 1.0
    assert M.concentration(CAM, MASK) == 4 / 8


def test_contrast_edge_cases_are_defined() -> None:
    only_inside = frozen([[1.0, 0.0], [0.0, 0.0]])
    assert M.contrast(only_inside, MASK) == math.inf
    assert M.contrast_score(math.inf) == 1.0
    assert M.contrast(frozen(np.zeros((2, 2))), MASK) == 0.0
    assert M.concentration(frozen(np.zeros((2, 2))), MASK) == 0.0
    with pytest.raises(ValueError, match="whole"):
        M.contrast(CAM, np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="contrast"):
        M.contrast_score(float("nan"))


def test_f3_by_hand() -> None:
    assert M.f3(0.5, 0.25, 1.0) == pytest.approx(3 / (2 + 4 + 1), abs=1e-15)
    assert M.f3(0.0, 0.9, 0.9) == 0.0
    with pytest.raises(ValueError, match="concentration"):
        M.f3(0.5, 0.5, 1.5)


def test_dataset_f3_is_the_harmonic_mean_of_means() -> None:
    samples = [(0.4, 0.2, 0.6), (0.2, 0.2, 0.4)]  # dataset means 0.3, 0.2, 0.5
    expected = 3 / (1 / 0.3 + 1 / 0.2 + 1 / 0.5)
    assert M.dataset_f3([0.3, 0.2, 0.5]) == pytest.approx(expected, abs=1e-15)
    mean_of_f3 = (M.f3(*samples[0]) + M.f3(*samples[1])) / 2
    assert abs(mean_of_f3 - expected) > 1e-3  # the two aggregations differ
    with pytest.raises(ValueError, match="3 means"):
        M.dataset_f3([0.3, 0.2])


def test_pointing_game() -> None:
    assert M.pointing_hit(CAM, MASK) is True
    assert M.pointing_hit(frozen([[1.0, 4.0], [1.0, 1.0]]), MASK) is False
    assert M.pointing_hit(frozen(np.zeros((2, 2))), MASK) is False  # no peak
    tie = frozen([[0.0, 3.0], [3.0, 0.0]])  # two maxima: the first in row-major order, (0, 1), counts
    assert M.pointing_hit(tie, np.array([[False, True], [False, False]])) is True
    assert M.pointing_hit(tie, np.array([[False, False], [True, False]])) is False
    big = np.zeros((8, 8), bool)
    big[:4, :4] = True  # 2×2 map upsampled to 8×8: the peak cell stays top-left
    assert M.pointing_hit(CAM, big) is True


# ---------------------------------------------------------------- Func-IoU


def test_func_iou_by_hand() -> None:
    quarters = np.repeat([0.0, 0.25, 0.75, 1.0], 4).reshape(4, 4)  # uint8 0, 63, 191, 255 → t = 63
    halves = np.repeat([0.0, 1.0], 8).reshape(4, 4)  # {0, 255} → t = 0
    # mean threshold (63 + 0)/2 = 31.5 → 31.5/255 ≈ 0.1235 on the normalised function maps
    f1 = np.array([0.0] * 10 + [0.1] * 2 + [1.0] * 4).reshape(4, 4)  # 12 of 16 below
    f2 = np.array([0.0] + [1.0] * 15).reshape(4, 4)  # 1 of 16 below
    got = M.func_iou([frozen(f1), frozen(f2)], [frozen(quarters), frozen(halves)])
    assert got == pytest.approx((12 / 16 + 1 / 16) / 2, abs=1e-15)


def test_func_iou_validates() -> None:
    with pytest.raises(ValueError, match="got 0 and 1"):
        M.func_iou([], [frozen(np.eye(2))])
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 3\)"):
        M.func_iou([frozen(np.eye(2))], [frozen(np.eye(3))])


def test_no_metric_returns_nan_for_a_zero_map() -> None:
    z = frozen(np.zeros((4, 4)))
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    values = [M.obj_iou(z, mask), M.contrast(z, mask), M.concentration(z, mask)]
    assert values == [0.0, 0.0, 0.0]
    assert M.f3(values[0], M.contrast_score(values[1]), values[2]) == 0.0
