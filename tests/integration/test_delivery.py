"""Delivery guarantees at the service level, each for a gap the chaos suite (tests/chaos) found.

Real Postgres, Redis and simulator; the queue is usually one that swallows messages, so each test
drives the service step by step (dispatch, poll, the scheduler's pass) to the exact state a fault
leaves behind: a worker killed after its create was answered, a poll that came after its deadline,
a database that went away mid-dispatch, a stale worker whose lease was taken over.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.exc import DBAPIError, OperationalError

from dispatcher.config import Settings, parse_config
from dispatcher.domain import DUE_STATUSES, IntentView, Status
from dispatcher.intake.api import create_app
from dispatcher.runtime import Runtime, build_runtime
from dispatcher.simulator import RunningSimulator
from tests.conftest import HOSTUP_KEY, NOCWORX_KEY, TOKENS, make_config, secrets_env, target_table, tokens_table

FAST_LEASE = {"interval_s": 0.2, "requeue_after_s": 5, "lease_s": 1}


class Swallow:
    """A broker that takes every message and delivers none: the test is the worker."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, uuid.UUID, float]] = []

    def enqueue(self, task: str, intent_id: uuid.UUID, *, target: str, countdown: float = 0.0) -> None:
        self.sent.append((task, intent_id, countdown))

    def enqueue_many(self, task: str, items: list[tuple[uuid.UUID, str]]) -> None:
        self.sent.extend((task, intent_id, 0.0) for intent_id, _ in items)


def submit(rt: Runtime, **fields: Any) -> uuid.UUID:
    data = {"subject": f"Delivery {uuid.uuid4().hex[:8]}", "body": "Body text.", **fields}
    return rt.service.accept(data).intent.id


def wait_terminal(rt: Runtime, intent_id: uuid.UUID, timeout: float = 30.0) -> IntentView:
    deadline = time.monotonic() + timeout
    while True:
        rt.service.schedule_once()
        view = rt.service.get(intent_id)
        if view.terminal or time.monotonic() > deadline:
            return view
        time.sleep(0.1)


def creates_for(simulator: RunningSimulator, provider: str, intent_id: uuid.UUID) -> int:
    return sum(1 for r in simulator.requests(provider) if r["method"] == "POST" and r["marker"] == str(intent_id))


def make_due(rt: Runtime, intent_id: uuid.UUID) -> None:
    rt.store.update_intent(intent_id, next_attempt_at=rt.service.clock())


# -- NocWorx polls judge the deadline on an answer, never on the clock alone ----------------------

def test_a_poll_that_comes_after_the_deadline_still_looks_and_records_the_task_that_succeeded(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url,
                                  nocworx={"poll": {"interval_s": 0.2, "deadline_s": 0.5}}), queue=Swallow())
    intent_id = submit(rt, target="nocworx", topic="dns")
    rt.service.dispatch(intent_id)
    assert rt.service.get(intent_id).status is Status.polling
    time.sleep(1.0)  # the poll message was late (a backlog, a lost worker) and the task succeeded meanwhile
    rt.service.poll(intent_id)
    view = rt.service.get(intent_id)
    assert view.status is Status.succeeded and view.ticket is not None, view
    assert simulator.stats()["tickets_by_marker"][str(intent_id)] == 1


