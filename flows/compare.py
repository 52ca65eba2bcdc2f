"""Checkpoint-to-checkpoint regression report: ``diffcam compare RUN_A RUN_B``.

Run A is the baseline (the previous checkpoint), run B the candidate. Both are read from
the store through `diffcam.storage.catalog` (DuckDB, bound parameters). The report holds:

- **overall** and **per word** (lower-cased), for one CAM method (default
  ``diffusion-cam``): localisation metrics over words with a ground-truth mask
  (`LOCALISATION`) and map statistics over every word (`STATISTICS`); for each, the counts,
  means, the change B − A, the two-sample Kolmogorov–Smirnov statistic and p-value
  (`scipy.stats.ks_2samp`, exact for small samples), the 1-Wasserstein distance
  (`scipy.stats.wasserstein_distance`) and a Benjamini–Hochberg q-value over all per-word
  tests of the report (`scipy.stats.false_discovery_control`) — many words × metrics are
  tested at once, so raw p-values would raise false alarms;
- **flags**: new (in B, not in A), resolved (in A, not in B), newly confirmed and no
  longer confirmed, keyed by (kind, sample_id, word, method); any kinds in the ``flags``
  table are accepted;
- a **verdict** against `CompareGates` (typed; a TOML/JSON file or flags set it).

Obj-IoU and the other [0, 1] metrics are reported and gated in *points* (×100).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field, field_validator

from diffcam.core.settings import Settings
from diffcam.storage.jsonable import jsonable

__all__ = [
    "CompareGates",
    "GateResult",
    "Comparison",
    "LOCALISATION",
    "STATISTICS",
    "compare_runs",
    "write_comparison",
    "load_gates",
    "flag_diff",
    "metric_row",
]

#: Localisation metrics (rows with a mask only), all in [0, 1]: gated and shown in points.
LOCALISATION = ("obj_iou", "inside_frac", "pointing_hit", "concentration", "contrast_score", "f3")
#: Map statistics (every word's map).
STATISTICS = ("mass", "com_x", "com_y", "com_dist", "spread", "entropy", "gini", "border_frac", "centre_frac")


#: A gate limit in percentage points: a finite number >= 0.
Points = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class CompareGates(Settings):
    """Pass/fail gates of a comparison. ``None`` switches a gate off.

    ``*_points`` are percentage points of a [0, 1] metric: ``max_obj_iou_drop_points=2``
    fails when mean Obj-IoU of B is more than 0.02 below A's.
    """

    method: str = "diffusion-cam"
    #: overall mean Obj-IoU may drop by less than this many points
    max_obj_iou_drop_points: Points | None = 2.0
    #: per word (with >= min_word_maps masked maps in both runs): Obj-IoU drop limit
    max_word_obj_iou_drop_points: Points | None = None
    #: overall pointing-game hit rate may drop by less than this many points
    max_pointing_drop_points: Points | None = None
    #: failure rate (failures / samples) may rise by at most this many points
    max_failure_rate_increase_points: Points | None = 5.0
    #: flag kinds (glob patterns) that must not appear in B unless already in A. ``clever_hans``
    #: is the spurious-correlation flag of tasks/bias/step.py (docs/BIAS.md; ``confirmed`` = the
    #: counterfactual's verdict). Add patterns (e.g. ``suspect_*``) to gate on other kinds.
    fail_on_new_flag_kinds: tuple[str, ...] = ("clever_hans",)
    #: count only flags with confirmed = true for the gate above
    new_flags_confirmed_only: bool = True
    #: both runs must have status 'succeeded'
    require_success: bool = True
    #: both runs must audit the same dataset (same content hash)
    require_same_dataset: bool = True
    #: minimum maps per side for a per-word test or gate
    min_word_maps: int = Field(5, ge=1)
    #: q-value below which a per-word change is marked significant in the report
    alpha: float = Field(0.05, gt=0, lt=1)

    @field_validator("fail_on_new_flag_kinds", mode="before")
    @classmethod
    def _one_pattern(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v  # one pattern given alone in TOML or JSON


def load_gates(path: str | os.PathLike[str]) -> CompareGates:
    """Gates from a ``.toml`` (top level or a ``[gates]`` table) or ``.json`` file."""
    p = Path(path)
    text = p.read_text()
    data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    if "gates" in data and isinstance(data["gates"], dict):
        data = data["gates"]
    return CompareGates.model_validate(data)


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    observed: Any
    limit: Any
    detail: str


@dataclass
class Comparison:
    run_a: dict[str, Any]
    run_b: dict[str, Any]
    method: str
    gates: CompareGates
    overall: list[dict[str, Any]]
    words: list[dict[str, Any]]
    flags: dict[str, Any]
    gate_results: list[GateResult]
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gate_results)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({
            "verdict": "pass" if self.passed else "fail",
            "passed": self.passed,
            "run_a": self.run_a,
            "run_b": self.run_b,
            "method": self.method,
            "gates": self.gates.model_dump(mode="json"),
            "gate_results": [asdict(g) for g in self.gate_results],
            "overall": self.overall,
            "words": self.words,
            "flags": self.flags,
            "warnings": self.warnings,
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False, allow_nan=False)

    def to_markdown(self, max_words: int = 30) -> str:
        a, b = self.run_a["run_id"], self.run_b["run_id"]
        lines = [f"# diffcam compare `{a}` → `{b}`", "",
                 f"**Verdict: {'PASS' if self.passed else 'FAIL'}** · method `{self.method}`", ""]
        lines += ["| run | role | status | model hash | dataset hash | samples | failures |",
                  "|---|---|---|---|---|---|---|"]
        for role, r in (("baseline (A)", self.run_a), ("candidate (B)", self.run_b)):
            lines.append(f"| `{r['run_id']}` | {role} | {r['status']} | `{str(r['model_hash'])[:12]}` | "
                         f"`{str(r['dataset_hash'])[:12]}` | {r['n_results']} | {r['n_failures']} |")
        for w in self.warnings:
            lines += ["", f"> warning: {w}"]
        lines += ["", "## Gates", "", "| gate | result | observed | limit | detail |", "|---|---|---|---|---|"]
        for g in self.gate_results:
            lines.append(f"| {g.name} | {'pass' if g.passed else '**FAIL**'} | {_fmt(g.observed)} | "
                         f"{_fmt(g.limit)} | {_md_escape(g.detail)} |")
        cols = ["metric", "n_a", "n_b", "mean_a", "mean_b", "delta", "ks_stat", "ks_p", "wasserstein"]
        lines += ["", "## Overall", "", _md_table(self.overall, cols)]
        sig = [w for w in self.words if w.get("significant")]
        ranked = sorted(self.words, key=lambda w: (not w.get("significant"), _nz(w.get("q")),
                                                   -abs(_nz(w.get("delta"), 0.0))))
        lines += ["", f"## Per word ({len(sig)} significant change(s) at q < {self.gates.alpha}; "
                  f"{min(max_words, len(ranked))} of {len(ranked)} rows shown)", "",
                  _md_table(ranked[:max_words], ["word", *cols, "q", "significant"])]
        fl = self.flags
        lines += ["", "## Flags", "",
                  f"A: {fl['n_a']} · B: {fl['n_b']} · new {len(fl['new'])} · resolved {len(fl['resolved'])} · "
                  f"newly confirmed {len(fl['newly_confirmed'])} · no longer confirmed "
                  f"{len(fl['no_longer_confirmed'])} · persisting {fl['n_persisting']}"]
        fcols = ["kind", "word", "sample_id", "method", "score", "threshold", "confirmed"]
        for title, key in (("New", "new"), ("Newly confirmed", "newly_confirmed"), ("Resolved", "resolved")):
            if fl[key]:
                lines += ["", f"### {title}", "", _md_table(fl[key][:50], fcols)]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- helpers


def _nz(v: Any, default: float = 1.0) -> float:
    return default if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    """The report's markdown table with this report's cell format; "(none)" for no rows."""
    from diffcam.storage.report import md_table

    return md_table(rows, cols, fmt=_fmt) if rows else "(none)"


def metric_row(a: np.ndarray, b: np.ndarray, *, min_n: int = 1) -> dict[str, Any]:
    """Counts, means, B − A, KS (statistic, p) and 1-Wasserstein of two samples (NaNs and
    infinities dropped). Tests need at least ``min_n`` finite values on each side."""
    from scipy import stats

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    row: dict[str, Any] = {"n_a": int(a.size), "n_b": int(b.size),
                           "mean_a": float(a.mean()) if a.size else None,
                           "mean_b": float(b.mean()) if b.size else None,
                           "delta": None, "ks_stat": None, "ks_p": None, "wasserstein": None}
    if a.size and b.size:
        row["delta"] = row["mean_b"] - row["mean_a"]
    if a.size >= min_n and b.size >= min_n and a.size and b.size:
        ks = stats.ks_2samp(a, b)
        row["ks_stat"], row["ks_p"] = float(ks.statistic), float(ks.pvalue)
        row["wasserstein"] = float(stats.wasserstein_distance(a, b))
    return row


def flag_diff(flags_a: Sequence[dict[str, Any]], flags_b: Sequence[dict[str, Any]],
              kinds: Sequence[str] = (), confirmed_only: bool = True) -> dict[str, Any]:
    """New / resolved / (newly / no longer) confirmed flags between two runs.

    Flags are keyed by (kind, sample_id, lower(word), method); several flags with one key
    (e.g. a word said twice) merge: max score, confirmed if any is. ``gate`` lists the B
    flags that match ``kinds`` (glob patterns; empty: none) — and are confirmed when
    ``confirmed_only`` — whose key does not match them in A."""

    def merged(rows: Sequence[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
        out: dict[tuple, dict[str, Any]] = {}
        for r in rows:
            word = r.get("word")
            k = (r["kind"], r.get("sample_id"), word.lower() if isinstance(word, str) else None, r.get("method"))
            keep = {c: r.get(c) for c in ("kind", "sample_id", "word", "method", "score", "threshold", "confirmed",
                                          "region")}
            if k in out:
                prev = out[k]
                prev["score"] = max(_nz(prev["score"], -math.inf), _nz(keep["score"], -math.inf))
                prev["confirmed"] = True if (prev["confirmed"] or keep["confirmed"]) else (
                    prev["confirmed"] if prev["confirmed"] is not None else keep["confirmed"])
            else:
                out[k] = keep
        return out

    def order(keys: set[tuple], src: dict[tuple, dict[str, Any]]) -> list[dict[str, Any]]:
        return [src[k] for k in sorted(keys, key=lambda k: tuple("" if x is None else str(x) for x in k))]

    def gated(r: dict[str, Any]) -> bool:
        return any(fnmatch.fnmatchcase(r["kind"], p) for p in kinds) and (r["confirmed"] is True or not confirmed_only)

    a, b = merged(flags_a), merged(flags_b)
    new, resolved, both = set(b) - set(a), set(a) - set(b), set(a) & set(b)
    newly = {k for k in both if b[k]["confirmed"] is True and a[k]["confirmed"] is not True}
    no_longer = {k for k in both if a[k]["confirmed"] is True and b[k]["confirmed"] is not True}
    gate_keys = {k for k, r in b.items() if gated(r) and not (k in a and gated(a[k]))}
    by_kind: dict[str, dict[str, int]] = {}
    for side, d in (("a", a), ("b", b)):
        for r in d.values():
            by_kind.setdefault(r["kind"], {"a": 0, "b": 0})[side] += 1
    return {
        "n_a": len(a), "n_b": len(b),
        "new": order(new, b), "resolved": order(resolved, a),
        "newly_confirmed": order(newly, b), "no_longer_confirmed": order(no_longer, b),
        "n_persisting": len(both), "by_kind": by_kind, "gate": order(gate_keys, b),
    }


# ----------------------------------------------------------------------------- compare

_RUN_SQL = """
SELECT r.run_id, r.status, r.model_uri, r.model_hash, r.dataset_uri, r.dataset_hash, r.config_json,
       r.n_samples, r.started_at, r.finished_at,
       (SELECT count(*) FROM samples s WHERE s.run_id = r.run_id) AS n_results,
       (SELECT count(*) FROM failures f WHERE f.run_id = r.run_id) AS n_failures
