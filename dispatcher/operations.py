"""Operator use cases: find, retry (with edits), cancel, repoll, pause and resume.

Every action is recorded twice: in ``operator_actions`` (the audit table: who, when, what) and
as an event on the intent's timeline. Retries keep the history and the idempotency guarantees:
an intent whose earlier create may have made a ticket is reconciled before anything is sent, and
an intent whose NocWorx task timed out is polled again, never re-submitted.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, func, or_, select

from dispatcher.domain import IntentView, Status
from dispatcher.errors import DispatcherError, FieldProblem, IntentInvalid, UnknownIntent
from dispatcher.queue import DISPATCH, POLL
from dispatcher.service import Dispatcher
from dispatcher.store.repo import intent_view
from dispatcher.store.tables import AttemptRow, EventRow, IntentRow, OperatorActionRow, TicketRow

#: fields an operator may change before a retry (the ones that cause final failures)
EDITABLE = ("subject", "body", "department", "topic", "category", "service", "priority", "critical_reason", "cc")


class OperationRefused(DispatcherError):
    """The operation does not apply to this intent in its current state."""


@dataclass(frozen=True)
class IntentFilter:
    """What ``intents list`` and bulk retry select; every field narrows."""

    status: tuple[str, ...] = ()
    target: str | None = None
    provider: str | None = None
    source: str | None = None
    since: datetime | None = None
    error_code: str | None = None
    group_key: str | None = None
    text: str | None = None
    ids: tuple[uuid.UUID, ...] = field(default_factory=tuple)

    def problems(self) -> list[FieldProblem]:
        bad = [s for s in self.status if s not in Status.__members__]
        return [FieldProblem("status", f"unknown status {b!r}; one of {', '.join(Status.__members__)}") for b in bad]


def _possibly_delivered_create() -> Any:
    """A create attempt that may have reached the provider without us seeing the ticket."""
    return exists().where(
        AttemptRow.intent_id == IntentRow.id, AttemptRow.op == "create",
        or_(AttemptRow.verdict.is_(None), AttemptRow.verdict == "unknown",
            AttemptRow.status_code.is_(None), AttemptRow.status_code.in_([500, 502, 504])))


class Operations:
    """The operator's commands, shared by the CLI and the HTTP API."""

    def __init__(self, service: Dispatcher) -> None:
        self.service = service
        self.store = service.store

    # -- finding ---------------------------------------------------------------------------------

    def find(self, flt: IntentFilter, *, limit: int = 50, before: uuid.UUID | None = None) -> list[IntentView]:
        """Newest first; ``before`` is the cursor (the last id of the previous page)."""
        problems = flt.problems()
        if problems:
            raise IntentInvalid(problems)
        query = select(IntentRow).order_by(IntentRow.id.desc()).limit(limit)
        if flt.ids:
            query = query.where(IntentRow.id.in_(flt.ids))
        if flt.status:
            query = query.where(IntentRow.status.in_(flt.status))
        for column, value in ((IntentRow.target, flt.target), (IntentRow.provider, flt.provider),
                              (IntentRow.source, flt.source), (IntentRow.last_error_code, flt.error_code),
                              (IntentRow.group_key, flt.group_key)):
            if value is not None:
                query = query.where(column == value)
        if flt.since is not None:
            query = query.where(IntentRow.created_at >= flt.since)
        if flt.text:
            query = query.where(func.lower(IntentRow.subject).contains(flt.text.lower(), autoescape=True))
        if before is not None:
            query = query.where(IntentRow.id < before)
        with self.store.session() as s:
            rows = s.scalars(query).all()
            tickets = {t.intent_id: t for t in s.scalars(
                select(TicketRow).where(TicketRow.intent_id.in_([r.id for r in rows])))} if rows else {}
            return [intent_view(r, tickets.get(r.id)) for r in rows]

    def find_all(self, flt: IntentFilter, *, cap: int = 10_000) -> list[IntentView]:
        out: list[IntentView] = []
        before: uuid.UUID | None = None
        while len(out) < cap:
            page = self.find(flt, limit=min(500, cap - len(out)), before=before)
            out.extend(page)
            if len(page) < 500:
                break
            before = page[-1].id
        return out

    # -- acting ----------------------------------------------------------------------------------

    def _audit(self, s: Any, *, actor: str, action: str, now: datetime, intent_id: uuid.UUID | None = None,
               target: str | None = None, reason: str | None = None, details: dict[str, Any] | None = None,
               event: str | None = None) -> None:
        s.add(OperatorActionRow(at=now, actor=actor, action=action, intent_id=intent_id, target=target,
                                reason=reason, details=details))
        if intent_id is not None and event:
            s.add(EventRow(intent_id=intent_id, at=now, kind=action, actor=actor, message=event, data=details))

    def _row(self, s: Any, intent_id: uuid.UUID) -> IntentRow:
        row = s.get(IntentRow, intent_id, with_for_update=self.store.skip_locked)
        if row is None:
            raise UnknownIntent(f"no intent {intent_id}")
        return row  # type: ignore[no-any-return]

    def retry(self, intent_id: uuid.UUID, *, actor: str, edits: dict[str, Any] | None = None,
              reason: str | None = None) -> IntentView:
        """Send a failed (or cancelled) intent again, after optional edits; history is kept."""
        now = self.service.clock()
        edits = dict(edits or {})
        unknown = sorted(set(edits) - set(EDITABLE))
        if unknown:
            raise IntentInvalid([FieldProblem(k, f"cannot be edited; editable: {', '.join(EDITABLE)}")
                                 for k in unknown])
        with self.store.session() as s, s.begin():
            row = self._row(s, intent_id)
            if row.status not in (Status.failed.value, Status.cancelled.value):
                raise OperationRefused(f"intent {intent_id} is {row.status}: only failed or cancelled intents "
                                       "can be retried")
            if row.task_uuid and row.last_error_code == "task_timeout":
                if edits:
                    raise OperationRefused(f"intent {intent_id}'s NocWorx task may still make its ticket: poll it "
                                           "again (repoll) instead of editing and re-sending")
                view = self._repoll_row(s, row, actor=actor, now=now, reason=reason)
                task = POLL
            else:
                view = self._retry_row(s, row, edits, actor=actor, now=now, reason=reason)
                task = DISPATCH
        self.service.publish(task, [(view.id, view.target)])
        return view

    def _retry_row(self, s: Any, row: IntentRow, edits: dict[str, Any], *, actor: str, now: datetime,
                   reason: str | None) -> IntentView:
        before = {k: getattr(row, k) for k in EDITABLE}
        if edits:
            self._apply_edits(row, edits)
        maybe_ticket = bool(s.scalar(select(_possibly_delivered_create().where(IntentRow.id == row.id))))
        row.status = Status.queued.value
        row.attempts = 0
        row.deliveries = 0
        row.next_attempt_at = now
        row.enqueued_at = now
        row.finished_at = None
        row.lease_until = None
        row.leased_by = None
        row.needs_reconcile = maybe_ticket
        row.task_uuid = row.poll_path = None
        row.poll_deadline = None
        row.updated_at = now
        if edits:
            row.resolved_department = row.resolved_category = None
        changed = {k: {"from": before[k], "to": getattr(row, k)} for k in edits}
        text = f"retried by {actor}" + (f" ({reason})" if reason else "")
        if changed:
            text += "; edited " + ", ".join(f"{k}: {v['from']!r} → {v['to']!r}" for k, v in changed.items())
        if maybe_ticket:
            text += "; an earlier create may have made a ticket, so it is reconciled first"
        self._audit(s, actor=actor, action="retry", now=now, intent_id=row.id, target=row.target,
                    reason=reason, details={"edits": changed} if changed else None, event=text)
        return intent_view(row)

    def _apply_edits(self, row: IntentRow, edits: dict[str, Any]) -> None:
        current: dict[str, Any] = {
            "target": row.target, "subject": row.subject, "body": row.body, "priority": row.priority,
            "topic": row.topic, "department": row.department, "category": row.category, "service": row.service,
            "cc": row.cc, "critical_reason": row.critical_reason, "labels": row.labels,
        }
        merged = {k: v for k, v in {**current, **edits}.items() if v is not None and v != []}
        intent, _ = self.service.validate(merged)  # the same checks as intake, naming the field
        row.subject, row.body, row.priority = intent.subject, intent.body, intent.priority.value
        row.topic, row.department, row.category = intent.topic, intent.department, intent.category
        row.service = intent.service.model_dump() if intent.service else None
        row.cc = [str(c) for c in intent.cc]
        row.critical_reason = intent.critical_reason

    def cancel(self, intent_id: uuid.UUID, *, actor: str, reason: str | None = None) -> IntentView:
        """Stop an intent that has not been sent."""
        now = self.service.clock()
        with self.store.session() as s, s.begin():
            row = self._row(s, intent_id)
            if row.status not in (Status.queued.value, Status.waiting.value):
                raise OperationRefused(f"intent {intent_id} is {row.status}: only queued or waiting intents "
                                       "can be cancelled")
            if row.lease_until is not None and row.lease_until > now:
                raise OperationRefused(f"intent {intent_id} is being sent right now; try again in a moment")
            if s.scalar(select(_possibly_delivered_create().where(IntentRow.id == row.id))):
                raise OperationRefused(f"intent {intent_id} may already have made a ticket (a create went unanswered);"
                                       " it will be reconciled, not cancelled")
            row.status = Status.cancelled.value
            row.finished_at = row.updated_at = now
            row.next_attempt_at = None
            row.last_error_code = "cancelled"
            row.last_error_message = f"cancelled by {actor}" + (f": {reason}" if reason else "")
            self._audit(s, actor=actor, action="cancel", now=now, intent_id=row.id, target=row.target,
                        reason=reason, event=row.last_error_message)
            return intent_view(row)

    def repoll(self, intent_id: uuid.UUID, *, actor: str, reason: str | None = None) -> IntentView:
        """Poll a NocWorx task again after its deadline passed (it is never submitted again)."""
        now = self.service.clock()
        with self.store.session() as s, s.begin():
            row = self._row(s, intent_id)
            if row.status != Status.failed.value or not row.task_uuid or not row.poll_path:
                raise OperationRefused(f"intent {intent_id} has no task to poll again (status {row.status})")
            view = self._repoll_row(s, row, actor=actor, now=now, reason=reason)
        self.service.publish(POLL, [(view.id, view.target)])
        return view

    def _repoll_row(self, s: Any, row: IntentRow, *, actor: str, now: datetime, reason: str | None) -> IntentView:
        target = self.service.config.targets.get(row.target)
        deadline_s = target.poll_deadline_s if target else 900.0
        row.status = Status.polling.value
        row.poll_deadline = now + timedelta(seconds=deadline_s)
        row.next_attempt_at = row.enqueued_at = row.updated_at = now
        row.finished_at = None
        row.lease_until = None
        row.leased_by = None
        self._audit(s, actor=actor, action="repoll", now=now, intent_id=row.id, target=row.target, reason=reason,
                    event=f"polling task {row.task_uuid} again for up to {deadline_s:g} s (by {actor})")
        return intent_view(row)

    def pause(self, target: str, *, actor: str, reason: str) -> None:
        self._known_target(target)
        now = self.service.clock()
        self.service.pause_target(target, actor=actor, reason=reason)
        with self.store.session() as s, s.begin():
            self._audit(s, actor=actor, action="pause", now=now, target=target, reason=reason)

    def resume(self, target: str, *, actor: str) -> int:
        self._known_target(target)
        now = self.service.clock()
        count = self.service.resume_target(target, actor=actor)
        with self.store.session() as s, s.begin():
            self._audit(s, actor=actor, action="resume", now=now, target=target,
                        details={"intents_due": count})
        return count

    def _known_target(self, target: str) -> None:
        if target not in self.service.config.targets:
            known = ", ".join(sorted(self.service.config.targets)) or "(none)"
            raise IntentInvalid([FieldProblem("target", f"unknown target '{target}'; configured: {known}")])

    def audit_log(self, *, intent_id: uuid.UUID | None = None, limit: int = 100) -> list[OperatorActionRow]:
        query = select(OperatorActionRow).order_by(OperatorActionRow.id.desc()).limit(limit)
        if intent_id is not None:
            query = query.where(OperatorActionRow.intent_id == intent_id)
        with self.store.session() as s:
            return list(s.scalars(query))

    def prune(self, *, older_than_days: float) -> int:
        """Delete attempts (and their request/response excerpts) older than the retention age.

        Intents, tickets, events and the audit log are kept: the story stays, the bulk goes.
        """
        cutoff = self.service.clock() - timedelta(days=older_than_days)
        with self.store.session() as s, s.begin():
            result = s.execute(delete(AttemptRow).where(AttemptRow.started_at < cutoff,
                                                        AttemptRow.finished_at.is_not(None)))
            return int(result.rowcount)  # type: ignore[attr-defined]

