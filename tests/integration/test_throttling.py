"""The service under the rate limiter, on real Postgres against the simulator: every request takes a
token, a throttled intent goes back without an attempt counted, short waits are slept in-process,
and a paused target spends no tokens. Messages are recorded, not delivered: each test drives
``dispatch``/``poll`` itself, so nothing here depends on timing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dispatcher.config import TargetConfig
from dispatcher.domain import Status
from dispatcher.providers.base import Outcome
from dispatcher.queue import DISPATCH, POLL
from dispatcher.ratelimit import MemoryLimiter
from dispatcher.runtime import Runtime, build_runtime
from dispatcher.service import PAUSED_RECHECK_S, THROTTLE_LEAD_S
from dispatcher.simulator import RunningSimulator
from tests.conftest import make_config


@dataclass
class Recorded:
    """A queue that keeps what was published, so a test decides what runs when."""

    messages: list[tuple[str, uuid.UUID, float]] = field(default_factory=list)

    def enqueue(self, task: str, intent_id: uuid.UUID, *, target: str, countdown: float = 0.0) -> None:
        self.messages.append((task, intent_id, countdown))

    def enqueue_many(self, task: str, items: list[tuple[uuid.UUID, str]]) -> None:
        self.messages.extend((task, intent_id, 0.0) for intent_id, _ in items)


class Spy:
    """A limiter that counts the tokens it hands out, in front of a real one (or a script of waits)."""

    def __init__(self, inner: Any = None, script: list[float] | None = None) -> None:
        self.inner = inner or MemoryLimiter()
        self.script = list(script or [])
        self.granted = 0
        self.asked = 0

    def acquire(self, target: TargetConfig, patience_s: float = 0.0, holder: str | None = None) -> float:
        self.asked += 1
        wait = self.script.pop(0) if self.script else self.inner.acquire(target, patience_s, holder)
        self.granted += wait == 0
        return float(wait)

    def observe(self, target: TargetConfig, outcome: Outcome, now: datetime) -> None:
        self.inner.observe(target, outcome, now)


@pytest.fixture
def runtimes() -> Iterator[list[Runtime]]:
    made: list[Runtime] = []
    yield made
    for rt in made:
        rt.close()


def make(runtimes: list[Runtime], database_url: str, sim: RunningSimulator, limiter: Any,
         **targets: Any) -> tuple[Runtime, Recorded]:
    queue = Recorded()
    rt = build_runtime(make_config(sim, database_url=database_url, **targets), queue=queue, limiter=limiter)
    runtimes.append(rt)
    return rt, queue


def submit(rt: Runtime, target: str, topic: str = "dns") -> uuid.UUID:
    return rt.service.accept({"target": target, "topic": topic, "subject": f"S {uuid.uuid4().hex[:6]}",
                              "body": "b"}).intent.id


class Clock:
    """One fake time for the service (datetimes) and the limiter (epoch seconds)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def epoch(self) -> float:
        return self.now.timestamp()

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def test_a_throttled_intent_goes_back_without_an_attempt_counted_and_keeps_its_turn(
        database_url: str, simulator: RunningSimulator, runtimes: list[Runtime]) -> None:
    clock = Clock()
    rt, queue = make(runtimes, database_url, simulator, MemoryLimiter(clock=clock.epoch),
                     nocworx={"rate": "1/minute", "burst": 1})
    rt.service.clock = clock
    first, second = submit(rt, "nocworx"), submit(rt, "nocworx")
    rt.service.dispatch(first)
    rt.service.dispatch(second)

    view = rt.service.get(second, with_attempts=True)
    assert view.status is Status.waiting and view.attempts == 0 and view.attempt_log == ()
    assert view.last_error_code is None
    assert view.next_attempt_at is not None
    # its turn is a minute on, past short_wait_s (30 s): it waits in Postgres and is handed out again
    # half that (15 s) early, so the scheduler's lateness cannot cost it the turn; no countdown yet
    assert (view.next_attempt_at - clock.now).total_seconds() == pytest.approx(60 - 15, abs=1.5)
    assert [m for m in queue.messages if m[1] == second and m[2] > 0] == []

    clock.advance(46)                                            # the scheduler hands it out
    rt.service.dispatch(second)
    view = rt.service.get(second)
    assert view.status is Status.waiting and view.attempts == 0
    [(_, _, countdown)] = [m for m in queue.messages if m[1] == second and m[2] > 0]
    assert countdown == pytest.approx(60 - 46 - THROTTLE_LEAD_S, abs=1)   # the same turn, counted down
    assert len([r for r in simulator.requests("nocworx") if r["method"] == "POST"]) == 1


