"""Great Expectations suites over one run's tables.

`validate_run` pulls the run's committed rows through the DuckDB catalog into pandas,
builds one ephemeral GX 1.x suite per table (nothing is written to disk) and returns a
`ValidationResult`. Most expectations come from the schemas, so the contract lives in
one place (`storage/schemas.py` field metadata):

- every non-nullable column is not null ("between" expectations skip nulls, so ranged
  columns are paired with not-null where the schema says so),
- ``range`` metadata → ``expect_column_values_to_be_between``,
- ``values`` metadata → ``expect_column_values_to_be_in_set``,
- `KEYS` → compound uniqueness.

Plus the cross-table rules: ``samples + failures == runs.n_samples`` with every sample
in exactly one of them, stored ``n_results`` / ``n_failures`` equal to the counted rows,
every (sample, word) has a map for every method (the run config's ``methods`` if it
lists them, else every method seen in the run), every sample's ``n_words`` words have
maps, maps belong to audited samples, a map's bytes match its grid, a masked word has
its mask metrics (`MASK_METRICS`), specificity only on masked words and faithfulness only
on content words, and the committed files still match their commit markers' sha256.

The flow records the verdict: ``store.update_run(run_id, validation_json=res.to_json(),
status="validation_failed" if not res.success else ...)``; the report reads it back.

great_expectations is imported lazily (~3-4 s) and only here; analytics and progress
bars are switched off.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from diffcam.storage import catalog
from diffcam.storage.jsonable import jsonable
from diffcam.storage.schemas import KEYS, TABLES, field_range, field_values
from diffcam.storage.store import Store

__all__ = ["ValidationResult", "validate_run", "MASK_METRICS"]

#: Columns a map must have when its word has a mask. contrast, contrast_score and f3 are
#: left out: they are undefined (null) when the mask covers the whole image.
MASK_METRICS = ("inside_frac", "enrichment", "pointing_hit", "obj_iou", "obj_iou_any", "concentration")


@dataclass(frozen=True)
class ValidationResult:
    run_id: str
    success: bool
    per_expectation: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [e for e in self.per_expectation if not e["success"]]

    def to_json(self) -> str:
        return json.dumps(
            {"run_id": self.run_id, "success": self.success, "per_expectation": self.per_expectation},
            sort_keys=True, default=str,
        )

    @classmethod
    def from_json(cls, text: str) -> ValidationResult:
        d = json.loads(text)
        return cls(run_id=d["run_id"], success=bool(d["success"]), per_expectation=list(d["per_expectation"]))


def _import_gx() -> tuple[Any, Any]:
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx
    import great_expectations.expectations as gxe

    return gx, gxe


class _Suites:
    """Collects (frame, expectations) per table and runs them in one ephemeral context."""

    def __init__(self, run_id: str) -> None:
        self.gx, self.gxe = _import_gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.ctx = self.gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.run_id = run_id
        self.frames: dict[str, Any] = {}
        self.expectations: dict[str, list[Any]] = {}
        self.extra: list[dict[str, Any]] = []

    def add(self, table: str, name: str, kind: str, *, when: tuple[str, Any] | None = None, **kwargs: Any) -> None:
        """Add expectation ``kind`` (a gxe class name); ``when=(column, value)`` limits it to
        the rows where ``column == value``."""
        cls = getattr(self.gxe, kind)
        if when is not None:
            from great_expectations.expectations.row_conditions import Column

            kwargs["row_condition"] = Column(when[0]) == when[1]
        self.expectations.setdefault(table, []).append(cls(meta={"name": name}, **kwargs))

    def run(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i, (table, exps) in enumerate(self.expectations.items()):
            suite = self.gx.ExpectationSuite(name=f"diffcam-{self.run_id}-{table}", expectations=exps)
            bd = (
                self.ctx.data_sources.add_pandas(f"src{i}")
                .add_dataframe_asset(f"asset{i}")
                .add_batch_definition_whole_dataframe("all")
            )
            res = bd.get_batch(batch_parameters={"dataframe": self.frames[table]}).validate(
                suite, result_format="SUMMARY"
            )
            by_name = {r.expectation_config.meta["name"]: r for r in res.results}
            for exp in exps:  # keep the order the suite was written in
                r = by_name[exp.meta["name"]]
                details = {
                    k: r.result[k]
                    for k in ("observed_value", "element_count", "unexpected_count", "partial_unexpected_list")
                    if k in r.result
                }
                if "partial_unexpected_list" in details:
                    details["partial_unexpected_list"] = details["partial_unexpected_list"][:5]
                exc = r.exception_info or {}
                if exc.get("raised_exception"):
                    details["exception"] = exc.get("exception_message")
                elif not r.success and not details:
                    details["exception_info"] = str(exc)[:500]
                out.append({
                    "table": table.split(":")[0],
                    "expectation": exp.meta["name"],
                    "success": bool(r.success),
                    "details": jsonable(details),
                })
        return out + self.extra


#: Columns not pulled into pandas, and the derived column that stands for them.
_STAND_INS = {("token_maps", "map"): "_map_len"}


def _schema_expectations(s: _Suites, table: str) -> None:
    schema = TABLES[table]
    for f in schema:
        if not f.nullable:
            s.add(table, f"{f.name} not null", "ExpectColumnValuesToNotBeNull",
                  column=_STAND_INS.get((table, f.name), f.name))
        rng = field_range(f)
        if rng is not None:
            lo, hi = rng
            label = f"{'' if lo is None else f'{lo:g} <= '}{f.name}{'' if hi is None else f' <= {hi:g}'}"
            s.add(table, label, "ExpectColumnValuesToBeBetween", column=f.name, min_value=lo, max_value=hi)
        values = field_values(f)
        if values is not None:
            s.add(table, f"{f.name} in {{{', '.join(values)}}}", "ExpectColumnValuesToBeInSet",
                  column=f.name, value_set=list(values))
    keys = list(KEYS[table])
    if len(keys) == 1:
        s.add(table, f"({keys[0]}) unique", "ExpectColumnValuesToBeUnique", column=keys[0])
    else:
        s.add(table, f"({', '.join(keys)}) unique", "ExpectCompoundColumnsToBeUnique", column_list=keys)


def _expected_methods(config_json: str | None, seen: list[str]) -> tuple[list[str], str]:
    try:
        methods = json.loads(config_json or "{}").get("methods")
    except (json.JSONDecodeError, AttributeError):
        methods = None
    if isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods):
        return sorted(methods), "run config"
    return sorted(seen), "methods seen in the run"


def validate_run(store: Store | str | os.PathLike[str], run_id: str, *, check_files: bool = True) -> ValidationResult:
    """Validate one run's committed tables; see the module docstring for the rules.

    ``check_files`` re-hashes every committed file against its commit marker.
    """
    import pandas as pd

    st = store if isinstance(store, Store) else Store(store)
    st.read_run(run_id)  # KeyError for an unknown run
    con = catalog.connect(st)
    p = {"run_id": run_id}
    try:
        def frame(sql: str) -> Any:
            return con.sql(sql, params=p).df()

        runs = frame("SELECT * FROM runs WHERE run_id = $run_id")
        samples = frame("SELECT * FROM samples WHERE run_id = $run_id")
        failures = frame("SELECT * FROM failures WHERE run_id = $run_id")
        flags = frame("SELECT * FROM flags WHERE run_id = $run_id")
        token_maps = frame("""
            SELECT t.* EXCLUDE (map), octet_length(t.map) AS _map_len,
                   CAST(t.grid_h AS INTEGER) * t.grid_w AS _grid_cells,
                   s.sample_id IS NOT NULL AS _in_samples
            FROM token_maps t
            LEFT JOIN (SELECT sample_id FROM samples WHERE run_id = $run_id) s USING (sample_id)
            WHERE t.run_id = $run_id""")
        outcomes = frame("""
            SELECT sample_id, 'samples' AS outcome FROM samples WHERE run_id = $run_id
            UNION ALL SELECT sample_id, 'failures' FROM failures WHERE run_id = $run_id""")
        word_methods = frame("""
            SELECT sample_id, word_index, count(DISTINCT method) AS n_methods,
                   list(DISTINCT method ORDER BY method) AS methods
            FROM token_maps WHERE run_id = $run_id GROUP BY sample_id, word_index""")
        sample_words = frame("""
            SELECT s.sample_id, s.n_words, coalesce(t.n_words_mapped, 0) AS n_words_mapped
            FROM samples s
            LEFT JOIN (SELECT sample_id, count(DISTINCT word_index) AS n_words_mapped
                       FROM token_maps WHERE run_id = $run_id GROUP BY sample_id) t USING (sample_id)
            WHERE s.run_id = $run_id""")
        seen_methods = [r[0] for r in con.sql(
            "SELECT DISTINCT method FROM token_maps WHERE run_id = $run_id ORDER BY 1", params=p).fetchall()]
    finally:
        con.close()

    s = _Suites(run_id)
    s.frames.update(runs=runs, samples=samples, failures=failures, flags=flags, token_maps=token_maps)
    for table in ("runs", "samples", "token_maps", "flags", "failures"):
        _schema_expectations(s, table)
    s.add("runs", "exactly one run row", "ExpectTableRowCountToEqual", value=1)

    # token_maps: bytes match the grid, zero maps have max 0, masked words have their metrics
    s.add("token_maps", "octet_length(map) == grid_h * grid_w", "ExpectColumnPairValuesToBeEqual",
          column_A="_map_len", column_B="_grid_cells")
    s.add("token_maps", "zero_map -> map_max == 0", "ExpectColumnValuesToBeBetween", column="map_max",
          min_value=0, max_value=0, when=("zero_map", True))
    for col in MASK_METRICS:
        s.add("token_maps", f"has_mask -> {col} not null", "ExpectColumnValuesToNotBeNull", column=col,
              when=("has_mask", True))
    # evidence columns: specificity only where the word has a mask; faithfulness only on content words
    s.add("token_maps", "has_mask false -> specificity null", "ExpectColumnValuesToBeNull", column="specificity",
          when=("has_mask", False))
    s.add("token_maps", "function word -> vanished null", "ExpectColumnValuesToBeNull", column="vanished",
          when=("is_function", True))
    s.add("token_maps", "maps belong to audited samples", "ExpectColumnValuesToBeInSet",
          column="_in_samples", value_set=[True])

    run_row = runs.iloc[0] if len(runs) else None
    n_samples = int(run_row["n_samples"]) if run_row is not None else 0
    # reconcile: every manifest sample is in exactly one of samples / failures
    s.frames["samples+failures"] = outcomes
    s.add("samples+failures", "samples + failures == runs.n_samples", "ExpectTableRowCountToEqual", value=n_samples)
    s.add("samples+failures", "each sample in exactly one of samples / failures", "ExpectColumnValuesToBeUnique",
          column="sample_id")
    if run_row is not None:
        for col, table in (("n_results", "samples"), ("n_failures", "failures")):
            value = run_row[col]
            if not pd.isna(value):  # null while the run is still running
                s.add(table, f"row count == runs.{col}", "ExpectTableRowCountToEqual", value=int(value))

    methods, source = _expected_methods(run_row["config_json"] if run_row is not None else None, seen_methods)
    s.frames["token_maps:words"] = word_methods
    if methods:
        s.add("token_maps:words", f"every word has all {len(methods)} methods ({source})",
              "ExpectColumnValuesToBeBetween", column="n_methods", min_value=len(methods), max_value=len(methods))
        s.add("token_maps", f"method in {source}", "ExpectColumnValuesToBeInSet", column="method", value_set=methods)
    s.frames["samples:words"] = sample_words
    s.add("samples:words", "samples.n_words == words with maps", "ExpectColumnPairValuesToBeEqual",
          column_A="n_words", column_B="n_words_mapped")

    if check_files:
        problems = st.verify(run_id)
        s.extra.append({
            "table": "store", "expectation": "committed files match their commit markers (sha256)",
            "success": not problems, "details": {"problems": problems[:20], "n_problems": len(problems)},
        })

    per = s.run()
    return ValidationResult(run_id=run_id, success=all(e["success"] for e in per), per_expectation=per)
