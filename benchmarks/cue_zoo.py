"""Issue 17's cue zoo: build small models with known shortcuts, then judge the bias audit on
models its thresholds were not fitted to.

    python benchmarks/cue_zoo.py build --out models/zoo [--only NAME ...] [--device cuda]
        [--threads 1] [--include-expensive] [--steps N --n-train N]   (the last two: smoke runs only)
    python benchmarks/cue_zoo.py eval --json FILE [--zoo models/zoo] [--quick] [--cache DIR]
    python benchmarks/cue_zoo.py eval --add NAME ... --to FULL.json --json FILE   (a model built later)
    python benchmarks/cue_zoo.py list

The recipes, the fixed calibration / held-out split and its rule are in
`benchmarks/zoo/recipes.json`. `build` trains each recipe (`tasks.train_tiny`, data drawn in
memory), records the recipe in the checkpoint's `diffcam_tiny.json` (`zoo_recipe`), then
measures what the model really relies on — erase / paste the marker
(`benchmarks/cue_dependence.py`), swap objects in and out of the centre, count extra object
phrases the marker causes — and writes it to `ground_truth.json` in the zoo folder: the
ground truth the audit is judged against is that measurement, not the recipe.

`eval` audits the calibration models (the gates loosened, refuted suspects kept) and fits
the thresholds with `benchmarks/zoo_stats.fit_thresholds`, then audits the held-out models
with the fitted `BiasSettings` and writes the contract's JSON (`zoo_stats.heldout_metrics`).
Why the split is fixed in the recipes file: a threshold fitted where it is judged measures
nothing but the fit (docs/BIAS.md "The cue zoo").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import zoo_stats  # noqa: E402
from benchmarks.cue_dependence import control_image, count_dependence, free_box, generated_text  # noqa: E402
from diffcam_core.synthetic import (  # noqa: E402
    CueSpec,
    SynthSample,
    SynthSettings,
    cue_region,
    make_samples,
    object_words,
    swap_objects,
    vocabulary,
)

RECIPES = REPO / "benchmarks" / "zoo" / "recipes.json"
KINDS = ("cue", "clean", "centre", "marker_as_object")
SOURCES = ("train", "shipped", "recipe_only", "audit_only")
METHODS = ("diffusion-cam", "token-gradnorm", "token-gradxinput")
MOVING = "per-image"
# Salts of the per-sample generators that place a moving marker (training / audit data, paste test).
_PLACE_SALT, _PASTE_SALT = 1, 2
#: A marker-as-object audit whose model adds an object phrase with the marker in at least
#: this share of marker-carrying answers (ground truth) should get a hallucinated_object flag.
NAMES_MARKER_MIN = 0.2


# --------------------------------------------------------------------------- recipes


def load_recipes(path: Path = RECIPES) -> dict[str, Any]:
    """The recipes file, checked: unique names, known kinds / sources, references resolved."""
    rec = json.loads(Path(path).read_text())
    names = [e["name"] for e in rec["entries"]]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate entry names")
    by_name = {e["name"]: e for e in rec["entries"]}
    for e in rec["entries"]:
        if e["kind"] not in KINDS or e["source"] not in SOURCES or e["split"] not in ("calibration", "heldout"):
            raise ValueError(f"{path}: entry {e['name']}: bad kind / source / split")
        if e["source"] == "audit_only" and by_name.get(e.get("model"), {}).get("source") not in ("train", "shipped"):
            raise ValueError(f"{path}: entry {e['name']} audits unknown model {e.get('model')!r}")
    return rec


def split_by_rule(entries: list[dict[str, Any]]) -> dict[str, str]:
    """The split the recipes file's `split_rule` states, recomputed from the entries."""
    out: dict[str, str] = {}
    count: dict[str, int] = {}
    for e in entries:
        if e["source"] == "train":
            k = count.get(e["kind"], 0)
            count[e["kind"]] = k + 1
            out[e["name"]] = "heldout" if k % 2 == 0 else "calibration"
        elif e["source"] == "shipped":
            out[e["name"]] = "calibration"
        elif e["source"] == "recipe_only":
            out[e["name"]] = "heldout"
    for e in entries:
        if e["source"] == "audit_only":
            out[e["name"]] = out[e["model"]]
    return out


def entry_cue(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The marker an entry is audited with: its training cue, else its audit cue, else None."""
    return entry.get("cue") or entry.get("audit_cue")


def is_moving(cue: dict[str, Any] | None) -> bool:
    return cue is not None and cue.get("pos") == MOVING


def cue_spec(cue: dict[str, Any]) -> CueSpec:
    """A fixed-position cue as the synthetic generator's CueSpec."""
    if is_moving(cue):
        raise ValueError("a per-image marker is drawn by this module, not by CueSpec")
    return CueSpec.from_dict(cue)


def model_dir(entry: dict[str, Any], rec: dict[str, Any], zoo: Path) -> Path:
    """Where an entry's checkpoint lives (an audit-only entry uses its model's)."""
    if entry["source"] == "audit_only":
        entry = next(e for e in rec["entries"] if e["name"] == entry["model"])
    if entry["source"] == "shipped":
        return REPO / entry["path"]
    return Path(zoo) / entry["name"]


def size_limit_mb(entry: dict[str, Any], rec: dict[str, Any]) -> float:
    return float(entry.get("size_limit_mb", rec["size_limit_mb"]))


def build_command(name: str | None = None, zoo: Path | str = "models/zoo") -> str:
    only = f" --only {name}" if name else ""
    return f"python benchmarks/cue_zoo.py build --out {zoo}{only}"


# --------------------------------------------------------------------------- data


def _rgb(cue: dict[str, Any]) -> tuple[int, int, int]:
    return CueSpec(word=cue["word"], color=cue["color"]).rgb


def with_marker(sample: SynthSample, box: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> SynthSample:
    x0, y0, x1, y1 = box
    image = sample.image.copy()
    image[y0:y1, x0:x1] = rgb
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[y0:y1, x0:x1] = True
    return replace(sample, image=image, cue_present=True, cue_mask=mask)


def moving_cue_samples(n: int, seed: int, cue: dict[str, Any], settings: SynthSettings | None = None
                       ) -> list[SynthSample]:
    """Samples of the clean generator with a marker drawn at a per-image random free spot,
    with probability p when the answer has the cue word (the same rule as a fixed CueSpec).

    Why here and not in the generator: CueSpec holds one fixed position; this draws from a
    separate per-sample generator, so the underlying clean samples are unchanged.
    """
    settings = settings or SynthSettings()
    out = []
    for i, s in enumerate(make_samples(n, seed, settings)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i, _PLACE_SALT]))
        coin = float(rng.random())
        box = None
        if cue["word"] in s.answer.split() and coin < float(cue["p"]):
            box = free_box(s, int(cue["size"]), settings, rng)
        out.append(with_marker(s, box, _rgb(cue)) if box else s)
    return out


