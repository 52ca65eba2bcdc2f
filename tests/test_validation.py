"""Great Expectations suites: a clean run passes; each kind of tampering fails by name."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffcam.core.settings import CamSettings
from diffcam.storage.store import Store
from diffcam.storage.validation import ValidationResult, validate_run
from tests.test_store import fabricate_run

#: The methods a default run writes (what these tables are built with).
METHODS = tuple(CamSettings().methods)


def _validate(
    tmp_path: Path,
    mutate: Callable[[dict[str, Any]], None] | None = None,
    after_commit: Callable[[Store], None] | None = None,
) -> ValidationResult:
    st = Store(tmp_path / "store")
    fabricate_run(st, tmp_path / "ds", mutate=mutate)
    if after_commit is not None:
        after_commit(st)
    return validate_run(st, "run-1")


def _edit_committed_file(st: Store) -> None:
    """Change a committed file behind the store's back (its sha256 no longer matches)."""
    path = st.table_path("run-1", "failures", 1)
    t = pq.read_table(path)
    pq.write_table(t.set_column(t.schema.get_field_index("message"), "message", pa.array(["edited"])), path)


def _failed(res: ValidationResult) -> set[tuple[str, str]]:
    return {(e["table"], e["expectation"]) for e in res.failed}


def test_clean_run_passes(tmp_path: Path) -> None:
    res = _validate(tmp_path)
    assert res.success, res.failed
    names = {(e["table"], e["expectation"]) for e in res.per_expectation}
    assert ("token_maps", "(run_id, sample_id, word_index, method) unique") in names
    assert ("samples+failures", "samples + failures == runs.n_samples") in names
    assert ("token_maps", "0 <= inside_frac <= 1") in names
    assert ("store", "committed files match their commit markers (sha256)") in names
    assert all(set(e) == {"table", "expectation", "success", "details"} for e in res.per_expectation)
    back = ValidationResult.from_json(res.to_json())
    assert back == res


def test_tampered_run_fails_with_named_expectations(tmp_path: Path) -> None:
    """Each tampering trips its own expectation (one GX run for all of them: GX costs ~1.5 s a run)."""
    def tamper(rows: dict[str, Any]) -> None:
        maps = rows["shards"][0]["token_maps"]
        # 1. duplicate key: the same (sample, word, method) twice
        maps.append(copy.deepcopy(maps[0]))
        # 2. out of range: more than all of the mass inside the object
        maps[5]["inside_frac"] = 1.5
        # 3. a masked map without its Obj-IoU
        next(r for r in maps if r["has_mask"])["obj_iou"] = None
        # 3b. evidence columns where they cannot exist: specificity without a mask, faithfulness on a function word
        next(r for r in maps if not r["has_mask"])["specificity"] = 0.5
        next(r for r in maps if r["is_function"])["vanished"] = True
        # 4. s0's word 1 loses its gradcam map; s0 claims 5 words
        rows["shards"][0]["token_maps"] = [r for r in maps if not (r["word_index"] == 1 and r["method"] == "gradcam")]
        rows["shards"][0]["samples"][0]["n_words"] = 5
        # 5. dropped rows: s1 vanishes from samples (its maps and flag stay)
        rows["shards"][1]["samples"] = []

    res = _validate(tmp_path, tamper, _edit_committed_file)  # 6. a committed file edited afterwards
    assert not res.success
    failed = _failed(res)
    assert ("token_maps", "(run_id, sample_id, word_index, method) unique") in failed
    assert ("token_maps", "0 <= inside_frac <= 1") in failed
    assert ("token_maps", "has_mask -> obj_iou not null") in failed
    assert ("token_maps", "has_mask false -> specificity null") in failed
    assert ("token_maps", "function word -> vanished null") in failed
    assert ("token_maps", f"every word has all {len(METHODS)} methods (run config)") in failed
    assert ("samples", "samples.n_words == words with maps") in failed
    assert ("samples+failures", "samples + failures == runs.n_samples") in failed
    assert ("samples", "row count == runs.n_results") in failed
    assert ("token_maps", "maps belong to audited samples") in failed
    assert ("store", "committed files match their commit markers (sha256)") in failed
    by_name = {e["expectation"]: e for e in res.failed}
    assert by_name["samples + failures == runs.n_samples"]["details"]["observed_value"] == 2
    assert 1.5 in by_name["0 <= inside_frac <= 1"]["details"]["partial_unexpected_list"]
    # untouched rules still pass
    passed = {(e["table"], e["expectation"]) for e in res.per_expectation if e["success"]}
    assert ("failures", "stage in {load, validate, generate, attribute, write, worker}") in passed
    assert ("failures", "row count == runs.n_failures") in passed
    assert ("token_maps", "octet_length(map) == grid_h * grid_w") in passed


def test_unknown_run(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        validate_run(Store(tmp_path / "s"), "nope")
