"""HostUp API v2: request builders and the one function that sorts its answers.

HostUp answers synchronously (201 with the ticket) and reports every error as RFC 7807 Problem
Details; we branch on ``code`` and status, never on wording, with one documented exception: the
``rate_limited`` 429 whose detail says a critical alert was already sent this hour. Retrying that one
as is can never succeed, so it is final and the caller's policy decides (reply, or downgrade).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from dispatcher.domain import Provider
from dispatcher.errors import FieldProblem
from dispatcher.providers.base import (
    Op,
    Outcome,
    RawResponse,
    RequestSpec,
    TicketDraft,
    TicketRef,
    Verdict,
)
from dispatcher.providers.headers import parse_rate_limit, parse_retry_after

Clock = Callable[[], datetime]

#: how many recent tickets a reconciliation reads (the API's maximum page)
FIND_PAGE_SIZE = 100
_UNREADABLE = object()
_SNIPPET_CHARS = 300
_DEFAULT_CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    408: "request_timeout",
    409: "conflict",
    429: "rate_limit_exceeded",
    500: "internal_error",
    502: "bad_gateway",
    503: "upstream_unavailable",
    504: "gateway_timeout",
}


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso_time(value: Any) -> datetime | None:
    """HostUp's ISO 8601 timestamps (``...Z``), aware; None when unreadable."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _parse_json(body: bytes) -> Any:
    if not body.strip():
        return _UNREADABLE
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return _UNREADABLE


def _snippet(body: bytes) -> str:
    return " ".join(body.decode("utf-8", errors="replace").split())[:_SNIPPET_CHARS]


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return str(value)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _same_subject(left: Any, right: str) -> bool:
    """Whitespace and case are ignored: a provider may trim or re-case subjects."""
    return isinstance(left, str) and " ".join(left.split()).casefold() == " ".join(right.split()).casefold()


def _pointer_to_field(pointer: Any) -> str:
    """JSON Pointer ("/context/serviceId") to our dotted field names ("context.serviceId")."""
    if not isinstance(pointer, str) or pointer in {"", "/"}:
        return "body"
    parts = [part.replace("~1", "/").replace("~0", "~") for part in pointer.lstrip("/").split("/")]
    return ".".join(parts)


def check_url_template(template: str | None) -> str | None:
    """Fail at start-up, not at the first ticket, when a template names unknown placeholders."""
    if template is not None:
        try:
            template.format(id="x", number="1")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"ticket_url_template may use only {{id}} and {{number}}: {template!r}") from exc
    return template


