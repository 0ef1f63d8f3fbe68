"""Statements built with SQLAlchemy, executed on the driver's own connection: the worker's hot path.

SQLAlchemy's execution (a Connection per checkout, an execution context, parameter and result
processing through its event and caching layers) costs several times what the statement costs
psycopg (``bench/statements.py``, README "The worker's hot path"). A worker runs three such
statements per exchange, all of them built once, so it compiles each one once here, keeps the SQL
text, the values SQLAlchemy bound into it and the type processing of each parameter and result
column, and hands the text to psycopg itself, in autocommit (each is one statement, its own
transaction), on connections of its own (:class:`DriverConnections`: out of SQLAlchemy's pool,
always in autocommit, reused last in, first out).

Errors come out as SQLAlchemy's (``DBAPIError`` and its subclasses, parameters hidden), and a
lost connection empties the pool as SQLAlchemy's own execution does, so callers see no
difference. PostgreSQL only; SQLite keeps SQLAlchemy's execution.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import deque, namedtuple
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from sqlalchemy import Engine
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

from dispatcher.green import patched_for_gevent


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


#: called with each statement's SQL before it runs (the hot-path benchmark and tests count them)
StatementHook = Callable[[str], None]


@dataclass(slots=True)
class _Idle:
    """A connection of :class:`DriverConnections`, its cursor, and the generation it was made in."""

    connection: psycopg.Connection[Any]
    cursor: psycopg.Cursor[Any]
    generation: int


def bounded_semaphore(value: int) -> threading.BoundedSemaphore:
    """A bounded semaphore for this process's tasks: gevent's in a process patched for it."""
    if patched_for_gevent():
        from gevent.lock import BoundedSemaphore

        return cast(threading.BoundedSemaphore, BoundedSemaphore(value))
    return threading.BoundedSemaphore(value)


class DriverConnections:
    """An engine's connections for driver statements: kept in autocommit, handed out last in, first out.

    They are taken from the engine's pool once and detached from it (they no longer count in, or go
    back to, the pool), so a statement costs no checkout and return through the pool and no
    switching autocommit on and off (together about 30 % of the CPU a driver statement cost,
    ``bench/statements.py``). Last in, first out: the few connections that serve most statements
    stay busy and warm (PostgreSQL's caches, psycopg's prepared statements, the pages a backend
    inserts into), the others idle; there are never more than the statements run at once.

    A lost connection (a database restart) fails its statement, with SQLAlchemy's error, and makes
    every other connection stale: each is replaced when next taken, and the engine's pool is
    emptied, as SQLAlchemy's own execution does on a disconnect."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._idle: deque[_Idle] = deque()  # append and pop are atomic
        self._generation = 0
        self._slots: threading.BoundedSemaphore | None = None

    def limit(self, connections: int) -> None:
        """Open at most ``connections`` at once: a statement past them waits for one to be given back.

        For a worker running more tasks at once than PostgreSQL should serve connections (256
        greenlets); with threads there are never more than the threads, and no limit is set (its
        semaphore would be a cost on every statement). In a gevent worker the semaphore is gevent's
        own: the standard library's, even patched, is a condition over a lock in Python (2.80
        against 0.23 µs per acquire and release, ``bench/green.py``)."""
        self._slots = bounded_semaphore(connections)

    def _take(self) -> _Idle:
        while True:
            try:
                idle = self._idle.pop()
            except IndexError:
                break
            if idle.generation == self._generation and not idle.connection.closed:
                return idle
            self._discard(idle)
        fairy = self.engine.raw_connection()
        connection: psycopg.Connection[Any] = fairy.driver_connection  # type: ignore[assignment]
        fairy.detach()
        connection.autocommit = True
        return _Idle(connection, connection.cursor(), self._generation)

    @staticmethod
    def _discard(idle: _Idle) -> None:
        with contextlib.suppress(Exception):
            idle.connection.close()

    def execute(self, statement: DriverStatement, values: Mapping[str, Any], hook: StatementHook | None = None) -> Any:
        """Run ``statement`` in autocommit; its first row, converted (None when there is none).
        The statement returns rows (RETURNING, a SELECT)."""
        params = statement.parameters(values)
        slots = self._slots
        if slots is None:
            return self._execute(statement, params, hook)
        with slots:
            return self._execute(statement, params, hook)

    def _execute(self, statement: DriverStatement, params: dict[str, Any], hook: StatementHook | None) -> Any:
        idle = self._take()
        try:
            if hook is not None:
                hook(statement.sql)
            idle.cursor.execute(statement.sql, params)
            raw = idle.cursor.fetchone()
        except psycopg.Error as exc:
            connection = idle.connection
            disconnected = bool(self.engine.dialect.is_disconnect(cast(Any, exc), cast(Any, connection), None)
                                or connection.closed or connection.broken)
            if disconnected:
                self._discard(idle)
                self._generation += 1  # the others are presumed dead too: replaced when next taken
                self.engine.dispose()  # and the pool's, as SQLAlchemy's own execution does
            else:
                self._idle.append(idle)  # a refused statement leaves it usable (no transaction)
            raise DBAPIError.instance(statement.sql, None, exc, psycopg.Error, hide_parameters=True,
                                      connection_invalidated=disconnected, dialect=self.engine.dialect) from exc
        except BaseException:
            self._discard(idle)  # interrupted mid-statement: its state is unknown
            raise
        if idle.generation == self._generation:
            self._idle.append(idle)
        else:  # made stale while it ran (another's lost connection, or close())
            self._discard(idle)
        return None if raw is None else statement.convert(raw)

    def close(self) -> None:
        """Close the idle connections; one in use is closed when given back."""
        self._generation += 1
        while True:
            try:
                self._discard(self._idle.pop())
            except IndexError:
                return


_BY_ENGINE: weakref.WeakKeyDictionary[Engine, DriverConnections] = weakref.WeakKeyDictionary()
_BY_ENGINE_LOCK = threading.Lock()


def driver_connections(engine: Engine) -> DriverConnections:
    """The engine's :class:`DriverConnections` (one per engine, made on first use)."""
    connections = _BY_ENGINE.get(engine)
    if connections is None:
        with _BY_ENGINE_LOCK:
            connections = _BY_ENGINE.get(engine)
            if connections is None:
                connections = _BY_ENGINE[engine] = DriverConnections(engine)
    return connections


def execute_one(engine: Engine, statement: DriverStatement, values: Mapping[str, Any],
                hook: StatementHook | None = None) -> Any:
    """Run ``statement`` in autocommit on one of ``engine``'s :class:`DriverConnections`; its first
    row, converted (None when there is none)."""
    return driver_connections(engine).execute(statement, values, hook)
