"""How `CamPool.run` schedules batches over its actors, in three small parts.

- `RetryPolicy` (pure, no Ray): what happens to the samples of a failed call. A batch is
  split into one call per sample ("isolated"); a sample that fails alone is retried until
  ``max_attempts``, then it becomes one ``worker`` failure row. Bounded: never a loop.
- `Readiness`: which actors may take work. An actor is used again only after a probe
  (`CamWorker.info`) succeeds; an unavailable one is asked again shortly, and replaced when it
  stays down past ``restart_timeout_s`` or has used up its restarts.
- `BatchRun`: the dispatch loop that ties them together — idle actors take queued batches,
  calls past ``call_timeout_s`` have their worker killed, finished calls give results.

Why not `ray.util.ActorPool`: it cannot say which batch failed, so a poison sample would
take its neighbours down, and it does not replace dead actors.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffcam.tasks.rows import failure_row

if TYPE_CHECKING:
    from diffcam.tasks.pool import CamPool

__all__ = ["Call", "RetryPolicy", "Readiness", "BatchRun", "WorkerCrash", "WorkerTimeout"]


class WorkerCrash(RuntimeError):
    """A sample whose worker died (or raised out of `CamWorker.process`) every time it ran alone."""


class WorkerTimeout(WorkerCrash):
    """A sample whose call ran past ``call_timeout_s`` every time it ran alone."""


@dataclass
class Call:
    """One batch in flight on the actor in ``slot``."""

    slot: int
    items: list[dict[str, Any]]
    started: float
    timed_out: bool = False


class RetryPolicy:
    """The samples of failed calls: isolated, retried alone, then failure rows (module docstring).

    ``stats`` is the pool's counter (``isolated``, ``retried``, ``poison`` are counted here)."""

    def __init__(self, max_attempts: int, stats: Counter[str]) -> None:
        self.max_attempts = max_attempts
        self.stats = stats
        self.attempts: Counter[str] = Counter()  # calls that carried the sample
        self.alone_failures: Counter[str] = Counter()

    def dispatched(self, batch: Sequence[dict[str, Any]]) -> None:
        for it in batch:
            self.attempts[it["sample_id"]] += 1

    def failed(self, items: Sequence[dict[str, Any]], why: str,
               timed_out: bool) -> tuple[list[list[dict[str, Any]]], dict[str, Any] | None]:
        """(batches to queue again, a failure result or None) for a call of ``items`` that failed."""
        if len(items) > 1:
            self.stats["isolated"] += len(items)
            return [[it] for it in items], None
        it = items[0]
        sid = it["sample_id"]
        self.alone_failures[sid] += 1
        if self.alone_failures[sid] < self.max_attempts:
            self.stats["retried"] += 1
            return [[it]], None
        self.stats["poison"] += 1
        cls = WorkerTimeout if timed_out else WorkerCrash
        err = cls(f"the worker failed {self.alone_failures[sid]} time(s) auditing this sample alone "
                  f"(max_attempts={self.max_attempts}); last: {why}")
        row = failure_row(it["run_id"], it["shard_id"], sid, it.get("line_no"), "worker", err,
                          attempts=min(self.attempts[sid], 32767))
        return [], {"sample_id": sid, "samples": None, "token_maps": [], "failures": row}


def describe_failure(exc: BaseException, call: Call, call_timeout_s: float | None) -> str:
    """One line saying why a call failed, for the failure row."""
    if call.timed_out:
        return f"timed out after {call_timeout_s:g} s per sample (worker killed)"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


class Readiness:
    """Probes of the pool's actors: which are idle (ready for work) and which are being asked."""

    def __init__(self, pool: CamPool) -> None:
        self.pool = pool
        self.idle: deque[int] = deque()
        self.probes: dict[Any, int] = {}
        self.reprobe: list[tuple[float, int]] = []  # (when, slot)
        self.start_failures: Counter[int] = Counter()
        for slot in range(len(pool.actors)):
            if pool._ready[slot]:
                self.idle.append(slot)
            else:
                self.probe(slot)

    def probe(self, slot: int) -> None:
        self.probes[self.pool.actors[slot].info.remote()] = slot

    def went_down(self, slot: int) -> None:
        """The actor's call failed: it is not used again until a probe says it is back."""
        self.pool._ready[slot] = False
        self.pool._down_since[slot] = time.monotonic()
        self.probe(slot)

    def probe_due(self, now: float) -> None:
        for due in [r for r in self.reprobe if r[0] <= now]:
            self.reprobe.remove(due)
            self.probe(due[1])

    def answered(self, ref: Any) -> None:
        """A probe finished: the actor is idle again, asked again later, or replaced."""
        import ray
        from ray.exceptions import RayError

        pool, cfg = self.pool, self.pool.config
        slot = self.probes.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
            down = pool._down_since[slot] or time.monotonic()
            if time.monotonic() - down > cfg.restart_timeout_s:
                pool._replace(slot, f"unavailable for more than {cfg.restart_timeout_s:g} s")
                self.probe(slot)
            else:
                self.reprobe.append((time.monotonic() + 0.5, slot))
        except RayError as exc:  # dead for good (restarts used up), or it cannot start
            if pool._fresh[slot]:
                self.start_failures[slot] += 1
                if self.start_failures[slot] >= 2:
                    raise RuntimeError(f"worker {slot} could not be replaced: a new actor died before "
                                       f"it was ready twice: {type(exc).__name__}: {exc}") from exc
            pool._replace(slot, f"{type(exc).__name__}")
            self.probe(slot)
        else:
            pool._ready[slot] = True
            pool._down_since[slot] = None
            pool._fresh[slot] = False
            if slot < len(pool.worker_info):
                pool.worker_info[slot] = info
            self.idle.append(slot)

    def abandon(self) -> None:
        """Probes still in flight are dropped: those actors are probed again at the next run."""
        for slot in self.probes.values():
            self.pool._ready[slot] = False
        for _, slot in self.reprobe:
            self.pool._ready[slot] = False


