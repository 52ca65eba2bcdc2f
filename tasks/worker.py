"""The Ray actor of an audit: `CamWorker` loads the model once and audits samples into rows.

`CamWorker` is a plain class: the pool (`diffcam.tasks.pool.CamPool`) wraps it with ``ray.remote``
at the call site (the Ray Data callable-class pattern), so tests can call it in-process
without Ray. The model is loaded once, in ``__init__``; `process` audits a batch of work
items (`diffcam.tasks.plan.work_item` + ``run_id`` / ``shard_id``); `answer` regenerates answers for
the bias step's edited images (`diffcam.tasks.answers`) and `scan` runs its discovery scan
(`diffcam.tasks.scan`). The worker opens the image and the masks itself, so the driver never holds
pixels. An exception in one sample becomes that sample's failure row
(`diffcam.tasks.rows.failure_row`) and the batch goes on; an out-of-memory error
(``torch.OutOfMemoryError``, ``MemoryError``) too, after the worker frees what it can (the
message says "out of memory during <stage>"). Inputs beyond the model's position tables are
refused before the model runs (`diffcam.core.models.base.check_inputs`).

Fault injection (TEST-ONLY; docs/RELIABILITY.md): the environment variable
``DIFFCAM_FAULTS`` (JSON, read by the driver when the pool starts and handed to each
actor, or `CamWorker`'s ``faults`` argument) makes the worker misbehave when it reaches
the generate stage of the named samples: ``kill_on`` (SIGKILL itself every time: a poison
sample), ``kill_once_on`` (SIGKILL once per sample, remembered in ``state_dir``),
``oom_on`` (raise ``torch.OutOfMemoryError``; ``oom_stage`` "generate" | "attribute"),
``memory_error_on`` (raise ``MemoryError``), ``hang_on`` (sleep ``hang_s`` seconds). Kill
faults are refused outside a Ray actor (they would kill the caller). Never set it in
production: it exists so that the fault tests and `benchmarks/soak.py` can prove the
recovery paths.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from diffcam.core.settings import CamSettings
from diffcam.tasks.rows import failure_row, failure_stage, ground_words, sample_row, token_map_rows

__all__ = ["CamWorker", "FAULTS_ENV", "parse_faults"]

log = logging.getLogger(__name__)

#: Test-only fault injection (see the module docstring).
FAULTS_ENV = "DIFFCAM_FAULTS"
_FAULT_LISTS = ("kill_on", "kill_once_on", "oom_on", "memory_error_on", "hang_on")
_FAULT_KEYS = (*_FAULT_LISTS, "state_dir", "oom_stage", "hang_s")


def parse_faults(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    """Validate a ``DIFFCAM_FAULTS`` value (JSON text or dict); {} for None / empty."""
    if raw is None or raw == "" or raw == {}:
        return {}
    d = json.loads(raw) if isinstance(raw, str) else dict(raw)
    if not isinstance(d, dict):
        raise ValueError(f"{FAULTS_ENV} must be a JSON object, got {type(d).__name__}")
    unknown = set(d) - set(_FAULT_KEYS)
    if unknown:
        raise ValueError(f"{FAULTS_ENV}: unknown key(s) {sorted(unknown)}; known: {list(_FAULT_KEYS)}")
    for k in _FAULT_LISTS:
        if k in d and not (isinstance(d[k], list) and all(isinstance(x, str) for x in d[k])):
            raise ValueError(f"{FAULTS_ENV}: {k} must be a list of sample ids")
    if d.get("kill_once_on") and not d.get("state_dir"):
        raise ValueError(f"{FAULTS_ENV}: kill_once_on needs state_dir (where 'already killed' is remembered)")
    if d.get("oom_stage", "generate") not in ("generate", "attribute"):
        raise ValueError(f"{FAULTS_ENV}: oom_stage must be generate or attribute")
    return d


class CamWorker:
    """Loads the model once; audits batches of work items into table rows.

    ``threads``: torch intra-op threads (= CPUs given to this actor). ``device``: None
    picks ``cuda`` when Ray assigned this actor a GPU (or, outside Ray, when CUDA is
    available and ``allow_cuda``), else ``cpu``.
    """

    def __init__(self, model_dir: str, settings: CamSettings, threads: int = 1,
                 device: str | None = None, allow_cuda: bool = True,
                 faults: dict[str, Any] | str | None = None) -> None:
        import torch

        from diffcam.core.models.base import load_adapter

        try:  # the per-actor "Loading weights" bar would interleave in the driver's log
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
        torch.set_num_threads(max(1, int(threads)))
        if device is None:
            device = "cuda" if allow_cuda and _has_gpu() and torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        self.adapter = load_adapter(model_dir, device=device)
        self.load_s = time.perf_counter() - t0
        self.settings = settings
        layer = self.settings.layer
        if layer is not None and layer not in self.adapter.valid_layers():
            valid = self.adapter.valid_layers()
            raise ValueError(f"layer {layer!r} is not a valid layer of {model_dir}; valid: {valid}")
        self.device = device
        self.threads = threads
        #: Test-only fault injection (module docstring); {} in production.
        self.faults = parse_faults(faults if faults is not None else os.environ.get(FAULTS_ENV))

    def info(self) -> dict[str, Any]:
        """Where this worker runs (also the readiness probe of the pool)."""
        import socket

        node_id = None
        try:
            import ray

            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - outside Ray there is no node
            node_id = None
        return {"pid": os.getpid(), "device": self.device, "threads": self.threads, "load_s": self.load_s,
                "host": socket.gethostname(), "node_id": node_id}

    def answer(self, images: list[Any], prompts: list[str], generation: Any,
               sample_ids: list[str] | None = None) -> list[str]:
        """Answers for edited images with ``generation`` (the run's settings, sent by the
        driver): the bias step's counterfactual regenerations, on this worker's model."""
        from diffcam.tasks.answers import generate_answers

        return generate_answers(self.adapter, generation, images, prompts, sample_ids)

    def scan(self, images: list[Any], prompts: list[str], words: list[str], generation: Any, attribution_step: str,
             window_size: float, sample_ids: list[str] | None = None) -> list[Any]:
        """The bias step's discovery scan (`diffcam.tasks.scan.scan_images`) of each (image, prompt,
        word) on this worker's model, with the run's ``generation`` settings and
        ``attribution_step``, windows of ``window_size`` (sent by the driver)."""
        from diffcam.tasks.scan import scan_images

        return scan_images(self.adapter, generation, attribution_step, window_size, images, prompts, words,
                           sample_ids)

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Audit each item; returns one result per item (see `process_one`)."""
        return [self.process_one(item) for item in batch]

    def process_one(self, item: dict[str, Any]) -> dict[str, Any]:
        """``{"sample_id", "samples": row | None, "token_maps": [rows], "failures": row | None}``.

        Exactly one of ``samples`` / ``failures`` is set.
        """
        from diffcam.core.cam import explain
        from diffcam.core.faithfulness import selected_for_faithfulness
        from diffcam.core.models.base import check_inputs
        from diffcam.storage.images import load_image_sha256
        from diffcam.storage.schemas import table_from_rows
        from diffcam.tasks.plan import item_sample

        run_id, shard_id, sid = item["run_id"], item["shard_id"], item["sample_id"]
        stage = "load"

        def set_stage(s: str) -> None:
            nonlocal stage
            entered, stage = s != stage, s
            if self.faults and entered:
                self._inject(s, sid)

        try:
            image, sha = load_image_sha256(item["image_path"])  # one read of the file
            masks = item_sample(item).object_masks(image.size)  # [(word, bool (H, W))], manifest order
            set_stage("generate")
            inputs = self.adapter.prepare(image, item["prompt"])
            check_inputs(self.adapter, inputs)  # refuse before running
            expl = explain(self.adapter, image, item["prompt"], self.settings, on_stage=set_stage, inputs=inputs,
                           faithfulness=selected_for_faithfulness(sid, self.settings.faithfulness))
            stage = "write"
            idx = ground_words([w.word.text for w in expl.words], [w for w, _ in masks])
            word_masks = [None if i is None else masks[i][1] for i in idx]
            distinct = list({id(m): m for _, m in masks}.values())
            tm = token_map_rows(run_id, shard_id, sid, expl, word_masks, distinct)
            row = sample_row(run_id, shard_id, item, expl, width=image.size[0], height=image.size[1],
                             image_sha256=sha, n_objects=len(distinct), token_rows=tm)
            stage = "validate"  # schema check per sample, so one bad row fails its sample, not the shard
            table_from_rows("samples", [row])
            table_from_rows("token_maps", tm)
            return {"sample_id": sid, "samples": row, "token_maps": tm, "failures": None}
        except Exception as exc:  # noqa: BLE001 - every error of one sample becomes its failure row
            oom = _is_oom(exc)
            image = expl = masks = None  # drop references before freeing memory
            fr = failure_row(run_id, shard_id, sid, item.get("line_no"), failure_stage(exc, stage), exc)
            if oom:
                self._free_memory()
                fr["message"] = f"out of memory during {fr['stage']}: {fr['message']}"[:2000]
            return {"sample_id": sid, "samples": None, "token_maps": [], "failures": fr}

    def _free_memory(self) -> None:
        gc.collect()
        if str(self.device).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _inject(self, stage: str, sid: str) -> None:
        """Test-only faults (module docstring)."""
        f = self.faults
        if stage == "generate":
            if sid in f.get("kill_on", ()):
                _kill_self(sid)
            if sid in f.get("kill_once_on", ()):
                marker = Path(f["state_dir"]) / f"killed-{hashlib.sha256(sid.encode()).hexdigest()[:16]}"
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.close(fd)
                    _kill_self(sid)
            if sid in f.get("memory_error_on", ()):
                raise MemoryError()
            if sid in f.get("hang_on", ()):
                time.sleep(float(f.get("hang_s", 3600)))
        if stage == f.get("oom_stage", "generate") and sid in f.get("oom_on", ()):
            import torch

            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 20.00 GiB (injected by {FAULTS_ENV} for {sid})")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        return isinstance(exc, torch.OutOfMemoryError)
    except (ImportError, AttributeError):  # pragma: no cover
        return False


def _kill_self(sid: str) -> None:
    """SIGKILL this process — only inside a Ray actor (it would kill a test runner otherwise)."""
    try:
        import ray

        in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - no Ray runtime context: not in an actor
        in_actor = False
    if not in_actor:
        raise RuntimeError(f"{FAULTS_ENV}: refusing to kill a process that is not a Ray actor (sample {sid})")
    log.warning("%s: killing worker pid %d at sample %s", FAULTS_ENV, os.getpid(), sid)
    os.kill(os.getpid(), signal.SIGKILL)


def _has_gpu() -> bool:
    try:
        import ray

        return ray.is_initialized() and bool(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - outside a Ray worker there is no assignment
        return False
