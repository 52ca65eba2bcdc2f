"""Faithfulness curves (diffcam.core.faithfulness) on a scripted model with a known answer.

The scripted model "says" its word exactly when one known grid cell shows the object
colour: its log-probability is high then and low on background. So the oracle map (that
cell first) must make the deletion curve drop at the first step and the word vanish,
and a random map must not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcam.core import faithfulness as fa
from diffcam.core.evidence import oracle_map, random_map

GRID = (4, 4)
CELL = (2, 1)  # the one cell the scripted model reads
RED = np.array([220, 40, 40], dtype=np.uint8)


def _image() -> np.ndarray:
    img = np.full((32, 32, 3), 40, dtype=np.uint8)
    img[16:24, 8:16] = RED  # exactly CELL on a 4x4 grid of 8-px cells
    img[0:8, 24:32] = (40, 40, 220)  # another object the model ignores
    return img


def _reads_cell(image: np.ndarray) -> float:
    """Share of the known cell's pixels that are red."""
    patch = image[16:24, 8:16].reshape(-1, 3)
    return float(np.mean(np.all(patch == RED, axis=1)))


def score_images(images):
    return np.array([-6.0 + 6.0 * _reads_cell(im) for im in images])


def still_said(image) -> bool:
    return _reads_cell(image) > 0.5


def _cell_mask() -> np.ndarray:
    m = np.zeros((32, 32), dtype=bool)
    m[16:24, 8:16] = True
    return m


def test_oracle_drops_at_the_first_deletion_step_and_random_does_not():
    img = _image()
    oracle = oracle_map(_cell_mask(), GRID)
    first_random = []
    for k in range(200):
        maps = {"oracle": oracle, "random": random_map(GRID, np.random.default_rng(k))}
        res = fa.word_faithfulness(img, maps, score_images, still_said, word_key=f"w{k}")
        o, r = res["oracle"], res["random"]
        assert o.deletion_curve[0] == 1.0 and o.deletion_curve[1] == 0.0  # gone after 1 of 16 cells
        assert o.deletion_auc == pytest.approx(0.5 * (1 / 16))
        assert o.insertion_curve[1] == 1.0 and o.insertion_auc == pytest.approx(1 - 0.5 * (1 / 16))
        assert o.vanished is True
        first_random.append(r.deletion_curve[1])
        assert r.deletion_auc >= o.deletion_auc
    # A random order removes the known cell first in 1 of 16 cases: most curves stay up.
    assert np.mean(first_random) >= 0.85


def test_uninformative_word_has_no_areas():
    img = _image()
    res = fa.word_faithfulness(img, {"oracle": oracle_map(_cell_mask(), GRID)},
                               lambda ims: np.zeros(len(ims)), None)
    assert res["oracle"].informative is False and res["oracle"].deletion_auc is None
    assert res["oracle"].vanished is None  # no regeneration was asked for


def test_one_batched_call_scores_every_curve_point():
    calls = []

    def counting(images):
        calls.append(len(images))
        return score_images(images)

    maps = {"a": oracle_map(_cell_mask(), GRID), "b": random_map(GRID, np.random.default_rng(0))}
    fa.word_faithfulness(_image(), maps, counting, None)
    inner = len(fa.DEFAULT_FRACTIONS) - 2
    assert calls == [2 + 2 * inner * len(maps)]


def test_curve_auc_and_normalisation():
    assert fa.curve_auc([0, 0.5, 1], [1, 0, 0]) == pytest.approx(0.25)
    assert fa.normalised_curve([-1.0, -3.0, -9.0], intact=-1.0, blank=-5.0).tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError):
        fa.curve_auc([0.1, 1.0], [1, 0])


def test_rank_cells_breaks_ties_by_seed_not_by_position():
    flat = np.zeros((4, 4))
    orders = {tuple(fa.rank_cells(flat, np.random.default_rng(s))[:3]) for s in range(5)}
    assert len(orders) > 1
    peaked = np.zeros((4, 4))
    peaked[3, 3] = 1.0
    assert fa.rank_cells(peaked, np.random.default_rng(0))[0] == 15
    same = [fa.rank_cells(flat, np.random.default_rng(7)).tolist() for _ in range(2)]
    assert same[0] == same[1]


def test_perturbed_paints_the_cells_or_keeps_only_them():
    img = _image()
    fill = np.array([40, 40, 40])
    gone = fa.perturbed(img, np.array([9]), GRID, fill)  # cell (2, 1)
    assert _reads_cell(gone) == 0.0 and (gone[0:8, 24:32] == img[0:8, 24:32]).all()
    kept = fa.perturbed(img, np.array([9]), GRID, fill, keep=True)
    assert _reads_cell(kept) == 1.0 and (kept[0:8, 24:32] == 40).all()


def test_vanish_fraction_must_be_a_curve_point():
    with pytest.raises(ValueError, match="inner point"):
        fa.word_faithfulness(_image(), {"a": np.ones(GRID)}, score_images, still_said, vanish_fraction=0.3)


def test_adapter_batched_scores_equal_the_attribution_pass():
    """canvas_log_probs on a batch equals the single-image attribution pass's log-probs."""
    from diffcam.core.cam import attribution_canvas
    from diffcam.core.models.base import load_adapter
    from diffcam.core.settings import GenerationSettings
    from diffcam.core.synthetic import make_samples
    from diffcam.flows.paths import DEFAULT_MODEL

    tiny_adapter = load_adapter(DEFAULT_MODEL)
    s = next(make_samples(1, 2))
    image = Image.fromarray(s.image)
    inputs = tiny_adapter.prepare(image, s.prompt)
    gen = tiny_adapter.generate(inputs, GenerationSettings())
    word = gen.words[-1]
    canvas, cond = attribution_canvas(gen, word, "commit")
    with tiny_adapter.attribution_pass(inputs, ["projector"]) as ap:
        single = ap.log_probs(canvas, cond).detach()
    blank = Image.fromarray(np.full_like(s.image, 40))
    batch = tiny_adapter.canvas_log_probs([image, blank, image], s.prompt, canvas, cond)
    assert torch.allclose(batch[0], single, atol=1e-5) and torch.allclose(batch[2], single, atol=1e-5)
    assert not torch.allclose(batch[1], single, atol=1e-3)
    score, said = fa.adapter_scorer(tiny_adapter, s.prompt, canvas, cond, word, GenerationSettings())
    expected = float(single[list(word.positions), list(word.token_ids)].sum())
    assert score([s.image])[0] == pytest.approx(expected, abs=1e-4)
    assert said(s.image) is True  # the intact image still yields the word


def test_sample_selection_is_by_id_and_matches_the_fraction():
    ids = [f"s{i}" for i in range(4000)]
    picked = [fa.selected_for_faithfulness(i, 0.1) for i in ids]
    assert 0.08 < np.mean(picked) < 0.12
    assert picked == [fa.selected_for_faithfulness(i, 0.1) for i in ids]
    assert not any(fa.selected_for_faithfulness(i, 0.0) for i in ids[:100])
    assert all(fa.selected_for_faithfulness(i, 1.0) for i in ids[:100])
