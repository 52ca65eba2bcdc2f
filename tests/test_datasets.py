"""Tests of dataset input (diffcam.storage.datasets and its loaders, diffcam.storage.images, diffcam.storage.coco,
diffcam.storage.synthetic_writer): formats, validation, path escapes, COCO masks, images, hashing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffcam.core.synthetic import CueSpec, SynthSettings, make_samples
from diffcam.storage.coco import DEFAULT_COCO_PROMPT, coco_rle_counts_from_string, decode_coco_rle, rasterise_polygons
from diffcam.storage.datasets import load_dataset
from diffcam.storage.images import SampleError, load_image, load_mask
from diffcam.storage.samples import ManifestError
from diffcam.storage.synthetic_writer import write_synthetic_dataset

SETTINGS = SynthSettings(cue=CueSpec(word="circle", pos="top-left", size=6, color="magenta", p=1.0))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("ds") / "synth", 8, 5, SETTINGS)


def _problems(err: ManifestError) -> set[tuple[int | None, str]]:
    return {(p.line, p.field) for p in err.problems}


def _png(path: Path, size=(8, 6), color=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# ----------------------------------------------------------------- synthetic writer + JSONL


def test_synthetic_folder_layout_and_manifest(synth_dir):
    assert sorted(p.name for p in synth_dir.iterdir()) == ["dataset.json", "images", "manifest.jsonl", "masks"]
    assert not list(synth_dir.parent.glob(".synth.tmp-*"))
    meta = json.loads((synth_dir / "dataset.json").read_text())
    assert meta["seed"] == 5 and meta["n"] == 8
    assert SynthSettings.model_validate(meta["settings"]) == SETTINGS
    assert CueSpec.model_validate(meta["cue"]) == SETTINGS.cue
    rows = [json.loads(line) for line in (synth_dir / "manifest.jsonl").read_text().splitlines()]
    expected = list(make_samples(8, 5, SETTINGS))
    for row, s in zip(rows, expected):
        assert row["answer"] == s.answer and row["prompt"] == s.prompt and row["cue_present"] == s.cue_present
        assert row["cue_box"] == ([2, 2, 8, 8] if s.cue_present else None)
        assert [o["word"] for o in row["objects"]] == [w for o in s.objects for w in (o.color, o.shape)]
        # colour and shape words of object k share masks/<id>_k.png
        assert [o["mask"] for o in row["objects"]] == [
            f"masks/{row['sample_id']}_{k}.png" for k in range(len(s.objects)) for _ in range(2)
        ]
        m = Image.open(synth_dir / row["objects"][0]["mask"])
        assert m.mode == "L" and set(np.unique(np.array(m))) <= {0, 255}
        assert np.array_equal(np.array(Image.open(synth_dir / row["image"])), s.image)


def test_synthetic_round_trip_through_loader(synth_dir):
    ds = load_dataset(synth_dir)
    assert ds.format == "jsonl" and len(ds) == 8 and ds.root == synth_dir.resolve()
    assert ds.meta["seed"] == 5 and ds.uri.startswith("file://")
    for sample, s in zip(ds.samples, make_samples(8, 5, SETTINGS)):
        assert sample.problem is None and sample.prompt == s.prompt
        assert sample.extra["answer"] == s.answer and sample.extra["cue_present"] == s.cue_present
        img = load_image(sample.image_path)
        assert np.array_equal(np.array(img), s.image)
        masks = sample.object_masks(img.size)
        assert [w for w, _ in masks] == [w for o in s.objects for w in (o.color, o.shape)]
        for k, o in enumerate(s.objects):
            assert np.array_equal(masks[2 * k][1], o.mask) and np.array_equal(masks[2 * k + 1][1], o.mask)


def test_writer_refuses_non_empty_and_cleans_up_on_crash(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_synthetic_dataset(tmp_path / "full", 2, 0)
    assert (tmp_path / "full" / "x").read_text() == "keep me"

    def boom(i):
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(tmp_path / "crash", 4, 0, progress=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no half folder, no temp
    (tmp_path / "empty").mkdir()
    assert write_synthetic_dataset(tmp_path / "empty", 1, 0).is_dir()


# ----------------------------------------------------------------- CSV / Parquet / direct file


def _rows(synth_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (synth_dir / "manifest.jsonl").read_text().splitlines()]


def _ids_objects(ds):
    return [(s.sample_id, s.image_path, s.prompt, s.objects) for s in ds.samples]


def test_csv_and_parquet_and_direct_manifest_file(synth_dir, tmp_path):
    ref = load_dataset(synth_dir / "manifest.jsonl")
    rows = _rows(synth_dir)
    d = tmp_path / "copy"
    shutil.copytree(synth_dir, d)
    (d / "manifest.jsonl").unlink()
    flat = [{"sample_id": r["sample_id"], "image": r["image"], "prompt": r["prompt"],
             "objects": json.dumps(r["objects"]), "answer": r["answer"]} for r in rows]
    import csv

    with open(d / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    ds_csv = load_dataset(d)
    assert ds_csv.format == "csv" and ds_csv.samples[0].line_no == 2
    assert [(a, b.relative_to(d.resolve()), c, tuple((w, m.relative_to(d.resolve())) for w, m in o))
            for a, b, c, o in _ids_objects(ds_csv)] == \
           [(a, b.relative_to(ref.root), c, tuple((w, m.relative_to(ref.root)) for w, m in o))
            for a, b, c, o in _ids_objects(ref)]
    assert ds_csv.samples[1].extra == {"answer": rows[1]["answer"]}

    (d / "manifest.csv").unlink()
    pq.write_table(pa.Table.from_pylist(flat), d / "manifest.parquet")  # objects as JSON string
    ds_pq = load_dataset(d)
    assert ds_pq.format == "parquet" and _ids_objects(ds_pq) == _ids_objects(ds_csv)
    native = [{**r, "objects": json.loads(r["objects"])} for r in flat]  # list of structs
    pq.write_table(pa.Table.from_pylist(native), d / "other.parquet")
    assert _ids_objects(load_dataset(d / "other.parquet")) == _ids_objects(ds_csv)

    pq.write_table(pa.Table.from_pylist(flat), d / "manifest.parquet")
    (d / "manifest.csv").write_text("sample_id,image,prompt\n")
    with pytest.raises(ManifestError, match="ambiguous"):
        load_dataset(d)


def test_folder_without_manifest_and_unknown_suffix(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        load_dataset(tmp_path)
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match="unknown manifest type"):
        load_dataset(tmp_path / "m.txt")
    with pytest.raises(ManifestError, match="does not exist"):
        load_dataset(tmp_path / "nope.jsonl")
    _write_jsonl(tmp_path / "e" / "manifest.jsonl", [""])
    with pytest.raises(ManifestError, match="no samples"):
        load_dataset(tmp_path / "e")


# ----------------------------------------------------------------- validation


def test_every_problem_listed_with_line_and_field(tmp_path):
    root = tmp_path / "d"
    _png(root / "a.png")
    _png(root / "m.png")
    outside = _png(tmp_path / "secret.png")
    (root / "link.png").symlink_to(outside)
    (root / "linkdir").symlink_to(tmp_path)
    good = {"sample_id": "ok", "image": "a.png", "prompt": "p"}
    rows = [
        good,                                                       # 1
        "{not json",                                                # 2
        {"image": "a.png", "prompt": "p"},                          # 3 missing sample_id
        {"sample_id": "b", "image": "a.png", "prompt": "  "},       # 4 empty prompt
        {"sample_id": 7, "image": "a.png", "prompt": "p"},          # 5 wrong type
        {**good},                                                   # 6 duplicate id
        {"sample_id": "c", "image": str(root / "a.png"), "prompt": "p"},         # 7 absolute
        {"sample_id": "d", "image": "../secret.png", "prompt": "p"},             # 8 ..
        {"sample_id": "e", "image": "link.png", "prompt": "p"},                  # 9 symlink out
        {"sample_id": "f", "image": "linkdir/secret.png", "prompt": "p"},        # 10 symlinked dir
        {"sample_id": "g", "image": "a.png", "prompt": "p", "objects": "m.png"},  # 11 not a list
        {"sample_id": "h", "image": "a.png", "prompt": "p", "objects": [{"word": "x"}]},  # 12 no mask
        {"sample_id": "i", "image": "a.png", "prompt": "p", "objects": [{"word": "", "mask": "m.png"}]},  # 13
        {"sample_id": "j", "image": "a.png", "prompt": "p", "objects": [{"word": "x", "mask": "sub/../../secret.png"}]},  # 14
        "[1, 2]",                                                   # 15 not an object
        {"sample_id": "k", "image": "", "prompt": "p"},             # 16 empty path
        {"sample_id": "l", "image": "sub/../a.png", "prompt": "p"},  # 17 fine: stays inside
    ]
    _write_jsonl(root / "manifest.jsonl", rows)
    ds = load_dataset(root)  # one bad line is that line's failure row, not the whole manifest's
    got = {(p.line, p.field) for p in ds.line_problems}
    assert got == {
        (2, "json"), (3, "sample_id"), (4, "prompt"), (5, "sample_id"), (6, "sample_id"),
        (7, "image"), (8, "image"), (9, "image"), (10, "image"), (11, "objects"),
        (12, "objects[0].mask"), (13, "objects[0].word"), (14, "objects[0].mask"), (15, "row"), (16, "image"),
    }
    # every line is a sample, in manifest order; a line without a usable (or with a repeated) id is "line:<n>"
    assert [(s.sample_id, s.problem_kind) for s in ds.samples] == [
        ("ok", None), ("line:2", "malformed-line"), ("line:3", "bad-id"), ("b", "bad-prompt"),
        ("line:5", "bad-id"), ("line:6", "duplicate-id"), ("c", "unsafe-path"), ("d", "unsafe-path"),
        ("e", "unsafe-path"), ("f", "unsafe-path"), ("g", "bad-objects"), ("h", "bad-objects"),
        ("i", "bad-objects"), ("j", "unsafe-path"), ("line:15", "malformed-line"), ("k", "bad-path"), ("l", None),
    ]
    msg = " | ".join(s.problem for s in ds.samples if s.problem)
    assert "duplicate 'ok' (first on line 1)" in msg and "absolute path" in msg
    assert "escapes the dataset root" in msg and "outside the dataset root" in msg
    # a rejected path is never kept: the placeholder points at the root, not at the escaping file
    assert all(s.image_path == root.resolve() for s in ds.samples if s.problem)
    # a manifest in which no line is a sample is refused as a whole, listing every line
    _write_jsonl(root / "manifest.jsonl", rows[1:5] + rows[6:16])
    with pytest.raises(ManifestError) as ei:
        load_dataset(root)
    assert {(1, "json"), (6, "image")} <= _problems(ei.value) and len(ei.value.problems) == 15
    assert "no line is a usable sample" in str(ei.value)


def test_csv_problems_name_lines(tmp_path):
    root = tmp_path / "d"
    _png(root / "a.png")
    (root / "manifest.csv").write_text(
        'sample_id,image,prompt,objects\n'
        'a,a.png,describe,\n'
        'b,a.png,,\n'
        'c,/etc/passwd,describe,\n'
        'd,a.png,describe,{bad json\n'
        'e,a.png,describe,[],extra\n'
    )
    ds = load_dataset(root)
    assert {(p.line, p.field) for p in ds.line_problems} == {(3, "prompt"), (4, "image"), (5, "objects"), (6, "columns")}
    assert [s.sample_id for s in ds.samples] == ["a", "b", "c", "d", "line:6"]
    (root / "manifest.csv").write_text("sample_id,picture,prompt\na,a.png,describe\n")  # structural: refused
    with pytest.raises(ManifestError, match=r"required column\(s\) \['image'\] missing"):
        load_dataset(root)


def test_missing_files_become_per_sample_problems(tmp_path):
    root = tmp_path / "d"
    _png(root / "a.png")
    _write_jsonl(root / "manifest.jsonl", [
        {"sample_id": "ok", "image": "a.png", "prompt": "p"},
        {"sample_id": "gone", "image": "gone.png", "prompt": "p"},
        {"sample_id": "nomask", "image": "a.png", "prompt": "p", "objects": [{"word": "x", "mask": "m.png"}]},
    ])
    ds = load_dataset(root)
    assert [s.sample_id for s in ds.samples] == ["ok", "gone", "nomask"]  # nothing vanishes
    assert ds.samples[0].problem is None
    assert "gone.png" in ds.samples[1].problem and "m.png" in ds.samples[2].problem
    with pytest.raises(SampleError) as ei:
        load_image(ds.samples[1].image_path)
    assert (ei.value.stage, ei.value.reason) == ("load", "missing")
    with pytest.raises(SampleError) as ei:
        ds.samples[2].object_masks((8, 6))
    assert (ei.value.stage, ei.value.reason) == ("mask", "missing")


# ----------------------------------------------------------------- images and masks


def test_load_image_errors(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("definitely not an image")
    good = _png(tmp_path / "good.png", size=(40, 30))
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    cases = {"zero.png": "empty", "text.png": "not-an-image", "trunc.png": "truncated", "missing.png": "missing"}
    for name, reason in cases.items():
        with pytest.raises(SampleError) as ei:
            load_image(tmp_path / name)
        assert (ei.value.stage, ei.value.reason) == ("load", reason), name
    with pytest.raises(SampleError) as ei:
        load_image(good, max_pixels=1000)
    assert ei.value.reason == "too-large" and "40x30" in str(ei.value)
    with pytest.raises(SampleError) as ei:
        load_image(tmp_path)
    assert ei.value.reason == "not-a-file"  # a folder is never opened


def test_load_image_rgb_exif_and_fully_loaded(tmp_path):
    im = Image.new("RGBA", (20, 10), (200, 0, 0, 128))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    im.convert("RGB").save(tmp_path / "rot.jpg", exif=exif)
    im.save(tmp_path / "alpha.png")
    rot = load_image(tmp_path / "rot.jpg")
    assert rot.size == (10, 20) and rot.mode == "RGB"
    a = load_image(tmp_path / "alpha.png")
    (tmp_path / "alpha.png").unlink()  # file closed; pixels already in memory
    assert a.mode == "RGB" and a.getpixel((0, 0)) == (200, 0, 0)


def test_load_mask_size_and_modes(tmp_path):
    m = np.zeros((6, 8), dtype=np.uint8)
    m[1:3, 2:5] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    assert np.array_equal(load_mask(tmp_path / "m.png", (8, 6)), m > 0)
    with pytest.raises(SampleError, match=r"mask .* is 8x6 \(WxH\), image is 6x8") as ei:
        load_mask(tmp_path / "m.png", (6, 8))
    assert ei.value.reason == "size-mismatch"
    p = Image.fromarray((m > 0).astype(np.uint8), mode="L").convert("P")
    p.save(tmp_path / "p.png")
    assert np.array_equal(load_mask(tmp_path / "p.png", (8, 6)), m > 0)


# ----------------------------------------------------------------- COCO


def _rle_to_string(counts: list[int]) -> str:
    """Literal port of pycocotools maskApi.c rleToString (the encoder), for tests."""
    out = []
    for i, c in enumerate(counts):
        x = c - (counts[i - 2] if i > 2 else 0)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def _rle_encode(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(np.int8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return counts


def test_compressed_rle_known_strings():
    assert coco_rle_counts_from_string("053") == [0, 5, 3]
    assert coco_rle_counts_from_string("2342") == [2, 3, 4, 5]  # 4th stored as 5 - 3
    assert coco_rle_counts_from_string("1:2I") == [1, 10, 2, 3]  # negative delta 3 - 10
    assert _rle_to_string([1, 10, 2, 3]) == "1:2I"
    rng = np.random.default_rng(0)
    mask = rng.random((13, 17)) < 0.3
    counts = _rle_encode(mask)
    assert coco_rle_counts_from_string(_rle_to_string(counts)) == counts
    assert np.array_equal(decode_coco_rle({"size": [13, 17], "counts": _rle_to_string(counts)}), mask)
    assert np.array_equal(decode_coco_rle({"size": [13, 17], "counts": counts}), mask)
    with pytest.raises(ValueError, match="sum to"):
        decode_coco_rle({"size": [2, 2], "counts": [1, 2]})


def test_uncompressed_rle_is_column_major():
    # 3 rows x 2 cols; counts: 1 bg, 2 fg, 3 bg -> column 0 rows 1,2 are set
    m = decode_coco_rle({"size": [3, 2], "counts": [1, 2, 3]})
    assert m.tolist() == [[False, False], [True, False], [True, False]]


def _inside_slow(px: float, py: float, poly: list[float]) -> bool:
    """Even-odd point in polygon, the textbook loop."""
    xs, ys = poly[0::2], poly[1::2]
    inside = False
    j = len(xs) - 1
    for i in range(len(xs)):
        if (ys[i] > py) != (ys[j] > py):
            x_cross = xs[i] + (py - ys[i]) * (xs[j] - xs[i]) / (ys[j] - ys[i])
            if px < x_cross:
                inside = not inside
        j = i
    return inside


def test_polygon_rasterisation_known_pixels_and_slow_reference():
    m = rasterise_polygons([[1, 1, 4, 1, 4, 3, 1, 3]], 6, 8)  # 3x2 box in continuous coords
    expected = np.zeros((6, 8), dtype=bool)
    expected[1:3, 1:4] = True
    assert np.array_equal(m, expected)
    two = rasterise_polygons([[1, 1, 4, 1, 4, 3, 1, 3], [5, 4, 7, 4, 7, 6, 5, 6]], 6, 8)
    expected[4:6, 5:7] = True
    assert np.array_equal(two, expected)  # polygons of one annotation are unioned
    rng = np.random.default_rng(3)
    for _ in range(3):
        poly = list(rng.uniform(-2, 22, size=14))  # random, self-intersecting, partly outside
        fast = rasterise_polygons([poly], 20, 20)
        slow = np.array([[_inside_slow(c + 0.5, r + 0.5, poly) for c in range(20)] for r in range(20)])
        assert np.array_equal(fast, slow)


def _coco_fixture(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    _png(tmp_path / "val" / "one.png", size=(8, 6))
    _png(tmp_path / "val" / "two.png", size=(8, 6))
    light = np.zeros((6, 8), dtype=bool)
    light[4:6, 5:8] = True
    cat2 = np.zeros((6, 8), dtype=bool)
    cat2[0:2, 0:2] = True
    cat2[3, 6] = True
    box = np.zeros((6, 8), dtype=bool)
    box[1:3, 1:4] = True
    coco = {
        "images": [{"id": 1, "file_name": "one.png", "width": 8, "height": 6},
                   {"id": 2, "file_name": "two.png", "width": 8, "height": 6},
                   {"id": 3, "file_name": "three.png", "width": 8, "height": 6}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 10, "name": "Traffic Light"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 10, "iscrowd": 1,
             "segmentation": {"size": [6, 8], "counts": _rle_encode(light)}},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]]},
            {"id": 3, "image_id": 2, "category_id": 1,
             "segmentation": {"size": [6, 8], "counts": _rle_to_string(_rle_encode(cat2))}},
        ],
    }
    ann = tmp_path / "annotations" / "instances_val.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(coco))
    return ann, box, light, cat2


def test_coco_polygon_and_rle(tmp_path):
    ann, box, light, cat2 = _coco_fixture(tmp_path)
    for ds in (load_dataset(ann), load_dataset(tmp_path)):  # file or folder (annotations/)
        assert ds.format == "coco" and ds.root == (tmp_path / "val").resolve()
        one, two, three = ds.samples
        assert one.sample_id == "1" and one.prompt == DEFAULT_COCO_PROMPT
        assert one.words == ("cat", "traffic", "light")  # by category id; multi-word names split
        masks = one.object_masks((8, 6))
        assert np.array_equal(masks[0][1], box)
        assert np.array_equal(masks[1][1], light) and np.array_equal(masks[2][1], light)
        assert two.words == ("cat",) and np.array_equal(two.object_masks((8, 6))[0][1], cat2)
        assert three.problem is not None and "three.png" in three.problem
        with pytest.raises(SampleError, match="8x6 .* 9x6") as ei:
            one.object_masks((9, 6))
        assert (ei.value.stage, ei.value.reason) == ("mask", "size-mismatch")


def test_coco_validation(tmp_path):
    ann, *_ = _coco_fixture(tmp_path)
    coco = json.loads(ann.read_text())
    coco["annotations"] += [
        {"image_id": 99, "category_id": 1, "segmentation": [[0, 0, 1, 0, 1, 1]]},
        {"image_id": 1, "category_id": 5, "segmentation": [[0, 0, 1, 0, 1, 1]]},
        {"image_id": 1, "category_id": 1, "segmentation": [[0, 0, 1]]},
        {"image_id": 1, "category_id": 1, "segmentation": {"size": [5, 8], "counts": [40]}},
    ]
    coco["images"].append({"id": 4, "file_name": "../escape.png", "width": 8, "height": 6})
    coco["images"].append({"id": 1, "file_name": "dup.png", "width": 8, "height": 6})
    ann.write_text(json.dumps(coco))
    with pytest.raises(ManifestError) as ei:
        load_dataset(ann)
    fields = sorted(p.field for p in ei.value.problems)
    assert fields == ["category_id", "file_name", "id", "image_id", "segmentation", "segmentation"]
    ann.write_text("{broken")
    with pytest.raises(ManifestError, match="unreadable COCO"):
        load_dataset(ann)


# ----------------------------------------------------------------- hashing


def test_hash_stable_location_independent_and_content_sensitive(synth_dir, tmp_path):
    h1 = load_dataset(synth_dir).content_hash
    assert h1 == load_dataset(synth_dir).content_hash and len(h1) == 64
    moved = tmp_path / "moved"
    shutil.copytree(synth_dir, moved)
    assert load_dataset(moved).content_hash == h1
    mask = sorted((moved / "masks").iterdir())[0]
    arr = np.array(Image.open(mask))
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(mask)
    h2 = load_dataset(moved).content_hash
    assert h2 != h1
    man = moved / "manifest.jsonl"
    man.write_text(man.read_text() + "\n")  # a blank line is still a manifest change
    assert load_dataset(moved).content_hash not in (h1, h2)
