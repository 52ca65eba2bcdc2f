"""The run's last steps as Prefect tasks: validate the committed tables, write the report."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

__all__ = ["validate_run_task", "report_task"]


@task(name="validate-run", cache_policy=NO_CACHE)
def validate_run_task(store_root: str, run_id: str):
    """`storage.validation.validate_run` (GX is imported lazily, here, ~4 s)."""
    from storage.validation import validate_run

    return validate_run(store_root, run_id)


@task(name="build-report", cache_policy=NO_CACHE)
def report_task(store_root: str, run_id: str, validation=None) -> tuple[Path, Path]:
    """`storage.report.build_report` → (report.html, summary.md) under ``<store>/reports/<run_id>/``."""
    from storage.report import build_report

    return build_report(store_root, run_id, validation=validation)
