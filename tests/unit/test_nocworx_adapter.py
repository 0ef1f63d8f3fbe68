"""NocWorxAdapter: ticket:add from the seed, task polling in every documented shape, errors sorted."""

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
    RawResponse,
    RequestSpec,
    TicketDraft,
    TicketRef,
    Verdict,
)
from dispatcher.providers.nocworx import NocWorxAdapter

NOW = datetime(2026, 4, 27, 12, 34, 30, tzinfo=UTC)
UUID = "69eb0630-c830-4e7c-b073-043825edb62d"
TASK_PATH = f"/v1/task/{UUID}"
MARKER = "dispatcher-ref: 0190f3a1-8c2b-7d4e-9f00-123456789abc"

# The seed's 202 body, verbatim.
SEED_202 = b"""{
  "id": 207,
  "identity": "ticket:add (pending)",
  "metadata": {
    "scope": "api-task",
    "uri": "/v1/task/69eb0630-c830-4e7c-b073-043825edb62d"
  },
  "status": "pending",
  "action": "ticket:add",
  "api_version": "0.5.0",
  "errors": {},
  "input": {},
  "request_date": 1644234130,
  "resolved_date": null,
  "resource": null,
  "staff_user": null,
  "user": {
    "id": 61420,
    "identity": "Nexcess Staff - nocworx-dev@nexcess.net",
    "metadata": {
      "scope": "user",
      "uri": "/v1/user/61420"
    }
  },
  "uuid": "69eb0630-c830-4e7c-b073-043825edb62d"
}"""
SEED_HEADERS = {"server": "nginx", "content-type": "application/json", "nocworx-api-version": "0.5.0"}


def adapter(template: str | None = None) -> NocWorxAdapter:
    return NocWorxAdapter(template, clock=lambda: NOW)


def raw(status: int | None, body: Any = None, headers: dict[str, str] | None = None) -> RawResponse:
    content = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    return RawResponse(status=status, headers=headers or {}, body=content, duration_ms=8.0)


def task(**changes: Any) -> dict[str, Any]:
    """The seed's task with some fields changed."""
    body: dict[str, Any] = json.loads(SEED_202)
    body.update(changes)
    return body


TICKET_RESOURCE = {"id": 1831, "identity": "XJVV-1831", "metadata": {"scope": "ticket", "uri": "/v1/ticket/1831"}}


def test_it_satisfies_the_provider_port() -> None:
    port: ProviderAdapter = adapter()
    assert port.provider == "nocworx"
    assert isinstance(adapter_for("nocworx", "https://portal.nexcess.net"), NocWorxAdapter)


def test_adapter_for_refuses_a_base_url_that_is_not_absolute() -> None:
    with pytest.raises(ValueError, match="base_url"):
        adapter_for("nocworx", "portal.nexcess.net")


# -- requests ------------------------------------------------------------------------------------

def test_create_request_matches_the_documented_example_and_has_no_priority() -> None:
    draft = TicketDraft(subject="It can't be DNS", body="It was DNS.", priority=Priority.urgent,
                        department="support", category="dns")
    spec = adapter().create_request(draft)
    assert (spec.op, spec.method, spec.path) == (Op.create, "POST", "/v1/ticket")
    assert spec.json == {"department": "support", "category": "dns", "subject": "It can't be DNS",
                         "comment": "It was DNS."}


def test_create_request_sends_service_id_as_integer_and_recipients() -> None:
    draft = TicketDraft(subject="s", body="b", priority=Priority.low, department="billing",
                        service=ServiceRef(type="hosting", id="4242"), cc=("ops@example.com",))
    assert adapter().create_request(draft).json == {
        "department": "billing", "subject": "s", "comment": "b", "service_id": 4242,
        "recipients": ["ops@example.com"]}


