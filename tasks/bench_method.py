"""The paper-style method table on held-out synthetic data (METHOD.md §6).

For every held-out image: generate once, then attribute under each configuration being
compared (the generation — and so the answer and commit steps — is shared, so rows differ
only by the attribution method). Metrics are computed per answer word that names an
object, against that object's exact mask; a generated word is matched to the reference
answer's word at the same index and skipped (counted) when they differ.

Rows: `random` (a seeded uniform-noise map: chance level), `gradcam`,
`diffusion-cam-raw`, the ablation presets `+akd +dacg +cba +sicd`, `diffusion-cam`
(`full`), and `token-gradnorm`. Dataset F3 is the harmonic mean of the dataset means of
Obj-IoU, Contrast score and Concentration (how the paper's tables are computed); the mean
of per-word F3 is reported beside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from statistics import median

import numpy as np
from PIL import Image

from diffcam_core import metrics
from diffcam_core.cam import attribute
from diffcam_core.models.base import load_adapter
from diffcam_core.refine import PRESETS, refine, refine_stack
from diffcam_core.settings import CamSettings
from diffcam_core.synthetic import SynthSettings, answer_groundings, make_samples

ABLATION = ("+akd", "+dacg", "+cba", "+sicd")
HELDOUT_SEED = 2


def word_metrics(heat: np.ndarray, mask: np.ndarray, all_masks: list[np.ndarray]) -> dict[str, float]:
    iou = metrics.obj_iou(heat, mask)
    con = metrics.contrast(heat, mask)
    cs = metrics.contrast_score(con)
    conc = metrics.concentration(heat, mask)
    return {
        "obj_iou": iou,
        "obj_iou_any": metrics.obj_iou_any(heat, all_masks),
        "contrast": con,
        "contrast_score": cs,
        "concentration": conc,
        "f3": metrics.f3(iou, cs, conc),
        "pointing": float(metrics.pointing_hit(heat, mask)),
    }


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {"n_words": 0}
    mean = {k: float(np.mean([r[k] for r in rows if np.isfinite(r[k])])) for k in rows[0]}
    mean["dataset_f3"] = metrics.dataset_f3([mean["obj_iou"], mean["contrast_score"], mean["concentration"]])
    mean["n_words"] = len(rows)
    return mean


def _maps_for(result, n_steps: int) -> dict[int, dict[str, np.ndarray]]:
    """Every method's map per word index, ablation presets recomputed from the raw maps."""
    function_raw = {w.word.index: w.maps["diffusion-cam-raw"] for w in result.words if w.word.is_function}
    content_ids = [t for w in result.words if not w.word.is_function for t in w.word.token_ids]
    repeat = 1.0 - len(set(content_ids)) / len(content_ids) if content_ids else 0.0
    out = {}
    for w in result.words:
        maps = dict(w.maps)
        raw = maps["diffusion-cam-raw"]
        others = [m for i, m in function_raw.items() if i != w.word.index]
        interference = np.mean(others, axis=0) if others else None
        for preset in ABLATION:
            maps[preset] = refine(raw, preset, n_steps=n_steps, interference=interference, repeat_share=repeat)
        out[w.word.index] = maps
    return out


def evaluate(adapter, samples, settings: CamSettings, methods: tuple[str, ...], rng_seed: int = 0):
    """Per-method metric rows over the samples' grounded words, plus timing and match counts."""
    rng = np.random.default_rng(rng_seed)
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    func_iou: list[float] = []
    t_gen, t_att = [], []
    matched = unmatched = 0
    for i, (s, gen, inputs) in enumerate(samples):
        t0 = time.perf_counter()
        result = attribute(adapter, inputs, gen, settings)
        t_att.append(time.perf_counter() - t0)
        maps = _maps_for(result, gen.n_steps) if "diffusion-cam-raw" in result.words[0].maps else {
            w.word.index: dict(w.maps) for w in result.words
        } if result.words else {}
        ref = answer_groundings(s)
        all_masks = [o.mask for o in s.objects]
        words = result.words
        for w in words:
            j = w.word.index
            if j >= len(ref) or ref[j][0] != w.word.text:
                unmatched += not w.word.is_function
                continue
            mask = ref[j][1]
            if mask is None:
                continue
            matched += 1
            for m in methods:
                heat = rng.random(result.grid) if m == "random" else maps[j][m]
                rows[m].append(word_metrics(np.asarray(heat, dtype=np.float64), mask, all_masks))
        f_maps = [maps[w.word.index]["diffusion-cam"] for w in words if w.word.is_function and "diffusion-cam" in maps.get(w.word.index, {})]
        c_maps = [maps[w.word.index]["diffusion-cam"] for w in words if not w.word.is_function and "diffusion-cam" in maps.get(w.word.index, {})]
        if f_maps and c_maps:
            func_iou.append(metrics.func_iou(f_maps, c_maps))
    table = {m: summarise(rows[m]) for m in methods}
    info = {
        "matched_words": matched,
        "unmatched_content_words": unmatched,
        "func_iou_diffusion_cam": float(np.mean(func_iou)) if func_iou else None,
        "attribution_s_median": median(t_att) if t_att else None,
    }
    return table, info


