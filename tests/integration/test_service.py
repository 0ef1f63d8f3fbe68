"""The service on real Postgres against the simulators over HTTP, with the in-process queue.

These cover the paths a real worker takes (claim, send, record, classify, poll, reconcile,
recover) without process management; tests/acceptance runs the same with real processes.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from dispatcher.domain import IntentView, Status
from dispatcher.errors import IntentInvalid
from dispatcher.queue import DISPATCH, POLL, EnqueueFailed
from dispatcher.runtime import Runtime
from dispatcher.simulator import RunningSimulator
from dispatcher.store.tables import AttemptRow, IntentRow
from tests.conftest import make_config
from tests.integration.test_delivery import Swallow


def wait_terminal(rt: Runtime, ids: list[uuid.UUID], timeout: float = 30.0,
                  tick_scheduler: bool = True) -> list[IntentView]:
    deadline = time.monotonic() + timeout
    while True:
        if tick_scheduler:
            rt.service.schedule_once()
        views = [rt.service.get(i) for i in ids]
        if all(v.terminal for v in views) or time.monotonic() > deadline:
            return views
        time.sleep(0.1)


def submit(rt: Runtime, **fields: Any) -> uuid.UUID:
    data = {"subject": f"Test {uuid.uuid4().hex[:8]}", "body": "Body text.", **fields}
    return rt.service.accept(data).intent.id


def test_intents_to_both_providers_get_one_ticket_each_in_the_right_department(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url))
    cases = {
        submit(rt, target="hostup", topic="vps"): ("vps", None),
        submit(rt, target="hostup", topic="ip"): ("vps", None),
        submit(rt, target="hostup", topic="network"): ("vps", None),
        submit(rt, target="hostup", topic="dns"): ("domain-names", None),
        submit(rt, target="nocworx", topic="dns"): ("support", "dns"),
        submit(rt, target="nocworx", topic="migration"): ("migrations", None),
    }
    views = wait_terminal(rt, list(cases))
    per_marker = simulator.stats()["tickets_by_marker"]
    for view in views:
        department, category = cases[view.id]
        assert view.status is Status.succeeded, view
        assert (view.resolved_department, view.resolved_category) == (department, category)
        assert view.ticket is not None
        assert per_marker[str(view.id)] == 1
        if view.target == "hostup":
            assert view.ticket.provider_id.startswith("tkt_") and view.ticket.number.isdigit()
        else:
            assert view.ticket.provider_id.isdigit() and "-" in (view.ticket.number or "")


def test_every_exchange_is_recorded_with_what_was_sent_and_what_came_back(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url))
    intent_id = submit(rt, target="nocworx", topic="email", cc=["ops@example.com"])
    [view] = wait_terminal(rt, [intent_id])
    full = rt.service.get(intent_id, with_attempts=True)
    ops = [a.op for a in full.attempt_log]
    assert view.status is Status.succeeded
    assert ops[0] == "create" and "poll" in ops
    create = full.attempt_log[0]
    assert create.status_code == 202 and create.task_uuid and create.duration_ms is not None
    assert create.request and create.request["json"]["recipients"] == ["ops@example.com"]
    assert f"dispatcher-ref: {intent_id}" in create.request["json"]["comment"]
    assert all(a.finished_at is not None and a.worker for a in full.attempt_log)


def test_a_replayed_idempotency_key_returns_the_same_intent_and_makes_no_second_ticket(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url))
    data = {"target": "hostup", "topic": "vps", "subject": "Once", "body": "b", "idempotency_key": "k-1"}
    first = rt.service.accept(data)
    second = rt.service.accept(data)
    assert not first.replay and second.replay and first.intent.id == second.intent.id
    wait_terminal(rt, [first.intent.id])
    assert rt.service.accept(data).intent.status is Status.succeeded
    assert simulator.stats()["tickets_by_marker"] == {str(first.intent.id): 1}


def test_a_message_delivered_again_after_success_does_nothing(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url))
    intent_id = submit(rt, target="hostup", topic="vps")
    wait_terminal(rt, [intent_id])
    before = len(simulator.requests())
    for _ in range(3):
        rt.service.dispatch(intent_id)
        rt.service.poll(intent_id)
    assert len(simulator.requests()) == before
    assert simulator.stats()["tickets_by_marker"][str(intent_id)] == 1


@pytest.mark.parametrize("target", ["hostup", "nocworx"])
def test_a_create_whose_answer_was_dropped_is_reconciled_not_sent_again(
        target: str, database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(drop_after_create_rate=1.0)
    rt = make_runtime(make_config(simulator, database_url=database_url), threads=1)
    intent_id = submit(rt, target=target, topic="dns")
    deadline = time.monotonic() + 10
    while simulator.stats()["tickets_by_marker"].get(str(intent_id), 0) == 0 and not \
            simulator.stats()["nocworx"]["tasks"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    simulator.configure(drop_after_create_rate=0.0)
    [view] = wait_terminal(rt, [intent_id])
    assert view.status is Status.succeeded
    assert simulator.stats()["tickets_by_marker"][str(intent_id)] == 1
    kinds = [e.kind for e in rt.store.events(intent_id)]
    assert "reconcile" in kinds and "reconciled" in kinds


def test_an_intent_whose_worker_died_mid_send_is_recovered_and_reconciled(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    config = make_config(simulator, database_url=database_url,
                         scheduler={"interval_s": 0.2, "requeue_after_s": 5, "lease_s": 1})

    class Swallow:
        def enqueue(self, *_: Any, **__: Any) -> None:
            return None

        def enqueue_many(self, *_: Any, **__: Any) -> None:
            return None

    rt = make_runtime(config, queue=Swallow())
    intent_id = submit(rt, target="hostup", topic="vps")
    # a worker claims it, records its create attempt, and dies before the answer is recorded
    now = rt.service.clock()
    claimed = rt.store.claim(intent_id, statuses=[Status.queued], to=Status.sending, now=now, lease_s=0.5,
                             worker="dead-worker")
    assert claimed is not None
    rt.store.begin_attempt(intent_id, number=1, op="create", method="POST", path="/support/tickets",
                           request=None, worker="dead-worker", now=now)
    time.sleep(0.6)
    live = make_runtime(config)
    [view] = wait_terminal(live, [intent_id])
    assert view.status is Status.succeeded
    assert simulator.stats()["tickets_by_marker"][str(intent_id)] == 1
    events = [e.message for e in live.store.events(intent_id)]
    assert any("worker lost" in m for m in events)
    with live.store.session() as s:
        lost = s.scalar(select(AttemptRow).where(AttemptRow.worker == "dead-worker"))
        assert lost is not None and lost.verdict == "unknown" and lost.error_code == "worker_lost"


def test_an_intent_the_broker_did_not_take_is_enqueued_by_the_scheduler(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    config = make_config(simulator, database_url=database_url)

    class Down:
        def enqueue(self, *_: Any, **__: Any) -> None:
            raise EnqueueFailed("redis down")

        def enqueue_many(self, *_: Any, **__: Any) -> None:
            raise EnqueueFailed("redis down")

    producer = make_runtime(config, queue=Down())
    intent_id = submit(producer, target="hostup", topic="vps")
    assert producer.service.get(intent_id).status is Status.queued
    worker = make_runtime(config)
    assert worker.service.schedule_once()["enqueued"] == 1
    [view] = wait_terminal(worker, [intent_id], tick_scheduler=False)
    assert view.status is Status.succeeded


def test_a_refused_key_pauses_the_target_and_its_intents_wait_until_resumed(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(hostup_key="rotated-key")
    rt = make_runtime(make_config(simulator, database_url=database_url))
    first, second = submit(rt, target="hostup", topic="vps"), submit(rt, target="hostup", topic="dns")
    deadline = time.monotonic() + 10
    while "hostup" not in rt.store.paused_targets():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    views = [rt.service.get(i) for i in (first, second)]
    assert all(v.status in (Status.waiting, Status.queued) for v in views)
    assert simulator.stats()["hostup"]["401"] <= 2  # the target stopped; intents did not each burn attempts
    simulator.configure(hostup_key="test-hostup-key-0123456789abcdef")
    assert rt.service.resume_target("hostup", actor="test") == 2
    views = wait_terminal(rt, [first, second], timeout=10)
    assert [v.status for v in views] == [Status.succeeded, Status.succeeded]


def test_a_task_that_stays_pending_fails_at_the_deadline_and_is_never_resubmitted(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(task_stuck_rate=1.0)
    rt = make_runtime(make_config(simulator, database_url=database_url,
                                  nocworx={"poll": {"interval_s": 0.2, "deadline_s": 1.5}}))
    intent_id = submit(rt, target="nocworx", topic="dns")
    [view] = wait_terminal(rt, [intent_id], timeout=15)
    assert view.status is Status.failed and view.last_error_code == "task_timeout"
    assert "still pending" in (view.last_error_message or "")
    creates = [r for r in simulator.requests("nocworx") if r["method"] == "POST"]
    assert len(creates) == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def scheduled_waits(first: float, interval: float, growth: float, cap: float, deadline: float) -> list[float]:
    """What [targets.X.poll] asks for, polls taking no time: the first look, then interval + growth x
    the task's age (at most cap), the last one right at the deadline."""
    waits, elapsed = [first], first
    while elapsed < deadline:
        waits.append(min(cap, interval + growth * elapsed, deadline - elapsed))
        elapsed += waits[-1]
    return waits


