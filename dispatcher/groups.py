"""Ticket groups: at most one open ticket per (target, group key), and what a new notification does
to it. Pure: no I/O imports here.

A group is a row in ``intent_groups``; the database's unique (target, group_key) and a row lock at
intake make "is there an open ticket?" race-free (never search-then-create). Each notification
becomes one intent whose *action* :func:`decide` picks from the group as it is under that lock::

    no ticket / failed / resolved long ago ──► create   (new generation; group ``opening``)
    opening / open ────────────────────────► reply    (due after the flap window)
    resolved within the reopen window ─────► reopen   (reply, reopening the ticket if we closed it)
    the same alert set as last time ───────► none     (recorded as succeeded, nothing sent)
    resolved and no ticket to tell ────────► none

Group states: ``opening`` (the create is in flight), ``open`` (the ticket exists), ``resolved``
(everything resolved; the ticket closed when ``close_on_resolve``), ``failed`` (the create failed).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from dispatcher.domain import Action


class GroupState(StrEnum):
    opening = "opening"
    open = "open"
    resolved = "resolved"
    failed = "failed"


class GroupKind(StrEnum):
    """``alerts``: notifications carrying an alert set (replies say what changed, flaps are damped);
    ``message``: producer intents sharing a ``group_key`` (each later one is sent as a reply)."""

    alerts = "alerts"
    message = "message"


class Step(StrEnum):
    """One request of a multi-step follow-up (kept in the intent's ``payload``)."""

    reopen = "reopen"
    reply = "reply"
    close = "close"


@dataclass(frozen=True)
class GroupPolicy:
    """The ``[alerts]`` timing knobs (producer groups use the defaults with no flap delay)."""

    reopen_window_s: float = 3600.0
    flap_window_s: float = 60.0
    close_on_resolve: bool = True


@dataclass(frozen=True)
class GroupView:
    """A group row as the service sees it (frozen at the store's seam)."""

    id: int
    target: str
    group_key: str
    kind: GroupKind
    state: GroupState
    generation: int
    seq: int
    creator_intent_id: uuid.UUID | None
    ticket_provider_id: str | None
    ticket_number: str | None
    ticket_url: str | None
    ticket_closed: bool
    current_state: dict[str, Any] | None
    sent_state: dict[str, Any] | None
    resolved_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @property
    def has_ticket(self) -> bool:
        return self.ticket_provider_id is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "target": self.target, "group_key": self.group_key, "kind": self.kind.value,
            "state": self.state.value, "generation": self.generation,
            "ticket": ({"id": self.ticket_provider_id, "number": self.ticket_number, "url": self.ticket_url,
                        "closed": self.ticket_closed} if self.ticket_provider_id else None),
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class Decision:
    """What one notification does: the intent's action and the group's next state."""

    action: Action
    reason: str
    generation: int
    group_state: GroupState
    delay_s: float = 0.0
    new_generation: bool = False     # a new ticket: forget the previous one's ids and sent state


def significant(state: Mapping[str, Any] | None) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """What makes two alert sets "the same": the group status and each alert's status.

    Annotations (often a changing value) and timestamps are left out on purpose: a repeat of the same
    alerts with a new "current value" is not news worth a ticket reply.
    """
    if state is None:
        return None
    alerts = state.get("alerts") or {}
    return (str(state.get("status")),
            tuple(sorted((str(fp), str(a.get("status"))) for fp, a in alerts.items() if isinstance(a, Mapping))))


def decide(group: GroupView | None, *, kind: GroupKind, incoming: Mapping[str, Any] | None,
           incoming_resolved: bool, policy: GroupPolicy, now: datetime) -> Decision:
    """The action for one notification given its group as it is (``None``: the group does not exist)."""
    generation = group.generation if group else 0
    state = group.state if group else GroupState.resolved
    if (kind is GroupKind.alerts and group is not None and group.current_state is not None
            and state in (GroupState.opening, GroupState.open, GroupState.resolved)
            and significant(group.current_state) == significant(incoming)):
        return Decision(Action.none, "nothing new: the same alerts as the group's last notification",
                        generation, state)
    delay = policy.flap_window_s if kind is GroupKind.alerts else 0.0
    if group is not None and state in (GroupState.opening, GroupState.open):
        what = "ticket being made" if state is GroupState.opening else "ticket"
        return Decision(Action.reply, f"the group has an open {what}: replying", generation, state, delay)
    recent = (group is not None and state is GroupState.resolved and group.has_ticket
              and group.resolved_at is not None
              and (now - group.resolved_at).total_seconds() <= policy.reopen_window_s)
    if recent:
        if incoming_resolved:
            return Decision(Action.none, "nothing new: the group is already resolved", generation, state)
        return Decision(Action.reopen, f"firing again within the reopen window ({policy.reopen_window_s:g} s): "
                        "reopening the group's ticket", generation, GroupState.open, delay)
    if incoming_resolved:
        return Decision(Action.none, "resolved, and the group has no open ticket to tell", generation, state)
    why = ("a new group" if group is None or group.generation == 0 else
           "the group's last ticket could not be made" if state is GroupState.failed else
           f"the group resolved more than {policy.reopen_window_s:g} s ago")
    return Decision(Action.create, f"{why}: creating a ticket", generation + 1, GroupState.opening,
                    new_generation=True)


def plan_steps(*, ticket_closed: bool, resolves: bool, close_on_resolve: bool) -> list[str]:
    """The requests of a follow-up: reopen a ticket we closed first (HostUp refuses replies to closed
    tickets), reply, then close when everything resolved."""
    steps = [Step.reopen.value] if ticket_closed else []
    steps.append(Step.reply.value)
    if resolves and close_on_resolve:
        steps.append(Step.close.value)
    return steps


__all__ = ["Decision", "GroupKind", "GroupPolicy", "GroupState", "GroupView", "Step", "decide", "plan_steps",
           "significant"]
