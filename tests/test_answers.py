"""The bias step's answerers (`tasks.answers`): the Ray workers answer edited images exactly
as a model loaded in this process does, and a failed regeneration names its sample.

Real tiny model, real local Ray (a pool of two CPU workers, started lazily by the first
call, as the flow's resumed run does).
"""

from __future__ import annotations

import numpy as np
import pytest

from diffcam_core.settings import CamSettings, GenerationSettings
from flows.paths import DEFAULT_MODEL

pytestmark = pytest.mark.slow


def _edited_images(root, n: int = 4) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Each sample's image, and the same image with a corner region and its first object erased."""
    from diffcam_core.inpaint import erase_mask, erase_region
    from storage.datasets import load_dataset
    from storage.images import load_image

    ds = load_dataset(root)
    images, prompts, ids = [], [], []
    for s in ds.samples[:n]:
        img = np.asarray(load_image(s.image_path))
        masks = s.object_masks(img.shape[1::-1])
        variants = [img, erase_region(img, (0.0, 0.0, 0.25, 0.25))]
        if masks:
            variants.append(erase_mask(img, masks[0][1]))
        images += variants
        prompts += [s.prompt] * len(variants)
        ids += [s.sample_id] * len(variants)
    return images, prompts, ids


def test_pool_answers_equal_local_answers_and_failures_name_the_sample(make_dataset) -> None:
    from diffcam_core.models.base import load_adapter
    from tasks.answers import local_answerer, pool_answerer
    from tasks.pool import CamPool, PoolConfig, WorkerCrash

    images, prompts, ids = _edited_images(make_dataset(n=4))
    # the run's generation settings are sent with each call: a non-default seed must reach the workers
    generation = GenerationSettings(seed=7)
    local = local_answerer(load_adapter(DEFAULT_MODEL), generation)(images, prompts, ids)
    assert len(local) == len(images) and all(isinstance(t, str) and t for t in local)

    pool = CamPool(PoolConfig(model_dir=str(DEFAULT_MODEL), settings=CamSettings(), workers=2, cpus_per_worker=1,
                              gpus_per_worker=0))
    try:
        answer = pool_answerer(pool, generation)
        assert not pool.actors  # not started until a regeneration is asked for
        assert answer(images, prompts, ids) == local
        assert pool.n_workers == 2
        assert answer(images[::-1], prompts[::-1], ids[::-1]) == local[::-1]  # whichever worker answers
        assert answer([], [], []) == []
        with pytest.raises(WorkerCrash, match="synth-broken"):
            answer([images[0], "not an image"], prompts[:2], [ids[0], "synth-broken"])
    finally:
        pool.close()
    assert not pool.actors
