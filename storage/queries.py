"""Named, parameterised queries over the catalog views (see docs/QUERIES.md).

Every query binds its values as DuckDB named parameters (``$run_id``), never formats
them into SQL. Optional filters use ``($x IS NULL OR col = $x)``. The report and the
CLI read numbers only through these queries, so what the report shows is what
``diffcam sql`` returns.

    >>> run_query(store, "method_table", run_id="run-1")          # a pa.Table
    >>> with catalog.connect(store) as con:                      # reuse one connection
    ...     run_query(con, "run_summary", run_id="run-1")
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from diffcam.storage import catalog
from diffcam.storage.store import Store

__all__ = ["NamedQuery", "QUERIES", "REQUIRED", "run_query", "STAT_COLUMNS"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

#: token_maps statistics shown as distributions in the report.
STAT_COLUMNS = (
    "mass", "com_x", "com_y", "com_dist", "spread", "entropy", "gini",
    "border_frac", "centre_frac", "inside_frac", "obj_iou", "contrast_score", "concentration", "f3",
)


@dataclass(frozen=True)
class NamedQuery:
    name: str
    doc: str
    sql: str
    params: dict[str, Any] = field(default_factory=dict)  # name -> default (REQUIRED: must be given)

    def bind(self, given: dict[str, Any]) -> dict[str, Any]:
        unknown = set(given) - set(self.params)
        if unknown:
            raise ValueError(f"query {self.name!r}: unknown parameter(s) {sorted(unknown)}; takes {sorted(self.params)}")
        bound = {}
        for p, default in self.params.items():
            value = given.get(p, default)
            if value is REQUIRED:
                raise ValueError(f"query {self.name!r}: parameter {p!r} is required")
            bound[p] = value
        return bound


_Q: list[NamedQuery] = []


def _q(name: str, doc: str, sql: str, **params: Any) -> None:
    used = set(re.findall(r"\$([a-z_]+)", sql))
    if used != set(params):
        raise AssertionError(f"query {name}: SQL uses {sorted(used)}, declares {sorted(params)}")
    _Q.append(NamedQuery(name, doc, sql.strip(), params))


_q(
    "run_summary",
    "One row: the run row, counted rows per table, timings (mean / p50 / p95 seconds).",
    """
WITH s AS (
    SELECT count(*) AS n_results,
           avg(t_generate_s) AS mean_t_generate_s,
           avg(t_attribution_s) AS mean_t_attribution_s,
           avg(t_total_s) AS mean_t_total_s,
           quantile_cont(t_total_s, 0.5) AS p50_t_total_s,
           quantile_cont(t_total_s, 0.95) AS p95_t_total_s,
           sum(t_total_s) AS sum_t_total_s,
           avg(n_words) AS mean_n_words,
           avg(n_steps) AS mean_n_steps
    FROM samples WHERE run_id = $run_id),
f AS (SELECT count(*) AS n_failures FROM failures WHERE run_id = $run_id),
fl AS (SELECT count(*) AS n_flags, count(DISTINCT sample_id) AS n_flagged_samples,
              count(*) FILTER (WHERE confirmed) AS n_confirmed_flags,
              count(*) FILTER (WHERE confirmed IS NOT TRUE) AS n_candidate_flags
       FROM flags WHERE run_id = $run_id),
tm AS (SELECT count(*) AS n_maps, count(DISTINCT method) AS n_methods,
              count(*) FILTER (WHERE zero_map) AS n_zero_maps,
              count(*) FILTER (WHERE has_mask) AS n_masked_maps
       FROM token_maps WHERE run_id = $run_id)
SELECT r.run_id, r.status, r.model_uri, r.model_hash, r.dataset_uri, r.dataset_hash,
       r.code_version, r.trigger, r.parent_run_id, r.started_at, r.finished_at,
       epoch(r.finished_at) - epoch(r.started_at) AS wall_s,
       r.n_samples, r.n_shards, s.n_results, f.n_failures,
       r.n_samples - s.n_results - f.n_failures AS n_missing,
       fl.n_flags, fl.n_flagged_samples, fl.n_confirmed_flags, fl.n_candidate_flags,
       tm.n_maps, tm.n_methods, tm.n_zero_maps, tm.n_masked_maps,
       s.mean_t_generate_s, s.mean_t_attribution_s, s.mean_t_total_s,
       s.p50_t_total_s, s.p95_t_total_s, s.sum_t_total_s, s.mean_n_words, s.mean_n_steps,
       r.error, r.validation_json, r.config_json