def test_a_task_still_pending_when_a_late_poll_looks_fails_as_timed_out_after_that_look(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(task_stuck_rate=1.0)
    rt = make_runtime(make_config(simulator, database_url=database_url,
                                  nocworx={"poll": {"interval_s": 0.2, "deadline_s": 0.5}}), queue=Swallow())
    intent_id = submit(rt, target="nocworx", topic="dns")
    rt.service.dispatch(intent_id)
    time.sleep(1.0)
    looks = len(simulator.requests("nocworx"))
    rt.service.poll(intent_id)
    view = rt.service.get(intent_id)
    assert view.status is Status.failed and view.last_error_code == "task_timeout"
    assert len(simulator.requests("nocworx")) == looks + 1  # it looked once more, then gave up
    assert creates_for(simulator, "nocworx", intent_id) == 1


# -- a lost worker's intent is reconciled whenever its create may have made a ticket -------------

def test_a_worker_killed_after_its_create_was_answered_is_reconciled_not_sent_again(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    config = make_config(simulator, database_url=database_url, scheduler=FAST_LEASE)
    dead = make_runtime(config, queue=Swallow(), worker="dead-worker")
    intent_id = submit(dead, target="hostup", topic="vps")

    def killed(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt("the worker process dies here")  # not an Exception: no handler of ours runs

    dead.service._succeed = killed  # type: ignore[method-assign]  # after the 201 is on record
    with pytest.raises(KeyboardInterrupt):
        dead.service.dispatch(intent_id)
    last = dead.service.get(intent_id, with_attempts=True).attempt_log[-1]
    assert (last.op, last.status_code, last.verdict) == ("create", 201, "done")

    time.sleep(1.1)  # the lease expires
    live = make_runtime(config)
    view = wait_terminal(live, intent_id)
    assert view.status is Status.succeeded
    assert simulator.stats()["tickets_by_marker"][str(intent_id)] == 1
    assert creates_for(simulator, "hostup", intent_id) == 1
    assert "reconciled" in [e.kind for e in live.store.events(intent_id)]


# -- a reconcile reads back to the first create, not just the newest page ------------------------

def test_a_hostup_reconcile_pages_back_past_newer_tickets_to_find_the_lost_one(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url), queue=Swallow())
    intent_id = submit(rt, target="hostup", topic="vps")
    simulator.configure(drop_after_create_rate=1.0)
    rt.service.dispatch(intent_id)  # the ticket is made, the answer lost
    simulator.configure(drop_after_create_rate=0.0)
    assert rt.service.get(intent_id).needs_reconcile
    with httpx.Client(base_url=simulator.hostup_url, headers={"Authorization": f"Bearer {HOSTUP_KEY}"}) as client:
        for n in range(150):  # other producers' tickets: ours is now on the second page of 100
            client.post("/support/tickets", json={"departmentSlug": "vps", "subject": f"other {n}",
                                                  "message": "m", "priority": "low"}).raise_for_status()
    make_due(rt, intent_id)
    rt.service.dispatch(intent_id)
    view = rt.service.get(intent_id, with_attempts=True)
    assert view.status is Status.succeeded, view
    assert simulator.stats()["tickets_by_marker"][str(intent_id)] == 1
    assert creates_for(simulator, "hostup", intent_id) == 1
    assert sum(1 for a in view.attempt_log if a.op == "find") >= 2


def test_a_nocworx_reconcile_pages_back_through_the_task_list_to_the_lost_pending_task(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url), queue=Swallow())
    intent_id = submit(rt, target="nocworx", topic="dns")
    simulator.configure(drop_after_create_rate=1.0, task_delay_s=60.0)  # the task stays pending: no ticket yet
    rt.service.dispatch(intent_id)
    simulator.configure(drop_after_create_rate=0.0)
    with httpx.Client(base_url=simulator.nocworx_url, headers={"Authorization": f"Bearer {NOCWORX_KEY}"}) as client:
        for n in range(120):
            client.post("/v1/ticket", json={"department": "support", "subject": f"other {n}",
                                            "comment": "c"}).raise_for_status()
    make_due(rt, intent_id)
    rt.service.dispatch(intent_id)
    view = rt.service.get(intent_id)
    assert view.status is Status.polling and view.task_uuid, view  # adopted, polled, never sent again
    assert creates_for(simulator, "nocworx", intent_id) == 1


def test_a_lost_create_whose_task_failed_ends_failed_with_the_task_and_is_not_submitted_again(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(drop_after_create_rate=1.0, task_failure_rate=1.0)
    rt = make_runtime(make_config(simulator, database_url=database_url), threads=1)
    intent_id = submit(rt, target="nocworx", topic="dns")
    view = wait_terminal(rt, intent_id)
    assert view.status is Status.failed and view.last_error_code == "task_failure", view
    assert creates_for(simulator, "nocworx", intent_id) == 1


# -- the outbox re-publishes lost messages, not the ones still waiting in a backlog ---------------

def test_the_scheduler_republishes_a_lost_message_but_not_one_still_waiting_in_the_queue(
        database_url: str, redis_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    config = make_config(simulator, database_url=database_url, broker_url=redis_url,
                         scheduler={"interval_s": 0.2, "requeue_after_s": 1})
    rt = make_runtime(config)  # Celery over Redis, and no worker: the messages wait
    for _ in range(5):
        submit(rt, target="hostup", topic="vps")
    queue = redis.Redis.from_url(redis_url)
    assert queue.llen("dispatcher.hostup") == 5
    later = rt.service.clock() + timedelta(seconds=10)
    rt.service.clock = lambda: later  # by age alone, all five look lost
    assert rt.service.schedule_once()["enqueued"] == 0  # but their messages still wait in the queue
    assert queue.llen("dispatcher.hostup") == 5
    queue.delete("dispatcher.hostup")  # now they are lost (a flush, a restart)
    assert rt.service.schedule_once()["enqueued"] == 5
    assert queue.llen("dispatcher.hostup") == 5
    queue.close()


# -- database trouble mid-dispatch ------------------------------------------------------------------

def test_a_database_error_after_the_create_went_out_leaves_the_intent_to_lease_recovery_which_reconciles(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url, scheduler=FAST_LEASE), queue=Swallow())
    intent_id = submit(rt, target="hostup", topic="vps")
    recorded = rt.store.finish_attempt

    def database_gone(attempt_id: int, **values: Any) -> None:
        if values.get("status_code") == 201:
            raise OperationalError("UPDATE attempts ...", {}, Exception("server closed the connection"))
        recorded(attempt_id, **values)

    rt.store.finish_attempt = database_gone
    with pytest.raises(DBAPIError):  # raised to the task, which retries it later: nothing is acknowledged
        rt.service.dispatch(intent_id)
    assert rt.service.get(intent_id).status is Status.sending  # nothing released: the lease decides
    rt.store.finish_attempt = recorded
    time.sleep(1.1)
    assert rt.service.schedule_once()["recovered"] == 1
    assert rt.service.get(intent_id).needs_reconcile
    rt.service.dispatch(intent_id)
    view = rt.service.get(intent_id)
    assert view.status is Status.succeeded
    assert simulator.stats()["tickets_by_marker"][str(intent_id)] == 1
    assert creates_for(simulator, "hostup", intent_id) == 1


def test_an_unexpected_error_after_the_create_went_out_reconciles_before_sending_again(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url), queue=Swallow())
    intent_id = submit(rt, target="hostup", topic="vps")
    recorded = rt.store.finish_attempt

    def broken(attempt_id: int, **values: Any) -> None:
        if values.get("status_code") == 201:
            raise RuntimeError("a bug between the answer and its record")
        recorded(attempt_id, **values)

    rt.store.finish_attempt = broken
    rt.service.dispatch(intent_id)
    view = rt.service.get(intent_id)
    assert view.status is Status.waiting and view.needs_reconcile and view.last_error_code == "internal"
    rt.store.finish_attempt = recorded
    make_due(rt, intent_id)
    rt.service.dispatch(intent_id)
    assert rt.service.get(intent_id).status is Status.succeeded
    assert simulator.stats()["tickets_by_marker"][str(intent_id)] == 1
    assert creates_for(simulator, "hostup", intent_id) == 1


def test_intake_answers_503_with_retry_after_when_the_database_is_unreachable(simulator: RunningSimulator) -> None:
    config = parse_config({"targets": target_table(simulator), "api": tokens_table()},
                          Settings(database_url=f"postgresql://postgres@127.0.0.1:1/nope_{uuid.uuid4().hex[:6]}"),
                          env=secrets_env())
    rt = build_runtime(config, migrate_sqlite=False)
    try:
        client = TestClient(create_app(rt.service))
        headers = {"Authorization": f"Bearer {TOKENS['WRITE_TOKEN']}"}
        intent = {"target": "hostup", "topic": "vps", "subject": "s", "body": "b"}
        for body in (intent, {**intent, "idempotency_key": "k-1"}):
            answer = client.post("/v1/intents", json=body, headers=headers)
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] and answer.headers["content-type"].startswith(
                "application/problem+json")
    finally:
        rt.close()