def test_create_request_refuses_a_non_integer_service_id() -> None:
    draft = TicketDraft(subject="s", body="b", priority=Priority.low, department="support",
                        service=ServiceRef(type="hosting", id="acct_1"))
    with pytest.raises(ValueError, match="integers"):
        adapter().create_request(draft)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (NocWorxAdapter().ticket_request("1831"), RequestSpec(Op.ticket, "GET", "/v1/ticket/1831")),
        (NocWorxAdapter().reply_request("1831", "more"),
         RequestSpec(Op.reply, "POST", "/v1/ticket/1831/comment", json={"comment": "more"})),
        (NocWorxAdapter().reopen_request("1831"), RequestSpec(Op.reopen, "POST", "/v1/ticket/1831/open")),
        (NocWorxAdapter().close_request("1831"), RequestSpec(Op.close, "POST", "/v1/ticket/1831/close")),
        (NocWorxAdapter().task_request(TASK_PATH), RequestSpec(Op.poll, "GET", TASK_PATH)),
        (NocWorxAdapter().task_request(TASK_PATH + "/"), RequestSpec(Op.poll, "GET", TASK_PATH)),
        (NocWorxAdapter().task_request(UUID), RequestSpec(Op.poll, "GET", TASK_PATH)),
    ],
)
def test_request_builders(spec: RequestSpec, expected: RequestSpec) -> None:
    assert spec == expected


@pytest.mark.parametrize(
    "path",
    [
        f"https://evil.example{TASK_PATH}",
        f"//evil.example{TASK_PATH}",
        "/v1/ticket/1831",
        "/v1/task/../user/1",
        f"{TASK_PATH}?x=1",
        "",
    ],
)
def test_task_request_never_leaves_the_target_or_the_task_endpoint(path: str) -> None:
    with pytest.raises(ValueError):
        adapter().task_request(path)


def test_departments_are_the_documented_fixed_list() -> None:
    a = adapter()
    assert a.departments_request() is None
    assert a.department_slugs(Outcome(Verdict.done)) == ["support", "billing", "sales", "migrations"]


def test_find_requests_read_recent_tasks_then_tickets_by_subject() -> None:
    assert adapter().find_requests_for_marker("Disk full") == [
        RequestSpec(Op.find, "GET", "/v1/task", params={
            "filter[action]": "ticket:add", "sortBy": "request_date", "sortOrder": "DESC", "pageSize": 100}),
        RequestSpec(Op.find, "GET", "/v1/ticket", params={
            "filter[subject]": "Disk full", "sortBy": "id", "sortOrder": "DESC"}),
    ]


# -- 202: where to poll ---------------------------------------------------------------------------

def test_seed_202_without_location_polls_metadata_uri() -> None:
    outcome = adapter().classify(Op.create, raw(202, SEED_202, SEED_HEADERS))
    assert outcome.verdict is Verdict.poll
    assert outcome.task_uuid == UUID
    assert outcome.poll_path == TASK_PATH
    assert outcome.ticket is None


@pytest.mark.parametrize(
    ("body", "headers", "poll_path"),
    [
        (task(), {"location": "/v1/task/aaaa-1111"}, "/v1/task/aaaa-1111"),                 # Location wins
        (task(), {"Location": f"https://portal.nexcess.net{TASK_PATH}/"}, TASK_PATH),     # absolute, same path
        (task(), {"location": f"https://evil.example{TASK_PATH}"}, TASK_PATH),            # host is dropped
        (task(), {"location": "/v1/user/61420"}, TASK_PATH),                              # not a task: ignored
        (task(metadata={"scope": "api-task", "uri": TASK_PATH + "/"}), {}, TASK_PATH),   # trailing slash
        (task(metadata={"scope": "api-task", "uri": "//evil.example/x"}), {}, TASK_PATH),
        (task(metadata=None), {}, TASK_PATH),                                             # uuid fallback
        (b"", {"location": TASK_PATH}, TASK_PATH),                                        # no body at all
    ],
)
def test_202_poll_path_comes_from_location_then_metadata_uri_then_uuid(
    body: Any, headers: dict[str, str], poll_path: str
) -> None:
    outcome = adapter().classify(Op.create, raw(202, body, headers))
    assert outcome.verdict is Verdict.poll
    assert outcome.poll_path == poll_path
    assert outcome.task_uuid == (UUID if body else poll_path.rsplit("/", 1)[1])