FROM runs r WHERE r.run_id = ?
"""
_MAPS_SQL = (
    "SELECT lower(word) AS word, has_mask, "
    + ", ".join(f"CAST({c} AS DOUBLE) AS {c}" for c in (*LOCALISATION, *STATISTICS))
    + " FROM token_maps WHERE run_id = ? AND method = ?"
)
_FLAGS_SQL = ("SELECT kind, sample_id, word_index, word, method, score, threshold, confirmed, region "
              "FROM flags WHERE run_id = ?")


def _columns(con: Any, sql: str, params: list[Any]) -> dict[str, np.ndarray]:
    t = con.execute(sql, params).fetchnumpy()
    return {k: (v.filled(np.nan) if hasattr(v, "filled") and v.dtype.kind == "f" else np.asarray(v))
            for k, v in t.items()}


def _rows(con: Any, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cur = con.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def _values(cols: dict[str, np.ndarray], metric: str, word: str | None) -> np.ndarray:
    sel = np.ones(len(cols["word"]), dtype=bool) if word is None else (cols["word"] == word)
    if metric in LOCALISATION:
        sel &= cols["has_mask"].astype(bool)
    v = cols[metric][sel]
    return np.asarray(v, dtype=np.float64)


def compare_runs(store: Any, run_a: str, run_b: str, gates: CompareGates | None = None) -> Comparison:
    """Compare run B (candidate) against run A (baseline); see the module doc.

    `KeyError` when a run is not in the store."""
    from scipy import stats

    from diffcam.storage import catalog
    from diffcam.storage.store import Store

    gates = gates or CompareGates()
    st = store if isinstance(store, Store) else Store(store)
    for rid in (run_a, run_b):
        st.read_run(rid)  # KeyError for a missing run, ValueError for a bad id
    con = catalog.connect(st)
    try:
        runs = {rid: _rows(con, _RUN_SQL, [rid])[0] for rid in (run_a, run_b)}
        maps = {rid: _columns(con, _MAPS_SQL, [rid, gates.method]) for rid in (run_a, run_b)}
        flags = {rid: _rows(con, _FLAGS_SQL, [rid]) for rid in (run_a, run_b)}
    finally:
        con.close()
    ra, rb = runs[run_a], runs[run_b]
    ma, mb = maps[run_a], maps[run_b]
    warnings: list[str] = []
    if ra["dataset_hash"] != rb["dataset_hash"]:
        warnings.append(f"different datasets ({ra['dataset_uri']} vs {rb['dataset_uri']}): "
                        "per-word changes mix model and data differences")
    cfg_a, cfg_b = (_cam_config(r["config_json"]) for r in (ra, rb))
    if cfg_a != cfg_b:
        warnings.append("different CAM settings or limits between the runs")
    if run_a == run_b:
        warnings.append("RUN_A and RUN_B are the same run")
    for rid, m in ((run_a, ma), (run_b, mb)):
        if len(m["word"]) == 0:
            warnings.append(f"run {rid} has no maps for method {gates.method!r}")

    metrics = (*LOCALISATION, *STATISTICS)
    overall = [{"metric": m, **metric_row(_values(ma, m, None), _values(mb, m, None), min_n=1)} for m in metrics]
    words_all = sorted(set(ma["word"].tolist()) | set(mb["word"].tolist()))
    word_rows: list[dict[str, Any]] = []
    for w in words_all:
        for m in metrics:
            row = metric_row(_values(ma, m, w), _values(mb, m, w), min_n=gates.min_word_maps)
            if row["n_a"] == 0 and row["n_b"] == 0:
                continue
            word_rows.append({"word": w, "metric": m, **row})
    tested = [r for r in word_rows if r["ks_p"] is not None]
    if tested:
        q = stats.false_discovery_control(np.array([r["ks_p"] for r in tested]), method="bh")
        for r, qv in zip(tested, q):
            r["q"] = float(qv)
    for r in word_rows:
        r.setdefault("q", None)
        r["significant"] = r["q"] is not None and r["q"] < gates.alpha

    fd = flag_diff(flags[run_a], flags[run_b], gates.fail_on_new_flag_kinds, gates.new_flags_confirmed_only)
    summary = {rid: _run_summary(r) for rid, r in runs.items()}
    results = _gate_results(gates, summary[run_a], summary[run_b], overall, word_rows, fd)
    return Comparison(summary[run_a], summary[run_b], gates.method, gates, overall, word_rows, fd, results, warnings)


def _cam_config(config_json: str | None) -> Any:
    try:
        cfg = json.loads(config_json or "{}")
    except json.JSONDecodeError:
        return None
    return ({k: v for k, v in cfg.items() if k != "audit"}, (cfg.get("audit") or {}).get("limit"))


def _run_summary(r: dict[str, Any]) -> dict[str, Any]:
    n = r["n_results"] + r["n_failures"]
    return {
        "run_id": r["run_id"], "status": r["status"], "model_uri": r["model_uri"], "model_hash": r["model_hash"],
        "dataset_uri": r["dataset_uri"], "dataset_hash": r["dataset_hash"], "n_samples": r["n_samples"],
        "n_results": r["n_results"], "n_failures": r["n_failures"],
        "failure_rate": (r["n_failures"] / n) if n else 0.0,
        "started_at": r["started_at"], "finished_at": r["finished_at"],
    }


def _gate_results(g: CompareGates, a: dict[str, Any], b: dict[str, Any], overall: list[dict[str, Any]],
                  words: list[dict[str, Any]], fd: dict[str, Any]) -> list[GateResult]:
    out: list[GateResult] = []
    by_metric = {r["metric"]: r for r in overall}
    if g.require_success:
        bad = [f"{r['run_id']}: {r['status']}" for r in (a, b) if r["status"] != "succeeded"]
        out.append(GateResult("runs succeeded", not bad, [a["status"], b["status"]], "succeeded",
                              "; ".join(bad) or "both runs succeeded"))
    if g.require_same_dataset:
        same = a["dataset_hash"] == b["dataset_hash"]
        out.append(GateResult("same dataset", same, str(b["dataset_hash"])[:12], str(a["dataset_hash"])[:12],
                              "same dataset content hash" if same else f"{a['dataset_uri']} vs {b['dataset_uri']}"))

    def drop_gate(name: str, metric: str, limit: float | None) -> None:
        if limit is None:
            return
        r = by_metric[metric]
        if r["delta"] is None:
            out.append(GateResult(name, False, None, -limit, f"no {metric} values in "
                                  f"{'A' if r['n_a'] == 0 else 'B'} (maps with a mask, method {g.method})"))
            return
        d = 100.0 * r["delta"]
        out.append(GateResult(name, d > -limit, round(d, 4), -limit,
                              f"{metric} {100 * r['mean_a']:.2f} → {100 * r['mean_b']:.2f} points ({d:+.2f})"))

    drop_gate("Obj-IoU drop", "obj_iou", g.max_obj_iou_drop_points)
    drop_gate("pointing drop", "pointing_hit", g.max_pointing_drop_points)
    if g.max_word_obj_iou_drop_points is not None:
        lim = g.max_word_obj_iou_drop_points
        bad = [r for r in words if r["metric"] == "obj_iou" and r["delta"] is not None
               and r["n_a"] >= g.min_word_maps and r["n_b"] >= g.min_word_maps and 100 * r["delta"] <= -lim]
        worst = min((100 * r["delta"] for r in bad), default=None)
        out.append(GateResult("per-word Obj-IoU drop", not bad, None if worst is None else round(worst, 4), -lim,
                              ", ".join(f"{r['word']} {100 * r['delta']:+.2f}" for r in bad[:10])
                              or f"no word (>= {g.min_word_maps} maps each side) dropped {lim} points or more"))
    if g.max_failure_rate_increase_points is not None:
        d = 100.0 * (b["failure_rate"] - a["failure_rate"])
        lim = g.max_failure_rate_increase_points
        out.append(GateResult("failure rate increase", d <= lim, round(d, 4), lim,
                              f"{100 * a['failure_rate']:.1f}% → {100 * b['failure_rate']:.1f}%"))
    if g.fail_on_new_flag_kinds:
        new = fd["gate"]
        name = "no new confirmed spurious flag" if g.new_flags_confirmed_only else "no new spurious flag"
        kinds = "|".join(g.fail_on_new_flag_kinds)
        detail = ", ".join(f"{r['kind']}:{r['word']}/{r['method']}" + (f"@{r['sample_id']}" if r["sample_id"] else "")
                           for r in new[:10]) or f"no new flag of kind {kinds}"
        out.append(GateResult(name, not new, len(new), 0, f"kinds {kinds}: {detail}"))
    return out


def write_comparison(cmp: Comparison, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``compare.md`` and ``compare.json`` (atomically) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "compare.md", out / "compare.json")
    from diffcam.storage.store import write_text_atomic

    for path, text in zip(paths, (cmp.to_markdown(), cmp.to_json() + "\n")):
        write_text_atomic(path, text)
    return paths


def default_out_dir(store_root: str | os.PathLike[str], run_a: str, run_b: str) -> Path:
    """``<store>/compare/<A>__<B>/``."""
    return Path(store_root) / "compare" / f"{run_a}__{run_b}"


__all__.append("default_out_dir")
