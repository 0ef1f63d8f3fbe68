"""The hot path's statements run on psycopg's connection (dispatcher.store.driver), real PostgreSQL:
the same effects, values and errors as SQLAlchemy's own execution, and a pool left as it was."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, bindparam, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from dispatcher.config import AppConfig, Settings
from dispatcher.store import db
from dispatcher.store.driver import DriverStatement, driver_connections, execute_one
from dispatcher.store.tables import AttemptRow, IntentRow
from tests.integration.test_delivery import Swallow

INTENTS = IntentRow.__table__
ATTEMPTS = AttemptRow.__table__


def new_intent(engine: Engine) -> uuid.UUID:
    intent_id = uuid.uuid4()
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(insert(INTENTS).values(
            id=intent_id, target="hostup", provider="hostup", status="waiting", source="api", subject="disk full",
            body="sda1 at 97%", priority="medium", cc=[], labels={}, attempts=0, deliveries=0,
            needs_reconcile=False, next_attempt_at=now, created_at=now, updated_at=now))
    return intent_id


def run(engine: Engine, statement: Any, values: dict[str, Any]) -> Any:
    return execute_one(engine, DriverStatement.compile(statement, engine.dialect, values), values)


CLAIM = (update(INTENTS).where(INTENTS.c.id == bindparam("b_id"), INTENTS.c.status == "waiting")
         .values(deliveries=INTENTS.c.deliveries + 1).returning(INTENTS.c.id, INTENTS.c.status,
                                                                INTENTS.c.lease_until, INTENTS.c.labels))


def test_parameters_named_after_a_column_set_it_as_sqlalchemy_execution_does(engine: Engine) -> None:
    intent_id = new_intent(engine)
    until = datetime(2026, 12, 4, 13, 0, tzinfo=UTC)
    row = run(engine, CLAIM, {"b_id": intent_id, "status": "sending", "lease_until": until, "leased_by": "w1"})
    assert (row.id, row.status, row.lease_until, row.labels) == (intent_id, "sending", until, {})
    with engine.connect() as conn:
        stored = conn.execute(select(INTENTS.c.status, INTENTS.c.leased_by, INTENTS.c.deliveries)
                              .where(INTENTS.c.id == intent_id)).one()
    assert tuple(stored) == ("sending", "w1", 1)
    # the same statement again finds nothing to claim: no row, no error
    assert run(engine, CLAIM, {"b_id": intent_id, "status": "sending", "lease_until": until, "leased_by": "w2"}) is None


def test_values_go_through_the_column_types_both_ways(engine: Engine) -> None:
    intent_id = new_intent(engine)
    started = datetime(2026, 12, 4, 14, 30, tzinfo=UTC)
    record = insert(ATTEMPTS).values({k: bindparam(f"v_{k}", type_=ATTEMPTS.c[k].type) for k in (
        "intent_id", "op", "method", "path", "request", "worker", "started_at")}).returning(
        ATTEMPTS.c.id, ATTEMPTS.c.request, ATTEMPTS.c.started_at)
    row = run(engine, record, {"v_intent_id": intent_id, "v_op": "create", "v_method": "POST", "v_path": "/t",
                               "v_request": {"subject": "disk full", "cc": ["a@example.com"]}, "v_worker": "w1",
                               "v_started_at": started})
    assert row.request == {"subject": "disk full", "cc": ["a@example.com"]}  # JSONB in and out
    assert row.started_at == started and row.started_at.tzinfo is UTC  # the UTC type's result processing
    with pytest.raises(ValueError, match="naive datetime"):  # and its bind processing
        run(engine, record, {"v_intent_id": intent_id, "v_op": "create", "v_method": "POST", "v_path": "/t",
                             "v_request": None, "v_worker": "w1", "v_started_at": datetime(2026, 12, 4)})


def test_a_missing_parameter_is_named_before_anything_is_sent(engine: Engine) -> None:
    with pytest.raises(ValueError, match="missing parameters for the statement: b_id"):
        run(engine, CLAIM, {"status": "sending"})


def test_a_failing_statement_raises_sqlalchemys_error_without_its_parameters(engine: Engine) -> None:
    record = insert(ATTEMPTS).values({k: bindparam(f"v_{k}", type_=ATTEMPTS.c[k].type) for k in (
        "intent_id", "op", "method", "path", "worker", "started_at")}).returning(ATTEMPTS.c.id)
    secret = "Bearer secret-token-0123456789"
    with pytest.raises(IntegrityError) as raised:  # no such intent: the foreign key refuses it
        run(engine, record, {"v_intent_id": uuid.uuid4(), "v_op": "create", "v_method": "POST", "v_path": secret,
                             "v_worker": "w1", "v_started_at": datetime.now(UTC)})
    assert secret not in str(raised.value)
    assert "foreign key" in str(raised.value)


BACKEND = select(func.pg_backend_pid().label("pid"))


def two_at_once(engine: Engine) -> set[int]:
    """Two statements running at once (the other thread's waits in its hook): two connections,
    both idle afterwards; their backends' pids."""
    started, release = threading.Event(), threading.Event()

    def hold(_sql: str) -> None:
        started.set()
        release.wait(5)

    with ThreadPoolExecutor(max_workers=1) as other:
        theirs = other.submit(execute_one, engine, DriverStatement.compile(BACKEND, engine.dialect), {}, hold)
        assert started.wait(5)
        mine = run(engine, BACKEND, {})
        release.set()
        return {mine, theirs.result()}


def test_statements_reuse_the_last_connection_given_back_and_the_pool_keeps_its_own(engine: Engine) -> None:
    intent_id = new_intent(engine)
    pids = two_at_once(engine)
    assert len(pids) == 2
    last = run(engine, BACKEND, {})
    run(engine, CLAIM, {"b_id": intent_id, "status": "sending", "leased_by": "w1"})
    assert run(engine, BACKEND, {}) == last in pids  # one stays busy, the other idle
    # outside the pool: its 2 connections (no overflow) are both still there, in transaction mode
    with engine.connect() as first, engine.connect() as second:
        for conn in (first, second):
            assert conn.execute(BACKEND).scalar() not in pids
            conn.execute(text("UPDATE intents SET leased_by = 'rolled back' WHERE id = :i"), {"i": intent_id})
            conn.rollback()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT leased_by FROM intents WHERE id = :i"), {"i": intent_id}).scalar() == "w1"


def test_after_a_lost_connection_the_others_are_replaced_before_their_next_statement(
        engine: Engine, database_url: str) -> None:
    pids = two_at_once(engine)
    with db.make_engine(database_url, pooled=False).connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
        admin.commit()
    with pytest.raises(DBAPIError) as raised:  # the first statement to meet the loss fails, as before
        run(engine, BACKEND, {})
    assert raised.value.connection_invalidated
    # the second idle connection is dead too, and is not tried: the next statement makes a new one
    assert run(engine, BACKEND, {}) not in pids
    with engine.connect() as conn:  # the pool was emptied: a fresh connection
        assert conn.execute(BACKEND).scalar()


def test_a_connection_lost_mid_statement_invalidates_the_pool_and_the_next_statement_reconnects(
        engine: Engine, database_url: str) -> None:
    intent_id = new_intent(engine)
    values = {"b_id": intent_id, "status": "sending", "leased_by": "w1"}
    run(engine, CLAIM, values)  # the pool now holds a connection
    with db.make_engine(database_url, pooled=False).connect() as admin:
        killed = admin.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
        admin.commit()
    assert killed and killed >= 1
    with pytest.raises(DBAPIError) as raised:
        run(engine, CLAIM, values)
    assert raised.value.connection_invalidated
    with engine.begin() as conn:  # a fresh connection, in transaction mode
        conn.execute(text("UPDATE intents SET status = 'waiting' WHERE id = :i"), {"i": intent_id})
    assert run(engine, CLAIM, values).status == "sending"


def test_closing_them_closes_the_idle_ones_and_a_later_statement_opens_a_new_one(engine: Engine) -> None:
    first = run(engine, BACKEND, {})
    driver_connections(engine).close()
    assert run(engine, BACKEND, {}) != first


def test_with_a_limit_statements_past_it_wait_for_a_connection_instead_of_opening_one(engine: Engine) -> None:
    connections = driver_connections(engine)
    connections.limit(2)
    slow = DriverStatement.compile(select(func.pg_backend_pid().label("pid"), func.pg_sleep(0.2).label("slept")),
                                   engine.dialect)
    with ThreadPoolExecutor(max_workers=6) as pool:   # 6 at once, as 6 greenlets would
        rows = list(pool.map(lambda _: execute_one(engine, slow, {}), range(6)))

    assert len({row[0] for row in rows}) == 2         # never more than 2 backends
    assert len(connections._idle) == 2


def test_a_worker_with_more_tasks_than_DISPATCHER_DB_CONNECTIONS_opens_no_more_than_that(
        database_url: str, make_runtime: Any) -> None:
    config = AppConfig(settings=Settings(database_url=database_url, db_connections=3))
    rt = make_runtime(config, queue=Swallow(), concurrency=8)   # 8 tasks at once (greenlets), 3 connections
    slow = DriverStatement.compile(select(func.pg_backend_pid().label("pid"), func.pg_sleep(0.2).label("slept")),
                                   rt.store.engine.dialect)
    with ThreadPoolExecutor(max_workers=8) as pool:
        rows = list(pool.map(lambda _: execute_one(rt.store.engine, slow, {}), range(8)))

    assert len({row[0] for row in rows}) == 3
    assert rt.store.engine.pool.size() == 2                      # the rest of its work: a quarter, at least 2
