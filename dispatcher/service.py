"""The use cases: accept, dispatch, poll, schedule, retry, cancel.

Everything here talks to the outside through ports: :class:`~dispatcher.store.repo.Store`
(Postgres/SQLite), :class:`~dispatcher.queue.TaskQueue` (Celery/in-process), a transport per target
(httpx) and the provider adapters (pure). The provider adapter's ``classify`` decides what an
answer means; this module decides what happens next and records it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy.exc import DBAPIError

from dispatcher import metrics
from dispatcher.backoff import next_retry
from dispatcher.config import AppConfig, TargetConfig
from dispatcher.domain import (
    DUE_STATUSES,
    Action,
    IntentInput,
    IntentView,
    Priority,
    Status,
    body_with_marker,
    new_intent_ids,
    parse_intent,
    provider_problems,
)
from dispatcher.errors import FieldProblem, IntentInvalid, RoutingError, UnknownIntent
from dispatcher.groups import Decision, GroupKind, GroupPolicy, GroupState, GroupView, Step, decide, plan_steps
from dispatcher.intake.alerts import Notification, diff_states, intent_fields, reply_text, route_notification, state_of
from dispatcher.providers.base import (
    Op,
    Outcome,
    ProviderAdapter,
    RawResponse,
    RequestSpec,
    TicketDraft,
    TicketRef,
    Verdict,
)
from dispatcher.queue import DISPATCH, POLL, EnqueueFailed, TaskQueue
from dispatcher.routing import Resolution, Route, check_topic, merged_routes, resolve
from dispatcher.store.groups import GroupStore
from dispatcher.store.repo import LeaseLost, Store
from dispatcher.store.tables import EventRow, IntentRow

log = logging.getLogger(__name__)

#: how long a paused target's intents wait before they look again
PAUSED_RECHECK_S = 30.0
#: a worker gives up an intent it was handed this many times without finishing (poison)
MAX_DELIVERIES = 10
#: a reconcile reads lists back to the intent's first create minus this (clock skew with the provider)
RECONCILE_SLACK_S = 60.0
#: ... but at most this many pages of each list (100 items each)
RECONCILE_MAX_PAGES = 50
#: stored request fields are cut to this many characters
REQUEST_FIELD_MAX = 2000
#: a follow-up whose group's ticket is still being made looks again after this long (not an attempt)
GROUP_TICKET_WAIT_S = 1.0
#: a worker waits for a rate-limit token in-process at most this long per request; longer waits go
#: back to the queue so the thread can serve other targets
INPROCESS_WAIT_MAX_S = 0.25
#: a request leaves this long after its rate-limit token (or as soon as its attempt is on record, if
#: that took longer). Writing the record takes 3 ms to 25 ms (99th percentile under load); sending at
#: a fixed offset keeps the spacing the limiter chose instead of adding that spread to it, which is
#: what lets a fixed-window provider see N+1 requests in one window.
SEND_PACE_S = 0.025
#: a throttled intent comes back this much before its turn and waits the rest in-process: delivery
#: through the broker and the claim take milliseconds, and a token nobody is there to take is lost
THROTTLE_LEAD_S = 0.1
#: a worker whose waits are cheap (a gevent pool: a waiting greenlet holds no thread) takes the first
#: look at a NocWorx task itself when it is due within this long, keeping the intent's lease: one
#: broker round trip (publish, deliver, ack) and one claim less per task. Other pools publish it.
INLINE_POLL_MAX_S = 1.0


class Throttled(Exception):
    """The target's budget has no token for this request: put the intent back, no attempt counted."""

    def __init__(self, target: str, wait_s: float) -> None:
        super().__init__(f"target '{target}' is rate limited for {wait_s:.3f} s")
        self.target = target
        self.wait_s = wait_s


class Transport(Protocol):
    def send(self, spec: RequestSpec) -> RawResponse: ...


class Limiter(Protocol):
    """The shared per-target send budget (see :mod:`dispatcher.ratelimit`)."""

    def acquire(self, target: TargetConfig, patience_s: float = 0.0, holder: str | None = None) -> float:
        """0: a token was taken, send now. Up to ``patience_s``: seconds until a token may be free (ask
        again then). More: seconds until the caller's turn in the target's line (come back then; a
        ``holder`` asking again before its turn gets the same one). No token is reserved."""

    def observe(self, target: TargetConfig, outcome: Outcome, now: datetime) -> None:
        """Learn from an answer's Retry-After and X-RateLimit-* headers."""


class NoLimiter:
    def acquire(self, target: TargetConfig, patience_s: float = 0.0, holder: str | None = None) -> float:
        return 0.0

    def observe(self, target: TargetConfig, outcome: Outcome, now: datetime) -> None:
        return None


@dataclass(frozen=True)
class Accepted:
    intent: IntentView
    replay: bool


@dataclass(frozen=True)
class GroupAccepted:
    """A grouped intent as stored: what it will do to the group's ticket, and why."""

    intent: IntentView
    action: Action
    reason: str
    group: GroupView


@dataclass(frozen=True)
class Valid:
    """An item :meth:`Dispatcher.validate_many` accepted; ``accept_many`` takes it without checking again."""

    intent: IntentInput
    target: TargetConfig


class ItemStatus(StrEnum):
    """What batch intake did with one item."""

    accepted = "accepted"    # stored now, and enqueued
    replay = "replay"        # its idempotency key was already stored: nothing new
    duplicate = "duplicate"  # an earlier item of the same batch has its key: nothing new
    invalid = "invalid"      # refused; ``errors`` names each field


@dataclass(frozen=True)
class ItemResult:
    """One item of :meth:`Dispatcher.accept_many`; ``index`` is its position in the batch."""

    index: int
    status: ItemStatus
    id: uuid.UUID | None = None
    target: str | None = None
    errors: tuple[FieldProblem, ...] = ()
    duplicate_of: int | None = None


#: a batch's progress, reported per phase: ("validate" | "store" | "enqueue", done, total)
Progress = Callable[[str, int, int], None]
#: messages handed to the queue per call in batch intake (and progress steps)
PUBLISH_CHUNK = 1000


def utcnow() -> datetime:
    return datetime.now(UTC)


