"""The saliency-free discovery scan on a scripted model whose word depends on one known window."""

from __future__ import annotations

import numpy as np
import pytest

from diffcam.core.bias.discovery import summarise_scans, window_cells_at, window_scan
from diffcam.core.evidence import mask_on_grid

GRID = (8, 8)
CUE = (slice(0, 8), slice(56, 64))  # cell (0, 7) of a 64x64 image: the top-right corner
MAGENTA = np.array([255, 0, 255], dtype=np.uint8)


def _image(rng, with_cue=True):
    img = np.full((64, 64, 3), 40, dtype=np.uint8)
    r, c = rng.integers(2, 5, size=2) * 8
    img[r:r + 16, c:c + 16] = (220, 40, 40)  # the object: a 2x2-cell red square, away from the corner
    if with_cue:
        img[CUE] = MAGENTA
    return img, (slice(r, r + 16), slice(c, c + 16))


def score_cue(images):
    """log p(word): high while the magenta corner is there, whatever else happens."""
    return np.array([-0.1 if (im[CUE] == MAGENTA).all(axis=-1).mean() > 0.5 else -4.0 for im in images])


def score_object(images, where):
    """log p(word): high while the red object is there (a model without a shortcut)."""
    return np.array([-0.1 if (im[where] == (220, 40, 40)).all(axis=-1).mean() > 0.5 else -4.0 for im in images])


def test_scan_finds_the_window_the_word_depends_on():
    rng = np.random.default_rng(0)
    drops, covers = [], []
    for _ in range(6):
        img, where = _image(rng)
        drops.append(window_scan(img, GRID, (1, 1), score_cue))
        m = np.zeros((64, 64), dtype=bool)
        m[where] = True
        covers.append(mask_on_grid(m, GRID))
    res = summarise_scans(drops, covers, (1, 1))
    assert res.candidates()[0][:2] == (0, 7)  # the cue cell, found without any map
    assert len(res.candidates()) == 1
    assert res.mean_drop[0, 7] == pytest.approx(3.9) and res.hit_rate[0, 7] == 1.0


def test_scan_of_a_model_without_a_shortcut_proposes_nothing_off_object():
    rng = np.random.default_rng(1)
    drops, covers = [], []
    for _ in range(6):
        img, where = _image(rng)
        drops.append(window_scan(img, GRID, (1, 1), lambda ims, w=where: score_object(ims, w)))
        m = np.zeros((64, 64), dtype=bool)
        m[where] = True
        covers.append(mask_on_grid(m, GRID))
    res = summarise_scans(drops, covers, (1, 1))
    assert res.candidates() == []  # the only drops are on the object itself
    assert (res.mean_drop[~res.off_object] >= 0).all() and res.mean_drop[res.off_object].max() == 0.0


def test_window_geometry():
    assert window_cells_at(GRID, (2, 2), 0, 6).tolist() == [6, 7, 14, 15]
    with pytest.raises(ValueError, match="leaves"):
        window_cells_at(GRID, (2, 2), 0, 7)
    calls = []
    window_scan(np.zeros((64, 64, 3), np.uint8), GRID, (2, 2), lambda ims: calls.append(len(ims)) or np.zeros(len(ims)))
    assert calls == [1 + 7 * 7]  # the intact image and every window, in one batch
