"""Per-map statistics (issue 4 §1): hand-made maps with known answers, schema, zero maps."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest

from diffcam.core import metrics as M
from diffcam.core import stats as S


def frozen(a: np.ndarray) -> np.ndarray:
    b = np.array(a, dtype=np.float64)
    b.flags.writeable = False
    return b


def check_schema(d: dict) -> None:
    """Keys in STAT_KEYS order, exact Python types, None only where nullable, nothing NaN/inf."""
    assert list(d) == [k.name for k in S.STAT_KEYS]
    for k in S.STAT_KEYS:
        v = d[k.name]
        if v is None:
            assert k.nullable, k.name
            continue
        assert type(v) is k.dtype, (k.name, type(v))
        if k.dtype is float:
            assert math.isfinite(v), k.name


def test_stat_keys_are_a_schema() -> None:
    names = [k.name for k in S.STAT_KEYS]
    assert len(names) == len(set(names))
    assert {k.dtype for k in S.STAT_KEYS} <= {int, float, bool}
    assert all(k.doc for k in S.STAT_KEYS)


def test_single_cell_map() -> None:
    a = np.zeros((8, 8))
    a[2, 5] = 0.7
    d = S.map_stats(frozen(a), None, S.StatsSettings())
    check_schema(d)
    assert d["com_x"] == 5.5 / 8 and d["com_y"] == 2.5 / 8
    assert d["peak_x_frac"] == 5.5 / 8 and d["peak_y_frac"] == 2.5 / 8
    assert d["com_dist"] == pytest.approx(math.hypot(5.5 / 8 - 0.5, 2.5 / 8 - 0.5), abs=1e-15)
    assert d["spread"] == 0.0 and d["entropy"] == 0.0
    assert d["gini"] == pytest.approx(1 - 1 / 64, abs=1e-12)
    assert d["total_mass"] == 0.7 and d["peak_value"] == 0.7 and d["zero_map"] is False
    # band: 1 cell on 8×8 → (2, 5) is interior; centre box: rows/cols 2..5 → inside
    assert d["border_frac"] == 0.0 and d["border_area_share"] == 28 / 64
    assert d["centre_frac"] == 1.0 and d["centre_area_share"] == 16 / 64 and d["centre_enrichment"] == 4.0
    assert all(d[k] is None for k in ("mask_area_share", "inside_frac", "inside_enrichment", "pointing_hit", "obj_iou"))


def test_uniform_map_is_the_reference_point() -> None:
    d = S.map_stats(frozen(np.full((8, 8), 0.3)))
    check_schema(d)
    assert d["com_x"] == pytest.approx(0.5, abs=1e-15) and d["com_y"] == pytest.approx(0.5, abs=1e-15)
    assert d["com_dist"] == pytest.approx(0.0, abs=1e-15)
    assert d["spread"] == pytest.approx(1.0, abs=1e-12)
    assert d["entropy"] == pytest.approx(1.0, abs=1e-12)
    assert d["gini"] == pytest.approx(0.0, abs=1e-12)
    assert d["border_enrichment"] == pytest.approx(1.0, abs=1e-12)
    assert d["centre_enrichment"] == pytest.approx(1.0, abs=1e-12)
    assert d["peak_x_frac"] == 0.5 / 8 and d["peak_y_frac"] == 0.5 / 8  # first maximum, row-major


def test_border_ring_and_corners() -> None:
    ring = np.ones((8, 8))
    ring[1:-1, 1:-1] = 0.0
    d = S.map_stats(frozen(ring))
    assert d["border_frac"] == 1.0 and d["border_enrichment"] == pytest.approx(64 / 28, abs=1e-12)
    assert d["centre_frac"] == 0.0
    corners = np.zeros((8, 8))
    corners[[0, 0, -1, -1], [0, -1, 0, -1]] = 1.0
    # each corner is 3.5/8 from the centre on both axes: r_g = √2·3.5/8; uniform r_g = √(2·63/768)
    expected = math.sqrt(2) * 3.5 / 8 / math.sqrt(2 * 63 / (12 * 64))
    assert S.map_stats(frozen(corners))["spread"] == pytest.approx(expected, abs=1e-12)
    assert expected > 1


@pytest.mark.parametrize("side,cells,share",
                         [(8, 1, 28 / 64), (16, 2, 1 - 144 / 256), (24, 3, 1 - 324 / 576), (32, 4, 1 - 576 / 1024)])
def test_band_is_the_same_share_of_the_image_on_every_grid(side, cells, share) -> None:
    assert S.band_cells(side, 0.125) == cells
    band = S.border_mask((side, side))
    assert band.mean() == share
    assert share == 0.4375  # 1 − (3/4)²


def test_centre_box() -> None:
    c = S.centre_mask((8, 6))
    # rows: |2i + 1 − 8| <= 4 → i = 2..5; cols: |2j + 1 − 6| <= 3 → j = 1..4
    expected = np.zeros((8, 6), bool)
    expected[2:6, 1:5] = True
    assert np.array_equal(c, expected)


def test_zero_map_values_are_documented_and_finite() -> None:
    mask = np.zeros((16, 16), bool)
    mask[:8, :8] = True
    for m in (None, mask):
        d = S.map_stats(frozen(np.zeros((8, 8))), m)
        check_schema(d)
        assert d["zero_map"] is True and d["total_mass"] == 0.0 and d["peak_value"] == 0.0
        for k in ("com_x", "com_y", "com_dist", "spread", "peak_x_frac", "peak_y_frac", "entropy", "gini"):
            assert d[k] is None
        for k in ("border_frac", "border_enrichment", "centre_frac", "centre_enrichment", "inside_frac", "inside_enrichment"):
            assert d[k] is None
        assert d["border_area_share"] == 28 / 64
    assert d["pointing_hit"] is False and d["obj_iou"] == 0.0 and d["mask_area_share"] == 0.25


def test_mask_statistics_at_grid_resolution() -> None:
    a = np.zeros((8, 8))
    a[:4, :4] = 1.0
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    d = S.map_stats(frozen(a), mask)
    check_schema(d)
    assert d["mask_area_share"] == 0.25 and d["inside_frac"] == 1.0 and d["inside_enrichment"] == 4.0
    assert d["pointing_hit"] is True and d["obj_iou"] == 1.0


def test_mask_statistics_upsample_the_map() -> None:
    # left half 1, right half 0 on 8×8; mask = left half of a 64×64 image. Each output row
    # blends columns 28..35: inside loses .0625+.1875+.3125+.4375 = 1 of its 32 → 31/32.
    a = np.zeros((8, 8))
    a[:, :4] = 1.0
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 1
    d = S.map_stats(frozen(a), mask)
    assert d["inside_frac"] == pytest.approx(31 / 32, abs=1e-12)
    assert d["inside_enrichment"] == pytest.approx(31 / 16, abs=1e-12)
    assert d["inside_frac"] == M.concentration(a, mask.astype(bool))
    assert d["obj_iou"] == M.obj_iou(a, mask.astype(bool))


def test_random_maps_are_finite_and_in_range() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((40, 40)) < 0.2
    for shape in ((1, 1), (3, 5), (8, 8), (24, 24)):
        d = S.map_stats(frozen(rng.random(shape)), mask)
        check_schema(d)
        for k in ("com_x", "com_y", "peak_x_frac", "peak_y_frac", "entropy", "gini", "border_frac", "centre_frac",
                  "inside_frac"):
            assert 0.0 <= d[k] <= 1.0, k


def test_stats_settings() -> None:
    s = S.StatsSettings(border_fraction=0.25)
    assert s.model_dump() == {"border_fraction": 0.25, "centre_fraction": 0.5}
    assert S.StatsSettings.model_validate(s.model_dump()) == s
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        s.border_fraction = 0.1  # type: ignore[misc]
    with pytest.raises(ValueError, match="border_fraction"):
        S.StatsSettings(border_fraction=0.0)
    assert S.map_stats(frozen(np.ones((8, 8))), None, s)["border_area_share"] == 1 - 16 / 64  # 2-cell band


@pytest.mark.parametrize("bad,match", [(np.zeros(5), r"shape \(5,\)"), (np.array([[0.1, -0.2]]), "non-negative")])
def test_invalid_maps_raise(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        S.map_stats(bad)