class DepartmentCache:
    """Each target's department slugs, kept for a while and refreshed when a slug is missing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slugs: dict[str, tuple[list[str], float]] = {}

    def get(self, target: str, ttl_s: float) -> list[str] | None:
        with self._lock:
            entry = self._slugs.get(target)
        if entry is None or time.monotonic() - entry[1] > ttl_s:
            return None
        return entry[0]

    def put(self, target: str, slugs: list[str]) -> None:
        with self._lock:
            self._slugs[target] = (list(slugs), time.monotonic())

    def forget(self, target: str) -> None:
        with self._lock:
            self._slugs.pop(target, None)


def _redacted_request(spec: RequestSpec) -> dict[str, Any]:
    """What was sent, bounded. Credentials travel only in headers, which are never stored."""

    def cut(value: Any) -> Any:
        if isinstance(value, str) and len(value) > REQUEST_FIELD_MAX:
            return value[:REQUEST_FIELD_MAX] + f"... [{len(value) - REQUEST_FIELD_MAX} more characters]"
        if isinstance(value, Mapping):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [cut(v) for v in value]
        return value

    out: dict[str, Any] = {}
    if spec.json is not None:
        out["json"] = cut(dict(spec.json))
    if spec.params:
        out["params"] = dict(spec.params)
    return out


class Dispatcher:
    """The service. One per process; safe to call from many threads."""

    def __init__(self, config: AppConfig, store: Store, queue: TaskQueue, *,
                 transport_for: Callable[[TargetConfig], Transport],
                 adapter_for: Callable[[TargetConfig], ProviderAdapter],
                 limiter: Limiter | None = None, clock: Callable[[], datetime] = utcnow,
                 rng: random.Random | None = None, worker: str = "local") -> None:
        self.config = config
        self.store = store
        self.queue = queue
        self.limiter: Limiter = limiter or NoLimiter()
        self.inprocess_wait_s = INPROCESS_WAIT_MAX_S
        self.send_pace_s = SEND_PACE_S
        #: a first poll due within this many seconds is taken in the same task (0: always by message)
        self.inline_poll_max_s = 0.0
        self.sleep: Callable[[float], None] = time.sleep
        self.clock = clock
        self.rng = rng or random.Random()
        self.worker = worker
        self.departments = DepartmentCache()
        self._groups: GroupStore | None = None
        self._transport_for = transport_for
        self._adapter_for = adapter_for
        self._transports: dict[str, Transport] = {}
        self._adapters: dict[str, ProviderAdapter] = {}
        self._lock = threading.Lock()
        self._routes_cache: dict[str, Mapping[str, Route]] = {}
        #: when this thread took the lease of the intent it works on (monotonic; None: not known)
        self._claimed = threading.local()

    # -- wiring --------------------------------------------------------------------------------

    def transport(self, target: TargetConfig) -> Transport:
        with self._lock:
            if target.name not in self._transports:
                self._transports[target.name] = self._transport_for(target)
            return self._transports[target.name]

    def adapter(self, target: TargetConfig) -> ProviderAdapter:
        with self._lock:
            if target.name not in self._adapters:
                self._adapters[target.name] = self._adapter_for(target)
            return self._adapters[target.name]

    # -- intake --------------------------------------------------------------------------------

    def validate(self, data: Any) -> tuple[IntentInput, TargetConfig]:
        """Check an intent against the schema and the configuration; raise naming every bad field."""
        intent = parse_intent(data)
        target = self.config.targets.get(intent.target)
        if target is None:
            known = ", ".join(sorted(self.config.targets)) or "(none configured)"
            raise IntentInvalid([FieldProblem("target", f"unknown target '{intent.target}'; configured: {known}")])
        problems = provider_problems(intent, target.provider)
        topic_problem = check_topic(target.provider, intent.topic, self._intake_routes(target)) \
            if intent.department is None else None
        if topic_problem:
            problems.append(topic_problem)
        if problems:
            raise IntentInvalid(problems)
        return intent, target

    def _new_row(self, intent: IntentInput, target: TargetConfig, *, source: str, submitted_by: str | None,
                 submitted_from: str | None, now: datetime) -> IntentRow:
        return IntentRow(**self._row_values(intent, target, source=source, submitted_by=submitted_by,
                                            submitted_from=submitted_from, now=now))

    @staticmethod
    def _row_values(intent: IntentInput, target: TargetConfig, *, source: str, submitted_by: str | None,
                    submitted_from: str | None, now: datetime, intent_id: uuid.UUID | None = None) -> dict[str, Any]:
        """A new intent's columns: one mapping for the ORM row (``accept``) and bulk inserts (``accept_many``)."""
        from dispatcher.domain import new_intent_id

        return dict(
            id=intent_id or new_intent_id(), target=target.name, provider=target.provider.value,
            status=Status.queued.value, source=source, submitted_by=submitted_by, submitted_from=submitted_from,
            subject=intent.subject, body=intent.body, priority=intent.priority.value, topic=intent.topic,
            department=intent.department, category=intent.category,
            service=intent.service.model_dump() if intent.service else None, cc=[str(c) for c in intent.cc],
            critical_reason=intent.critical_reason, labels=dict(intent.labels),
            idempotency_key=intent.idempotency_key, group_key=intent.group_key, attempts=0, deliveries=0,
            needs_reconcile=False, next_attempt_at=now, enqueued_at=now, created_at=now, updated_at=now)

    def accept(self, data: Any, *, source: str = "python", submitted_by: str | None = None,
               submitted_from: str | None = None) -> Accepted:
        """Store one intent, then enqueue it. A replay of its idempotency key returns the stored one."""
        intent, target = self.validate(data)
        if intent.idempotency_key:
            existing = self.store.find_by_key(target.name, intent.idempotency_key)
            if existing:
                return Accepted(existing, replay=True)
        if intent.group_key:  # one ticket per group: later intents of the group become replies
            return self._accept_group_key(intent, target, source=source, submitted_by=submitted_by,
                                          submitted_from=submitted_from)
        now = self.clock()
        row = self._new_row(intent, target, source=source, submitted_by=submitted_by,
                            submitted_from=submitted_from, now=now)
        event = EventRow(intent_id=row.id, at=now, kind="accepted", actor=submitted_by,
                         message=f"accepted from {source}" + (f" by {submitted_by}" if submitted_by else "")
                         + (f" ({submitted_from})" if submitted_from else ""))
        from sqlalchemy.exc import IntegrityError

        try:
            self.store.insert_intents([row], [event])
        except IntegrityError:
            # a concurrent request with the same key won the race: that one is the intent
            assert intent.idempotency_key
            existing = self.store.find_by_key(target.name, intent.idempotency_key)
            if existing is None:
                raise
            return Accepted(existing, replay=True)
        accepted = self.store.view_of(row)  # as committed: the worker may move it once published
        self._publish(DISPATCH, [(row.id, target.name)])
        metrics.accepted(source, target.name)
        return Accepted(accepted, replay=False)

    def _publish(self, task: str, items: list[tuple[uuid.UUID, str]], countdown: float = 0.0) -> None:
        """Publish after commit. A failure is logged, not raised: the scheduler re-enqueues (outbox)."""
        try:
            if len(items) == 1:
                self.queue.enqueue(task, items[0][0], target=items[0][1], countdown=countdown)
            else:
                self.queue.enqueue_many(task, items)
        except EnqueueFailed as exc:
            log.log(logging.INFO if exc.expected else logging.WARNING,
                    "broker did not take %d message(s) (%s); the scheduler will re-enqueue", len(items), exc)
            try:
                self.store.mark_not_enqueued([i for i, _ in items])
            except Exception:  # the scheduler also re-enqueues after requeue_after_s
                log.exception("could not mark intents for re-enqueue")

    def publish(self, task: str, items: list[tuple[uuid.UUID, str]], countdown: float = 0.0) -> None:
        """Hand intents to the queue after their state is committed (operator tools use this)."""
        self._publish(task, items, countdown)

    # -- reads ---------------------------------------------------------------------------------

    def get(self, intent_id: uuid.UUID, *, with_attempts: bool = False) -> IntentView:
        view = self.store.get(intent_id, with_attempts=with_attempts)
        if view is None:
            raise UnknownIntent(f"no intent {intent_id}")
        return view

    # -- dispatch ------------------------------------------------------------------------------

    def dispatch(self, intent_id: uuid.UUID) -> None:
        """Resolve, send and record one intent, if it is due and nobody else holds it."""
        with self._one_message():
            self._dispatch(intent_id)

    @contextlib.contextmanager
    def _one_message(self) -> Iterator[None]:
        """One task's work on this thread: its records wait for the intent's next write
        (:meth:`Store.deferring`), and the lease it takes is timed from the claim (``_claimed.at``)."""
        with self.store.deferring():
            try:
                yield
            finally:
                self._claimed.at = None

    def _dispatch(self, intent_id: uuid.UUID) -> None:
        now = self.clock()
        claimed = self.store.claim_due(intent_id, statuses=DUE_STATUSES, to=Status.sending, now=now,
                                       lease_s=self.config.scheduler.lease_s, worker=self.worker)
        if claimed is None:
            self._requeue_if_early(intent_id, DISPATCH, now)
            return
        intent, paused = claimed
        self._claimed.at = time.monotonic()
        target = self.config.targets.get(intent.target)
        if target is None:
            self._finish(intent, Status.failed, "unknown_target",
                         f"target '{intent.target}' is no longer configured")
            return
        if intent.deliveries > MAX_DELIVERIES:  # each lost worker's claim counts (recovery keeps the count)
            last = f" (last: {intent.last_error_code}: {intent.last_error_message})" if intent.last_error_code else ""
            self._finish(intent, Status.failed, "poison",
                         f"handed to a worker {intent.deliveries} times without finishing; giving up{last}")
            return
        if paused:  # checked before the limiter: no token spent
            self._wait(intent, PAUSED_RECHECK_S, reason=f"target '{intent.target}' is paused", count=False)
            return
        try:
            self._dispatch_claimed(intent, target)
        except Throttled as exc:
            self._wait(intent, self._come_back(exc.wait_s), reason="waiting for the target's rate limit",
                       count=False, quiet=True)
        except LeaseLost as exc:  # presumed dead and recovered meanwhile: the intent is someone else's
            log.warning("dispatch of %s stopped: %s", intent.id, exc)
        except DBAPIError:
            # the database went away mid-dispatch: nothing more can be recorded now, so nothing is
            # released. The intent keeps its lease; once that expires the scheduler recovers it,
            # reconciling first if a create may have gone out (Store.recover_expired_leases), and the
            # task is retried (dispatcher.worker.tasks).
            raise
        except Exception as exc:
            log.exception("dispatch of %s failed unexpectedly", intent.id)
            error = f"{type(exc).__name__}: {exc}"
            # an exchange the error cut short may have made a ticket: look before sending again
            maybe_created = self.store.abandon_attempts(intent.id, now=self.clock(), error=error)
            self._retry_later(intent, target, Outcome(Verdict.retry, error_code="internal", error_message=error),
                              maybe_created=maybe_created)

    def _requeue_if_early(self, intent_id: uuid.UUID, task: str, claimed_at: datetime) -> None:
        """A message that came before its time goes back; anything else is a replay and does nothing.

        "Before its time" is judged at ``claimed_at``, the instant the failed claim compared the due
        time with, not on a later reading of the clock: a countdown message fires a few milliseconds
        early now and then, and judged a moment later it looked due, so it was taken for a replay
        and dropped, and its intent waited for the scheduler's re-publishing (``requeue_after_s``;
        chaos G2 saw one wait out its deadline so). Such a message goes back due at once."""
        metrics.redelivered(task)
        view = self.store.get(intent_id)
        if view is None or view.next_attempt_at is None:
            return
        due_statuses = DUE_STATUSES if task == DISPATCH else {Status.polling}
        early = (view.next_attempt_at - claimed_at).total_seconds()
        if view.status in due_statuses and 0 < early <= self.config.scheduler.short_wait_s:
            wait = (view.next_attempt_at - self.clock()).total_seconds()
            self._publish(task, [(view.id, view.target)], countdown=max(0.0, wait))

    def _dispatch_claimed(self, intent: IntentView, target: TargetConfig) -> None:
        if intent.action is not Action.create:  # a group follow-up: reopen / reply / close its ticket
            self._dispatch_follow_up(intent, target)
            return
        adapter = self.adapter(target)
        if intent.needs_reconcile:
            found = self._reconcile(intent, target, adapter)
            metrics.reconciled(target.name, found)
            if found is not False:
                return
        resolution = self._resolve(intent, target, adapter)
        if resolution is None:
            return
        draft = TicketDraft(
            subject=intent.subject, body=body_with_marker(intent.body, intent.id), priority=intent.priority,
            department=resolution.department, category=resolution.category, service=intent.service, cc=intent.cc,
            critical_reason=intent.critical_reason)
        routed = resolution.department != intent.resolved_department
        outcome, raw = self._exchange(
            intent, target, adapter.create_request(draft), number=intent.attempts + 1,
            intent_values={"resolved_department": resolution.department,
                           "resolved_category": resolution.category} if routed else None,
            event=("routed", resolution.reason) if routed else None)
        if outcome.verdict is Verdict.done and outcome.ticket is not None:
            self._succeed(intent, target, outcome.ticket)
        elif outcome.verdict is Verdict.poll:
            self._start_polling(intent, target, outcome)
        elif outcome.verdict is Verdict.retry:
            # a dropped answer, or a 500/502/504, may hide a ticket that was made: look before resending
            ambiguous = raw.maybe_delivered or (raw.status is not None and raw.status in (500, 502, 504))
            self._retry_later(intent, target, outcome, maybe_created=ambiguous, counted=True)
        elif outcome.verdict is Verdict.pause:
            self._pause_target(intent, target, outcome)
        elif outcome.error_code == "critical_rate_limited" and target.critical_policy == "downgrade":
            self.store.release(intent.id, self.worker, status=Status.queued, now=self.clock(),
                               priority=Priority.urgent.value, next_attempt_at=self.clock(),
                               attempts=intent.attempts + 1, enqueued_at=self.clock(),
                               event=("downgraded", "HostUp allows one critical ticket an hour: sending as "
                                      "urgent (critical_policy = downgrade)", None))
            self._publish(DISPATCH, [(intent.id, intent.target)])
        else:
            self._finish(intent, Status.failed, outcome.error_code or "final", _error_text(outcome),
                         attempts=intent.attempts + 1)

    def _resolve(self, intent: IntentView, target: TargetConfig, adapter: ProviderAdapter) -> Resolution | None:
        """The department to file under, checked against the provider's list; None if the intent moved on.
        The caller records it with the create's attempt (one transaction, not three)."""
        routes = merged_routes(target.provider, target.routes)
        request = adapter.departments_request()
        available: list[str] | None = None
        fresh = False
        if request is not None:
            available = self.departments.get(target.name, target.departments_ttl_s)
            if available is None:
                available = self._fetch_departments(intent, target, adapter, request)
                if available is None:
                    return None
                fresh = True
        try:
            res = resolve(target.provider, topic=intent.topic, department=intent.department,
                          category=intent.category, routes=routes, available=available)
        except RoutingError as exc:
            if request is not None and not fresh:  # refresh on a miss: the list may have changed
                self.departments.forget(target.name)
                return self._resolve(intent, target, adapter)
            self._finish(intent, Status.failed, "department_not_found", str(exc))
            return None
        return res

    def _fetch_departments(self, intent: IntentView, target: TargetConfig, adapter: ProviderAdapter,
                           request: RequestSpec) -> list[str] | None:
        outcome, _ = self._exchange(intent, target, request, number=None)
        if outcome.verdict is Verdict.done:
            slugs = adapter.department_slugs(outcome)
            self.departments.put(target.name, slugs)
            return slugs
        if outcome.verdict is Verdict.pause:
            self._pause_target(intent, target, outcome)
        elif outcome.verdict is Verdict.retry:
            self._retry_later(intent, target, outcome, counted=True)
        else:
            self._finish(intent, Status.failed, outcome.error_code or "departments_unreadable",
                         "cannot read the provider's departments: " + _error_text(outcome))
        return None

    def _come_back(self, turn_s: float) -> float:
        """When a throttled intent should be handed out again for a turn ``turn_s`` seconds away: by
        countdown just before it (:data:`THROTTLE_LEAD_S`); a turn too far for a countdown
        (``short_wait_s``) via Postgres, half that early, since the scheduler hands intents out up
        to a pass late; back early, it is told the same turn and counts down the rest."""
        short = self.config.scheduler.short_wait_s
        if turn_s - THROTTLE_LEAD_S <= short:
            return max(0.0, turn_s - THROTTLE_LEAD_S)
        return turn_s - short / 2

    def _take_token(self, target: TargetConfig, holder: str | None = None) -> None:
        """Take one of the target's rate-limit tokens, waiting in-process at most ``inprocess_wait_s``;
        else raise :class:`Throttled` with the wait, and the caller puts the intent back.

        The order intents of one target get tokens in: the target's Celery queue hands out messages
        oldest first. A worker that finds no token sleeps in-process while the next token is near
        (0.25 s in all at most), competing with the other waiting workers for each token: a race, so
        among the few intents in workers' hands the order is not kept. Past that, the limiter gives
        the intent the next free turn in the target's line (one per emission interval, after any
        Retry-After) and it is put back until then (less :data:`THROTTLE_LEAD_S`, slept in-process),
        so a backlog drains at the limit in the order its intents were first throttled. A turn is a
        hint, not a reservation: an intent that comes back to find its token taken (by a newcomer,
        or after a new Retry-After) waits for a new turn at the end of the line. Turns beyond
        ``short_wait_s`` wait in Postgres for the scheduler and come back early to keep their turn
        (:meth:`_come_back`). Other targets are never held up: each has its own queue, and a thread
        sleeps at most 0.25 s per request.
        """
        deadline = time.monotonic() + self.inprocess_wait_s
        while True:
            patience = max(0.0, deadline - time.monotonic())
            wait = self.limiter.acquire(target, patience, holder)
            if wait <= 0:
                return
            if wait > patience:
                raise Throttled(target.name, wait)
            self.sleep(wait)

    def _exchange(self, intent: IntentView, target: TargetConfig, spec: RequestSpec, *,
                  number: int | None, intent_values: Mapping[str, Any] | None = None,
                  event: tuple[str, str] | None = None) -> tuple[Outcome, RawResponse]:
        """Take a token, record the attempt, send (:data:`SEND_PACE_S` after the token), classify,
        complete the record. The record comes before the send; the token before the record (a
        throttled request is no attempt). ``intent_values`` and ``event`` are stored with the record."""
        transport = self.transport(target)  # built before the token: the first one takes ~0.1 s (TLS
        # context), a gap in which another worker's 429 would go unseen by this send
        self._take_token(target, str(intent.id))
        granted = time.monotonic()
        claimed_at: float | None = getattr(self._claimed, "at", None)
        # a lease taken moments ago cannot have expired: no need to check and renew it before this send
        fresh = claimed_at is not None and granted - claimed_at < self.config.scheduler.lease_s / 4
        attempt_id = self.store.begin_attempt(intent.id, number=number, op=spec.op.value, method=spec.method,
                                              path=spec.path, request=_redacted_request(spec),
                                              worker=self.worker, now=self.clock(),
                                              lease_s=self.config.scheduler.lease_s, intent_values=intent_values,
                                              event=event, renew_lease=not fresh)
        pause = self.send_pace_s - (time.monotonic() - granted)
        if pause > 0:  # leave a fixed time after the token, not whenever the record happened to commit
            self.sleep(pause)
        raw = transport.send(spec)
        outcome = self.adapter(target).classify(spec.op, raw)
        self.limiter.observe(target, outcome, self.clock())
        unknown = spec.op is Op.create and raw.status is None and raw.maybe_delivered
        self.store.finish_attempt(
            attempt_id, status_code=raw.status, duration_ms=round(raw.duration_ms, 2),
            response_excerpt=raw.body if raw.status is not None else raw.network_error,
            provider_request_id=outcome.request_id, task_uuid=outcome.task_uuid,
            verdict="unknown" if unknown else outcome.verdict.value, error_code=outcome.error_code,
            error_message=outcome.error_message, retry_after_s=outcome.retry_after, finished_at=self.clock())
        metrics.exchanged(target.name, spec.op, raw, outcome)
        log.info("attempt", extra={"intent_id": str(intent.id), "target": target.name, "op": spec.op.value,
                                   "attempt": number if number is not None else intent.attempts,
                                   "outcome": outcome.verdict.value,
                                   "status": raw.status, "verdict": outcome.verdict.value,
                                   "error_code": outcome.error_code, "duration_ms": round(raw.duration_ms, 1)})
        return outcome, raw

    # -- reconcile (a create whose answer was lost) ---------------------------------------------

    def _reconcile(self, intent: IntentView, target: TargetConfig, adapter: ProviderAdapter) -> bool | None:
        """Look for the ticket an earlier, unanswered create may have made.

        Returns True when found and recorded, False when it does not exist (send it), None when the
        look-up itself must be retried later (the intent has moved on).
        """
        self.store.add_event(intent.id, "reconcile", "an earlier create got no answer: looking for its ticket "
                             "by the marker before sending again", at=self.clock())
        marker = str(intent.id)
        since = (self.store.first_create_at(intent.id) or intent.created_at) - timedelta(seconds=RECONCILE_SLACK_S)
        for first in adapter.find_requests_for_marker(intent.subject):
            spec: RequestSpec | None = first
            for _page in range(RECONCILE_MAX_PAGES):  # newest first: page back to the first create
                if spec is None:
                    break
                outcome, _ = self._exchange(intent, target, spec, number=None)
                if outcome.verdict is not Verdict.done:
                    if outcome.verdict is Verdict.pause:
                        self._pause_target(intent, target, outcome)
                    else:
                        self._retry_later(intent, target, outcome, counted=True, maybe_created=True)
                    return None
                found = self._match_marker(intent, target, adapter, spec, outcome, marker)
                if found is None:
                    return None
                if found:
                    return True
                spec = adapter.next_find_request(spec, outcome, since)
        self.store.update_intent(intent.id, needs_reconcile=False)
        self.store.add_event(intent.id, "reconciled", "no ticket carries this intent's marker: sending it",
                             at=self.clock())
        return False

    def _match_marker(self, intent: IntentView, target: TargetConfig, adapter: ProviderAdapter,
                      spec: RequestSpec, outcome: Outcome, marker: str) -> bool | None:
        """Whether a list answer (or the details it points to) holds our ticket or task."""
        hit = adapter.match_marker(outcome, marker)
        if hit is not None and self._adopt(intent, target, hit):
            return True
        for ticket_id in adapter.candidate_ids(outcome, intent.subject):
            detail, _ = self._exchange(intent, target, adapter.ticket_request(ticket_id), number=None)
            if detail.verdict is Verdict.final:
                continue
            if detail.verdict is not Verdict.done:
                self._retry_later(intent, target, detail, counted=True, maybe_created=True)
                return None
            hit = adapter.match_marker(detail, marker)
            if hit is not None and self._adopt(intent, target, hit):
                return True
        return False

    def _adopt(self, intent: IntentView, target: TargetConfig, hit: Outcome) -> bool:
        """Take over what a lost create made: its ticket, or its still-running task."""
        if hit.verdict is Verdict.done and hit.ticket is not None:
            self.store.add_event(intent.id, "reconciled", f"found ticket {hit.ticket.provider_id} made by the lost "
                                 "create: recording it instead of sending again", at=self.clock())
            self._succeed(intent, target, hit.ticket)
            return True
        if hit.verdict in (Verdict.poll, Verdict.done) and hit.poll_path:
            self.store.add_event(intent.id, "reconciled", f"found the task {hit.task_uuid} of the lost create: "
                                 "polling it instead of sending again", at=self.clock())
            self._start_polling(intent, target, hit, reconciled=True)
            return True
        if hit.verdict is Verdict.final and hit.task_uuid:
            # the lost create's task ended (failure, rejected): that is its answer, as if it had been
            # polled; submitting again would be a second task for one intent (and undo a rejection)
            self._finish(intent, Status.failed, hit.error_code or "task_failed",
                         f"NocWorx task {hit.task_uuid} of the lost create ended: {_error_text(hit)}",
                         task_uuid=hit.task_uuid, needs_reconcile=False)
            return True
        return False

    # -- poll ----------------------------------------------------------------------------------

    def poll(self, intent_id: uuid.UUID) -> None:
        """Ask a NocWorx task how it went; never re-submit it."""
        with self._one_message():
            self._poll(intent_id)

    def _poll(self, intent_id: uuid.UUID) -> None:
        now = self.clock()
        claimed = self.store.claim_due(intent_id, statuses=[Status.polling], to=Status.polling, now=now,
                                       lease_s=self.config.scheduler.lease_s, worker=self.worker)
        if claimed is None:
            self._requeue_if_early(intent_id, POLL, now)
            return
        intent, paused = claimed
        self._claimed.at = time.monotonic()
        target = self.config.targets.get(intent.target)
        if target is None or intent.poll_path is None:
            self._finish(intent, Status.failed, "unknown_target", "cannot poll: target or task is gone")
            return
        if paused:
            self._next_poll(intent, target, wait=PAUSED_RECHECK_S, reason="target paused")
            return
        self._poll_leased(intent, target)

    def _poll_leased(self, intent: IntentView, target: TargetConfig) -> None:
        """Poll an intent whose lease this worker holds, and record what follows."""
        try:
            self._poll_claimed(intent, target)
        except Throttled as exc:
            self._next_poll(intent, target, wait=self._come_back(exc.wait_s), reason="rate limited", floor=False)
        except LeaseLost as exc:
            log.warning("poll of %s stopped: %s", intent.id, exc)
        except DBAPIError:
            raise  # nothing can be recorded: the lease expires and the scheduler polls it again
        except Exception as exc:
            log.exception("poll of %s failed unexpectedly", intent.id)
            self._next_poll(intent, target, reason=f"internal error: {type(exc).__name__}")

    def _poll_claimed(self, intent: IntentView, target: TargetConfig) -> None:
        adapter = self.adapter(target)
        assert intent.poll_path is not None
        # the deadline is judged on an answer, never on the clock alone: a poll that comes late (a
        # backlog, a lost worker, an outage) still looks once, and a task that succeeded meanwhile counts
        outcome, _ = self._exchange(intent, target, adapter.task_request(intent.poll_path), number=None)
        now = self.clock()
        past = intent.poll_deadline is not None and now >= intent.poll_deadline
        if outcome.verdict is Verdict.poll and past:
            self._finish(intent, Status.failed, "task_timeout",
                         f"NocWorx task {intent.task_uuid} still pending after {target.poll_deadline_s:.0f} s "
                         "(the deadline); it was not submitted again. Use `dispatcher intents repoll` to look again.")
        elif outcome.verdict is Verdict.poll:
            self._next_poll(intent, target)
        elif outcome.verdict is Verdict.retry and past and intent.poll_deadline is not None \
                and now >= intent.poll_deadline + timedelta(seconds=target.poll_deadline_s):
            self._finish(intent, Status.failed, "task_timeout",
                         f"NocWorx task {intent.task_uuid} could not be read for {target.poll_deadline_s:.0f} s "
                         f"after its deadline (last: {_error_text(outcome)}); it was not submitted again. "
                         "Use `dispatcher intents repoll` to look again.")
        elif outcome.verdict is Verdict.retry:
            self._next_poll(intent, target, wait=outcome.retry_after, reason=outcome.error_code or "retry")
        elif outcome.verdict is Verdict.pause:
            self._pause_target(intent, target, outcome, keep=Status.polling)
        elif outcome.verdict is Verdict.final:
            self._finish(intent, Status.failed, outcome.error_code or "task_failed",
                         f"NocWorx task {intent.task_uuid} ended: {_error_text(outcome)}")
        elif intent.action is not Action.create:  # a follow-up step's task (comment, open, close) is done
            self._follow_up_step_done(intent, target)
        else:
            ticket = outcome.ticket or self._find_ticket_by_subject(intent, target, adapter)
            if ticket is None:
                self._next_poll(intent, target, reason="task succeeded; ticket not listed yet")
                return
            if ticket.number is None or not ticket.number.strip():
                detail, _ = self._exchange(intent, target, adapter.ticket_request(ticket.provider_id), number=None)
                if detail.verdict is Verdict.done and detail.ticket is not None:
                    ticket = detail.ticket
            self._succeed(intent, target, ticket)

    def _find_ticket_by_subject(self, intent: IntentView, target: TargetConfig,
                                adapter: ProviderAdapter) -> TicketRef | None:
        """The task said success but named nothing: the newest ticket with our subject is ours."""
        for spec in adapter.find_requests_for_marker(intent.subject):
            if spec.path.startswith("/v1/ticket"):
                outcome, _ = self._exchange(intent, target, spec, number=None)
                for ticket_id in adapter.candidate_ids(outcome, intent.subject)[:1]:
                    return TicketRef(provider_id=ticket_id)
        return None

    def _next_poll(self, intent: IntentView, target: TargetConfig, *, wait: float | None = None,
                   reason: str = "task pending", floor: bool = True) -> None:
        """Poll again on the target's schedule (:func:`dispatcher.backoff.poll_wait`: the wait grows
        with the time since the task was accepted), or in ``wait`` seconds when that is longer: a
        Retry-After, a paused target's recheck or a rate-limit turn is a floor the schedule never cuts
        short. Without ``floor`` the schedule is left out (a rate-limit wait is already the right one).
        The schedule looks once more right at the deadline, not long after it."""
        now = self.clock()
        scheduled = 0.0
        if floor:
            # polling started deadline_s before the deadline (both set at once: _start_polling, repoll)
            started = now if intent.poll_deadline is None \
                else intent.poll_deadline - timedelta(seconds=target.poll_deadline_s)
            scheduled = target.poll_policy.wait((now - started).total_seconds())
            if intent.poll_deadline is not None and intent.poll_deadline > now:
                scheduled = min(scheduled, (intent.poll_deadline - now).total_seconds())
        wait = max(wait or 0.0, scheduled)
        due = now + timedelta(seconds=wait)
        short = wait <= self.config.scheduler.short_wait_s
        self.store.release(intent.id, self.worker, status=Status.polling, now=now, next_attempt_at=due,
                           enqueued_at=due if short else None)
        if short:
            self._publish(POLL, [(intent.id, intent.target)], countdown=wait)

    # -- transitions ---------------------------------------------------------------------------

    def _start_polling(self, intent: IntentView, target: TargetConfig, outcome: Outcome, *,
                       reconciled: bool = False) -> None:
        """Record the task and when to look at it first: by a countdown message, or here, after the
        wait, when that is within :attr:`inline_poll_max_s` (the lease is kept meanwhile, so a worker
        lost while waiting leaves the intent to the scheduler once the lease expires)."""
        now = self.clock()
        policy = target.poll_policy
        wait = policy.wait(0.0)  # the first look; later ones: _next_poll, by the task's age
        due = now + timedelta(seconds=wait)
        inline = wait <= self.inline_poll_max_s
        lease_s = self.config.scheduler.lease_s
        deadline = now + timedelta(seconds=target.poll_deadline_s)
        attempts = intent.attempts + (0 if reconciled else 1)
        kept = self.store.release(
            intent.id, self.worker, status=Status.polling, now=now, task_uuid=outcome.task_uuid,
            poll_path=outcome.poll_path, poll_deadline=deadline, next_attempt_at=due, enqueued_at=due,
            needs_reconcile=False, attempts=attempts, keep_lease_s=wait + lease_s if inline else None,
            event=("polling", f"NocWorx accepted the {_task_subject(intent)} as task {outcome.task_uuid}; polling "
                   f"{outcome.poll_path} {policy.describe()} for up to {target.poll_deadline_s:g} s", None))
        log.info("intent polling", extra={"intent_id": str(intent.id), "target": intent.target, "outcome": "polling",
                                          "attempt": attempts, "task_uuid": outcome.task_uuid})
        if not inline:
            self._publish(POLL, [(intent.id, intent.target)], countdown=wait)
            return
        if not kept:  # the lease was lost meanwhile (presumed dead): the intent is someone else's
            log.warning("poll of %s not taken: the lease was lost", intent.id)
            return
        self._claimed.at = time.monotonic() + wait  # the kept lease runs lease_s from the end of the wait
        polling = replace(intent, status=Status.polling, task_uuid=outcome.task_uuid, poll_path=outcome.poll_path,
                          poll_deadline=deadline, next_attempt_at=due, needs_reconcile=False, attempts=attempts)
        self.sleep(wait)
        self._poll_leased(polling, target)

    def _succeed(self, intent: IntentView, target: TargetConfig, ticket: TicketRef) -> None:
        now = self.clock()
        url = ticket.url
        attempts = intent.attempts + (0 if intent.status is Status.polling else 1)
        label = ticket.number or ticket.provider_id
        if intent.group_id is not None:  # the group's ticket exists: its follow-ups may go now
            payload = intent.payload or {}
            state = payload.get("state")
            self.groups.opened(intent.group_id, int(payload.get("generation") or 0), provider_id=ticket.provider_id,
                               number=ticket.number, url=url, now=now,
                               sent_state={**state, "seq": intent.group_seq} if state is not None else None)
        record = {"target": intent.target, "provider": intent.provider.value, "provider_ticket_id": ticket.provider_id,
                  "number": ticket.number, "url": url, "department": ticket.department or intent.resolved_department}
        self.store.release(intent.id, self.worker, status=Status.succeeded, now=now, attempts=attempts,
                           needs_reconcile=False, last_error_code=None, last_error_message=None, ticket=record,
                           event=("succeeded", f"ticket {ticket.provider_id}"
                                  + (f" ({label})" if label != ticket.provider_id else "") + " made", None))
        metrics.succeeded(intent, target, now)
        log.info("intent succeeded", extra={"intent_id": str(intent.id), "target": intent.target, "attempt": attempts,
                                            "outcome": Status.succeeded.value, "ticket": ticket.provider_id})

    def _finish(self, intent: IntentView, status: Status, code: str, message: str, **values: Any) -> None:
        if status is Status.failed and intent.group_id is not None and intent.action is Action.create:
            # the group's ticket was never made: the next notification starts a new one
            self.groups.create_failed(intent.group_id, int((intent.payload or {}).get("generation") or 0),
                                      self.clock())
        self.store.release(intent.id, self.worker, status=status, now=self.clock(), last_error_code=code,
                           last_error_message=message, event=(status.value, f"{code}: {message}", None), **values)
        metrics.finished(intent, status.value, code, self.clock(), self.config.targets.get(intent.target))
        log.info("intent finished", extra={"intent_id": str(intent.id), "target": intent.target,
                                           "attempt": values.get("attempts", intent.attempts),
                                           "outcome": status.value, "error_code": code})

    def _wait(self, intent: IntentView, wait: float, *, reason: str, count: bool,
              quiet: bool = False, **values: Any) -> None:
        """Put the intent back as due in ``wait`` seconds: short waits by countdown, long ones by the scheduler."""
        now = self.clock()
        due = now + timedelta(seconds=wait)
        short = wait <= self.config.scheduler.short_wait_s
        back_to = Status.queued if intent.status is Status.queued and not count else Status.waiting
        self.store.release(intent.id, self.worker, status=back_to, now=now, next_attempt_at=due,
                           enqueued_at=due if short else None, deliveries=max(0, intent.deliveries - 1),
                           event=None if quiet else ("waiting", f"{reason}; next try in {wait:.1f} s",
                                                     {"wait_s": round(wait, 3)}), **values)
        metrics.waited(intent.target, wait, reason, counted=count)
        log.log(logging.DEBUG if quiet else logging.INFO, "intent waiting",
                extra={"intent_id": str(intent.id), "target": intent.target, "outcome": back_to.value,
                       "attempt": values.get("attempts", intent.attempts), "wait_s": round(wait, 3),
                       "error_code": values.get("last_error_code")})
        if short:
            self._publish(DISPATCH, [(intent.id, intent.target)], countdown=wait)

    def _retry_later(self, intent: IntentView, target: TargetConfig, outcome: Outcome, *,
                     maybe_created: bool = False, counted: bool = True) -> None:
        attempts = intent.attempts + (1 if counted else 0)
        wait = next_retry(target.retry, attempt=max(1, attempts), error_code=outcome.error_code,
                          retry_after=outcome.retry_after, rng=self.rng)
        text = _error_text(outcome)
        if wait is None:
            self._finish(intent, Status.failed, outcome.error_code or "retry_exhausted",
                         f"gave up after {attempts} attempt(s); last error: {text}", attempts=attempts,
                         needs_reconcile=False)
            return
        why = f"Retry-After {outcome.retry_after:g} s" if outcome.retry_after is not None else "backoff"
        self._wait(intent, wait, reason=f"{outcome.error_code or 'retry'}: {text} ({why})", count=True,
                   attempts=attempts, last_error_code=outcome.error_code, last_error_message=text,
                   needs_reconcile=intent.needs_reconcile or maybe_created)

    def _pause_target(self, intent: IntentView, target: TargetConfig, outcome: Outcome, *,
                      keep: Status = Status.waiting) -> None:
        now = self.clock()
        reason = f"{outcome.error_code or 'unauthorized'}: {_error_text(outcome)}"
        self.store.set_target_state(target.name, now=now, paused=True, paused_reason=reason,
                                    paused_by="dispatcher", paused_at=now, last_error_code=outcome.error_code,
                                    last_error_message=_error_text(outcome), last_error_at=now)
        metrics.paused(target.name, outcome.error_code)
        log.warning("target paused: credentials refused", extra={"intent_id": str(intent.id), "target": target.name,
                                                                  "attempt": intent.attempts, "outcome": "paused",
                                                                  "reason": reason})
        if keep is Status.polling:
            self._next_poll(intent, target, wait=PAUSED_RECHECK_S, reason="target paused")
        else:
            self._wait(intent, PAUSED_RECHECK_S, reason=f"target '{target.name}' paused ({reason})", count=False,
                       last_error_code=outcome.error_code, last_error_message=_error_text(outcome))

    # -- groups: one ticket per alert group (or producer group_key), kept up to date -------------

    @property
    def groups(self) -> GroupStore:
        if self._groups is None:
            self._groups = GroupStore(self.store)
        return self._groups

    def _group_policy(self, kind: GroupKind) -> GroupPolicy:
        alerts = self.config.alerts
        if kind is GroupKind.alerts:
            return GroupPolicy(alerts.reopen_window_s, alerts.flap_window_s, alerts.close_on_resolve)
        return GroupPolicy(reopen_window_s=alerts.reopen_window_s, flap_window_s=0.0, close_on_resolve=False)

    @staticmethod
    def _group_key(intent: IntentInput, kind: GroupKind) -> str:
        """Producer keys live in their own namespace, so they never meet an alert group's key."""
        assert intent.group_key
        return intent.group_key if kind is GroupKind.alerts else f"intent:{intent.group_key}"

    def accept_alerts(self, notification: Notification, *, submitted_by: str | None = None,
                      submitted_from: str | None = None) -> GroupAccepted:
        """Route, render and store one Alertmanager/Grafana notification as its group's next intent.

        :class:`IntentInvalid` when no route takes it or its ticket fields cannot be valid (a 422:
        it can never succeed). Nothing is stored then.
        """
        intent, target = self._alert_intent(notification)
        return self._accept_grouped(intent, target, kind=GroupKind.alerts, state=state_of(notification),
                                    source=notification.source, submitted_by=submitted_by,
                                    submitted_from=submitted_from)

    def _alert_intent(self, notification: Notification) -> tuple[IntentInput, TargetConfig]:
        routed = route_notification(notification, self.config.alerts)
        return self.validate(intent_fields(notification, routed, self.config.alerts))

    def _accept_group_key(self, intent: IntentInput, target: TargetConfig, *, source: str,
                          submitted_by: str | None, submitted_from: str | None) -> Accepted:
        from sqlalchemy.exc import IntegrityError

        try:
            result = self._accept_grouped(intent, target, kind=GroupKind.message, state=None, source=source,
                                          submitted_by=submitted_by, submitted_from=submitted_from)
        except IntegrityError:
            if not intent.idempotency_key:
                raise
            existing = self.store.find_by_key(target.name, intent.idempotency_key)
            if existing is None:
                raise
            return Accepted(existing, replay=True)
        return Accepted(result.intent, replay=False)

    def _accept_grouped(self, intent: IntentInput, target: TargetConfig, *, kind: GroupKind,
                        state: dict[str, Any] | None, source: str, submitted_by: str | None,
                        submitted_from: str | None) -> GroupAccepted:
        """Decide create / reply / reopen / none on the locked group row and store the intent, in ONE
        transaction; then publish it (after commit) if there is anything to send."""
        now = self.clock()
        policy = self._group_policy(kind)
        key = self._group_key(intent, kind)
        resolved = state is not None and state.get("status") == "resolved"
        short = self.config.scheduler.short_wait_s

        def decide_here(group: GroupView) -> Decision:
            return decide(group, kind=kind, incoming=state, incoming_resolved=resolved, policy=policy, now=now)

        def build(decision: Decision, before: GroupView, group_id: int, seq: int) -> tuple[IntentRow, list[EventRow]]:
            row = self._new_row(intent, target, source=source, submitted_by=submitted_by,
                                submitted_from=submitted_from, now=now)
            row.action, row.group_id, row.group_seq = decision.action.value, group_id, seq
            row.payload = {"kind": kind.value, "generation": decision.generation, "source": source, "state": state}
            events = [EventRow(intent_id=row.id, at=now, kind="accepted", actor=submitted_by,
                               message=f"accepted from {source}" + (f" by {submitted_by}" if submitted_by else "")
                               + (f" ({submitted_from})" if submitted_from else "")),
                      EventRow(intent_id=row.id, at=now, kind="grouped",
                               message=f"{decision.action.value}: {decision.reason} (group {key}, notification "
                                       f"#{seq}, ticket generation {decision.generation})",
                               data={"group_id": group_id, "group_state": before.state.value})]
            if decision.action is Action.none:
                row.status, row.finished_at = Status.succeeded.value, now
                row.next_attempt_at = row.enqueued_at = None
            elif decision.delay_s > 0:
                due = now + timedelta(seconds=decision.delay_s)
                row.next_attempt_at = due
                row.enqueued_at = due if decision.delay_s <= short else None
            return row, events

        decision, row, group = self.groups.accept(target=target.name, group_key=key, kind=kind, now=now,
                                                  incoming_state=state, decide=decide_here, build=build)
        accepted = self.store.view_of(row)  # as committed: the worker may move it once published
        if decision.action is not Action.none and decision.delay_s <= short:
            self._publish(DISPATCH, [(row.id, target.name)], countdown=decision.delay_s)
        return GroupAccepted(accepted, decision.action, decision.reason, group)

    # -- dry run ---------------------------------------------------------------------------------

    def preview(self, data: Any) -> dict[str, Any]:
        """What ``accept(data)`` would send, to which target and department, without storing or sending."""
        intent, target = self.validate(data)
        kind = GroupKind.message if intent.group_key else None
        return self._preview(intent, target, kind=kind, state=None, source="preview")

    def preview_alerts(self, notification: Notification) -> dict[str, Any]:
        """What ``accept_alerts`` would do with this notification, read from the group without locking."""
        intent, target = self._alert_intent(notification)
        return self._preview(intent, target, kind=GroupKind.alerts, state=state_of(notification),
                             source=notification.source)

    def _preview(self, intent: IntentInput, target: TargetConfig, *, kind: GroupKind | None,
                 state: dict[str, Any] | None, source: str) -> dict[str, Any]:
        adapter = self.adapter(target)
        placeholder = uuid.UUID(int=0)
        out: dict[str, Any] = {"dry_run": True, "target": target.name, "provider": target.provider.value,
                               "subject": intent.subject, "body": intent.body, "priority": intent.priority.value,
                               "marker_note": f"the marker line carries the intent's id, shown here as {placeholder}"}
        group: GroupView | None = None
        if kind is None:
            action, reason = Action.create, "an ungrouped intent makes its own ticket"
        else:
            key = self._group_key(intent, kind)
            group = self.groups.find(target.name, key)
            decision = decide(group, kind=kind, incoming=state, incoming_resolved=bool(
                state and state.get("status") == "resolved"), policy=self._group_policy(kind), now=self.clock())
            action, reason = decision.action, decision.reason
            out["group_key"] = key
            out["group"] = group.as_dict() if group else None
        out.update(action=action.value, reason=reason)
        requests: list[dict[str, Any]] = []
        if action is Action.create:
            routes = merged_routes(target.provider, target.routes)
            available = (self.departments.get(target.name, target.departments_ttl_s)
                         if adapter.departments_request() is not None else None)
            try:
                res = resolve(target.provider, topic=intent.topic, department=intent.department,
                              category=intent.category, routes=routes, available=available)
                out.update(department=res.department, category=res.category, department_reason=res.reason,
                           department_checked=available is not None or adapter.departments_request() is None)
                draft = TicketDraft(subject=intent.subject, body=body_with_marker(intent.body, placeholder),
                                    priority=intent.priority, department=res.department, category=res.category,
                                    service=intent.service, cc=tuple(str(c) for c in intent.cc),
                                    critical_reason=intent.critical_reason)
                requests.append(_spec_dict(adapter.create_request(draft)))
            except RoutingError as exc:
                out.update(department=None, department_error=str(exc))
        elif action in (Action.reply, Action.reopen):
            ticket = group.ticket_provider_id if group is not None else None
            closed = group.ticket_closed if group is not None else False
            if kind is GroupKind.alerts and state is not None:
                diff = diff_states(group.sent_state if group else None, state)
                steps = plan_steps(ticket_closed=closed, resolves=diff.all_resolved,
                                   close_on_resolve=self.config.alerts.close_on_resolve)
                text = reply_text(diff, reopened=closed and not diff.all_resolved,
                                  closing=Step.close.value in steps, source=source)
            else:
                steps = plan_steps(ticket_closed=closed, resolves=False, close_on_resolve=False)
                text = intent.body
            if text is None:
                out.update(action=Action.none.value, reason="nothing changed since the ticket's last update")
            else:
                message = body_with_marker(text, placeholder)
                out["message"] = message
                shown = ticket or "(the group's ticket, once made)"
                for step in steps:
                    spec = (adapter.reply_request(shown, message) if step == Step.reply.value else
                            adapter.reopen_request(shown) if step == Step.reopen.value else
                            adapter.close_request(shown))
                    requests.append(_spec_dict(spec))
                out["steps"] = steps
                out["department"] = None
        out["requests"] = requests
        return out

    # -- group follow-ups (reply / reopen / close) -------------------------------------------------

    def _dispatch_follow_up(self, intent: IntentView, target: TargetConfig) -> None:
        """One step of a follow-up per delivery, so each request takes its own rate-limit token."""
        group = self.groups.get(intent.group_id) if intent.group_id is not None else None
        payload = dict(intent.payload or {})
        if group is None or payload.get("generation") != group.generation:
            self._finish(intent, Status.cancelled, "superseded",
                         "the group has moved on to a newer ticket; nothing was sent")
            return
        if payload.get("steps") is None and payload.get("kind") == GroupKind.alerts.value:
            newer = self.groups.newer_pending(group.id, intent.group_seq or 0)
            if newer is not None:  # a newer notification says more: it alone is sent
                self._finish(intent, Status.cancelled, "superseded", f"superseded by {newer} (flap damping)")
                return
        if not group.has_ticket:
            if group.state is GroupState.failed:
                self._finish(intent, Status.failed, "group_ticket_failed",
                             f"the group's ticket could not be made (intent {group.creator_intent_id}); nothing sent")
            else:  # the creator is still in flight: wait a little, not counted as an attempt
                self._wait(intent, GROUP_TICKET_WAIT_S, reason="waiting for the group's ticket to be made",
                           count=False, quiet=True)
            return
        if payload.get("steps") is None:
            older = self.groups.older_pending(group.id, intent.group_seq or 0)
            if older is not None:  # replies go out in order; the older one may yet be superseded by this one
                self._wait(intent, GROUP_TICKET_WAIT_S, reason=f"waiting for the group's earlier follow-up {older}",
                           count=False, quiet=True)
                return
            planned = self._plan_follow_up(intent, group, payload)
            if planned is None:
                return
            payload = planned
            self.store.update_intent(intent.id, payload=payload)
            self.store.add_event(intent.id, "planned", " → ".join(payload["steps"]) + f" on ticket {payload['ticket']}"
                                 + (f" ({payload['flapped']} superseded notification(s) coalesced)"
                                    if payload.get("flapped") else ""), at=self.clock())
            intent = replace(intent, payload=payload)
        adapter = self.adapter(target)
        steps: list[str] = list(payload["steps"])
        index = int(payload["step"])
        step, ticket = steps[index], str(payload["ticket"])
        if step == Step.reply.value and intent.needs_reconcile and self._reply_already_there(intent, target, adapter):
            return
        spec = (adapter.reply_request(ticket, payload["message"]) if step == Step.reply.value else
                adapter.reopen_request(ticket) if step == Step.reopen.value else adapter.close_request(ticket))
        outcome, raw = self._exchange(intent, target, spec, number=intent.attempts + 1)
        if outcome.verdict is Verdict.done:
            self._follow_up_step_done(intent, target)
        elif outcome.verdict is Verdict.poll:
            self._start_polling(intent, target, outcome)
        elif outcome.verdict is Verdict.retry:
            ambiguous = raw.maybe_delivered or (raw.status is not None and raw.status in (500, 502, 504))
            self._retry_later(intent, target, outcome, counted=True,
                              maybe_created=ambiguous and step == Step.reply.value)
        elif outcome.verdict is Verdict.pause:
            self._pause_target(intent, target, outcome)
        elif (step == Step.reply.value and outcome.error_code == "conflict" and Step.reopen.value not in steps[:index]
              and target.provider.value == "hostup"):
            # HostUp refuses replies to a closed ticket (someone closed it): reopen it first, then reply
            now = self.clock()
            self.groups.ticket_closed_by_provider(group.id, group.generation, now)
            payload = {**payload, "steps": [*steps[:index], Step.reopen.value, *steps[index:]]}
            self.store.release(intent.id, self.worker, status=Status.queued, now=now, next_attempt_at=now,
                               enqueued_at=now, attempts=intent.attempts + 1, payload=payload,
                               event=("reopening", "HostUp refused the reply because the ticket is closed: "
                                      "reopening it first", None))
            self._publish(DISPATCH, [(intent.id, intent.target)])
        else:
            self._finish(intent, Status.failed, outcome.error_code or "final", _error_text(outcome),
                         attempts=intent.attempts + 1)

    def _plan_follow_up(self, intent: IntentView, group: GroupView,
                        payload: dict[str, Any]) -> dict[str, Any] | None:
        """What to say, from what the ticket last said to this intent's alert state (counting the
        notifications flap damping coalesced); None when there is nothing new (finished here)."""
        if payload.get("kind") == GroupKind.message.value:
            steps = plan_steps(ticket_closed=group.ticket_closed, resolves=False, close_on_resolve=False)
            return {**payload, "steps": steps, "step": 0, "ticket": group.ticket_provider_id,
                    "message": body_with_marker(intent.body, intent.id), "resolves": False}
        seq = intent.group_seq or 0
        sent_seq = int((group.sent_state or {}).get("seq") or 0)
        flapped = self.groups.superseded_between(group.id, sent_seq, seq)
        state = payload.get("state") or {}
        diff = diff_states(group.sent_state, state)
        steps = plan_steps(ticket_closed=group.ticket_closed, resolves=diff.all_resolved,
                           close_on_resolve=self.config.alerts.close_on_resolve)
        text = reply_text(diff, flapped=flapped, reopened=group.ticket_closed and not diff.all_resolved,
                          closing=Step.close.value in steps, source=str(payload.get("source") or "alertmanager"))
        if text is None:
            self.store.release(intent.id, self.worker, status=Status.succeeded, now=self.clock(),
                               action=Action.none.value,
                               event=("succeeded", "nothing new since the ticket's last update: nothing sent", None))
            return None
        return {**payload, "steps": steps, "step": 0, "ticket": group.ticket_provider_id, "flapped": flapped,
                "message": body_with_marker(text, intent.id), "resolves": diff.all_resolved}

    def _reply_already_there(self, intent: IntentView, target: TargetConfig, adapter: ProviderAdapter) -> bool:
        """An earlier reply got no answer: look for its marker on the ticket before sending it again."""
        payload = intent.payload or {}
        detail, _ = self._exchange(intent, target, adapter.ticket_request(str(payload["ticket"])), number=None)
        if detail.verdict is not Verdict.done:
            self._retry_later(intent, target, detail, counted=True, maybe_created=True)
            return True
        self.store.update_intent(intent.id, needs_reconcile=False)
        if adapter.match_marker(detail, str(intent.id)) is not None:
            self.store.add_event(intent.id, "reconciled", "the earlier reply reached the ticket: not sending it again",
                                 at=self.clock())
            self._follow_up_step_done(intent, target)
            return True
        return False

    def _follow_up_step_done(self, intent: IntentView, target: TargetConfig) -> None:
        """Record the step on the group; then finish, or hand the next step to the queue."""
        now = self.clock()
        payload = dict(intent.payload or {})
        steps: list[str] = list(payload.get("steps") or [])
        index = int(payload.get("step") or 0)
        step = steps[index]
        last = index + 1 >= len(steps)
        state = payload.get("state")
        sent = {**state, "seq": intent.group_seq} if step == Step.reply.value and state is not None else None
        if intent.group_id is not None:
            self.groups.step_done(intent.group_id, int(payload.get("generation") or 0), step, now=now,
                                  sent_state=sent, last=last, resolves=bool(payload.get("resolves")))
        attempts = intent.attempts + (0 if intent.status is Status.polling else 1)
        done = {"reply": "reply sent", "reopen": "ticket reopened", "close": "ticket closed"}.get(step, step)
        clear: dict[str, Any] = {"task_uuid": None, "poll_path": None, "poll_deadline": None,
                                 "needs_reconcile": False, "last_error_code": None, "last_error_message": None}
        if last:
            self.store.release(intent.id, self.worker, status=Status.succeeded, now=now, attempts=attempts,
                               event=("succeeded", f"{done} (ticket {payload.get('ticket')}): "
                                      + " → ".join(steps) + " done", None), **clear)
            return
        payload["step"] = index + 1
        self.store.release(intent.id, self.worker, status=Status.queued, now=now, attempts=attempts,
                           next_attempt_at=now, enqueued_at=now, deliveries=0, payload=payload,
                           event=("step", f"{done}; next: {steps[index + 1]}", None), **clear)
        self._publish(DISPATCH, [(intent.id, intent.target)])

    # -- scheduler -----------------------------------------------------------------------------

    def schedule_once(self) -> dict[str, int]:
        """One pass: recover lost workers' intents, re-enqueue what is due. Safe to run twice at once."""
        now = self.clock()
        recovered = self.store.recover_expired_leases(now=now)
        paused = self.store.paused_targets()
        # a broker that can date its oldest waiting message tells a backlog from a loss (see take_due)
        peek = getattr(self.queue, "oldest_waiting", None)
        waiting = peek([t for t in self.config.targets if t not in paused]) if peek is not None else None
        due = self.store.take_due(now=now, requeue_after_s=self.config.scheduler.requeue_after_s,
                                  paused=paused, waiting_since=waiting)
        dispatch = [(d.id, d.target) for d in due if d.status is not Status.polling]
        polls = [(d.id, d.target) for d in due if d.status is Status.polling]
        if dispatch:
            self._publish(DISPATCH, dispatch)
        if polls:
            self._publish(POLL, polls)
        return {"recovered": len(recovered), "enqueued": len(dispatch), "polls": len(polls)}

    # -- operator ------------------------------------------------------------------------------

    def resume_target(self, name: str, *, actor: str) -> int:
        """Un-pause a target; its waiting intents become due at once. Returns how many."""
        now = self.clock()
        self.store.set_target_state(name, now=now, paused=False, paused_reason=None, paused_by=actor)
        return self.store.make_due(target=name, now=now)

    def pause_target(self, name: str, *, actor: str, reason: str) -> None:
        now = self.clock()
        self.store.set_target_state(name, now=now, paused=True, paused_reason=reason, paused_by=actor, paused_at=now)

    # -- batch intake --------------------------------------------------------------------------

    def _intake_routes(self, target: TargetConfig) -> Mapping[str, Route]:
        """The target's merged routing rules, built once (intake checks every topic against them)."""
        routes = self._routes_cache.get(target.name)
        if routes is None:
            routes = self._routes_cache[target.name] = merged_routes(target.provider, target.routes)
        return routes

    def validate_many(self, items: Sequence[Any]) -> list[Valid | IntentInvalid]:
        """:meth:`validate` for every item, collecting each refusal instead of stopping at the first."""
        out: list[Valid | IntentInvalid] = []
        for data in items:
            if isinstance(data, Valid):
                out.append(data)
                continue
            try:
                out.append(Valid(*self.validate(data)))
            except IntentInvalid as exc:
                out.append(exc)
        return out

    def accept_many(self, items: Sequence[Any], *, source: str = "python", submitted_by: str | None = None,
                    submitted_from: str | None = None, event_data: Sequence[dict[str, Any] | None] | None = None,
                    progress: Progress | None = None) -> list[ItemResult]:
        """Validate every item, store the valid new ones in ONE transaction, then enqueue them.

        Items may be raw data, or :class:`Valid` from :meth:`validate_many` (not checked twice).
        Nothing is stored for an invalid item; the valid ones are stored all together or not at all.
        A stored idempotency key makes a replay and an earlier item of the batch with the same key a
        duplicate: neither makes anything new. Replays are found by inserting first (``ON CONFLICT
        DO NOTHING``) and looking up, in bulk, only the keys that conflicted: one mechanism for a
        re-sent batch and for a concurrent writer that won the race, and no look-up at all for a new
        batch. It is bulk all the way (COPY, one publishing connection) because a batch of thousands
        one by one costs thousands of round trips. ``event_data`` (per item) goes into each
        "accepted" event. Items with a ``group_key`` are the exception: each is accepted as
        :meth:`accept` does, after the others, because whether it makes a ticket or a reply is
        decided on its group's locked row.
        """
        report = progress or (lambda phase, done, total: None)
        results: list[ItemResult | None] = [None] * len(items)
        firsts: list[tuple[int, IntentInput, TargetConfig]] = []
        grouped: list[tuple[int, IntentInput]] = []
        duplicates: list[tuple[int, int]] = []
        seen: dict[tuple[str, str], int] = {}
        for index, checked in enumerate(self.validate_many(items)):
            if isinstance(checked, IntentInvalid):
                results[index] = ItemResult(index, ItemStatus.invalid, errors=tuple(checked.problems))
                continue
            intent, target = checked.intent, checked.target
            if intent.idempotency_key is not None:
                pair = (target.name, intent.idempotency_key)
                if pair in seen:
                    duplicates.append((index, seen[pair]))
                    continue
                seen[pair] = index
            if intent.group_key:
                grouped.append((index, intent))
            else:
                firsts.append((index, intent, target))
        report("validate", len(items), len(items))

        now = self.clock()
        ids = iter(new_intent_ids(len(firsts)))
        rows: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        message = (f"accepted from {source}" + (f" by {submitted_by}" if submitted_by else "")
                   + (f" ({submitted_from})" if submitted_from else ""))
        for index, intent, target in firsts:
            values = self._row_values(intent, target, source=source, submitted_by=submitted_by,
                                      submitted_from=submitted_from, now=now, intent_id=next(ids))
            rows.append(values)
            events.append({"intent_id": values["id"], "at": now, "kind": "accepted", "actor": submitted_by,
                           "message": message, "data": event_data[index] if event_data else None})
            results[index] = ItemResult(index, ItemStatus.accepted, values["id"], target.name)
        inserted = self.store.insert_intents_bulk(rows, events)
        report("store", len(rows), len(rows))

        if len(inserted) < len(rows):
            self._replays(results, [r for r in rows if r["id"] not in inserted])
        self._enqueue_batch([(r["id"], r["target"]) for r in rows if r["id"] in inserted], report)
        metrics.accepted_many(source, [r["target"] for r in rows if r["id"] in inserted])
        for index, intent in grouped:  # each decides on its locked group row: one by one, as accept does
            one = self.accept(intent, source=source, submitted_by=submitted_by, submitted_from=submitted_from)
            results[index] = ItemResult(index, ItemStatus.replay if one.replay else ItemStatus.accepted,
                                        one.intent.id, one.intent.target)
        for index, first in duplicates:
            winner = results[first]
            assert winner is not None
            results[index] = ItemResult(index, ItemStatus.duplicate, winner.id, winner.target, duplicate_of=first)
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def _replays(self, results: list[ItemResult | None], lost: list[dict[str, Any]]) -> None:
        """Rows whose (target, key) was stored already, before or while we inserted: replays of that one."""
        winners = self.store.find_by_keys((r["target"], r["idempotency_key"]) for r in lost)
        by_id = {r.id: r for r in results if r is not None and r.status is ItemStatus.accepted}
        for row in lost:
            winner = winners.get((row["target"], row["idempotency_key"]))
            if winner is None:  # ON CONFLICT skipped it, so a committed row holds the key
                raise RuntimeError(f"intent with key {row['idempotency_key']!r} on {row['target']} vanished")
            mine = by_id[row["id"]]
            results[mine.index] = ItemResult(mine.index, ItemStatus.replay, winner, row["target"])

    def _enqueue_batch(self, items: list[tuple[uuid.UUID, str]], report: Progress) -> None:
        """Publish in chunks; at the first failure leave the rest to the scheduler (the outbox)."""
        for start in range(0, len(items), PUBLISH_CHUNK):
            chunk = items[start:start + PUBLISH_CHUNK]
            try:
                self.queue.enqueue_many(DISPATCH, chunk)
            except EnqueueFailed as exc:
                rest = [intent_id for intent_id, _ in items[start:]]
                log.log(logging.INFO if exc.expected else logging.WARNING,
                        "broker did not take %d message(s) (%s); the scheduler will re-enqueue", len(rest), exc)
                try:
                    for at in range(0, len(rest), 5000):
                        self.store.mark_not_enqueued(rest[at:at + 5000])
                except Exception:  # the scheduler also re-enqueues after requeue_after_s
                    log.exception("could not mark intents for re-enqueue")
                return
            report("enqueue", start + len(chunk), len(items))


