"""Train a tiny LLaDA-V-layout model (`llava_llada` family) on the synthetic shapes.

The model is the family's own `LladaVModel` (transformers' SigLIP tower + LLaVA MLP projector +
bidirectional Llama stack), only small, saved with `LladaVModel.save_pretrained`, so the
checkpoint goes through exactly the loader and sampler a released LLaDA-V checkpoint does.

The objective is LLaDA's supervised one: per example t ~ U(eps, 1); every answer-canvas
token (answer words, then eos up to `gen_length`) is replaced by the mask token with
probability t; cross-entropy on the masked positions only, each weighted by 1/t, summed and
divided by batch x canvas length (`llada_loss`). The image and the prompt are never masked.
Training is a fixed number of steps from a fixed seed (init, batches and masks come from
seeded generators), so the command that made a checkpoint makes it again; `minutes` only
caps wall time and is recorded.

Why these sizes (see `LladaSpec`): 64x64 images with SigLIP patch 4 give the 16x16 image-token
grid issue 16 asks for. The tower is kept shallow because a trained-from-scratch tiny ViT with
global attention loses locality (measured on the DiffusionGemma tiny model in this repo).

Why a vision stage (`VisionStage`, `pretrain_vision_tower`): trained only through the language
model's loss, this tower learnt colours in ~1,000 steps and shapes barely in 3,000
(docs/TRAINING.md §5). Released LLaDA-V models start from a pretrained SigLIP, so the recipe
does the same at toy scale: the tower first learns, at every image token, which shape covers
it (dense labels from the synthetic masks), then stays frozen (`freeze_vision`) while the
projector and language model learn to answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from diffcam.core.models.base import load_adapter
from diffcam.core.models.llada import LladaVAdapter
from diffcam.core.settings import GenerationSettings, Settings
from diffcam.core.synthetic import COLORS, SHAPES, SynthSample, SynthSettings, make_samples, vocabulary
from diffcam.training.gemma import (
    LoopSettings,
    Stage,
    TrainExample,
    evaluate_answers,
    examples_sha256,
    stage_record,
    training_seeds,
    warmup_cosine_adamw,
)
from diffcam.training.tiny_llada import LladaSpec, build_adapter

#: Same name and layout as the DiffusionGemma record (`diffcam.training.gemma.training_seeds` reads it).
RECORD = "diffcam_tiny.json"


class LladaTrainSettings(LoopSettings):
    """The LLaDA loop: the masking schedule's lower bound, held-out scoring, a frozen tower."""

    steps: int = Field(default=1500, ge=0)
    batch_size: int = Field(default=32, ge=1)
    eps: float = Field(default=1e-3, gt=0.0, lt=1.0)  # t ~ U(eps, 1), LLaDA's lower bound: nothing is trained unmasked
    # Score `evaluate` (a held-out subset) every this many steps; 0 = never. Generation draws
    # no random numbers from the training generators, so it does not change the weights.
    eval_every: int = 0
    # Keep the SigLIP tower as it is (no gradient, no optimiser state): what LLaVA-style
    # recipes do after the tower has been pretrained (`pretrain_vision_tower`).
    freeze_vision: bool = False


class VisionStage(Settings):
    """Pretraining of the SigLIP tower alone, before the language model sees it.

    Released LLaDA-V checkpoints start from a pretrained SigLIP; a tiny tower trained from
    scratch only through the language model's loss learns colours fast and shapes barely
    (docs/TRAINING.md §5). This stage gives it a dense task instead: every image token
    predicts the shape of the object covering its patch (background when none covers a
    quarter of it), with a linear head that is thrown away afterwards.
    """

    steps: int = Field(ge=0)  # 0: the untrained tower, scored only
    lr: float = Field(gt=0.0)
    train_seed: int = Field(ge=0)  # synthetic images of this seed (`diffcam data synth --seed`)
    seed: int = Field(default=0, ge=0)  # batches and the head's initialisation
    batch_size: int = Field(default=64, ge=1)
    warmup: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    min_coverage: float = Field(default=0.25, ge=0.0, le=1.0)  # share of a patch an object must cover to carry its shape

    @classmethod
    def parse(cls, text: str) -> VisionStage:
        """`STEPS:LR:TRAIN_SEED[:SEED]`, e.g. `800:2e-3:1:0` (the same form as a training `--stage`)."""
        st = Stage.parse(text)
        return cls(steps=st.steps, lr=st.lr, train_seed=st.train_seed, seed=st.seed)