def test_every_request_to_a_target_takes_a_token(
        database_url: str, simulator: RunningSimulator, runtimes: list[Runtime]) -> None:
    spy = Spy()
    rt, _ = make(runtimes, database_url, simulator, spy)
    hostup, nocworx = submit(rt, "hostup"), submit(rt, "nocworx")
    rt.service.dispatch(hostup)                  # the department list, then the create
    rt.service.dispatch(nocworx)                 # the create: a task to poll
    rt.store.update_intent(nocworx, next_attempt_at=rt.service.clock())
    rt.service.poll(nocworx)                     # the task, then (resource named) done

    assert rt.service.get(hostup).status is Status.succeeded
    assert spy.granted == spy.asked == len(simulator.requests())
    assert {r["path"] for r in simulator.requests("hostup")} == {"/api/v2/support/departments",
                                                                 "/api/v2/support/tickets"}


def test_a_short_wait_is_slept_in_process_and_the_intent_sent_at_once(
        database_url: str, simulator: RunningSimulator, runtimes: list[Runtime]) -> None:
    rt, queue = make(runtimes, database_url, simulator, Spy(script=[0.08, 0.05, 0.0]))
    slept: list[float] = []
    rt.service.sleep = slept.append
    intent_id = submit(rt, "nocworx")
    queue.messages.clear()
    rt.service.dispatch(intent_id)

    assert slept[:2] == [0.08, 0.05]            # then, at most, the pause that paces the send
    view = rt.service.get(intent_id)
    assert view.status is Status.polling and view.attempts == 1
    assert [m[0] for m in queue.messages] == [POLL]


def test_a_request_leaves_a_fixed_time_after_its_token_whatever_its_record_took(
        database_url: str, simulator: RunningSimulator, runtimes: list[Runtime]) -> None:
    rt, _ = make(runtimes, database_url, simulator, Spy())
    slept: list[float] = []
    rt.service.sleep = slept.append
    rt.service.send_pace_s = 5.0                # far longer than writing the attempt takes
    rt.service.dispatch(submit(rt, "nocworx"))

    [pause] = slept
    assert 4.0 < pause < 5.0                    # 5 s after the token, less the time the record took
    assert len(simulator.requests("nocworx")) == 1


def test_a_wait_past_the_in_process_limit_puts_the_intent_back_by_countdown(
        database_url: str, simulator: RunningSimulator, runtimes: list[Runtime]) -> None:
    rt, queue = make(runtimes, database_url, simulator, Spy(script=[0.2, 3.0]))
    slept: list[float] = []
    rt.service.sleep = slept.append
    intent_id = submit(rt, "nocworx")
    queue.messages.clear()
    rt.service.dispatch(intent_id)

    assert slept == [0.2]        # 0.2 s fits the 0.25 s in-process allowance; 3 s does not
    view = rt.service.get(intent_id, with_attempts=True)
    assert view.status is Status.waiting and view.attempts == 0 and view.attempt_log == ()
    # it comes back a little early and waits the rest in-process, so it is there when its token is
    assert queue.messages == [(DISPATCH, intent_id, pytest.approx(3.0 - THROTTLE_LEAD_S, abs=0.05))]
    assert simulator.requests() == []


def test_a_throttled_poll_keeps_polling_after_the_wait_not_the_poll_interval(
        database_url: str, simulator: RunningSimulator, runtimes: list[Runtime]) -> None:
    spy = Spy()
    rt, queue = make(runtimes, database_url, simulator, spy, nocworx={"poll": {"interval_s": 5, "deadline_s": 60}})
    intent_id = submit(rt, "nocworx")
    rt.service.dispatch(intent_id)
    rt.store.update_intent(intent_id, next_attempt_at=rt.service.clock())
    queue.messages.clear()
    spy.script = [1.5]
    rt.service.poll(intent_id)

    view = rt.service.get(intent_id)
    assert view.status is Status.polling and view.attempts == 1
    assert queue.messages == [(POLL, intent_id, pytest.approx(1.5 - THROTTLE_LEAD_S, abs=0.05))]
    assert [r["path"].startswith("/v1/task") for r in simulator.requests("nocworx")] == [False]


def test_a_paused_target_spends_no_tokens_and_resumes_when_unpaused(
        database_url: str, simulator: RunningSimulator, runtimes: list[Runtime]) -> None:
    spy = Spy()
    rt, _ = make(runtimes, database_url, simulator, spy)
    rt.service.pause_target("nocworx", actor="test", reason="maintenance")
    intent_id = submit(rt, "nocworx")
    before = rt.service.clock()
    rt.service.dispatch(intent_id)

    view = rt.service.get(intent_id)
    assert view.status is Status.waiting and view.attempts == 0 and spy.asked == 0
    assert view.next_attempt_at is not None
    assert (view.next_attempt_at - before).total_seconds() == pytest.approx(PAUSED_RECHECK_S, abs=1)
    assert rt.service.resume_target("nocworx", actor="test") == 1
    rt.service.dispatch(intent_id)
    assert rt.service.get(intent_id).status is Status.polling and spy.granted == 1