FROM runs r, s, f, fl, tm
WHERE r.run_id = $run_id
""",
    run_id=REQUIRED,
)

_q(
    "runs_overview",
    "Per run (all runs): status, checkpoint, counted samples/failures/flags, mean and p95 time per sample.",
    """
WITH s AS (SELECT run_id, count(*) AS n_results, avg(t_total_s) AS mean_t_total_s,
                  quantile_cont(t_total_s, 0.95) AS p95_t_total_s, avg(mean_f3) AS mean_f3
           FROM samples GROUP BY run_id),
f AS (SELECT run_id, count(*) AS n_failures FROM failures GROUP BY run_id),
fl AS (SELECT run_id, count(*) AS n_flags FROM flags GROUP BY run_id)
SELECT r.run_id, r.status, r.model_hash, r.dataset_hash, r.started_at, r.n_samples,
       coalesce(s.n_results, 0) AS n_results, coalesce(f.n_failures, 0) AS n_failures,
       coalesce(fl.n_flags, 0) AS n_flags, s.mean_t_total_s, s.p95_t_total_s, s.mean_f3
FROM runs r
LEFT JOIN s USING (run_id) LEFT JOIN f USING (run_id) LEFT JOIN fl USING (run_id)
ORDER BY r.started_at, r.run_id
""",
)

_q(
    "method_table",
    "Per method, over words with a ground-truth mask: mean Obj-IoU, Contrast (over finite values; "
    "n_contrast_inf counts maps with nothing outside the mask), Contrast score, Concentration, "
    "F3 = harmonic mean of (mean Obj-IoU, mean Contrast score, mean Concentration) as in the "
    "paper's tables, mean per-word F3, pointing rate.",
    """
WITH m AS (
    SELECT method, count(*) AS n_maps, count(DISTINCT sample_id) AS n_samples,
           avg(obj_iou) AS obj_iou, avg(obj_iou_any) AS obj_iou_any,
           avg(contrast) FILTER (WHERE isfinite(contrast)) AS contrast,
           count(*) FILTER (WHERE isinf(contrast)) AS n_contrast_inf,
           avg(contrast_score) AS contrast_score, avg(concentration) AS concentration,
           avg(f3) AS mean_word_f3, avg(CAST(pointing_hit AS DOUBLE)) AS pointing_rate,
           avg(inside_frac) AS inside_frac,
           avg(specificity) AS specificity, avg(CAST(multi_pointing AS DOUBLE)) AS multi_pointing_rate,
           count(specificity) AS n_multi
    FROM token_maps
    WHERE run_id = $run_id AND has_mask
    GROUP BY method)
SELECT method, n_maps, n_samples, obj_iou, obj_iou_any, contrast, n_contrast_inf, contrast_score, concentration,
       CASE WHEN least(obj_iou, contrast_score, concentration) > 0
            THEN 3.0 / (1.0 / obj_iou + 1.0 / contrast_score + 1.0 / concentration)
            ELSE 0.0 END AS f3,
       mean_word_f3, pointing_rate, inside_frac, specificity, multi_pointing_rate, n_multi
FROM m
ORDER BY f3 DESC, method
""",
    run_id=REQUIRED,
)

_q(
    "faithfulness_table",
    "Per method, over the words whose faithfulness was measured (audit --faithfulness; no masks needed): "
    "mean deletion AUC (lower = removing what the map ranks first hurts the word sooner), mean insertion AUC "
    "(higher = better), vanish rate (the word left the regenerated answer after removing the top 1/8 of "
    "cells); ranked by vanish rate (the word-specific measure, docs/EVALUATION.md), then deletion AUC.",
    """
SELECT method, count(vanished) AS n_words, count(DISTINCT sample_id) AS n_samples,
       count(deletion_auc) AS n_informative,
       avg(deletion_auc) AS deletion_auc, avg(insertion_auc) AS insertion_auc,
       avg(CAST(vanished AS DOUBLE)) AS vanish_rate
