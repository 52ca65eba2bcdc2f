"""Ray workers: `CamWorker` (one model per actor) and `CamPool` (a pool of them).

`CamWorker` is a plain class: the pool wraps it with ``ray.remote`` at the call site
(the Ray Data callable-class pattern), so tests can call it in-process without Ray. The
model is loaded once, in ``__init__``; `process` audits a batch of work items
(`tasks.plan.work_item` + ``run_id`` / ``shard_id``). The worker opens the image and the
masks itself, so the driver never holds pixels. An exception in one sample becomes that
sample's failure row (`tasks.rows.failure_row`) and the batch goes on.

`CamPool` owns the Ray side: connects to ``ray_address`` or starts a local Ray
(``include_dashboard=False``, CPUs = workers × CPUs per worker) and shuts down only
what it started; asks for GPUs only if the cluster has them (an actor asking for a GPU
that does not exist stays pending forever); creates the actors with ``max_restarts`` /
``max_task_retries`` so that a killed actor restarts (reloading the model) and its
in-flight call is retried; and maps batches over them with ``ray.util.ActorPool``. A
batch whose actor died more often than ``max_task_retries`` allows becomes failure rows
(stage ``worker``) for its samples; the other batches are unaffected.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.rows import failure_row, failure_stage, ground_words, sample_row, token_map_rows

__all__ = ["CamWorker", "CamPool", "PoolConfig", "file_sha256"]

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CamWorker:
    """Loads the model once; audits batches of work items into table rows.

    ``threads``: torch intra-op threads (= CPUs given to this actor). ``device``: None
    picks ``cuda`` when Ray assigned this actor a GPU (or, outside Ray, when CUDA is
    available and ``allow_cuda``), else ``cpu``.
    """

    def __init__(self, model_dir: str, settings: dict[str, Any], threads: int = 1,
                 device: str | None = None, allow_cuda: bool = True) -> None:
        import torch

        from diffcam_core.models.base import load_adapter
        from diffcam_core.settings import CamSettings

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
        self.settings = CamSettings.from_dict(settings)
        layer = self.settings.layer
        if layer is not None and layer not in self.adapter.valid_layers():
            valid = self.adapter.valid_layers()
            raise ValueError(f"layer {layer!r} is not a valid layer of {model_dir}; valid: {valid}")
        self.device = device
        self.threads = threads

    def info(self) -> dict[str, Any]:
        """Where this worker runs (also the readiness probe of the pool)."""
        return {"pid": os.getpid(), "device": self.device, "threads": self.threads, "load_s": self.load_s}

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Audit each item; returns one result per item (see `process_one`)."""
        return [self.process_one(item) for item in batch]

    def process_one(self, item: dict[str, Any]) -> dict[str, Any]:
        """``{"sample_id", "samples": row | None, "token_maps": [rows], "failures": row | None}``.

        Exactly one of ``samples`` / ``failures`` is set.
        """
        from storage.datasets import load_image
        from diffcam_core.cam import explain
        from storage.schemas import table_from_rows
        from tasks.plan import item_sample

        run_id, shard_id, sid = item["run_id"], item["shard_id"], item["sample_id"]
        stage = "load"

        def set_stage(s: str) -> None:
            nonlocal stage
            stage = s

        try:
            image = load_image(item["image_path"])
            sha = file_sha256(item["image_path"])
            masks = item_sample(item).object_masks(image.size)  # [(word, bool (H, W))], manifest order
            expl = explain(self.adapter, image, item["prompt"], self.settings, on_stage=set_stage)
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
            fr = failure_row(run_id, shard_id, sid, item.get("line_no"), failure_stage(exc, stage), exc)
            return {"sample_id": sid, "samples": None, "token_maps": [], "failures": fr}


