"""`diffcam` — the command line.

Heavy imports (torch, transformers, Prefect, Ray) happen inside each command so that
`diffcam --help` answers instantly. Commands are registered from three modules:
this one (method-level commands), `flows/cli_pipeline.py` (audit, sql, report) and
`flows/cli_ops.py` (compare, deploy, serve) when present.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from diffcam.core.cue_text import parse_cue
from diffcam.core.settings import AttributionStep, Distractor
from diffcam.flows.cli_common import fail
from diffcam.flows.paths import DEFAULT_MODEL

app = typer.Typer(
    name="diffcam",
    help=(
        "Audit where a diffusion multimodal LLM looks when it names things, with Diffusion-CAM.\n\n"
        "Start with `diffcam audit` (the shipped tiny model on a built-in synthetic dataset), "
        "then `diffcam report RUN_ID` or `diffcam sql \"SELECT ...\"`. "
        "`diffcam explain IMAGE --prompt TEXT` explains one image."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make datasets (synthetic shapes with exact masks and optional planted cues).", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print the paper-style tables.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="New folder to write (must not exist or be empty)."),
    n: int = typer.Option(300, "--n", min=1, help="Number of samples."),
    seed: int = typer.Option(0, "--seed", help="Seed: same seed, same dataset, byte for byte."),
    cue: str | None = typer.Option(
        None,
        "--cue",
        help=(
            "Plant a spurious cue that co-occurs with a word: "
            "word=W,pos=top-left|top-right|bottom-left|bottom-right|X,Y,size=PX,color=NAME|R,G,B,p=P "
            "(e.g. word=circle,pos=top-left,size=6,color=magenta,p=0.9)."
        ),
    ),
) -> None:
    """Write a synthetic grounded dataset: manifest.jsonl + images/ + masks/ + dataset.json."""
    from diffcam.core.synthetic import SynthSettings
    from diffcam.storage.synthetic_writer import write_synthetic_dataset

    try:
        settings = SynthSettings(cue=parse_cue(cue) if cue else None)
    except ValueError as e:
        fail(f"--cue: {e}")
    try:
        with typer.progressbar(length=n, label="writing samples") as bar:
            path = write_synthetic_dataset(out, n, seed, settings, progress=lambda k: bar.update(1))
    except FileExistsError as e:
        fail(f"{e} — pass a new --out folder")
    typer.echo(f"wrote {n} samples to {path}")


@app.command("train-tiny")
def train_tiny_cmd(
    data: Path = typer.Option(..., "--data", help="Synthetic dataset folder (from `diffcam data synth`)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint folder to write."),
    steps: int = typer.Option(2500, "--steps", min=1, help="Optimiser steps (fixed: the same command makes the same model)."),
    minutes: float | None = typer.Option(None, "--minutes", help="Wall-time cap; stopping early is recorded."),
    heldout: Path | None = typer.Option(
        None, "--heldout", help="Held-out dataset folder to score answers on (colour, shape, exact match)."),
    seed: int = typer.Option(0, "--seed", help="Training seed: initialisation, batches and noise."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads (results are reproducible for a fixed value)."),
    lr: float = typer.Option(2e-3, "--lr", min=0.0, help="Peak AdamW learning rate (linear warm-up, cosine decay)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Examples per step (drawn from one prompt length)."),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Continue training this checkpoint (a later stage of a recipe)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda (noise and batches are drawn on the CPU either way)."),
    compile_: bool = typer.Option(
        False, "--compile",
        help="torch.compile the training step: ~1.4x faster per step on CPU after a few minutes of compiling "
             "(worth it from ~1,000 steps). Reproducible against another compiled run, not against an eager one.",
    ),
    spec: str | None = typer.Option(
        None, "--spec",
        help="Overrides of the architecture for a new model: a .json or .toml file, a JSON object, or "
             "key=value pairs, e.g. max_soft_tokens=280,position_init_std=0.5 "
             "(fields: see TinyModelSpec in training/tiny_gemma.py; unknown fields and wrong types are refused).",
    ),
) -> None:
    """Train the tiny DiffusionGemma on a synthetic dataset and save it (safetensors).

    The shipped models are stages of this command: each checkpoint's `diffcam_tiny.json`
    (`recipe`) holds the exact command. `scripts/train_recipe.py` runs several stages in
    one process (one compile for all; how the default is trained), `scripts/train_shipped.py`
    one stage (how the planted-cue model is trained).
    """
    from diffcam.training.gemma import TrainSettings, run_train_tiny
    from diffcam.training.overrides import read_overrides
    from diffcam.training.tiny_gemma import TinyModelSpec

    try:
        arch = TinyModelSpec.model_validate(read_overrides(spec))
    except (ValueError, TypeError) as e:  # json.JSONDecodeError and pydantic's ValidationError are ValueErrors
        fail(f"--spec: {e}")
    try:
        report = run_train_tiny(
            data, out,
            TrainSettings(steps=steps, minutes=minutes, seed=seed, threads=threads, lr=lr, batch_size=batch_size, device=device,
                          compile=compile_),
            heldout=heldout, init_from=init_from, spec=arch,
            progress=lambda s, loss, acc: typer.echo(f"step {s:5d}  loss {loss:.4f}  token-acc {acc:.3f}"),
        )
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    typer.echo(json.dumps(report.get("heldout_eval", {}), indent=2))
    typer.echo(f"saved to {out}")


@app.command("explain")
def explain_cmd(
    image: Path = typer.Argument(..., help="Image file (PNG/JPEG/...)."),
    prompt: str = typer.Option(..., "--prompt", help="Question or instruction about the image."),
    model: Path = typer.Option(DEFAULT_MODEL, "--model", help="Local checkpoint folder (safetensors)."),
    out: Path = typer.Option(Path("explain-out"), "--out", help="Folder for overlays and explain.json."),
    layer: str | None = typer.Option(None, "--layer", help="Layer to hook (see explain.json `layers`)."),
    distractor: Distractor = typer.Option(
        "others-mean", "--distractor", help="Contrast target (others-mean: the default, best on the benchmark)."),
    attribution_step: AttributionStep = typer.Option(
        "commit", "--attribution-step", help="Canvas the word is scored on: the word's commit step, or the final one."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Answer PROMPT about IMAGE; write one overlay PNG per word (raw | refined) and explain.json."""
    from diffcam.flows.explain import run_explain
    from diffcam.storage.images import SampleError

    try:
        summary = run_explain(image, prompt, model, out, layer=layer, distractor=distractor,
                              attribution_step=attribution_step, seed=seed)
    except (ValueError, FileNotFoundError, SampleError) as e:
        fail(str(e))
    typer.echo(f"answer: {summary['answer']}")
    for w in summary["words"]:
        typer.echo(f"  {w['index']:2d} {w['word']:<12} commit step {w['commit_step']:3d}  -> {w['overlay']}")
    typer.echo(f"wrote {out / 'explain.json'}")


