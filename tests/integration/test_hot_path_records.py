"""The worker's hot path writes less often, and still records every exchange before and after it.

``Store.deferring`` lets an attempt's completion (and the department just resolved) wait for the
intent's next write; these tests pin what that may and may not change.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from dispatcher.domain import DUE_STATUSES, Status
from dispatcher.runtime import Runtime
from dispatcher.simulator import RunningSimulator
from dispatcher.store.repo import LeaseLost
from tests.conftest import make_config
from tests.integration.test_delivery import Swallow, submit


def attempt_rows(rt: Runtime, intent_id: uuid.UUID) -> list[dict[str, Any]]:
    with rt.store.engine.connect() as conn:
        rows = conn.execute(text("SELECT op, status_code, verdict, finished_at FROM attempts WHERE intent_id = :i "
                                 "ORDER BY id"), {"i": intent_id}).mappings().all()
        return [dict(r) for r in rows]


@pytest.fixture
def rt(database_url: str, simulator: RunningSimulator, make_runtime: Any) -> Runtime:
    runtime: Runtime = make_runtime(make_config(simulator, database_url=database_url), queue=Swallow(),
                                    worker="hot-worker")
    return runtime


def test_a_completed_exchange_is_written_with_the_intents_next_state_not_before(rt: Runtime) -> None:
    intent_id = submit(rt, target="hostup", topic="vps")
    now = rt.service.clock()
    claimed = rt.store.claim_due(intent_id, statuses=DUE_STATUSES, to=Status.sending, now=now, lease_s=60,
                                 worker="hot-worker")
    assert claimed is not None and claimed[1] is False  # claimed, target not paused
    with rt.store.deferring():
        attempt = rt.store.begin_attempt(intent_id, number=1, op="create", method="POST", path="/support/tickets",
                                         request=None, worker="hot-worker", now=now, lease_s=60, renew_lease=False,
                                         intent_values={"resolved_department": "vps"}, event=("routed", "vps"))
        rt.store.finish_attempt(attempt, status_code=201, verdict="done", finished_at=now,
                                response_excerpt="x" * 5000)
        # recorded as begun, not yet as finished: a crash here reads "may have reached the provider"
        [row] = attempt_rows(rt, intent_id)
        assert row["verdict"] is None and row["finished_at"] is None
        assert rt.store.get(intent_id).resolved_department is None  # type: ignore[union-attr]
        assert rt.store.release(intent_id, "hot-worker", status=Status.succeeded, now=now, attempts=1,
                                ticket={"target": "hostup", "provider": "hostup", "provider_ticket_id": "tkt_1",
                                        "number": "1", "url": None, "department": "vps"})
        [row] = attempt_rows(rt, intent_id)
        assert row["verdict"] == "done" and row["status_code"] == 201
    view = rt.store.get(intent_id)
    assert view is not None and view.status is Status.succeeded and view.resolved_department == "vps"
    assert view.ticket is not None and view.ticket.provider_id == "tkt_1"
    with rt.store.engine.connect() as conn:
        kept = conn.execute(text("SELECT length(response_excerpt) FROM attempts WHERE id = :a"), {"a": attempt})
        assert kept.scalar_one() < 600  # a successful answer is kept to 512 characters (+ the cut notice)


def test_what_is_still_pending_is_written_when_the_dispatch_ends_without_a_release(rt: Runtime) -> None:
    intent_id = submit(rt, target="hostup", topic="vps")
    now = rt.service.clock()
    assert rt.store.claim(intent_id, statuses=DUE_STATUSES, to=Status.sending, now=now, lease_s=60,
                          worker="hot-worker") is not None
    with pytest.raises(RuntimeError), rt.store.deferring():
        attempt = rt.store.begin_attempt(intent_id, number=1, op="create", method="POST", path="/support/tickets",
                                         request=None, worker="hot-worker", now=now, lease_s=60, renew_lease=False)
        rt.store.finish_attempt(attempt, status_code=503, verdict="retry", finished_at=now)
        raise RuntimeError("the dispatch stopped here")
    [row] = attempt_rows(rt, intent_id)
    assert row["verdict"] == "retry" and row["status_code"] == 503


def test_a_lease_that_is_not_fresh_is_checked_before_sending(rt: Runtime) -> None:
    intent_id = submit(rt, target="hostup", topic="vps")
    now = rt.service.clock()
    assert rt.store.claim(intent_id, statuses=DUE_STATUSES, to=Status.sending, now=now, lease_s=1,
                          worker="hot-worker") is not None
    later = now + timedelta(seconds=5)  # expired and taken over by another worker meanwhile
    assert rt.store.claim(intent_id, statuses=DUE_STATUSES, to=Status.sending, now=later, lease_s=60,
                          worker="other-worker") is None  # sending is not due ...
    with rt.store.engine.begin() as conn:  # ... so hand it over the way lease recovery does
        conn.execute(text("UPDATE intents SET leased_by = 'other-worker' WHERE id = :i"), {"i": intent_id})
    with pytest.raises(LeaseLost), rt.store.deferring():
        rt.store.begin_attempt(intent_id, number=1, op="create", method="POST", path="/support/tickets",
                               request=None, worker="hot-worker", now=later, lease_s=60)
    assert attempt_rows(rt, intent_id) == []  # nothing recorded, nothing sent


def test_a_dispatch_writes_claim_attempt_and_completion_as_three_single_statements_on_the_driver(
        rt: Runtime) -> None:
    intent_id = submit(rt, target="hostup", topic="vps")
    rt.service.dispatch(intent_id)  # warms the department list (its own exchange)
    second = submit(rt, target="hostup", topic="vps")
    commits = 0
    statements: list[tuple[str, str]] = []  # (first word, how it ran)

    def count(*_: Any) -> None:
        nonlocal commits
        commits += 1

    def record(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        autocommit = conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
        how = "sqlalchemy autocommit" if autocommit else "sqlalchemy"
        statements.append((statement.split(None, 1)[0].upper(), how))

    def on_driver(statement: str) -> None:
        statements.append((statement.split(None, 1)[0].upper(), "driver"))

    from sqlalchemy import event

    event.listen(rt.store.engine, "commit", count)
    event.listen(rt.store.engine, "before_cursor_execute", record)
    rt.store.driver_hook = on_driver
    try:
        rt.service.dispatch(second)
    finally:
        event.remove(rt.store.engine, "commit", count)
        event.remove(rt.store.engine, "before_cursor_execute", record)
        rt.store.driver_hook = None
    view = rt.service.get(second, with_attempts=True)
    assert view.status is Status.succeeded and view.resolved_department == "vps" and view.ticket is not None
    assert [(a.op, a.verdict) for a in view.attempt_log] == [("create", "done")]
    assert [e.kind for e in rt.store.events(second)] == ["accepted", "routed", "succeeded"]
    # the claim, the attempt's record, then the completion with the routing's event and field, the
    # ticket, the new state and its event: three statements on the driver, each in autocommit
    # (atomic by itself), no BEGIN/COMMIT, none through SQLAlchemy's execution
    assert statements == [("UPDATE", "driver"), ("INSERT", "driver"), ("WITH", "driver")]
    assert commits == 0
