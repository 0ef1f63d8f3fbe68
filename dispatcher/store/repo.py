"""The one seam between the service and the database.

Every method is one short transaction; none is held open across an HTTP call. Claims are
conditional UPDATEs (``... WHERE status IN (...) AND next_attempt_at <= now``) so that a message
delivered twice, or two schedulers, cannot both win: the second finds nothing to do.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, exists, func, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.domain import (
    DUE_STATUSES,
    AttemptView,
    EventView,
    IntentView,
    Priority,
    Provider,
    ServiceRef,
    Status,
    TicketView,
)
from dispatcher.errors import StoreUnavailable
from dispatcher.store.db import is_sqlite
from dispatcher.store.tables import AttemptRow, EventRow, IntentRow, TargetStateRow, TicketRow

EXCERPT_MAX = 2000


def excerpt(text: str | bytes | None, limit: int = EXCERPT_MAX) -> str | None:
    """A bounded, printable slice of a response body for the audit trail."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


def ticket_view(row: TicketRow) -> TicketView:
    return TicketView(row.provider_ticket_id, row.number, row.url, row.department, row.created_at)


def attempt_view(row: AttemptRow) -> AttemptView:
    return AttemptView(
        row.id, row.number, row.op, row.method, row.path, row.request, row.status_code, row.duration_ms,
        row.response_excerpt, row.provider_request_id, row.task_uuid, row.verdict, row.error_code,
        row.error_message, row.retry_after_s, row.worker, row.started_at, row.finished_at)


def intent_view(row: IntentRow, ticket: TicketRow | None = None,
                attempts: Sequence[AttemptRow] = ()) -> IntentView:
    return IntentView(
        id=row.id, target=row.target, provider=Provider(row.provider), status=Status(row.status),
        source=row.source, submitted_by=row.submitted_by, subject=row.subject, body=row.body,
        priority=Priority(row.priority), topic=row.topic, department=row.department, category=row.category,
        service=ServiceRef.model_validate(row.service) if row.service else None, cc=tuple(row.cc or ()),
        critical_reason=row.critical_reason, idempotency_key=row.idempotency_key, group_key=row.group_key,
        labels=dict(row.labels or {}), resolved_department=row.resolved_department,
        resolved_category=row.resolved_category, attempts=row.attempts, last_error_code=row.last_error_code,
        last_error_message=row.last_error_message, next_attempt_at=row.next_attempt_at,
        needs_reconcile=row.needs_reconcile, deliveries=row.deliveries, task_uuid=row.task_uuid,
        poll_path=row.poll_path, poll_deadline=row.poll_deadline, created_at=row.created_at,
        updated_at=row.updated_at, finished_at=row.finished_at,
        ticket=ticket_view(ticket) if ticket else None,
        attempt_log=tuple(attempt_view(a) for a in attempts),
    )


@dataclass(frozen=True)
class DueIntent:
    id: uuid.UUID
    target: str
    status: Status