@app.command("methods")
def methods_cmd() -> None:
    """List every registered map method: its kind, where diffcam uses it by default, and what it is."""
    from diffcam.core import methods as registry
    from diffcam.core.settings import CamSettings

    default = set(CamSettings().methods)
    kinds = ((registry.GradientMethod, "gradient"), (registry.WordSetMethod, "refinement"),
             (registry.ModelMethod, "model (no gradients)"), (registry.ImageMethod, "chance (no model)"))
    for name in registry.method_names():
        m = next(x for x in registry.resolve([name]) if x.name == name)
        kind = next(label for cls, label in kinds if isinstance(m, cls))
        uses = ", ".join(sorted(m.roles | ({"audit-default"} if name in default else set()))) or "opt-in"
        doc = (type(m).__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:<18} {kind:<22} {uses:<56} {doc}")


@bench_app.command("method")
def bench_method_cmd(
    n: int = typer.Option(200, "--n", help="Held-out synthetic images."),
    model: Path = typer.Option(DEFAULT_MODEL, "--model"),
    json_out: Path | None = typer.Option(None, "--json", help="Write the tables as JSON."),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep",
                               help="Run the tuning sweeps (layer, distractor, attribution step, DACG sigma) on the "
                                    "tuning seed."),
    sweep_n: int | None = typer.Option(None, "--sweep-n", min=1, help="Tuning-seed images (default n/2)."),
    faith_n: int | None = typer.Option(None, "--faith-n", min=0,
                                          help="Report images with faithfulness curves and vanish test "
                                               "(default min(n, 100); ~0.15 s per word and map on the tiny model)."),
    clutter_n: int | None = typer.Option(None, "--clutter-n", min=0,
                                            help="Images of the clutter split (unnamed grey shapes; default n)."),
) -> None:
    """Method table with the evidence that maps are right (docs/EVALUATION.md).

    Rows: chance maps (random, objectness = no model, all-objects, oracle), then every method and ablation preset.

    Columns: localisation (Obj-IoU, pointing, Contrast, F3), word specificity (specificity, swap test), faithfulness.

    Choices are swept on the tuning seed (11); the table is reported on the report seed (2). The JSON says which.
    """
    from diffcam.evaluation.method_table import main as bench_main

    bench_main(n=n, model=model, json_out=json_out, sweep=sweep, sweep_n=sweep_n, faith_n=faith_n,
               clutter_n=clutter_n)


def _register_optional() -> None:
    for mod in ("diffcam.flows.cli_pipeline", "diffcam.flows.cli_ops"):
        try:
            module = __import__(mod, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        module.register(app)


_register_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
