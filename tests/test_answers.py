"""The bias step's answerers (`diffcam.tasks.answers`) and scanners (`diffcam.tasks.scan`): the Ray workers
answer and scan edited images exactly as a model loaded in this process does, and a failed
regeneration or scan names its sample.

Real tiny model, real local Ray (a pool of two CPU workers, started lazily by the first
call, as the flow's resumed run does).
"""

from __future__ import annotations

import numpy as np
import pytest

from diffcam.core.settings import CamSettings, GenerationSettings
from diffcam.flows.paths import DEFAULT_MODEL

pytestmark = pytest.mark.slow


def _edited_images(root, n: int = 4) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Each sample's image, and the same image with a corner region and its first object erased."""
    from diffcam.core.inpaint import erase_mask, erase_region
    from diffcam.storage.datasets import load_dataset
    from diffcam.storage.images import load_image

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


def test_pool_answers_and_scans_equal_local_ones_and_failures_name_the_sample(make_dataset) -> None:
    from diffcam.core.models.base import load_adapter
    from diffcam.tasks.answers import local_answerer, pool_answerer
    from diffcam.tasks.pool import CamPool, PoolConfig, WorkerCrash
    from diffcam.tasks.scan import local_scanner, pool_scanner

    images, prompts, ids = _edited_images(make_dataset(n=4))
    # the run's generation settings are sent with each call: a non-default seed must reach the workers
    generation = GenerationSettings(seed=7)
    local = local_answerer(load_adapter(DEFAULT_MODEL), generation)(images, prompts, ids)
    assert len(local) == len(images) and all(isinstance(t, str) and t for t in local)

    cam = CamSettings()
    adapter = load_adapter(DEFAULT_MODEL)
    said = [t.split() for t in local]
    word = next(w for w in said[0] if w not in ("a", "and"))  # a content word of the first answer
    scan_args = ([images[0], images[1], images[0]], prompts[:2] + prompts[:1], [word, word, "zebra"], ["x", "y", "z"])
    local_scan = local_scanner(adapter, generation, cam.attribution_step, 0.125)(*scan_args)
    assert local_scan[0] is not None and local_scan[2] is None  # "zebra" is never said: not scanned

    pool = CamPool(PoolConfig(model_dir=str(DEFAULT_MODEL), settings=cam, workers=2, cpus_per_worker=1,
                              gpus_per_worker=0))
    try:
        # the scanner on the same workers (one Ray start for both checks)
        scan = pool_scanner(pool, generation, cam.attribution_step, 0.125)
        assert not pool.actors
        remote = scan(*scan_args)
        assert [r is None for r in remote] == [r is None for r in local_scan]
        for a, b in zip(remote, local_scan):
            if a is not None:
                assert a.answer == b.answer and a.grid == b.grid and np.allclose(a.drops, b.drops, atol=1e-5)
        with pytest.raises(WorkerCrash, match="synth-broken"):
            scan([images[0], "not an image"], prompts[:2], [word] * 2, ["a", "synth-broken"])
        answer = pool_answerer(pool, generation)
        assert answer(images, prompts, ids) == local
        assert pool.n_workers == 2
        assert answer(images[::-1], prompts[::-1], ids[::-1]) == local[::-1]  # whichever worker answers
        assert answer([], [], []) == []
        with pytest.raises(WorkerCrash, match="synth-broken"):
            answer([images[0], "not an image"], prompts[:2], [ids[0], "synth-broken"])
    finally:
        pool.close()
    assert not pool.actors