def centre_box(settings: SynthSettings) -> tuple[float, float, float, float]:
    """The central box the audit's centre-bias index uses: the middle half of each side (px)."""
    n = settings.image_size
    return (n / 4, n / 4, 3 * n / 4, 3 * n / 4)


def in_centre(obj, settings: SynthSettings) -> bool:
    x, y = obj.centroid
    x0, y0, x1, y1 = centre_box(settings)
    return x0 <= x < x1 and y0 <= y < y1


def centre_samples(n: int, seed: int, settings: SynthSettings | None = None, max_draws: int = 50) -> list[SynthSample]:
    """Centre-decided data: images where exactly one object's centroid lies in the central
    box; the answer names that object only, the others stay drawn but unnamed.

    A model trained on it is taught "say what sits in the centre": whatever it does on
    ordinary images, its answer is decided by position, which the centre-bias flag should
    see. Samples are the clean generator's, index by index, skipping those that do not
    qualify (at most ``max_draws`` × n draws)."""
    settings = settings or SynthSettings()
    out: list[SynthSample] = []
    i = 0
    while len(out) < n:
        if i >= max_draws * max(n, 1):
            raise ValueError(f"only {len(out)} centre samples in {i} draws")
        s = next(make_samples(1, seed, settings, start=i))
        i += 1
        inside = [o for o in s.objects if in_centre(o, settings)]
        if len(inside) != 1:
            continue
        o = inside[0]
        others = tuple(x for x in s.objects if x is not o)
        out.append(replace(s, objects=(o,), answer=f"a {o.color} {o.shape}", unnamed=(*s.unnamed, *others)))
    return out


def training_samples(entry: dict[str, Any], n: int, seed: int) -> tuple[list[SynthSample], SynthSettings]:
    """An entry's training data, drawn in memory (and the generator settings behind it)."""
    data, cue = entry["data"], entry.get("cue")
    if data == "fixed_cue":
        settings = SynthSettings(cue=cue_spec(cue))
        return list(make_samples(n, seed, settings)), settings
    settings = SynthSettings()
    if data == "moving_cue":
        return moving_cue_samples(n, seed, cue, settings), settings
    if data == "centre":
        return centre_samples(n, seed, settings), settings
    if data == "clean":
        return list(make_samples(n, seed, settings)), settings
    raise ValueError(f"{entry['name']}: unknown data kind {data!r}")


def audit_samples(entry: dict[str, Any], n: int, seed: int) -> tuple[list[SynthSample], SynthSettings]:
    """What an entry is audited on: ordinary images carrying its marker (none for centre models:
    the question there is where the model looks on ordinary images)."""
    cue = entry_cue(entry)
    if cue is None:
        settings = SynthSettings()
        return list(make_samples(n, seed, settings)), settings
    if is_moving(cue):
        return moving_cue_samples(n, seed, cue), SynthSettings()
    settings = SynthSettings(cue=cue_spec(cue))
    return list(make_samples(n, seed, settings)), settings


def write_samples(out_dir: Path, samples: list[SynthSample], seed: int, settings: SynthSettings,
                  extra: dict[str, Any] | None = None) -> Path:
    """A dataset folder in the layout `storage.synthetic_writer` writes (manifest, images,
    masks, dataset.json), from samples already drawn; each sample's ``cue_box`` is its own
    marker's box, so a per-image marker is recorded where it is."""
    from PIL import Image

    out = Path(out_dir)
    if (out / "manifest.jsonl").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent if out.parent.exists()
                                else _mkdir(out.parent)))
    (tmp / "images").mkdir()
    (tmp / "masks").mkdir()
    width = max(6, len(str(len(samples) - 1)))
    lines = []
    for i, s in enumerate(samples):
        sid = f"synth-{i:0{width}d}"
        Image.fromarray(s.image).save(tmp / f"images/{sid}.png")
        objects = []
        for k, obj in enumerate(s.objects):
            Image.fromarray(obj.mask.astype(np.uint8) * 255).save(tmp / f"masks/{sid}_{k}.png")
            objects += [{"word": w, "mask": f"masks/{sid}_{k}.png"} for w in object_words(obj)]
        box = None
        if s.cue_present and s.cue_mask is not None:
            ys, xs = np.nonzero(s.cue_mask)
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        lines.append(json.dumps({"sample_id": sid, "image": f"images/{sid}.png", "prompt": s.prompt,
                                 "objects": objects, "answer": s.answer, "cue_present": s.cue_present,
                                 "cue_box": box}, separators=(",", ":")))
    meta = {"generator": "benchmarks/cue_zoo.py", "format_version": 1, "seed": seed, "n": len(samples),
            "settings": settings.model_dump(mode="json"), "cue": None if settings.cue is None else settings.cue.to_dict(),
            "vocabulary": vocabulary(settings), **(extra or {})}
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------- ground truth


