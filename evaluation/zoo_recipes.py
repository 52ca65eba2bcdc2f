"""The cue zoo's recipes and ground truth: small models with known shortcuts, and what each
really relies on.

The recipes, the fixed calibration / held-out split and its rule are in
`benchmarks/zoo/recipes.json`. `train_entry` trains one recipe (`diffcam.training.gemma`, data
drawn in memory) and records it in the checkpoint's `diffcam_tiny.json` (`zoo_recipe`);
`measure_ground_truth` measures what the model really relies on — erase / paste the marker
(`diffcam.evaluation.cue_dependence`), swap objects in and out of the centre, count extra object
phrases the marker causes. The ground truth the audit is judged against is that measurement,
not the recipe. Command line: `benchmarks/cue_zoo.py build`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from diffcam.core.methods import methods_for
from diffcam.core.synthetic import (
    CueSpec,
    SynthSample,
    SynthSettings,
    make_samples,
    object_words,
    swap_objects,
    vocabulary,
)
from diffcam.evaluation.cue_dependence import control_image, count_dependence, free_box, generated_text
from diffcam.flows.paths import REPO_ROOT as REPO

RECIPES = REPO / "benchmarks" / "zoo" / "recipes.json"
KINDS = ("cue", "clean", "centre", "marker_as_object")
SOURCES = ("train", "shipped", "recipe_only", "audit_only")
METHODS = methods_for("bias-dataset")  # the maps the bias audit reads
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
    return CueSpec.model_validate(cue)


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
    """A dataset folder in the layout `diffcam.storage.synthetic_writer` writes (manifest, images,
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
            "settings": settings.model_dump(mode="json"),
            "cue": None if settings.cue is None else settings.cue.model_dump(mode="json"),
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
    from diffcam.evaluation.cue_dependence import cue_dependence

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


def update_json(path: Path, key: str, value: Any) -> None:
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
    """Train one recipe with `diffcam.training.gemma` and save it with its recipe in `diffcam_tiny.json`."""
    from diffcam.core.synthetic import COLORS, SHAPES
    from diffcam.training.gemma import TrainExample, TrainSettings, evaluate_answers, save_checkpoint, train_tiny
    from diffcam.training.tiny_gemma import TinyModelSpec

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
    spec = TinyModelSpec() if init_from else TinyModelSpec.model_validate(rec["spec"])
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
