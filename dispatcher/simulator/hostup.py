"""HostUp API v2 support endpoints, as documented on developer.hostup.se.

Errors are RFC 7807 problem documents; validation is 400 ``invalid_request`` with JSON pointers;
critical tickets are limited per rolling hour with a 429 ``rate_limited`` that must not be retried.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dispatcher.simulator.common import (
    Dialect,
    DroppingResponse,
    Handler,
    json_response,
    provider_endpoint,
    read_json,
    retry_after_value,
)
from dispatcher.simulator.settings import SimulatorSettings
from dispatcher.simulator.state import HostUpMessage, HostUpTicket, RateLimited, SimState, iso_ms

PRIORITIES = ("low", "medium", "high", "urgent", "critical")
SERVICE_TYPES = ("domain", "hosting", "vps", "other")
STATUSES = ("open", "answered", "customer_reply", "in_progress", "on_hold", "closed", "unknown")
CREATE_FIELDS = frozenset({
    "departmentSlug", "subject", "message", "priority", "ccEmails", "context", "aiSummary",
    "aiHelpful", "criticalReason",
})
CONTEXT_FIELDS = frozenset({"serviceType", "serviceId", "serviceName"})
SUBJECT_MAX = 200
CRITICAL_DETAIL = "You already sent a critical alert in the last hour. Reply to the existing ticket instead."
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def problem(request: Request, state: SimState, status: int, code: str, title: str, detail: str, *,
            errors: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None) -> Response:
    """An RFC 7807 document shaped like HostUp's (type URL, code, requestId, timestamp)."""
    body: dict[str, Any] = {
        "type": f"https://developer.hostup.se/errors/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "instance": request.url.path,
        "requestId": state.public_id("req_"),
        "timestamp": iso_ms(time.time()),
    }
    if errors is not None:
        body["errors"] = errors
    return json_response(body, status, headers, media_type="application/problem+json")


def invalid(request: Request, state: SimState, errors: list[dict[str, str]]) -> Response:
    return problem(request, state, 400, "invalid_request", "Invalid request",
                   "The request body failed validation.", errors=errors)


def not_found(request: Request, state: SimState) -> Response:
    return problem(request, state, 404, "not_found", "Not found", "The requested resource could not be found.")


def field_error(pointer: str, detail: str) -> dict[str, str]:
    return {"pointer": pointer, "detail": detail, "code": "invalid_request"}


def rate_headers(limited: RateLimited, settings: SimulatorSettings) -> dict[str, str]:
    return {
        "Retry-After": retry_after_value(limited, settings),
        "X-RateLimit-Limit": str(limited.limit),
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": iso_ms(limited.reset_at),
    }


class HostUpDialect(Dialect):
    name = "hostup"

    def key(self, settings: SimulatorSettings) -> str:
        return settings.hostup_key

    def unauthorized(self, request: Request, state: SimState) -> Response:
        return problem(request, state, 401, "unauthorized", "Unauthorized", "Authentication is required.")

    def rate_limited(self, request: Request, state: SimState, limited: RateLimited) -> Response:
        return problem(request, state, 429, "rate_limit_exceeded", "Too many requests",
                       "Too many requests. Retry after the limit resets.",
                       headers=rate_headers(limited, state.settings))

    def server_error(self, request: Request, state: SimState) -> Response:
        status = state.rng.choice((500, 502, 503))
        if status == 500:
            return problem(request, state, 500, "internal_error", "Internal server error",
                           "An unexpected error occurred. Retry later or contact support if the issue "
                           "persists.")
        if status == 502:
            return problem(request, state, 502, "upstream_error", "Bad gateway",
                           "An upstream service returned an invalid response.")
        return problem(request, state, 503, "upstream_unavailable", "Service unavailable",
                       "An upstream service is temporarily unavailable.", headers={"Retry-After": "1"})


# -- validation -----------------------------------------------------------------------------------


def _optional_text(data: dict[str, Any], name: str, errors: list[dict[str, str]]) -> None:
    if name in data and data[name] is not None and not isinstance(data[name], str):
        errors.append(field_error(f"/{name}", f"`{name}` must be a string or null."))


