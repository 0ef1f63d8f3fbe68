"""The one seam between the service and the database.

Every method is one short transaction; none is held open across an HTTP call. Claims are
conditional UPDATEs (``... WHERE status IN (...) AND next_attempt_at <= now``) so that a message
delivered twice, or two schedulers, cannot both win: the second finds nothing to do. On PostgreSQL
the worker's writes (the claim, an attempt's record, the release) are single statements run in
autocommit on psycopg's connection (:mod:`dispatcher.store.driver`): one statement is atomic by
itself, and BEGIN and COMMIT would be two more round trips each.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    JSON,
    ColumnElement,
    Connection,
    Engine,
    Table,
    and_,
    any_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy import cast as cast_to
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.domain import (
    DUE_STATUSES,
    Action,
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
from dispatcher.health import STALE_AFTER_S, HeartbeatView, Liveness, liveness
from dispatcher.store.db import is_sqlite
from dispatcher.store.driver import DriverStatement, StatementHook, execute_one
from dispatcher.store.tables import AttemptRow, EventRow, HeartbeatRow, IntentRow, TargetStateRow, TicketRow

EXCERPT_MAX = 2000
#: a successful answer is kept shorter: what matters in it (ticket id and number, task uuid, request
#: id) is in columns of its own, and it is most of an attempt's size (README, Benchmarks: bytes per intent)
SUCCESS_EXCERPT_MAX = 512
#: rows per statement in bulk inserts and id look-ups (below every driver's parameter limits)
BULK_CHUNK = 5000
#: publishers' clocks may differ this much from the scheduler's (see ``take_due``)
PUBLISH_CLOCK_SLACK_S = 1.0
#: the temporary table a Postgres bulk insert stages its rows in (dropped at commit)
STAGING_TABLE = "dispatcher_staged_intents"


#: a create or reply on record that may have made something at the provider: an exchange never
#: finished, an unknown outcome, a 201/202 whose result was not applied, a dropped answer or a
#: 500/502/504. Only a clean refusal (a final 4xx, a 429, a 503) proves nothing was made.
_MAYBE_MADE = and_(
    AttemptRow.op.in_(("create", "reply")),
    or_(AttemptRow.verdict.is_(None), AttemptRow.verdict.in_(("unknown", "done", "poll")),
        and_(AttemptRow.verdict == "retry",
             or_(AttemptRow.status_code.is_(None), AttemptRow.status_code.in_((500, 502, 504))))))


# -- the worker's hot path: statements built once --------------------------------------------------
# Building a statement (and its cache key) costs more CPU than running it; these are built once and
# executed with parameters. Parameters named after a column set it (UPDATE ... SET, INSERT values);
# ``b_*`` parameters are the WHERE clause's.
_INTENTS = cast(Table, IntentRow.__table__)
_ATTEMPTS = cast(Table, AttemptRow.__table__)
_EVENTS = cast(Table, EventRow.__table__)
_STATES = cast(Table, TargetStateRow.__table__)
_CLAIMS: dict[frozenset[str], Any] = {}


def _claim_statement(statuses: frozenset[str]) -> Any:
    """The claim for one set of statuses (a worker uses two: due for dispatch, polling for polls);
    the statuses are written into the statement, not expanded into it at every execution."""
    stmt = _CLAIMS.get(statuses)
    if stmt is None:
        # The conditions are tested as one boolean (``(...) IS true``) so that PostgreSQL can only
        # find the row by its primary key and check them on it. Written plainly, a status the
        # statistics see as rare ("polling", while a batch is still queued) made the (status,
        # next_attempt_at) index look cheaper, and every claim walked all due intents of that status
        # (tests/integration/test_claim_plan.py builds that case).
        claimable = and_(or_(*[_INTENTS.c.status == status for status in sorted(statuses)]),
                         _INTENTS.c.next_attempt_at <= bindparam("b_now"),
                         or_(_INTENTS.c.lease_until.is_(None), _INTENTS.c.lease_until < bindparam("b_now")))
        stmt = (update(_INTENTS)
                .where(_INTENTS.c.id == bindparam("b_id"), claimable.is_(true()))
                .values(deliveries=_INTENTS.c.deliveries + 1)
                .returning(*_INTENTS.c, select(_STATES.c.paused)
                           .where(_STATES.c.name == _INTENTS.c.target, _STATES.c.paused.is_(True))
                           .exists().label("target_paused")))
        _CLAIMS[statuses] = stmt
    return stmt


_UPDATE_LEASED = update(_INTENTS).where(_INTENTS.c.id == bindparam("b_id"),
                                        _INTENTS.c.leased_by == bindparam("b_worker"))


def _binds(table: Table, prefix: str, keys: Iterable[str]) -> dict[str, Any]:
    """``{column: bindparam(prefix + column)}``, typed as the column (its bind processing applies)."""
    return {k: bindparam(prefix + k, type_=table.c[k].type) for k in keys}


#: an exchange's record as the worker writes it before the send (every column given: the same
#: statement on SQLAlchemy's execution and on the driver), parameters ``v_<column>``
_ATTEMPT_COLUMNS = ("intent_id", "number", "op", "method", "path", "request", "worker", "started_at")
_RECORD_ATTEMPT = insert(_ATTEMPTS).values(_binds(_ATTEMPTS, "v_", _ATTEMPT_COLUMNS)).returning(_ATTEMPTS.c.id)
_UPDATE_ATTEMPT = update(_ATTEMPTS).where(_ATTEMPTS.c.id == bindparam("b_id"))
_INSERT_EVENT = insert(_EVENTS)
_TICKETS = cast(Table, TicketRow.__table__)
_EVENT_COLUMNS = ("intent_id", "at", "kind", "message", "actor", "data")
#: a release's shape (which attempts, events, ticket and intent fields it writes) -> its statement
_RELEASES: dict[tuple[Any, ...], Any] = {}


def _event_values(intent_id: uuid.UUID, at: datetime, kind: str, message: str,
                  data: dict[str, Any] | None = None) -> dict[str, Any]:
    """An ``events`` row written by the worker's path (no actor: the system did it)."""
    return {"intent_id": intent_id, "at": at, "kind": kind, "message": message, "actor": None, "data": data}