def encode_examples(adapter: LladaVAdapter, examples: Sequence[TrainExample]) -> list[dict[str, torch.Tensor]]:
    """Every example through the adapter's own `prepare` once; answer canvas = words + eos padding.

    Grouped by prompt length (batches never mix lengths, so no padding inside the prompt).
    """
    from PIL import Image

    tok = adapter.tokenizer
    groups: dict[int, dict[str, list]] = {}
    for ex in examples:
        inputs = adapter.prepare(Image.fromarray(ex.image), ex.prompt)
        ids = tok(ex.answer, add_special_tokens=False)["input_ids"]
        if tok.unk_token_id in ids:
            raise ValueError(f"answer {ex.answer!r} has words outside the tokenizer vocabulary")
        if len(ids) + 1 > adapter.gen_length:
            raise ValueError(f"answer {ex.answer!r} needs {len(ids) + 1} tokens with eos > gen_length "
                             f"{adapter.gen_length}; raise LladaSpec.gen_length")
        target = ids + [tok.eos_token_id] * (adapter.gen_length - len(ids))
        g = groups.setdefault(inputs["input_ids"].shape[1], {"ids": [], "pix": [], "tgt": []})
        g["ids"].append(inputs["input_ids"][0])
        g["pix"].append(inputs["pixel_values"][0])
        g["tgt"].append(torch.tensor(target))
    return [{k: torch.stack(v) for k, v in g.items()} for _, g in sorted(groups.items())]


def batches(groups: list[dict[str, torch.Tensor]], batch_size: int, rng: np.random.Generator):
    """Endless batches: a group drawn by size, then examples without replacement inside it."""
    sizes = np.array([len(g["ids"]) for g in groups], dtype=float)
    while True:
        gi = int(rng.choice(len(groups), p=sizes / sizes.sum()))
        n = len(groups[gi]["ids"])
        idx = torch.from_numpy(rng.choice(n, size=min(batch_size, n), replace=False))
        yield {k: v[idx] for k, v in groups[gi].items()}


def mask_canvas(target: torch.Tensor, mask_id: int, gen: torch.Generator, eps: float = 1e-3):
    """LLaDA's forward process: t ~ U(eps, 1) per row, each token masked with probability t.

    Returns (noisy canvas, boolean mask, t of shape (B,)).
    """
    bsz, length = target.shape
    t = eps + (1.0 - eps) * torch.rand(bsz, generator=gen)
    masked = torch.rand(bsz, length, generator=gen) < t[:, None]
    return torch.where(masked, torch.full_like(target, mask_id), target), masked, t