FROM token_maps
WHERE run_id = $run_id AND (vanished IS NOT NULL OR deletion_auc IS NOT NULL)
GROUP BY method
ORDER BY vanish_rate DESC NULLS LAST, deletion_auc ASC NULLS LAST, method
""",
    run_id=REQUIRED,
)

_q(
    "worst_localised_words",
    "Words (with a mask) whose maps fall least inside their object, worst first: mean inside_frac, "
    "Obj-IoU, F3, pointing rate. run_id NULL = all runs.",
    """
SELECT word, count(*) AS n_maps, count(DISTINCT run_id || '/' || sample_id) AS n_samples,
       avg(inside_frac) AS mean_inside_frac, avg(obj_iou) AS mean_obj_iou, avg(f3) AS mean_f3,
       avg(CAST(pointing_hit AS DOUBLE)) AS pointing_rate
FROM token_maps
WHERE has_mask AND method = $method AND ($run_id IS NULL OR run_id = $run_id)
GROUP BY word
HAVING count(*) >= $min_maps
ORDER BY mean_inside_frac ASC, mean_obj_iou ASC, word
LIMIT $limit
""",
    run_id=None, method="diffusion-cam", min_maps=1, limit=20,
)

_q(
    "flag_rates_by_checkpoint",
    "Per checkpoint (runs.model_hash) and flag kind: runs, samples, flags, flagged samples, "
    "flag_rate = flagged samples / samples. kind NULL = all kinds.",
    """
WITH s AS (SELECT r.model_hash, count(DISTINCT r.run_id) AS n_runs, count(s.sample_id) AS n_samples
           FROM runs r LEFT JOIN samples s USING (run_id) GROUP BY r.model_hash),
f AS (SELECT r.model_hash, f.kind, count(*) AS n_flags,
             count(DISTINCT f.run_id || '/' || f.sample_id) AS n_flagged_samples
      FROM flags f JOIN runs r USING (run_id)
      WHERE $kind IS NULL OR f.kind = $kind
      GROUP BY r.model_hash, f.kind)
SELECT s.model_hash, f.kind, s.n_runs, s.n_samples,
       coalesce(f.n_flags, 0) AS n_flags, coalesce(f.n_flagged_samples, 0) AS n_flagged_samples,
       CASE WHEN s.n_samples > 0 THEN coalesce(f.n_flagged_samples, 0) / s.n_samples END AS flag_rate
FROM s LEFT JOIN f USING (model_hash)
ORDER BY s.model_hash, f.kind
""",
    kind=None,
)

_q(
    "words_leaving_object",
    "Maps of one word (case-insensitive) whose mass inside the object's mask is below a threshold.",
    """
SELECT t.run_id, t.sample_id, t.word_index, t.word, t.method, t.inside_frac, t.obj_iou, t.f3,
       t.com_x, t.com_y, s.image_path, s.prompt, s.answer
FROM token_maps t JOIN samples s USING (run_id, sample_id)
WHERE lower(t.word) = lower($word) AND t.has_mask AND t.inside_frac < $threshold
  AND t.method = $method AND ($run_id IS NULL OR t.run_id = $run_id)
ORDER BY t.inside_frac ASC, t.run_id, t.sample_id, t.word_index
LIMIT $limit
""",
    word=REQUIRED, threshold=0.5, method="diffusion-cam", run_id=None, limit=100,
)

_q(
    "word_stats",
    "Per word for one method: how often it occurs, commit step, zero maps, where its mass sits "
    "(centre of mass, spread, entropy, border/centre fractions) and, where masked, localisation.",
    """
SELECT word, bool_or(is_function) AS is_function, count(*) AS n_maps,
       count(DISTINCT run_id || '/' || sample_id) AS n_samples,
       avg(commit_step) AS mean_commit_step, avg(CAST(zero_map AS DOUBLE)) AS zero_map_rate,
       avg(mass) AS mean_mass, avg(com_x) AS mean_com_x, avg(com_y) AS mean_com_y,
       avg(com_dist) AS mean_com_dist, avg(spread) AS mean_spread, avg(entropy) AS mean_entropy,
       avg(gini) AS mean_gini, avg(border_frac) AS mean_border_frac, avg(centre_frac) AS mean_centre_frac,
       count(*) FILTER (WHERE has_mask) AS n_masked, avg(inside_frac) AS mean_inside_frac,
       avg(obj_iou) AS mean_obj_iou, avg(f3) AS mean_f3,
       avg(CAST(pointing_hit AS DOUBLE)) AS pointing_rate