def _release_statement(shape: tuple[Any, ...]) -> Any:
    """A release as ONE statement (PostgreSQL): the pending attempts' completions, the pending
    events, the ticket and the intent's new state as data-modifying CTEs, the release's own event
    only if the lease was still held; it returns how many intents it released (0: lease lost).

    The same writes the transaction of :meth:`Store.release` makes, in one round trip instead of
    one per statement plus BEGIN and COMMIT; all or none, as a statement is."""
    attempt_keys, events, ticket_keys, intent_keys, with_event = shape
    held = (update(_INTENTS)
            .where(_INTENTS.c.id == bindparam("b_id"), _INTENTS.c.leased_by == bindparam("b_worker"))
            .values(_binds(_INTENTS, "i_", intent_keys)).returning(_INTENTS.c.id).cte("held"))
    writes = [update(_ATTEMPTS).where(_ATTEMPTS.c.id == bindparam(f"a{n}_b_id"))
              .values(_binds(_ATTEMPTS, f"a{n}_", keys)).cte(f"attempt{n}")
              for n, keys in enumerate(attempt_keys)]
    if ticket_keys is not None:
        writes.append(_INSERT_TICKET["postgresql"].values(_binds(_TICKETS, "t_", ticket_keys)).cte("ticket"))
    # the events in one INSERT, in order (their ids are the audit trail's order): the pending ones
    # always, the release's own only if the lease was held. Cast: a SELECT's parameters get no type
    # from the columns they go to.
    def event_row(n: int, prefix: str) -> Any:
        return select(literal_column(str(n)).label("n"),
                      *[cast_to(bindparam(prefix + k, type_=_EVENTS.c[k].type), _EVENTS.c[k].type).label(k)
                        for k in _EVENT_COLUMNS])

    rows = [event_row(n, f"e{n}_") for n in range(events)]
    if with_event:
        rows.append(event_row(events, "r_").select_from(held))
    if rows:
        every = union_all(*rows).subquery("new_events") if len(rows) > 1 else rows[0].subquery("new_events")
        ordered = select(*[every.c[k] for k in _EVENT_COLUMNS]).order_by(every.c.n)
        writes.append(insert(_EVENTS).from_select(list(_EVENT_COLUMNS), ordered).cte("events"))
    return select(func.count()).select_from(held).add_cte(*writes)


_INSERT_TICKET = {
    "postgresql": pg_insert(_TICKETS).on_conflict_do_nothing(),
    "sqlite": sqlite_insert(_TICKETS).on_conflict_do_nothing(),
}


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
        action=Action(row.action or Action.create.value), group_id=row.group_id, group_seq=row.group_seq,
        payload=dict(row.payload) if row.payload else None,
    )


@dataclass
class _Pending:
    """A thread's writes waiting for its next transaction (:meth:`Store.deferring`)."""

    attempts: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    intents: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)