def test_202_without_any_task_reference_is_final_and_says_the_write_may_have_happened() -> None:
    outcome = adapter().classify(Op.create, raw(202, {"status": "pending"}))
    assert outcome.verdict is Verdict.final
    assert outcome.error_code == "task_reference_missing"


def test_202_with_an_unreadable_body_and_no_location_is_unexpected() -> None:
    outcome = adapter().classify(Op.create, raw(202, b"<html>accepted</html>"))
    assert outcome.verdict is Verdict.final
    assert outcome.error_code == "unexpected_response"


@pytest.mark.parametrize("op", [Op.reply, Op.reopen, Op.close])
def test_comment_open_and_close_are_polled_too(op: Op) -> None:
    body = task(action={"reply": "ticket:comment", "reopen": "ticket:open", "close": "ticket:close"}[op.value])
    outcome = adapter().classify(op, raw(202, body))
    assert outcome.verdict is Verdict.poll
    assert outcome.poll_path == TASK_PATH


# -- task:show ------------------------------------------------------------------------------------

def test_pending_task_keeps_polling() -> None:
    outcome = adapter().classify(Op.poll, raw(200, task()))
    assert (outcome.verdict, outcome.task_uuid, outcome.poll_path) == (Verdict.poll, UUID, TASK_PATH)


def test_successful_task_with_a_ticket_resource_is_done_with_the_ticket() -> None:
    body = task(status="success", resolved_date=1644234190, resource=TICKET_RESOURCE)
    outcome = adapter("https://portal.nexcess.net/tickets/{id}").classify(Op.poll, raw(200, body))
    assert outcome.verdict is Verdict.done
    assert outcome.resource_path == "/v1/ticket/1831"
    assert outcome.ticket == TicketRef(provider_id="1831", number="XJVV-1831",
                                       url="https://portal.nexcess.net/tickets/1831")
    assert outcome.task_uuid == UUID


@pytest.mark.parametrize(
    ("resource", "resource_path", "ticket"),
    [
        (None, None, None),  # the caller then finds it through ticket:list by subject
        ({"id": 1831, "identity": "ticket 1831"}, "/v1/ticket/1831", TicketRef(provider_id="1831")),
        ({"id": 1831, "identity": "XJVV-1831", "metadata": {"scope": "ticket", "uri": "/v1/ticket/1831/"}},
         "/v1/ticket/1831", TicketRef(provider_id="1831", number="XJVV-1831")),
        ({"id": 9, "identity": "comment", "metadata": {"scope": "ticket-comment", "uri": "/v1/ticket-comment/9"}},
         "/v1/ticket-comment/9", None),
    ],
)
def test_successful_task_resource_shapes(
    resource: Any, resource_path: str | None, ticket: TicketRef | None
) -> None:
    outcome = adapter().classify(Op.poll, raw(200, task(status="success", resolved_date=1644234190,
                                                        resource=resource)))
    assert outcome.verdict is Verdict.done
    assert outcome.resource_path == resource_path
    assert outcome.ticket == ticket


@pytest.mark.parametrize(
    ("status", "errors", "code", "message"),
    [
        ("failure", {"message": "Department is closed"}, "task_failure", "Department is closed"),
        ("failure", {}, "task_failure", "the task ended with status 'failure' and gave no reason"),
        ("rejected", [], "task_rejected", "the task ended with status 'rejected' and gave no reason"),
        ("rejected", [{"message": "Not allowed"}, {"message": "Try later"}], "task_rejected",
         "Not allowed; Try later"),
        ("something-new", None, "task_something_new",
         "the task ended with status 'something-new' and gave no reason"),
        ("Failure", "It broke", "task_failure", "It broke"),
    ],
)
def test_any_task_status_but_pending_or_success_is_final(
    status: str, errors: Any, code: str, message: str
) -> None:
    outcome = adapter().classify(Op.poll, raw(200, task(status=status, errors=errors, resolved_date=1644234190)))
    assert outcome.verdict is Verdict.final
    assert outcome.error_code == code
    assert outcome.error_message == message
    assert outcome.task_uuid == UUID


