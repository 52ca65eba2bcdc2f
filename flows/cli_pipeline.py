"""`diffcam audit`, `diffcam sql`, `diffcam report`: the pipeline commands.

`register(app)` adds them to the Typer app of `flows/cli.py`. Heavy imports (Prefect,
Ray, torch, DuckDB) happen inside the commands so that ``--help`` answers at once.

Exit codes: 0 success; 1 the run failed or did not pass validation (the run row and the
report say why); 2 bad input (message on stderr, nothing run).
"""

from __future__ import annotations

import json
import sys
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

import typer

from diffcam.core.settings import AttributionStep, Distractor
from diffcam.flows.cli_common import fail
from diffcam.flows.paths import DEFAULT_MODEL, DEFAULT_STORE
from diffcam.storage.jsonable import jsonable

__all__ = ["register", "format_table"]

OutputFormat = Literal["table", "csv", "json", "parquet"]


# ----------------------------------------------------------------------------- audit

_AUDIT_HELP = """Audit a model on a dataset: per-word Diffusion-CAM maps and statistics → tables, validation, report.

Every sample of the manifest ends in exactly one of the `samples` / `failures` tables; `token_maps` holds one
row per (answer word, method). With no arguments: the shipped tiny model on a built-in synthetic dataset (200
samples, generated once into STORE/datasets/), store ./diffcam-store. The run is split into shards committed
atomically: re-running with the same --run-id resumes an interrupted run without redoing committed shards.

Examples:
  diffcam audit
  diffcam audit --limit 20 --workers 2
  diffcam audit --model models/tiny-shapes --dataset data/shapes/manifest.jsonl --store runs/
  diffcam audit --run-id nightly-01            # re-run: resumes, skipping committed shards
  diffcam audit --ray-address auto --gpus-per-worker 1   # on a Ray cluster with GPU nodes

Exit codes: 0 succeeded; 1 failed or validation failed (see the report); 2 bad input.
"""


