"""Self-contained HTML report and Markdown summary of one run.

Every number comes from a named DuckDB query (`diffcam.storage.queries`) over the catalog, so
the report agrees with ``diffcam sql``. The HTML has inline CSS and base64 PNG images
only (no scripts, no external URLs) and can be mailed or attached to a CI run.

A report is a list of `Section`s; each section's builder gets a `ReportContext` (one
catalog connection, the run summary, the validation verdict) and returns HTML plus an
optional Markdown part for ``summary.md``. Later sections (e.g. a "bias" section with
cluster prototypes and counterfactuals) are added by passing
``sections=[*DEFAULT_SECTIONS, Section("bias", "Bias", build_bias)]``.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend
switch). Overlays: the sample's image (``samples.image_path``: absolute, or relative to
the run's ``dataset_uri`` folder, or to the manifest's folder) blended with the
dequantised map, upsampled bilinearly to the image size and coloured with ``jet``. If
the image cannot be read the map is shown alone and the report says why.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from diffcam.storage import catalog
from diffcam.storage.queries import STAT_COLUMNS, run_query
from diffcam.storage.schemas import dequantize_map
from diffcam.storage.store import Store, write_text_atomic
from diffcam.storage.validation import ValidationResult

__all__ = [
    "ReportContext", "Section", "SectionContent", "DEFAULT_SECTIONS", "build_report",
    # helpers for sections built elsewhere (the bias section)
    "esc", "fmt_value", "html_table", "md_table", "img_tag", "png_bytes", "heat_colors",
]

DEFAULT_METHOD = "diffusion-cam"
THUMB_PX = 192
MAX_WORDS_PER_SAMPLE = 4
MAX_TABLE_ROWS = 200
EVIDENCE_CHARS = 400


@dataclass
class ReportContext:
    store: Store
    run_id: str
    con: duckdb.DuckDBPyConnection
    out_dir: Path
    summary: dict[str, Any]
    validation: ValidationResult | None
    method: str = DEFAULT_METHOD
    gallery_size: int = 4
    extra: dict[str, Any] = field(default_factory=dict)  # for later sections

    def query(self, name: str, **params: Any) -> list[dict[str, Any]]:
        return run_query(self.con, name, **params).to_pylist()


@dataclass(frozen=True)
class SectionContent:
    html: str
    markdown: str | None = None


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    build: Callable[[ReportContext], SectionContent]


# ----------------------------------------------------------------- formatting


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if isinstance(v, float) and np.isinf(v):
        return "∞" if v > 0 else "-∞"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    if isinstance(v, datetime):
        return v.isoformat(timespec="seconds")
    return str(v)


def html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, cls: str = "") -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(fmt_value(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[str],
             fmt: Callable[[Any], str] = fmt_value) -> str:
    """A markdown table of ``rows``; ``fmt`` renders a cell's value (escaped after)."""
    def cell(v: Any) -> str:
        return fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def png_bytes(image: Any) -> bytes:
    """PNG bytes of a PIL image or a uint8 array (every picture of the report is inline PNG)."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(png: bytes, alt: str) -> str:
    return f'<img src="{_png_data_uri(png)}" alt="{esc(alt)}">'


# ------------------------------------------------------------------- sections


def _header(ctx: ReportContext) -> SectionContent:
    s = ctx.summary
    ident = [
        ("status", s["status"]), ("model", s["model_uri"]), ("model hash", s["model_hash"]),
        ("dataset", s["dataset_uri"]), ("dataset hash", s["dataset_hash"]), ("code version", s["code_version"]),
        ("trigger", s["trigger"]), ("parent run", s["parent_run_id"]), ("started", s["started_at"]),
        ("finished", s["finished_at"]), ("wall time (s)", s["wall_s"]),
    ]
    if s.get("error"):
        ident.append(("error", s["error"]))
    counts = ["n_samples", "n_results", "n_failures", "n_missing", "n_confirmed_flags", "n_candidate_flags",
              "n_flagged_samples",
              "n_maps", "n_methods", "n_zero_maps", "n_masked_maps"]
    timings = ["mean_t_generate_s", "mean_t_attribution_s", "mean_t_total_s", "p50_t_total_s",
               "p95_t_total_s", "sum_t_total_s", "mean_n_words", "mean_n_steps"]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(fmt_value(v))}</dd>" for k, v in ident)
    h = (
        f"<dl>{dl}</dl><h3>Counts</h3>{html_table([s], counts)}"
        f"<h3>Timings per audited sample (s)</h3>{html_table([s], timings)}"
    )
    md = (
        f"- status: **{s['status']}**; model `{s['model_uri']}` ({s['model_hash']}); "
        f"dataset `{s['dataset_uri']}` ({s['dataset_hash']})\n"
        f"- samples {s['n_samples']}: audited {s['n_results']}, failed {s['n_failures']}, "
        f"missing {s['n_missing']}; maps {s['n_maps']} ({s['n_zero_maps']} zero)\n"
        f"- **confirmed findings: {s['n_confirmed_flags']}** (the model's answer changed when the region was "
        f"erased, and not under a control erasure); candidates not confirmed: {s['n_candidate_flags']}\n"
        f"- time per sample: mean {fmt_value(s['mean_t_total_s'])} s, p95 {fmt_value(s['p95_t_total_s'])} s"
    )
    return SectionContent(h, md)


def _verdict(ctx: ReportContext) -> SectionContent:
    """What a release owner came to learn, first: confirmed findings, whether the tables can be
    trusted, and what was not tested; each statement links to its evidence below."""
    s = ctx.summary
    flags = ctx.query("run_flags", run_id=ctx.run_id, limit=MAX_TABLE_ROWS)
    confirmed = [f for f in flags if f["confirmed"] is True]
    items: list[tuple[str, str]] = []  # (html, markdown)
    if confirmed:
        # dataset-level findings first (the claim about the checkpoint), then the samples they reach,
        # one phrase per (kind, word) with its sample count
        groups: dict[tuple[str, str, bool], int] = {}
        for f in sorted(confirmed, key=lambda f: f["sample_id"] is not None):
            key = (f["kind"], f["word"] or "the run", f["sample_id"] is None)
            groups[key] = groups.get(key, 0) + 1
        phrases = [f"{kind} on {word!r} " + ("(dataset level)" if dataset else f"in {n} sample(s)")
                   for (kind, word, dataset), n in groups.items()]
        text = (f"{s['n_confirmed_flags']} confirmed finding(s): {'; '.join(phrases[:6])}"
                + (f"; and {len(phrases) - 6} more" if len(phrases) > 6 else "")
                + ". Erasing the region changed the model's answer and a control erasure of the same size did not.")
        items.append((f'<span class="bad">{esc(text)}</span> <a href="#flags">evidence</a>', f"**{text}**"))
    else:
        text = "Nothing confirmed: no region was shown, by erasing it, to decide an answer."
        items.append((f'<span class="ok">{esc(text)}</span> <a href="#flags">flags</a>', f"**{text}**"))
    v = ctx.validation
    vtext = ("not validated" if v is None else "passed" if v.success else f"FAILED ({len(v.failed)} expectation(s))")
    items.append((f'Tables: validation {esc(vtext)}. <a href="#validation">validation</a>',
                  f"Tables: validation {vtext}."))
    data = (f"Data: {s['n_results']} of {s['n_samples']} samples audited, {s['n_failures']} failed, "
            f"{s['n_missing']} missing.")
    items.append((f'{esc(data)} <a href="#failures">failures</a>', data))
    faith = ctx.query("faithfulness_table", run_id=ctx.run_id)
    n_faith = faith[0]["n_words"] if faith else 0  # every map is measured on the same words
    untested = (f"Not confirmed: {s['n_candidate_flags']} candidate flag(s), leads rather than findings; "
                f"map faithfulness measured on {n_faith} word(s).")
    items.append((f'{esc(untested)} <a href="#faithfulness">faithfulness</a>', untested))
    h = "<ul>" + "".join(f"<li>{h_}</li>" for h_, _ in items) + "</ul>"
    return SectionContent(h, "\n".join(f"- {m}" for _, m in items))


def _validation(ctx: ReportContext) -> SectionContent:
    v = ctx.validation
    if v is None:
        msg = "Not validated: this run has no validation result (runs.validation_json is empty)."
        return SectionContent(f"<p>{esc(msg)}</p>", "Validation: not run.")
    n = len(v.per_expectation)
    failed = v.failed
    verdict = "passed" if v.success else "FAILED"
    h = f'<p class="{"ok" if v.success else "bad"}">Validation {verdict}: {n - len(failed)} of {n} expectations met.</p>'
    if failed:
        rows = [{**e, "details": json.dumps(e["details"], default=str)[:EVIDENCE_CHARS]} for e in failed]
        h += html_table(rows, ["table", "expectation", "details"])
    md = f"Validation **{verdict}** ({n - len(failed)}/{n} expectations met)."
    if failed:
        md += "\n" + "\n".join(f"- `{e['table']}`: {e['expectation']}" for e in failed[:10])
        if len(failed) > 10:
            md += f"\n- … and {len(failed) - 10} more"
    return SectionContent(h, md)


_METHOD_COLS = ["method", "n_maps", "obj_iou", "contrast", "n_contrast_inf", "contrast_score", "concentration", "f3",
                "mean_word_f3", "pointing_rate", "specificity", "multi_pointing_rate", "n_multi"]
_FAITH_COLS = ["method", "n_words", "n_samples", "n_informative", "deletion_auc", "insertion_auc", "vanish_rate"]
#: Chance rows a method has to beat (docs/EVALUATION.md).
_CHANCE = ("random", "objectness")


def _method_table(ctx: ReportContext) -> SectionContent:
    rows = ctx.query("method_table", run_id=ctx.run_id)
    if not rows:
        msg = "No word in this run has a ground-truth mask, so there is no method table."
        return SectionContent(f"<p>{esc(msg)}</p>", msg)
    note = ("<p>Over words with a mask. F3 is the harmonic mean of the means of Obj-IoU, Contrast score "
            "and Concentration (as in the paper's tables); mean_word_f3 is the mean of per-word F3. "
            "<code>random</code> and <code>objectness</code> are chance rows computed from the image alone, no "
            "model: a method that does not beat <code>objectness</code> is on <em>some</em> object, not "
            "necessarily on the one its word names. specificity = mass per area on the named object / (that + on "
            "the other objects), over the n_multi words of images with several masked objects (0.5 = no "
            "preference).</p>")
    return SectionContent(note + html_table(rows, _METHOD_COLS), md_table(rows, _METHOD_COLS))


def faithfulness_ranking(rows: list[dict[str, Any]]) -> list[str]:
    """Plain sentences: which map the model's answers depend on most, and against the chance rows."""
    ranked = [r for r in rows if r.get("vanish_rate") is not None]
    if not ranked:
        return ["No word was measured, so the maps cannot be ranked."]
    best = next((r for r in ranked if r["method"] not in _CHANCE), ranked[0])

    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}"

    out = [f"Most faithful attribution method on this model: {best['method']} (removing its top 1/8 of cells "
           f"removes the word from the regenerated answer in {100 * best['vanish_rate']:.0f} % of "
           f"{best['n_words']} words; deletion AUC {fmt(best['deletion_auc'])}, insertion AUC "
           f"{fmt(best['insertion_auc'])})."]
    base = next((r for r in ranked if r["method"] == "objectness"), None)
    if base is not None:
        methods = [r for r in ranked if r["method"] not in _CHANCE]
        beat = [r["method"] for r in methods if r["vanish_rate"] > base["vanish_rate"]]
        out.append(f"Higher vanish rate than the model-free objectness map ({100 * base['vanish_rate']:.0f} %): "
                   + (", ".join(beat) if beat else "no attribution method") + ".")
        if base["deletion_auc"] is not None:
            beat_d = [r["method"] for r in methods if r["deletion_auc"] is not None
                      and r["deletion_auc"] < base["deletion_auc"]]
            out.append(f"Lower deletion AUC than objectness ({base['deletion_auc']:.3f}): "
                       + (", ".join(beat_d) if beat_d else "no attribution method") + ".")
    return out