class BatchRun:
    """One `CamPool.run`: every item ends in exactly one result, in completion order."""

    def __init__(self, pool: CamPool, items: Sequence[dict[str, Any]]) -> None:
        self.pool = pool
        self.cfg = pool.config
        bs = self.cfg.batch_size
        self.queue: deque[list[dict[str, Any]]] = deque(list(items[i:i + bs]) for i in range(0, len(items), bs))
        self.calls: dict[Any, Call] = {}
        self.out: list[dict[str, Any]] = []
        self.retry = RetryPolicy(self.cfg.max_attempts, pool.stats)
        self.ready = Readiness(pool)

    def run(self) -> list[dict[str, Any]]:
        import ray

        while self.queue or self.calls:
            self.dispatch()
            now = time.monotonic()
            self.ready.probe_due(now)
            waitables = list(self.calls) + list(self.ready.probes)
            timeout = self.wait_timeout(now)
            if not waitables:
                if not self.ready.reprobe:  # cannot happen: every slot is idle, in a call, probing or due a probe
                    raise RuntimeError("no worker is available and none is being started")
                time.sleep(timeout or 0.1)
                continue
            done, _ = ray.wait(waitables, num_returns=1, timeout=timeout)
            if not done:
                self.kill_overdue()
            elif done[0] in self.ready.probes:
                self.ready.answered(done[0])
            else:
                self.finished(done[0])
        self.ready.abandon()
        return self.out

    def dispatch(self) -> None:
        """Idle actors take queued batches."""
        while self.queue and self.ready.idle:
            slot = self.ready.idle.popleft()
            batch = self.queue.popleft()
            self.calls[self.pool.actors[slot].process.remote(batch)] = Call(slot, batch, time.monotonic())
            self.retry.dispatched(batch)

    def wait_timeout(self, now: float) -> float | None:
        """How long to wait for the next event: the nearest reprobe or call deadline (at most 5 s)."""
        deadlines = [t for t, _ in self.ready.reprobe]
        if self.cfg.call_timeout_s is not None:
            deadlines += [c.started + self.cfg.call_timeout_s * len(c.items)
                          for c in self.calls.values() if not c.timed_out]
        return None if not deadlines else min(max(min(deadlines) - now, 0.01), 5.0)

    def kill_overdue(self) -> None:
        """Calls past ``call_timeout_s`` per sample have their worker killed (the call then fails)."""
        import ray

        if self.cfg.call_timeout_s is None:
            return
        now = time.monotonic()
        for c in self.calls.values():
            if not c.timed_out and now - c.started > self.cfg.call_timeout_s * len(c.items):
                c.timed_out = True
                self.pool.stats["timeouts"] += 1
                self.pool._log(f"call on worker {c.slot} ran past {self.cfg.call_timeout_s:g} s per sample "
                               f"({[it['sample_id'] for it in c.items][:5]}): killing the worker")
                ray.kill(self.pool.actors[c.slot], no_restart=False)

    def finished(self, ref: Any) -> None:
        """A call came back: its results, or its samples handed to the retry policy."""
        import ray
        from ray.exceptions import RayActorError, RayError

        call = self.calls.pop(ref)
        try:
            results = ray.get(ref)
        except RayError as exc:
            # RayActorError: the worker died (or was killed) during the call; another RayError:
            # raised out of process(), or a result that cannot be fetched. Either way the probe decides.
            self.pool.stats["worker_deaths" if isinstance(exc, RayActorError) else "task_errors"] += 1
            self.ready.went_down(call.slot)
            requeue, row = self.retry.failed(call.items, describe_failure(exc, call, self.cfg.call_timeout_s),
                                             call.timed_out)
            self.queue.extend(requeue)
            if row is not None:
                self.pool._log(f"sample {row['sample_id']}: {row['failures']['message']}")
                self.out.append(row)
        else:
            self.out.extend(results)
            self.ready.idle.append(call.slot)
