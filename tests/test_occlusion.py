"""The occlusion map (`occlusion`): a map the model draws by answering occluded images.

Known answers: a scripted model whose word depends on one known region that straddles four
cells peaks exactly there; a word the model says whatever the image shows gets an all-zero
map; the geometry (window from the grid, drops spread to cells) checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcam.core.cam import with_model_maps
from diffcam.core.methods import method_names, occlusion_map, occlusion_window
from diffcam.core.models.base import Generation
from diffcam.core.settings import CamSettings
from diffcam.core.types import SampleExplanation, WordMaps, WordSpan

GRID = (8, 8)
PATCH = (slice(24, 40), slice(32, 48))  # pixel rows 24-39, columns 32-47: cells rows 3-4, columns 4-5
MAGENTA = np.array([255, 0, 255], dtype=np.uint8)
VOCAB = {"a": 1, "red": 2, "circle": 3}


class PatchModel:
    """Scores "circle" -0.1 while the whole magenta patch is in the image, -4.0 once any of it
    is painted over; "red" -0.2 whatever the image. Counts the images it scores."""

    def __init__(self) -> None:
        self.scored = 0

    def canvas_log_probs(self, images, prompt, canvas, self_cond):
        self.scored += len(images)
        lp = np.full((len(images), 3, len(VOCAB) + 1), -9.0)
        for i, im in enumerate(images):
            intact = bool(np.all(np.asarray(im)[PATCH] == MAGENTA))
            lp[i, 1, VOCAB["red"]] = -0.2
            lp[i, 2, VOCAB["circle"]] = -0.1 if intact else -4.0
        return torch.tensor(lp)


def _explained() -> tuple[SampleExplanation, Generation, np.ndarray]:
    image = np.full((64, 64, 3), 10, dtype=np.uint8)
    image[PATCH] = MAGENTA
    words = tuple(WordSpan(i, w, (i,), (VOCAB[w],), 1, w == "a") for i, w in enumerate(["a", "red", "circle"]))
    canvas = torch.tensor([VOCAB[w.text] for w in words])
    gen = Generation(token_ids=tuple(int(t) for t in canvas), text="a red circle", words=words, n_steps=1,
                     canvases=[canvas], self_cond=[None], argmax=[canvas])
    result = SampleExplanation(answer=gen.text, token_ids=gen.token_ids,
                               words=tuple(WordMaps(w, None, 0.0, None, {}, False) for w in words), grid=GRID,
                               n_steps=1, layer="projector", attribution_step="commit")
    return result, gen, image


def test_the_map_peaks_on_the_region_the_word_depends_on_even_across_cell_boundaries():
    result, gen, image = _explained()
    model = PatchModel()
    out = with_model_maps(model, result, image, "describe", gen, CamSettings(methods=("occlusion",)))
    circle = out.words[2].maps["occlusion"]
    assert circle.shape == GRID and circle.dtype == np.float32
    peak = {tuple(c) for c in np.argwhere(circle == circle.max())}
    assert peak == {(3, 4), (3, 5), (4, 4), (4, 5)}  # the four cells the patch straddles, no more
    assert circle.max() == 1.0 and circle[0, 0] == 0.0  # a window far from the patch costs nothing
    # the three words share one canvas here and each image is scored once for all of them; an
    # occluder painted on plain background leaves the image as it was, so only the 9 windows that
    # touch the patch make new images: 1 intact + 9 scored, not 3 words x 50
    assert model.scored == 1 + 9


def test_a_word_that_ignores_the_image_gets_an_all_zero_map():
    result, gen, image = _explained()
    out = with_model_maps(PatchModel(), result, image, "describe", gen, CamSettings(methods=("occlusion",)))
    assert not out.words[1].maps["occlusion"].any()  # "red" costs nothing under any occluder
    assert not out.words[0].maps["occlusion"].any()


def test_geometry_window_from_the_grid_and_drops_spread_to_cells():
    assert occlusion_window((8, 8)) == (2, 2) and occlusion_window((16, 16)) == (4, 4)
    assert occlusion_window((2, 3)) == (1, 1) and occlusion_window((14, 6)) == (4, 2)
    drops = np.zeros((3, 3))
    drops[0, 0] = 2.0  # the top-left 2x2 window of a 4x4 grid
    drops[2, 2] = -5.0  # a window that made the word *more* likely counts as no drop
    m = occlusion_map(drops, (4, 4), (2, 2))
    # cell (0, 0) is covered by that window only: mean 2.0 -> 1 after scaling; (1, 1) by 4 windows: 2/4
    assert m[0, 0] == 1.0 and m[1, 1] == pytest.approx(0.25) and m[3, 3] == 0.0
    with pytest.raises(ValueError, match="do not fit"):
        occlusion_map(np.zeros((2, 2)), (4, 4), (2, 2))
    assert "occlusion" in method_names()
