"""The use cases: accept, dispatch, poll, schedule, retry, cancel.

Everything here talks to the outside through ports: :class:`~dispatcher.store.repo.Store`
(Postgres/SQLite), :class:`~dispatcher.queue.TaskQueue` (Celery/in-process), a transport per target
(httpx) and the provider adapters (pure). The provider adapter's ``classify`` decides what an
answer means; this module decides what happens next and records it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from dispatcher.backoff import next_retry
from dispatcher.config import AppConfig, TargetConfig
from dispatcher.domain import (
    DUE_STATUSES,
    IntentInput,
    IntentView,
    Priority,
    Status,
    body_with_marker,
    parse_intent,
    provider_problems,
)
from dispatcher.errors import FieldProblem, IntentInvalid, RoutingError, UnknownIntent
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
from dispatcher.routing import check_topic, merged_routes, resolve
from dispatcher.store.repo import Store
from dispatcher.store.tables import EventRow, IntentRow

log = logging.getLogger(__name__)

#: how long a paused target's intents wait before they look again
PAUSED_RECHECK_S = 30.0
#: a worker gives up an intent it was handed this many times without finishing (poison)
MAX_DELIVERIES = 10
#: stored request fields are cut to this many characters
REQUEST_FIELD_MAX = 2000


class Transport(Protocol):
    def send(self, spec: RequestSpec) -> RawResponse: ...


class Limiter(Protocol):
    """The shared per-target send budget (see :mod:`dispatcher.ratelimit`)."""

    def acquire(self, target: TargetConfig) -> float:
        """0 to send now, else the seconds to wait before asking again (no token was taken)."""

    def observe(self, target: TargetConfig, outcome: Outcome, now: datetime) -> None:
        """Learn from an answer's Retry-After and X-RateLimit-* headers."""


class NoLimiter:
    def acquire(self, target: TargetConfig) -> float:
        return 0.0

    def observe(self, target: TargetConfig, outcome: Outcome, now: datetime) -> None:
        return None


