"""DuckDB over the store: views over committed Parquet files only, and read-only user SQL.

`connect` opens an in-memory DuckDB connection with one view per table (``runs``,
``samples``, ``token_maps``, ``flags``, ``failures``). File lists come from the commit
markers, never from globs, so a crashed commit's files are never read. A table with no
committed file is a typed empty view built from its Arrow schema.

Sandbox order matters (measured on duckdb 2.0.1): views are created first (they bind
lazily, when queried), then ``allowed_directories=[<store>]`` (must precede the next
one), then ``enable_external_access=false`` (after it, only the store is readable and
extensions cannot load), then ``lock_configuration=true`` (no ``SET`` can undo it).
The sandbox alone is not enough: ``COPY ... TO '<store>/x'`` is still allowed inside the
store, so `run_sql` also refuses every statement that is not a single read-only query,
using DuckDB's own parser (`extract_statements` and statement types).

``<store>/catalog.duckdb`` holds the same views for people who open the store with the
DuckDB CLI (``duckdb -readonly <store>/catalog.duckdb``). `write_catalog_file` rebuilds it
(temp file + rename, under a store-wide lock). The store never does: the flows that
change runs call it as a step of their own (the audit flow when the run opens, once its
shards are committed and when it ends; the deploy flow after linking a run to its
predecessor), so a write never pays for it and the store does not import this module. Its
views hold absolute file paths, so after moving a store call `write_catalog_file` again.
It carries no sandbox: it is the user's own shell.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from diffcam.storage.schemas import TABLES
from diffcam.storage.store import Store, file_lock

__all__ = ["ReadOnlyError", "VIEWS", "CATALOG_FILE", "connect", "run_sql", "check_read_only", "write_catalog_file"]

VIEWS = ("runs", "samples", "token_maps", "flags", "failures")
CATALOG_FILE = "catalog.duckdb"

_ALLOWED = {duckdb.StatementType.SELECT}  # SELECT, WITH … SELECT, FROM …, DESCRIBE, SHOW, SUMMARIZE
_ARROW_TO_DUCKDB = {
    pa.string(): "VARCHAR",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.binary(): "BLOB",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
}


class ReadOnlyError(ValueError):
    """User SQL that is not a single read-only query."""


def _as_store(store: Store | str | os.PathLike[str]) -> Store:
    return store if isinstance(store, Store) else Store(store)


def _lit(s: str) -> str:
    """A SQL string literal. Only for paths the store built (DDL cannot bind parameters)."""
    return "'" + s.replace("'", "''") + "'"


def _empty_select(name: str) -> str:
    cols = []
    for f in TABLES[name]:
        try:
            cols.append(f"CAST(NULL AS {_ARROW_TO_DUCKDB[f.type]}) AS \"{f.name}\"")
        except KeyError:
            raise TypeError(f"no DuckDB type for {name}.{f.name}: {f.type}") from None
    return f"SELECT {', '.join(cols)} WHERE false"


def _view_sql(store: Store, name: str) -> str:
    files = store.committed_files(name)
    if not files:
        body = _empty_select(name)
    else:
        file_list = ", ".join(_lit(str(f)) for f in files)
        body = f"SELECT * FROM read_parquet([{file_list}], hive_partitioning=false, union_by_name=true)"
    return f"CREATE OR REPLACE VIEW {name} AS {body}"


def _create_views(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    ddl = [_view_sql(store, name) for name in VIEWS]
    con.execute("BEGIN TRANSACTION")  # one commit for all views (matters for the catalog file)
    try:
        for sql in ddl:
            con.execute(sql)
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def connect(store: Store | str | os.PathLike[str], read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views over the store's committed files.

    ``read_only=True`` (the default) sandboxes it: only files under the store folder can
    be read (or written: the sandbox does not stop ``COPY … TO '<store>/x'``), no
    extensions, configuration locked. User SQL must go through `run_sql`, which also
    refuses every non-read-only statement. ``read_only=False``
    leaves the connection unsandboxed for trusted internal code (e.g. to register Arrow
    tables); it never writes to the store by itself.
    """
    st = _as_store(store)
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")  # timestamps come back as timestamp[us, tz=UTC], like the schemas
        _create_views(con, st)
        if read_only:
            con.execute("SET allowed_directories=[?]", [str(st.root)])
            con.execute("SET enable_external_access=false")
            con.execute("SET lock_configuration=true")
    except BaseException:
        con.close()
        raise
    return con


def _statement_type_name(st: Any) -> str:
    return getattr(st.type, "name", str(st.type))