class LeaseLost(Exception):
    """This process no longer holds the intent's lease (it expired and the intent was recovered): stop."""


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
        self._local = threading.local()
        # PostgreSQL: the hot path's single statements run on the driver (see dispatcher.store.driver)
        self._on_driver = not is_sqlite(engine)
        self._compiled: dict[tuple[Any, ...], DriverStatement] = {}
        #: called with the SQL of each statement run on the driver (benchmarks and tests count them)
        self.driver_hook: StatementHook | None = None

    # -- plumbing ------------------------------------------------------------------------------

    def session(self) -> Session:
        return self.sessions()

    def _one_statement(self, statement: Any, params: Mapping[str, Any]) -> Any:
        """Run ONE write statement as its own transaction; its first row (its value when it returns
        one column), None when there is none. On PostgreSQL in autocommit on the driver (no BEGIN and
        COMMIT round trips, none of SQLAlchemy's execution); ``statement`` must be built once (a
        module-level or cached statement: it is compiled once per set of parameter names, and found
        by identity)."""
        if not self._on_driver:
            with self.engine.begin() as conn:
                row = conn.execute(statement, params).first()
            return None if row is None else (row[0] if len(row) == 1 else row)
        key = (id(statement), *params)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = DriverStatement.compile(statement, self.engine.dialect, params)
        return execute_one(self.engine, compiled, params, self.driver_hook)

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
        """Existing ids for (target, idempotency key) pairs: replays in a batch.

        Asked per target, so each look-up is a range of the unique (target, key) index.
        """
        by_target: dict[str, list[str]] = {}
        for target, key in pairs:
            by_target.setdefault(target, []).append(key)
        found: dict[tuple[str, str], uuid.UUID] = {}
        with self.session() as s:
            for target, keys in by_target.items():
                unique = list(dict.fromkeys(keys))
                for start in range(0, len(unique), BULK_CHUNK):
                    rows = s.execute(select(IntentRow.idempotency_key, IntentRow.id)
                                     .where(IntentRow.target == target,
                                            self._among(IntentRow.idempotency_key, unique[start:start + BULK_CHUNK])))
                    found.update({(target, key): id_ for key, id_ in rows if key is not None})
        return found

    def _among(self, column: Any, values: list[Any]) -> ColumnElement[bool]:
        """``column IN (values)``; on Postgres ``= ANY(one array)``: the driver parses a statement with
        thousands of placeholders for tens of milliseconds, every time."""
        if is_sqlite(self.engine):
            return cast(ColumnElement[bool], column.in_(values))
        return cast(ColumnElement[bool], column == any_(bindparam(None, values, type_=ARRAY(column.type))))

    def mark_not_enqueued(self, ids: Sequence[uuid.UUID]) -> None:
        """Publishing failed: let the scheduler pick these up at once."""
        with self.session() as s, s.begin():
            s.execute(update(IntentRow).where(IntentRow.id.in_(ids)).values(enqueued_at=None))

    def insert_intents_bulk(self, rows: Sequence[dict[str, Any]],
                            events: Sequence[dict[str, Any]]) -> set[uuid.UUID]:
        """Insert many intents and their events in ONE transaction; return the ids inserted.

        A row whose (target, idempotency key) was committed meanwhile by someone else is skipped
        (``ON CONFLICT DO NOTHING``), and so is its event: the caller reports it as a replay of the
        winner. Any other failure rolls the whole batch back. On Postgres the rows go in by COPY into
        a temporary table and one ``INSERT ... SELECT``: multi-row INSERTs spend most of their time
        in the driver parsing the huge statements (see bench/intake.py).
        """
        if not rows:
            return set()
        with self.engine.begin() as conn:
            bulk = _insert_many_sqlite if is_sqlite(self.engine) else _copy_insert_intents
            inserted = bulk(conn, rows)
            kept = [e for e in events if e["intent_id"] in inserted]
            if kept and is_sqlite(self.engine):
                for at in range(0, len(kept), BULK_CHUNK):
                    conn.execute(insert(_table(EventRow)), kept[at:at + BULK_CHUNK])
            elif kept:
                _copy_rows(conn, _table(EventRow), kept)
        return inserted

    def outcomes(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[Status, str | None]]:
        """Each intent's status and ticket id (the provider's), for batch summaries and waits."""
        out: dict[uuid.UUID, tuple[Status, str | None]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), BULK_CHUNK):
                chunk = list(ids[start:start + BULK_CHUNK])
                rows = conn.execute(select(IntentRow.id, IntentRow.status, TicketRow.provider_ticket_id)
                                    .outerjoin(TicketRow, TicketRow.intent_id == IntentRow.id)
                                    .where(self._among(IntentRow.id, chunk)))
                for intent_id, status, ticket in rows:
                    out[intent_id] = (Status(status), ticket)
        return out

    # -- reads ---------------------------------------------------------------------------------

    def _view(self, s: Session, row: IntentRow, with_attempts: bool = False) -> IntentView:
        ticket = s.scalar(select(TicketRow).where(TicketRow.intent_id == row.id))
        if ticket is None and row.payload and row.payload.get("ticket"):
            # a group follow-up: it made no ticket, it went to the group's
            ticket = s.scalar(select(TicketRow).where(TicketRow.target == row.target,
                                                      TicketRow.provider_ticket_id == str(row.payload["ticket"])))
        attempts: Sequence[AttemptRow] = ()
        if with_attempts:
            attempts = s.scalars(select(AttemptRow).where(AttemptRow.intent_id == row.id)
                                 .order_by(AttemptRow.id)).all()
        return intent_view(row, ticket, attempts)

    def view_of(self, row: IntentRow) -> IntentView:
        """The view of a row this process just committed, as committed: not re-read.

        ``accept`` answers with the intent as accepted (``queued``); re-reading it after the
        publish races the worker, which may already have it ``sending``. Only a group follow-up
        can already point at a ticket, so only then is one looked up.
        """
        if not (row.payload and row.payload.get("ticket")):
            return intent_view(row)
        with self.session() as s:
            return self._view(s, row)

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
        claimed = self.claim_due(intent_id, statuses=statuses, to=to, now=now, lease_s=lease_s, worker=worker)
        return claimed[0] if claimed else None

    def claim_due(self, intent_id: uuid.UUID, *, statuses: Iterable[Status], to: Status, now: datetime,
                  lease_s: float, worker: str) -> tuple[IntentView, bool] | None:
        """:meth:`claim`, and whether the intent's target is paused, in one statement (the hot path:
        a worker asks both for every message). The view carries no ticket: a claimable intent has
        none of its own, and nothing on the dispatch path reads it."""
        params = {"b_id": intent_id, "b_now": now,
                  "lease_until": now + timedelta(seconds=lease_s), "leased_by": worker, "updated_at": now,
                  "status": to.value}
        row = self._one_statement(_claim_statement(frozenset(s.value for s in statuses)), params)
        if row is None:
            return None
        return intent_view(cast(Any, row)), bool(row.target_paused)

    def release(self, intent_id: uuid.UUID, worker: str, *, status: Status, now: datetime,
                event: tuple[str, str, dict[str, Any] | None] | None = None,
                ticket: dict[str, Any] | None = None, keep_lease_s: float | None = None, **values: Any) -> bool:
        """Leave the intent in ``status`` with ``values``; only the lease holder may (returns False if lost).

        ``keep_lease_s``: write the same, but keep the lease for that many seconds more (the worker
        goes on with the intent: a NocWorx task's first look, :meth:`Dispatcher._start_polling`).

        ``ticket``: the ticket the intent made, recorded in the same transaction whether or not the
        lease is still held (the ticket exists at the provider either way; a redelivery that finds it
        recorded already changes nothing).
        """
        lease: dict[str, Any] = {"lease_until": None, "leased_by": None} if keep_lease_s is None \
            else {"lease_until": now + timedelta(seconds=keep_lease_s)}
        values = {**self._pending_values(intent_id), **values, "status": status.value, **lease, "updated_at": now}
        if status in (Status.succeeded, Status.failed, Status.cancelled):
            values.setdefault("finished_at", now)
            values.setdefault("next_attempt_at", None)
        if self._on_driver:
            return self._release_in_one_statement(intent_id, worker, now, values, event, ticket)
        with self.engine.begin() as conn:
            self._flush_pending(conn)
            if ticket is not None:
                self._insert_ticket(conn, {"intent_id": intent_id, "created_at": now, **ticket})
            result = conn.execute(_UPDATE_LEASED, {"b_id": intent_id, "b_worker": worker, **values})
            if result.rowcount == 0:
                return False
            if event:
                conn.execute(_INSERT_EVENT, _event_values(intent_id, now, *event))
            return True

    def _release_in_one_statement(self, intent_id: uuid.UUID, worker: str, now: datetime, values: dict[str, Any],
                                  event: tuple[str, str, dict[str, Any] | None] | None,
                                  ticket: dict[str, Any] | None) -> bool:
        """:meth:`release` on PostgreSQL: its writes (and this thread's pending ones) in one statement."""
        pending: _Pending | None = getattr(self._local, "pending", None)
        attempts = list(pending.attempts) if pending is not None else []
        events = list(pending.events) if pending is not None else []
        ticket_values = {"intent_id": intent_id, "created_at": now, **ticket} if ticket is not None else None
        shape = (tuple(tuple(sorted(v)) for _, v in attempts), len(events),
                 tuple(sorted(ticket_values)) if ticket_values is not None else None, tuple(sorted(values)),
                 event is not None)
        stmt = _RELEASES.get(shape)
        if stmt is None:
            stmt = _RELEASES[shape] = _release_statement(shape)
        params: dict[str, Any] = {"b_id": intent_id, "b_worker": worker}
        params.update({f"i_{k}": v for k, v in values.items()})
        for n, (attempt_id, done) in enumerate(attempts):
            params[f"a{n}_b_id"] = attempt_id
            params.update({f"a{n}_{k}": v for k, v in done.items()})
        for n, row in enumerate(events):
            params.update({f"e{n}_{k}": row[k] for k in _EVENT_COLUMNS})
        if ticket_values is not None:
            params.update({f"t_{k}": v for k, v in ticket_values.items()})
        if event is not None:
            params.update({f"r_{k}": v for k, v in _event_values(intent_id, now, *event).items()})
        released = self._one_statement(stmt, params)
        if pending is not None:
            pending.attempts.clear()
            pending.events.clear()
        return bool(released)

    def _insert_ticket(self, conn: Connection, values: dict[str, Any]) -> None:
        """Insert a ticket row unless the intent's ticket (or this provider ticket) is recorded already."""
        conn.execute(_INSERT_TICKET[self.engine.dialect.name], values)

    def update_intent(self, intent_id: uuid.UUID, **values: Any) -> None:
        with self.session() as s, s.begin():
            s.execute(update(IntentRow).where(IntentRow.id == intent_id).values(**values))

    def add_event(self, intent_id: uuid.UUID, kind: str, message: str, *, at: datetime,
                  actor: str | None = None, data: dict[str, Any] | None = None) -> None:
        with self.session() as s, s.begin():
            s.add(EventRow(intent_id=intent_id, at=at, kind=kind, message=message, actor=actor, data=data))

    # -- attempts and tickets ------------------------------------------------------------------

    def begin_attempt(self, intent_id: uuid.UUID, *, number: int | None, op: str, method: str, path: str,
                      request: dict[str, Any] | None, worker: str, now: datetime,
                      lease_s: float | None = None, intent_values: Mapping[str, Any] | None = None,
                      event: tuple[str, str] | None = None, renew_lease: bool = True) -> int:
        """Record an exchange before it is sent, so a lost answer leaves a trace to reconcile.

        With ``lease_s``: only while ``worker`` still holds the intent's lease, renewed for ``lease_s``
        in the same transaction. A worker presumed dead (its lease expired, the intent was recovered
        and may be with another worker now) must send nothing more for it (:class:`LeaseLost`), and a
        worker busy with many exchanges for one intent (a reconcile reading pages) keeps its lease.
        ``intent_values`` and ``event`` (e.g. the department just resolved, and why) are written in
        the same transaction, under the same lease check. ``renew_lease=False``: the caller took the
        lease moments ago (it cannot have expired), so neither check nor renew it; inside
        :meth:`deferring`, ``intent_values`` and ``event`` then wait for the intent's next write, and
        the record, then one INSERT, commits by itself (the worker's usual case).
        """
        pending: _Pending | None = getattr(self._local, "pending", None)
        checks_lease = lease_s is not None and renew_lease
        record = {"v_intent_id": intent_id, "v_number": number, "v_op": op, "v_method": method,
                  "v_path": path[:500], "v_request": request, "v_worker": worker, "v_started_at": now}
        new_event = None if event is None else _event_values(intent_id, now, *event)
        if pending is not None and not checks_lease:  # the rest waits for the intent's next write
            if intent_values:
                pending.intents.setdefault(intent_id, {}).update(intent_values)
            if new_event is not None:
                pending.events.append(new_event)
            if pending.attempts:  # an earlier exchange's completion goes first, in the same transaction
                with self.engine.begin() as conn:
                    self._write_pending(conn, pending)
                    return int(conn.execute(_RECORD_ATTEMPT, record).scalar_one())
            return int(self._one_statement(_RECORD_ATTEMPT, record))
        with self.engine.begin() as conn:
            self._flush_pending(conn)
            if checks_lease:
                assert lease_s is not None
                changes: dict[str, Any] = {**self._pending_values(intent_id), **(intent_values or {}),
                                           "lease_until": now + timedelta(seconds=lease_s)}
                held = conn.execute(_UPDATE_LEASED, {"b_id": intent_id, "b_worker": worker, **changes})
                if held.rowcount == 0:
                    raise LeaseLost(f"intent {intent_id} is no longer leased by {worker}: not sending")
            elif intent_values:
                conn.execute(_UPDATE_LEASED, {"b_id": intent_id, "b_worker": worker, **intent_values})
            attempt_id = conn.execute(_RECORD_ATTEMPT, record).scalar_one()
            if new_event is not None:
                conn.execute(_INSERT_EVENT, new_event)
            return int(attempt_id)

    def finish_attempt(self, attempt_id: int, **values: Any) -> None:
        """Complete an exchange's record: at once, or (inside :meth:`deferring`) with this thread's next
        write, in its transaction."""
        if "response_excerpt" in values:
            ok = values.get("verdict") in ("done", "poll") and 200 <= (values.get("status_code") or 0) < 300
            values["response_excerpt"] = excerpt(values["response_excerpt"], SUCCESS_EXCERPT_MAX if ok else EXCERPT_MAX)
        if values.get("error_message"):
            values["error_message"] = excerpt(values["error_message"])
        pending: _Pending | None = getattr(self._local, "pending", None)
        if pending is not None:
            pending.attempts.append((attempt_id, values))
            return
        with self.engine.begin() as conn:
            self._finish_attempts(conn, [(attempt_id, values)])

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """Within: completed exchanges (and intent fields such as the department just resolved) are
        written with this thread's next write, not each in a transaction of its own: the worker's hot
        path, where what follows an answer is always a write (the release), so the record and the
        intent's next state commit together. On the way out, whatever is still pending is written.
        A crash before that leaves the exchange unfinished on record, which is read as "may have
        reached the provider": reconciled, never resent blindly."""
        if getattr(self._local, "pending", None) is not None:  # nested: the outer block flushes
            yield
            return
        self._local.pending = _Pending()
        try:
            yield
        finally:
            pending, self._local.pending = self._local.pending, None
            if pending.attempts or pending.intents or pending.events:
                with self.engine.begin() as conn:
                    self._write_pending(conn, pending)
                    for intent_id, values in pending.intents.items():
                        conn.execute(update(_INTENTS).where(_INTENTS.c.id == intent_id).values(**values))

    def _flush_pending(self, conn: Connection) -> None:
        """This thread's pending completions and events, into the transaction of its next write."""
        pending: _Pending | None = getattr(self._local, "pending", None)
        if pending is not None:
            self._write_pending(conn, pending)

    def _write_pending(self, conn: Connection, pending: _Pending) -> None:
        if pending.attempts:
            self._finish_attempts(conn, pending.attempts)
            pending.attempts.clear()
        if pending.events:
            conn.execute(_INSERT_EVENT, pending.events)
            pending.events.clear()

    def _pending_values(self, intent_id: uuid.UUID) -> dict[str, Any]:
        """Intent fields waiting for this intent's next write (taken: the caller writes them)."""
        pending: _Pending | None = getattr(self._local, "pending", None)
        return pending.intents.pop(intent_id, {}) if pending is not None else {}

    @staticmethod
    def _finish_attempts(conn: Connection, items: list[tuple[int, dict[str, Any]]]) -> None:
        for attempt_id, values in items:
            conn.execute(_UPDATE_ATTEMPT, {"b_id": attempt_id, **values})

    def abandon_attempts(self, intent_id: uuid.UUID, *, now: datetime, error: str) -> bool:
        """An error cut the dispatch short: close its open exchanges as unknown, and say whether any
        create or reply on record may have made something (reconcile before sending again)."""
        with self.session() as s, s.begin():
            self._flush_pending(s.connection())
            s.execute(update(AttemptRow).where(AttemptRow.intent_id == intent_id, AttemptRow.verdict.is_(None))
                      .values(verdict="unknown", error_code="internal", error_message=excerpt(error),
                              finished_at=now))
            return bool(s.scalar(select(exists().where(AttemptRow.intent_id == intent_id, _MAYBE_MADE))))

    def has_unfinished_create(self, intent_id: uuid.UUID) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(exists().where(
                AttemptRow.intent_id == intent_id, AttemptRow.op == "create",
                or_(AttemptRow.verdict.is_(None), AttemptRow.verdict == "unknown")))))

    def first_create_at(self, intent_id: uuid.UUID) -> datetime | None:
        """When the intent's first create that may have made a ticket was sent (a reconcile reads the
        provider's lists back to then), if on record; clean refusals (429, 503, 4xx) do not count."""
        with self.session() as s:
            return s.scalar(select(func.min(AttemptRow.started_at)).where(AttemptRow.intent_id == intent_id,
                                                                          AttemptRow.op == "create", _MAYBE_MADE))

    def ticket_of(self, intent_id: uuid.UUID) -> TicketView | None:
        with self.session() as s:
            row = s.scalar(select(TicketRow).where(TicketRow.intent_id == intent_id))
            return ticket_view(row) if row else None

    # -- scheduler -----------------------------------------------------------------------------

    def take_due(self, *, now: datetime, requeue_after_s: float, paused: Iterable[str],
                 limit: int = 500, waiting_since: Mapping[str, datetime | None] | None = None) -> list[DueIntent]:
        """Due intents whose message may be lost (never published, flushed, or long undelivered).

        Published more than ``requeue_after_s`` ago is not enough when the broker says more: for a
        target in ``waiting_since`` (when the oldest message still waiting in its queue was published;
        None for an empty queue) only intents published before that oldest message count, because a
        FIFO queue has handed out everything older. Without this, every intent of a backlog longer
        than ``requeue_after_s`` would be published again, and again, burying polls and retries
        behind duplicates. Marks them enqueued now, in the same transaction, so a second scheduler
        skips them.
        """
        stale = now - timedelta(seconds=requeue_after_s)
        lost: list[ColumnElement[bool]] = [IntentRow.enqueued_at.is_(None)]
        known = {t: since for t, since in (waiting_since or {}).items() if since is not None}
        for target, since in known.items():
            cutoff = min(stale, since - timedelta(seconds=PUBLISH_CLOCK_SLACK_S))
            lost.append(and_(IntentRow.target == target, IntentRow.enqueued_at < cutoff))
        lost.append(and_(IntentRow.target.not_in(list(known)), IntentRow.enqueued_at < stale) if known
                    else IntentRow.enqueued_at < stale)
        query = (select(IntentRow.id, IntentRow.target, IntentRow.status)
                 .where(IntentRow.status.in_([s.value for s in (*DUE_STATUSES, Status.polling)]),
                        IntentRow.next_attempt_at <= now,
                        or_(IntentRow.lease_until.is_(None), IntentRow.lease_until < now),
                        or_(*lost))
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
        """Intents whose worker died mid-send go back to ``waiting``; one whose create (or reply) may
        have made something is reconciled first.

        "May have made something": an exchange still open (no verdict), an unknown outcome, a 201/202
        recorded whose result the worker died before applying, or a 500/502/504 or dropped answer.
        Only a clean refusal (a final 4xx, a 429/503) proves nothing was made.
        """
        query = (select(IntentRow.id).where(IntentRow.status == Status.sending.value,
                                            IntentRow.lease_until < now).limit(limit))
        if self.skip_locked:
            query = query.with_for_update(skip_locked=True)
        with self.session() as s, s.begin():
            ids = list(s.scalars(query))
            for intent_id in ids:
                unfinished = s.scalar(select(exists().where(AttemptRow.intent_id == intent_id, _MAYBE_MADE)))
                s.execute(update(IntentRow).where(IntentRow.id == intent_id, IntentRow.status == "sending")
                          .values(status=Status.waiting.value, lease_until=None, leased_by=None,
                                  next_attempt_at=now, enqueued_at=None, updated_at=now,
                                  last_error_code="worker_lost",
                                  last_error_message="the worker holding it was lost (its lease expired)",
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
        """Upsert: two workers meeting the same 401 at once both land, neither fails on the key."""
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        insert = sqlite_insert if is_sqlite(self.engine) else pg_insert
        with self.session() as s, s.begin():
            s.execute(insert(TargetStateRow).values(name=name, paused=False, updated_at=now)
                      .on_conflict_do_nothing(index_elements=["name"]))
            s.execute(update(TargetStateRow).where(TargetStateRow.name == name).values(updated_at=now, **values))

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

    def status_counts(self) -> dict[tuple[str, str], int]:
        """Intents per (target, status): one GROUP BY, for the ``dispatcher_intents`` gauge."""
        with self.session() as s:
            rows = s.execute(select(IntentRow.target, IntentRow.status, func.count())
                             .group_by(IntentRow.target, IntentRow.status))
            return {(target, status): int(n) for target, status, n in rows}

    # -- heartbeats (see dispatcher.health) -----------------------------------------------------

    def beat(self, component: str, name: str, now: datetime, info: Mapping[str, Any] | None = None) -> None:
        """Write one process's heartbeat: insert it, or refresh ``seen_at`` and ``info``."""
        insert_fn = sqlite_insert if is_sqlite(self.engine) else pg_insert
        table = cast(Table, HeartbeatRow.__table__)
        stmt = insert_fn(table).values(component=component, name=name[:200], started_at=now, seen_at=now,
                                       info=dict(info or {}))
        stmt = stmt.on_conflict_do_update(index_elements=["component", "name"],
                                          set_={"seen_at": stmt.excluded.seen_at, "info": stmt.excluded.info})
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def forget_heartbeat(self, component: str, name: str) -> None:
        """A clean shutdown: the process is gone, not dead."""
        with self.session() as s, s.begin():
            s.execute(delete(HeartbeatRow).where(HeartbeatRow.component == component,
                                                 HeartbeatRow.name == name[:200]))

    def prune_heartbeats(self, before: datetime) -> int:
        """Delete heartbeats last seen before ``before`` (processes that crashed long ago)."""
        with self.session() as s, s.begin():
            result = s.execute(delete(HeartbeatRow).where(HeartbeatRow.seen_at < before))
            return int(result.rowcount)  # type: ignore[attr-defined]

    def heartbeats(self) -> list[HeartbeatView]:
        with self.session() as s:
            rows = s.scalars(select(HeartbeatRow).order_by(HeartbeatRow.component, HeartbeatRow.name)).all()
            return [HeartbeatView(r.component, r.name, r.started_at, r.seen_at, dict(r.info or {})) for r in rows]

    def liveness(self, now: datetime, *, stale_after_s: float = STALE_AFTER_S) -> Liveness:
        """Are the scheduler and at least one worker alive? For ``/readyz``, metrics, ``dispatcher check``."""
        return liveness(self.heartbeats(), now, stale_after_s=stale_after_s)


# -- bulk inserts ---------------------------------------------------------------------------------

def _table(model: type[Any]) -> Table:
    return cast(Table, model.__table__)


def _driver(conn: Connection) -> Any:
    """The psycopg connection under SQLAlchemy's (same transaction)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    return driver


@contextmanager
def _as_sqlalchemy_errors(what: str) -> Iterator[None]:
    """Raise psycopg's errors as SQLAlchemy's, as every other query here does (callers catch DBAPIError)."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        raise DBAPIError.instance(what, None, exc, psycopg.Error) from exc


def _insert_many_sqlite(conn: Connection, rows: Sequence[dict[str, Any]]) -> set[uuid.UUID]:
    table = _table(IntentRow)
    stmt = (sqlite_insert(table).on_conflict_do_nothing(index_elements=["target", "idempotency_key"])
            .returning(table.c.id))
    inserted: set[uuid.UUID] = set()
    for start in range(0, len(rows), BULK_CHUNK):
        inserted.update(conn.execute(stmt, list(rows[start:start + BULK_CHUNK])).scalars())
    return inserted


def _copy_rows(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], *, into: str | None = None) -> None:
    """COPY ``rows`` (dicts with the same keys) into ``table``, or the table named ``into``.

    JSON columns are written as JSON text; None in them becomes JSON ``null``, as the ORM writes it.
    """
    from psycopg import sql

    columns = list(rows[0])
    json_columns = {c.name for c in table.columns if isinstance(c.type, JSON)}
    encode = [c in json_columns for c in columns]
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(into or table.name), sql.SQL(", ").join(sql.Identifier(c) for c in columns))
    cursor = _driver(conn).cursor()  # psycopg's own: COPY is not in the DB-API
    with _as_sqlalchemy_errors(f"COPY {into or table.name}"), cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row([_json_text(row[c]) if enc else row[c] for c, enc in zip(columns, encode, strict=True)])


_EMPTY_JSON = {type(None): "null", list: "[]", dict: "{}"}


def _json_text(value: Any) -> str:
    """JSON text for a COPY; the empty values most rows carry (no cc, no service) without the encoder."""
    if not value and type(value) in _EMPTY_JSON:
        return _EMPTY_JSON[type(value)]
    return json.dumps(value)


def _copy_insert_intents(conn: Connection, rows: Sequence[dict[str, Any]]) -> set[uuid.UUID]:
    """Postgres: COPY into a temporary twin of ``intents``, then one INSERT ... ON CONFLICT DO NOTHING."""
    from psycopg import sql

    table = _table(IntentRow)
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in rows[0])
    cursor = _driver(conn).cursor()
    with _as_sqlalchemy_errors(f"bulk INSERT INTO {table.name}"), cursor:
        cursor.execute(sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP").format(
            sql.Identifier(STAGING_TABLE), sql.Identifier(table.name)))
        _copy_rows(conn, table, rows, into=STAGING_TABLE)
        # in key order, so that concurrent batches with common keys wait for each other, never deadlock
        cursor.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ORDER BY target, idempotency_key "
                               "ON CONFLICT (target, idempotency_key) DO NOTHING RETURNING id").format(
            sql.Identifier(table.name), columns, columns, sql.Identifier(STAGING_TABLE)))
        inserted = {row[0] for row in cursor.fetchall()}
        cursor.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(STAGING_TABLE)))
    return inserted
