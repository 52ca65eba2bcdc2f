"""Time one training step (forward + backward) of a tiny checkpoint, eager and compiled.

    python scripts/train_step_timing.py [--model models/tiny-shapes] [--batch-size 64] [--threads 1]

Why: the earlier eager recipe took 131 CPU-minutes, over the 60-minute target, and a profile
puts most of a step in small element-wise ops (norms, rotary, GELU) that a compiler can
fuse. This measures what `torch.compile` buys before anyone wires it into training: the
same batch (the largest prompt-length group of 128 synthetic samples, seed 11) and the
same noised canvas, seconds per step after one warm-up step, and the one-off compile time.
The optimizer step is not included (it is the same in both).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffcam.core.models.base import load_adapter
from diffcam.core.synthetic import SynthSettings, make_samples
from diffcam.training.gemma import TrainExample, _encode_examples

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "tiny-shapes")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    adapter = load_adapter(a.model)
    model = adapter.model
    model.train()
    samples = list(make_samples(128, 11, SynthSettings()))
    groups = _encode_examples(adapter, [TrainExample(s.image, s.prompt, s.answer) for s in samples],
                              adapter.config.canvas_length)
    batch = {k: v[: a.batch_size] for k, v in max(groups, key=lambda g: len(g["ids"])).items()}
    vocab = adapter.config.text_config.vocab_size
    target = batch["tgt"]
    noisy = torch.randint(0, vocab, target.shape, generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        cache = adapter.run_encoder({"input_ids": batch["ids"], "pixel_values": batch["pix"],
                                     "image_position_ids": batch["pos"], "mm_token_type_ids": batch["mm"]})
        logits = model(decoder_input_ids=noisy, cache=cache).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1))

    def seconds_per_step(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            fn().backward()
        return (time.perf_counter() - t0) / a.steps

    loss().backward()  # warm-up
    eager = seconds_per_step(loss)
    print(f"batch {target.shape[0]}, {a.threads} thread(s): eager {eager:.3f} s/step", flush=True)
    compiled = torch.compile(loss)
    t0 = time.perf_counter()
    compiled().backward()  # compiles forward and backward
    print(f"compile (one-off) {time.perf_counter() - t0:.1f} s", flush=True)
    fast = seconds_per_step(compiled)
    print(f"compiled {fast:.3f} s/step: {eager / fast:.2f}x", flush=True)


if __name__ == "__main__":
    main()
