"""Report: self-contained HTML + Markdown, numbers from the queries, extensible sections."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from diffcam.storage import queries
from diffcam.storage.report import DEFAULT_SECTIONS, THUMB_PX, Section, SectionContent, build_report
from diffcam.storage.store import Store
from diffcam.storage.validation import ValidationResult
from tests.test_store import fabricate_run


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, Path, Path]:
    tmp = tmp_path_factory.mktemp("report")
    st = Store(tmp / "store")
    fabricate_run(st, tmp / "ds")
    failed = ValidationResult("run-1", False, [
        {"table": "token_maps", "expectation": "0 <= inside_frac <= 1", "success": False,
         "details": {"unexpected_count": 1}},
        {"table": "runs", "expectation": "run_id not null", "success": True, "details": {}},
    ])
    st.update_run("run-1", validation_json=failed.to_json())
    html_path, md_path = build_report(st, "run-1")
    return st, html_path, md_path


def test_paths_and_self_contained(built: tuple[Store, Path, Path]) -> None:
    st, html_path, md_path = built
    assert html_path == st.root / "reports" / "run-1" / "report.html"
    assert md_path == st.root / "reports" / "run-1" / "summary.md"
    page = html_path.read_text()
    assert "<style>" in page and "<script" not in page and "<link" not in page
    assert "http://" not in page and "https://" not in page and "url(" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    # histogram + 2 galleries x 2 samples x 3 words
    assert len(srcs) == 1 + 2 * 2 * 3
    overlay = Image.open(io.BytesIO(base64.b64decode(srcs[1].split(",", 1)[1])))
    assert overlay.size == (THUMB_PX, THUMB_PX)  # square image shown at THUMB_PX, the map upsampled to it


def test_sections_and_numbers(built: tuple[Store, Path, Path]) -> None:
    st, html_path, _ = built
    page = html_path.read_text()
    for sec in DEFAULT_SECTIONS:
        assert f'id="{sec.key}"' in page
    summary = queries.run_query(st, "run_summary", run_id="run-1").to_pylist()[0]
    assert "sha256:model-a" in page and "succeeded" in page
    assert "Validation FAILED: 1 of 2 expectations met." in page and "0 &lt;= inside_frac &lt;= 1" in page
    table = queries.run_query(st, "method_table", run_id="run-1").to_pylist()
    for row in table:  # the method table shows the query's numbers
        assert f"<td>{row['method']}</td>" in page and f"<td>{row['f3']:.4g}</td>" in page
    assert "off-object" in page and "spatial-bias" in page and "(dataset)" in page
    assert "&quot;inside_frac&quot;: 0.0" in page  # evidence shown, escaped
    assert "FileNotFoundError" in page and "image s2.png not found" in page
    assert f"<td>{summary['n_results']}</td>" in page
    assert "Image not readable" not in page


def test_markdown_summary(built: tuple[Store, Path, Path]) -> None:
    md = built[2].read_text()
    assert md.startswith("# diffcam run `run-1`")
    assert "samples 3: audited 2, failed 1, missing 0" in md
    assert "| method | n_maps |" in md and "| diffusion-cam |" in md
    assert "Validation **FAILED** (1/2 expectations met)." in md
    # the headline counts confirmed findings only; the two fabricated flags were never confirmed
    assert "**confirmed findings: 0**" in md and "candidates not confirmed: 2" in md
    assert "Confirmed findings: 0." in md and "Candidates (not confirmed by the model's behaviour): 2" in md
    assert "Failures: 1." in md


def test_missing_images_and_extra_section(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    fabricate_run(st, tmp_path / "ds")
    (tmp_path / "ds" / "s0.png").unlink()
    (tmp_path / "ds" / "s1.png").write_bytes(b"not a png")

    def bias(ctx) -> SectionContent:
        n = ctx.query("run_summary", run_id=ctx.run_id)[0]["n_results"]
        return SectionContent(f"<p>bias over {n} samples</p>", f"Bias: {n} samples.")

    out = tmp_path / "out"
    sections = [s for s in DEFAULT_SECTIONS if s.key != "distributions"]  # skip the plot: faster
    html_path, md_path = build_report(st, "run-1", out, sections=[*sections, Section("bias", "Bias", bias)])
    page = html_path.read_text()
    assert html_path.parent == out
    assert page.count("Image not readable") == 4  # 2 samples x best/worst
    assert "Not validated" in page
    assert "bias over 2 samples" in page and "## Bias\n\nBias: 2 samples." in md_path.read_text()


def test_run_without_masks_or_rows(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")

    def unmasked(rows) -> None:
        for shard in rows["shards"].values():
            for r in shard.get("token_maps", []):
                for k in ("inside_frac", "enrichment", "pointing_hit", "obj_iou", "obj_iou_any", "contrast",
                          "contrast_score", "concentration", "f3"):
                    r[k] = None
                r["has_mask"] = False
            shard.pop("failures", None)
            shard.pop("flags", None)

    fabricate_run(st, tmp_path / "ds", mutate=unmasked)
    page = build_report(st, "run-1", sections=[s for s in DEFAULT_SECTIONS if s.key != "distributions"])[0].read_text()
    assert "no method table" in page and "cannot be ranked" in page
    assert "No flags." in page and "No failures." in page
    with pytest.raises(KeyError):
        build_report(st, "missing")


def test_faithfulness_ranking_names_the_best_method_and_the_objectness_bar():
    from diffcam.storage.report import faithfulness_ranking

    rows = [
        {"method": "oracle-like", "n_words": 10, "vanish_rate": 0.9, "deletion_auc": 0.3, "insertion_auc": 0.8},
        {"method": "objectness", "n_words": 10, "vanish_rate": 0.5, "deletion_auc": 0.1, "insertion_auc": 0.9},
        {"method": "weak", "n_words": 10, "vanish_rate": 0.2, "deletion_auc": 0.6, "insertion_auc": 0.5},
        {"method": "random", "n_words": 10, "vanish_rate": 0.1, "deletion_auc": 0.7, "insertion_auc": 0.4},
    ]
    text = " ".join(faithfulness_ranking(rows))
    assert "Most faithful attribution method on this model: oracle-like" in text
    assert "90 % of 10 words" in text
    assert "objectness map (50 %): oracle-like." in text
    assert "Lower deletion AUC than objectness (0.100): no attribution method." in text
    assert faithfulness_ranking([]) == ["No word was measured, so the maps cannot be ranked."]


def test_the_verdict_comes_first_and_names_confirmed_findings(tmp_path: Path) -> None:
    """The first section says what a release owner came to learn, with links to the evidence:
    nothing confirmed on a run whose flags are all candidates; the confirmed finding itself
    (kind, word) once a flag is confirmed."""

    def confirm_dataset_flag(rows: dict) -> None:
        rows["shards"]["dataset"]["flags"][0]["confirmed"] = True

    for mutate, expected in ((None, "Nothing confirmed"), (confirm_dataset_flag, "1 confirmed finding(s): ")):
        st = Store(tmp_path / f"store-{expected[:3]}")
        fabricate_run(st, tmp_path / f"ds-{expected[:3]}", mutate=mutate)
        html_path, md_path = build_report(st, "run-1", tmp_path / f"rep-{expected[:3]}")
        page, md = html_path.read_text(), md_path.read_text()
        assert page.index('id="verdict"') < page.index('id="run"')  # the first section
        assert md.index("## Verdict") < md.index("## Run")
        verdict = md[md.index("## Verdict"):md.index("## Run")]
        assert expected in verdict and "Tables: validation" in verdict and "Data: 2 of 3 samples audited" in verdict
        for anchor in ("#flags", "#validation", "#failures", "#faithfulness"):
            assert f'href="{anchor}"' in page
    assert "spatial-bias on 'square' (dataset level)" in verdict  # the confirmed dataset-level flag, named
    assert "off-object" not in verdict  # the other flag is still a candidate, counted, not named
