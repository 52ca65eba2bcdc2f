"""`diffcam bench method`'s JSON contract on a few images (slow: real model, every row)."""

from __future__ import annotations

import json

import pytest

from diffcam.flows.paths import DEFAULT_MODEL


@pytest.mark.slow
def test_bench_method_json_contract(tmp_path):
    from diffcam.evaluation.method_table import main

    out_file = tmp_path / "bench.json"
    main(n=4, model=DEFAULT_MODEL, json_out=out_file, sweep=True, sweep_n=2, faith_n=2, clutter_n=2,
         echo=lambda *_: None)
    doc = json.loads(out_file.read_text())
    assert doc["tuning_seed"] != doc["report_seed"]
    methods = [r["method"] for r in doc["rows"]]
    for m in ("random", "objectness", "all-objects", "oracle", "gradcam", "diffusion-cam-raw", "diffusion-cam",
              "token-gradnorm"):
        assert m in methods
    fields = ("obj_iou", "pointing", "multi_pointing", "specificity", "deletion_auc", "insertion_auc", "vanish_rate")
    for r in doc["rows"]:
        for f in fields:
            assert f in r
            assert r[f] is None or 0.0 <= r[f] <= 1.0, (r["method"], f, r[f])
    by = {r["method"]: r for r in doc["rows"]}
    # the oracle is the named object itself: on a multi-object image it points there every time
    # (seed 2's first four images hold two with two objects, so the measure is defined)
    assert by["oracle"]["multi_pointing"] == 1.0 and by["oracle"]["specificity"] > 0.95
    assert by["random"]["n_faithfulness"] == by["oracle"]["n_faithfulness"] > 0
    assert set(doc["tuning"]["chosen_on_tuning_seed"]) == {"layer", "distractor", "attribution_step", "dacg_sigma"}
    assert doc["clutter"]["n_images"] == 2
    # the distributions that say whether AKD's adaptivity and commit-step attribution can act
    info = doc["main_info"]
    kernels = {int(k): v for k, v in info["akd_kernel_size_counts"].items()}
    commits = {int(k): v for k, v in info["content_word_commit_step_counts"].items()}
    assert sum(kernels.values()) == sum(commits.values()) > 0  # one kernel per content word's raw map
    assert all(k % 2 == 1 and k >= 3 for k in kernels)  # the default model's 8x8 grid clamps AKD to 3x3
    steps = {int(k) for k in doc["generation"]["n_steps_counts"]}
    assert all(1 <= c <= max(steps) for c in commits)