def test_a_pending_task_is_polled_quickly_first_then_less_often_as_it_ages_and_once_more_at_the_deadline(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(task_stuck_rate=1.0)
    poll = {"first_s": 0.5, "interval_s": 1, "growth": 0.2, "max_interval_s": 4, "deadline_s": 40}
    queue = Swallow()
    rt = make_runtime(make_config(simulator, database_url=database_url, nocworx={"poll": poll}), queue=queue)
    clock = FakeClock()
    rt.service.clock = clock
    intent_id = submit(rt, target="nocworx", topic="dns")
    rt.service.dispatch(intent_id)                                  # the create: a task to poll
    waits: list[float] = []
    view = rt.service.get(intent_id)
    while not view.terminal:
        task, _, countdown = [m for m in queue.sent if m[1] == intent_id][-1]
        assert task == POLL and view.status is Status.polling and view.next_attempt_at is not None
        assert (view.next_attempt_at - clock.now).total_seconds() == pytest.approx(countdown, abs=1e-5)
        waits.append(countdown)
        clock.now = view.next_attempt_at                            # the countdown runs out: the worker polls
        rt.service.poll(intent_id)
        view = rt.service.get(intent_id)
    expected = scheduled_waits(0.5, 1.0, 0.2, 4.0, 40.0)
    assert waits == pytest.approx(expected, abs=1e-4)
    assert waits[0] == 0.5 and max(waits) == 4.0 and 1 < len(expected) < 40 / 1.0
    assert view.status is Status.failed and view.last_error_code == "task_timeout"
    looks = [r for r in simulator.requests("nocworx") if r["method"] == "GET" and r["path"].startswith("/v1/task/")]
    assert len(looks) == len(waits)                                  # one look per wait, the last at the deadline
    story = [e.message for e in rt.store.events(intent_id) if e.kind == "polling"]
    assert any("first after 0.5 s, then every 1 s + 0.2 x the task's age (at most 4 s)" in m for m in story)


def test_fixed_interval_polling_is_growth_zero_with_the_first_look_at_the_interval(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(task_stuck_rate=1.0)
    poll = {"first_s": 2, "interval_s": 2, "growth": 0, "deadline_s": 9}
    queue = Swallow()
    rt = make_runtime(make_config(simulator, database_url=database_url, nocworx={"poll": poll}), queue=queue)
    clock = FakeClock()
    rt.service.clock = clock
    intent_id = submit(rt, target="nocworx", topic="dns")
    rt.service.dispatch(intent_id)
    view = rt.service.get(intent_id)
    while not view.terminal:
        assert view.next_attempt_at is not None
        clock.now = view.next_attempt_at
        rt.service.poll(intent_id)
        view = rt.service.get(intent_id)
    assert [m[2] for m in queue.sent if m[0] == POLL] == pytest.approx([2, 2, 2, 2, 1], abs=1e-4)


def test_a_retry_after_on_a_poll_answer_is_honoured_over_the_schedule_and_the_deadline(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(task_stuck_rate=1.0)
    queue = Swallow()
    rt = make_runtime(make_config(simulator, database_url=database_url, nocworx={"poll": {"deadline_s": 3}}),
                      queue=queue)
    clock = FakeClock()
    rt.service.clock = clock
    intent_id = submit(rt, target="nocworx", topic="dns")
    rt.service.dispatch(intent_id)
    simulator.configure(rate_limit=1, rate_window_s=1000)
    for _ in range(2):                         # the first look takes the window's one request, the second: 429
        view = rt.service.get(intent_id)
        assert view.next_attempt_at is not None
        clock.now = view.next_attempt_at
        rt.service.poll(intent_id)
    [refused] = [r for r in simulator.requests("nocworx") if r["status"] == 429]
    retry_after = float(refused["retry_after"])
    view = rt.service.get(intent_id)
    assert view.status is Status.polling and view.next_attempt_at is not None
    # the schedule alone would look again 1 + 0.1 x 1.55 s later, and at the latest at the deadline (1.45 s)
    scheduled = min(1.0 + 0.1 * 1.55, 3 - 1.55)
    waited = (view.next_attempt_at - clock.now).total_seconds()
    assert waited >= retry_after
    assert waited == pytest.approx(max(retry_after, scheduled), abs=1e-4)


class Sleeps:
    """The service's sleep, really sleeping, with what it was asked for."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        time.sleep(seconds)


def polls(queue: Swallow) -> list[tuple[str, uuid.UUID, float]]:
    return [m for m in queue.sent if m[0] == POLL]


def task_looks(simulator: RunningSimulator) -> list[dict[str, Any]]:
    return [r for r in simulator.requests("nocworx") if r["method"] == "GET" and r["path"].startswith("/v1/task/")]


#: NocWorx's poll schedule in the first-look tests: the default first look, a short deadline
FIRST_LOOK_AT_HALF_A_SECOND = {"first_s": 0.5, "interval_s": 1, "deadline_s": 20}


def green_runtime(make_runtime: Any, simulator: RunningSimulator, database_url: str,
                  poll: dict[str, Any]) -> tuple[Runtime, Swallow]:
    """A service as a gevent worker's (first looks within 1 s taken in the task), with ``poll`` for
    NocWorx, publishing into a :class:`Swallow`."""
    queue = Swallow()
    rt = make_runtime(make_config(simulator, database_url=database_url, nocworx={"poll": poll}), queue=queue)
    rt.service.inline_poll_max_s = 1.0
    return rt, queue


def test_a_green_worker_takes_the_first_look_at_a_task_itself_and_keeps_the_lease_meanwhile(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    # the simulator's tasks resolve 0.2 s after the 202: done at the first look (0.5 s)
    rt, queue = green_runtime(make_runtime, simulator, database_url, FIRST_LOOK_AT_HALF_A_SECOND)
    sleeps = Sleeps()
    rt.service.sleep = sleeps
    kept: list[IntentView | None] = []
    wait_first = rt.service._poll_leased

    def look(intent: IntentView, target: Any) -> None:
        kept.append(rt.service.get(intent.id))   # as stored during the look
        wait_first(intent, target)

    rt.service._poll_leased = look
    intent_id = submit(rt, target="nocworx", topic="dns")
    rt.service.dispatch(intent_id)

    view = rt.service.get(intent_id, with_attempts=True)
    assert view.status is Status.succeeded and view.ticket is not None
    assert polls(queue) == []                                      # no poll message
    assert 0.5 in sleeps.asked
    assert [a.op for a in view.attempt_log] == ["create", "poll"] and len(task_looks(simulator)) == 1
    assert view.deliveries == 1 and view.attempts == 1
    [during] = kept
    assert during is not None and during.status is Status.polling and during.task_uuid == view.task_uuid
    with rt.store.session() as s:                                   # released at the end
        assert s.scalar(select(IntentRow.leased_by).where(IntentRow.id == intent_id)) is None
    kinds = [e.kind for e in rt.store.events(intent_id)]
    assert kinds[-2:] == ["polling", "succeeded"]


def test_a_task_pending_at_the_first_look_is_polled_on_by_message_on_the_schedule(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(task_stuck_rate=1.0)
    rt, queue = green_runtime(make_runtime, simulator, database_url,
                              {"first_s": 0.3, "interval_s": 1, "growth": 0.2, "deadline_s": 20})
    clock = FakeClock()
    rt.service.clock = clock

    def sleep(seconds: float) -> None:  # the wait passes on the service's clock
        clock.now += timedelta(seconds=seconds)

    rt.service.sleep = sleep
    intent_id = submit(rt, target="nocworx", topic="dns")
    rt.service.dispatch(intent_id)

    view = rt.service.get(intent_id)
    assert view.status is Status.polling and len(task_looks(simulator)) == 1
    [(_, _, countdown)] = polls(queue)
    assert countdown == pytest.approx(1 + 0.2 * 0.3, abs=0.03)  # the schedule's second wait
    with rt.store.session() as s:
        assert s.scalar(select(IntentRow.leased_by).where(IntentRow.id == intent_id)) is None


def test_a_first_look_due_later_than_the_green_bound_goes_by_message(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt, queue = green_runtime(make_runtime, simulator, database_url, {"first_s": 2, "interval_s": 2, "deadline_s": 20})
    intent_id = submit(rt, target="nocworx", topic="dns")
    rt.service.dispatch(intent_id)

    [(_, polled, countdown)] = polls(queue)
    assert polled == intent_id and countdown == pytest.approx(2.0)
    assert task_looks(simulator) == []
    assert rt.service.get(intent_id).status is Status.polling


def test_a_worker_whose_lease_was_taken_over_does_not_take_the_first_look(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt, queue = green_runtime(make_runtime, simulator, database_url, FIRST_LOOK_AT_HALF_A_SECOND)
    release = rt.store.release

    def taken_over_first(intent_id: uuid.UUID, worker: str, **kwargs: Any) -> bool:
        if kwargs.get("keep_lease_s") is not None:  # presumed dead meanwhile: another worker holds it now
            with rt.store.session() as s, s.begin():
                s.execute(update(IntentRow).where(IntentRow.id == intent_id).values(leased_by="other"))
        return release(intent_id, worker, **kwargs)

    rt.store.release = taken_over_first
    intent_id = submit(rt, target="nocworx", topic="dns")
    rt.service.dispatch(intent_id)

    assert task_looks(simulator) == [] and polls(queue) == []
    with rt.store.session() as s:
        assert s.scalar(select(IntentRow.leased_by).where(IntentRow.id == intent_id)) == "other"


class Lost(BaseException):
    """The worker process dies (kill -9) in the middle of a wait."""


def test_a_worker_lost_while_waiting_for_the_first_look_leaves_the_task_to_the_scheduler_after_its_lease(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt, queue = green_runtime(make_runtime, simulator, database_url, FIRST_LOOK_AT_HALF_A_SECOND)
    clock = FakeClock()
    rt.service.clock = clock

    def die(seconds: float) -> None:
        if seconds == 0.5:
            raise Lost

    rt.service.sleep = die
    intent_id = submit(rt, target="nocworx", topic="dns")
    with pytest.raises(Lost):
        rt.service.dispatch(intent_id)

    view = rt.service.get(intent_id, with_attempts=True)
    assert view.status is Status.polling and view.task_uuid is not None and polls(queue) == []
    assert [(a.op, a.verdict) for a in view.attempt_log] == [("create", "poll")]   # the task is on record
    lease_s = rt.config.scheduler.lease_s
    clock.now += timedelta(seconds=0.5 + lease_s - 1)            # still leased: nobody else polls it
    assert rt.service.schedule_once()["polls"] == 0 and polls(queue) == []
    clock.now += timedelta(seconds=2)                            # the lease has expired: the scheduler sends it
    assert rt.service.schedule_once()["polls"] == 1
    assert [m[:2] for m in polls(queue)] == [(POLL, intent_id)]
    rt.service.sleep = time.sleep
    time.sleep(0.3)                                              # the simulator's task is done by then
    rt.service.poll(intent_id)
    assert rt.service.get(intent_id).status is Status.succeeded


def test_a_failed_task_ends_failed_with_the_providers_message(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(task_failure_rate=1.0)
    rt = make_runtime(make_config(simulator, database_url=database_url))
    [view] = wait_terminal(rt, [submit(rt, target="nocworx", topic="ssl")])
    assert view.status is Status.failed and view.last_error_code == "task_failure"
    assert view.last_error_message and "NocWorx task" in view.last_error_message


def test_a_second_critical_ticket_within_the_hour_is_downgraded_to_urgent(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url), threads=1)
    ids = [submit(rt, target="hostup", topic="hosting", priority="critical", critical_reason="all down")
           for _ in range(2)]
    views = wait_terminal(rt, ids)
    assert [v.status for v in views] == [Status.succeeded, Status.succeeded]
    assert sorted(v.priority.value for v in views) == ["critical", "urgent"]
    assert simulator.stats()["hostup"]["critical_refused"] == 1


def test_a_topic_whose_department_the_provider_does_not_list_fails_naming_topic_and_slugs(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(hostup_departments=[{"slug": "vps", "displayName": "VPS", "description": None,
                                             "email": None},
                                            {"slug": "billing", "displayName": "Billing",
                                             "description": "<p>Invoices</p>", "email": None}])
    rt = make_runtime(make_config(simulator, database_url=database_url))
    [view] = wait_terminal(rt, [submit(rt, target="hostup", topic="dns")])
    assert view.status is Status.failed and view.last_error_code == "department_not_found"
    assert "topic 'dns'" in (view.last_error_message or "")
    assert "billing, vps" in (view.last_error_message or "")
    assert simulator.stats()["hostup"]["tickets"] == 0


def test_retries_give_up_after_the_configured_attempts_with_the_last_error_kept(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(error_rate=1.0)
    rt = make_runtime(make_config(simulator, database_url=database_url,
                                  hostup={"retry": {"max_attempts": 3, "base_s": 0.05, "cap_s": 0.1}}))
    [view] = wait_terminal(rt, [submit(rt, target="hostup", topic="vps")])
    assert view.status is Status.failed and view.attempts == 3
    assert "gave up after 3 attempt(s)" in (view.last_error_message or "")


def test_bad_input_stores_nothing(database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url))
    with pytest.raises(IntentInvalid):
        rt.service.accept({"target": "hostup", "subject": "", "body": "x"})
    with rt.store.session() as s:
        assert s.scalar(select(func.count()).select_from(IntentRow)) == 0


def test_an_early_message_is_put_back_until_its_time(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url), threads=1)
    intent_id = submit(rt, target="hostup", topic="vps")
    wait_terminal(rt, [intent_id])
    other = submit(rt, target="hostup", topic="vps")
    wait_terminal(rt, [other])
    # a waiting intent whose time has not come is not sent by an early message
    rt.store.update_intent(other, status="waiting", next_attempt_at=rt.service.clock() + timedelta(seconds=60))
    before = len(simulator.requests())
    rt.service.dispatch(other)
    assert len(simulator.requests()) == before


class Ticking:
    """A clock that reads ``start``, then ``step`` later at every reading after that."""

    def __init__(self, start: datetime, step: timedelta) -> None:
        self.next, self.step = start, step

    def __call__(self) -> datetime:
        now, self.next = self.next, self.next + self.step
        return now


def waiting_intent(make_runtime: Any, simulator: RunningSimulator, database_url: str,
                   **values: Any) -> tuple[Runtime, Swallow, uuid.UUID]:
    """A HostUp intent set waiting with ``values``, in a runtime whose queue keeps what it is given
    (emptied of the intake's message)."""
    queue = Swallow()
    rt = make_runtime(make_config(simulator, database_url=database_url), queue=queue)
    intent_id = submit(rt, target="hostup", topic="vps")
    rt.store.update_intent(intent_id, status="waiting", **values)
    queue.sent.clear()
    return rt, queue, intent_id


def test_a_message_a_few_milliseconds_early_goes_back_due_at_once_though_it_is_due_by_the_time_it_is_judged(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    # a countdown fires a hair before the intent's time: the claim finds it not yet due, and a moment
    # later it is due; dropped as a replay, it waited for the scheduler's re-publishing (chaos G2)
    start = datetime.now(UTC)
    rt, queue, intent_id = waiting_intent(make_runtime, simulator, database_url,
                                          next_attempt_at=start + timedelta(milliseconds=5))
    rt.service.clock = Ticking(start, timedelta(milliseconds=20))

    rt.service.dispatch(intent_id)

    assert queue.sent == [(DISPATCH, intent_id, 0.0)]
    assert rt.service.get(intent_id).status is Status.waiting   # nothing sent, nothing claimed
    assert simulator.requests("hostup") == []


def test_a_message_for_an_intent_that_is_due_but_held_by_another_worker_is_a_replay_and_goes_nowhere(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    now = datetime.now(UTC)
    rt, queue, intent_id = waiting_intent(make_runtime, simulator, database_url,
                                          next_attempt_at=now - timedelta(seconds=1),
                                          lease_until=now + timedelta(seconds=60), leased_by="another")

    rt.service.dispatch(intent_id)

    assert queue.sent == []


class _WorkerFirst:
    """A queue whose worker takes the intent before ``enqueue`` returns: the race at its worst."""

    def __init__(self) -> None:
        self.service: Any = None

    def enqueue(self, task: str, intent_id: uuid.UUID, *, target: str, countdown: float = 0.0) -> None:
        from dispatcher.runtime import run_task

        run_task(self.service, task, intent_id)

    def enqueue_many(self, task: str, items: list[tuple[uuid.UUID, str]]) -> None:
        for intent_id, target in items:
            self.enqueue(task, intent_id, target=target)


def test_accept_answers_with_the_intent_as_accepted_even_when_a_worker_has_already_sent_it(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    queue = _WorkerFirst()
    rt = make_runtime(make_config(simulator, database_url=database_url), queue=queue)
    queue.service = rt.service
    accepted = rt.service.accept({"target": "hostup", "topic": "vps", "subject": "Raced", "body": "Body text."})

    assert accepted.replay is False
    assert accepted.intent.status is Status.queued
    assert accepted.intent.attempts == 0 and accepted.intent.ticket is None
    # the answer is a snapshot: the stored intent has moved on
    assert rt.service.get(accepted.intent.id).status is Status.succeeded