def generate_all(adapter, n: int, settings: CamSettings, synth: SynthSettings = SynthSettings()):
    out, t_gen = [], []
    for i, s in enumerate(make_samples(n, HELDOUT_SEED, synth)):
        t0 = time.perf_counter()
        inputs = adapter.prepare(Image.fromarray(s.image), s.prompt)
        gen = adapter.generate(inputs, replace(settings.generation, seed=settings.generation.seed + i))
        t_gen.append(time.perf_counter() - t0)
        out.append((s, gen, inputs))
    exact = float(np.mean([g.text == s.answer for s, g, _ in out])) if out else 0.0
    return out, {"generate_s_median": median(t_gen) if t_gen else None, "exact_match": exact}


def refine_timing(answers: list[tuple[list[np.ndarray], int]]) -> dict[str, float]:
    """Median time per map of refinement ("full") three ways, on real raw maps.

    `answers` holds each sample's raw maps (one per word) and its denoising steps. Timed:
    the literal per-pixel reference and `refine` one map per call, and `refine_stack` one
    answer per call (how `cam.explain` refines), its time shared by the answer's words.
    Each figure is the best of 3 runs. Per-map figures are medians, except
    `stack_ms_per_map_overall` = all stack time / all maps (the throughput a run sees:
    one-object answers of 3 words pay more per map).
    """
    import importlib.util

    ref_path = Path(__file__).resolve().parents[1] / "tests" / "literal_reference.py"
    spec = importlib.util.spec_from_file_location("literal_reference", ref_path)
    literal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(literal)
    def best_of(fn, repeat: int = 3) -> float:
        """Best of `repeat` wall-clock runs: the same rule for every implementation timed."""
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    fast, slow, stacked, per_answer = [], [], [], []
    for maps, n_steps in answers:
        for m in maps:
            fast.append(best_of(lambda: refine(m, "full", n_steps=n_steps)))
            slow.append(best_of(lambda: literal.refine_full(m, n_steps)))
        stack = np.stack(maps)
        per_answer.append(best_of(lambda: refine_stack(stack, "full", n_steps=n_steps)))
        stacked.append(per_answer[-1] / len(maps))
    return {
        "vectorised_ms": 1e3 * median(fast),
        "stack_ms_per_map": 1e3 * median(stacked),
        "stack_ms_per_answer": 1e3 * median(per_answer),
        "stack_ms_per_map_overall": 1e3 * sum(per_answer) / len(fast),
        "literal_ms": 1e3 * median(slow),
        "speedup": median(slow) / median(fast),
        "speedup_stack": median(slow) / median(stacked),
        "speedup_stack_overall": sum(slow) / sum(per_answer),
        "maps": len(fast),
        "answers": len(answers),
    }


METRIC_COLS = ("obj_iou", "obj_iou_any", "contrast", "concentration", "f3", "dataset_f3", "pointing", "n_words")


def format_table(table: dict[str, dict[str, float]], title: str) -> str:
    head = f"{'method':<20}" + "".join(f"{c:>14}" for c in METRIC_COLS)
    lines = [title, head, "-" * len(head)]
    for m, row in table.items():
        cells = []
        for c in METRIC_COLS:
            v = row.get(c)
            if v is None:
                cells.append(f"{'-':>14}")
            elif c == "n_words":
                cells.append(f"{int(v):>14d}")
            elif c == "contrast":
                cells.append(f"{v:>13.2f}x")
            else:
                cells.append(f"{100 * v:>14.2f}")
        lines.append(f"{m:<20}" + "".join(cells))
    return "\n".join(lines)


