"""Train the tiny embedded DiffusionGemma on a synthetic grounded dataset.

The objective is the family's own: uniform-noise diffusion on the answer canvas (each
canvas token replaced by a uniformly random token with probability t ~ U(0, 1)), with
self-conditioning on half of the batches (a first no-grad decoder pass whose
temperature-scaled logits feed the second pass), cross-entropy on every canvas position.
Training is a fixed number of steps from a fixed seed on CPU, so the command that made
a shipped checkpoint makes it again (`--minutes` only caps wall time and is recorded).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from transformers import DiffusionGemmaForBlockDiffusion

from diffcam.core.models.diffusion_gemma import DiffusionGemmaAdapter
from diffcam.core.settings import GenerationSettings, Settings
from diffcam.core.synthetic import COLORS, SHAPES, SynthSettings, make_samples, vocabulary
from diffcam.training.tiny_gemma import (
    TinyModelSpec,
    build_config,
    build_image_processor,
    build_tokenizer,
    init_position_table,
)


class LoopSettings(Settings):
    """What every training loop of both families takes: schedule, seed, threads, device."""

    steps: int = Field(default=2400, ge=0)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0.0)
    warmup: int = Field(default=100, ge=0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    seed: int = Field(default=0, ge=0)
    threads: int = Field(default=2, ge=1)
    minutes: float | None = None
    device: str = "cpu"  # noise, masks and batches are drawn on the CPU either way: only float rounding differs
    # torch.compile the step's forward passes and loss. Same objective, same batches and noise;
    # fused kernels round differently, so a compiled run reproduces a compiled run (same
    # threads), not an eager one (docs/TRAINING.md §2).
    compile: bool = False


class TrainSettings(LoopSettings):
    """The DiffusionGemma loop: self-conditioning is trained on this share of the batches."""

    self_cond_prob: float = Field(default=0.5, ge=0.0, le=1.0)


@dataclass(frozen=True)
class TrainExample:
    image: np.ndarray  # H×W×3 uint8
    prompt: str
    answer: str


def examples_sha256(examples: Sequence[TrainExample]) -> str:
    """Fingerprint of the training data in order: proves two runs trained on the same examples."""
    import hashlib

    h = hashlib.sha256()
    for ex in examples:
        h.update(np.ascontiguousarray(ex.image).tobytes())
        h.update(ex.prompt.encode() + b"\0" + ex.answer.encode() + b"\0")
    return h.hexdigest()


def _encode_examples(adapter: DiffusionGemmaAdapter, examples: Sequence[TrainExample], canvas_length: int):
    """Run every example through the adapter's own input path once; group by prompt length."""
    from PIL import Image

    tok = adapter.tokenizer
    groups: dict[int, dict[str, list]] = {}
    for ex in examples:
        inputs = adapter.prepare(Image.fromarray(ex.image), ex.prompt)
        answer_ids = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(answer_ids) > canvas_length:
            raise ValueError(f"answer {ex.answer!r} needs {len(answer_ids)} tokens > canvas {canvas_length}")
        if tok.unk_token_id in answer_ids:
            raise ValueError(f"answer {ex.answer!r} has words outside the tokenizer vocabulary")
        target = answer_ids + [tok.pad_token_id] * (canvas_length - len(answer_ids))
        g = groups.setdefault(inputs["input_ids"].shape[1], {k: [] for k in ("ids", "pix", "pos", "mm", "tgt")})
        g["ids"].append(inputs["input_ids"][0])
        g["pix"].append(inputs["pixel_values"][0])
        g["pos"].append(inputs["image_position_ids"][0])
        g["mm"].append(inputs["mm_token_type_ids"][0])
        g["tgt"].append(torch.tensor(target))
    return [{k: torch.stack(v) for k, v in g.items()} for _, g in sorted(groups.items())]


def _batches(groups, batch_size: int, rng: np.random.Generator):
    sizes = np.array([len(g["ids"]) for g in groups], dtype=float)
    while True:
        gi = int(rng.choice(len(groups), p=sizes / sizes.sum()))
        n = len(groups[gi]["ids"])  # a small dataset's rarer prompt lengths give smaller batches
        idx = torch.from_numpy(rng.choice(n, size=min(batch_size, n), replace=False))
        yield {k: v[idx] for k, v in groups[gi].items()}


