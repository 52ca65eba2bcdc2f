"""The run's last steps as Prefect tasks: bias analysis, validation, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

__all__ = ["dataset_flags_task", "validate_run_task", "report_task"]


@task(name="dataset-flags", cache_policy=NO_CACHE)
def dataset_flags_task(store_root: str, run_id: str, model_dir: str, dataset: Any, settings: Any,
                       answerer: Any = None, scanner: Any = None) -> int:
    """Dataset-level bias analysis (`diffcam.tasks.bias.step`) after all shards; commits the flags once.

    ``dataset``: the `diffcam.storage.datasets.Dataset` the flow loaded (not read again) or its path;
    ``settings``: the `BiasSettings` recorded in the run's config; ``answerer``: generation
    settings → answerer for the counterfactuals (the flow's Ray workers, `diffcam.tasks.answers`);
    ``scanner``: the same for the discovery scan (`diffcam.tasks.scan`); None: the model in
    ``model_dir``, loaded here.

    Idempotent: a resumed run whose dataset flags are already committed writes nothing.
    Returns the number of flag rows written (0 when they were already there).
    """
    from diffcam.storage.store import Store
    from diffcam.tasks.bias.step import run_dataset_flags, write_dataset_flags

    st = Store(store_root)
    if st.is_committed(run_id, "dataset"):
        return 0
    rows = run_dataset_flags(st, run_id, model_dir, dataset, settings, answerer=answerer, scanner=scanner)
    return len(rows) if write_dataset_flags(st, run_id, rows) else 0


@task(name="validate-run", cache_policy=NO_CACHE)
def validate_run_task(store_root: str, run_id: str):
    """`diffcam.storage.validation.validate_run` (GX is imported lazily, here, ~4 s)."""
    from diffcam.storage.validation import validate_run

    return validate_run(store_root, run_id)


@task(name="build-report", cache_policy=NO_CACHE)
def report_task(store_root: str, run_id: str, validation=None) -> tuple[Path, Path]:
    """`diffcam.storage.report.build_report` → (report.html, summary.md) under ``<store>/reports/<run_id>/``."""
    from diffcam.storage.report import DEFAULT_SECTIONS, build_report
    from diffcam.tasks.bias.report import BIAS_SECTION

    return build_report(store_root, run_id, validation=validation, sections=[*DEFAULT_SECTIONS, BIAS_SECTION])