def main(n: int = 200, model: Path | None = None, json_out: Path | None = None, sweep: bool = True,
         sweep_n: int | None = None, echo=print) -> dict:
    from flows.paths import DEFAULT_MODEL

    model = Path(model or DEFAULT_MODEL)
    adapter = load_adapter(model)
    base = CamSettings()
    echo(f"model {model}; generating answers for {n} held-out synthetic images (seed {HELDOUT_SEED}) ...")
    samples, gen_info = generate_all(adapter, n, base)
    methods = ("random", "gradcam", "diffusion-cam-raw", *ABLATION, "diffusion-cam", "token-gradnorm")
    table, info = evaluate(adapter, samples, base, methods)
    out = {"model": str(model), "n_images": n, "settings": base.to_dict(), "generation": gen_info,
           "main": table, "main_info": info}
    echo(format_table(table, f"\nMethod table (layer {base.layer or adapter.default_layer}, distractor "
                             f"{base.distractor}, attribution step {base.attribution_step}); values ×100 except Contrast"))
    echo(f"generation: exact match {gen_info['exact_match']:.3f}, median {gen_info['generate_s_median']:.3f} s/sample; "
         f"attribution median {info['attribution_s_median']:.3f} s/sample; matched words {info['matched_words']}, "
         f"unmatched content words {info['unmatched_content_words']}; Func-IoU {info['func_iou_diffusion_cam']}")
    if sweep:
        sub = samples[: sweep_n or max(1, n // 2)]
        out["layer_sweep"] = {}
        for layer in adapter.valid_layers():
            t, _ = evaluate(adapter, sub, replace(base, layer=layer, methods=("gradcam", "diffusion-cam-raw", "diffusion-cam")),
                            ("gradcam", "diffusion-cam-raw", "diffusion-cam"))
            out["layer_sweep"][layer] = t
            echo(format_table(t, f"\nLayer {layer} ({len(sub)} images)"))
        out["distractor_sweep"] = {}
        for mode in ("previous", "others-mean", "none"):
            t, _ = evaluate(adapter, sub, replace(base, distractor=mode, methods=("diffusion-cam-raw", "diffusion-cam")),
                            ("diffusion-cam-raw", "diffusion-cam"))
            out["distractor_sweep"][mode] = t
            echo(format_table(t, f"\nDistractor {mode} ({len(sub)} images)"))
        t, _ = evaluate(adapter, sub, replace(base, attribution_step="final", methods=("diffusion-cam-raw", "diffusion-cam")),
                        ("diffusion-cam-raw", "diffusion-cam"))
        out["attribution_step_final"] = t
        echo(format_table(t, f"\nAttribution step final ({len(sub)} images)"))
    answers = []
    for s, gen, inputs in samples[:20]:
        r = attribute(adapter, inputs, gen, replace(base, methods=("diffusion-cam-raw",)))
        if r.words:
            answers.append(([w.maps["diffusion-cam-raw"].astype(np.float64) for w in r.words], gen.n_steps))
    if answers:
        out["refine_timing"] = rt = refine_timing(answers)
        share = 100 * rt["stack_ms_per_answer"] / 1e3 / info["attribution_s_median"]
        echo(f"\nrefine(full) per map ({rt['maps']} maps, {rt['answers']} answers): literal {rt['literal_ms']:.3f} ms; "
             f"refine {rt['vectorised_ms']:.3f} ms ({rt['speedup']:.1f}x); refine_stack per answer "
             f"{rt['stack_ms_per_map']:.3f} ms ({rt['speedup_stack']:.1f}x), all maps {rt['stack_ms_per_map_overall']:.3f} ms "
             f"(total literal / total stack time {rt['speedup_stack_overall']:.1f}x); whole answer {rt['stack_ms_per_answer']:.3f} ms = {share:.3f}% of the attribution pass")
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=2))
        echo(f"wrote {json_out}")
    return out
