"""The group decision (create / reply / reopen / none) and follow-up steps: pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dispatcher.domain import Action
from dispatcher.groups import GroupKind, GroupPolicy, GroupState, GroupView, decide, plan_steps, significant

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
POLICY = GroupPolicy(reopen_window_s=3600, flap_window_s=60, close_on_resolve=True)
FIRING = {"status": "firing", "alerts": {"a": {"status": "firing", "annotations": {"value": "1"}}}}
FIRING_NEW_VALUE = {"status": "firing", "alerts": {"a": {"status": "firing", "annotations": {"value": "2"}}}}
RESOLVED = {"status": "resolved", "alerts": {"a": {"status": "resolved"}}}
TWO = {"status": "firing", "alerts": {"a": {"status": "firing"}, "b": {"status": "firing"}}}


def group(state: GroupState = GroupState.open, *, generation: int = 1, ticket: str | None = "tkt_1",
          current: dict[str, Any] | None = None, resolved_ago_s: float | None = None) -> GroupView:
    return GroupView(
        id=1, target="hostup", group_key="k", kind=GroupKind.alerts, state=state, generation=generation, seq=3,
        creator_intent_id=None, ticket_provider_id=ticket, ticket_number=None, ticket_url=None, ticket_closed=False,
        current_state=current, sent_state=None,
        resolved_at=NOW - timedelta(seconds=resolved_ago_s) if resolved_ago_s is not None else None,
        created_at=NOW, updated_at=NOW)


def action(g: GroupView | None, incoming: dict[str, Any] | None, kind: GroupKind = GroupKind.alerts) -> Action:
    resolved = incoming is not None and incoming["status"] == "resolved"
    return decide(g, kind=kind, incoming=incoming, incoming_resolved=resolved, policy=POLICY, now=NOW).action


def test_a_new_group_creates_a_ticket_in_a_new_generation() -> None:
    d = decide(None, kind=GroupKind.alerts, incoming=FIRING, incoming_resolved=False, policy=POLICY, now=NOW)
    assert (d.action, d.generation, d.group_state, d.new_generation) == (Action.create, 1, GroupState.opening, True)
    blank = group(GroupState.resolved, generation=0, ticket=None)
    assert action(blank, FIRING) is Action.create


def test_a_resolution_for_a_group_without_a_ticket_sends_nothing() -> None:
    assert action(None, RESOLVED) is Action.none
    assert action(group(GroupState.failed, ticket=None), RESOLVED) is Action.none


@pytest.mark.parametrize("state", [GroupState.opening, GroupState.open])
def test_a_live_group_gets_a_reply_after_the_flap_window(state: GroupState) -> None:
    d = decide(group(state, current=FIRING), kind=GroupKind.alerts, incoming=TWO, incoming_resolved=False,
               policy=POLICY, now=NOW)
    assert d.action is Action.reply and d.delay_s == 60 and d.group_state is state and not d.new_generation


def test_the_same_alerts_again_are_nothing_new_even_with_new_annotation_values() -> None:
    assert action(group(current=FIRING), FIRING_NEW_VALUE) is Action.none
    assert action(group(GroupState.opening, current=FIRING), FIRING) is Action.none
    assert action(group(GroupState.resolved, current=RESOLVED, resolved_ago_s=10), RESOLVED) is Action.none


def test_firing_again_within_the_reopen_window_reopens() -> None:
    d = decide(group(GroupState.resolved, current=RESOLVED, resolved_ago_s=100), kind=GroupKind.alerts,
               incoming=FIRING, incoming_resolved=False, policy=POLICY, now=NOW)
    assert d.action is Action.reopen and d.group_state is GroupState.open and d.generation == 1


def test_firing_after_the_reopen_window_or_after_a_failed_create_makes_a_new_ticket() -> None:
    late = decide(group(GroupState.resolved, current=RESOLVED, resolved_ago_s=3601), kind=GroupKind.alerts,
                  incoming=FIRING, incoming_resolved=False, policy=POLICY, now=NOW)
    assert (late.action, late.generation, late.new_generation) == (Action.create, 2, True)
    assert "more than 3600 s ago" in late.reason
    failed = decide(group(GroupState.failed, ticket=None, current=FIRING), kind=GroupKind.alerts, incoming=FIRING,
                    incoming_resolved=False, policy=POLICY, now=NOW)
    assert failed.action is Action.create and "could not be made" in failed.reason


def test_producer_groups_reply_at_once_and_never_count_as_repeats() -> None:
    d = decide(group(GroupState.open), kind=GroupKind.message, incoming=None, incoming_resolved=False,
               policy=POLICY, now=NOW)
    assert d.action is Action.reply and d.delay_s == 0
    assert action(None, None, GroupKind.message) is Action.create


def test_significance_ignores_annotations_and_order() -> None:
    assert significant(FIRING) == significant(FIRING_NEW_VALUE)
    assert significant(TWO) == significant({"status": "firing", "alerts": dict(reversed(TWO["alerts"].items()))})
    assert significant(FIRING) != significant(RESOLVED) and significant(None) is None


@pytest.mark.parametrize(("closed", "resolves", "close", "steps"), [
    (False, False, True, ["reply"]),
    (False, True, True, ["reply", "close"]),
    (False, True, False, ["reply"]),
    (True, False, True, ["reopen", "reply"]),
    (True, True, True, ["reopen", "reply", "close"]),
])
def test_follow_up_steps_reopen_a_closed_ticket_first_and_close_on_resolution(
        closed: bool, resolves: bool, close: bool, steps: list[str]) -> None:
    assert plan_steps(ticket_closed=closed, resolves=resolves, close_on_resolve=close) == steps
