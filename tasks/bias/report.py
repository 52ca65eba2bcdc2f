"""The "Bias audit" section of the run report (`diffcam.storage.report.Section`).

Flags by word, dataset-level flags with their evidence, cluster prototypes and mean maps
as images, counterfactual before/after examples (re-drawn from the dataset images and
the evidence; no model is run), top sample-level flags. Tables, formatting and images
use `diffcam.storage.report`'s helpers, so this section looks like the others.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diffcam.core.bias.flags import SAMPLE_KINDS
from diffcam.core.inpaint import box_mask, erase_mask, erase_region_around
from diffcam.core.methods import methods_for
from diffcam.core.words import normalise_word
from diffcam.storage.report import (
    ReportContext,
    Section,
    SectionContent,
    esc,
    heat_colors,
    html_table,
    img_tag,
    md_table,
    png_bytes,
)
from diffcam.storage.schemas import parse_evidence, parse_region
from diffcam.tasks.bias.calibration import ZOO_RESULTS, calibration_rows, load_zoo_results

__all__ = ["bias_section", "BIAS_SECTION"]

_MAX_SAMPLE_FLAG_ROWS = 30
_MAX_CF_EXAMPLES = 3
_PX = 144


def _heat_png(grid_values: Sequence[Sequence[float]], box: Sequence[float] | None = None,
              base: np.ndarray | None = None) -> bytes:
    """A (h, w) map drawn with ``jet`` at _PX px (nearest: one block per cell, the map as
    stored), blended on ``base`` when given, ``box`` (normalised) outlined in white."""
    from PIL import Image

    a = np.asarray(grid_values, dtype=np.float64)
    mx = float(a.max()) if a.size else 0.0
    u = a / mx if mx > 0 else a
    rgb = heat_colors(u)
    im = Image.fromarray(rgb).resize((_PX, _PX), Image.Resampling.NEAREST)
    if base is not None:
        b = Image.fromarray(np.asarray(base, dtype=np.uint8)).convert("RGB").resize((_PX, _PX), Image.Resampling.NEAREST)
        im = Image.blend(b, im, 0.5)
    out = np.asarray(im).copy()
    if box is not None:
        _outline(out, box)
    return png_bytes(out)


def _outline(arr: np.ndarray, box: Sequence[float], color: tuple[int, int, int] = (255, 255, 255)) -> None:
    H, W = arr.shape[:2]
    x0, y0 = int(round(box[0] * W)), int(round(box[1] * H))
    x1, y1 = max(x0 + 1, int(round(box[2] * W))) - 1, max(y0 + 1, int(round(box[3] * H))) - 1
    x1, y1 = min(x1, W - 1), min(y1, H - 1)
    arr[y0, x0:x1 + 1] = color
    arr[y1, x0:x1 + 1] = color
    arr[y0:y1 + 1, x0] = color
    arr[y0:y1 + 1, x1] = color


def _image_png(arr: np.ndarray, box: Sequence[float] | None = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("RGB").resize((_PX, _PX), Image.Resampling.NEAREST)
    out = np.asarray(im).copy()
    if box is not None:
        _outline(out, box, (255, 255, 0))
    return png_bytes(out)


def _cf_images(ex: Mapping[str, Any], region: Sequence[float], ring_fraction: float) -> dict[str, bytes]:
    """Redraw a counterfactual example's images from the dataset files and the evidence."""
    from diffcam.storage.images import load_image, load_mask

    img = np.asarray(load_image(ex["image_path"]))
    H, W = img.shape[:2]
    size = (W, H)
    wmask = np.zeros((H, W), dtype=bool)
    for p in ex["mask_paths"]:
        wmask |= load_mask(p, size)
    others = np.zeros((H, W), dtype=bool)
    for p in ex.get("other_mask_paths", []):
        others |= load_mask(p, size)
    reg = box_mask((H, W), region)
    no_obj = erase_mask(img, wmask, exclude=others | reg, ring_fraction=ring_fraction)
    out = {
        "original": _image_png(img, region),
        "no_region": _image_png(erase_region_around(img, region, wmask | others, ring_fraction=ring_fraction)),
        "no_object": _image_png(no_obj, region),
    }
    return out


_MEAN_MAP_METHODS = methods_for("bias-dataset")
_MAX_MEAN_MAP_WORDS = 24