def _spec_dict(spec: RequestSpec) -> dict[str, Any]:
    """A request as a dry run shows it."""
    out: dict[str, Any] = {"op": spec.op.value, "method": spec.method, "path": spec.path}
    if spec.json is not None:
        out["json"] = dict(spec.json)
    return out


def _task_subject(intent: IntentView) -> str:
    """What a NocWorx task is doing for this intent, for the timeline."""
    if intent.action is Action.create:
        return "ticket"
    payload = intent.payload or {}
    steps = payload.get("steps") or []
    index = int(payload.get("step") or 0)
    step = steps[index] if index < len(steps) else "follow-up"
    return {"reply": "comment", "reopen": "reopen", "close": "close"}.get(step, step)


def _error_text(outcome: Outcome) -> str:
    """The provider's own words, with the fields it named."""
    text = outcome.error_message or outcome.error_code or "no detail given"
    if outcome.field_errors:
        text += " (" + "; ".join(f"{p.field}: {p.reason}" for p in outcome.field_errors) + ")"
    if outcome.request_id:
        text += f" [requestId {outcome.request_id}]"
    return text


__all__ = ["Accepted", "Dispatcher", "GroupAccepted", "ItemResult", "ItemStatus", "Limiter", "NoLimiter", "Progress",
           "Throttled", "Valid"]
