"""Benchmark: the CPU one hot-path statement costs through SQLAlchemy's execution, on the driver
(``dispatcher.store.driver``, what the worker does), and on a bare psycopg connection (the floor).

Run (needs PostgreSQL, the same as the test suite)::

    .venv/bin/python -m bench.statements                 # 2,000 claims, 5 rounds
    .venv/bin/python -m bench.statements --statements 5000 --rounds 7

The statement is the worker's claim (``_claim_statement`` in ``dispatcher/store/repo.py``: an
``UPDATE ... RETURNING`` of the intent's columns and whether its target is paused), run against a
scratch database for ids that are not there, so each execution does the same work (no row comes
back, nothing changes). The three ways alternate within each round, so a noisy neighbour weighs on
all alike; the figures are medians over rounds of the CPU (user + system) per statement:

sqlalchemy  a connection checked out of the engine's pool in autocommit per statement and
            ``Connection.execute`` (how the worker ran it until 2026-12-04)
driver      ``execute_one``: the statement compiled once, run on one of the engine's own autocommit connections
bare        psycopg's ``cursor.execute`` + ``fetchone`` on one connection held throughout (no pool)
"""

from __future__ import annotations

import argparse
import statistics
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.hotpath import cpu
from bench.ratelimit import scratch_database


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.statements", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--statements", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    from dispatcher.domain import DUE_STATUSES
    from dispatcher.store import db
    from dispatcher.store.driver import DriverStatement, execute_one
    from dispatcher.store.repo import _claim_statement

    with scratch_database() as url:
        engine = db.make_engine(url, pool_size=2, max_overflow=0, pre_ping=False)
        autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        statement = _claim_statement(frozenset(s.value for s in DUE_STATUSES))
        now = datetime.now(UTC)
        ids = [uuid.uuid4() for _ in range(args.statements)]

        def params(intent_id: uuid.UUID) -> dict[str, Any]:
            return {"b_id": intent_id, "b_now": now, "lease_until": now + timedelta(seconds=60), "leased_by": "w",
                    "updated_at": now, "status": "sending"}

        compiled = DriverStatement.compile(statement, engine.dialect, params(ids[0]))
        held = engine.raw_connection()
        bare = held.driver_connection
        bare.autocommit = True  # type: ignore[union-attr]
        cursor = bare.cursor()  # type: ignore[union-attr]

        def through_sqlalchemy(intent_id: uuid.UUID) -> None:
            with autocommit.connect() as conn:
                conn.execute(statement, params(intent_id)).first()

        def on_the_driver(intent_id: uuid.UUID) -> None:
            execute_one(engine, compiled, params(intent_id))

        def bare_psycopg(intent_id: uuid.UUID) -> None:
            cursor.execute(compiled.sql, compiled.parameters(params(intent_id)))
            cursor.fetchone()

        ways: dict[str, Callable[[uuid.UUID], None]] = {
            "sqlalchemy": through_sqlalchemy, "driver": on_the_driver, "bare": bare_psycopg}
        per_round: dict[str, list[float]] = {name: [] for name in ways}
        for way in ways.values():  # warm: the pool filled, psycopg's prepared statement made
            for intent_id in ids[:50]:
                way(intent_id)
        for _ in range(args.rounds):
            for name, way in ways.items():
                began = cpu()
                for intent_id in ids:
                    way(intent_id)
                per_round[name].append((cpu() - began) / len(ids) * 1e6)
        cursor.close()
        bare.autocommit = False  # type: ignore[union-attr]
        held.close()
        engine.dispose()
    medians = {name: statistics.median(values) for name, values in per_round.items()}
    print(f"medians of {args.rounds} rounds of {args.statements} claims, CPU microseconds per statement:")
    for name, value in medians.items():
        print(f"  {name:11} {value:7.1f}  ({value / medians['bare']:.2f}x bare, "
              f"{value / medians['sqlalchemy']:.2f}x sqlalchemy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