def _word_mean_maps(ctx: ReportContext) -> str:
    """A table of mean maps (mass distributions averaged over the run), one row per content
    word, one column per audited map method; dataset-level flag regions are outlined."""
    from diffcam.storage.schemas import dequantize_map

    rows = ctx.con.execute(
        "SELECT word, method, grid_h, grid_w, map, map_max FROM token_maps "
        "WHERE run_id = $run_id AND NOT is_function AND list_contains($methods, method) AND map_max > 0",
        {"run_id": ctx.run_id, "methods": list(_MEAN_MAP_METHODS)},
    ).fetchall()
    if not rows:
        return ""
    acc: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    for word, method, h, w, data, mx in rows:
        m = dequantize_map(data, h, w, mx).astype(np.float64)
        if m.sum() > 0:
            acc[(normalise_word(word), method)].append(m / m.sum())
    regions = dict(((w, m), parse_region(r)) for w, m, r in ctx.con.execute(
        "SELECT word, method, region FROM flags WHERE run_id = $run_id AND sample_id IS NULL AND region IS NOT NULL",
        {"run_id": ctx.run_id}).fetchall())
    methods = [m for m in _MEAN_MAP_METHODS if any(k[1] == m for k in acc)]
    words = sorted({k[0] for k in acc}, key=lambda w: -sum(len(v) for k, v in acc.items() if k[0] == w))
    words = sorted(words[:_MAX_MEAN_MAP_WORDS])
    head = "".join(f"<th>{esc(m)}</th>" for m in methods)
    body = []
    for w in words:
        cells = []
        for m in methods:
            got = acc.get((w, m), [])
            maps = [a for a in got if a.shape == got[0].shape] if got else []
            if not maps:
                cells.append("<td>–</td>")
                continue
            png = _heat_png(np.mean(maps, axis=0), regions.get((w, m)))
            cells.append(f"<td>{img_tag(png, f'{w} {m}')}<br>n={len(maps)}</td>")
        body.append(f"<tr><th>{esc(w)}</th>{''.join(cells)}</tr>")
    return ("<h3>Mean map per word</h3><p>Each map divided by its sum, averaged over the run (a word's "
            "typical saliency); the region of a dataset-level flag is outlined.</p>"
            f"<table><thead><tr><th>word</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _flag_method_faithfulness(ctx: ReportContext, methods: Sequence[str]) -> str | None:
    """How faithful the maps the flags were raised on are, measured in this same run."""
    from diffcam.storage.queries import run_query

    rows = run_query(ctx.con, "faithfulness_table", run_id=ctx.run_id).to_pylist()
    ranked = [r for r in rows if r["vanish_rate"] is not None]
    if not ranked or not methods:
        return None
    parts = []
    for m in methods:
        pos = next((i for i, r in enumerate(ranked) if r["method"] == m), None)
        if pos is None:
            parts.append(f"{m}: not measured")
            continue
        r = ranked[pos]
        auc = "–" if r["deletion_auc"] is None else f"{r['deletion_auc']:.3f}"
        parts.append(f"{m}: vanish rate {r['vanish_rate']:.2f} (rank {pos + 1} of {len(ranked)} maps), "
                     f"deletion AUC {auc}")
    return ("Faithfulness of the maps these flags were raised on, measured in this run (see the Faithfulness "
            "section): " + "; ".join(parts) + ".")


def _spatial_maps_line(ctx: ReportContext) -> str:
    """Which maps this run's spatial sample flags may come from, and why (`diffcam.core.bias.faithful`)."""
    from diffcam.core.bias.faithful import REFERENCE, spatial_methods
    from diffcam.core.bias.settings import BiasSettings
    from diffcam.tasks.bias.read import map_ranking

    ranking = map_ranking(ctx.con, ctx.run_id)
    ref = ranking.get(REFERENCE)
    if ref is None or ref.vanish_rate is None:
        return (f"Spatial sample flags (off_object, border_hotspot) need a map that beats the model-free {REFERENCE} "
                "map on this run's vanish test; the run measured none, so none were raised.")
    keep = spatial_methods(ranking, BiasSettings().sample_methods)
    rates = "; ".join(f"{m} {ranking[m].vanish_rate:.2f}" for m in BiasSettings().sample_methods
                      if m in ranking and ranking[m].vanish_rate is not None)
    return (f"Spatial sample flags (off_object, border_hotspot) are read only from maps whose vanish rate in this "
            f"run beats {REFERENCE}'s ({ref.vanish_rate:.2f}): "
            + (", ".join(keep) if keep else "none did, so none were raised")
            + f" (sample-flag maps: {rates}). Function words are never flagged.")


def bias_section(ctx: ReportContext) -> SectionContent:
    """The "Bias audit" report section (`diffcam.storage.report.Section` builder).

    Everything shown comes from the ``flags`` table (scores, thresholds, regions and the
    evidence JSON) and the dataset files the evidence names; nothing is re-run."""
    rows = ctx.con.execute(
        "SELECT flag_id, kind, sample_id, word_index, word, method, score, threshold, confirmed, region, evidence_json "
        "FROM flags WHERE run_id = $run_id ORDER BY score DESC, kind, flag_id", {"run_id": ctx.run_id},
    ).fetchall()
    cols = ["flag_id", "kind", "sample_id", "word_index", "word", "method", "score", "threshold", "confirmed",
            "region", "evidence_json"]
    # read back once: the region text as stored (shown) and as a box (drawn), the evidence as a dict
    flags = [{**f, "box": None if f["region"] is None else parse_region(f["region"]),
              "evidence": parse_evidence(f["evidence_json"])} for f in (dict(zip(cols, r)) for r in rows)]
    dataset = [f for f in flags if f["sample_id"] is None]
    sample = [f for f in flags if f["sample_id"] is not None]
    parts: list[str] = []
    md: list[str] = []

    # flags by word
    counts: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for f in flags:
        counts[(f["word"] or "–", f["method"] or "–", "dataset" if f["sample_id"] is None else "sample", f["kind"])] += 1
    by_word = [{"word": k[0], "method": k[1], "level": k[2], "kind": k[3], "n_flags": v} for k, v in sorted(counts.items())]
    n_conf = sum(1 for f in dataset if f["confirmed"])
    verdict = (f"{len(dataset)} dataset-level flag(s) ({n_conf} confirmed by a counterfactual), "
               f"{len(sample)} sample-level flag(s).")
    spatial = _spatial_maps_line(ctx)
    parts.append(f"<p>{esc(spatial)}</p>")
    md.append(spatial)
    parts.append(f"<p><b>{esc(verdict)}</b> Thresholds and their calibration: docs/BIAS.md; "
                 "every row's evidence_json holds the numbers it was decided on.</p>")
    md.append(verdict)
    faith = _flag_method_faithfulness(ctx, sorted({f["method"] for f in flags if f["method"]}))
    if faith:
        parts.append(f"<p>{esc(faith)}</p>")
        md.append(faith)
    if by_word:
        parts.append("<h3>Flags by word</h3>" + html_table(by_word, ["word", "method", "level", "kind", "n_flags"]))
        md.append(md_table(by_word, ["word", "method", "level", "kind", "n_flags"]))
        cal = calibration_rows(list(dict.fromkeys(f["kind"] for f in flags)), load_zoo_results())
        cal_cols = ["kind", "thresholds", "calibrated on", "held-out"]
        parts.append("<h3>Calibration behind these flags</h3><p>Which models and seeds chose each kind's "
                     f"thresholds, and how the kind did on models they were not fitted to ({esc(ZOO_RESULTS)}).</p>"
                     + html_table(cal, cal_cols))
        md.append(md_table(cal, cal_cols))
    else:
        parts.append("<p>No flags: no map was off-object, on a border hot-spot, zero or flat, and no word was "
                     "centre-biased, object-independent or had a Clever-Hans cluster.</p>")

    # dataset-level flags
    for f in dataset:
        ev = f["evidence"]
        who = f"word “{f['word']}”" if f["word"] is not None else "all words of the run"
        head = (f"{f['kind']} · {who} · {f['method']} · score {f['score']:.4g} "
                f"(threshold {f['threshold']:.4g}) · region {f['region'] or '–'} · confirmed {f['confirmed']}")
        parts.append(f'<div class="card"><h4>{esc(head)}</h4><p>{esc(ev.get("meaning", ""))}; '
                     f'rule: <code>{esc(ev.get("rule", ""))}</code></p>')
        keys = ["n_maps", "n_masked", "cluster_size", "k", "region_share", "consistency", "rest_share",
                "other_words_share", "specificity", "object_overlap", "map_centre_frac", "mask_centre_frac",
                "map_centre_enrichment", "prior_centre_frac", "naming_gap", "central_named_share",
                "off_centre_named_share", "found_by", "n_images", "n_not_reproduced", "mean_drop", "hit_rate",
                "scan_min_drop", "scan_s"]
        facts = [{"key": k, "value": ev[k]} for k in keys if k in ev]
        for sub in ("shuffle", "content_independence"):
            if isinstance(ev.get(sub), dict):
                facts += [{"key": f"{sub}.{k}", "value": v} for k, v in ev[sub].items()]
        parts.append(html_table(facts, ["key", "value"]))
        figs = []
        box = f["box"]
        for name in ("prototype", "mean_map", "mean_mask_map", "prior"):
            if ev.get(name) is not None:
                outline = box if name in ("prototype", "mean_map") else None
                figs.append(f"<figure>{img_tag(_heat_png(ev[name], outline), name)}"
                            f"<figcaption>{esc(name.replace('_', ' '))}</figcaption></figure>")
        if figs:
            parts.append(f'<div class="figs">{"".join(figs)}</div>')
        ids = ev.get("sample_ids", [])
        parts.append(f"<p>samples ({ev.get('n_sample_ids', len(ids))}): {esc(', '.join(ids[:40]))}"
                     f"{' …' if len(ids) > 40 else ''}</p>")
        cf = ev.get("counterfactual")
        if cf:
            ctab = [{"quantity": k, "value": cf.get(k)} for k in
                    ("n_tested", "persist", "persist_both", "persist_minus_both", "vanish", "vanish_control",
                     "vanish_minus_control", "cf_confirm_min", "confirmed", "finding")]
            ctab += [{"quantity": f"verdict.{k}", "value": v} for k, v in (cf.get("verdict") or {}).items()
                     if k not in ("rule", "confirm_min")]
            parts.append("<h4>Counterfactual</h4>" + html_table(ctab, ["quantity", "value"])
                         + f"<p>{esc('; '.join(cf.get('why', [])) or 'not confirmed')}</p>")
            ring = ev.get("settings", {}).get("cf_ring_fraction", 0.05)
            erased = cf.get("erased_region") or box  # the region grown by the erase margin
            for ex in cf.get("examples", [])[:_MAX_CF_EXAMPLES]:
                try:
                    pngs = _cf_images(ex, erased, ring)
                except Exception as e:  # noqa: BLE001 - a missing file is shown, not hidden
                    parts.append(f'<p class="bad">{esc(ex["sample_id"])}: images not readable: '
                                 f'{esc(f"{type(e).__name__}: {e}")}</p>')
                    continue
                cap = {"original": "original", "no_region": "region erased", "no_object": "object erased"}
                figs = "".join(
                    f"<figure>{img_tag(pngs[k], k)}<figcaption>{esc(cap[k])}: "
                    f"“{esc(ex['answers'].get(k, '–'))}”</figcaption></figure>" for k in cap)
                parts.append(f'<div class="card"><h4>{esc(ex["sample_id"])} · “{esc(ex["prompt"])}”'
                             f'</h4><div class="figs">{figs}</div></div>')
        parts.append("</div>")
    if dataset:
        md.append(md_table([{**f, "n": f["evidence"].get("n_sample_ids")} for f in dataset],
                      ["kind", "word", "method", "score", "threshold", "confirmed", "region", "n"]))

    # mean map per word and method (from token_maps; no masks needed)
    parts.append(_word_mean_maps(ctx))

    # top sample-level flags
    if sample:
        top = []
        for kind in SAMPLE_KINDS:
            ks = [f for f in sample if f["kind"] == kind][:_MAX_SAMPLE_FLAG_ROWS // len(SAMPLE_KINDS) + 1]
            for f in ks:
                ev = f["evidence"]
                top.append({**f, "inside_share": ev.get("inside_share"), "inside_frac": ev.get("inside_frac"),
                            "verdict": ev.get("verdict")})
        parts.append("<h3>Sample-level flags (highest scores per kind)</h3>" + html_table(
            top, ["kind", "sample_id", "word", "method", "score", "threshold", "confirmed", "verdict", "region",
                  "inside_share", "inside_frac"]))
    return SectionContent("".join(parts), "\n\n".join(md))


#: Register with ``build_report(..., sections=[*DEFAULT_SECTIONS, BIAS_SECTION])``.
BIAS_SECTION = Section("bias", "Bias audit", bias_section)