def moving_cue_dependence(adapter, samples: list[SynthSample], cue: dict[str, Any], settings: SynthSettings,
                          seed: int) -> dict[str, Any]:
    """`cue_dependence` for a per-image marker: erase each sample's own marker; paste one at a
    seeded free spot (`count_dependence`: the same counting rules)."""
    background = np.asarray(settings.background, dtype=np.uint8)

    def erase(i: int, s: SynthSample) -> np.ndarray:
        image = s.image.copy()
        image[s.cue_mask] = background
        return image

    def paste(i: int, s: SynthSample) -> np.ndarray | None:
        box = free_box(s, int(cue["size"]), settings, np.random.default_rng(np.random.SeedSequence([seed, i, _PASTE_SALT])))
        return None if box is None else with_marker(s, box, _rgb(cue)).image

    return count_dependence(generated_text(adapter), samples, cue["word"], erase=erase, paste=paste,
                            control=lambda i, s: control_image(s, s.cue_mask, settings, seed, i))


def extra_object_count(adapter, samples: list[SynthSample], settings: SynthSettings) -> dict[str, Any]:
    """How often the marker is read as an object of its own: among marker-carrying samples,
    answers that name more objects with the marker than with it erased (objects counted as
    the answer's "a" phrases)."""
    background = np.asarray(settings.background, dtype=np.uint8)
    says = generated_text(adapter)
    n = extra = 0
    for s in samples:
        if not s.cue_present:
            continue
        erased = s.image.copy()
        erased[s.cue_mask] = background
        with_it = says(s.image, s.prompt).split().count("a")
        without = says(erased, s.prompt).split().count("a")
        n += 1
        extra += with_it > without
    return {"marker_samples": n, "extra_object": extra, "extra_object_rate": extra / n if n else None}


def centre_dependence(adapter, samples: list[SynthSample], settings: SynthSettings) -> dict[str, Any]:
    """Does position decide what is named? For each image with one object in the central box
    and one outside, answer the image and the same image with the two swapped
    (`swap_objects`); compare how often an object is named at the centre vs. off it."""
    says = generated_text(adapter)
    at_centre = [0, 0]
    off_centre = [0, 0]
    for s in samples:
        inside = [k for k, o in enumerate(s.objects) if in_centre(o, settings)]
        outside = [k for k, o in enumerate(s.objects) if not in_centre(o, settings)]
        if not inside or not outside:
            continue
        i, j = inside[0], outside[0]
        sw = swap_objects(s, i, j, settings)
        if sw is None:
            continue
        a, b = s.objects[i], s.objects[j]
        before, after = says(s.image, s.prompt), says(sw.image, s.prompt)
        # (object, answer, where it sat in that image)
        for obj, text, where in ((a, before, at_centre), (b, after, at_centre), (b, before, off_centre),
                                 (a, after, off_centre)):
            where[0] += f"{obj.color} {obj.shape}" in text
            where[1] += 1
    rc = at_centre[0] / at_centre[1] if at_centre[1] else None
    ro = off_centre[0] / off_centre[1] if off_centre[1] else None
    return {"pairs": at_centre[1] // 2, "named_at_centre": rc, "named_off_centre": ro,
            "centre_gap": None if rc is None or ro is None else rc - ro}


