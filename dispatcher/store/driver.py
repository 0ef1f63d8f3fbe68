"""Statements built with SQLAlchemy, executed on the driver's own connection: the worker's hot path.

SQLAlchemy's execution (a Connection per checkout, an execution context, parameter and result
processing through its event and caching layers) costs several times what the statement costs
psycopg: for the claim, 333.5 microseconds of CPU through SQLAlchemy, 88.7 here, 53.7 on a bare
cursor (``bench/statements.py``, README "The worker's hot path"). A worker runs three such
statements per exchange, all of them built once, so it compiles each one
once here, keeps the SQL text, the values SQLAlchemy bound into it and the type processing of
each parameter and result column, and hands the text to psycopg itself on a pooled connection,
in autocommit (each is one statement, its own transaction).

Errors come out as SQLAlchemy's (``DBAPIError`` and its subclasses, parameters hidden), and a
lost connection invalidates the pool as SQLAlchemy's own execution does, so callers see no
difference. PostgreSQL only; SQLite keeps SQLAlchemy's execution.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from sqlalchemy import Engine
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError


@dataclass(frozen=True, slots=True)
class DriverStatement:
    """One compiled statement: its SQL, what it binds by itself, and how values are converted."""

    sql: str
    fixed: dict[str, Any]
    required: frozenset[str]
    binds: tuple[tuple[str, Callable[[Any], Any]], ...]
    row: Callable[..., Any] | None
    results: tuple[Callable[[Any], Any] | None, ...]

    @classmethod
    def compile(cls, statement: Any, dialect: Dialect, keys: Iterable[str] = ()) -> DriverStatement:
        """Compile ``statement`` for ``dialect`` (psycopg's named parameters, with casts) to be run
        with parameters named ``keys``: as SQLAlchemy's execution does, those named after a column
        of an INSERT or UPDATE set it."""
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        if compiled.insert_prefetch or compiled.update_prefetch or compiled.post_compile_params:
            raise ValueError("a statement with Python-side defaults or expanding parameters cannot run "
                             "on the driver: give every column a value, and no IN lists")
        processors: dict[str, Callable[[Any], Any]] = {}
        fixed: dict[str, Any] = {}
        required: set[str] = set()
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.required:
                required.add(name)
                if process is not None:
                    processors[name] = process
            else:
                value = bind.effective_value
                fixed[name] = process(value) if process is not None and value is not None else value
        columns = list(getattr(statement, "exported_columns", ()))
        if not columns:  # its row is fetched without asking the cursor first (that builds a description)
            raise ValueError("a statement run on the driver returns a row: add RETURNING")
        names = [column.key for column in columns]
        results = tuple(column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns)
        row = namedtuple("DriverRow", names) if len(names) > 1 else None
        return cls(sql=str(compiled), fixed=fixed, required=frozenset(required), binds=tuple(processors.items()),
                   row=row, results=results)

    def parameters(self, values: Mapping[str, Any]) -> dict[str, Any]:
        missing = self.required.difference(values)
        if missing:
            raise ValueError(f"missing parameters for the statement: {', '.join(sorted(missing))}")
        params = {**self.fixed, **values}
        for name, process in self.binds:
            value = params[name]
            if value is not None:
                params[name] = process(value)
        return params

    def convert(self, raw: tuple[Any, ...]) -> Any:
        """A result row: one column as its value, several as a named tuple."""
        values = [value if process is None or value is None else process(value)
                  for process, value in zip(self.results, raw, strict=True)]
        return values[0] if self.row is None else self.row(*values)


#: where a pooled connection keeps the cursor its driver statements reuse (building one per
#: statement cost a third of psycopg's time for it); SQLAlchemy clears it when the connection is replaced
_CURSOR = "dispatcher.driver_cursor"

#: called with each statement's SQL before it runs (the hot-path benchmark and tests count them)
StatementHook = Callable[[str], None]


def execute_one(engine: Engine, statement: DriverStatement, values: Mapping[str, Any],
                hook: StatementHook | None = None) -> Any:
    """Run ``statement`` in autocommit on a connection of ``engine``'s pool; its first row,
    converted (None when there is none). The statement returns rows (RETURNING, a SELECT)."""
    params = statement.parameters(values)
    fairy = engine.raw_connection()
    try:
        driver: psycopg.Connection[Any] = fairy.driver_connection  # type: ignore[assignment]
        try:
            driver.autocommit = True
            try:
                if hook is not None:
                    hook(statement.sql)
                cursor = fairy.info.get(_CURSOR)
                if cursor is None or cursor.connection is not driver:  # one per connection, kept with it
                    cursor = fairy.info[_CURSOR] = driver.cursor()
                cursor.execute(statement.sql, params)
                raw = cursor.fetchone()
            finally:
                if not driver.closed and not driver.broken:
                    driver.autocommit = False  # the pool's other users expect transactions
        except psycopg.Error as exc:
            disconnected = engine.dialect.is_disconnect(cast(Any, exc), fairy, None)
            if disconnected:  # as SQLAlchemy's own execution does: every connection of that age goes
                engine.pool._invalidate(fairy, exc)
            raise DBAPIError.instance(statement.sql, None, exc, psycopg.Error, hide_parameters=True,
                                      connection_invalidated=disconnected, dialect=engine.dialect) from exc
    finally:
        fairy.close()
    return None if raw is None else statement.convert(raw)
