"""Row builders (tasks/rows.py) and shard assembly: hand-built explanations, known answers, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from diffcam.core import metrics
from diffcam.core.stats import map_stats
from diffcam.core.types import SampleExplanation, WordMaps, WordSpan
from diffcam.storage.images import SampleError
from diffcam.storage.schemas import KEYS, dequantize_map, table_from_rows
from diffcam.tasks.plan import Shard
from diffcam.tasks.rows import failure_row, failure_stage, ground_words, map_columns, sample_row, token_map_rows

# ----------------------------------------------------------------------- grounding


def test_repeated_words_ground_to_objects_in_order():
    answer = "a green circle and a green triangle".split()
    objects = ["green", "circle", "green", "triangle"]  # object 0: green circle, object 1: green triangle
    assert ground_words(answer, objects) == [None, 0, 1, None, None, 2, 3]


def test_extra_occurrences_and_unknown_words_have_no_mask():
    assert ground_words(["red", "red", "blue"], ["red"]) == [0, None, None]
    assert ground_words([], ["red"]) == []
    assert ground_words(["red"], []) == [None]


def test_grounding_ignores_case_and_punctuation():
    assert ground_words(["Red", "circle."], ["red", "Circle"]) == [0, 1]
    assert ground_words([".", ""], ["."]) == [None, None]  # empty after stripping: never grounded


# ------------------------------------------------------------------------ one map


def _quadrant_mask(size: int = 8) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[: size // 2, size // 2:] = True  # top-right quadrant
    return m


def test_map_columns_known_values():
    m = np.zeros((4, 4), dtype=np.float32)
    m[1, 2] = 1.0
    m[3, 0] = 0.5
    mask = _quadrant_mask()
    c = map_columns(m, mask, [mask])
    assert (c["grid_h"], c["grid_w"]) == (4, 4)
    assert c["mass"] == pytest.approx(1.5 / 16)  # mean of the map normalised to max 1
    assert (c["peak_x"], c["peak_y"]) == (2, 1)  # grid column, row
    q = np.frombuffer(c["map"], dtype=np.uint8).reshape(4, 4)
    assert q[1, 2] == 255 and q[3, 0] == 128 and q.sum() == 255 + 128
    assert np.allclose(dequantize_map(c["map"], 4, 4, c["map_max"]), m, atol=c["map_max"] / 510)
    st = map_stats(m, mask)
    assert c["inside_frac"] == pytest.approx(st["inside_frac"])
    assert c["enrichment"] == pytest.approx(st["inside_frac"] / 0.25)
    assert c["com_x"] == pytest.approx(st["com_x"]) and c["entropy"] == pytest.approx(st["entropy"])
    assert c["has_mask"] and c["pointing_hit"] is True
    assert c["concentration"] == pytest.approx(metrics.concentration(m, mask))
    assert c["contrast"] == pytest.approx(metrics.contrast(m, mask))
    assert c["f3"] == pytest.approx(metrics.f3(c["obj_iou"], c["contrast_score"], c["concentration"]))
    assert c["obj_iou_any"] >= c["obj_iou"]


def test_map_without_mask_has_null_mask_metrics():
    c = map_columns(np.eye(3, dtype=np.float32), None)
    assert c["has_mask"] is False
    for k in ("inside_frac", "enrichment", "pointing_hit", "obj_iou", "obj_iou_any", "contrast",
              "contrast_score", "concentration", "f3"):
        assert c[k] is None, k


def test_zero_map_with_mask_scores_zero_and_has_no_location():
    mask = _quadrant_mask()
    c = map_columns(np.zeros((4, 4), dtype=np.float32), mask, [mask])
    assert c["zero_map"] and c["map_max"] == 0.0 and c["map"] == bytes(16) and c["mass"] == 0.0
    assert c["com_x"] is None and c["peak_x"] is None and c["entropy"] is None
    assert c["inside_frac"] == 0.0 and c["enrichment"] == 0.0 and c["concentration"] == 0.0
    assert c["pointing_hit"] is False and c["obj_iou"] == 0.0 and c["f3"] == 0.0 and c["contrast"] == 0.0


def test_mask_covering_the_image_leaves_contrast_undefined():
    full = np.ones((8, 8), dtype=bool)
    c = map_columns(np.eye(4, dtype=np.float32), full, [full])
    assert c["contrast"] is None and c["contrast_score"] is None and c["f3"] is None
    assert c["concentration"] == pytest.approx(1.0)


def test_bad_map_raises():
    m = np.ones((2, 2), dtype=np.float32)
    m[0, 0] = np.nan
    with pytest.raises(ValueError):
        map_columns(m, None)


# ------------------------------------------------------------------ whole sample


def _explanation() -> SampleExplanation:
    hot = np.zeros((4, 4), dtype=np.float32)
    hot[1, 2] = 1.0
    flat = np.full((4, 4), 0.25, dtype=np.float32)
    words = (
        WordMaps(WordSpan(0, "green", (0,), (11,), 3, False), None, -0.5, None,
                 {"diffusion-cam": hot, "gradcam": flat}, False),
        WordMaps(WordSpan(1, "and", (1,), (12,), 1, True), "green", -0.1, -0.3,
                 {"diffusion-cam": flat, "gradcam": np.zeros((4, 4), np.float32)}, False),
    )
    return SampleExplanation(answer="green and", token_ids=(11, 12), words=words, grid=(4, 4), n_steps=5,
                             layer="encoder.0", attribution_step="commit",
                             timings={"generate_s": 0.1, "attribution_s": 0.2, "total_s": 0.3})


def _item() -> dict:
    return {"sample_id": "s1", "line_no": 3, "image_path": "/d/images/s1.png", "image_rel": "images/s1.png",
            "prompt": "name the objects", "objects": [("green", "/d/m.png")], "coco_regions": None,
            "reference_answer": "a green circle"}


def test_token_map_rows_and_sample_row_fit_the_schemas():
    expl = _explanation()
    mask = _quadrant_mask()
    rows = token_map_rows("r", 0, "s1", expl, [mask, None], [mask])
    assert [(r["word_index"], r["method"]) for r in rows] == [
        (0, "diffusion-cam"), (0, "gradcam"), (1, "diffusion-cam"), (1, "gradcam")]
    t = table_from_rows("token_maps", rows)
    assert t.num_rows == 4
    assert len({tuple(r[k] for k in KEYS["token_maps"]) for r in rows}) == 4
    assert rows[2]["distractor"] == "green" and rows[2]["distractor_score"] == pytest.approx(-0.3)
    assert [r["has_mask"] for r in rows] == [True, True, False, False]

    row = sample_row("r", 0, _item(), expl, width=8, height=8, image_sha256="ab" * 32, n_objects=1, token_rows=rows)
    table_from_rows("samples", [row])
    assert row["n_words"] == 2 and (row["grid_h"], row["grid_w"]) == (4, 4) and row["n_steps"] == 5
    assert row["image_path"] == "images/s1.png" and row["reference_answer"] == "a green circle"
    # summaries: diffusion-cam maps of masked words only (here: "green")
    assert row["mean_obj_iou"] == pytest.approx(rows[0]["obj_iou"])
    assert row["mean_inside_frac"] == pytest.approx(rows[0]["inside_frac"])
    assert row["pointing_rate"] == 1.0
    assert row["t_total_s"] == pytest.approx(0.3)


def test_sample_without_masks_has_null_summaries():
    expl = _explanation()
    rows = token_map_rows("r", 0, "s1", expl, [None, None])
    row = sample_row("r", 0, _item(), expl, width=8, height=8, image_sha256="0" * 64, n_objects=0, token_rows=rows)
    assert row["mean_obj_iou"] is None and row["pointing_rate"] is None and row["mean_f3"] is None


def test_word_mask_count_must_match():
    with pytest.raises(ValueError, match="word masks"):
        token_map_rows("r", 0, "s1", _explanation(), [None])


# ------------------------------------------------------------------------ failures


def _raise(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - the helper exists to catch whatever it raised
        return e


def test_failure_rows_keep_class_message_stage_and_traceback():
    e = _raise(SampleError("mask", "size-mismatch", "mask m.png is 3x3, image is 8x8", path="m.png"))
    assert failure_stage(e, "generate") == "load"  # mask problems are input problems
    row = failure_row("r", 2, "s9", 10, failure_stage(e, "generate"), e)
    assert row["error_class"] == "SampleError" and "size-mismatch" in row["message"]
    assert "Traceback" in row["traceback"] and row["attempts"] == 1
    table_from_rows("failures", [row])

    e2 = _raise(RuntimeError("boom"))
    assert failure_stage(e2, "attribute") == "attribute"
    assert failure_row("r", 0, "s", None, "attribute", e2)["message"] == "boom"
    with pytest.raises(ValueError, match="stage"):
        failure_row("r", 0, "s", None, "nonsense", e2)


def test_long_messages_are_clipped():
    row = failure_row("r", 0, "s", None, "generate", _raise(ValueError("x" * 10_000)))
    assert len(row["message"]) <= 2000 and row["message"].endswith("…")


# ---------------------------------------------------------------- shard assembly


def _result(sid: str, ok: bool) -> dict:
    expl = _explanation()
    if ok:
        tm = token_map_rows("r", 0, sid, expl, [None, None])
        sr = sample_row("r", 0, {**_item(), "sample_id": sid}, expl, width=8, height=8, image_sha256="0" * 64,
                        n_objects=0, token_rows=tm)
        return {"sample_id": sid, "samples": sr, "token_maps": tm, "failures": None}
    return {"sample_id": sid, "samples": None, "token_maps": [],
            "failures": failure_row("r", 0, sid, 1, "load", _raise(OSError("bad")))}


def _shard() -> Shard:
    planned = {"shard_id": 0, "sample_id": "c", "line_no": 3, "stage": "load", "error_class": "MissingFile",
               "message": "missing file(s): x", "traceback": None, "attempts": 1}
    return Shard(0, items=({"sample_id": "a"}, {"sample_id": "b"}, {"sample_id": "d"}), failures=(planned,),
                 sample_ids=("a", "b", "c", "d"))


def test_assemble_tables_puts_every_sample_in_exactly_one_table():
    from diffcam.tasks.shard import assemble_tables

    tables = assemble_tables("r", _shard(), [_result("d", True), _result("b", False), _result("a", True)])
    assert tables["samples"].column("sample_id").to_pylist() == ["a", "d"]  # manifest order
    assert tables["failures"].column("sample_id").to_pylist() == ["b", "c"]
    assert tables["token_maps"].num_rows == 8
    assert set(tables["failures"].column("run_id").to_pylist()) == {"r"}


@pytest.mark.parametrize("results, match", [
    ([_result("a", True), _result("b", True)], "missing"),
    ([_result("a", True), _result("a", True), _result("b", True), _result("d", True)], "two results"),
    ([_result("a", True), _result("b", True), _result("d", True), _result("zz", True)], "unknown"),
    ([_result("a", True), _result("b", True), _result("d", True), _result("c", True)], "duplicated"),
])
def test_assemble_tables_refuses_to_lose_or_duplicate(results, match):
    from diffcam.tasks.shard import assemble_tables

    with pytest.raises(RuntimeError, match=match):
        assemble_tables("r", _shard(), results)


def test_result_must_be_exactly_one_of_sample_or_failure():
    from diffcam.tasks.shard import assemble_tables

    bad = {**_result("a", True), "failures": _result("a", False)["failures"]}
    with pytest.raises(RuntimeError, match="exactly one"):
        assemble_tables("r", _shard(), [bad])