def audit_cmd(
    model: Path = typer.Option(DEFAULT_MODEL, "--model", help="Checkpoint folder (config.json + *.safetensors)."),
    dataset: Path | None = typer.Option(
        None, "--dataset",
        help="Dataset folder or manifest (.jsonl/.csv/.parquet, or COCO instances*.json). "
             "Default: the built-in synthetic dataset.",
    ),
    store: Path = typer.Option(DEFAULT_STORE, "--store", help="Store folder (created if missing)."),
    run_id: str | None = typer.Option(
        None, "--run-id", help="Run id (letters, digits, . _ -). Default: a new timestamped id. "
                               "An existing id resumes that run."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Audit only the first N samples of the manifest."),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Model workers (Ray actors). Default: one per GPU, else min(CPUs, 4)."),
    gpus_per_worker: float = typer.Option(
        1.0, "--gpus-per-worker", min=0.0,
        help="GPUs per worker, used only if the Ray cluster has them (else workers run on CPU)."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Connect to this Ray cluster (e.g. auto, ray://host:10001). Default: a local Ray."),
    layer: str | None = typer.Option(None, "--layer", help="Layer to hook (default: the model's own default)."),
    distractor: Distractor = typer.Option(
        "others-mean", "--distractor", help="Contrast target (others-mean: the default, best on the benchmark)."),
    attribution_step: AttributionStep = typer.Option(
        "commit", "--attribution-step", help="Canvas the word is scored on: the word's commit step, or the final one."),
    seed: int = typer.Option(0, "--seed", help="Generation seed."),
    methods: str | None = typer.Option(
        None, "--methods",
        help="Comma-separated map methods to compute (default: gradcam, diffusion-cam-raw, diffusion-cam, "
             "token-gradnorm and the chance maps random, objectness). `diffcam methods` lists every registered "
             "one, e.g. occlusion: a map drawn by the model answering occluded images (no gradients; costs one "
             "scoring pass per occluder and canvas)."),
    faithfulness: float = typer.Option(
        0.1, "--faithfulness", min=0.0, max=1.0,
        help="Share of samples (picked by a hash of the sample id) whose content words get deletion/insertion "
             "curves and a vanish test under every map: how methods are ranked on data without masks. "
             "0 turns it off; 0.1 made the default 200-sample audit 1.43x longer (docs/EVALUATION.md §3)."),
    shard_size: int = typer.Option(
        16, "--shard-size", min=1, help="Samples per shard (the unit of commit and resume)."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Samples per worker call."),
    cpus_per_worker: int | None = typer.Option(
        None, "--cpus-per-worker", min=1,
        help="CPUs (= torch threads) per worker. Default: local CPUs // workers; 1 on a cluster or with GPUs."),
    synthetic_n: int = typer.Option(200, "--synthetic-n", min=1, help="Size of the built-in synthetic dataset."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the run summary as JSON to this file."),
) -> None:
    from diffcam.core.settings import CamSettings, GenerationSettings
    from diffcam.storage.store import RUN_ID_RE

    # Cheap checks first: Prefect and Ray take seconds to start.
    if run_id is not None and not RUN_ID_RE.match(run_id):
        fail(f"--run-id {run_id!r} must match {RUN_ID_RE.pattern}")
    if not model.is_dir() or not (model / "config.json").is_file():
        fail(f"--model {model}: not a checkpoint folder (needs config.json and *.safetensors)")
    if dataset is not None and not dataset.exists():
        fail(f"--dataset {dataset}: does not exist")
    ds = None
    if dataset is not None:  # validate before Prefect and Ray start (seconds); the flow reuses it
        from diffcam.storage.datasets import load_dataset
        from diffcam.storage.samples import ManifestError

        try:
            ds = load_dataset(dataset)
        except ManifestError as e:
            fail(str(e))
        if ds.line_problems:  # each such line becomes a failure row; the rest is audited
            shown = [f"  {p}" for p in ds.line_problems[:20]]
            more = len(ds.line_problems) - len(shown)
            typer.secho(f"warning: {len(ds.line_problems)} manifest problem(s); these lines go to the failures "
                        "table, the other lines are audited:\n" + "\n".join(shown)
                        + (f"\n  ... and {more} more" if more > 0 else ""), fg=typer.colors.YELLOW, err=True)
    try:
        chosen = {} if methods is None else {"methods": tuple(m.strip() for m in methods.split(",") if m.strip())}
        settings = CamSettings(layer=layer, distractor=distractor, attribution_step=attribution_step,
                               generation=GenerationSettings(seed=seed), faithfulness=faithfulness, **chosen)
    except ValueError as e:
        fail(str(e))

    from diffcam.flows.audit import AuditConfigError, audit, remember_dataset
    from diffcam.storage.samples import ManifestError

    if ds is not None:
        remember_dataset(dataset, ds)
    try:
        summary = audit(
            model=str(model), dataset=None if dataset is None else str(dataset), store=str(store), run_id=run_id,
            limit=limit, workers=workers, gpus_per_worker=gpus_per_worker, ray_address=ray_address,
            settings=settings, shard_size=shard_size, batch_size=batch_size,
            cpus_per_worker=cpus_per_worker,
            synthetic_n=synthetic_n,
        )
    except (AuditConfigError, ManifestError, FileExistsError) as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - the run row holds the reason too
        fail(f"audit failed: {type(e).__name__}: {e}", code=1)
    if json_out is not None:
        json_out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    s = summary
    rid = s["run_id"]
    typer.echo(
        f"\nrun {rid}: {s['status']} — {s['n_results']} samples audited, {s['n_failures']} failed "
        f"({s['n_shards']} shards: {len(s['shards_committed'])} computed, {len(s['shards_skipped'])} already committed)"
    )
    typer.echo(f"  tables  {s['run_dir']}/<table>/shard=<k>.parquet")
    typer.echo(f"  catalog {s['catalog']}   (duckdb -readonly {s['catalog']})")
    typer.echo(f"  report  {s['report_html']}")
    typer.echo(f"  summary {s['summary_md']}")
    store_arg = "" if Path(store) == DEFAULT_STORE else f" --store {store}"
    typer.echo(f"  query   diffcam sql \"SELECT method, avg(obj_iou) FROM token_maps WHERE run_id = '{rid}' "
               f"GROUP BY method\"{store_arg}")
    if s["status"] != "succeeded":
        for line in s["validation_failed"][:10]:
            typer.echo(f"  validation failed: {line}", err=True)
        raise typer.Exit(1)


# ------------------------------------------------------------------------------- sql

_SQL_HELP = """Run one read-only SQL query (DuckDB) over the store's tables.

Tables: runs, samples, token_maps, flags, failures — views over the committed Parquet files of every run in
the store (column meanings: storage/schemas.py).

Examples:
  diffcam sql "SELECT run_id, status, n_samples FROM runs"
  diffcam sql "SELECT method, avg(obj_iou) FROM token_maps GROUP BY method" --format csv
  diffcam sql "SELECT * FROM failures" --format json --out failures.json
  diffcam sql "SELECT * FROM samples" --format parquet --out samples.parquet

Writing statements (COPY, CREATE, INSERT, ATTACH, SET, ...) are refused. The `map` column holds grid_h*grid_w
uint8 bytes (shown as <N bytes> in tables, hex in CSV/JSON).
"""


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    return str(v)


def format_table(table: Any, max_rows: int | None = 100, max_width: int = 48) -> str:
    """A pa.Table as aligned text (long cells cut at ``max_width``), with a row count."""
    names = table.column_names
    rows = table.slice(0, max_rows).to_pylist() if max_rows is not None else table.to_pylist()
    cells = [[_cell(r[n]) for n in names] for r in rows]
    cells = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in row] for row in cells]
    widths = [max([len(n)] + [len(row[i]) for row in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    more = table.num_rows - len(rows)
    lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''}"
                 + (f", first {len(rows)} shown; use --max-rows or --format csv" if more > 0 else "") + ")")
    return "\n".join(lines)


def _hex_binary(table: Any) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    for i, f in enumerate(table.schema):
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_fixed_size_binary(f.type):
            col = pa.array([None if b is None else b.hex() for b in table.column(i).to_pylist()], type=pa.string())
            table = table.set_column(i, f.name, col)
        elif pa.types.is_nested(f.type):
            table = table.set_column(i, f.name, pc.cast(
                pa.array([None if x is None else json.dumps(jsonable(x)) for x in table.column(i).to_pylist()]),
                pa.string()))
    return table


def sql_cmd(
    query: str = typer.Argument(..., help="One read-only SQL statement (quote it)."),
    store: Path = typer.Option(DEFAULT_STORE, "--store", help="Store folder."),
    fmt: OutputFormat = typer.Option("table", "--format", "-f", help="Output format."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write here instead of stdout (required for parquet on a terminal)."),
    max_rows: int = typer.Option(100, "--max-rows", min=1, help="Rows shown by --format table."),
) -> None:
    if not store.is_dir():
        fail(f"--store {store}: no such store folder (run `diffcam audit` first)")
    if fmt == "parquet" and out is None and sys.stdout.isatty():
        fail("--format parquet writes binary: give --out FILE (or redirect stdout)")
    import duckdb

    from diffcam.storage.catalog import ReadOnlyError, run_sql
    from diffcam.storage.store import StoreCorruptError

    try:
        table = run_sql(store, query)
    except ReadOnlyError as e:
        fail(f"refused: {e}")
    except duckdb.Error as e:
        fail(f"query failed: {e}")
    except StoreCorruptError as e:  # a forged or damaged commit marker: never follow it
        fail(f"the store is damaged: {e}", code=1)

    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, out if out is not None else sys.stdout.buffer)
        if out is not None:
            typer.echo(f"wrote {table.num_rows} rows to {out}", err=True)
        return
    if fmt == "table":
        text = format_table(table, max_rows=max_rows) + "\n"
    elif fmt == "json":
        text = json.dumps([jsonable(r) for r in table.to_pylist()], indent=1) + "\n"
    else:
        import io

        import pyarrow.csv as pcsv

        buf = io.BytesIO()
        pcsv.write_csv(_hex_binary(table), buf)
        text = buf.getvalue().decode()
    if out is not None:
        out.write_text(text)
        typer.echo(f"wrote {table.num_rows} rows to {out}", err=True)
    else:
        typer.echo(text, nl=False)


# ---------------------------------------------------------------------------- report

_REPORT_HELP = """(Re)build a run's report: report.html (self-contained) and summary.md.

Examples:
  diffcam report 20261126-081500-a1b2c3
  diffcam report nightly-01 --store runs/ --out /tmp/nightly-report
"""


def report_cmd(
    run_id: str = typer.Argument(..., help="Run id (see `diffcam sql \"SELECT run_id, status FROM runs\"`)."),
    store: Path = typer.Option(DEFAULT_STORE, "--store", help="Store folder."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default STORE/reports/RUN_ID/)."),
) -> None:
    from diffcam.storage.report import build_report
    from diffcam.storage.store import RUN_ID_RE, Store

    if not RUN_ID_RE.match(run_id):
        fail(f"run id {run_id!r} must match {RUN_ID_RE.pattern}")
    if not store.is_dir():
        fail(f"--store {store}: no such store folder")
    st = Store(store)
    if run_id not in st.runs():
        known = st.runs()
        hint = f"; runs in this store: {', '.join(known[-5:])}" if known else "; the store has no runs"
        fail(f"run {run_id!r} not found in {st.root}{hint}")
    html_path, md_path = build_report(st, run_id, out)
    typer.echo(f"report  {html_path}\nsummary {md_path}")


def register(app: typer.Typer) -> None:
    """Add `audit`, `sql` and `report` to the `diffcam` app."""
    app.command("audit", help=_AUDIT_HELP, no_args_is_help=False)(audit_cmd)
    app.command("sql", help=_SQL_HELP)(sql_cmd)
    app.command("report", help=_REPORT_HELP)(report_cmd)