def _faithfulness(ctx: ReportContext) -> SectionContent:
    rows = ctx.query("faithfulness_table", run_id=ctx.run_id)
    if not rows:
        msg = ("Faithfulness was not measured in this run (audit --faithfulness 0). Without it and without masks, "
               "nothing in this report shows which map the model's answers depend on.")
        return SectionContent(f"<p>{esc(msg)}</p>", msg)
    sentences = faithfulness_ranking(rows)
    note = ("<p>Each measured content word's image is perturbed in the order each map ranks its cells: "
            "deletion paints the top cells with the background colour, insertion restores them on a blank image; "
            "the word's log-probability is re-scored on its attribution canvas and normalised between the blank "
            "(0) and intact (1) image. Needs no masks.</p>")
    html = note + "".join(f"<p><strong>{esc(t)}</strong></p>" for t in sentences) + html_table(rows, _FAITH_COLS)
    return SectionContent(html, " ".join(sentences) + "\n\n" + md_table(rows, _FAITH_COLS))


def _histograms(ctx: ReportContext) -> SectionContent:
    rows = run_query(ctx.con, "map_stat_values", run_id=ctx.run_id)
    if rows.num_rows == 0:
        return SectionContent("<p>No maps.</p>")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = sorted(set(rows.column("method").to_pylist()))
    stats = [c for c in STAT_COLUMNS if rows.column(c).null_count < rows.num_rows]
    ncols = 4
    nrows = -(-len(stats) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.4 * nrows), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    method_col = np.asarray(rows.column("method").to_pylist(), dtype=object)
    for i, stat in enumerate(stats):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        values = np.asarray(rows.column(stat).to_numpy(zero_copy_only=False), dtype=float)
        finite = values[np.isfinite(values)]
        bins = np.histogram_bin_edges(finite, bins=20) if finite.size else 10
        for m in methods:
            v = values[(method_col == m) & np.isfinite(values)]
            if v.size:
                ax.hist(v, bins=bins, histtype="step", label=m)
        ax.set_title(stat, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.axes[0].legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return SectionContent(
        f"<p>Per-map statistics, one curve per method ({rows.num_rows} maps).</p>"
        + img_tag(buf.getvalue(), "distributions of map statistics")
    )


def _resolve_image(image_path: str, dataset_uri: str | None) -> Path:
    p = Path(image_path)
    if p.is_absolute():
        return p
    base = Path((dataset_uri or ".").removeprefix("file://"))
    if base.is_file():  # a manifest file: images are relative to its folder
        base = base.parent
    return base / p


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → uint8 RGB with the `jet` colormap (every picture diffcam draws)."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(values, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)


def _overlay(image_path: Path, m: dict[str, Any]) -> tuple[bytes, str | None]:
    """A PNG of the map over the image (or of the map alone), and why the image is missing."""
    from PIL import Image

    grid = dequantize_map(m["map"], m["grid_h"], m["grid_w"], m["map_max"])
    unit = grid / m["map_max"] if m["map_max"] > 0 else grid  # 0..1 for the colormap
    reason = None
    try:
        with Image.open(image_path) as im:
            base = im.convert("RGB")
        scale = THUMB_PX / max(base.size)  # display size: longest side THUMB_PX, aspect kept
        base = base.resize((max(1, round(base.width * scale)), max(1, round(base.height * scale))),
                           Image.Resampling.LANCZOS)
    except (OSError, ValueError) as exc:
        base = None
        reason = f"{type(exc).__name__}: {exc}"
    size = base.size if base is not None else (THUMB_PX, max(1, THUMB_PX * m["grid_h"] // m["grid_w"]))
    up = np.asarray(Image.fromarray(unit.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    heat = Image.fromarray(heat_colors(up))
    out = Image.blend(base, heat, 0.5) if base is not None else heat
    return png_bytes(out), reason


def _gallery_card(ctx: ReportContext, sample: dict[str, Any]) -> str:
    maps = ctx.query("sample_maps", run_id=ctx.run_id, sample_id=sample["sample_id"], method=ctx.method)
    maps.sort(key=lambda r: (not r["has_mask"], r["is_function"], r["word_index"]))
    image_path = _resolve_image(sample["image_path"], ctx.summary.get("dataset_uri"))
    figs = []
    missing = None
    for m in maps[:MAX_WORDS_PER_SAMPLE]:
        png, reason = _overlay(image_path, m)
        missing = missing or reason
        caption = f"{m['word']} · F3 {fmt_value(m['f3'])} · inside {fmt_value(m['inside_frac'])}"
        if m["zero_map"]:
            caption += " · zero map"
        figs.append(f"<figure>{img_tag(png, m['word'])}<figcaption>{esc(caption)}</figcaption></figure>")
    note = ""
    if missing:
        note = f'<p class="bad">Image not readable ({esc(image_path)}): {esc(missing)}; maps shown alone.</p>'
    title = (f"{sample['sample_id']} · {sample['score_kind']} {fmt_value(sample['score'])} · "
             f"“{sample['prompt']}” → “{sample['answer']}”")
    return f'<div class="card"><h4>{esc(title)}</h4>{note}<div class="figs">{"".join(figs)}</div></div>'


def _gallery(ctx: ReportContext) -> SectionContent:
    parts = []
    for best, label in ((True, "Best"), (False, "Worst")):
        ranked = ctx.query("sample_ranking", run_id=ctx.run_id, method=ctx.method, best=best, limit=ctx.gallery_size)
        if not ranked:
            msg = f"No sample has a masked word with a {ctx.method} map, so samples cannot be ranked."
            return SectionContent(f"<p>{esc(msg)}</p>")
        parts.append(f"<h3>{label} {len(ranked)} by {ctx.method} {ranked[0]['score_kind']}</h3>")
        parts.extend(_gallery_card(ctx, s) for s in ranked)
    return SectionContent("".join(parts))


_FLAG_COLS = ["kind", "sample_id", "word", "method", "score", "threshold", "confirmed", "region", "evidence"]


_CANDIDATES = ("Candidates: raised from a map or a statistic, not confirmed by the model's behaviour "
               "(confirmed false: an erasure showed the answer does not depend on the region; empty: not tested). "
               "They are leads to look at, not findings.")


def _flags(ctx: ReportContext) -> SectionContent:
    rows = ctx.query("run_flags", run_id=ctx.run_id, limit=MAX_TABLE_ROWS)
    if not rows:
        return SectionContent("<p>No flags.</p>", "Flags: none.")
    for r in rows:
        r["evidence"] = r["evidence_json"][:EVIDENCE_CHARS]
        if r["sample_id"] is None:
            r["sample_id"] = "(dataset)"
    confirmed = [r for r in rows if r["confirmed"] is True]
    candidates = [r for r in rows if r["confirmed"] is not True]
    n_conf, n_cand = ctx.summary["n_confirmed_flags"], ctx.summary["n_candidate_flags"]
    h = (f"<h3>Confirmed findings: {n_conf}</h3>"
         + (html_table(confirmed, _FLAG_COLS, cls="flags") if confirmed else "<p>Nothing confirmed.</p>")
         + f"<h3>Candidates: {n_cand}</h3><p>{esc(_CANDIDATES)}</p>"
         + (html_table(candidates, _FLAG_COLS, cls="flags") if candidates else ""))
    more = ctx.summary["n_flags"] - len(rows)
    h += f"<p>… and {more} more (diffcam sql).</p>" if more > 0 else ""
    cols = ["kind", "sample_id", "word", "method", "score", "threshold"]
    md = (f"Confirmed findings: {n_conf}" + (":\n\n" + md_table(confirmed[:5], cols) if confirmed else ".")
          + f"\n\nCandidates (not confirmed by the model's behaviour): {n_cand}")
    return SectionContent(h, md)


def _failures(ctx: ReportContext) -> SectionContent:
    counts = ctx.query("failure_counts", run_id=ctx.run_id)
    n = ctx.summary["n_failures"]
    if not counts:
        return SectionContent("<p>No failures.</p>", "Failures: 0.")
    rows = ctx.query("run_failures", run_id=ctx.run_id, limit=MAX_TABLE_ROWS)
    h = (html_table(counts, ["stage", "error_class", "n_failures", "example_message"])
         + "<h3>Failed samples</h3>"
         + html_table(rows, ["sample_id", "line_no", "stage", "error_class", "message", "attempts"]))
    if n > len(rows):
        h += f"<p>… and {n - len(rows)} more (diffcam sql).</p>"
    md = f"Failures: {n}. " + "; ".join(f"{c['stage']}/{c['error_class']}: {c['n_failures']}" for c in counts)
    return SectionContent(h, md)


DEFAULT_SECTIONS: tuple[Section, ...] = (
    Section("verdict", "Verdict", _verdict),
    Section("run", "Run", _header),
    Section("validation", "Validation", _validation),
    Section("methods", "Method table", _method_table),
    Section("faithfulness", "Faithfulness", _faithfulness),
    Section("distributions", "Map statistics", _histograms),
    Section("gallery", "Best and worst samples", _gallery),
    Section("flags", "Flags", _flags),
    Section("failures", "Failures", _failures),
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top;max-width:40em;overflow-wrap:anywhere}
th{background:#f3f3f3}dl{display:grid;grid-template-columns:max-content auto;gap:.1em 1em;font-size:.9em}
dt{font-weight:600}dd{margin:0}.ok{color:#176f2c;font-weight:600}.bad{color:#b00020;font-weight:600}
.card{border:1px solid #ddd;border-radius:4px;padding:.5em;margin:.5em 0}.card h4{margin:.2em 0 .4em;font-weight:500}
.figs{display:flex;flex-wrap:wrap;gap:.5em}figure{margin:0}figcaption{font-size:.75em;color:#555}
img{max-width:100%}
"""




def build_report(
    store: Store | str | os.PathLike[str],
    run_id: str,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    sections: Sequence[Section] = DEFAULT_SECTIONS,
    validation: ValidationResult | None = None,
    method: str = DEFAULT_METHOD,
    gallery_size: int = 4,
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``summary.md`` for ``run_id``; returns their paths.

    ``out_dir`` defaults to ``<store>/reports/<run_id>/``. ``validation`` defaults to
    the run's stored ``validation_json`` (none: the report says the run is not validated).
    """
    st = store if isinstance(store, Store) else Store(store)
    st.read_run(run_id)  # KeyError for an unknown run (and validates the id)
    out = Path(out_dir) if out_dir is not None else st.root / "reports" / run_id
    out.mkdir(parents=True, exist_ok=True)
    con = catalog.connect(st)
    try:
        summary = run_query(con, "run_summary", run_id=run_id).to_pylist()[0]
        if validation is None and summary.get("validation_json"):
            validation = ValidationResult.from_json(summary["validation_json"])
        ctx = ReportContext(st, run_id, con, out, summary, validation, method=method, gallery_size=gallery_size)
        built = [(sec, sec.build(ctx)) for sec in sections]
    finally:
        con.close()

    nav = " · ".join(f'<a href="#{esc(sec.key)}">{esc(sec.title)}</a>' for sec, _ in built)
    body = "".join(f'<section id="{esc(sec.key)}"><h2>{esc(sec.title)}</h2>{c.html}</section>' for sec, c in built)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>diffcam report · {esc(run_id)}</title><style>{_CSS}</style></head>"
        f"<body><h1>diffcam report · run {esc(run_id)}</h1><nav>{nav}</nav>{body}</body></html>\n"
    )
    md = f"# diffcam run `{run_id}`\n\n" + "\n\n".join(
        f"## {sec.title}\n\n{c.markdown}" for sec, c in built if c.markdown is not None
    ) + "\n"
    html_path, md_path = out / "report.html", out / "summary.md"
    write_text_atomic(html_path, page)
    write_text_atomic(md_path, md)
    return html_path, md_path