def _explain_target(query: str) -> str:
    """The statement an EXPLAIN wraps: skips comments, EXPLAIN, an option list, ANALYZE."""
    tokens = duckdb.tokenize(query)
    starts = [pos for pos, _ in tokens] + [len(query)]
    # (start, end) of each non-comment token; a token ends where the next token (of any kind) starts
    kinds = [(pos, starts[j + 1]) for j, (pos, kind) in enumerate(tokens) if kind != duckdb.token_type.comment]

    def word_at(i: int) -> str:
        pos, end = kinds[i]
        return query[pos:end].strip().upper()

    i = 0
    if not kinds or word_at(i) != "EXPLAIN":
        raise ReadOnlyError("could not read the EXPLAIN statement")
    i += 1
    if i < len(kinds) and word_at(i).startswith("("):  # EXPLAIN (FORMAT json) …
        depth = 0
        while i < len(kinds):
            w = word_at(i)
            depth += w.count("(") - w.count(")")
            i += 1
            if depth <= 0:
                break
    if i < len(kinds) and word_at(i) in ("ANALYZE", "ANALYSE"):
        i += 1
    if i >= len(kinds):
        raise ReadOnlyError("EXPLAIN without a statement")
    return query[kinds[i][0]:]


def check_read_only(sql: str) -> str:
    """Return the single read-only statement in ``sql`` or raise ReadOnlyError.

    Allowed: one SELECT / WITH … SELECT / FROM … / DESCRIBE / SHOW / SUMMARIZE, or
    EXPLAIN [ANALYZE] of one of those (EXPLAIN ANALYZE executes its statement, so the
    wrapped statement is checked too). Everything else (COPY, ATTACH, INSTALL, LOAD,
    CREATE, INSERT, UPDATE, DELETE, PRAGMA, SET, CALL, EXPORT, …) is refused.
    """
    if not isinstance(sql, str) or not sql.strip():
        raise ReadOnlyError("empty query")
    parser = duckdb.connect(":memory:")
    try:
        try:
            statements = parser.extract_statements(sql)
        except duckdb.Error as exc:
            raise ReadOnlyError(f"could not parse the query: {exc}") from exc
        if len(statements) != 1:
            raise ReadOnlyError(f"expected exactly one statement, got {len(statements)}")
        st = statements[0]
        if st.type == duckdb.StatementType.EXPLAIN:
            inner = _explain_target(st.query)
            try:
                inner_statements = parser.extract_statements(inner)
            except duckdb.Error as exc:
                raise ReadOnlyError(f"could not parse the explained statement: {exc}") from exc
            if len(inner_statements) != 1 or inner_statements[0].type not in _ALLOWED:
                kinds = [_statement_type_name(s) for s in inner_statements]
                raise ReadOnlyError(f"EXPLAIN of {kinds} is not allowed: only read-only queries may be explained")
            return st.query
        if st.type not in _ALLOWED:
            raise ReadOnlyError(
                f"{_statement_type_name(st)} statements are not allowed: the store is read-only "
                "(use SELECT / WITH / EXPLAIN / DESCRIBE / SHOW)"
            )
        return st.query
    finally:
        parser.close()


def run_sql(
    store: Store | str | os.PathLike[str],
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
) -> pa.Table:
    """Run one read-only statement over the store in a sandboxed connection.

    ``params`` are bound (``?`` with a sequence, ``$name`` with a mapping), never
    formatted into the SQL.
    """
    statement = check_read_only(sql)
    con = connect(store, read_only=True)
    try:
        rel = con.sql(statement, params=params) if params is not None else con.sql(statement)
        if rel is None:  # not a query (cannot happen after check_read_only)
            raise ReadOnlyError("statement returned no result")
        return rel.to_arrow_table()
    finally:
        con.close()


def _store_lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    return file_lock(root / ".catalog.lock")


def write_catalog_file(store: Store | str | os.PathLike[str]) -> Path:
    """(Re)build ``<store>/catalog.duckdb`` with the views of `connect`; returns its path."""
    st = _as_store(store)
    target = st.root / CATALOG_FILE
    with _store_lock(st.root):
        tmp = st.root / f".{CATALOG_FILE}.tmp-{uuid.uuid4().hex}"
        try:
            con = duckdb.connect(str(tmp))
            try:
                _create_views(con, st)
                con.execute("CHECKPOINT")
            finally:
                con.close()
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
            Path(f"{tmp}.wal").unlink(missing_ok=True)
    return target