class Store:
    """Queries used by the service. Raises :class:`StoreUnavailable` when the database is down."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.skip_locked = not is_sqlite(engine)

    # -- plumbing ------------------------------------------------------------------------------

    def session(self) -> Session:
        return self.sessions()

    @staticmethod
    def unavailable(exc: DBAPIError) -> StoreUnavailable:
        return StoreUnavailable(f"the database cannot be reached: {type(exc.orig).__name__}")

    # -- intake --------------------------------------------------------------------------------

    def insert_intents(self, rows: Sequence[IntentRow], events: Sequence[EventRow]) -> None:
        """Insert new intents in one transaction (all or none)."""
        with self.session() as s, s.begin():
            s.add_all(rows)
            s.flush()
            s.add_all(events)

    def find_by_key(self, target: str, key: str) -> IntentView | None:
        with self.session() as s:
            row = s.scalar(select(IntentRow).where(IntentRow.target == target, IntentRow.idempotency_key == key))
            return self._view(s, row) if row else None

    def find_by_keys(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], uuid.UUID]:
        """Existing ids for (target, idempotency key) pairs: replays in a batch."""
        wanted = list(pairs)
        if not wanted:
            return {}
        found: dict[tuple[str, str], uuid.UUID] = {}
        with self.session() as s:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                keys = {k for _, k in chunk}
                rows = s.execute(select(IntentRow.target, IntentRow.idempotency_key, IntentRow.id)
                                 .where(IntentRow.idempotency_key.in_(keys)))
                wanted_here = set(chunk)
                for target, key, id_ in rows:
                    if key is not None and (target, key) in wanted_here:
                        found[(target, key)] = id_
        return found

    def mark_not_enqueued(self, ids: Sequence[uuid.UUID]) -> None:
        """Publishing failed: let the scheduler pick these up at once."""
        with self.session() as s, s.begin():
            s.execute(update(IntentRow).where(IntentRow.id.in_(ids)).values(enqueued_at=None))

    # -- reads ---------------------------------------------------------------------------------

    def _view(self, s: Session, row: IntentRow, with_attempts: bool = False) -> IntentView:
        ticket = s.scalar(select(TicketRow).where(TicketRow.intent_id == row.id))
        attempts: Sequence[AttemptRow] = ()
        if with_attempts:
            attempts = s.scalars(select(AttemptRow).where(AttemptRow.intent_id == row.id)
                                 .order_by(AttemptRow.id)).all()
        return intent_view(row, ticket, attempts)

    def get(self, intent_id: uuid.UUID, *, with_attempts: bool = False) -> IntentView | None:
        with self.session() as s:
            row = s.get(IntentRow, intent_id)
            return self._view(s, row, with_attempts) if row else None

    def events(self, intent_id: uuid.UUID) -> list[EventView]:
        with self.session() as s:
            rows = s.scalars(select(EventRow).where(EventRow.intent_id == intent_id).order_by(EventRow.id))
            return [EventView(r.at, r.kind, r.message, r.actor, r.data) for r in rows]

    def list_intents(self, *, status: Sequence[str] = (), target: str | None = None, limit: int = 50,
             before: uuid.UUID | None = None, **filters: Any) -> list[IntentView]:
        """Newest first; ``before`` is the cursor (the last id of the previous page)."""
        query = select(IntentRow).order_by(IntentRow.id.desc()).limit(limit)
        if status:
            query = query.where(IntentRow.status.in_(status))
        if target:
            query = query.where(IntentRow.target == target)
        if before is not None:
            query = query.where(IntentRow.id < before)
        for name, value in filters.items():
            if value is not None:
                query = query.where(getattr(IntentRow, name) == value)
        with self.session() as s:
            rows = s.scalars(query).all()
            tickets = {t.intent_id: t for t in s.scalars(
                select(TicketRow).where(TicketRow.intent_id.in_([r.id for r in rows])))} if rows else {}
            return [intent_view(r, tickets.get(r.id)) for r in rows]

    def count_by_status(self) -> dict[str, int]:
        with self.session() as s:
            return {st: n for st, n in s.execute(select(IntentRow.status, func.count()).group_by(IntentRow.status))}

    # -- claims --------------------------------------------------------------------------------

    def claim(self, intent_id: uuid.UUID, *, statuses: Iterable[Status], to: Status, now: datetime,
              lease_s: float, worker: str) -> IntentView | None:
        """Take the intent if it is in one of ``statuses``, due, and not leased by a live worker."""
        values: dict[str, Any] = {"lease_until": now + timedelta(seconds=lease_s), "leased_by": worker,
                                  "updated_at": now, "status": to.value,
                                  "deliveries": IntentRow.deliveries + 1}
        stmt = (update(IntentRow)
                .where(IntentRow.id == intent_id,
                       IntentRow.status.in_([s.value for s in statuses]),
                       IntentRow.next_attempt_at <= now,
                       or_(IntentRow.lease_until.is_(None), IntentRow.lease_until < now))
                .values(**values)
                .returning(IntentRow.id))
        with self.session() as s, s.begin():
            claimed = s.scalar(stmt)
            if claimed is None:
                return None
            row = s.get(IntentRow, intent_id, populate_existing=True)
            assert row is not None
            return self._view(s, row)

    def release(self, intent_id: uuid.UUID, worker: str, *, status: Status, now: datetime,
                event: tuple[str, str, dict[str, Any] | None] | None = None, **values: Any) -> bool:
        """Leave the intent in ``status`` with ``values``; only the lease holder may (returns False if lost)."""
        values.update(status=status.value, lease_until=None, leased_by=None, updated_at=now)
        if status in (Status.succeeded, Status.failed, Status.cancelled):
            values.setdefault("finished_at", now)
            values.setdefault("next_attempt_at", None)
        with self.session() as s, s.begin():
            result = s.execute(update(IntentRow)
                               .where(IntentRow.id == intent_id, IntentRow.leased_by == worker)
                               .values(**values))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                return False
            if event:
                s.add(EventRow(intent_id=intent_id, at=now, kind=event[0], message=event[1], data=event[2]))
            return True

    def update_intent(self, intent_id: uuid.UUID, **values: Any) -> None:
        with self.session() as s, s.begin():
            s.execute(update(IntentRow).where(IntentRow.id == intent_id).values(**values))

    def add_event(self, intent_id: uuid.UUID, kind: str, message: str, *, at: datetime,
                  actor: str | None = None, data: dict[str, Any] | None = None) -> None:
        with self.session() as s, s.begin():
            s.add(EventRow(intent_id=intent_id, at=at, kind=kind, message=message, actor=actor, data=data))

    # -- attempts and tickets ------------------------------------------------------------------

    def begin_attempt(self, intent_id: uuid.UUID, *, number: int | None, op: str, method: str, path: str,
                      request: dict[str, Any] | None, worker: str, now: datetime) -> int:
        """Record an exchange before it is sent, so a lost answer leaves a trace to reconcile."""
        with self.session() as s, s.begin():
            row = AttemptRow(intent_id=intent_id, number=number, op=op, method=method, path=path[:500],
                             request=request, worker=worker, started_at=now)
            s.add(row)
            s.flush()
            return row.id

    def finish_attempt(self, attempt_id: int, **values: Any) -> None:
        if "response_excerpt" in values:
            values["response_excerpt"] = excerpt(values["response_excerpt"])
        if values.get("error_message"):
            values["error_message"] = excerpt(values["error_message"])
        with self.session() as s, s.begin():
            s.execute(update(AttemptRow).where(AttemptRow.id == attempt_id).values(**values))

    def has_unfinished_create(self, intent_id: uuid.UUID) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(exists().where(
                AttemptRow.intent_id == intent_id, AttemptRow.op == "create",
                or_(AttemptRow.verdict.is_(None), AttemptRow.verdict == "unknown")))))

    def record_ticket(self, intent: IntentView, *, provider_id: str, number: str | None, url: str | None,
                      department: str | None, now: datetime) -> None:
        with self.session() as s, s.begin():
            try:
                with s.begin_nested():
                    s.add(TicketRow(intent_id=intent.id, target=intent.target, provider=intent.provider.value,
                                    provider_ticket_id=provider_id, number=number, url=url,
                                    department=department, created_at=now))
            except IntegrityError:  # already recorded (a redelivery after the ticket was stored)
                pass

    def ticket_of(self, intent_id: uuid.UUID) -> TicketView | None:
        with self.session() as s:
            row = s.scalar(select(TicketRow).where(TicketRow.intent_id == intent_id))
            return ticket_view(row) if row else None

    # -- scheduler -----------------------------------------------------------------------------

    def take_due(self, *, now: datetime, requeue_after_s: float, paused: Iterable[str],
                 limit: int = 500) -> list[DueIntent]:
        """Due intents whose message may be lost (never published, flushed, or long undelivered).

        Marks them enqueued now, in the same transaction, so a second scheduler skips them.
        """
        stale = now - timedelta(seconds=requeue_after_s)
        query = (select(IntentRow.id, IntentRow.target, IntentRow.status)
                 .where(IntentRow.status.in_([s.value for s in (*DUE_STATUSES, Status.polling)]),
                        IntentRow.next_attempt_at <= now,
                        or_(IntentRow.lease_until.is_(None), IntentRow.lease_until < now),
                        or_(IntentRow.enqueued_at.is_(None), IntentRow.enqueued_at < stale))
                 .order_by(IntentRow.next_attempt_at).limit(limit))
        paused = list(paused)
        if paused:
            query = query.where(IntentRow.target.not_in(paused))
        if self.skip_locked:
            query = query.with_for_update(skip_locked=True, of=IntentRow)
        with self.session() as s, s.begin():
            rows = s.execute(query).all()
            if rows:
                s.execute(update(IntentRow).where(IntentRow.id.in_([r.id for r in rows]))
                          .values(enqueued_at=now))
            return [DueIntent(r.id, r.target, Status(r.status)) for r in rows]

    def recover_expired_leases(self, *, now: datetime, limit: int = 500) -> list[uuid.UUID]:
        """Intents whose worker died mid-send go back to ``waiting``; a begun create is reconciled."""
        query = (select(IntentRow.id).where(IntentRow.status == Status.sending.value,
                                            IntentRow.lease_until < now).limit(limit))
        if self.skip_locked:
            query = query.with_for_update(skip_locked=True)
        with self.session() as s, s.begin():
            ids = list(s.scalars(query))
            for intent_id in ids:
                unfinished = s.scalar(select(exists().where(
                    AttemptRow.intent_id == intent_id, AttemptRow.op == "create",
                    AttemptRow.verdict.is_(None))))
                s.execute(update(IntentRow).where(IntentRow.id == intent_id, IntentRow.status == "sending")
                          .values(status=Status.waiting.value, lease_until=None, leased_by=None,
                                  next_attempt_at=now, enqueued_at=None, updated_at=now,
                                  needs_reconcile=IntentRow.needs_reconcile | bool(unfinished)))
                s.execute(update(AttemptRow).where(AttemptRow.intent_id == intent_id,
                                                   AttemptRow.verdict.is_(None))
                          .values(verdict="unknown", error_code="worker_lost",
                                  error_message="the worker was lost before the answer was recorded",
                                  finished_at=now))
                s.add(EventRow(intent_id=intent_id, at=now, kind="recovered",
                               message="lease expired (worker lost); picked up again"
                               + (", reconciling first" if unfinished else "")))
            return ids

    # -- targets -------------------------------------------------------------------------------

    def target_states(self) -> dict[str, TargetStateRow]:
        with self.session() as s:
            return {r.name: r for r in s.scalars(select(TargetStateRow))}

    def paused_targets(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(TargetStateRow.name).where(TargetStateRow.paused.is_(True))))

    def set_target_state(self, name: str, *, now: datetime, **values: Any) -> None:
        with self.session() as s, s.begin():
            row = s.get(TargetStateRow, name, with_for_update=not is_sqlite(self.engine))
            if row is None:
                row = TargetStateRow(name=name, paused=False)
                s.add(row)
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = now

    def make_due(self, *, target: str, now: datetime) -> int:
        """Every waiting or polling intent of the target is due now (and its message presumed lost)."""
        waiting = [Status.queued.value, Status.waiting.value, Status.polling.value]
        with self.session() as s, s.begin():
            result = s.execute(update(IntentRow).where(IntentRow.target == target, IntentRow.status.in_(waiting))
                               .values(next_attempt_at=now, enqueued_at=None, updated_at=now))
            return int(result.rowcount)  # type: ignore[attr-defined]

    def queue_stats(self, now: datetime) -> dict[str, dict[str, Any]]:
        """Per target: intents not yet terminal and the oldest one's age."""
        open_statuses = [s.value for s in (Status.queued, Status.waiting, Status.sending, Status.polling)]
        with self.session() as s:
            rows = s.execute(select(IntentRow.target, func.count(), func.min(IntentRow.created_at))
                             .where(IntentRow.status.in_(open_statuses)).group_by(IntentRow.target))
            out: dict[str, dict[str, Any]] = {}
            for target, count, oldest in rows:
                if oldest is not None and oldest.tzinfo is None:
                    from datetime import UTC

                    oldest = oldest.replace(tzinfo=UTC)
                out[target] = {"open": count, "oldest_age_s": (now - oldest).total_seconds() if oldest else None}
            return out


