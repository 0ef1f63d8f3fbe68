"""NocWorx (Nexcess portal) API v1: request builders and the one function that sorts its answers.

Every write is queued: the API answers 202 with a task, and the task (``GET /v1/task/<uuid>``) tells
whether the write happened. So a 202 is never "done" and never resent: it is polled. Task paths come
from the provider (``Location`` or ``metadata.uri``); we keep only a ``/v1/task/<uuid>`` path from
them, which the transport sends to the configured host, never to a host named in the answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

from dispatcher.domain import NOCWORX_DEPARTMENTS, Provider
from dispatcher.errors import FieldProblem
from dispatcher.providers.base import (
    Op,
    Outcome,
    RawResponse,
    RequestSpec,
    TicketDraft,
    TicketRef,
    Verdict,
    safe_relative_path,
)
from dispatcher.providers.headers import parse_rate_limit, parse_retry_after

Clock = Callable[[], datetime]

#: how many recent tasks a reconciliation reads per page
FIND_PAGE_SIZE = 100
#: NocWorx's page size when none is asked for
DEFAULT_PAGE_SIZE = 20
_UNREADABLE = object()
_SNIPPET_CHARS = 300
_TASK_PATH = re.compile(r"^/v1/task/([A-Za-z0-9-]{1,64})$")
_TASK_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_TICKET_PATH = re.compile(r"^/v1/ticket/[^/]+$")
#: a ticket mask such as ``XJVV-1831``
_MASK = re.compile(r"^[A-Za-z0-9]+-[0-9]+$")
_WRITE_OPS = frozenset({Op.create, Op.reply, Op.reopen, Op.close})
_DEFAULT_CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    408: "request_timeout",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
}


def _utcnow() -> datetime:
    return datetime.now(UTC)


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


def _id_text(value: Any) -> str | None:
    """NocWorx ids are integers; accept numeric strings, refuse booleans."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    return (value.strip() or None) if isinstance(value, str) else None


def _same_subject(left: Any, right: str) -> bool:
    return isinstance(left, str) and " ".join(left.split()).casefold() == " ".join(right.split()).casefold()


def _contains(value: Any, needle: str) -> bool:
    """Whether any string inside a JSON value holds ``needle`` (case-insensitive)."""
    if isinstance(value, str):
        return needle in value.casefold()
    if isinstance(value, dict):
        return any(_contains(item, needle) for item in value.values())
    if isinstance(value, list):
        return any(_contains(item, needle) for item in value)
    return False


def _path_of(uri: Any) -> str | None:
    """The path of a provider-given URI (relative or absolute), trailing slash removed, if safe."""
    if not isinstance(uri, str) or not uri.strip():
        return None
    try:
        path = urlsplit(uri.strip()).path.rstrip("/")
        return safe_relative_path(path)
    except ValueError:
        return None


def task_path(uri: Any) -> str | None:
    """A ``/v1/task/<uuid>`` path taken from a Location header or ``metadata.uri``, else None.

    Only the path is kept: the transport sends it to the configured host, so a URI naming another
    host can never send us there.
    """
    path = _path_of(uri)
    return path if path is not None and _TASK_PATH.match(path) else None


def _task_errors(errors: Any, status: str) -> tuple[str, tuple[FieldProblem, ...]]:
    """Read ``errors`` whatever its shape ({}, [], {"message"}, [{"message", "reference"}])."""
    messages: list[str] = []
    problems: list[FieldProblem] = []
    if isinstance(errors, str) and errors.strip():
        messages.append(errors.strip())
    elif isinstance(errors, dict):
        if _text(errors.get("message")):
            messages.append(errors["message"])
        else:
            messages.extend(f"{key}: {value}" for key, value in errors.items() if _text(value))
    elif isinstance(errors, list):
        for item in errors:
            if isinstance(item, str) and item.strip():
                messages.append(item.strip())
            elif isinstance(item, dict) and _text(item.get("message")):
                messages.append(item["message"])
                if _text(item.get("reference")):
                    problems.append(FieldProblem(item["reference"], item["message"]))
    text = "; ".join(messages) or f"the task ended with status {status!r} and gave no reason"
    return text, tuple(problems)


