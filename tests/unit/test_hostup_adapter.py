"""HostUpAdapter: request bodies from the documented examples, and every answer sorted."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from dispatcher.domain import Priority, ServiceRef
from dispatcher.errors import FieldProblem
from dispatcher.providers import adapter_for
from dispatcher.providers.base import (
    Op,
    Outcome,
    ProviderAdapter,
    RateLimitInfo,
    RawResponse,
    RequestSpec,
    TicketDraft,
    TicketRef,
    Verdict,
)
from dispatcher.providers.hostup import HostUpAdapter

NOW = datetime(2026, 4, 27, 12, 34, 30, tzinfo=UTC)
TEMPLATE = "https://cloud.hostup.se/support/tickets/{id}"
MARKER = "dispatcher-ref: 0190f3a1-8c2b-7d4e-9f00-123456789abc"


def adapter(template: str | None = TEMPLATE) -> HostUpAdapter:
    return HostUpAdapter(template, clock=lambda: NOW)


def raw(status: int | None, body: Any = None, headers: dict[str, str] | None = None) -> RawResponse:
    content = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    return RawResponse(status=status, headers=headers or {}, body=content, duration_ms=12.0)


def problem(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": f"https://developer.hostup.se/errors/{code}", "title": "Problem", "status": status,
        "detail": detail, "code": code, "instance": "/api/v2/support/tickets",
        "requestId": "req_01hxa3b4c5d6e7f8g9h0j1k2m3", "timestamp": "2026-04-27T12:34:56.000Z", **extra,
    }


# The seed's 201 body, verbatim.
CREATED = {
    "id": "tkt_01hxa3b4c5d6e7f8g9h0j1k2m3", "number": "10001", "subject": "Question about my hosting account",
    "body": "Hello, I need help with my website.", "status": "open", "priority": "low",
    "departmentSlug": "domain-names", "departmentName": "Domain names", "createdAt": "2026-04-27T11:45:00.000Z",
    "updatedAt": "2026-04-27T11:45:00.000Z", "lastMessageAt": "2026-04-27T11:45:00.000Z",
    "ccEmails": ["ops@example.com"], "requesterName": "Jane Example", "messageCount": 1,
    "linkedServices": [{"serviceType": "domain", "serviceId": "dom_01hxa3b4c5d6e7f8g9h0j1k2m3",
                        "serviceName": "example.com", "details": {"status": "Active", "autoRenew": True}}],
    "attachments": [], "messages": [],
}


def test_it_satisfies_the_provider_port() -> None:
    port: ProviderAdapter = adapter()
    assert port.provider == "hostup"
    assert isinstance(adapter_for("hostup", "https://cloud.hostup.se/api/v2"), HostUpAdapter)


# -- requests ------------------------------------------------------------------------------------

def test_create_request_matches_the_documented_example() -> None:
    draft = TicketDraft(
        subject="Question about my hosting account", body="Hello, I need help with my website.",
        priority=Priority.low, department="domain-names", cc=("ops@example.com",),
        service=ServiceRef(type="domain", id="dom_01hxa3b4c5d6e7f8g9h0j1k2m3"),
    )
    spec = adapter().create_request(draft)
    assert (spec.op, spec.method, spec.path) == (Op.create, "POST", "/support/tickets")
    assert spec.json == {
        "departmentSlug": "domain-names", "subject": "Question about my hosting account",
        "message": "Hello, I need help with my website.", "priority": "low", "ccEmails": ["ops@example.com"],
        "context": {"serviceType": "domain", "serviceId": "dom_01hxa3b4c5d6e7f8g9h0j1k2m3"},
    }


def test_create_request_omits_empty_cc_and_missing_service() -> None:
    draft = TicketDraft(subject="s", body="b", priority=Priority.medium, department="vps")
    assert adapter().create_request(draft).json == {
        "departmentSlug": "vps", "subject": "s", "message": "b", "priority": "medium"}


def test_create_request_sends_critical_reason_and_service_name_only_when_set() -> None:
    draft = TicketDraft(subject="s", body="b", priority=Priority.critical, department="vps",
                        service=ServiceRef(type="other", id="x1", name="example.com"),
                        critical_reason="All sites down")
    body = adapter().create_request(draft).json
    assert body is not None
    assert body["criticalReason"] == "All sites down"
    assert body["context"] == {"serviceType": "other", "serviceId": "x1", "serviceName": "example.com"}
    assert body["priority"] == "critical"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (HostUpAdapter().departments_request(), RequestSpec(Op.departments, "GET", "/support/departments")),
        (HostUpAdapter().ticket_request("tkt_1"), RequestSpec(Op.ticket, "GET", "/support/tickets/tkt_1")),
        (HostUpAdapter().ticket_request("a/../b"), RequestSpec(Op.ticket, "GET", "/support/tickets/a%2F..%2Fb")),
        (HostUpAdapter().reply_request("tkt_1", "more"),
         RequestSpec(Op.reply, "POST", "/support/tickets/tkt_1/messages", json={"message": "more"})),
        (HostUpAdapter().reopen_request("tkt_1"),
         RequestSpec(Op.reopen, "POST", "/support/tickets/tkt_1/actions/reopen")),
        (HostUpAdapter().close_request("10001"),
         RequestSpec(Op.close, "POST", "/support/tickets/10001/actions/close")),
    ],
)
def test_request_builders(spec: RequestSpec | None, expected: RequestSpec) -> None:
    assert spec == expected


def test_find_requests_read_the_newest_hundred_tickets() -> None:
    assert adapter().find_requests_for_marker("Disk full") == [
        RequestSpec(Op.find, "GET", "/support/tickets", params={"limit": 100})]


def test_hostup_has_no_task_to_poll() -> None:
    with pytest.raises(NotImplementedError):
        adapter().task_request("/v1/task/abc")


def test_an_empty_ticket_id_is_refused() -> None:
    with pytest.raises(ValueError):
        adapter().ticket_request("")


def test_a_template_with_unknown_placeholders_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="ticket_url_template"):
        HostUpAdapter("https://cloud.hostup.se/t/{ticket}")


# -- successful answers ---------------------------------------------------------------------------

def test_created_ticket_is_done_with_its_ids_and_url() -> None:
    outcome = adapter().classify(Op.create, raw(201, CREATED))
    assert outcome.verdict is Verdict.done
    assert outcome.ticket == TicketRef(
        provider_id="tkt_01hxa3b4c5d6e7f8g9h0j1k2m3", number="10001",
        url="https://cloud.hostup.se/support/tickets/tkt_01hxa3b4c5d6e7f8g9h0j1k2m3",
        department="domain-names", subject="Question about my hosting account", is_closed=False)
    assert outcome.data == CREATED


def test_without_a_template_the_ticket_has_no_url() -> None:
    outcome = adapter(None).classify(Op.create, raw(201, CREATED))
    assert outcome.ticket is not None
    assert outcome.ticket.url is None


def test_departments_answer_gives_slugs_and_keeps_the_raw_list() -> None:
    departments = [
        {"slug": "general-web-hosting", "displayName": "Web hosting", "description": "<p>Help</p>", "email": None},
        {"slug": "vps", "displayName": "VPS", "description": None, "email": None},
        {"displayName": "no slug"},
    ]
    a = adapter()
    outcome = a.classify(Op.departments, raw(200, {"departments": departments}))
    assert outcome.verdict is Verdict.done
    assert outcome.data == ["general-web-hosting", "vps"]
    assert outcome.items == tuple(departments)
    assert a.department_slugs(outcome) == ["general-web-hosting", "vps"]


def test_department_slugs_of_a_failed_answer_are_empty() -> None:
    a = adapter()
    assert a.department_slugs(a.classify(Op.departments, raw(503, problem(503, "upstream_unavailable", "x")))) == []


def test_ticket_detail_is_done_and_reports_closed() -> None:
    outcome = adapter().classify(Op.ticket, raw(200, {**CREATED, "status": "closed"}))
    assert outcome.verdict is Verdict.done
    assert outcome.ticket is not None
    assert outcome.ticket.is_closed is True


def test_ticket_list_is_done_with_items_and_candidates_by_subject() -> None:
    listing: dict[str, Any] = {"data": [
        {"id": "tkt_3", "subject": "Disk full on app-01"},
        {"id": "tkt_2", "subject": "Something else"},
        {"id": "tkt_1", "subject": "  disk FULL on app-01 "},
    ], "nextCursor": None}
    a = adapter()
    outcome = a.classify(Op.find, raw(200, listing))
    assert outcome.verdict is Verdict.done
    assert outcome.items == tuple(listing["data"])
    assert a.candidate_ids(outcome, "Disk full on app-01") == ["tkt_3", "tkt_1"]


@pytest.mark.parametrize(
    ("detail", "found"),
    [
        ({**CREATED, "body": f"Disk full\n\n--\n{MARKER}"}, True),
        ({**CREATED, "body": "Disk full", "messages": [{"body": f"<p>{MARKER}</p>"}]}, True),
        ({**CREATED, "body": "Disk full"}, False),
    ],
)
def test_a_ticket_detail_with_our_marker_is_our_ticket(detail: dict[str, Any], found: bool) -> None:
    a = adapter()
    match = a.match_marker(a.classify(Op.ticket, raw(200, detail)), MARKER)
    if found:
        assert match is not None
        assert match.verdict is Verdict.done
        assert match.ticket is not None
        assert match.ticket.provider_id == CREATED["id"]
    else:
        assert match is None


@pytest.mark.parametrize("op", [Op.reply, Op.reopen, Op.close])
def test_follow_up_actions_are_done_on_2xx(op: Op) -> None:
    body = {"id": "tmsg_1", "ticketId": "tkt_1", "body": "more"} if op is Op.reply else CREATED
    outcome = adapter().classify(op, raw(201 if op is Op.reply else 200, body))
    assert outcome.verdict is Verdict.done
    assert outcome.data == body
    assert (outcome.ticket is None) is (op is Op.reply)


def test_rate_limit_headers_are_kept_on_successful_answers() -> None:
    headers = {"x-ratelimit-limit": "60", "x-ratelimit-remaining": "59",
               "x-ratelimit-reset": "2026-04-27T12:35:00.000Z"}
    outcome = adapter().classify(Op.create, raw(201, CREATED, headers))
    assert outcome.rate_limit == RateLimitInfo(60, 59, datetime(2026, 4, 27, 12, 35, tzinfo=UTC))


# -- errors -------------------------------------------------------------------------------------

def test_hostup_400_is_final_with_fields_named_from_pointers() -> None:
    body = problem(400, "invalid_request", "The request body failed validation.", errors=[
        {"pointer": "/departmentSlug", "detail": "Unknown department.", "code": "invalid_request"},
        {"pointer": "/context/serviceId", "detail": "Service not found.", "code": "invalid_request"},
        {"pointer": "/items/0/domainName", "detail": "`domainName` is required.", "code": "invalid_request"},
        {"pointer": "/a~1b", "code": "invalid_request"},
    ])
    outcome = adapter().classify(Op.create, raw(400, body, {"content-type": "application/problem+json"}))
    assert outcome.verdict is Verdict.final
    assert outcome.error_code == "invalid_request"
    assert outcome.error_message == "The request body failed validation."
    assert outcome.request_id == "req_01hxa3b4c5d6e7f8g9h0j1k2m3"
    assert outcome.field_errors == (
        FieldProblem("departmentSlug", "Unknown department."),
        FieldProblem("context.serviceId", "Service not found."),
        FieldProblem("items.0.domainName", "`domainName` is required."),
        FieldProblem("a/b", "invalid_request"),
    )


@pytest.mark.parametrize(("status", "code"), [(401, "unauthorized"), (403, "forbidden")])
def test_hostup_refused_credentials_pause_the_target(status: int, code: str) -> None:
    outcome = adapter().classify(Op.create, raw(status, problem(status, code, "Authentication is required.")))
    assert outcome.verdict is Verdict.pause
    assert outcome.error_code == code
    assert outcome.request_id == "req_01hxa3b4c5d6e7f8g9h0j1k2m3"


@pytest.mark.parametrize(
    ("op", "status", "code"),
    [(Op.create, 404, "not_found"), (Op.ticket, 404, "not_found"), (Op.reply, 409, "conflict")],
)
def test_hostup_not_found_and_conflict_are_final(op: Op, status: int, code: str) -> None:
    outcome = adapter().classify(op, raw(status, problem(status, code, "The requested resource could not be found.")))
    assert outcome.verdict is Verdict.final
    assert outcome.error_code == code


def test_hostup_critical_per_hour_refusal_is_final_not_retried() -> None:
    body = problem(429, "rate_limited",
                   "You already sent a critical alert in the last hour. Reply to the existing ticket instead.")
    outcome = adapter().classify(Op.create, raw(429, body, {"retry-after": "3600"}))
    assert outcome.verdict is Verdict.final
    assert outcome.error_code == "critical_rate_limited"
    assert outcome.error_message is not None
    assert "critical alert" in outcome.error_message


@pytest.mark.parametrize(
    ("headers", "retry_after"),
    [
        ({"retry-after": "30"}, 30.0),
        ({"retry-after": "Mon, 27 Apr 2026 12:35:00 GMT"}, 30.0),
        ({}, None),
    ],
)
def test_hostup_rate_limit_exceeded_is_retried_after_the_given_wait(
    headers: dict[str, str], retry_after: float | None
) -> None:
    headers = {**headers, "x-ratelimit-limit": "60", "x-ratelimit-remaining": "0",
               "x-ratelimit-reset": "2026-04-27T12:35:00.000Z"}
    body = problem(429, "rate_limit_exceeded", "Too many requests. Retry after the limit resets.")
    outcome = adapter().classify(Op.create, raw(429, body, headers))
    assert outcome.verdict is Verdict.retry
    assert outcome.error_code == "rate_limit_exceeded"
    assert outcome.retry_after == retry_after
    assert outcome.rate_limit == RateLimitInfo(60, 0, datetime(2026, 4, 27, 12, 35, tzinfo=UTC))


def test_hostup_rate_limited_without_critical_wording_is_retried() -> None:
    body = problem(429, "rate_limited", "Slow down.")
    outcome = adapter().classify(Op.create, raw(429, body, {"Retry-After": "5"}))
    assert outcome.verdict is Verdict.retry
    assert outcome.retry_after == 5.0


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (500, problem(500, "internal_error", "An unexpected error occurred."), "internal_error"),
        (502, problem(502, "upstream_timeout", "Upstream timed out."), "upstream_timeout"),
        (503, problem(503, "upstream_unavailable", "Upstream unavailable."), "upstream_unavailable"),
        (504, b"<html>Gateway Timeout</html>", "gateway_timeout"),
        (599, b"", "server_error"),
    ],
)
def test_hostup_server_errors_are_retried(status: int, body: Any, code: str) -> None:
    outcome = adapter().classify(Op.create, raw(status, body, {"retry-after": "12"}))
    assert outcome.verdict is Verdict.retry
    assert outcome.error_code == code
    assert outcome.retry_after == 12.0


@pytest.mark.parametrize(
    ("op", "status", "body"),
    [
        (Op.create, 200, b"<html>Welcome</html>"),
        (Op.create, 201, {"unexpected": True}),
        (Op.departments, 200, {"departments": "none"}),
        (Op.find, 200, b""),
        (Op.create, 418, b"I'm a teapot"),
        (Op.ticket, 302, b""),
    ],
)
def test_hostup_unreadable_answers_are_final_unexpected_response(op: Op, status: int, body: Any) -> None:
    outcome = adapter().classify(op, raw(status, body))
    assert outcome.verdict is Verdict.final
    assert outcome.error_code == "unexpected_response"


def test_hostup_network_error_is_retried_with_the_transport_message() -> None:
    response = RawResponse(None, {}, b"", 10_000.0, network_error="ReadTimeout: timed out", maybe_delivered=True)
    outcome = adapter().classify(Op.create, response)
    assert outcome == Outcome(Verdict.retry, error_code="network", error_message="ReadTimeout: timed out")