def _has_gpu() -> bool:
    try:
        import ray

        return ray.is_initialized() and bool(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - outside a Ray worker there is no assignment
        return False


# ----------------------------------------------------------------------------- pool


@dataclass(frozen=True)
class PoolConfig:
    """How many workers, with what resources. ``workers=None``: one per GPU when GPUs are
    used, else min(CPUs, 4) locally / the cluster's CPUs // cpus_per_worker with an address.
    ``gpus_per_worker``: asked only when the cluster has that many GPUs per actor.
    ``cpus_per_worker=None``: local CPUs // workers (at least 1), 1 on a cluster."""

    model_dir: str
    settings: dict[str, Any]
    workers: int | None = None
    gpus_per_worker: float = 1.0
    cpus_per_worker: int | None = None
    ray_address: str | None = None
    batch_size: int = 1
    max_restarts: int = 3
    max_task_retries: int = 2


class CamPool:
    """A context manager over Ray and a fixed set of `CamWorker` actors.

    ``timings`` records ``ray_init_s`` and ``workers_ready_s`` (model loading included).
    """

    def __init__(self, config: PoolConfig, log: Callable[[str], None] | None = None) -> None:
        if config.workers is not None and config.workers < 1:
            raise ValueError(f"workers must be >= 1, got {config.workers}")
        if config.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {config.gpus_per_worker}")
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
        self.config = config
        self._log = log or log_info
        self._started_ray = False
        self.actors: list[Any] = []
        self.worker_info: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.n_workers = 0
        self.cpus_per_worker = 0
        self.gpus_per_actor = 0.0

    def __enter__(self) -> CamPool:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        import ray

        cfg = self.config
        t0 = time.perf_counter()
        local_cpus = os.cpu_count() or 1
        if cfg.ray_address:
            if not ray.is_initialized():
                ray.init(address=cfg.ray_address, logging_level=logging.WARNING)
                self._started_ray = True
        elif not ray.is_initialized():
            workers = cfg.workers or min(local_cpus, 4)
            cpus = cfg.cpus_per_worker or max(1, local_cpus // workers)
            ray.init(num_cpus=workers * cpus, include_dashboard=False, logging_level=logging.WARNING)
            self._started_ray = True
        self.timings["ray_init_s"] = time.perf_counter() - t0

        res = ray.cluster_resources()
        gpus, cpus_total = float(res.get("GPU", 0)), int(res.get("CPU", 0))
        want = float(cfg.gpus_per_worker)
        self.gpus_per_actor = want if 0 < want <= gpus else 0.0
        if want > 0 and self.gpus_per_actor == 0:
            self._log(f"the Ray cluster has {gpus:g} GPU(s): workers run on CPU (asked {want:g} GPU per worker)")
        if cfg.workers is not None:
            n = cfg.workers
        elif self.gpus_per_actor > 0:
            n = max(1, int(math.floor(gpus / self.gpus_per_actor)))
        elif cfg.ray_address:
            n = max(1, cpus_total // (cfg.cpus_per_worker or 1))
        else:
            n = min(local_cpus, 4)
        cpus_per = cfg.cpus_per_worker or (1 if cfg.ray_address or self.gpus_per_actor > 0 else max(1, cpus_total // n))
        self.n_workers = n
        self.cpus_per_worker = cpus_per
        remote_cls = ray.remote(CamWorker).options(
            num_cpus=cpus_per,
            num_gpus=self.gpus_per_actor,
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_task_retries,
        )
        t1 = time.perf_counter()
        self.actors = [remote_cls.remote(cfg.model_dir, cfg.settings, threads=cpus_per) for _ in range(n)]
        try:
            self.worker_info = ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayActorError as exc:
            cause = getattr(exc, "cause", None) or getattr(exc, "error_msg", None) or exc
            raise RuntimeError(f"workers could not start (model {cfg.model_dir}): {cause}") from exc
        self.timings["workers_ready_s"] = time.perf_counter() - t1
        devices = sorted({i["device"] for i in self.worker_info})
        self._log(
            f"{n} worker(s) ready in {self.timings['workers_ready_s']:.1f} s "
            f"(device {'/'.join(devices)}, {cpus_per} CPU + {self.gpus_per_actor:g} GPU each)"
        )

    def run(self, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Audit ``items`` on the pool; one result per item, in completion order.

        A batch whose worker call failed for good (actor died more than
        ``max_task_retries`` times, or a result that cannot be unpickled) becomes failure
        rows with stage ``worker`` for its samples.
        """
        import ray
        from ray.util import ActorPool

        if not self.actors:
            raise RuntimeError("CamPool is not started (use it as a context manager)")
        bs = self.config.batch_size
        batches = [list(items[i:i + bs]) for i in range(0, len(items), bs)]
        pool = ActorPool(self.actors)
        for k, b in enumerate(batches):
            pool.submit(lambda a, v: a.process.remote(v[1]), (k, b))
        out: list[dict[str, Any]] = []
        # Results are matched to batches by their sample ids: get_next_unordered does not
        # say which value a result belongs to, and a failed call carries no result.
        done: set[str] = set()
        errors: list[BaseException] = []
        while pool.has_next():
            try:
                results = pool.get_next_unordered()
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError,
                    ray.exceptions.ActorUnavailableError) as exc:
                errors.append(exc)
                continue
            for r in results:
                done.add(r["sample_id"])
            out.extend(results)
        if errors:
            msg = RuntimeError(
                f"worker call failed (actor restarts up to {self.config.max_restarts}, "
                f"retries up to {self.config.max_task_retries}): {type(errors[0]).__name__}: {errors[0]}"
            )
            for item in items:
                if item["sample_id"] not in done:
                    out.append({
                        "sample_id": item["sample_id"], "samples": None, "token_maps": [],
                        "failures": failure_row(item["run_id"], item["shard_id"], item["sample_id"],
                                                item.get("line_no"), "worker", msg,
                                                attempts=self.config.max_task_retries + 1),
                    })
        return out

    def close(self) -> None:
        """Kill the actors and shut Ray down if this pool started it (idempotent)."""
        try:
            import ray
        except ImportError:  # pragma: no cover
            return
        if ray.is_initialized():
            for a in self.actors:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001 - already dead is fine
                    pass
        self.actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False


def log_info(msg: str) -> None:
    log.info(msg)