FROM token_maps
WHERE method = $method AND ($run_id IS NULL OR run_id = $run_id)
GROUP BY word
HAVING count(*) >= $min_maps
ORDER BY n_maps DESC, word
LIMIT $limit
""",
    run_id=None, method="diffusion-cam", min_maps=1, limit=1000,
)

_q(
    "sample_ranking",
    "Samples of a run ranked by the method's mean per-word F3 over masked words (inside_frac "
    "where F3 is null); best=true: best first. Samples without a masked word are left out.",
    """
WITH m AS (
    SELECT sample_id, avg(f3) AS mean_f3, avg(inside_frac) AS mean_inside_frac,
           count(*) AS n_masked
    FROM token_maps
    WHERE run_id = $run_id AND method = $method AND has_mask
    GROUP BY sample_id)
SELECT s.sample_id, s.image_path, s.width, s.height, s.prompt, s.answer,
       m.mean_f3, m.mean_inside_frac, m.n_masked,
       coalesce(m.mean_f3, m.mean_inside_frac) AS score,
       CASE WHEN m.mean_f3 IS NOT NULL THEN 'f3' ELSE 'inside_frac' END AS score_kind
FROM samples s JOIN m USING (sample_id)
WHERE s.run_id = $run_id AND coalesce(m.mean_f3, m.mean_inside_frac) IS NOT NULL
ORDER BY CASE WHEN $best THEN -coalesce(m.mean_f3, m.mean_inside_frac)
              ELSE coalesce(m.mean_f3, m.mean_inside_frac) END, s.sample_id
LIMIT $limit
""",
    run_id=REQUIRED, method="diffusion-cam", best=True, limit=4,
)

_q(
    "sample_maps",
    "The maps of one sample for one method, in word order (for overlays).",
    """
SELECT word_index, word, is_function, grid_h, grid_w, map, map_max, zero_map, has_mask,
       inside_frac, obj_iou, f3
FROM token_maps
WHERE run_id = $run_id AND sample_id = $sample_id AND method = $method
ORDER BY word_index
""",
    run_id=REQUIRED, sample_id=REQUIRED, method="diffusion-cam",
)

_q(
    "map_stat_values",
    "Per-map statistics of a run (one row per map) for distribution plots.",
    "SELECT method, " + ", ".join(STAT_COLUMNS) + " FROM token_maps WHERE run_id = $run_id ORDER BY method",
    run_id=REQUIRED,
)

_q(
    "run_flags",
    "Flags of a run with their evidence: confirmed findings first, then candidates; highest score first.",
    """
SELECT flag_id, kind, sample_id, word_index, word, method, score, threshold, confirmed, region, evidence_json
FROM flags WHERE run_id = $run_id
ORDER BY confirmed IS NOT TRUE, score DESC, kind, flag_id
LIMIT $limit
""",
    run_id=REQUIRED, limit=1000,
)

_q(
    "run_failures",
    "Failures of a run in manifest order.",
    """
SELECT sample_id, shard_id, line_no, stage, error_class, message, attempts
FROM failures WHERE run_id = $run_id
ORDER BY line_no NULLS LAST, sample_id
LIMIT $limit
""",
    run_id=REQUIRED, limit=1000,
)

_q(
    "failure_counts",
    "Failures of a run per stage and error class.",
    """
SELECT stage, error_class, count(*) AS n_failures, min(message) AS example_message
FROM failures WHERE run_id = $run_id
GROUP BY stage, error_class
ORDER BY n_failures DESC, stage, error_class
""",
    run_id=REQUIRED,
)

QUERIES: dict[str, NamedQuery] = {q.name: q for q in _Q}


def run_query(
    store_or_con: Store | str | os.PathLike[str] | duckdb.DuckDBPyConnection,
    name: str,
    **params: Any,
) -> pa.Table:
    """Run the named query with bound parameters; returns an Arrow table.

    Pass a connection from `catalog.connect` to run several queries on one snapshot.
    """
    try:
        query = QUERIES[name]
    except KeyError:
        raise ValueError(f"unknown query {name!r}; queries are {sorted(QUERIES)}") from None
    bound = query.bind(params) or None
    if isinstance(store_or_con, duckdb.DuckDBPyConnection):
        return store_or_con.sql(query.sql, params=bound).to_arrow_table()
    con = catalog.connect(store_or_con)
    try:
        return con.sql(query.sql, params=bound).to_arrow_table()
    finally:
        con.close()