def measure_ground_truth(adapter, entry: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """What the model does, measured on fresh images (seed `seeds.ground_truth`)."""
    from benchmarks.cue_dependence import cue_dependence

    n, seed = rec["audit"]["ground_truth_n"], rec["seeds"]["ground_truth"]
    t0 = time.perf_counter()
    out: dict[str, Any] = {"name": entry["name"], "kind": entry["kind"], "seed": seed, "n": n}
    cue = entry_cue(entry)
    if cue is not None:
        samples, settings = audit_samples(entry, n, seed)
        dep = (moving_cue_dependence(adapter, samples, cue, settings, seed) if is_moving(cue)
               else cue_dependence(adapter, samples, settings, seed))
        out["cue"] = cue
        out["cue_dependence"] = dep
        # reliance net of the control patch: an answer that flips under any flat patch is
        # fragile, not dependent on the marker. No control placed -> no net rate -> not
        # counted as relying (never the raw vanish rate in its place)
        net = dep["net_vanish_rate"]
        out["relies"] = bool(net is not None and dep["erased"] >= 10 and net >= rec["reliance_min"])
        if entry["kind"] == "marker_as_object":
            out["extra_objects"] = extra_object_count(adapter, samples, settings)
    if entry["kind"] in ("centre", "clean"):
        settings = SynthSettings()
        cd = centre_dependence(adapter, list(make_samples(n, seed, settings)), settings)
        out["centre_dependence"] = cd
        out["centre_biased"] = bool(cd["centre_gap"] is not None and cd["centre_gap"] >= rec["centre_gap_min"])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _update_json(path: Path, key: str, value: Any) -> None:
    """Set one key of a JSON file atomically, under a lock: two builds with disjoint --only
    lists (one per core or GPU) can share the zoo's ground_truth.json."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[key] = value
        tmp = path.with_suffix(f".json.part{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)


# --------------------------------------------------------------------------- build


def train_entry(entry: dict[str, Any], rec: dict[str, Any], out: Path, *, device: str = "cpu", threads: int = 1,
                steps: int | None = None, n_train: int | None = None, log=print) -> dict[str, Any]:
    """Train one recipe with `tasks.train_tiny` and save it with its recipe in `diffcam_tiny.json`."""
    from diffcam_core.models.tiny import TinyModelSpec
    from diffcam_core.synthetic import COLORS, SHAPES
    from tasks.train_tiny import TrainExample, TrainSettings, evaluate_answers, save_checkpoint, train_tiny

    sch = {**rec["schedule"], **entry.get("schedule", {})}  # an entry may override the zoo's schedule
    smoke = steps is not None or n_train is not None
    sch["steps"] = steps or sch["steps"]
    sch["n_train"] = n_train or sch["n_train"]
    t0 = time.perf_counter()
    samples, settings = training_samples(entry, sch["n_train"], entry["train_seed"])
    train = [TrainExample(s.image, s.prompt, s.answer) for s in samples]
    t_data = time.perf_counter() - t0
    # `init_from`: fine-tune an existing checkpoint (its architecture; the zoo's spec is for new models)
    init_from = REPO / entry["init_from"] if entry.get("init_from") else None
    spec = TinyModelSpec() if init_from else TinyModelSpec.from_overrides(rec["spec"])
    ts = TrainSettings(steps=sch["steps"], batch_size=sch["batch_size"], lr=sch["lr"], warmup=sch["warmup"],
                       seed=entry["seed"], threads=threads, device=device)
    adapter, info = train_tiny(train, vocabulary(settings), ts, spec=spec, init_from=init_from,
                               progress=lambda s, loss, acc: log(f"{entry['name']}: step {s} loss {loss:.3f} acc {acc:.3f}"))
    check, _ = training_samples({**entry, "data": "clean" if entry["data"] == "centre" else entry["data"]},
                                sch["n_check"], rec["seeds"]["check"])
    t_eval = time.perf_counter()
    ev = evaluate_answers(adapter, [TrainExample(s.image, s.prompt, s.answer) for s in check],
                          {"color": frozenset(COLORS), "shape": frozenset(SHAPES)})
    ev["eval_seconds"] = round(time.perf_counter() - t_eval, 1)
    record = {
        "train": info, "previous_stage": None,
        "dataset": {"path": f"(in memory: benchmarks/cue_zoo.py {entry['data']} data, seed {entry['train_seed']})",
                    "seed": entry["train_seed"], "n": len(train), "settings": settings.model_dump(mode="json"),
                    "cue": entry.get("cue"), "zoo_data": entry["data"]},
        "heldout": {"seed": rec["seeds"]["check"], "n": sch["n_check"]},
        "heldout_eval": ev,
        "zoo_recipe": {**entry, "spec": None if init_from else rec["spec"], "schedule": sch, "smoke": smoke},
        "zoo_timing": {"data_s": round(t_data, 1), "train_s": info["train_seconds"], "check_s": ev["eval_seconds"]},
    }
    save_checkpoint(adapter, out, record)
    size = (out / "model.safetensors").stat().st_size / 1e6
    record["zoo_timing"]["safetensors_mb"] = round(size, 3)
    (out / "diffcam_tiny.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    if size > size_limit_mb(entry, rec):
        log(f"WARNING {entry['name']}: {size:.2f} MB > limit {size_limit_mb(entry, rec)} MB")
    return record


def _build_in_parallel(a: argparse.Namespace, rec: dict[str, Any]) -> None:
    """``--jobs N``: the selected entries dealt round-robin (in file order) to N builds of
    their own, run side by side (each its own process and ``--threads``; they share
    ``ground_truth.json`` under its lock). For a GPU, where one tiny model leaves the device
    mostly idle; on a 2-core CPU use at most 2 jobs of 1 thread. Audit-only entries run after
    the trained ones, since they need their model."""
    import subprocess

    chosen = [e for e in rec["entries"] if not a.only or e["name"] in a.only]
    first = [e["name"] for e in chosen if e["source"] != "audit_only"]
    later = [e["name"] for e in chosen if e["source"] == "audit_only"]
    for names in (first, later):
        lists = [names[k::a.jobs] for k in range(a.jobs)]
        procs = []
        for k, only in enumerate(x for x in lists if x):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--recipes", str(a.recipes), "build", "--out",
                   str(a.out), "--device", a.device, "--threads", str(a.threads), "--only", *only]
            cmd += ["--retrain"] if a.retrain else []
            cmd += ["--include-expensive"] if a.include_expensive else []
            cmd += [] if a.steps is None else ["--steps", str(a.steps)]
            cmd += [] if a.n_train is None else ["--n-train", str(a.n_train)]
            log = a.out / f"build-job{k}.log"
            print(f"job {k}: {' '.join(only)} (log: {log})", flush=True)
            procs.append((subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO), log))
        failed = [str(log) for p, log in procs if p.wait() != 0]
        if failed:
            raise SystemExit(f"{len(failed)} build job(s) failed; see {', '.join(failed)}")


def cmd_build(a: argparse.Namespace) -> None:
    import torch

    from diffcam_core.models.base import load_adapter

    torch.set_num_threads(a.threads)
    rec = load_recipes(a.recipes)
    names = {e["name"] for e in rec["entries"]}
    unknown = sorted(set(a.only or ()) - names)
    if unknown:
        raise SystemExit(f"unknown zoo entries {unknown}; `python benchmarks/cue_zoo.py list` lists them")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.jobs > 1:
        return _build_in_parallel(a, rec)
    gt_path = a.out / "ground_truth.json"
    for e in rec["entries"]:
        if a.only and e["name"] not in a.only:
            continue
        t0 = time.perf_counter()
        mdir = model_dir(e, rec, a.out)
        if e["source"] == "recipe_only":
            if not a.include_expensive:
                print(f"{e['name']}: skipped (recipe only: {e['cost_note']}; --include-expensive builds it)")
                continue
            import subprocess

            cmd = [sys.executable, *e["command"][:1], "--out", str(mdir), *e["command"][1:]]
            if a.device != "cpu":
                cmd += ["--device", a.device]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=REPO)
        elif e["source"] == "train":
            if (mdir / "config.json").is_file() and not a.retrain:
                print(f"{e['name']}: {mdir} exists, not retrained (--retrain to redo)")
            else:
                train_entry(e, rec, mdir, device=a.device, threads=a.threads, steps=a.steps, n_train=a.n_train)
        if not (mdir / "config.json").is_file():
            raise SystemExit(f"{e['name']}: no checkpoint at {mdir}; build its model first: "
                             f"{build_command(e.get('model'), a.out)}")
        gt = measure_ground_truth(load_adapter(mdir, device=a.device), e, rec)
        gt["model_dir"] = str(mdir)
        gt["build_seconds"] = round(time.perf_counter() - t0, 1)
        _update_json(gt_path, e["name"], gt)
        print(json.dumps(gt), flush=True)
    # git-ignored, outside the zoo's budget: cache-only recipes and the recipe-only known miss
    cached = {e["name"] for e in rec["entries"] if e.get("cache_only") or e["source"] == "recipe_only"}
    sizes = {p.parent.name: p.stat().st_size for p in a.out.glob("*/model.safetensors")}
    kept = [v for k, v in sizes.items() if k not in cached]
    print(f"zoo: {len(kept)} checkpoints, {sum(kept) / 1e6:.1f} MB of safetensors (limit {rec['zoo_limit_mb']} MB)"
          + (f"; outside the budget (git-ignored): {sorted(set(sizes) & cached)}" if set(sizes) & cached else ""))


# --------------------------------------------------------------------------- eval


def _norm_box(box: list[int] | tuple[int, ...], n: int) -> list[float]:
    return [v / n for v in box]


def entry_cue_box(entry: dict[str, Any]) -> list[float] | None:
    """The marker's box in normalised coordinates; None for a per-image marker or no marker."""
    cue = entry_cue(entry)
    if cue is None or is_moving(cue):
        return None
    settings = SynthSettings(cue=cue_spec(cue))
    return _norm_box(cue_region(settings), settings.image_size)


def _parse_region(text: str | None) -> list[float] | None:
    return None if not text else [float(v) for v in text.split(",")]


def calibration_settings():
    """The calibration audit: every saliency gate at half its default, refuted suspects kept
    (their counterfactual numbers are the negatives), no per-sample counterfactual."""
    from diffcam_core.bias_settings import BiasSettings

    d = BiasSettings()
    return d.with_(cluster_enrichment_min=d.cluster_enrichment_min / 2,
                   cluster_consistency_min=d.cluster_consistency_min / 2,
                   cluster_specificity_min=d.cluster_specificity_min / 2,
                   keep_refuted=True, region_cf_max_samples=0)


def cf_diff(evidence: dict[str, Any]) -> float | None:
    """The counterfactual's deciding difference: max(persist − persist_both, vanish − vanish_control)."""
    cf = evidence.get("counterfactual") or {}
    parts = [(cf.get("persist"), cf.get("persist_both")), (cf.get("vanish"), cf.get("vanish_control"))]
    vals = [a - b for a, b in parts if a is not None and b is not None]
    return max(vals) if vals else None


def calibration_stats(entry: dict[str, Any], rows: list[dict[str, Any]], centre: dict | None,
                      truth: dict[str, Any]) -> dict[str, Any]:
    """One calibration audit reduced to what `zoo_stats.fit_thresholds` needs."""
    cue = entry_cue(entry)
    model = {"cue_word": None if cue is None else cue["word"], "cue_box": entry_cue_box(entry)}
    cue_cands, others = [], []
    for r in rows:
        if r["sample_id"] is not None or r["kind"] != "clever_hans":
            continue
        ev = json.loads(r["evidence_json"])
        flag = {"kind": r["kind"], "word": r["word"], "region": _parse_region(r["region"]), "confirmed": None}
        if ev.get("found_by") == "scan":
            # a scan suspect has no saliency statistics (its score is a hit rate) for the saliency
            # gates; off the cue, its counterfactual difference is one more negative
            if not (entry["kind"] == "cue" and zoo_stats.is_cue_flag(flag, model)):
                others.append(cf_diff(ev))
            continue
        stats = {"cluster_enrichment": ev.get("cluster_enrichment"), "consistency": ev.get("consistency"),
                 "specificity": ev.get("specificity"), "cf_diff": cf_diff(ev), "score": r["score"],
                 "word": r["word"], "method": r["method"], "region": r["region"]}
        if entry["kind"] == "cue" and zoo_stats.is_cue_flag(flag, model):
            cue_cands.append(stats)  # the cue itself, seen by one or more methods
        else:
            others.append(stats["cf_diff"])
    best = max(cue_cands, key=lambda c: c["score"] or 0.0) if cue_cands else None
    scores = [st["score"] for st in (centre or {}).values() if st]
    return {"name": entry["name"], "kind": entry["kind"], "relies": truth.get("relies", False),
            "centre_biased": truth.get("centre_biased", False), "cue_candidate": best,
            "other_cf_diffs": [v for v in others if v is not None],
            "centre_score": max(scores) if scores else None}


def centre_summary(centre: dict | None) -> dict[str, Any] | None:
    """What the run-level centre flags were decided on, kept for every held-out model (flagged
    or not): each method's map score against the objects' prior, and the naming test's z and gap."""
    from diffcam_core.bias_centre import naming_z

    stats = {m: st for m, st in sorted((centre or {}).items()) if st}
    if not stats:
        return None
    st = next(iter(stats.values()))
    counts = [int(st[k]) for k in ("central_named", "central_objects", "off_centre_named", "off_centre_objects")]
    z = naming_z(*counts)
    return {"map_scores": {m: v.get("score") for m, v in stats.items()},
            "naming_z": None if z is None else round(z, 3), "naming_gap": st.get("naming_gap"),
            "named": dict(zip(("central_named", "central_objects", "off_centre_named", "off_centre_objects"), counts))}


def cue_word_trace(word: str | None, scan: dict | str | None, refuted: list[dict] | None) -> dict[str, Any] | None:
    """What the audit did with the cue word, so a miss can be explained with numbers: the
    discovery scan's record for the word (skipped and why, or images scanned and candidate
    windows found) and the word's suspects that the counterfactual refuted."""
    if word is None:
        return None
    return {"scan": scan.get(word, "the word was in no answer's maps") if isinstance(scan, dict) else scan,
            "refuted": [r for r in (refuted or []) if str(r.get("word", "")).lower() == word]}


def heldout_result(entry: dict[str, Any], rows: list[dict[str, Any]], cue_ids: set[str], universe: set[str],
                   truth: dict[str, Any], centre: dict | None = None, scan: dict | str | None = None,
                   refuted: list[dict] | None = None) -> dict[str, Any]:
    """One held-out audit reduced to what `zoo_stats.heldout_metrics` needs (plus, for the
    reader, the centre statistics behind the run-level flags and the cue word's trace)."""
    cue = entry_cue(entry)
    flags = [{"kind": r["kind"], "word": r["word"], "method": r["method"], "region": _parse_region(r["region"]),
              "confirmed": r["confirmed"], "score": r["score"]} for r in rows if r["sample_id"] is None]
    # a sample whose own counterfactual says it names the marker as an object is not a shortcut finding
    flagged = {r["sample_id"] for r in rows if r["kind"] == "suspect_region"
               and json.loads(r["evidence_json"]).get("verdict") != "named_as_object"}
    relies = bool(truth.get("relies")) and entry["kind"] == "cue"
    sample = ({"tp": len(flagged & cue_ids), "fp": len(flagged - cue_ids), "fn": len((cue_ids & universe) - flagged)}
              if relies else {"tp": 0, "fp": len(flagged), "fn": 0})
    return {"name": entry["name"], "kind": entry["kind"], "relies": relies, "cue_word": None if cue is None else cue["word"],
            "cue_box": entry_cue_box(entry), "dataset_flags": flags, "sample_level": sample,
            "centre_biased": truth.get("centre_biased"),
            "names_marker": ((truth.get("extra_objects") or {}).get("extra_object_rate") or 0.0) >= NAMES_MARKER_MIN,
            "centre": centre_summary(centre),
            "cue_word_trace": cue_word_trace(None if cue is None else cue["word"], scan, refuted)}


def audit_entry(entry: dict[str, Any], rec: dict[str, Any], zoo: Path, cache: Path, seed: int, n: int, settings,
                *, device: str, threads: int, log) -> dict[str, Any]:
    """Audit one entry in-process (the machinery `benchmarks/bench_bias.py` uses) and run the
    bias step with ``settings``; returns the flags rows and what the reducers need."""
    from diffcam_core.settings import CamSettings
    from storage.datasets import load_dataset
    from storage.store import Store
    from tasks.audit_in_process import audit_in_process
    from tasks.bias import run_dataset_flags

    mdir = model_dir(entry, rec, zoo)
    samples, synth = audit_samples(entry, n, seed)
    key = hashlib.sha256(json.dumps([entry.get("data"), entry_cue(entry)], sort_keys=True).encode()).hexdigest()[:8]
    ds_dir = write_samples(cache / "data" / f"{entry['name']}-seed{seed}-n{n}-{key}", samples, seed, synth)
    store = Store(cache / "store" / entry["name"])  # one store per entry: parallel audits share nothing
    run_id = f"{entry['name']}-seed{seed}-n{n}"
    if run_id in store.runs():
        shutil.rmtree(store.run_dir(run_id))
    t0 = time.perf_counter()
    audit_in_process(store, run_id, mdir, ds_dir, CamSettings(methods=METHODS), threads=threads, device=device, log=log)
    t1 = time.perf_counter()
    info: dict[str, Any] = {}
    rows = run_dataset_flags(store, run_id, mdir, ds_dir, settings, sample_level="always", device=device, log=log,
                             info=info)
    ds = load_dataset(ds_dir)
    cue_ids = {s.sample_id for s in ds.samples if s.extra.get("cue_present")}
    out = {"rows": rows, "cue_ids": cue_ids, "universe": {s.sample_id for s in ds.samples}, "centre": info.get("centre"),
           "scan": info.get("scan"), "refuted": info.get("refuted"),
           "seconds": {"audit": round(t1 - t0, 1), "bias_step": round(time.perf_counter() - t1, 1)}}
    return out


def missing_entries(entries: list[dict[str, Any]], rec: dict[str, Any], zoo: Path) -> dict[str, str]:
    """Entry name -> what is missing for it and the command that builds it."""
    gt_path = Path(zoo) / "ground_truth.json"
    truth = json.loads(gt_path.read_text()) if gt_path.is_file() else {}
    problems = {}
    for e in entries:
        mdir = model_dir(e, rec, zoo)
        if not (mdir / "config.json").is_file():
            problems[e["name"]] = (f"model folder {mdir} is missing: {build_command(e.get('model', e['name']), zoo)}"
                                   + (" --include-expensive" if e["source"] == "recipe_only" else ""))
        elif e["name"] not in truth:
            problems[e["name"]] = f"no ground truth for {e['name']} in {gt_path}: {build_command(e['name'], zoo)}"
    return problems


def require_zoo(entries: list[dict[str, Any]], rec: dict[str, Any], zoo: Path) -> dict[str, Any]:
    """Every model folder and ground-truth record the evaluation needs, or SystemExit naming
    what is missing and the command that builds it."""
    problems = missing_entries(entries, rec, zoo)
    if problems:
        raise SystemExit("the cue zoo is not built:\n  " + "\n  ".join(problems.values())
                         + "\n(--allow-missing evaluates the built models and lists the others in the JSON)")
    gt_path = Path(zoo) / "ground_truth.json"
    return json.loads(gt_path.read_text()) if gt_path.is_file() else {}


def _audit_in_worker(args: tuple) -> dict[str, Any]:
    """One `audit_entry` in a worker process of `evaluate(jobs=N)` (log lines prefixed with the entry)."""
    import torch

    entry, rec, zoo, cache, seed, n, settings, device, threads = args
    torch.set_num_threads(threads)
    return audit_entry(entry, rec, zoo, cache, seed, n, settings, device=device, threads=threads,
                       log=lambda msg: print(f"[{entry['name']}] {msg}", file=sys.stderr, flush=True))


def _audit_all(audit, entries, rec, zoo, cache, seed, n, settings, *, device, threads, log, jobs):
    """`audit` of every entry, in order; with ``jobs`` > 1 (and the real `audit_entry`) in that
    many worker processes of ``threads`` each: on a small CPU two 1-thread audits of tiny
    models run about twice as fast as one 2-thread audit."""
    if jobs <= 1 or audit is not audit_entry:
        return [audit(e, rec, zoo, cache, seed, n, settings, device=device, threads=threads, log=log) for e in entries]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_audit_in_worker,
                             [(e, rec, zoo, cache, seed, n, settings, device, threads) for e in entries]))