# -- a worker presumed dead sends nothing once its intent is someone else's -------------------------

def test_a_worker_whose_lease_was_recovered_meanwhile_sends_nothing(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    config = make_config(simulator, database_url=database_url, scheduler=FAST_LEASE)
    slow = make_runtime(config, queue=Swallow(), worker="slow-worker")
    other = make_runtime(config, queue=Swallow(), worker="other-worker")
    intent_id = submit(slow, target="hostup", topic="vps")
    take_token = slow.service._take_token

    def stalled(target: Any, *args: Any, **kwargs: Any) -> Any:  # stalls past its lease; another takes it
        time.sleep(config.scheduler.lease_s / 4)  # a stall takes time: the worker can tell its lease is not fresh
        slow.store.update_intent(intent_id, lease_until=slow.service.clock() - timedelta(seconds=1))
        assert other.service.schedule_once()["recovered"] == 1
        assert other.store.claim(intent_id, statuses=DUE_STATUSES, to=Status.sending, now=other.service.clock(),
                                 lease_s=30, worker="other-worker") is not None
        return take_token(target, *args, **kwargs)

    slow.service._take_token = stalled  # type: ignore[method-assign]
    slow.service.dispatch(intent_id)
    assert simulator.requests() == []  # not even the department list: the stale worker stopped
    with other.store.session() as s:
        from dispatcher.store.tables import IntentRow

        row = s.get(IntentRow, intent_id)
        assert row is not None and row.leased_by == "other-worker" and row.status == "sending"