def validate_create(data: Any, state: SimState) -> list[dict[str, str]]:
    """Every problem with a create body, each with the JSON pointer of the field at fault."""
    if not isinstance(data, dict):
        return [field_error("", "The request body must be a JSON object.")]
    errors: list[dict[str, str]] = []
    for name in sorted(set(data) - CREATE_FIELDS):
        if name == "accountId":
            errors.append(field_error("/accountId", "`accountId` is not accepted as a top-level ticket "
                                      "field. Link a service with `context.serviceType` and "
                                      "`context.serviceId`."))
        else:
            errors.append(field_error(f"/{_escape(name)}", f"Unknown field `{name}`."))

    slug = data.get("departmentSlug")
    slugs = [str(d.get("slug")) for d in state.settings.hostup_departments]
    if slug is None or (isinstance(slug, str) and not slug.strip()):
        errors.append(field_error("/departmentSlug", "`departmentSlug` is required."))
    elif not isinstance(slug, str) or slug not in slugs:
        errors.append(field_error("/departmentSlug", "`departmentSlug` must be one of the slugs returned "
                                  f"by GET /api/v2/support/departments: {', '.join(slugs)}."))

    subject = data.get("subject")
    if subject is None or (isinstance(subject, str) and not subject.strip()):
        errors.append(field_error("/subject", "`subject` is required."))
    elif not isinstance(subject, str):
        errors.append(field_error("/subject", "`subject` must be a string."))
    elif len(subject) > SUBJECT_MAX:
        errors.append(field_error("/subject", f"`subject` must be at most {SUBJECT_MAX} characters."))

    message = data.get("message")
    if message is None or (isinstance(message, str) and not message.strip()):
        errors.append(field_error("/message", "`message` is required."))
    elif not isinstance(message, str):
        errors.append(field_error("/message", "`message` must be a string."))

    priority = data.get("priority")
    if priority is not None and priority not in PRIORITIES:
        errors.append(field_error("/priority", f"`priority` must be one of {', '.join(PRIORITIES)}."))
    reason = data.get("criticalReason")
    _optional_text(data, "criticalReason", errors)
    if priority == "critical" and not (isinstance(reason, str) and reason.strip()):
        errors.append(field_error("/criticalReason", "`criticalReason` is required when priority is "
                                  "critical. Explain the customer impact."))

    cc = data.get("ccEmails")
    if cc is not None:
        if not isinstance(cc, list):
            errors.append(field_error("/ccEmails", "`ccEmails` must be an array of e-mail addresses."))
        else:
            for index, email in enumerate(cc):
                if not isinstance(email, str) or not _EMAIL.match(email):
                    errors.append(field_error(f"/ccEmails/{index}", "Must be a valid e-mail address."))

    context = data.get("context")
    if context is not None:
        if not isinstance(context, dict):
            errors.append(field_error("/context", "`context` must be an object."))
        else:
            for name in sorted(set(context) - CONTEXT_FIELDS):
                errors.append(field_error(f"/context/{_escape(name)}", f"Unknown field `{name}`."))
            if context.get("serviceType") not in SERVICE_TYPES:
                errors.append(field_error("/context/serviceType",
                                          f"`serviceType` must be one of {', '.join(SERVICE_TYPES)}."))
            for name in ("serviceId", "serviceName"):
                if context.get(name) is not None and not isinstance(context.get(name), str):
                    errors.append(field_error(f"/context/{name}", f"`{name}` must be a string."))

    _optional_text(data, "aiSummary", errors)
    if data.get("aiHelpful") is not None and not isinstance(data.get("aiHelpful"), bool):
        errors.append(field_error("/aiHelpful", "`aiHelpful` must be a boolean or null."))
    return errors


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


# -- representations ------------------------------------------------------------------------------


def message_json(message: HostUpMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "ticketId": message.ticket_id,
        "sentAt": iso_ms(message.sent_at),
        "body": message.body,
        "sender": message.sender,
        "senderName": message.sender_name,
        "encrypted": message.encrypted,
        "attachments": [],
    }


def ticket_json(ticket: HostUpTicket, *, detail: bool, messages: bool = True) -> dict[str, Any]:
    """List items omit body/messages/attachments, as documented; the create answer has messages []."""
    data: dict[str, Any] = {
        "id": ticket.id,
        "number": ticket.number,
        "subject": ticket.subject,
    }
    if detail:
        data["body"] = ticket.body
    data.update({
        "status": ticket.status,
        "priority": ticket.priority,
        "departmentSlug": ticket.department_slug,
        "departmentName": ticket.department_name,
        "createdAt": iso_ms(ticket.created_at),
        "updatedAt": iso_ms(ticket.updated_at),
        "lastMessageAt": iso_ms(ticket.last_message_at),
        "ccEmails": list(ticket.cc_emails),
        "requesterName": ticket.requester_name,
        "messageCount": len(ticket.messages),
        "linkedServices": [dict(service) for service in ticket.linked_services],
    })
    if detail:
        data["attachments"] = []
        data["messages"] = [message_json(m) for m in ticket.messages] if messages else []
    return data


# -- handlers -------------------------------------------------------------------------------------


async def departments(request: Request, state: SimState) -> Response:
    depts = [
        {"slug": d.get("slug"), "displayName": d.get("displayName"),
         "description": d.get("description"), "email": d.get("email")}
        for d in state.settings.hostup_departments
    ]
    return json_response({"departments": depts})