def evaluate(rec: dict[str, Any], zoo: Path, cache: Path, *, quick: bool, device: str, threads: int,
             audit=None, log=None, allow_missing: bool = False, jobs: int = 1) -> dict[str, Any]:
    """Fit on calibration entries, judge on held-out entries; the contract's JSON.

    ``audit`` (default `audit_entry`) is injectable so the tests can run the whole
    evaluation on scripted per-model results without training or auditing a model.
    ``allow_missing``: entries not built are left out of both splits and listed, with the
    command that builds them, under ``not_built`` (never silently).
    """
    from diffcam_core.bias_settings import BiasSettings

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    audit = audit or audit_entry
    entries = rec["entries"]
    if quick:
        keep = set(rec["quick"]["calibration"]) | set(rec["quick"]["heldout"])
        entries = [e for e in entries if e["name"] in keep]
    not_built = missing_entries(entries, rec, zoo) if allow_missing else {}
    entries = [e for e in entries if e["name"] not in not_built]
    calib = [e for e in entries if e["split"] == "calibration"]
    held = [e for e in entries if e["split"] == "heldout"]
    truth = require_zoo(entries, rec, zoo)
    n = rec["audit"]["quick_n"] if quick else rec["audit"]["n"]
    cs, hs = rec["seeds"]["calibration_audit"], rec["seeds"]["heldout_audit"]
    t0 = time.perf_counter()
    cal_res = _audit_all(audit, calib, rec, zoo, cache, cs, n, calibration_settings(), device=device,
                         threads=threads, log=log, jobs=jobs)
    cal_stats = [calibration_stats(e, res["rows"], res.get("centre"), truth[e["name"]]) for e, res in zip(calib, cal_res)]
    defaults = BiasSettings()
    fit = zoo_stats.fit_thresholds(cal_stats, {k: getattr(defaults, k) for k in zoo_stats.THRESHOLDS})
    fitted = defaults.with_(**fit["values"])
    held_res = _audit_all(audit, held, rec, zoo, cache, hs, n, fitted, device=device, threads=threads, log=log,
                          jobs=jobs)
    results = [heldout_result(e, res["rows"], res["cue_ids"], res["universe"], truth[e["name"]], res.get("centre"),
                              res.get("scan"), res.get("refuted"))
               for e, res in zip(held, held_res)]
    return {
        "heldout": zoo_stats.heldout_metrics(results),
        "calibration": {"models": [e["name"] for e in calib], "seeds": [cs], "n_samples_per_model": n,
                        "thresholds": fit, "threshold_roles": zoo_stats.THRESHOLDS, "per_model": cal_stats},
        "heldout_models": [e["name"] for e in held], "heldout_seed": hs, "per_model": results,
        "quick": quick, "seconds": round(time.perf_counter() - t0, 1), "jobs": jobs,
        "audit_seconds": {e["name"]: r.get("seconds") for e, r in zip([*calib, *held], [*cal_res, *held_res])},
        "not_built": not_built,
    }


