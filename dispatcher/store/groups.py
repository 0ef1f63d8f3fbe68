"""The queries behind ticket groups (see :mod:`dispatcher.groups`).

Intake of a grouped intent is ONE transaction: insert the group row if it is missing
(``ON CONFLICT DO NOTHING``, so concurrent creators meet on the unique (target, group_key)), lock it
(``SELECT ... FOR UPDATE``; on SQLite the single writer serializes), decide, insert the intent, update
the group. The decision is therefore made by one writer at a time on the group as committed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from dispatcher.domain import TERMINAL_STATUSES, Action, Status
from dispatcher.groups import Decision, GroupKind, GroupState, GroupView
from dispatcher.store.db import is_sqlite
from dispatcher.store.repo import Store
from dispatcher.store.tables import EventRow, IntentGroupRow, IntentRow

#: builds the intent (and its events) once the decision is known: (decision, group before, group id, seq)
RowBuilder = Callable[[Decision, GroupView, int, int], tuple[IntentRow, list[EventRow]]]


def group_view(row: IntentGroupRow) -> GroupView:
    return GroupView(
        id=row.id, target=row.target, group_key=row.group_key, kind=GroupKind(row.kind), state=GroupState(row.state),
        generation=row.generation, seq=row.seq, creator_intent_id=row.creator_intent_id,
        ticket_provider_id=row.ticket_provider_id, ticket_number=row.ticket_number, ticket_url=row.ticket_url,
        ticket_closed=row.ticket_closed, current_state=row.current_state, sent_state=row.sent_state,
        resolved_at=row.resolved_at, created_at=row.created_at, updated_at=row.updated_at)


class GroupStore:
    """Group rows: intake under a row lock, and the updates dispatch makes as steps complete."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine
        self.locking = not is_sqlite(store.engine)

    def _locked(self, s: Session, query: Any) -> IntentGroupRow | None:
        if self.locking:
            query = query.with_for_update()
        return cast(IntentGroupRow | None, s.scalars(query).first())

    # -- intake ----------------------------------------------------------------------------------

    def accept(self, *, target: str, group_key: str, kind: GroupKind, now: datetime,
               incoming_state: dict[str, Any] | None, decide: Callable[[GroupView], Decision],
               build: RowBuilder) -> tuple[Decision, IntentRow, GroupView]:
        """Decide and store one grouped intent atomically; returns the decision, the row, the group after."""
        insert_fn = sqlite_insert if is_sqlite(self.engine) else pg_insert
        table = cast(Table, IntentGroupRow.__table__)
        blank = (insert_fn(table)
                 .values(target=target, group_key=group_key, kind=kind.value, state=GroupState.resolved.value,
                         generation=0, seq=0, ticket_closed=False, created_at=now, updated_at=now)
                 .on_conflict_do_nothing(index_elements=["target", "group_key"]))
        with self.store.session() as s, s.begin():
            s.execute(blank)
            group = self._locked(s, select(IntentGroupRow).where(IntentGroupRow.target == target,
                                                                 IntentGroupRow.group_key == group_key))
            assert group is not None
            before = group_view(group)
            decision = decide(before)
            seq = group.seq + 1
            row, events = build(decision, before, group.id, seq)
            group.seq = seq
            group.state = decision.group_state.value
            if decision.new_generation:
                group.generation = decision.generation
                group.creator_intent_id = row.id
                group.ticket_provider_id = group.ticket_number = group.ticket_url = None
                group.ticket_closed = False
                group.sent_state = None
                group.resolved_at = None
            if incoming_state is not None:
                group.current_state = incoming_state
            group.updated_at = now
            s.add(row)
            s.flush()
            s.add_all(events)
            s.flush()
            return decision, row, group_view(group)

    # -- reads -----------------------------------------------------------------------------------

    def get(self, group_id: int) -> GroupView | None:
        with self.store.session() as s:
            row = s.get(IntentGroupRow, group_id)
            return group_view(row) if row else None

    def find(self, target: str, group_key: str) -> GroupView | None:
        """The group as committed, without a lock (dry runs)."""
        with self.store.session() as s:
            row = s.scalars(select(IntentGroupRow).where(IntentGroupRow.target == target,
                                                         IntentGroupRow.group_key == group_key)).first()
            return group_view(row) if row else None

    def newer_pending(self, group_id: int, seq: int) -> uuid.UUID | None:
        """The newest follow-up of the group accepted after ``seq`` that is still to be sent (flap damping)."""
        with self.store.session() as s:
            return s.scalar(select(IntentRow.id).where(
                IntentRow.group_id == group_id, IntentRow.group_seq > seq,
                IntentRow.action.in_([Action.reply.value, Action.reopen.value]),
                IntentRow.status.not_in([st.value for st in TERMINAL_STATUSES]))
                .order_by(IntentRow.group_seq.desc()).limit(1))

    def older_pending(self, group_id: int, seq: int) -> uuid.UUID | None:
        """An earlier follow-up of the group still to finish: replies go out in intake order."""
        with self.store.session() as s:
            return s.scalar(select(IntentRow.id).where(
                IntentRow.group_id == group_id, IntentRow.group_seq < seq,
                IntentRow.action.in_([Action.reply.value, Action.reopen.value]),
                IntentRow.status.not_in([st.value for st in TERMINAL_STATUSES]))
                .order_by(IntentRow.group_seq).limit(1))

    def superseded_between(self, group_id: int, after_seq: int, before_seq: int) -> int:
        """How many follow-ups were coalesced (cancelled by flap damping) since the ticket's last update."""
        with self.store.session() as s:
            return int(s.scalar(select(func.count()).select_from(IntentRow).where(
                IntentRow.group_id == group_id, IntentRow.group_seq > after_seq, IntentRow.group_seq < before_seq,
                IntentRow.status == Status.cancelled.value, IntentRow.last_error_code == "superseded")) or 0)

    # -- updates as dispatch goes ----------------------------------------------------------------

    def opened(self, group_id: int, generation: int, *, provider_id: str, number: str | None, url: str | None,
               sent_state: dict[str, Any] | None, now: datetime) -> None:
        """The create of this generation made its ticket: replies may go to it now."""
        with self.store.session() as s, s.begin():
            group = self._locked(s, select(IntentGroupRow).where(IntentGroupRow.id == group_id))
            if group is None or group.generation != generation:
                return
            group.ticket_provider_id, group.ticket_number, group.ticket_url = provider_id, number, url
            group.ticket_closed = False
            group.sent_state = sent_state
            if group.state in (GroupState.opening.value, GroupState.failed.value):  # failed: an operator retried it
                group.state = GroupState.open.value
            group.updated_at = now

    def create_failed(self, group_id: int, generation: int, now: datetime) -> None:
        """The create of this generation failed for good: the next notification tries a new ticket."""
        with self.store.session() as s, s.begin():
            s.execute(update(IntentGroupRow).where(IntentGroupRow.id == group_id,
                                                   IntentGroupRow.generation == generation,
                                                   IntentGroupRow.ticket_provider_id.is_(None))
                      .values(state=GroupState.failed.value, updated_at=now))

    def step_done(self, group_id: int, generation: int, step: str, *, now: datetime,
                  sent_state: dict[str, Any] | None = None, last: bool = False, resolves: bool = False) -> None:
        """Record what one follow-up step did to the ticket (and, after the last, to the group)."""
        with self.store.session() as s, s.begin():
            group = self._locked(s, select(IntentGroupRow).where(IntentGroupRow.id == group_id))
            if group is None or group.generation != generation:
                return
            if step == "reopen":
                group.ticket_closed = False
            elif step == "close":
                group.ticket_closed = True
            elif step == "reply" and sent_state is not None:
                old_seq = int((group.sent_state or {}).get("seq") or 0)
                if int(sent_state.get("seq") or 0) >= old_seq:
                    group.sent_state = sent_state
            if last:
                current_resolved = (group.current_state or {}).get("status") == "resolved"
                if resolves and current_resolved:
                    group.state = GroupState.resolved.value
                    group.resolved_at = now
                elif not resolves and group.state == GroupState.resolved.value:
                    group.state = GroupState.open.value
            group.updated_at = now

    def ticket_closed_by_provider(self, group_id: int, generation: int, now: datetime) -> None:
        """HostUp refused a reply because the ticket is closed (someone closed it): remember that."""
        with self.store.session() as s, s.begin():
            s.execute(update(IntentGroupRow).where(IntentGroupRow.id == group_id,
                                                   IntentGroupRow.generation == generation)
                      .values(ticket_closed=True, updated_at=now))
