"""Soak: a long audit under injected faults must end with nothing lost and nothing duplicated.

    .venv/bin/python benchmarks/soak.py [--n 200] [--driver-kills 3] [--worker-kills 4]
        [--external-worker-kills 2] [--poison 1] [--oom 1] [--workers 2] [--shard-size 8]
        [--seed 0] [--no-reference] [--keep DIR] [--json FILE]

What it does (docs/RELIABILITY.md § 6):

1. writes a synthetic dataset of ``--n`` samples and spoils it with a few hostile inputs:
   a truncated PNG, a text file named .png, an animated GIF, a mask with unknown labels
   (found by the workers), and three manifest lines (a path escaping the root, a duplicate
   id, a blank prompt) — each must end as a failure row with its reason;
2. injects faults through ``DIFFCAM_FAULTS`` (TEST-ONLY, tasks/worker.py): ``--worker-kills``
   samples SIGKILL their worker once, ``--poison`` samples kill it every time (must end as
   ``worker`` failures after a bounded number of attempts), ``--oom`` samples raise
   ``torch.OutOfMemoryError``; and ``--external-worker-kills`` times it SIGKILLs a random
   CamWorker process from outside, as the kernel's OOM killer would;
3. runs ``diffcam audit`` and SIGKILLs its whole process group (driver, Ray, Prefect's
   temporary server) ``--driver-kills`` times at random points — the first during start-up
   (random 1-12 s), the others each after a new shard commit plus a random 0-3 s — and then
   resumes it with the same ``--run-id`` until it finishes;
4. checks: every manifest line is in exactly one of samples / failures (rows lost = manifest
   lines in neither, duplicates = lines in both or twice + duplicate token_maps keys), every
   expected failure has its reason and nothing else failed, the run passed validation; and
   (unless ``--no-reference``) the final tables equal those of an uninterrupted run without
   the kill faults — samples and token_maps byte for byte except the timing columns;
   failures on (sample_id, stage, error_class): a poison sample's message quotes Ray's
   error text, which names process ids.

Prints a JSON report (``--json`` also writes it). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
VOLATILE = {"t_generate_s", "t_attribution_s", "t_total_s"}


def build_dataset(out: Path, n: int, rng: random.Random) -> tuple[Path, dict[str, str]]:
    """Synthetic dataset + hostile inputs; returns (root, {failure key: expected reason prefix})."""
    from diffcam.storage.synthetic_writer import write_synthetic_dataset

    root = write_synthetic_dataset(out, n, 0)
    lines = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    victims = rng.sample(range(n), 4)
    expected: dict[str, str] = {}
    def img(i: int) -> Path:
        return root / lines[i]["image"]

    data = img(victims[0]).read_bytes()
    img(victims[0]).write_bytes(data[: len(data) // 2])
    expected[lines[victims[0]]["sample_id"]] = "[load/truncated]"
    img(victims[1]).write_text("not an image\n")
    expected[lines[victims[1]]["sample_id"]] = "[load/not-an-image]"
    base = Image.open(img(victims[2])).convert("RGB")
    buf = io.BytesIO()
    base.save(buf, "GIF", save_all=True, append_images=[base.rotate(90)])
    img(victims[2]).write_bytes(buf.getvalue())  # an animated GIF named .png
    expected[lines[victims[2]]["sample_id"]] = "[load/animated]"
    m = lines[victims[3]]
    if m["objects"]:
        mask = root / m["objects"][0]["mask"]
        a = np.array(Image.open(mask))
        Image.fromarray((a > 0).astype(np.uint8) * 2 + 1).save(mask)  # labels 1/3
        expected[m["sample_id"]] = "[mask/unknown-labels]"
    extra = [
        {"sample_id": "escape", "image": "../../etc/passwd", "prompt": "describe the image"},
        {**lines[0], "image": lines[1]["image"]},  # duplicate id
        {"sample_id": "blank-prompt", "image": lines[0]["image"], "prompt": " "},
    ]
    expected["escape"] = "[load/unsafe-path]"
    expected[f"line:{n + 2}"] = "[load/duplicate-id]"
    expected["blank-prompt"] = "[load/bad-prompt]"
    with open(root / "manifest.jsonl", "a") as fh:
        fh.write("".join(json.dumps(e) + "\n" for e in extra))
    return root, expected


def _run_workers(driver_pid: int) -> list[psutil.Process]:
    """The CamWorker actor processes of one driver: its descendants (driver → raylet → workers;
    Ray gives each worker a process group of its own, so the group does not find them)."""
    try:
        procs = psutil.Process(driver_pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in procs:
        try:
            if "CamWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def _commits(store: Path, run_id: str) -> int:
    d = store / "runs" / f"run_id={run_id}" / "_commits"
    return len(list(d.glob("shard=*.json"))) if d.is_dir() else 0


def run_attempt(cmd: list[str], env: dict[str, str], store: Path, run_id: str, *, kill: str | None,
                rng: random.Random, external_kills: int, log) -> dict[str, Any]:
    """One `diffcam audit` process; ``kill``: None (run to the end), "startup" or "after-commit"."""
    t0 = time.monotonic()
    before = _commits(store, run_id)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    stop = threading.Event()
    ext: list[int] = []

    def external_killer() -> None:  # SIGKILL random CamWorker processes of this run, as the OOM killer would
        while len(ext) < external_kills and not stop.wait(rng.uniform(4.0, 10.0)):
            workers = _run_workers(proc.pid)
            if workers and _commits(store, run_id) > before:
                victim = rng.choice(workers)
                try:
                    victim.send_signal(signal.SIGKILL)
                    ext.append(victim.pid)
                    log(f"  external SIGKILL of worker pid {victim.pid}")
                except psutil.Error:
                    pass

    th = threading.Thread(target=external_killer, daemon=True)
    th.start()
    info: dict[str, Any] = {"kill": kill}
    try:
        if kill == "startup":
            delay = rng.uniform(1.0, 12.0)
            deadline = time.monotonic() + delay
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            info["delay_s"] = round(delay, 2)
        elif kill == "after-commit":
            while proc.poll() is None and _commits(store, run_id) <= before:
                time.sleep(0.05)
            delay = rng.uniform(0.0, 3.0)
            time.sleep(delay)
            info["delay_s"] = round(delay, 2)
        if kill is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            info["killed"] = True
        _, err = proc.communicate()
    finally:
        stop.set()
        th.join(timeout=1)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a finished or killed run (its Ray)
        except ProcessLookupError:
            pass
    info.update(rc=proc.returncode, seconds=round(time.monotonic() - t0, 1), external_worker_kills=len(ext),
                commits=_commits(store, run_id))
    if proc.returncode not in (0, -signal.SIGKILL):
        info["stderr_tail"] = (err or "")[-2000:]
    return info


def comparable(st, run_id: str) -> dict[str, list]:
    from diffcam.storage.schemas import KEYS

    out = {}
    for name in ("samples", "token_maps"):
        rows = [{k: v for k, v in r.items() if k not in VOLATILE | {"run_id"}}
                for r in st.read_table(name, run_id).to_pylist()]
        out[name] = sorted(rows, key=lambda r: tuple(str(r[k]) for k in KEYS[name] if k != "run_id"))
    out["failures"] = sorted((r["sample_id"], r["stage"], r["error_class"])
                             for r in st.read_table("failures", run_id).to_pylist())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--driver-kills", type=int, default=3)
    ap.add_argument("--worker-kills", type=int, default=4, help="samples that SIGKILL their worker once")
    ap.add_argument("--external-worker-kills", type=int, default=2, help="per driver attempt, at most")
    ap.add_argument("--poison", type=int, default=1)
    ap.add_argument("--oom", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-shapes"))
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep the work folder here (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from diffcam.storage.schemas import KEYS
    from diffcam.storage.store import Store

    rng = random.Random(args.seed)
    work = args.keep or Path(tempfile.mkdtemp(prefix="diffcam-soak-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.monotonic()
    root, expected = build_dataset(work / "data", args.n, rng)
    ids = [json.loads(x)["sample_id"] for x in (root / "manifest.jsonl").read_text().splitlines()[: args.n]]
    clean = [i for i in ids if i not in expected]
    chosen = rng.sample(clean, args.worker_kills + args.poison + args.oom)
    kill_once = chosen[: args.worker_kills]
    poison = chosen[args.worker_kills: args.worker_kills + args.poison]
    oom = chosen[args.worker_kills + args.poison:]
    for p in poison:
        expected[p] = "WorkerCrash"
    for o in oom:
        expected[o] = "out of memory during generate"
    state = work / "fault-state"
    state.mkdir(exist_ok=True)
    store = work / "store"
    base_env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home")}
    base_env.pop("PREFECT_API_URL", None)
    common = [str(VENV_BIN / "diffcam"), "audit", "--model", args.model, "--dataset", str(root), "--store",
              str(store), "--workers", str(args.workers), "--cpus-per-worker", "1", "--shard-size",
              str(args.shard_size)]
    deterministic = {"kill_on": poison, "oom_on": oom}
    env = {**base_env, "DIFFCAM_FAULTS": json.dumps({**deterministic, "kill_once_on": kill_once,
                                                      "state_dir": str(state)})}
    log(f"soak: {args.n} samples + 3 bad manifest lines, {len(expected)} expected failures; work dir {work}")

    attempts = []
    plan = (["startup"] if args.driver_kills > 0 else []) + ["after-commit"] * max(0, args.driver_kills - 1)
    for kill in plan + [None]:
        while True:
            log(f"attempt {len(attempts) + 1}: {'run to the end' if kill is None else 'SIGKILL ' + kill}")
            a = run_attempt(common + ["--run-id", "soak", "--json", str(work / "summary.json")], env, store, "soak",
                            kill=kill, rng=rng, external_kills=args.external_worker_kills, log=log)
            attempts.append(a)
            log(f"  {a}")
            if kill is not None or a["rc"] == 0 or len(attempts) > len(plan) + 5:
                break  # a final attempt that failed (e.g. killed from outside) is retried, bounded
        if kill is None and a["rc"] != 0:
            break
    final_ok = attempts[-1]["rc"] == 0

    st = Store(store)
    samples, failures = st.read_table("samples", "soak"), st.read_table("failures", "soak")
    got = samples.column("sample_id").to_pylist() + failures.column("sample_id").to_pylist()
    manifest_keys = ids + ["escape", f"line:{args.n + 2}", "blank-prompt"]
    lost = sorted(set(manifest_keys) - set(got))
    dup_ids = len(got) - len(set(got))
    maps = st.read_table("token_maps", "soak")
    keys = list(zip(*(maps.column(k).to_pylist() for k in KEYS["token_maps"])))
    dup_maps = len(keys) - len(set(keys))
    fail_by = {r["sample_id"]: r for r in failures.to_pylist()}
    wrong = {k: (fail_by.get(k) or {}).get("message", "audited")[:160] for k, want in expected.items()
             if k not in fail_by or (want not in fail_by[k]["message"] and want != fail_by[k]["error_class"])}
    unexpected = {k: r["message"][:160] for k, r in fail_by.items() if k not in expected}
    run = st.read_run("soak")
    report: dict[str, Any] = {
        "samples_in_manifest": len(manifest_keys),
        "audited": samples.num_rows,
        "failures": failures.num_rows,
        "expected_failures": len(expected),
        "failures_with_wrong_or_missing_reason": wrong,
        "unexpected_failures": unexpected,
        "rows_lost": len(lost),
        "duplicates": dup_ids + dup_maps,
        "injected_faults": {
            "driver_sigkills": sum(1 for a in attempts if a.get("killed")),
            "worker_sigkills_in_sample": len(list(state.glob("killed-*"))),
            "worker_sigkills_external": sum(a["external_worker_kills"] for a in attempts),
            "poison_samples": len(poison),
            "poison_attempts": [fail_by[p]["attempts"] for p in poison if p in fail_by],
            "oom_samples": len(oom),
            "bad_inputs": len(expected) - len(poison) - len(oom),
        },
        "run_status": run["status"],
        "driver_attempts": attempts,
        "seconds": round(time.monotonic() - t_start, 1),
    }
    ok = final_ok and run["status"] == "succeeded" and not lost and not dup_ids and not dup_maps \
        and not wrong and not unexpected
    if not args.no_reference:
        log("reference: the same audit, uninterrupted, without kill faults")
        ref_env = {**base_env, "DIFFCAM_FAULTS": json.dumps(deterministic)}
        a = run_attempt(common + ["--run-id", "reference"], ref_env, store, "reference", kill=None, rng=rng,
                        external_kills=0, log=log)
        same = a["rc"] == 0 and comparable(st, "soak") == comparable(st, "reference")
        report["equal_to_uninterrupted_run"] = same
        ok = ok and same
    report["ok"] = ok
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