def evaluate_added(rec: dict[str, Any], zoo: Path, cache: Path, previous: dict[str, Any], names: list[str], *,
                   device: str, threads: int, audit=None, log=None, jobs: int = 1) -> dict[str, Any]:
    """Add held-out models to a full evaluation without redoing it.

    The thresholds are a function of the calibration split alone, so a held-out model built
    after an evaluation is judged with the thresholds that evaluation fitted (read back from
    ``previous``, the JSON `evaluate` wrote), on the same seed and number of images; the
    held-out figures are then recomputed over the previous held-out results plus the new
    ones. Calibration entries cannot be added this way (they would change the fit: run the
    full `eval`), nor quick evaluations, nor models already judged."""
    from diffcam_core.bias_settings import BiasSettings

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    audit = audit or audit_entry
    by_name = {e["name"]: e for e in rec["entries"]}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise SystemExit(f"unknown zoo entries {unknown}; `python benchmarks/cue_zoo.py list` lists them")
    if previous.get("quick"):
        raise SystemExit("--add extends a full evaluation; the --to file is a --quick one")
    calib = sorted(n for n in names if by_name[n]["split"] != "heldout")
    if calib:
        raise SystemExit(f"{calib} are calibration entries: adding one changes the fitted thresholds, so run the "
                         "full `eval` instead")
    done = sorted(set(names) & set(previous["heldout_models"]))
    if done:
        raise SystemExit(f"{done} are already judged in the --to file")
    entries = [by_name[n] for n in names]
    truth = require_zoo(entries, rec, zoo)
    n, hs = previous["calibration"]["n_samples_per_model"], previous["heldout_seed"]
    fitted = BiasSettings().with_(**previous["calibration"]["thresholds"]["values"])
    t0 = time.perf_counter()
    res = _audit_all(audit, entries, rec, zoo, cache, hs, n, fitted, device=device, threads=threads, log=log,
                     jobs=jobs)
    added = [heldout_result(e, r["rows"], r["cue_ids"], r["universe"], truth[e["name"]], r.get("centre"),
                            r.get("scan"), r.get("refuted")) for e, r in zip(entries, res)]
    results = [*previous["per_model"], *added]
    return {
        **previous,
        "heldout": zoo_stats.heldout_metrics(results),
        "heldout_models": [*previous["heldout_models"], *names],
        "per_model": results,
        "audit_seconds": {**previous.get("audit_seconds", {}), **{e["name"]: r.get("seconds")
                                                                   for e, r in zip(entries, res)}},
        "not_built": {k: v for k, v in previous.get("not_built", {}).items() if k not in names},
        "added": [*previous.get("added", []),
                  {"models": names, "seconds": round(time.perf_counter() - t0, 1),
                   "thresholds": "the calibration thresholds recorded in this file (not refitted)"}],
    }