def test_task_errors_with_references_name_the_fields() -> None:
    errors = [{"message": "This input is required", "reference": "subject"}]
    outcome = adapter().classify(Op.poll, raw(200, task(status="failure", errors=errors)))
    assert outcome.field_errors == (FieldProblem("subject", "This input is required"),)


def test_resolved_pending_task_with_a_resource_counts_as_done() -> None:
    outcome = adapter().classify(Op.poll, raw(200, task(resolved_date=1644234190, resource=TICKET_RESOURCE)))
    assert outcome.verdict is Verdict.done
    assert outcome.ticket is not None
    assert outcome.ticket.provider_id == "1831"


def test_resolved_pending_task_without_a_resource_is_final() -> None:
    outcome = adapter().classify(Op.poll, raw(200, task(resolved_date=1644234190)))
    assert outcome.verdict is Verdict.final
    assert outcome.error_message == "task resolved without a status"


def test_task_404_right_after_the_202_is_retried() -> None:
    outcome = adapter().classify(Op.poll, raw(404, {"message": "Not Found"}))
    assert outcome.verdict is Verdict.retry
    assert outcome.error_code == "task_not_found"


# -- tickets ---------------------------------------------------------------------------------------

SHOWN = {"id": 1831, "identity": "XJVV-1831", "mask": "XJVV-1831", "subject": "It can't be DNS",
         "is_closed": False, "department": {"id": 2, "identity": "support"}, "status": {"id": 1, "identity": "Open"},
         "comments": [{"body": f"It was DNS.\n\n--\n{MARKER}"}]}


def test_ticket_show_is_done_with_mask_department_and_closed_flag() -> None:
    outcome = adapter("https://portal.nexcess.net/tickets/{number}").classify(Op.ticket, raw(200, SHOWN))
    assert outcome.verdict is Verdict.done
    assert outcome.ticket == TicketRef(provider_id="1831", number="XJVV-1831",
                                       url="https://portal.nexcess.net/tickets/XJVV-1831",
                                       department="support", subject="It can't be DNS", is_closed=False)


def test_ticket_show_reports_a_closed_ticket() -> None:
    outcome = adapter().classify(Op.ticket, raw(200, {**SHOWN, "is_closed": 1}))
    assert outcome.ticket is not None
    assert outcome.ticket.is_closed is True


def test_ticket_list_is_done_with_items_and_candidates_by_subject() -> None:
    listing = [{"id": 1832, "subject": "Disk full"}, {"id": 1831, "subject": "Other"},
               {"id": 1700, "subject": "disk full"}]
    a = adapter()
    outcome = a.classify(Op.find, raw(200, listing, {"content-range": "items 1-3/3"}))
    assert outcome.verdict is Verdict.done
    assert outcome.items == tuple(listing)
    assert a.candidate_ids(outcome, "Disk full") == ["1832", "1700"]


def test_ticket_list_past_the_end_is_done_and_empty() -> None:
    outcome = adapter().classify(Op.find, raw(416, b""))
    assert outcome.verdict is Verdict.done
    assert outcome.items == ()


def test_task_list_finds_our_task_by_the_marker_in_its_input() -> None:
    tasks = [
        task(uuid="bbbb-2222", metadata={"uri": "/v1/task/bbbb-2222"}, input={"subject": "x", "comment": "other"}),
        task(status="success", resolved_date=1644234190, resource=TICKET_RESOURCE,
             input={"subject": "Disk full", "comment": f"Disk full\n\n--\n{MARKER}"}),
    ]
    a = adapter()
    outcome = a.classify(Op.find, raw(200, tasks))
    match = a.match_marker(outcome, MARKER)
    assert match is not None
    assert match.verdict is Verdict.done
    assert match.ticket is not None
    assert match.ticket.provider_id == "1831"
    assert a.candidate_ids(outcome, "Disk full") == ["1831"]