@dataclass(frozen=True)
class Accepted:
    intent: IntentView
    replay: bool


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
        self.clock = clock
        self.rng = rng or random.Random()
        self.worker = worker
        self.departments = DepartmentCache()
        self._transport_for = transport_for
        self._adapter_for = adapter_for
        self._transports: dict[str, Transport] = {}
        self._adapters: dict[str, ProviderAdapter] = {}
        self._lock = threading.Lock()

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
        topic_problem = check_topic(target.provider, intent.topic, merged_routes(target.provider, target.routes)) \
            if intent.department is None else None
        if topic_problem:
            problems.append(topic_problem)
        if problems:
            raise IntentInvalid(problems)
        return intent, target

    def _new_row(self, intent: IntentInput, target: TargetConfig, *, source: str, submitted_by: str | None,
                 submitted_from: str | None, now: datetime) -> IntentRow:
        from dispatcher.domain import new_intent_id

        return IntentRow(
            id=new_intent_id(), target=target.name, provider=target.provider.value, status=Status.queued.value,
            source=source, submitted_by=submitted_by, submitted_from=submitted_from,
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
        self._publish(DISPATCH, [(row.id, target.name)])
        stored = self.store.get(row.id)
        assert stored is not None
        return Accepted(stored, replay=False)

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
        now = self.clock()
        intent = self.store.claim(intent_id, statuses=DUE_STATUSES, to=Status.sending, now=now,
                                  lease_s=self.config.scheduler.lease_s, worker=self.worker)
        if intent is None:
            self._requeue_if_early(intent_id, DISPATCH)
            return
        target = self.config.targets.get(intent.target)
        if target is None:
            self._finish(intent, Status.failed, "unknown_target",
                         f"target '{intent.target}' is no longer configured")
            return
        if intent.deliveries > MAX_DELIVERIES:
            self._finish(intent, Status.failed, "poison",
                         f"handed to a worker {intent.deliveries} times without finishing; giving up")
            return
        if intent.target in self.store.paused_targets():
            self._wait(intent, PAUSED_RECHECK_S, reason=f"target '{intent.target}' is paused", count=False)
            return
        wait = self.limiter.acquire(target)
        if wait > 0:
            self._wait(intent, wait, reason="waiting for the target's rate limit", count=False, quiet=True)
            return
        try:
            self._dispatch_claimed(intent, target)
        except Exception as exc:
            log.exception("dispatch of %s failed unexpectedly", intent.id)
            self._retry_later(intent, target, Outcome(Verdict.retry, error_code="internal",
                                                      error_message=f"{type(exc).__name__}: {exc}"))

    def _requeue_if_early(self, intent_id: uuid.UUID, task: str) -> None:
        """A message that came before its time goes back; anything else is a replay and does nothing."""
        view = self.store.get(intent_id)
        if view is None or view.next_attempt_at is None:
            return
        wait = (view.next_attempt_at - self.clock()).total_seconds()
        due_statuses = DUE_STATUSES if task == DISPATCH else {Status.polling}
        if view.status in due_statuses and 0 < wait <= self.config.scheduler.short_wait_s:
            self._publish(task, [(view.id, view.target)], countdown=wait)

    def _dispatch_claimed(self, intent: IntentView, target: TargetConfig) -> None:
        adapter = self.adapter(target)
        if intent.needs_reconcile:
            found = self._reconcile(intent, target, adapter)
            if found is not False:
                return
        resolution = self._resolve(intent, target, adapter)
        if resolution is None:
            return
        department, category = resolution
        draft = TicketDraft(
            subject=intent.subject, body=body_with_marker(intent.body, intent.id), priority=intent.priority,
            department=department, category=category, service=intent.service, cc=intent.cc,
            critical_reason=intent.critical_reason)
        outcome, raw = self._exchange(intent, target, adapter.create_request(draft), number=intent.attempts + 1)
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

    def _resolve(self, intent: IntentView, target: TargetConfig,
                 adapter: ProviderAdapter) -> tuple[str, str | None] | None:
        """The department to file under, checked against the provider's list; None if the intent moved on."""
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
        if res.department != intent.resolved_department:
            self.store.update_intent(intent.id, resolved_department=res.department, resolved_category=res.category)
            self.store.add_event(intent.id, "routed", res.reason, at=self.clock())
        return res.department, res.category

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

    def _exchange(self, intent: IntentView, target: TargetConfig, spec: RequestSpec, *,
                  number: int | None) -> tuple[Outcome, RawResponse]:
        """Record the attempt, send, classify, complete the record. The record comes first."""
        attempt_id = self.store.begin_attempt(intent.id, number=number, op=spec.op.value, method=spec.method,
                                              path=spec.path, request=_redacted_request(spec),
                                              worker=self.worker, now=self.clock())
        raw = self.transport(target).send(spec)
        outcome = self.adapter(target).classify(spec.op, raw)
        self.limiter.observe(target, outcome, self.clock())
        unknown = spec.op is Op.create and raw.status is None and raw.maybe_delivered
        self.store.finish_attempt(
            attempt_id, status_code=raw.status, duration_ms=round(raw.duration_ms, 2),
            response_excerpt=raw.body if raw.status is not None else raw.network_error,
            provider_request_id=outcome.request_id, task_uuid=outcome.task_uuid,
            verdict="unknown" if unknown else outcome.verdict.value, error_code=outcome.error_code,
            error_message=outcome.error_message, retry_after_s=outcome.retry_after, finished_at=self.clock())
        log.info("attempt", extra={"intent_id": str(intent.id), "target": target.name, "op": spec.op.value,
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
        for spec in adapter.find_requests_for_marker(intent.subject):
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
        return False  # the lost create's task failed: it made nothing, so send again

    # -- poll ----------------------------------------------------------------------------------

    def poll(self, intent_id: uuid.UUID) -> None:
        """Ask a NocWorx task how it went; never re-submit it."""
        now = self.clock()
        intent = self.store.claim(intent_id, statuses=[Status.polling], to=Status.polling, now=now,
                                  lease_s=self.config.scheduler.lease_s, worker=self.worker)
        if intent is None:
            self._requeue_if_early(intent_id, POLL)
            return
        target = self.config.targets.get(intent.target)
        if target is None or intent.poll_path is None:
            self._finish(intent, Status.failed, "unknown_target", "cannot poll: target or task is gone")
            return
        try:
            self._poll_claimed(intent, target)
        except Exception as exc:
            log.exception("poll of %s failed unexpectedly", intent.id)
            self._next_poll(intent, target, reason=f"internal error: {type(exc).__name__}")

    def _poll_claimed(self, intent: IntentView, target: TargetConfig) -> None:
        adapter = self.adapter(target)
        assert intent.poll_path is not None
        if intent.poll_deadline and self.clock() >= intent.poll_deadline:
            self._finish(intent, Status.failed, "task_timeout",
                         f"NocWorx task {intent.task_uuid} still pending after {target.poll_deadline_s:.0f} s "
                         "(the deadline); it was not submitted again. Use `dispatcher intents repoll` to look again.")
            return
        if intent.target in self.store.paused_targets():
            self._next_poll(intent, target, wait=PAUSED_RECHECK_S, reason="target paused")
            return
        outcome, _ = self._exchange(intent, target, adapter.task_request(intent.poll_path), number=None)
        if outcome.verdict is Verdict.poll:
            self._next_poll(intent, target)
        elif outcome.verdict is Verdict.retry:
            self._next_poll(intent, target, wait=outcome.retry_after, reason=outcome.error_code or "retry")
        elif outcome.verdict is Verdict.pause:
            self._pause_target(intent, target, outcome, keep=Status.polling)
        elif outcome.verdict is Verdict.final:
            self._finish(intent, Status.failed, outcome.error_code or "task_failed",
                         f"NocWorx task {intent.task_uuid} ended: {_error_text(outcome)}")
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
                   reason: str = "task pending") -> None:
        wait = max(wait or 0.0, target.poll_interval_s)
        now = self.clock()
        if intent.poll_deadline is not None:  # look once more right at the deadline, not long after it
            wait = max(0.0, min(wait, (intent.poll_deadline - now).total_seconds()))
        due = now + timedelta(seconds=wait)
        short = wait <= self.config.scheduler.short_wait_s
        self.store.release(intent.id, self.worker, status=Status.polling, now=now, next_attempt_at=due,
                           enqueued_at=due if short else None)
        if short:
            self._publish(POLL, [(intent.id, intent.target)], countdown=wait)

    # -- transitions ---------------------------------------------------------------------------

    def _start_polling(self, intent: IntentView, target: TargetConfig, outcome: Outcome, *,
                       reconciled: bool = False) -> None:
        now = self.clock()
        wait = target.poll_interval_s
        due = now + timedelta(seconds=wait)
        self.store.release(
            intent.id, self.worker, status=Status.polling, now=now, task_uuid=outcome.task_uuid,
            poll_path=outcome.poll_path, poll_deadline=now + timedelta(seconds=target.poll_deadline_s),
            next_attempt_at=due, enqueued_at=due, needs_reconcile=False,
            attempts=intent.attempts + (0 if reconciled else 1),
            event=("polling", f"NocWorx accepted the ticket as task {outcome.task_uuid}; polling "
                   f"{outcome.poll_path} every {wait:g} s for up to {target.poll_deadline_s:g} s", None))
        self._publish(POLL, [(intent.id, intent.target)], countdown=wait)

    def _succeed(self, intent: IntentView, target: TargetConfig, ticket: TicketRef) -> None:
        now = self.clock()
        url = ticket.url
        self.store.record_ticket(intent, provider_id=ticket.provider_id, number=ticket.number, url=url,
                                 department=ticket.department or intent.resolved_department, now=now)
        attempts = intent.attempts + (0 if intent.status is Status.polling else 1)
        label = ticket.number or ticket.provider_id
        self.store.release(intent.id, self.worker, status=Status.succeeded, now=now, attempts=attempts,
                           needs_reconcile=False, last_error_code=None, last_error_message=None,
                           event=("succeeded", f"ticket {ticket.provider_id}"
                                  + (f" ({label})" if label != ticket.provider_id else "") + " made", None))

    def _finish(self, intent: IntentView, status: Status, code: str, message: str, **values: Any) -> None:
        self.store.release(intent.id, self.worker, status=status, now=self.clock(), last_error_code=code,
                           last_error_message=message, event=(status.value, f"{code}: {message}", None), **values)
        log.info("intent finished", extra={"intent_id": str(intent.id), "target": intent.target,
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
        log.warning("target paused: credentials refused", extra={"target": target.name, "reason": reason})
        if keep is Status.polling:
            self._next_poll(intent, target, wait=PAUSED_RECHECK_S, reason="target paused")
        else:
            self._wait(intent, PAUSED_RECHECK_S, reason=f"target '{target.name}' paused ({reason})", count=False,
                       last_error_code=outcome.error_code, last_error_message=_error_text(outcome))

    # -- scheduler -----------------------------------------------------------------------------

    def schedule_once(self) -> dict[str, int]:
        """One pass: recover lost workers' intents, re-enqueue what is due. Safe to run twice at once."""
        now = self.clock()
        recovered = self.store.recover_expired_leases(now=now)
        due = self.store.take_due(now=now, requeue_after_s=self.config.scheduler.requeue_after_s,
                                  paused=self.store.paused_targets())
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


def _error_text(outcome: Outcome) -> str:
    """The provider's own words, with the fields it named."""
    text = outcome.error_message or outcome.error_code or "no detail given"
    if outcome.field_errors:
        text += " (" + "; ".join(f"{p.field}: {p.reason}" for p in outcome.field_errors) + ")"
    if outcome.request_id:
        text += f" [requestId {outcome.request_id}]"
    return text


__all__ = ["Accepted", "Dispatcher", "Limiter", "NoLimiter"]
