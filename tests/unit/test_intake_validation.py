"""Bad input is refused at intake with every bad field named (design.md §3.5)."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.config import Settings, parse_config
from dispatcher.domain import find_marker, marker_for, new_intent_id, parse_intent
from dispatcher.errors import IntentInvalid
from dispatcher.service import Dispatcher

CONFIG = parse_config({"targets": {
    "hostup": {"provider": "hostup", "base_url": "https://h.example/api/v2", "api_key_env": "K"},
    "nocworx": {"provider": "nocworx", "base_url": "https://n.example", "api_key_env": "K"},
}}, Settings(), env={"K": "v"})

GOOD: dict[str, Any] = {"target": "hostup", "subject": "VPS down", "body": "It is down.", "topic": "vps"}


def validator() -> Dispatcher:
    return Dispatcher(CONFIG, store=None, queue=None, transport_for=None, adapter_for=None)  # type: ignore[arg-type]


def fields_of(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(IntentInvalid) as info:
        validator().validate(data)
    return {p.field: p.reason for p in info.value.problems}


@pytest.mark.parametrize(("change", "field", "reason"), [
    ({"subject": None}, "subject", "required"),
    ({"subject": "   "}, "subject", "at least 1 character"),
    ({"subject": "x" * 256}, "subject", "at most 255"),
    ({"body": "x" * 60_001}, "body", "at most 60000"),
    ({"body": " \n "}, "body", "must not be blank"),
    ({"target": "zendesk"}, "target", "unknown target 'zendesk'; configured: hostup, nocworx"),
    ({"priority": "asap"}, "priority", "'low', 'medium', 'high', 'urgent' or 'critical'"),
    ({"priority": "critical"}, "critical_reason", "required when priority is critical"),
    ({"cc": ["ops@example.com", "not-an-email"]}, "cc.1", "not a valid email"),
    ({"topic": "quantum"}, "topic", "no department rule for topic 'quantum'"),
    ({"category": "dns"}, "category", "only NocWorx targets take a category"),
    ({"service": {"type": "server", "id": "1"}}, "service.type", "must be one of"),
    ({"service": {"id": "1"}}, "service.type", "required"),
    ({"labels": {"k": "v" * 1001}}, "labels.k", "at most 1000"),
    ({"surprise": 1}, "surprise", "unknown field"),
    ({"idempotency_key": "k" * 201}, "idempotency_key", "at most 200"),
])
def test_bad_field_is_named_with_the_reason(change: dict[str, Any], field: str, reason: str) -> None:
    data = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    problems = fields_of(data)
    assert field in problems, problems
    assert reason in problems[field]


@pytest.mark.parametrize(("change", "field"), [
    ({"category": "plumbing"}, "category"),
    ({"department": "support-tier-3"}, "department"),
    ({"service": {"type": "hosting", "id": "abc"}}, "service.id"),
])
def test_nocworx_fields_are_checked_against_the_documented_values(change: dict[str, Any], field: str) -> None:
    assert field in fields_of({**GOOD, "target": "nocworx", **change})


def test_every_problem_is_reported_at_once() -> None:
    problems = fields_of({"target": "hostup", "priority": "asap", "cc": ["nope"]})
    assert {"subject", "body", "priority", "cc.0"} <= set(problems)


def test_a_non_object_is_refused() -> None:
    with pytest.raises(IntentInvalid, match="must be a JSON object"):
        parse_intent(["not", "an", "object"])


def test_valid_intent_passes_and_critical_with_reason_is_fine() -> None:
    intent, target = validator().validate({**GOOD, "priority": "critical", "critical_reason": "all down",
                                           "cc": ["ops@example.com"]})
    assert target.name == "hostup"
    assert intent.priority.value == "critical"


def test_the_marker_round_trips_through_ticket_text() -> None:
    intent_id = new_intent_id()
    text = f"Hello\n\n--\n{marker_for(intent_id)}\n"
    assert find_marker(text) == str(intent_id)
    assert find_marker("no marker here") is None


def test_intent_ids_sort_by_creation_time() -> None:
    ids = [new_intent_id() for _ in range(50)]
    assert len(set(ids)) == 50
    assert [i.version for i in ids] == [7] * 50