def _denoising_step(adapter: DiffusionGemmaAdapter, vocab: int) -> Callable:
    """The forward half of one training step: encoder, optional self-conditioning pass, decoder, loss.

    One function so `torch.compile` can fuse it whole (the step is dominated by small
    element-wise ops: norms, rotary, GELU). `temp` is a 0-d tensor so a compiled graph is
    not specialised to each drawn temperature.
    """
    model = adapter.model

    def forward(b: dict, noisy: torch.Tensor, temp: torch.Tensor, use_sc: bool):
        cache = adapter.run_encoder(
            {"input_ids": b["ids"], "pixel_values": b["pix"], "image_position_ids": b["pos"], "mm_token_type_ids": b["mm"]}
        )
        self_cond = None
        if use_sc:
            with torch.no_grad():
                self_cond = (model(decoder_input_ids=noisy, cache=cache).logits / temp).detach()
        logits = model(decoder_input_ids=noisy, cache=cache, self_conditioning_logits=self_cond).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), b["tgt"].reshape(-1))
        return logits, loss

    return forward


@contextmanager
def _deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """torch's deterministic mode for the block (when `enabled`), restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _stage_records(folder: Path) -> Iterator[dict]:
    """A checkpoint's diffcam_tiny.json, then each earlier stage's (`previous_stage`), newest first."""
    meta = Path(folder) / "diffcam_tiny.json"
    report = json.loads(meta.read_text()) if meta.is_file() else None
    while report:
        yield report
        report = report.get("previous_stage")


def training_seeds(folder: Path) -> list[int]:
    """Synthetic dataset seeds of every training stage of a checkpoint, newest stage first.

    A held-out check must see the data of every stage, not only the last; [] when the
    folder has no record.
    """
    return [int(r["dataset"]["seed"]) for r in _stage_records(folder) if (r.get("dataset") or {}).get("seed") is not None]


def _checkpoint_spec(folder: Path) -> TinyModelSpec | None:
    """The TinyModelSpec a checkpoint was built from, None if unknown (a later stage records
    its first stage's spec, so the chain is walked)."""
    specs = ((r.get("train") or {}).get("spec") for r in _stage_records(folder))
    return next((TinyModelSpec.model_validate(spec) for spec in specs if spec), None)


def stage_record(info: dict, previous: dict | None, stage: Stage, n_train: int, synth: SynthSettings,
                 heldout_seed: int, n_heldout: int, heldout_eval: dict) -> dict:
    """One training stage's record in a checkpoint's `diffcam_tiny.json`; earlier stages nest
    under ``previous_stage`` (what `training_seeds` walks)."""
    return {
        "train": info,
        "previous_stage": previous,
        "dataset": {"path": f"(in memory: the samples of diffcam data synth --seed {stage.train_seed} --n {n_train})",
                    "seed": stage.train_seed, "n": n_train, "settings": synth.model_dump(mode="json"),
                    "cue": None if synth.cue is None else synth.cue.model_dump(mode="json")},
        "heldout": {"seed": heldout_seed, "n": n_heldout},
        "heldout_eval": heldout_eval,
    }


def warmup_cosine_adamw(params, settings) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW, linear warm-up over ``settings.warmup`` steps, then cosine decay to 5 % of ``settings.lr``
    at ``settings.steps``: the schedule both tiny families train with."""
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        frac = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def train_tiny(
    train: Sequence[TrainExample],
    vocabulary: Sequence[str],
    settings: TrainSettings = TrainSettings(),
    spec: TinyModelSpec = TinyModelSpec(),
    progress: Callable[[int, float, float], None] | None = None,
    init_from: Path | DiffusionGemmaAdapter | None = None,
) -> tuple[DiffusionGemmaAdapter, dict]:
    """Build (or continue from `init_from`) and train the tiny model.

    `init_from` is a checkpoint folder, or the adapter an earlier stage of the same process
    returned (`run_train_stages`): continuing in memory gives the same weights as saving and
    reloading, and a compiled step is reused instead of compiled again (minutes on CPU).
    For an adapter, `spec` must be the architecture it was built from (it is recorded).
    Returns the adapter (model + tokenizer + processor) and a training log.
    """
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    if isinstance(init_from, DiffusionGemmaAdapter):
        adapter = init_from
        model, config = adapter.model, adapter.config
        built = (config.text_config.num_hidden_layers, config.text_config.hidden_size, config.canvas_length)
        if built != (spec.text_layers, spec.text_hidden, spec.canvas_length):
            raise ValueError(f"spec {spec} does not describe the adapter being continued (layers, hidden, canvas = {built})")
        missing = sorted(set(vocabulary) - set(adapter.tokenizer.get_vocab()))
        if missing:
            raise ValueError(f"tokenizer of the continued model lacks words of this dataset: {missing}")
    elif init_from is not None:
        from diffcam.core.models.base import load_adapter

        if spec != TinyModelSpec():
            raise ValueError("a spec describes a new model; --init-from continues an existing one, whose architecture is fixed")
        adapter = load_adapter(init_from)
        missing = sorted(set(vocabulary) - set(adapter.tokenizer.get_vocab()))
        if missing:
            raise ValueError(f"{init_from}: tokenizer lacks words of this dataset: {missing}")
        model, config = adapter.model, adapter.config
        spec = _checkpoint_spec(init_from)
    else:
        tokenizer = build_tokenizer(list(vocabulary))
        processor = build_image_processor(spec)
        config = build_config(spec, tokenizer)
        model = DiffusionGemmaForBlockDiffusion(config)
        init_position_table(model, spec, torch.Generator().manual_seed(settings.seed))
        adapter = DiffusionGemmaAdapter(model, tokenizer, processor)
    groups = _encode_examples(adapter, train, config.canvas_length)
    model.to(settings.device)
    adapter.device = torch.device(settings.device)
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    vocab = config.text_config.vocab_size

    opt, sched = warmup_cosine_adamw(model.parameters(), settings)
    forward = _denoising_step(adapter, vocab)
    if settings.compile:
        forward = torch.compile(forward)
    model.train()
    t0 = time.time()
    log = {"loss": [], "acc": []}
    stopped_early = False
    batches = _batches(groups, settings.batch_size, rng)
    step = 0
    # Inductor's CPU kernels accumulate index_put gradients with atomic adds (its lowering code),
    # the likely reason two compiled runs differed (measured: 151 steps, 2 threads, different weights); in
    # deterministic mode it falls back to aten's ordered kernels (same weights whether the
    # compile cache was cold or warm, and no slower). CPU only: on CUDA the mode refuses
    # cuBLAS without CUBLAS_WORKSPACE_CONFIG, and GPU runs are not the reproducible path.
    with _deterministic_algorithms(settings.compile and torch.device(settings.device).type == "cpu"):
        for step in range(settings.steps):
            b = {k: v.to(settings.device) for k, v in next(batches).items()}
            tgt = b["tgt"]
            bsz, length = tgt.shape
            t = torch.rand(bsz, 1, generator=gen)
            noise_mask = torch.rand(bsz, length, generator=gen) < t
            noise = torch.randint(0, vocab, (bsz, length), generator=gen)
            noisy = torch.where(noise_mask.to(settings.device), noise.to(settings.device), tgt)
            use_sc = bool(torch.rand(1, generator=gen) < settings.self_cond_prob)
            temp = 0.4 + 0.4 * float(torch.rand(1, generator=gen))

            logits, loss = forward(b, noisy, torch.tensor(temp, device=settings.device), use_sc)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                acc = float((logits.argmax(-1) == tgt).float().mean())
            log["loss"].append(float(loss.detach()))
            log["acc"].append(acc)
            if progress and (step % 50 == 0 or step == settings.steps - 1):
                progress(step, float(np.mean(log["loss"][-50:])), float(np.mean(log["acc"][-50:])))
            if settings.minutes is not None and time.time() - t0 > 60 * settings.minutes:
                stopped_early = True
                break
    model.eval()
    info = {
        "steps_run": step + 1,
        "stopped_early_by_minutes_cap": stopped_early,
        "train_seconds": round(time.time() - t0, 1),
        "final_loss": float(np.mean(log["loss"][-50:])),
        "final_token_acc": float(np.mean(log["acc"][-50:])),
        "n_train": len(train),
        "train_data_sha256": examples_sha256(train),
        "settings": settings.model_dump(),
        "spec": None if spec is None else spec.model_dump(),
        "init_from": (None if init_from is None else "(previous stage, in memory)"
                      if isinstance(init_from, DiffusionGemmaAdapter) else str(init_from)),
    }
    return adapter, info


def evaluate_answers(
    adapter: DiffusionGemmaAdapter,
    examples: Sequence[TrainExample],
    word_kinds: dict[str, frozenset[str]],
    gen_settings: GenerationSettings = GenerationSettings(),
) -> dict:
    """Generate for held-out examples; score words position by position, and exact match.

    ``word_kinds`` (e.g. {"color": COLORS, "shape": SHAPES}) gives one accuracy per kind,
    so a model that names colours but guesses shapes cannot hide behind the average;
    ``content_word_acc`` pools all kinds.
    """
    from PIL import Image

    kinds = dict(word_kinds)
    content_words = frozenset().union(*kinds.values())
    exact = 0
    word_hits = word_total = 0
    kind_hits = {k: 0 for k in kinds}
    kind_total = {k: 0 for k in kinds}
    steps = []
    for i, ex in enumerate(examples):
        g = adapter.generate(adapter.prepare(Image.fromarray(ex.image), ex.prompt), gen_settings.with_(
            seed=gen_settings.seed + i))
        got = g.text.split()
        ref = ex.answer.split()
        exact += got == ref
        steps.append(g.n_steps)
        for j, w in enumerate(ref):
            hit = j < len(got) and got[j] == w
            if w in content_words:
                word_total += 1
                word_hits += hit
            for k, words in kinds.items():
                if w in words:
                    kind_total[k] += 1
                    kind_hits[k] += hit
    out = {
        "n": len(examples),
        "exact_match": exact / max(1, len(examples)),
        "content_word_acc": word_hits / max(1, word_total),
        "mean_steps": float(np.mean(steps)) if steps else 0.0,
    }
    for k in kinds:
        out[f"{k}_word_acc"] = kind_hits[k] / max(1, kind_total[k])
    return out


def save_checkpoint(adapter: DiffusionGemmaAdapter, out_dir: Path, meta: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter.model.save_pretrained(out_dir, safe_serialization=True)
    adapter.tokenizer.save_pretrained(out_dir)
    adapter.image_processor.save_pretrained(out_dir)
    (out_dir / "diffcam_tiny.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out_dir


def load_examples(data_dir: Path) -> tuple[list[TrainExample], dict]:
    """Examples from a synthetic dataset folder, in manifest order (needs the `answer` field)."""
    from diffcam.storage.datasets import load_dataset
    from diffcam.storage.images import load_image

    ds = load_dataset(data_dir)
    examples = []
    for s in ds.samples:
        answer = s.extra.get("answer")
        if not answer:
            raise ValueError(f"{ds.uri} line {s.line_no}: no `answer` field; train-tiny needs a synthetic dataset")
        if s.problem:
            raise ValueError(f"{ds.uri} line {s.line_no}: {s.problem}")
        examples.append(TrainExample(np.asarray(load_image(s.image_path)), s.prompt, answer))
    return examples, dict(ds.meta or {})


def run_train_tiny(
    data_dir: Path,
    out_dir: Path,
    settings: TrainSettings = TrainSettings(),
    heldout: Path | None = None,
    progress: Callable[[int, float, float], None] | None = None,
    init_from: Path | None = None,
    spec: TinyModelSpec = TinyModelSpec(),
) -> dict:
    """`diffcam train-tiny`: train on a dataset folder, score held-out answers, save everything."""
    examples, meta = load_examples(Path(data_dir))
    vocab = meta.get("vocabulary") or sorted({w for ex in examples for w in (ex.prompt + " " + ex.answer).split()})
    previous = None
    if init_from is not None:
        prev_meta = Path(init_from) / "diffcam_tiny.json"
        previous = json.loads(prev_meta.read_text()) if prev_meta.is_file() else None
    adapter, info = train_tiny(examples, vocab, settings, spec=spec, progress=progress, init_from=init_from)
    data_meta = {k: meta[k] for k in ("seed", "n", "settings", "cue") if k in meta}
    report = {"train": info, "previous_stage": previous, "dataset": {"path": str(data_dir), **data_meta}}
    if heldout is not None:
        held, _ = load_examples(Path(heldout))
        report["heldout_eval"] = evaluate_answers(adapter, held, {"color": frozenset(COLORS), "shape": frozenset(SHAPES)})
    save_checkpoint(adapter, out_dir, report)
    return report


class Stage(Settings):
    """One stage of a multi-stage recipe: fresh synthetic data and its own schedule.

    Why stages: on this task a model that has seen a 12,000-image set many times gains most
    from a new set at a lower peak rate (docs/TRAINING.md §2).
    """

    steps: int = Field(ge=1)
    lr: float = Field(gt=0.0)
    train_seed: int = Field(ge=0)  # seed of this stage's synthetic training set (`diffcam data synth --seed`)
    seed: int = Field(default=0, ge=0)  # training seed: batches and noise (and initialisation in the first stage)

    @classmethod
    def parse(cls, text: str) -> Stage:
        """`STEPS:LR:TRAIN_SEED[:SEED]`, e.g. `2250:2e-3:1:0`."""
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"stage {text!r}: expected STEPS:LR:TRAIN_SEED[:SEED], e.g. 2250:2e-3:1:0")
        try:
            values = (int(parts[0]), float(parts[1]), int(parts[2]), int(parts[3]) if len(parts) == 4 else 0)
        except ValueError:
            raise ValueError(f"stage {text!r}: STEPS, TRAIN_SEED and SEED are integers, LR a number") from None
        try:
            return cls(**dict(zip(("steps", "lr", "train_seed", "seed"), values)))
        except ValueError:
            raise ValueError(f"stage {text!r}: steps >= 1, lr > 0 and seeds >= 0 are required") from None


def run_train_stages(
    stages: Sequence[Stage],
    out_dir: Path,
    synth: SynthSettings,
    base: TrainSettings,
    spec: TinyModelSpec = TinyModelSpec(),
    n_train: int = 12000,
    heldout_seed: int = 2,
    n_heldout: int = 200,
    stage_dir: Path | None = None,
    progress: Callable[[int, int, float, float], None] | None = None,
) -> dict:
    """Train a new model through `stages` in one process and save the last stage to `out_dir`.

    Each stage draws its own training set in memory (the same bytes `diffcam data synth
    --seed TRAIN_SEED` writes) and continues the previous stage's model in memory, so a
    compiled step (`base.compile`) is built once. Every stage is scored on the same held-out
    set; the saved record chains the stages (`previous_stage`), as separate `train-tiny`
    runs would, plus the wall time of the whole recipe. `stage_dir`, if given, also keeps
    each earlier stage's checkpoint. `progress(stage, step, loss, acc)`.
    """
    if not stages:
        raise ValueError("a recipe needs at least one stage")
    t0 = time.time()
    words = vocabulary(synth)
    if heldout_seed in {st.train_seed for st in stages}:
        raise ValueError(f"held-out seed {heldout_seed} is also a training seed; held-out images must be unseen")
    held = [TrainExample(s.image, s.prompt, s.answer) for s in make_samples(n_heldout, heldout_seed, synth)]
    adapter, report = None, None
    for k, st in enumerate(stages, start=1):
        train = [TrainExample(s.image, s.prompt, s.answer) for s in make_samples(n_train, st.train_seed, synth)]
        settings = base.with_(steps=st.steps, lr=st.lr, seed=st.seed)
        adapter, info = train_tiny(
            train, words, settings, spec=spec, init_from=adapter,
            progress=None if progress is None else (lambda s, loss, acc, k=k: progress(k, s, loss, acc)),
        )
        t_eval = time.time()
        ev = evaluate_answers(adapter, held, {"color": frozenset(COLORS), "shape": frozenset(SHAPES)})
        ev["eval_seconds"] = round(time.time() - t_eval, 1)
        report = stage_record(info, report, st, n_train, synth, heldout_seed, n_heldout, ev)
        if stage_dir is not None and k < len(stages):
            save_checkpoint(adapter, Path(stage_dir) / f"stage{k}", report)
    report["recipe_run"] = {
        "stages": [st.model_dump() for st in stages],
        "wall_seconds": round(time.time() - t0, 1),
        "threads": base.threads,
        "compile": base.compile,
        "torch": torch.__version__,
    }
    save_checkpoint(adapter, out_dir, report)
    return report
