"""A gevent worker's PostgreSQL waits (dispatcher.green): psycopg waits on one gevent watcher per wait,
and the driver bounds its connections with gevent's semaphore; statements still run side by side,
errors and timeouts still come out as psycopg's. Each probe runs in a process of its own (patching
this one would turn the rest of the suite green), on the test's own database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any


def probe(code: str, database_url: str) -> Any:
    """Run ``code`` in a process patched as `dispatcher worker` is; the JSON it prints last."""
    head = textwrap.dedent("""
        import json, os, sys, time
        sys.argv = ["dispatcher", "worker", "--pool", "gevent"]
        import dispatcher, gevent, psycopg, psycopg.waiting
        URL = os.environ["PROBE_DATABASE_URL"]
    """)
    env = {**os.environ, "PROBE_DATABASE_URL": database_url.replace("postgresql+psycopg://", "postgresql://")}
    out = subprocess.run([sys.executable, "-c", head + textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_in_a_gevent_worker_statements_on_several_connections_wait_side_by_side(database_url: str) -> None:
    result = probe("""
        conns = [psycopg.connect(URL, autocommit=True) for _ in range(4)]
        def statement(i):
            return conns[i].execute("SELECT pg_sleep(0.3), %s::int", (i,)).fetchone()[1]
        started = time.monotonic()
        tasks = [gevent.spawn(statement, i) for i in range(4)]
        gevent.joinall(tasks, raise_error=True)
        print(json.dumps({"wait": psycopg.waiting.wait.__qualname__, "values": [t.value for t in tasks],
                          "elapsed": time.monotonic() - started}))
    """, database_url)
    assert result["wait"].startswith("watcher_wait")            # not psycopg's wait_poll over gevent's poll
    assert result["values"] == [0, 1, 2, 3]
    assert result["elapsed"] < 0.9                               # 4 x 0.3 s at once, not one after another


def test_in_a_gevent_worker_a_failing_statement_raises_psycopgs_error_and_the_connection_goes_on(
        database_url: str) -> None:
    result = probe("""
        conn = psycopg.connect(URL, autocommit=True)
        try:
            conn.execute("SELECT 1 / 0")
            error = None
        except psycopg.Error as exc:
            error = type(exc).__name__
        print(json.dumps({"error": error, "next": conn.execute("SELECT 42").fetchone()[0]}))
    """, database_url)
    assert result == {"error": "DivisionByZero", "next": 42}


def test_in_a_gevent_worker_a_wait_past_its_timeout_raises_and_lets_other_greenlets_run_meanwhile(
        database_url: str) -> None:
    result = probe("""
        from psycopg import errors, generators
        conn = psycopg.connect(URL, autocommit=True)
        conn.pgconn.send_query(b"SELECT pg_sleep(2)")
        ticks = []
        ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.05)) for _ in range(4)])
        started = time.monotonic()
        try:
            psycopg.waiting.wait(generators.fetch_many(conn.pgconn), conn.pgconn.socket, timeout=0.3)
            outcome = "finished"
        except errors.OperationalError as exc:
            outcome = str(exc)
        elapsed = time.monotonic() - started
        ticker.join()
        print(json.dumps({"outcome": outcome, "elapsed": elapsed, "ticks": len(ticks)}))
    """, database_url)
    assert result["outcome"] == "wait timeout expired"
    assert 0.25 < result["elapsed"] < 1.5
    assert result["ticks"] == 4


def test_in_a_gevent_worker_a_statement_on_a_closed_socket_fails_as_a_lost_connection(database_url: str) -> None:
    result = probe("""
        conn = psycopg.connect(URL, autocommit=True)
        conn.pgconn.send_query(b"SELECT 1")
        gen = psycopg.generators.fetch_many(conn.pgconn)
        os.close(conn.pgconn.socket)                       # gone under psycopg's feet
        try:
            psycopg.waiting.wait(gen, conn.pgconn.socket)
            outcome = "finished"
        except psycopg.OperationalError as exc:
            outcome = type(exc).__name__
        print(json.dumps({"outcome": outcome}))
    """, database_url)
    assert result == {"outcome": "OperationalError"}


def test_in_a_gevent_worker_the_driver_bounds_its_connections_with_gevents_semaphore(database_url: str) -> None:
    result = probe("""
        from sqlalchemy import func, select
        from dispatcher.store import db
        from dispatcher.store.driver import DriverStatement, driver_connections, execute_one
        engine = db.make_engine(URL, pool_size=2, max_overflow=0, pre_ping=False)
        connections = driver_connections(engine)
        connections.limit(2)
        slow = DriverStatement.compile(select(func.pg_backend_pid().label("pid"),
                                              func.pg_sleep(0.2).label("slept")), engine.dialect)
        started = time.monotonic()
        tasks = [gevent.spawn(execute_one, engine, slow, {}) for _ in range(6)]
        gevent.joinall(tasks, raise_error=True)
        print(json.dumps({"semaphore": type(connections._slots).__module__,
                          "backends": len({t.value[0] for t in tasks}), "elapsed": time.monotonic() - started}))
    """, database_url)
    assert result["semaphore"].startswith("gevent")
    assert result["backends"] == 2                                # never more than 2 connections
    assert 0.55 < result["elapsed"] < 2.0                         # 6 statements of 0.2 s, 2 at a time
