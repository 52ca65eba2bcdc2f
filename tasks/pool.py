"""`CamPool`: a pool of `diffcam.tasks.worker.CamWorker` Ray actors, and how it survives their faults.

`CamPool` owns the Ray side: connects to ``ray_address`` (`diffcam.tasks.ray_cluster` checks the
address first) or starts a local Ray (``include_dashboard=False``, CPUs = workers × CPUs per
worker) and shuts down only what it started; asks for GPUs only if the cluster has them (an
actor asking for a GPU that does not exist stays pending forever); creates the actors with
``max_restarts`` so that a killed actor restarts in place (reloading the model); and
schedules batches over them itself (`diffcam.tasks.pool_schedule`; not ``ray.util.ActorPool``,
which cannot tell which batch failed):

- a call that fails because its worker died (``RayActorError``: SIGKILL, segfault, the
  kernel's OOM killer, a call past ``call_timeout_s`` whose worker the pool kills) or
  raised out of `process` (``RayTaskError``) is not retried as a batch: its samples are
  re-queued one by one ("isolated"), so one poison sample cannot take its neighbours down;
- a sample whose isolated call fails ``max_attempts`` times is a poison sample: it becomes
  a failure row (stage ``worker``, error class ``WorkerCrash`` / ``WorkerTimeout``,
  ``attempts`` = calls that carried it) and the run goes on — bounded, never a loop;
- an actor is used again only after a readiness probe (`CamWorker.info`) succeeds; one
  that used up its restarts (``ActorDiedError``) is replaced by a new actor, so later work
  proceeds; a replacement that cannot even start stops the run (RuntimeError) rather
  than loop. ``max_task_retries`` defaults to 0: retries are the pool's, counted.

`CamPool.answer` spreads the bias step's regenerations over the same actors, `CamPool.scan`
its discovery scan; there a failed call is an error naming its samples (a counterfactual is
not decided on missing answers, nor a scan summarised with holes).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from diffcam.core.settings import CamSettings
from diffcam.tasks.pool_schedule import BatchRun, WorkerCrash, WorkerTimeout
from diffcam.tasks.ray_cluster import RayClusterError, check_ray_cluster, connect_failure
from diffcam.tasks.worker import FAULTS_ENV, CamWorker, parse_faults

__all__ = ["CamPool", "PoolConfig", "WorkerCrash", "WorkerTimeout", "POOL_STATS"]

log = logging.getLogger(__name__)

#: The counters of `CamPool.stats` (module docstring), reported in the audit's log and run row.
POOL_STATS = ("worker_deaths", "replaced", "retried", "isolated", "task_errors", "timeouts", "poison")


@dataclass(frozen=True)
class PoolConfig:
    """How many workers, with what resources. ``workers=None``: one per GPU when GPUs are
    used, else min(CPUs, 4) locally / the cluster's CPUs // cpus_per_worker with an address.
    ``gpus_per_worker``: asked only when the cluster has that many GPUs per actor.
    ``cpus_per_worker=None``: local CPUs // workers (at least 1), 1 on a cluster.

    Fault handling (module docstring): ``max_restarts`` (Ray restarts a dead actor in
    place), ``max_task_retries`` (Ray's own silent retries of a call; 0: the pool retries,
    counted), ``max_attempts`` (isolated calls per sample before it is a ``worker`` failure),
    ``call_timeout_s`` (per sample in a call; None: no limit; a call past it has its worker
    killed), ``restart_timeout_s`` (how long an actor may stay unavailable before it is
    replaced), ``faults`` (test-only injection; None: read ``DIFFCAM_FAULTS``)."""

    model_dir: str
    settings: CamSettings
    workers: int | None = None
    gpus_per_worker: float = 1.0
    cpus_per_worker: int | None = None
    ray_address: str | None = None
    batch_size: int = 1
    max_restarts: int = 3
    max_task_retries: int = 0
    max_attempts: int = 3
    call_timeout_s: float | None = None
    restart_timeout_s: float = 300.0
    faults: dict[str, Any] | None = None


class CamPool:
    """A context manager over Ray and a set of `CamWorker` actors (replaced when they die).

    ``timings`` records ``ray_init_s`` and ``workers_ready_s`` (model loading included);
    ``stats`` counts what went wrong (``worker_deaths``, ``task_errors``, ``timeouts``,
    ``isolated`` samples, ``retried`` calls, ``poison`` samples, ``replaced`` actors).
    """

    def __init__(self, config: PoolConfig, log: Callable[[str], None] | None = None) -> None:
        if config.workers is not None and config.workers < 1:
            raise ValueError(f"workers must be >= 1, got {config.workers}")
        if config.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {config.gpus_per_worker}")
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
        if config.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {config.max_attempts}")
        if config.call_timeout_s is not None and config.call_timeout_s <= 0:
            raise ValueError(f"call_timeout_s must be > 0, got {config.call_timeout_s}")
        self.config = config
        self._log = log or log_info
        self._started_ray = False
        self.actors: list[Any] = []
        self.worker_info: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.stats: Counter[str] = Counter()
        self.n_workers = 0
        self.cpus_per_worker = 0
        self.gpus_per_actor = 0.0
        self._remote_cls: Any = None
        self._faults: dict[str, Any] = {}
        self._ready: list[bool] = []
        self._down_since: list[float | None] = []
        self._fresh: list[bool] = []

    def __enter__(self) -> CamPool:
        return self.start()

    def start(self) -> CamPool:
        """Start Ray (or connect) and the workers; a failed start closes what it opened."""
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
        self._faults = parse_faults(cfg.faults if cfg.faults is not None else os.environ.get(FAULTS_ENV))
        if self._faults:
            self._log(f"{FAULTS_ENV} is set: TEST-ONLY fault injection is active ({sorted(self._faults)})")
        t0 = time.perf_counter()
        local_cpus = os.cpu_count() or 1
        if cfg.ray_address:
            if not ray.is_initialized():
                check_ray_cluster(cfg.ray_address)
                try:
                    ray.init(address=cfg.ray_address, logging_level=logging.WARNING)
                except (ConnectionError, ray.exceptions.RayError) as exc:
                    raise RayClusterError(connect_failure(cfg.ray_address, exc)) from exc
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
        self._remote_cls = ray.remote(CamWorker).options(
            num_cpus=cpus_per,
            num_gpus=self.gpus_per_actor,
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_task_retries,
        )
        t1 = time.perf_counter()
        self.actors = [self._new_actor() for _ in range(n)]
        try:
            self.worker_info = ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayActorError as exc:
            cause = getattr(exc, "cause", None) or getattr(exc, "error_msg", None) or exc
            raise RuntimeError(f"workers could not start (model {cfg.model_dir}): {cause}") from exc
        self._ready = [True] * n
        self._down_since = [None] * n
        self._fresh = [False] * n
        self.timings["workers_ready_s"] = time.perf_counter() - t1
        devices = sorted({i["device"] for i in self.worker_info})
        self._log(
            f"{n} worker(s) ready in {self.timings['workers_ready_s']:.1f} s "
            f"(device {'/'.join(devices)}, {cpus_per} CPU + {self.gpus_per_actor:g} GPU each)"
        )
        if cfg.ray_address:  # where the workers run (the minimal Ray install has no state API)
            for slot, info in enumerate(self.worker_info):
                self._log(f"worker {slot}: pid {info.get('pid')} on {info.get('host', '?')} "
                          f"(Ray node {str(info.get('node_id') or '?')[:12]})")

    def stats_summary(self) -> dict[str, int]:
        """Every counter of ``stats`` (zeros included), for the run row and the audit's output."""
        return {k: int(self.stats.get(k, 0)) for k in POOL_STATS}

    def stats_line(self) -> str:
        """One line for the audit's log: what went wrong with the workers, or that nothing did."""
        s = self.stats_summary()
        if not any(s.values()):
            return f"workers: {self.n_workers}, no worker deaths, restarts or retries"
        return (f"workers: {self.n_workers}; {s['worker_deaths']} worker death(s), {s['replaced']} actor(s) "
                f"replaced, {s['retried']} sample call(s) retried, {s['isolated']} sample(s) isolated from "
                f"failed batches, {s['task_errors']} call error(s), {s['timeouts']} timeout(s), "
                f"{s['poison']} poison sample(s)")

    def _new_actor(self) -> Any:
        cfg = self.config
        return self._remote_cls.remote(cfg.model_dir, cfg.settings, threads=self.cpus_per_worker,
                                       faults=self._faults)

    def _replace(self, slot: int, why: str) -> None:
        import ray

        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass
        self.actors[slot] = self._new_actor()
        self._fresh[slot] = True
        self._ready[slot] = False
        self._down_since[slot] = time.monotonic()
        self.stats["replaced"] += 1
        self._log(f"worker {slot} replaced by a new actor ({why})")

    def run(self, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Audit ``items`` on the pool; exactly one result per item, in completion order.

        Worker deaths and calls that raise are handled as the module docstring says
        (`diffcam.tasks.pool_schedule`): the samples of a failed call are retried alone, a
        sample that fails alone ``max_attempts`` times becomes a ``worker`` failure row, dead
        actors are replaced. Raises RuntimeError only when no worker can be (re)started.
        """
        if not self.actors:
            raise RuntimeError("CamPool is not started (use it as a context manager)")
        return BatchRun(self, items).run()

    def answer(self, images: Sequence[Any], prompts: Sequence[str], generation: Any,
               sample_ids: Sequence[str] | None = None) -> list[str]:
        """One answer per (image, prompt), in order, generated by the workers
        (`CamWorker.answer`) with ``generation``: the images are split into one contiguous
        chunk per worker. A call that fails (its worker died, raised, or ran past
        ``call_timeout_s`` per image) raises `WorkerCrash` / `WorkerTimeout` naming its
        samples: a counterfactual is never decided on answers that are missing."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return self._spread("answer", [images, prompts], (generation,), sample_ids, "regenerating answers")

    def scan(self, images: Sequence[Any], prompts: Sequence[str], words: Sequence[str], generation: Any,
             attribution_step: str, window_size: float, sample_ids: Sequence[str] | None = None) -> list[Any]:
        """The discovery scan of each (image, prompt, word), in order, on the workers
        (`CamWorker.scan`, `diffcam.tasks.scan`), spread and failing as `answer` does: a failed call
        raises `WorkerCrash` / `WorkerTimeout` naming its samples (``call_timeout_s`` per
        image), never a scan with holes."""
        if not (len(prompts) == len(words) == len(images)):
            raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(words)} words")
        return self._spread("scan", [images, prompts, words], (generation, attribution_step, window_size),
                            sample_ids, "scanning")

    def _spread(self, method: str, columns: Sequence[Sequence[Any]], args: tuple[Any, ...],
                sample_ids: Sequence[str] | None, doing: str) -> list[Any]:
        """Call ``CamWorker.<method>(*chunk of each column, *args, chunk of ids)`` on one
        contiguous chunk per ready worker; results in input order (`answer`, `scan`)."""
        import ray
        from ray.exceptions import RayActorError, RayError

        if not self.actors:
            raise RuntimeError("CamPool is not started (use it as a context manager, or start())")
        n = len(columns[0])
        if n == 0:
            return []
        ids = list(sample_ids) if sample_ids is not None else [f"#{k}" for k in range(n)]
        # actors that passed their last readiness probe; if none did, all (Ray queues the calls
        # of an actor that is restarting)
        slots = [i for i, ok in enumerate(self._ready) if ok] or list(range(len(self.actors)))
        k = min(len(slots), n)
        bounds = [round(i * n / k) for i in range(k + 1)]
        calls = {}
        for j, slot in enumerate(slots[:k]):
            lo, hi = bounds[j], bounds[j + 1]
            ref = getattr(self.actors[slot], method).remote(*(list(c[lo:hi]) for c in columns), *args, ids[lo:hi])
            calls[ref] = (slot, lo, hi)
        timeout = None
        if self.config.call_timeout_s is not None:
            timeout = self.config.call_timeout_s * max(hi - lo for _, lo, hi in calls.values())
        ready, late = ray.wait(list(calls), num_returns=len(calls), timeout=timeout)
        if late:
            self.stats["timeouts"] += len(late)
            for ref in late:
                ray.kill(self.actors[calls[ref][0]], no_restart=False)
            names = sorted({sid for ref in late for sid in ids[calls[ref][1]:calls[ref][2]]})
            raise WorkerTimeout(f"{doing} for sample(s) {', '.join(names[:20])} ran past "
                                f"{self.config.call_timeout_s:g} s per image (worker killed)")
        out: list[Any] = [None] * n
        for ref in ready:
            slot, lo, hi = calls[ref]
            names = ", ".join(sorted(set(ids[lo:hi]))[:20])
            try:
                out[lo:hi] = ray.get(ref)
            except RayActorError as exc:
                self.stats["worker_deaths"] += 1
                raise WorkerCrash(f"worker {slot} died {doing} for sample(s) {names}: "
                                  f"{type(exc).__name__}: {str(exc)[:500]}") from exc
            except RayError as exc:
                self.stats["task_errors"] += 1
                raise WorkerCrash(f"worker {slot} failed {doing} for sample(s) {names}: "
                                  f"{str(exc)[:2000]}") from exc
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