def test_a_pending_task_found_by_marker_is_polled_not_resent() -> None:
    tasks = [task(input={"subject": "Disk full", "comment": f"Disk full\n{MARKER}"})]
    a = adapter()
    match = a.match_marker(a.classify(Op.find, raw(200, tasks)), MARKER)
    assert match is not None
    assert (match.verdict, match.poll_path) == (Verdict.poll, TASK_PATH)


def test_no_marker_no_match() -> None:
    a = adapter()
    assert a.match_marker(a.classify(Op.find, raw(200, [task(input={"comment": "x"})])), MARKER) is None
    assert a.match_marker(a.classify(Op.ticket, raw(200, {**SHOWN, "comments": []})), MARKER) is None


def test_a_ticket_showing_the_marker_is_our_ticket() -> None:
    a = adapter()
    match = a.match_marker(a.classify(Op.ticket, raw(200, SHOWN)), MARKER)
    assert match is not None
    assert match.ticket is not None
    assert match.ticket.provider_id == "1831"


# -- errors -------------------------------------------------------------------------------------

def test_nocworx_422_is_final_with_fields_named_by_reference() -> None:
    body = {"message": "Unprocessable Entity", "errors": [
        {"message": "This input is required", "reference": "subject"},
        {"message": "Invalid value", "reference": "department"}]}
    outcome = adapter().classify(Op.create, raw(422, body))
    assert outcome.verdict is Verdict.final
    assert outcome.error_code == "invalid_input"
    assert outcome.field_errors == (FieldProblem("subject", "This input is required"),
                                    FieldProblem("department", "Invalid value"))
    assert outcome.error_message == (
        "Unprocessable Entity: subject: This input is required; department: Invalid value")


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("op", [Op.create, Op.poll, Op.ticket])
def test_nocworx_refused_credentials_pause_the_target(status: int, op: Op) -> None:
    assert adapter().classify(op, raw(status, {"message": "nope"})).verdict is Verdict.pause


@pytest.mark.parametrize("op", [Op.ticket, Op.reply, Op.create])
def test_nocworx_404_outside_polling_is_final(op: Op) -> None:
    outcome = adapter().classify(op, raw(404, {"message": "Not Found"}))
    assert (outcome.verdict, outcome.error_code, outcome.error_message) == (Verdict.final, "not_found", "Not Found")


@pytest.mark.parametrize(
    ("status", "headers", "retry_after"),
    [
        (429, {"retry-after": "20"}, 20.0),
        (503, {"Retry-After": "Mon, 27 Apr 2026 12:35:00 GMT"}, 30.0),
        (503, {}, None),
        (500, {}, None),
        (502, {"retry-after": "1"}, 1.0),
    ],
)
def test_nocworx_busy_and_server_errors_are_retried(
    status: int, headers: dict[str, str], retry_after: float | None
) -> None:
    outcome = adapter().classify(Op.create, raw(status, b"<html>busy</html>", headers))
    assert outcome.verdict is Verdict.retry
    assert outcome.retry_after == retry_after


@pytest.mark.parametrize(
    ("op", "status", "body"),
    [(Op.ticket, 200, b"not json"), (Op.find, 200, {"not": "a list"}), (Op.create, 400, b""), (Op.poll, 302, b"")],
)
def test_nocworx_unreadable_answers_are_final(op: Op, status: int, body: Any) -> None:
    outcome = adapter().classify(op, raw(status, body))
    assert outcome.verdict is Verdict.final
    assert outcome.error_code == "unexpected_response"


def test_nocworx_network_error_is_retried() -> None:
    response = RawResponse(None, {}, b"", 5000.0, network_error="ConnectError: refused", maybe_delivered=False)
    assert adapter().classify(Op.poll, response) == Outcome(
        Verdict.retry, error_code="network", error_message="ConnectError: refused")


def test_rate_limit_headers_are_kept_when_present() -> None:
    outcome = adapter().classify(Op.create, raw(202, SEED_202, {"x-ratelimit-remaining": "4"}))
    assert outcome.rate_limit is not None
    assert outcome.rate_limit.remaining == 4
