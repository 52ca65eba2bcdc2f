"""The audit ledger: which (checkpoint, dataset, settings) was audited, by which run.

The **ledger** is the store's record of which (checkpoint hash, dataset hash, settings
hash) were audited, by which run: one JSON file per audit under
``<store>/ops/audits/<run_id>.json``. It never copies a run's status: the status is read
from the run row that `diffcam.flows.audit` maintains (``<store>/runs/run_id=<id>/runs``), so
the two cannot disagree. `AuditLedger.claim` decides, under a file lock, whether a
(checkpoint, dataset, settings) triple still needs auditing:

=====================================  ===========================================
existing audits of the same triple      decision
=====================================  ===========================================
none                                    ``audit`` (a new run id)
one succeeded / validation_failed       ``skip`` (unless forced: a new run id)
one running or just claimed             ``skip`` (in progress), unless older than
                                        ``stale_after_s`` (then ``resume`` it)
only failed ones                        ``resume`` the newest (committed shards
                                        are kept; `diffcam.flows.audit` resumes a run id)
=====================================  ===========================================
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["settings_key", "AuditRecord", "Claim", "AuditLedger", "DONE_STATUSES", "new_audit_run_id"]

#: Run statuses that count as "audited" (re-auditing would give the same answer).
DONE_STATUSES = ("succeeded", "validation_failed")
_SLUG_RE = re.compile(r"[^A-Za-z0-9._-]+")


def _slug(text: str, n: int) -> str:
    s = _SLUG_RE.sub("-", text).strip("-._")[:n]
    return s or "x"


def settings_key(settings: Any, limit: int | None) -> tuple[str, str]:
    """(hash, canonical JSON) of what decides an audit's result besides model and dataset:
    the full `CamSettings` (given as one or as a dict; defaults filled in, so ``{}`` and the
    explicit defaults are the same key) and ``limit``. Execution options (workers, GPUs, shard size) are not part of it."""
    from diffcam.core.settings import CamSettings

    cam = CamSettings.model_validate(settings or {}).model_dump(mode="json")
    canonical = json.dumps({"cam": cam, "limit": limit}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest(), canonical


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class AuditRecord:
    """One audit of one (checkpoint, dataset, settings) triple: ``<store>/ops/audits/<run_id>.json``."""

    run_id: str
    model_line: str
    checkpoint: str  #: local folder that was audited
    model_hash: str
    dataset: str  #: dataset folder or manifest that was audited
    dataset_hash: str
    settings_hash: str
    settings_json: str  #: the canonical JSON of `settings_key`
    trigger: str  #: schedule | event | manual
    forced: bool = False
    claimed_at: str = ""  #: ISO UTC; refreshed when a failed run is resumed
    claimed_by: str | None = None  #: Prefect flow run id (or host:pid)
    source: dict[str, Any] = field(default_factory=dict)  #: registry / notification details
    previous_run_id: str | None = None  #: run compared against
    compare_verdict: str | None = None  #: pass | fail | none (nothing to compare against)
    compare_dir: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.model_hash, self.dataset_hash, self.settings_hash)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Claim:
    """`AuditLedger.claim`'s decision."""

    action: str  #: audit | resume | skip
    run_id: str | None  #: the run to create or resume; for skip, the run that covers it
    reason: str
    record: AuditRecord | None = None