def llada_loss(logits: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum over masked positions of CE / t, divided by B x L (LLaDA's unbiased bound on the NLL).

    Unmasked positions contribute nothing whatever the logits say there.
    """
    bsz, length, vocab = logits.shape
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), target.reshape(-1),
                                           reduction="none").view(bsz, length)
    weights = masked.to(ce.dtype) / t.to(ce.dtype)[:, None]
    return (ce * weights).sum() / (bsz * length)


def train_llada(
    train: Sequence[TrainExample],
    words: Sequence[str],
    settings: LladaTrainSettings = LladaTrainSettings(),
    spec: LladaSpec = LladaSpec(),
    progress: Callable[[int, float, float], None] | None = None,
    init_from: LladaVAdapter | None = None,
    evaluate: Callable[[LladaVAdapter], dict] | None = None,
    on_eval: Callable[[dict], None] | None = None,
) -> tuple[LladaVAdapter, dict]:
    """Build a new model from `spec` (or continue `init_from`, an earlier stage's adapter) and train it.

    Returns the adapter and a training log (loss curve, masked-token accuracy, and
    `heldout_trajectory`: `evaluate(adapter)` every `settings.eval_every` steps, each point also
    passed to `on_eval`).
    """
    torch.set_num_threads(settings.threads)
    if init_from is None:
        adapter = build_adapter(spec, words, settings.seed)
    else:
        adapter = init_from
        missing = sorted(set(words) - set(adapter.tokenizer.get_vocab()))
        if missing:
            raise ValueError(f"tokenizer of the continued model lacks words of this dataset: {missing}")
    model = adapter.model
    if settings.freeze_vision:
        model.siglip.requires_grad_(False)
    groups = encode_examples(adapter, train)
    model.to(settings.device)
    adapter.device = torch.device(settings.device)
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    opt, sched = warmup_cosine_adamw([q for q in model.parameters() if q.requires_grad], settings)

    def forward(pix, ids, noisy, tgt, masked, t):
        logits = model.canvas_logits(ids, model.image_features(pix), noisy)
        return logits, llada_loss(logits, tgt, masked, t)

    if settings.compile:
        forward = torch.compile(forward)
    model.train()
    t0 = time.time()
    log: dict[str, list[float]] = {"loss": [], "masked_acc": []}
    trajectory: list[dict] = []
    stopped_early = False
    stream = batches(groups, settings.batch_size, rng)
    eval_seconds = 0.0
    step = -1
    for step in range(settings.steps):
        b = next(stream)
        noisy, masked, t = mask_canvas(b["tgt"], adapter.mask_token_id, gen, settings.eps)
        dev = settings.device
        logits, loss = forward(b["pix"].to(dev), b["ids"].to(dev), noisy.to(dev), b["tgt"].to(dev), masked.to(dev),
                               t.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            hit = (logits.argmax(-1).cpu() == b["tgt"]) & masked
            log["loss"].append(float(loss.detach()))
            log["masked_acc"].append(float(hit.sum()) / max(1, int(masked.sum())))
        if progress and (step % 50 == 0 or step == settings.steps - 1):
            progress(step, float(np.mean(log["loss"][-50:])), float(np.mean(log["masked_acc"][-50:])))
        if evaluate is not None and settings.eval_every and (step + 1) % settings.eval_every == 0:
            t_eval = time.time()
            model.eval()
            trajectory.append({"step": step + 1, "train_seconds": round(t_eval - t0 - eval_seconds, 1),
                               **evaluate(adapter)})
            model.train()
            if on_eval is not None:
                on_eval(trajectory[-1])
            eval_seconds += time.time() - t_eval
        if settings.minutes is not None and time.time() - t0 > 60 * settings.minutes:
            stopped_early = True
            break
    model.eval()
    if settings.freeze_vision:
        model.siglip.requires_grad_(True)  # frozen for this training only, not for whoever uses the model next
    seconds = time.time() - t0 - eval_seconds
    info = {
        "steps_run": step + 1,
        "stopped_early_by_minutes_cap": stopped_early,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, step + 1), 3),
        "final_loss": float(np.mean(log["loss"][-50:])) if log["loss"] else None,
        "final_masked_acc": float(np.mean(log["masked_acc"][-50:])) if log["masked_acc"] else None,
        # Mean loss of every 25 steps: the curve, small enough to keep in the record.
        "loss_curve_every_25": [round(float(np.mean(log["loss"][i:i + 25])), 4) for i in range(0, len(log["loss"]), 25)],
        "heldout_trajectory": trajectory,
        "trajectory_eval_seconds": round(eval_seconds, 1),
        "n_train": len(train),
        "train_data_sha256": examples_sha256(train),
        "settings": settings.model_dump(),
        "spec": spec.model_dump(),
        "objective": "LLaDA SFT: t~U(eps,1) per example, answer tokens masked w.p. t, CE on masked / t, "
                     "sum / (batch x gen_length); image and prompt never masked",
        "init_from": None if init_from is None else "(previous stage, in memory)",
        "torch": torch.__version__,
    }
    return adapter, info


def token_shape_labels(samples: Sequence[SynthSample], grid: int, min_coverage: float) -> torch.Tensor:
    """(n, grid*grid) int64, row-major like SigLIP's patch order: 0 for background, 1 + the index
    in `SHAPES` of the object covering at least `min_coverage` of the token's share of the image.

    Coverage is measured on the sample's own masks (the processor may resize the pixels the
    tower sees; the grid cell is the same part of the image either way)."""
    out = np.zeros((len(samples), grid * grid), dtype=np.int64)
    for i, s in enumerate(samples):
        h, w = s.image.shape[:2]
        if h % grid or w % grid:
            raise ValueError(f"a {h}x{w} image does not split into a {grid}x{grid} grid of equal cells")
        for obj in s.objects:
            cover = obj.mask.reshape(grid, h // grid, grid, w // grid).mean(axis=(1, 3)).reshape(-1)
            out[i][cover >= min_coverage] = 1 + SHAPES.index(obj.shape)
    return torch.from_numpy(out)


def pretrain_vision_tower(adapter: LladaVAdapter, train: Sequence[SynthSample], stage: VisionStage,
                          heldout: Sequence[SynthSample] = (), threads: int = 1, device: str = "cpu",
                          progress: Callable[[int, float, float | None], None] | None = None) -> dict:
    """Train `adapter.model.siglip` (in place) to tell, at every image token, which shape covers it.

    The tower's last hidden state (what `LladaVModel.image_features` projects) feeds a linear
    head over background + the shapes; cross-entropy over all tokens; warm-up + cosine AdamW.
    Seeded (head init, batches), so the same stage on the same data gives the same tower.
    Returns the record: loss curve and held-out per-token accuracy on object tokens.
    """
    from PIL import Image

    torch.set_num_threads(threads)
    grid = adapter.model.siglip.config.image_size // adapter.model.siglip.config.patch_size

    def pixels(samples):
        return torch.cat([adapter.prepare(Image.fromarray(s.image), s.prompt)["pixel_values"] for s in samples])

    pix, labels = pixels(train), token_shape_labels(train, grid, stage.min_coverage)
    held_pix = pixels(heldout) if heldout else None
    held_labels = token_shape_labels(heldout, grid, stage.min_coverage) if heldout else None
    tower = adapter.model.siglip.to(device)
    torch.manual_seed(stage.seed)
    head = torch.nn.Linear(tower.config.hidden_size, 1 + len(SHAPES)).to(device)
    opt, sched = warmup_cosine_adamw(list(tower.parameters()) + list(head.parameters()), stage)
    rng = np.random.default_rng(stage.seed)

    def token_logits(px):
        return head(tower(pixel_values=px.to(device), output_hidden_states=True).hidden_states[-1])

    def heldout_accuracy() -> float | None:
        """Share of held-out object tokens labelled with the right shape (scored once, after training)."""
        if held_pix is None:
            return None
        with torch.no_grad():
            pred = torch.cat([token_logits(held_pix[i:i + 64]).argmax(-1).cpu() for i in range(0, len(held_pix), 64)])
        on_object = held_labels > 0
        return float((pred[on_object] == held_labels[on_object]).float().mean())

    t0 = time.time()
    tower.train()
    losses: list[float] = []
    for step in range(stage.steps):
        idx = torch.from_numpy(rng.choice(len(pix), size=min(stage.batch_size, len(pix)), replace=False))
        logits = token_logits(pix[idx])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[idx].reshape(-1).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress and step % 100 == 0 and step < stage.steps - 1:
            progress(step, float(np.mean(losses[-50:])), None)
    tower.eval()
    seconds = time.time() - t0
    accuracy = heldout_accuracy()
    if progress and losses:
        progress(len(losses) - 1, float(np.mean(losses[-50:])), accuracy)
    return {
        "stage": stage.model_dump(),
        "objective": "per-token cross-entropy: background or the shape of the object covering >= min_coverage "
                     "of the token's patch, linear head on the tower's last hidden state (head discarded)",
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, stage.steps), 3),
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "loss_curve_every_25": [round(float(np.mean(losses[i:i + 25])), 4) for i in range(0, len(losses), 25)],
        "n_train": len(train),
        "train_data_sha256": examples_sha256([_example(s) for s in train]),
        "heldout_object_token_accuracy": accuracy,
        "n_heldout": len(heldout),
        "threads": threads,
        "torch": torch.__version__,
    }


class _Recording:
    """Passes `prepare` / `generate` through and keeps every generation (for commit-step facts)."""

    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self.generations = []

    def prepare(self, image, prompt):
        return self.adapter.prepare(image, prompt)

    def generate(self, inputs, settings):
        g = self.adapter.generate(inputs, settings)
        self.generations.append(g)
        return g


def evaluate_llada(adapter, examples: Sequence[TrainExample], steps: int) -> dict:
    """Held-out scores (`diffcam.training.gemma.evaluate_answers`, which only needs `prepare` / `generate`,
    so any family's adapter works) plus how commit steps spread over the words of each answer."""
    rec = _Recording(adapter)
    out = evaluate_answers(rec, examples, {"color": frozenset(COLORS), "shape": frozenset(SHAPES)},
                           GenerationSettings(max_denoising_steps=steps))
    distinct = [len({w.commit_step for w in g.words}) / max(1, len(g.words)) for g in rec.generations if g.words]
    out["commit_steps"] = {
        "steps": steps,
        # share of answers (with >= 2 words) whose words are not all committed at one step
        "answers_with_distinct_word_commits": float(np.mean([len({w.commit_step for w in g.words}) > 1
                                                             for g in rec.generations if len(g.words) > 1] or [0.0])),
        "mean_distinct_commit_steps_per_word": float(np.mean(distinct)) if distinct else 0.0,
        "n_steps_run": sorted({g.n_steps for g in rec.generations}),
    }
    return out


def save_checkpoint(adapter: LladaVAdapter, out_dir: Path, spec: LladaSpec, record: dict) -> Path:
    """`LladaVModel.save_pretrained` (LLaDA-V layout + tokenizer + sampler defaults) and the record.

    No preprocessor_config.json: the loader builds SigLIP's default processor at
    `vision_config.image_size`, the one training used (`build_adapter`); in transformers 5.24 a
    saved one reads back with `size` as a `SizeDict`, which the loader's size check rejects.
    `steps` in generation_config.json documents the trained sampler; the adapter takes the step
    count from the run's settings (`max_denoising_steps`, default 16 = `LladaSpec.steps`).
    """
    out_dir = Path(out_dir)
    adapter.model.save_pretrained(out_dir, adapter.tokenizer, image_aspect_ratio="square",
                                  generation={"gen_length": spec.gen_length, "block_length": spec.block_length,
                                              "steps": spec.steps, "temperature": 0.0})
    (out_dir / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out_dir


def _example(sample: SynthSample) -> TrainExample:
    return TrainExample(sample.image, sample.prompt, sample.answer)


def heldout_examples(n: int, seed: int, synth: SynthSettings) -> list[TrainExample]:
    return [_example(s) for s in make_samples(n, seed, synth)]


def _load_for_continuing(folder: Path) -> tuple[LladaVAdapter, dict]:
    """A checkpoint of this module and its record, refused with a reason when it is not one."""
    record_path = folder / RECORD
    if not record_path.is_file():
        raise ValueError(f"{folder} has no {RECORD}: only a checkpoint written by this recipe can be continued")
    record = json.loads(record_path.read_text())
    if not (record.get("train") or {}).get("spec"):
        raise ValueError(f"{record_path} records no LladaSpec (train.spec): not a tiny LLaDA record")
    adapter = load_adapter(folder)
    if not isinstance(adapter, LladaVAdapter):
        raise ValueError(f"{folder} is a {type(adapter).__name__} checkpoint, not a llava_llada one")
    return adapter, record


def run_llada_stages(
    stages: Sequence[Stage],
    out_dir: Path,
    synth: SynthSettings = SynthSettings(),
    base: LladaTrainSettings = LladaTrainSettings(),
    spec: LladaSpec | None = None,
    n_train: int = 12000,
    heldout_seed: int = 2,
    n_heldout: int = 200,
    progress: Callable[[int, int, float, float], None] | None = None,
    n_trajectory: int = 50,
    on_eval: Callable[[int, dict], None] | None = None,
    vision_stage: VisionStage | None = None,
    vision_progress: Callable[[int, float, float | None], None] | None = None,
    init_from: Path | None = None,
) -> dict:
    """Train through `stages` in one process (fresh synthetic data per stage), score every stage on
    the same held-out set, save the last stage to `out_dir`; the record chains the stages
    (`previous_stage`) like `diffcam.training.gemma.run_train_stages`. `progress(stage, step, loss, acc)`.
    With `base.eval_every`, the first `n_trajectory` held-out images are also scored during training
    (`on_eval(stage, point)` sees each point). With `vision_stage`, a new tower is first pretrained
    on its own (`pretrain_vision_tower`, recorded as `recipe_run.vision_stage`); set
    `base.freeze_vision` to keep it fixed afterwards. With `init_from` (a checkpoint folder this
    module wrote), its model is continued instead: its record becomes the first `previous_stage`,
    its training seeds count as seen, and its spec is the one used (`spec` must then be None or
    equal to it). Without `init_from`, `spec` defaults to `LladaSpec()`."""
    if not stages:
        raise ValueError("a recipe needs at least one stage")
    if init_from is not None and vision_stage is not None:
        raise ValueError("a continued checkpoint's tower is already trained: no vision stage with init_from")
    adapter, report, vision_record = None, None, None
    seen: set[int] = set()
    if init_from is not None:
        adapter, report = _load_for_continuing(Path(init_from))
        recorded = LladaSpec.model_validate(report["train"]["spec"])
        if spec is not None and spec != recorded:
            raise ValueError(f"init_from {init_from} keeps its own spec {recorded.model_dump()}; "
                             f"a different spec ({spec.model_dump()}) cannot change a trained model")
        spec = recorded
        seen = set(training_seeds(Path(init_from)))
    spec = spec if spec is not None else LladaSpec()
    seeds = {st.train_seed for st in stages} | ({vision_stage.train_seed} if vision_stage else set()) | seen
    if heldout_seed in seeds:
        raise ValueError(f"held-out seed {heldout_seed} is also a training seed; held-out images must be unseen")
    t0 = time.time()
    words = vocabulary(synth)
    drawn: dict[int, list[SynthSample]] = {}  # each seed's images drawn once (the vision stage and stage 1 share seed 1)

    def samples_of(seed: int, n: int) -> list[SynthSample]:
        if len(drawn.get(seed, ())) < n:
            drawn[seed] = list(make_samples(n, seed, synth))
        return drawn[seed][:n]

    held = [_example(s) for s in samples_of(heldout_seed, max(n_heldout, n_trajectory))[:n_heldout]]
    if vision_stage is not None:
        adapter = build_adapter(spec, words, stages[0].seed)
        vision_record = pretrain_vision_tower(
            adapter, samples_of(vision_stage.train_seed, n_train), vision_stage,
            heldout=samples_of(heldout_seed, n_trajectory), threads=base.threads, device=base.device,
            progress=vision_progress)
    for k, st in enumerate(stages, start=1):
        train = [_example(s) for s in samples_of(st.train_seed, n_train)]
        settings = base.with_(steps=st.steps, lr=st.lr, seed=st.seed)
        adapter, info = train_llada(train, words, settings, spec, init_from=adapter,
                                    progress=None if progress is None else
                                    (lambda s, loss, acc, k=k: progress(k, s, loss, acc)),
                                    evaluate=lambda ad: evaluate_llada(ad, held[:n_trajectory], spec.steps),
                                    on_eval=None if on_eval is None else (lambda point, k=k: on_eval(k, point)))
        t_eval = time.time()
        ev = evaluate_llada(adapter, held, spec.steps) if n_heldout else {}
        ev["eval_seconds"] = round(time.time() - t_eval, 1)
        report = stage_record(info, report, st, n_train, synth, heldout_seed, n_heldout, ev)
    report["recipe_run"] = {
        "continued_from": None if init_from is None else str(init_from),
        "stages": [st.model_dump() for st in stages],
        "vision_stage": vision_record,
        "freeze_vision": base.freeze_vision,
        "wall_seconds": round(time.time() - t0, 1),
        "threads": base.threads,
        "batch_size": base.batch_size,
        "device": base.device,
        "torch": torch.__version__,
    }
    save_checkpoint(adapter, out_dir, spec, report)
    return report