def cmd_eval(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    rec = load_recipes(a.recipes)
    if bool(a.add) != bool(a.to):
        raise SystemExit("--add NAME ... and --to FILE go together: the held-out models to judge, and the full "
                         "evaluation whose thresholds judge them")
    if a.add:
        if a.quick or a.allow_missing:
            raise SystemExit("--add takes neither --quick nor --allow-missing")
        if not a.to.is_file():
            raise SystemExit(f"--to {a.to}: no such evaluation file (write one with `eval --json`)")
        out = evaluate_added(rec, a.zoo, a.cache, json.loads(a.to.read_text()), a.add, device=a.device,
                             threads=a.threads, jobs=a.jobs)
    else:
        out = evaluate(rec, a.zoo, a.cache, quick=a.quick, device=a.device, threads=a.threads,
                       allow_missing=a.allow_missing, jobs=a.jobs)
    for name, why in out["not_built"].items():
        print(f"NOT EVALUATED {name}: {why}", file=sys.stderr)
    text = json.dumps(out, indent=1, default=str)
    a.json.write_text(text)
    print(json.dumps(out["heldout"], indent=1))


def cmd_list(a: argparse.Namespace) -> None:
    rec = load_recipes(a.recipes)
    for e in rec["entries"]:
        cue = entry_cue(e)
        print(f"{e['split']:<11} {e['kind']:<16} {e['source']:<11} {e['name']:<30} "
              f"{'' if cue is None else json.dumps(cue)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", type=Path, default=RECIPES)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the zoo and measure each model's reliance (ground_truth.json)")
    b.add_argument("--out", type=Path, default=REPO / "models" / "zoo")
    b.add_argument("--only", nargs="+", default=None, metavar="NAME")
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--retrain", action="store_true", help="retrain models whose folder exists")
    b.add_argument("--jobs", type=int, default=1,
                   help="builds run side by side, entries dealt round-robin (a GPU: 8; this 2-core CPU: 2)")
    b.add_argument("--include-expensive", action="store_true", help="also run recipe-only entries (the known miss)")
    b.add_argument("--steps", type=int, default=None, help="smoke runs only (recorded as smoke)")
    b.add_argument("--n-train", type=int, default=None, help="smoke runs only (recorded as smoke)")
    b.set_defaults(func=cmd_build)
    e = sub.add_parser("eval", help="fit thresholds on calibration models, report on held-out ones")
    e.add_argument("--json", type=Path, required=True)
    e.add_argument("--zoo", type=Path, default=REPO / "models" / "zoo")
    e.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "diffcam-cue-zoo")
    e.add_argument("--quick", action="store_true", help="the fixed subset in recipes.json `quick`")
    e.add_argument("--jobs", type=int, default=1,
                   help="audits run side by side in worker processes of --threads each (this 2-core CPU: 2 x 1)")
    e.add_argument("--allow-missing", action="store_true",
                   help="evaluate the models that are built; list the others (and how to build them) under not_built")
    e.add_argument("--add", nargs="+", default=None, metavar="NAME",
                   help="judge these held-out models (built after the --to evaluation) with the thresholds that "
                        "evaluation fitted, and recompute its held-out figures; the result goes to --json")
    e.add_argument("--to", type=Path, default=None, metavar="FILE", help="the full evaluation --add extends")
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=1)
    e.set_defaults(func=cmd_eval)
    sub.add_parser("list", help="the recipes and their split").set_defaults(func=cmd_list)
    a = ap.parse_args(argv)
    a.func(a)


if __name__ == "__main__":
    main()