class AuditLedger:
    """The store's audit ledger (module doc). Status comes from the store's run rows."""

    def __init__(self, store_root: str | os.PathLike[str], *, stale_after_s: float = 12 * 3600.0) -> None:
        from diffcam.storage.store import Store

        self.store = Store(store_root)
        self.dir = self.store.root / "ops" / "audits"
        self.stale_after_s = stale_after_s

    def _lock(self) -> AbstractContextManager[None]:
        from diffcam.storage.store import file_lock

        self.dir.mkdir(parents=True, exist_ok=True)
        return file_lock(self.dir.parent / ".audits.lock")

    def _path(self, run_id: str) -> Path:
        self.store.run_dir(run_id)  # validates the id (safe as a file name)
        return self.dir / f"{run_id}.json"

    def _write(self, rec: AuditRecord) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        from diffcam.storage.store import write_text_atomic

        write_text_atomic(self._path(rec.run_id), json.dumps(asdict(rec), indent=1, sort_keys=True))

    def records(self) -> list[AuditRecord]:
        """All records, oldest claim first."""
        if not self.dir.is_dir():
            return []
        recs = [AuditRecord.from_dict(json.loads(p.read_text()))
                for p in self.dir.glob("*.json") if not p.name.startswith(".")]
        return sorted(recs, key=lambda r: (r.claimed_at, r.run_id))

    def get(self, run_id: str) -> AuditRecord:
        path = self._path(run_id)
        if not path.is_file():
            raise KeyError(f"no audit record for run {run_id!r} in {self.dir}")
        return AuditRecord.from_dict(json.loads(path.read_text()))

    def update(self, run_id: str, **changes: Any) -> AuditRecord:
        with self._lock():
            rec = self.get(run_id)
            for k, v in changes.items():
                if not hasattr(rec, k):
                    raise ValueError(f"AuditRecord has no field {k!r}")
                setattr(rec, k, v)
            self._write(rec)
        return rec

    def status(self, run_id: str) -> str:
        """The run row's status, or ``claimed`` when the audit has not written it yet."""
        try:
            return str(self.store.read_run(run_id)["status"])
        except KeyError:
            return "claimed"

    def _age_s(self, rec: AuditRecord, now: datetime) -> float:
        try:
            return (now - datetime.fromisoformat(rec.claimed_at)).total_seconds()
        except ValueError:
            return float("inf")

    def claim(self, candidate: AuditRecord, *, force: bool = False, now: datetime | None = None) -> Claim:
        """Decide (module doc table) and, unless skipping, write the record — atomically with
        respect to other claims on the same store. ``candidate.run_id`` is used for a new
        run; a resume keeps the failed run's id (and its committed shards)."""
        now = now or _utcnow()
        with self._lock():
            same = [r for r in self.records() if r.key == candidate.key]
            statuses = {r.run_id: self.status(r.run_id) for r in same}
            newest_first = sorted(same, key=lambda r: (r.claimed_at, r.run_id), reverse=True)
            if not force:
                done = [r for r in newest_first if statuses[r.run_id] in DONE_STATUSES]
                if done:
                    r = done[0]
                    return Claim("skip", r.run_id, f"already audited with these settings: run {r.run_id} "
                                 f"({statuses[r.run_id]})", r)
            busy = [r for r in newest_first if statuses[r.run_id] in ("running", "claimed")]
            fresh = [r for r in busy if self._age_s(r, now) < self.stale_after_s]
            if fresh:
                r = fresh[0]
                return Claim("skip", r.run_id, f"in progress: run {r.run_id} ({statuses[r.run_id]}, "
                             f"claimed {r.claimed_at})", r)
            resumable = [r for r in newest_first if statuses[r.run_id] == "failed" or r in busy]
            if resumable and not force:
                r = resumable[0]
                r.claimed_at, r.claimed_by, r.trigger = now.isoformat(), candidate.claimed_by, candidate.trigger
                self._write(r)
                return Claim("resume", r.run_id, f"resuming run {r.run_id} ({statuses[r.run_id]})", r)
            rec = AuditRecord.from_dict({**asdict(candidate), "claimed_at": now.isoformat(), "forced": force})
            if self._path(rec.run_id).exists():
                raise FileExistsError(f"audit record {rec.run_id} exists; pick a new run id")
            self._write(rec)
            why = "forced re-audit" if force and same else "not audited with these settings yet"
            return Claim("audit", rec.run_id, why, rec)

    def release(self, run_id: str) -> bool:
        """Drop the record of a claim whose audit never wrote its run row (bad input found
        before the audit started), so that a fixed checkpoint is audited next time.
        Returns whether a record was removed; a record with a run row is kept."""
        with self._lock():
            if self.status(run_id) != "claimed":
                return False
            self._path(run_id).unlink(missing_ok=True)
            return True

    def previous(self, rec: AuditRecord) -> AuditRecord | None:
        """The newest earlier succeeded audit of the same model line on the same dataset and
        settings, with at least one audited sample (the baseline a regression report compares
        against), or None. Runs that failed validation or audited nothing are not baselines."""
        earlier = [
            r for r in self.records()
            if r.run_id != rec.run_id and r.model_line == rec.model_line
            and r.dataset_hash == rec.dataset_hash and r.settings_hash == rec.settings_hash
            and (r.claimed_at, r.run_id) < (rec.claimed_at, rec.run_id)
        ]
        for r in reversed(earlier):
            try:
                row = self.store.read_run(r.run_id)
            except KeyError:
                continue
            if row["status"] == "succeeded" and (row.get("n_results") or 0) > 0:
                return r
        return None


def new_audit_run_id(line: str, checkpoint: str, now: datetime | None = None) -> str:
    """``<line>-<checkpoint>-<YYYYmmddTHHMMSS>-<4 hex>``: readable, unique, a valid run id."""
    now = now or _utcnow()
    return f"{_slug(line, 40)}-{_slug(checkpoint, 40)}-{now.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:4]}"
