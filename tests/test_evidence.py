"""Word-specificity measures and chance maps (diffcam.core.evidence) on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from diffcam.core import evidence as ev
from diffcam.core.metrics import validate_map


def _box(shape, r0, r1, c0, c1):
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


LEFT = _box((32, 32), 8, 16, 0, 8)     # cells (1, 0) of a 4x4 grid: rows 8-15, cols 0-7
RIGHT = _box((32, 32), 8, 16, 24, 32)  # cell (1, 3)


def test_mask_on_grid_is_the_share_of_each_cell():
    half = _box((8, 8), 0, 8, 0, 2)  # left half of the first column of 4-px cells
    g = ev.mask_on_grid(half, (2, 2))
    assert g.tolist() == [[0.5, 0.0], [0.5, 0.0]]
    assert ev.oracle_map(LEFT, (4, 4))[1, 0] == 1.0 and ev.oracle_map(LEFT, (4, 4)).sum() == 1.0


def test_all_objects_map_is_the_union():
    g = ev.all_objects_map([LEFT, RIGHT], (4, 4))
    assert g[1, 0] == g[1, 3] == 1.0 and g.sum() == 2.0


def test_objectness_lights_every_object_and_only_objects():
    img = np.full((32, 32, 3), 40, dtype=np.uint8)
    img[LEFT] = (220, 40, 40)
    img[RIGHT] = (40, 40, 220)
    g = ev.objectness_map(img, (4, 4))
    # |220-40| on one channel of three → 60 per pixel, on whole cells
    assert g[1, 0] == pytest.approx(60.0) and g[1, 3] == pytest.approx(60.0)
    assert np.count_nonzero(g) == 2


def test_background_colour_ignores_a_central_object():
    img = np.full((16, 16, 3), 10, dtype=np.uint8)
    img[2:14, 2:14] = 200
    assert ev.background_colour(img).tolist() == [10.0, 10.0, 10.0]


def test_specificity_on_hand_made_masks():
    on_left = ev.oracle_map(LEFT, (4, 4))
    assert ev.specificity(on_left, LEFT, [RIGHT]) == pytest.approx(1.0)
    assert ev.specificity(on_left, RIGHT, [LEFT]) == pytest.approx(0.0)
    both = ev.all_objects_map([LEFT, RIGHT], (4, 4))
    assert ev.specificity(both, LEFT, [RIGHT]) == pytest.approx(0.5)
    # twice the density on the named object → 2/3
    m = np.zeros((4, 4))
    m[1, 0], m[1, 3] = 2.0, 1.0
    assert ev.specificity(m, LEFT, [RIGHT]) == pytest.approx(2 / 3, abs=0.02)  # bilinear spill at the cell edges


def test_specificity_is_undefined_without_another_object_or_mass():
    assert ev.specificity(np.ones((4, 4)), LEFT, []) is None
    assert ev.specificity(np.zeros((4, 4)), LEFT, [RIGHT]) is None


def test_multi_pointing():
    m = np.zeros((4, 4))
    m[1, 0] = 1.0
    assert ev.multi_pointing(m, LEFT, [RIGHT]) is True
    assert ev.multi_pointing(m, RIGHT, [LEFT]) is False
    assert ev.multi_pointing(np.ones((4, 4)), LEFT, [RIGHT]) is False  # no peak
    assert ev.multi_pointing(m, LEFT, []) is None
    off = np.zeros((4, 4))
    off[3, 2] = 1.0  # background: on neither object
    assert ev.multi_pointing(off, LEFT, [RIGHT]) is False


def test_swap_test_tells_a_map_that_follows_from_one_that_does_not():
    # Before: the word's object is LEFT, the other RIGHT. After the swap they trade places.
    follows_before = ev.oracle_map(LEFT, (4, 4))
    follows_after = ev.oracle_map(RIGHT, (4, 4))
    assert ev.swap_follows(follows_before, follows_after, LEFT, RIGHT, RIGHT, LEFT) is True
    # A map tied to the left of the image stays there after the swap: it does not follow.
    assert ev.swap_follows(follows_before, follows_before, LEFT, RIGHT, RIGHT, LEFT) is False
    # An image-only map lights both objects equally: no preference, no follow.
    both = ev.all_objects_map([LEFT, RIGHT], (4, 4))
    assert ev.swap_follows(both, both, LEFT, RIGHT, RIGHT, LEFT) is False


def test_cell_boxes_refuse_a_grid_finer_than_the_image():
    with pytest.raises(ValueError, match="cannot tile"):
        ev.cell_boxes((4, 4), (8, 8))


def test_tiny_images_still_get_chance_maps():
    one = np.full((1, 1, 3), 200, dtype=np.uint8)
    assert ev.background_colour(one).tolist() == [200.0, 200.0, 200.0]
    big = ev.cover_grid(one, (8, 8))
    assert big.shape == (8, 8, 3) and (big == 200).all()
    assert ev.objectness_map(big, (8, 8)).shape == (8, 8)
    wide = np.zeros((2, 20, 3), dtype=np.uint8)
    assert ev.cover_grid(wide, (8, 8)).shape == (8, 20, 3)
    assert ev.cover_grid(np.zeros((64, 64, 3)), (8, 8)).shape == (64, 64, 3)  # big enough: unchanged


def test_objectness_is_never_negative_on_flat_background_cells():
    # bright blocks make the integral image's partial sums large; background cells' box sums
    # then cancel to about -1e-12 unless clamped, and every map consumer refuses negatives
    rng = np.random.default_rng(0)
    for _ in range(100):
        img = np.full((64, 64, 3), 30, np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, 50, 2)
            s = rng.integers(5, 14)
            img[y:y + s, x:x + s] = rng.integers(0, 256, 3)
        m = ev.objectness_map(img, (16, 16))
        assert m.min() >= 0.0
        validate_map(m)
