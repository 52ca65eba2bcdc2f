"""Shard plans: stable ids, manifest order, no sample lost, planned failures for missing files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from diffcam.storage.datasets import load_dataset
from diffcam.storage.samples import Sample
from diffcam.storage.schemas import table_from_rows
from diffcam.tasks.plan import item_sample, plan_shards, work_item


def _samples(n: int, problem_at: tuple[int, ...] = ()) -> list[Sample]:
    return [
        Sample(sample_id=f"s{i}", image_path=Path(f"/data/img/{i}.png"), prompt="p",
               objects=(("red", Path(f"/data/m/{i}.png")),), line_no=i + 1,
               problem="missing file(s): x" if i in problem_at else None)
        for i in range(n)
    ]


def test_shards_follow_manifest_order_with_fixed_size():
    shards = plan_shards(_samples(7), shard_size=3)
    assert [s.shard_id for s in shards] == [0, 1, 2]
    assert [s.sample_ids for s in shards] == [("s0", "s1", "s2"), ("s3", "s4", "s5"), ("s6",)]
    assert [it["sample_id"] for it in shards[1].items] == ["s3", "s4", "s5"]


def test_same_dataset_gives_same_plan(make_dataset):
    root = make_dataset(n=5)
    a = plan_shards(load_dataset(root).samples, shard_size=2, root=root)
    b = plan_shards(load_dataset(root / "manifest.jsonl").samples, shard_size=2, root=root)
    assert [(s.shard_id, s.sample_ids) for s in a] == [(s.shard_id, s.sample_ids) for s in b]
    assert a[0].items == b[0].items


def test_limit_keeps_a_prefix_and_prefix_shards_are_unchanged():
    full = plan_shards(_samples(10), shard_size=4)
    short = plan_shards(_samples(10), shard_size=4, limit=6)
    assert [s.sample_ids for s in short] == [("s0", "s1", "s2", "s3"), ("s4", "s5")]
    assert short[0].sample_ids == full[0].sample_ids
    assert plan_shards(_samples(3), limit=0) == []


def test_problem_samples_become_load_failures_never_vanish():
    shards = plan_shards(_samples(5, problem_at=(1, 4)), shard_size=2)
    every = [sid for s in shards for sid in s.sample_ids]
    assert every == [f"s{i}" for i in range(5)]
    items = {it["sample_id"] for s in shards for it in s.items}
    failed = {f["sample_id"]: f for s in shards for f in s.failures}
    assert items == {"s0", "s2", "s3"} and set(failed) == {"s1", "s4"}
    assert items.isdisjoint(failed)
    assert failed["s1"]["stage"] == "load" and failed["s1"]["shard_id"] == 0
    assert failed["s4"]["shard_id"] == 2 and "missing" in failed["s4"]["message"]
    # a planned failure is a valid failures row once the run id is added
    table_from_rows("failures", [{**failed["s1"], "run_id": "r"}])


def test_missing_image_in_a_real_manifest_is_planned_as_failure(make_dataset):
    root = make_dataset(n=4, missing=(2,))
    shards = plan_shards(load_dataset(root).samples, shard_size=4, root=root)
    assert [f["sample_id"] for f in shards[0].failures] == ["synth-000002"]
    assert len(shards[0].items) == 3


def test_work_items_are_picklable_and_rebuild_the_sample(make_dataset):
    root = make_dataset(n=2)
    ds = load_dataset(root)
    item = plan_shards(ds.samples, root=ds.root)[0].items[0]
    assert pickle.loads(pickle.dumps(item)) == item
    assert item["image_rel"] == "images/synth-000000.png"
    assert Path(item["image_path"]).is_absolute()
    s = item_sample(item)
    assert s.objects == ds.samples[0].objects and s.image_path == ds.samples[0].image_path
    img_size = (64, 64)
    assert [w for w, _ in s.object_masks(img_size)] == [w for w, _ in ds.samples[0].objects]


def test_image_outside_root_keeps_absolute_path():
    s = _samples(1)[0]
    assert work_item(s, Path("/elsewhere"))["image_rel"] == "/data/img/0.png"
    assert work_item(s, Path("/data"))["image_rel"] == "img/0.png"


@pytest.mark.parametrize("kw", [{"shard_size": 0}, {"limit": -1}])
def test_bad_plan_settings_raise(kw):
    with pytest.raises(ValueError):
        plan_shards(_samples(2), **kw)


def test_duplicate_ids_raise():
    s = _samples(2)
    with pytest.raises(ValueError, match="duplicate"):
        plan_shards([s[0], s[0]])
