"""Catalog: views over committed files only, sandboxed read-only SQL, named queries, docs."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from diffcam.core.settings import CamSettings
from diffcam.storage import catalog, queries
from diffcam.storage.catalog import ReadOnlyError, check_read_only, connect, run_sql
from diffcam.storage.schemas import TABLES, table_from_rows
from diffcam.storage.store import Store
from tests.test_store import build_rows, fabricate_run

#: The methods a default run writes (what these tables are built with).
METHODS = tuple(CamSettings().methods)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "QUERIES.md"


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """One fabricated run for the tests that only read."""
    tmp = tmp_path_factory.mktemp("catalog")
    st = Store(tmp / "store")
    fabricate_run(st, tmp / "ds")
    catalog.write_catalog_file(st)
    return st


@pytest.fixture
def run_store(tmp_path: Path) -> Store:
    """A fresh fabricated run for tests that change the store."""
    st = Store(tmp_path / "store")
    fabricate_run(st, tmp_path / "ds")
    return st


def test_views_have_schema_types_and_committed_rows(shared_store: Store) -> None:
    con = connect(shared_store)
    try:
        assert con.sql("SELECT count(*) FROM samples").fetchall()[0][0] == 2
        assert con.sql("SELECT count(*) FROM token_maps").fetchall()[0][0] == 2 * 3 * len(METHODS)
        assert con.sql("SELECT count(*) FROM failures").fetchall()[0][0] == 1
        assert con.sql("SELECT count(*) FROM flags WHERE sample_id IS NULL").fetchall()[0][0] == 1
        for name in catalog.VIEWS:
            got = con.sql(f"SELECT * FROM {name} LIMIT 0").to_arrow_table().schema
            assert got.names == TABLES[name].names, name  # no hive columns (shard=, run_id=) added
            assert [f.type for f in got] == [f.type for f in TABLES[name]], name
    finally:
        con.close()


def test_uncommitted_files_are_invisible(run_store: Store, tmp_path: Path) -> None:
    row = build_rows("run-1", tmp_path / "ds")["shards"][0]["samples"][0]
    pq.write_table(table_from_rows("samples", [{**row, "shard_id": 9, "sample_id": "ghost"}]),
                   run_store.table_path("run-1", "samples", 9))
    assert run_sql(run_store, "SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 2


def test_empty_store_has_typed_empty_views(tmp_path: Path) -> None:
    con = connect(tmp_path / "empty")
    try:
        for name in catalog.VIEWS:
            t = con.sql(f"SELECT * FROM {name}").to_arrow_table()
            assert t.num_rows == 0 and [f.type for f in t.schema] == [f.type for f in TABLES[name]]
    finally:
        con.close()


def test_run_sql_binds_params(shared_store: Store) -> None:
    t = run_sql(shared_store, "SELECT sample_id FROM samples WHERE sample_id = $sid", {"sid": "s1"})
    assert t.column("sample_id").to_pylist() == ["s1"]
    t = run_sql(shared_store, "SELECT sample_id FROM samples WHERE sample_id = ?", ["s0'; DROP TABLE x; --"])
    assert t.num_rows == 0


@pytest.mark.parametrize("sql", [
    "SELECT 1",
    "  WITH x AS (SELECT * FROM samples) SELECT count(*) FROM x;",
    "FROM runs",
    "DESCRIBE token_maps",
    "SHOW TABLES",
    "SUMMARIZE samples",
    "EXPLAIN SELECT * FROM samples",
    "/* why */ EXPLAIN ANALYZE SELECT count(*) FROM samples",
    "EXPLAIN (FORMAT json) SELECT * FROM token_maps",
])
def test_read_only_statements_allowed(shared_store: Store, sql: str) -> None:
    assert run_sql(shared_store, sql).num_columns >= 1  # runs, and returns a result


@pytest.mark.parametrize("sql, kind", [
    ("COPY (SELECT * FROM samples) TO '{out}'", "COPY"),
    ("ATTACH '{db}' AS x", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("INSERT INTO samples SELECT * FROM samples", "INSERT"),
    ("UPDATE samples SET answer = 'x'", "UPDATE"),
    ("DELETE FROM samples", "DELETE"),
    ("PRAGMA version", "PRAGMA"),
    ("SET enable_external_access = true", "SET"),
    ("EXPORT DATABASE '{out}'", "EXPORT"),
    ("CALL pragma_version()", "CALL"),
    ("SELECT 1; SELECT 2", "exactly one"),
    ("SELECT 1; COPY (SELECT 1) TO '{out}'", "exactly one"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}'", "EXPLAIN"),
    ("explain analyze /* c */ copy (SELECT 1) TO '{out}'", "EXPLAIN"),
    ("", "empty"),
    ("SELEKT 1", "parse"),
])
def test_writing_statements_refused(shared_store: Store, tmp_path: Path, sql: str, kind: str) -> None:
    out = shared_store.root / "leak.csv"  # inside allowed_directories: only the statement check stops it
    sql = sql.format(out=out, db=tmp_path / "x.duckdb")
    with pytest.raises(ReadOnlyError, match=kind):
        run_sql(shared_store, sql)
    assert not out.exists() and not (tmp_path / "x.duckdb").exists()


def test_sandbox_blocks_files_outside_store(shared_store: Store) -> None:
    with pytest.raises(duckdb.PermissionException):
        run_sql(shared_store, "SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(duckdb.PermissionException):
        run_sql(shared_store, "SELECT * FROM read_text('/etc/hostname')")
    con = connect(shared_store)
    try:
        with pytest.raises(duckdb.Error):  # configuration is locked, even on the raw connection
            con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.PermissionException):  # the raw connection is sandboxed too
            con.execute("COPY (SELECT 1) TO '/tmp/diffcam-catalog-leak.csv'")
    finally:
        con.close()
    assert not Path("/tmp/diffcam-catalog-leak.csv").exists()


def test_check_read_only_returns_statement() -> None:
    assert check_read_only("SELECT 1;").strip().rstrip(";") == "SELECT 1"


def test_catalog_file_has_views(shared_store: Store) -> None:
    path = shared_store.root / catalog.CATALOG_FILE
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.sql("SELECT count(*) FROM samples").fetchall()[0][0] == 2
        assert con.sql("SELECT count(*) FROM runs").fetchall()[0][0] == 1
    finally:
        con.close()
    assert not list(shared_store.root.glob(".catalog.duckdb.tmp-*"))


# ----------------------------------------------------------------------- queries


def test_method_table_f3_is_harmonic_mean_of_means(shared_store: Store) -> None:
    t = queries.run_query(shared_store, "method_table", run_id="run-1").to_pylist()
    assert {r["method"] for r in t} == set(METHODS)
    tm = shared_store.read_table("token_maps", "run-1").to_pylist()
    for row in t:
        rows = [r for r in tm if r["method"] == row["method"] and r["has_mask"]]
        means = [sum(r[c] for r in rows) / len(rows) for c in ("obj_iou", "contrast_score", "concentration")]
        expected = 3 / sum(1 / m for m in means) if min(means) > 0 else 0.0
        assert row["f3"] == pytest.approx(expected, rel=1e-5)
        assert row["n_maps"] == 2  # the word "square" in s0 and s1
        assert row["pointing_rate"] == pytest.approx(sum(r["pointing_hit"] for r in rows) / len(rows))


def test_named_queries(run_store: Store, tmp_path: Path) -> None:
    fabricate_run(run_store, tmp_path / "ds2", run_id="run-2")
    run_store.update_run("run-2", model_hash="sha256:model-b")
    s = queries.run_query(run_store, "run_summary", run_id="run-1").to_pylist()[0]
    assert (s["n_samples"], s["n_results"], s["n_failures"], s["n_missing"], s["n_flags"]) == (3, 2, 1, 0, 2)
    assert (s["n_confirmed_flags"], s["n_candidate_flags"]) == (0, 2)  # neither fabricated flag was confirmed
    assert s["mean_t_total_s"] == pytest.approx(1.25)
    worst = queries.run_query(run_store, "worst_localised_words", run_id="run-1").to_pylist()
    assert [w["word"] for w in worst] == ["square"]
    leaving = queries.run_query(run_store, "words_leaving_object", word="SQUARE", threshold=0.5, run_id="run-1")
    assert leaving.column("sample_id").to_pylist() == ["s1"]  # s1's map looks at the wrong corner
    rates = queries.run_query(run_store, "flag_rates_by_checkpoint", kind="off-object").to_pylist()
    assert {(r["model_hash"], r["n_samples"], r["n_flagged_samples"]) for r in rates} == {
        ("sha256:model-a", 2, 1), ("sha256:model-b", 2, 1)}
    assert rates[0]["flag_rate"] == pytest.approx(0.5)
    ws = {r["word"]: r for r in queries.run_query(run_store, "word_stats", run_id="run-1").to_pylist()}
    assert ws["a"]["is_function"] and ws["square"]["n_masked"] == 2 and ws["red"]["n_masked"] == 0
    best = queries.run_query(run_store, "sample_ranking", run_id="run-1", best=True).column("sample_id").to_pylist()
    worst_s = queries.run_query(run_store, "sample_ranking", run_id="run-1", best=False).column("sample_id").to_pylist()
    assert best == ["s0", "s1"] and worst_s == ["s1", "s0"]
    assert queries.run_query(run_store, "runs_overview").num_rows == 2
    with pytest.raises(ValueError, match="required"):
        queries.run_query(run_store, "run_summary")
    with pytest.raises(ValueError, match="unknown parameter"):
        queries.run_query(run_store, "run_summary", run_id="run-1", nope=1)


def test_every_query_runs_and_is_documented(shared_store: Store) -> None:
    doc = DOCS.read_text()
    con = connect(shared_store)
    try:
        for name, q in queries.QUERIES.items():
            assert f"`{name}`" in doc, f"{name} missing from docs/QUERIES.md"
            args = {p: ("run-1" if p == "run_id" else "s0" if p == "sample_id" else "square")
                    for p, d in q.params.items() if d is queries.REQUIRED}
            queries.run_query(con, name, **args)
    finally:
        con.close()


def test_docs_examples_run(shared_store: Store) -> None:
    """Every `diffcam sql "…"` example in docs/QUERIES.md parses, is read-only, and runs."""
    examples = re.findall(r'^diffcam sql "(.*?)"', DOCS.read_text(), flags=re.M | re.S)
    assert len(examples) >= 6
    for sql in examples:
        run_sql(shared_store, sql)


def test_method_table_contrast_ignores_infinite(tmp_path: Path) -> None:
    """A map with no mass outside its mask has contrast inf: counted, not averaged."""
    def inf_contrast(rows) -> None:
        r = next(r for r in rows["shards"][0]["token_maps"] if r["has_mask"] and r["method"] == "gradcam")
        r["contrast"] = float("inf")

    st = Store(tmp_path / "store")
    fabricate_run(st, tmp_path / "ds", mutate=inf_contrast)
    row = next(r for r in queries.run_query(st, "method_table", run_id="run-1").to_pylist() if r["method"] == "gradcam")
    finite = [r["contrast"] for r in st.read_table("token_maps", "run-1").to_pylist()
              if r["method"] == "gradcam" and r["has_mask"] and r["contrast"] != float("inf")]
    assert row["n_contrast_inf"] == 1 and row["contrast"] == pytest.approx(sum(finite) / len(finite))