class HostUpAdapter:
    """Builds HostUp v2 requests and classifies HostUp answers. Pure: no I/O."""

    provider: Provider = Provider.hostup

    def __init__(self, ticket_url_template: str | None = None, *, clock: Clock | None = None) -> None:
        self._url_template = check_url_template(ticket_url_template)
        self._clock = clock or _utcnow

    def __repr__(self) -> str:
        return f"HostUpAdapter(ticket_url_template={self._url_template!r})"

    # -- requests ------------------------------------------------------------------------------

    def departments_request(self) -> RequestSpec | None:
        return RequestSpec(Op.departments, "GET", "/support/departments")

    def department_slugs(self, outcome: Outcome) -> list[str]:
        if outcome.verdict is not Verdict.done or not isinstance(outcome.data, list):
            return []
        return [slug for slug in outcome.data if isinstance(slug, str) and slug]

    def create_request(self, draft: TicketDraft) -> RequestSpec:
        body: dict[str, Any] = {
            "departmentSlug": draft.department,
            "subject": draft.subject,
            "message": draft.body,
            "priority": draft.priority.value,
        }
        if draft.cc:
            body["ccEmails"] = list(draft.cc)
        if draft.service is not None:
            context = {"serviceType": draft.service.type, "serviceId": draft.service.id}
            if draft.service.name:
                context["serviceName"] = draft.service.name
            body["context"] = context
        if draft.critical_reason:
            body["criticalReason"] = draft.critical_reason
        return RequestSpec(Op.create, "POST", "/support/tickets", json=body)

    def task_request(self, poll_path: str) -> RequestSpec:
        """HostUp creates synchronously; there is never a task to poll."""
        raise NotImplementedError("HostUp has no asynchronous tasks to poll")

    def ticket_request(self, ticket_id: str) -> RequestSpec:
        return RequestSpec(Op.ticket, "GET", f"/support/tickets/{self._quote(ticket_id)}")

    def reply_request(self, ticket_id: str, message: str) -> RequestSpec:
        """Closed tickets refuse replies: reopen first (``reopen_request``)."""
        return RequestSpec(Op.reply, "POST", f"/support/tickets/{self._quote(ticket_id)}/messages",
                           json={"message": message})

    def reopen_request(self, ticket_id: str) -> RequestSpec:
        return RequestSpec(Op.reopen, "POST", f"/support/tickets/{self._quote(ticket_id)}/actions/reopen")

    def close_request(self, ticket_id: str) -> RequestSpec:
        return RequestSpec(Op.close, "POST", f"/support/tickets/{self._quote(ticket_id)}/actions/close")

    def find_requests_for_marker(self, subject: str) -> list[RequestSpec]:
        """The newest page of tickets; the list has no subject filter, so ``candidate_ids`` sorts it."""
        return [RequestSpec(Op.find, "GET", "/support/tickets", params={"limit": FIND_PAGE_SIZE})]

    def next_find_request(self, spec: RequestSpec, outcome: Outcome, since: datetime) -> RequestSpec | None:
        """The ticket list's next page (``nextCursor``) while this page's oldest ticket is not older than
        ``since``. An item without a readable ``createdAt`` proves nothing, so paging goes on."""
        if spec.path != "/support/tickets" or not isinstance(outcome.data, dict) or not outcome.items:
            return None
        cursor = _text(outcome.data.get("nextCursor"))
        if cursor is None:
            return None
        created = [_iso_time(item.get("createdAt")) for item in outcome.items if isinstance(item, dict)]
        if created and all(c is not None for c in created) and min(c for c in created if c) < since:
            return None
        return replace(spec, params={**dict(spec.params or {}), "cursor": cursor})

    def candidate_ids(self, outcome: Outcome, subject: str) -> list[str]:
        """List items omit the body, so matches by subject must be read in detail for the marker."""
        return [str(item["id"]) for item in outcome.items
                if isinstance(item, dict) and _text(item.get("id")) and _same_subject(item.get("subject"), subject)]

    def match_marker(self, outcome: Outcome, marker: str) -> Outcome | None:
        """A ticket detail whose body (or one of its messages) carries our marker is our ticket."""
        data = outcome.data
        if outcome.ticket is None or not isinstance(data, dict):
            return None
        texts: list[Any] = [data.get("body")]
        messages = data.get("messages")
        if isinstance(messages, list):
            texts.extend(message.get("body") for message in messages if isinstance(message, dict))
        needle = marker.casefold()
        if any(isinstance(text, str) and needle in text.casefold() for text in texts):
            return Outcome(Verdict.done, ticket=outcome.ticket, data=data, request_id=outcome.request_id)
        return None

    @staticmethod
    def _quote(ticket_id: str) -> str:
        if not ticket_id:
            raise ValueError("ticket id must not be empty")
        return quote(ticket_id, safe="")

    # -- answers -------------------------------------------------------------------------------

    def classify(self, op: Op, response: RawResponse) -> Outcome:
        """Sort any HostUp answer into done / retry / final / pause (HostUp never says poll)."""
        if response.status is None:
            return Outcome(Verdict.retry, error_code="network",
                           error_message=response.network_error or "no response")
        now = self._clock()
        status = response.status
        payload = _parse_json(response.body)
        rate_limit = parse_rate_limit(response.headers, now)
        header_request_id = _header(response.headers, "x-request-id")
        if 200 <= status < 300:
            outcome = self._success(op, payload)
            if outcome is None:
                outcome = Outcome(Verdict.final, error_code="unexpected_response",
                                  error_message=f"HTTP {status} to {op.value} with an unreadable body: "
                                                f"{_snippet(response.body) or '(empty)'}")
            return replace(outcome, rate_limit=rate_limit, request_id=header_request_id)

        problem = payload if isinstance(payload, dict) else {}
        code = _text(problem.get("code"))
        detail = _text(problem.get("detail")) or _text(problem.get("title"))
        retry_after = parse_retry_after(_header(response.headers, "retry-after"), now)
        error = Outcome(
            Verdict.final,
            error_code=code or _DEFAULT_CODES.get(status) or (
                "server_error" if status >= 500 else "unexpected_response"),
            error_message=detail or _snippet(response.body) or f"HTTP {status}",
            field_errors=self._field_errors(problem),
            request_id=_text(problem.get("requestId")) or header_request_id,
            rate_limit=rate_limit,
        )
        if status in {401, 403}:
            return replace(error, verdict=Verdict.pause)
        if status == 429:
            if code == "rate_limited" and detail is not None and "critical" in detail.casefold():
                # one critical ticket an hour: resending the same request can never succeed
                return replace(error, error_code="critical_rate_limited")
            return replace(error, verdict=Verdict.retry, retry_after=retry_after)
        if status >= 500 or status == 408:
            return replace(error, verdict=Verdict.retry, retry_after=retry_after)
        if status in {400, 404, 409}:
            return error
        if 300 <= status < 400:
            location = _header(response.headers, "location") or "(none)"
            return replace(error, error_code="unexpected_response",
                           error_message=f"HTTP {status} redirect to {location} (redirects are not followed)")
        return error

    def _success(self, op: Op, payload: Any) -> Outcome | None:
        """A 2xx answer, or None when its body is not what the operation returns."""
        if op in {Op.reply, Op.reopen, Op.close}:
            # the action happened; a body we cannot read is no reason to redo or fail it
            ticket = self._ticket_ref(payload) if op is not Op.reply else None
            return Outcome(Verdict.done, ticket=ticket, data=None if payload is _UNREADABLE else payload)
        if payload is _UNREADABLE:
            return None
        if op is Op.departments:
            departments = payload.get("departments") if isinstance(payload, dict) else payload
            if not isinstance(departments, list):
                return None
            slugs = [item["slug"] for item in departments if isinstance(item, dict) and _text(item.get("slug"))]
            return Outcome(Verdict.done, data=slugs, items=tuple(departments))
        if op in {Op.create, Op.ticket}:
            ticket = self._ticket_ref(payload)
            return None if ticket is None else Outcome(Verdict.done, ticket=ticket, data=payload)
        if op is Op.find:
            items = payload.get("data") if isinstance(payload, dict) else payload
            if not isinstance(items, list):
                return None
            return Outcome(Verdict.done, data=payload, items=tuple(items))
        return None  # Op.poll: HostUp has no tasks

    def _ticket_ref(self, payload: Any) -> TicketRef | None:
        if not isinstance(payload, dict):
            return None
        ticket_id = payload.get("id")
        if not _text(ticket_id) and not (isinstance(ticket_id, int) and not isinstance(ticket_id, bool)):
            return None
        number = payload.get("number")
        number_text = str(number) if isinstance(number, str | int) and not isinstance(number, bool) else None
        status = payload.get("status")
        return TicketRef(
            provider_id=str(ticket_id),
            number=number_text or None,
            url=self._url(str(ticket_id), number_text),
            department=_text(payload.get("departmentSlug")),
            subject=_text(payload.get("subject")),
            is_closed=(status == "closed") if isinstance(status, str) else None,
        )

    def _url(self, ticket_id: str, number: str | None) -> str | None:
        if self._url_template is None:
            return None
        return self._url_template.format(id=quote(ticket_id, safe=""), number=quote(number or "", safe=""))

    @staticmethod
    def _field_errors(problem: dict[str, Any]) -> tuple[FieldProblem, ...]:
        errors = problem.get("errors")
        if not isinstance(errors, list):
            return ()
        return tuple(
            FieldProblem(_pointer_to_field(item.get("pointer")),
                         _text(item.get("detail")) or _text(item.get("code")) or "invalid")
            for item in errors if isinstance(item, dict)
        )