class NocWorxAdapter:
    """Builds NocWorx v1 requests and classifies NocWorx answers, tasks included. Pure: no I/O."""

    provider: Provider = Provider.nocworx

    def __init__(self, ticket_url_template: str | None = None, *, clock: Clock | None = None) -> None:
        if ticket_url_template is not None:
            try:
                ticket_url_template.format(id="x", number="1")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"ticket_url_template may use only {{id}} and {{number}}: {ticket_url_template!r}"
                ) from exc
        self._url_template = ticket_url_template
        self._clock = clock or _utcnow

    def __repr__(self) -> str:
        return f"NocWorxAdapter(ticket_url_template={self._url_template!r})"

    # -- requests ------------------------------------------------------------------------------

    def departments_request(self) -> RequestSpec | None:
        """NocWorx documents a fixed list of departments; there is nothing to ask."""
        return None

    def department_slugs(self, outcome: Outcome) -> list[str]:
        return list(NOCWORX_DEPARTMENTS)

    def create_request(self, draft: TicketDraft) -> RequestSpec:
        """ticket:add. NocWorx has no priority field; the draft's priority is not sent."""
        body: dict[str, Any] = {"department": draft.department}
        if draft.category is not None:
            body["category"] = draft.category
        body["subject"] = draft.subject
        body["comment"] = draft.body
        if draft.service is not None:
            if not draft.service.id.strip().isdigit():
                raise ValueError(f"NocWorx service ids are integers, got {draft.service.id!r}")
            body["service_id"] = int(draft.service.id)
        if draft.cc:
            body["recipients"] = list(draft.cc)
        return RequestSpec(Op.create, "POST", "/v1/ticket", json=body)

    def task_request(self, poll_path: str) -> RequestSpec:
        """task:show. Takes a ``/v1/task/<uuid>`` path (trailing slash allowed) or a bare uuid."""
        candidate = poll_path.strip()
        if _TASK_ID.match(candidate):
            return RequestSpec(Op.poll, "GET", f"/v1/task/{candidate}")
        try:
            path = safe_relative_path(candidate).rstrip("/")
        except ValueError:
            path = ""
        if _TASK_PATH.match(path):
            return RequestSpec(Op.poll, "GET", path)
        raise ValueError(f"not a NocWorx task path on the target's host: {poll_path[:200]!r}")

    def ticket_request(self, ticket_id: str) -> RequestSpec:
        return RequestSpec(Op.ticket, "GET", f"/v1/ticket/{self._quote(ticket_id)}")

    def reply_request(self, ticket_id: str, message: str) -> RequestSpec:
        return RequestSpec(Op.reply, "POST", f"/v1/ticket/{self._quote(ticket_id)}/comment",
                           json={"comment": message})

    def reopen_request(self, ticket_id: str) -> RequestSpec:
        return RequestSpec(Op.reopen, "POST", f"/v1/ticket/{self._quote(ticket_id)}/open")

    def close_request(self, ticket_id: str) -> RequestSpec:
        return RequestSpec(Op.close, "POST", f"/v1/ticket/{self._quote(ticket_id)}/close")

    def find_requests_for_marker(self, subject: str) -> list[RequestSpec]:
        """Recent ticket:add tasks (their ``input`` echoes our comment), then tickets by subject."""
        return [
            RequestSpec(Op.find, "GET", "/v1/task", params={
                "filter[action]": "ticket:add", "sortBy": "request_date", "sortOrder": "DESC",
                "pageSize": FIND_PAGE_SIZE,
            }),
            RequestSpec(Op.find, "GET", "/v1/ticket", params={
                "filter[subject]": subject, "sortBy": "id", "sortOrder": "DESC",
            }),
        ]

    def next_find_request(self, spec: RequestSpec, outcome: Outcome, since: datetime) -> RequestSpec | None:
        """The next ``page`` of a task or ticket list while this one was full and its oldest item
        (``request_date`` / ``date_created``, epoch seconds) is not older than ``since``. An item
        without a readable date proves nothing, so paging goes on; past the end NocWorx answers 416."""
        if spec.path not in ("/v1/task", "/v1/ticket"):
            return None
        params = dict(spec.params or {})
        size, page = int(params.get("pageSize", DEFAULT_PAGE_SIZE)), int(params.get("page", 1))
        if len(outcome.items) < size:
            return None
        dates = [item.get("request_date" if spec.path == "/v1/task" else "date_created")
                 for item in outcome.items if isinstance(item, dict)]
        readable = [d for d in dates if isinstance(d, int | float) and not isinstance(d, bool)]
        if dates and len(readable) == len(dates) and min(readable) < since.timestamp():
            return None
        return replace(spec, params={**params, "page": page + 1})

    def candidate_ids(self, outcome: Outcome, subject: str) -> list[str]:
        """Ticket ids with this subject: from a ticket list, or from resolved ticket:add tasks."""
        ids: list[str] = []
        for item in outcome.items:
            if not isinstance(item, dict):
                continue
            if self._is_task(item):
                task_input, resource = item.get("input"), item.get("resource")
                if (isinstance(task_input, dict) and _same_subject(task_input.get("subject"), subject)
                        and isinstance(resource, dict) and (rid := _id_text(resource.get("id")))):
                    ids.append(rid)
            elif _same_subject(item.get("subject"), subject) and (tid := _id_text(item.get("id"))):
                ids.append(tid)
        return list(dict.fromkeys(ids))

    def match_marker(self, outcome: Outcome, marker: str) -> Outcome | None:
        """The task whose ``input.comment`` holds the marker (sorted as a poll answer), or a ticket
        whose text holds it."""
        needle = marker.casefold()
        for item in outcome.items:
            if not isinstance(item, dict):
                continue
            if self._is_task(item):
                task_input = item.get("input")
                if isinstance(task_input, dict) and _contains(task_input.get("comment"), needle):
                    return self._task_outcome(item, None)
            elif _contains(item, needle) and (ticket := self._ticket_ref(item)) is not None:
                return Outcome(Verdict.done, ticket=ticket, data=item)
        if outcome.ticket is not None and isinstance(outcome.data, dict) and _contains(outcome.data, needle):
            return Outcome(Verdict.done, ticket=outcome.ticket, data=outcome.data)
        return None

    @staticmethod
    def _quote(ticket_id: str) -> str:
        if not ticket_id:
            raise ValueError("ticket id must not be empty")
        return quote(ticket_id, safe="")

    # -- answers -------------------------------------------------------------------------------

    def classify(self, op: Op, response: RawResponse) -> Outcome:
        """Sort any NocWorx answer into done / poll / retry / final / pause."""
        if response.status is None:
            return Outcome(Verdict.retry, error_code="network",
                           error_message=response.network_error or "no response")
        now = self._clock()
        status = response.status
        payload = _parse_json(response.body)
        rate_limit = parse_rate_limit(response.headers, now)
        if 200 <= status < 300:
            outcome = self._success(op, payload, _header(response.headers, "location"))
            if outcome is None:
                outcome = Outcome(Verdict.final, error_code="unexpected_response",
                                  error_message=f"HTTP {status} to {op.value} with an unreadable body: "
                                                f"{_snippet(response.body) or '(empty)'}")
            return replace(outcome, rate_limit=rate_limit)
        if status == 416 and op is Op.find:
            return Outcome(Verdict.done, data=[], rate_limit=rate_limit)  # paged past the end

        body = payload if isinstance(payload, dict) else {}
        error = Outcome(
            Verdict.final,
            error_code=_DEFAULT_CODES.get(status) or ("server_error" if status >= 500 else "unexpected_response"),
            error_message=_text(body.get("message")) or _snippet(response.body) or f"HTTP {status}",
            rate_limit=rate_limit,
        )
        if status in {401, 403}:
            return replace(error, verdict=Verdict.pause)
        if status == 404 and op is Op.poll:
            # documented: a task can 404 briefly right after its 202
            return replace(error, verdict=Verdict.retry, error_code="task_not_found")
        if status == 422:
            return self._invalid(body, error)
        if status in {408, 429} or status >= 500:
            retry_after = parse_retry_after(_header(response.headers, "retry-after"), now)
            return replace(error, verdict=Verdict.retry, retry_after=retry_after)
        if 300 <= status < 400:
            location = _header(response.headers, "location") or "(none)"
            return replace(error, error_code="unexpected_response",
                           error_message=f"HTTP {status} redirect to {location} (redirects are not followed)")
        return error

    def _success(self, op: Op, payload: Any, location: str | None) -> Outcome | None:
        """A 2xx answer, or None when its body is not what the operation returns."""
        if op in _WRITE_OPS:
            task = payload if isinstance(payload, dict) else {}
            if not task and task_path(location) is None:
                return None
            return self._task_outcome(task, location, accepted=True)
        if payload is _UNREADABLE:
            return None
        if op is Op.poll:
            return self._task_outcome(payload, None) if isinstance(payload, dict) else None
        if op is Op.ticket:
            ticket = self._ticket_ref(payload)
            return None if ticket is None else Outcome(Verdict.done, ticket=ticket, data=payload)
        if op is Op.find and isinstance(payload, list):
            return Outcome(Verdict.done, data=payload, items=tuple(payload))
        return None

    def _task_outcome(self, task: dict[str, Any], location: str | None, *, accepted: bool = False) -> Outcome:
        """Sort a task body: pending → poll, success → done, anything else → final.

        ``accepted``: the body answers our write (202); a task there without a status is pending.
        """
        uuid = _text(task.get("uuid"))
        if uuid is not None and not _TASK_ID.match(uuid):
            uuid = None
        metadata = task.get("metadata")
        uri = metadata.get("uri") if isinstance(metadata, dict) else None
        poll_path = task_path(location) or task_path(uri) or (f"/v1/task/{uuid}" if uuid else None)
        if poll_path is None:
            return Outcome(Verdict.final, error_code="task_reference_missing", data=task,
                           error_message="accepted (202) without a task to poll; the write may have happened")
        if uuid is None:
            match = _TASK_PATH.match(poll_path)
            uuid = match.group(1) if match else None
        common = Outcome(Verdict.poll, task_uuid=uuid, poll_path=poll_path, data=task or None)

        raw_status = task.get("status")
        status = raw_status.strip().lower() if isinstance(raw_status, str) else ""
        resolved = task.get("resolved_date") is not None
        resource = task.get("resource")
        if not resolved and (status == "pending" or (accepted and not status)):
            return common
        if status == "success" or (status in {"", "pending"} and resolved and isinstance(resource, dict)):
            resource_path, ticket = self._resource(resource, _text(task.get("action")))
            return replace(common, verdict=Verdict.done, resource_path=resource_path, ticket=ticket)
        if status in {"", "pending"}:
            message = "task resolved without a status" if resolved else "task without a status"
            return replace(common, verdict=Verdict.final, error_code="task_unresolved", error_message=message)
        message, problems = _task_errors(task.get("errors"), status)
        code = "task_" + re.sub(r"[^a-z0-9]+", "_", status).strip("_")
        return replace(common, verdict=Verdict.final, error_code=code, error_message=message,
                       field_errors=problems)

    def _resource(self, resource: Any, action: str | None) -> tuple[str | None, TicketRef | None]:
        """What a successful task made: its path and, when it is a ticket, the ticket."""
        if not isinstance(resource, dict):
            return None, None
        resource_id = _id_text(resource.get("id"))
        metadata = resource.get("metadata")
        scope = metadata.get("scope") if isinstance(metadata, dict) else None
        path = _path_of(metadata.get("uri")) if isinstance(metadata, dict) else None
        is_ticket = (scope == "ticket" or (path is not None and _TICKET_PATH.match(path) is not None)
                     or (scope is None and path is None and action in {None, "ticket:add"}))
        if not is_ticket or resource_id is None:
            return path, None
        path = path or f"/v1/ticket/{quote(resource_id, safe='')}"
        identity = _text(resource.get("identity"))
        number = identity if identity is not None and _MASK.match(identity) else None
        return path, TicketRef(provider_id=resource_id, number=number, url=self._url(resource_id, number))

    def _ticket_ref(self, payload: Any) -> TicketRef | None:
        """ticket:show (or a ticket:list item) as a TicketRef."""
        if not isinstance(payload, dict) or (ticket_id := _id_text(payload.get("id"))) is None:
            return None
        number = next((text for key in ("identity", "mask")
                       if (text := _text(payload.get(key))) is not None and _MASK.match(text)), None)
        department = payload.get("department")
        if isinstance(department, dict):
            department = _text(department.get("identity")) or _text(department.get("name"))
        is_closed = payload.get("is_closed")
        return TicketRef(
            provider_id=ticket_id,
            number=number,
            url=self._url(ticket_id, number),
            department=_text(department),
            subject=_text(payload.get("subject")),
            is_closed=bool(is_closed) if isinstance(is_closed, bool | int) else None,
        )

    def _url(self, ticket_id: str, number: str | None) -> str | None:
        if self._url_template is None:
            return None
        return self._url_template.format(id=quote(ticket_id, safe=""), number=quote(number or "", safe=""))

    @staticmethod
    def _is_task(item: dict[str, Any]) -> bool:
        return "uuid" in item and ("action" in item or "resolved_date" in item)

    @staticmethod
    def _invalid(body: dict[str, Any], error: Outcome) -> Outcome:
        """422: the provider's ``errors[].reference`` name the fields."""
        problems = []
        errors = body.get("errors")
        if isinstance(errors, list):
            for item in errors:
                if isinstance(item, dict):
                    problems.append(FieldProblem(_text(item.get("reference")) or "body",
                                                 _text(item.get("message")) or "invalid"))
        message = _text(body.get("message")) or "Unprocessable Entity"
        if problems:
            message = f"{message}: " + "; ".join(str(problem) for problem in problems)
        return replace(error, error_code="invalid_input", error_message=message, field_errors=tuple(problems))