async def create_ticket(request: Request, state: SimState) -> Response:
    data, ok = await read_json(request)
    if not ok:
        return invalid(request, state, [field_error("", "The request body is not valid JSON.")])
    errors = validate_create(data, state)
    if errors:
        return invalid(request, state, errors)
    now = time.time()
    if data.get("priority") == "critical":
        refused = state.critical_refusal(now)
        if refused is not None:
            state.counters["hostup"]["critical_refused"] += 1
            return problem(request, state, 429, "rate_limited", "Rate limited", CRITICAL_DETAIL,
                           headers=rate_headers(refused, state.settings))
    ticket = state.hostup_create(data, now)
    response = json_response(ticket_json(ticket, detail=True, messages=False), 201)
    if state.chance(state.settings.drop_after_create_rate):
        return DroppingResponse(response)
    return response


def _cursor_encode(number: int) -> str:
    return base64.urlsafe_b64encode(f"n:{number}".encode()).decode().rstrip("=")


def _cursor_decode(cursor: str) -> int | None:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if not text.startswith("n:") or not text[2:].isdigit():
        return None
    return int(text[2:])


async def list_tickets(request: Request, state: SimState) -> Response:
    params = request.query_params
    errors: list[dict[str, str]] = []
    limit = 20
    raw_limit = params.get("limit")
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
            errors.append(field_error("/limit", "`limit` must be an integer between 1 and 100."))
        else:
            limit = int(raw_limit)
    before: int | None = None
    if params.get("cursor"):
        before = _cursor_decode(params["cursor"])
        if before is None:
            errors.append(field_error("/cursor", "`cursor` is not a valid cursor."))
    status = params.get("status")
    if status is not None and status not in STATUSES:
        errors.append(field_error("/status", f"`status` must be one of {', '.join(STATUSES)}."))
    if errors:
        return problem(request, state, 400, "invalid_request", "Invalid request",
                       "The query parameters failed validation.", errors=errors)
    slug = params.get("departmentSlug")
    matching = [
        t for t in sorted(state.hostup_tickets.values(), key=lambda t: int(t.number), reverse=True)
        if (status is None or t.status == status) and (slug is None or t.department_slug == slug)
        and (before is None or int(t.number) < before)
    ]
    page = matching[:limit]
    has_more = len(matching) > limit
    return json_response({
        "data": [ticket_json(t, detail=False) for t in page],
        "nextCursor": _cursor_encode(int(page[-1].number)) if has_more else None,
        "hasMore": has_more,
    })


async def get_ticket(request: Request, state: SimState) -> Response:
    ticket = state.hostup_find(request.path_params["ticket_id"])
    if ticket is None:
        return not_found(request, state)
    return json_response(ticket_json(ticket, detail=True))


async def reply(request: Request, state: SimState) -> Response:
    ticket = state.hostup_find(request.path_params["ticket_id"])
    if ticket is None:
        return not_found(request, state)
    data, ok = await read_json(request)
    if not ok or not isinstance(data, dict):
        return invalid(request, state, [field_error("", "The request body must be a JSON object.")])
    errors: list[dict[str, str]] = [
        field_error(f"/{_escape(name)}", f"Unknown field `{name}`.")
        for name in sorted(set(data) - {"message", "encrypted"})
    ]
    message = data.get("message")
    if not isinstance(message, str) or not message.strip():
        errors.append(field_error("/message", "`message` is required."))
    encrypted = data.get("encrypted", False)
    if not isinstance(encrypted, bool):
        errors.append(field_error("/encrypted", "`encrypted` must be a boolean."))
    if errors:
        return invalid(request, state, errors)
    if ticket.status == "closed":
        return problem(request, state, 409, "conflict", "Conflict",
                       "The ticket is closed. Reopen it with POST "
                       f"/api/v2/support/tickets/{ticket.id}/actions/reopen before replying.")
    assert isinstance(message, str)
    created = state.hostup_reply(ticket, message, encrypted, time.time())
    state.counters["hostup"]["replies"] += 1
    return json_response(message_json(created), 201)


def _set_status(status: str) -> Handler:
    async def action(request: Request, state: SimState) -> Response:
        ticket = state.hostup_find(request.path_params["ticket_id"])
        if ticket is None:
            return not_found(request, state)
        if ticket.status != status:
            ticket.status = status
            ticket.updated_at = time.time()
        return json_response(ticket_json(ticket, detail=True))

    return action


async def unknown(request: Request, state: SimState) -> Response:
    return not_found(request, state)


def routes() -> list[BaseRoute]:
    """Mounted under ``/api/v2``."""
    dialect = HostUpDialect()

    def route(path: str, handler: Handler, methods: list[str]) -> Route:
        return Route(path, provider_endpoint(dialect, handler), methods=methods)

    every = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return [
        route("/support/departments", departments, ["GET"]),
        route("/support/tickets", create_ticket, ["POST"]),
        route("/support/tickets", list_tickets, ["GET"]),
        route("/support/tickets/{ticket_id}", get_ticket, ["GET"]),
        route("/support/tickets/{ticket_id}/messages", reply, ["POST"]),
        route("/support/tickets/{ticket_id}/actions/reopen", _set_status("open"), ["POST"]),
        route("/support/tickets/{ticket_id}/actions/close", _set_status("closed"), ["POST"]),
        route("/{path:path}", unknown, every),
    ]
