"""NocWorx (Nexcess portal) API v1 ticket and task endpoints, as in the nexcess-api-docs.

Writes are asynchronous: ``POST /v1/ticket`` answers 202 with an api-task and the ticket only
exists once the task resolves. The documented quirks are all knobs: Location header present or
not, ``metadata.uri`` with a trailing slash, ``errors`` as ``{}``/``[]``, a null ``resource``, and
task:show answering 404 right after the 202.
"""

from __future__ import annotations

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
from dispatcher.simulator.state import NocTicket, RateLimited, SimState, Task

API_VERSION = "0.5.0"
DEPARTMENTS = ("support", "billing", "sales", "migrations")
DEPARTMENT_IDS = {"support": 1, "billing": 2, "sales": 3, "migrations": 4}
CATEGORIES = (
    "application", "autoscale", "backups", "cdn", "container", "dns", "email", "ip_blacklist",
    "plugin_extension", "provisioning_failure", "resource_usage", "security", "site_down", "ssl",
)
USER = {
    "id": 61420,
    "identity": "Sim Customer - customer@example.com",
    "metadata": {"scope": "user", "uri": "/v1/user/61420"},
}
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def message(text: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return json_response({"message": text}, status, headers)


def not_found() -> Response:
    return message("Not Found", 404)


def unprocessable(errors: list[dict[str, str]]) -> Response:
    return json_response({"message": "Unprocessable Entity", "errors": errors}, 422)


def field_error(reference: str, text: str) -> dict[str, str]:
    return {"message": text, "reference": reference}


class NocWorxDialect(Dialect):
    name = "nocworx"

    def key(self, settings: SimulatorSettings) -> str:
        return settings.nocworx_key

    def unauthorized(self, request: Request, state: SimState) -> Response:
        return message("Unauthorized", 401)

    def rate_limited(self, request: Request, state: SimState, limited: RateLimited) -> Response:
        return message("Too Many Requests", 429, {"Retry-After": retry_after_value(limited, state.settings)})

    def server_error(self, request: Request, state: SimState) -> Response:
        """nginx in front of PHP: a plain-text 503, not JSON."""
        return Response("503 Service Temporarily Unavailable\n", 503,
                        {"Retry-After": "1"}, media_type="text/plain")

    def decorate(self, response: Response) -> None:
        response.headers["NocWorx-Api-Version"] = API_VERSION


# -- representations ------------------------------------------------------------------------------


def task_uri(task: Task) -> str:
    return f"/v1/task/{task.uuid}" + ("/" if task.trailing_slash else "")


def ticket_resource(ticket: NocTicket) -> dict[str, Any]:
    return {
        "id": ticket.id,
        "identity": ticket.mask,
        "metadata": {"scope": "ticket", "uri": f"/v1/ticket/{ticket.id}"},
    }


def task_json(task: Task, state: SimState) -> dict[str, Any]:
    errors: Any
    if task.status in ("failure", "rejected"):
        errors = {"message": task.message}
    elif task.status == "success":
        errors = [] if task.errors_style == "list" else {}
    else:
        errors = {}
    resource: dict[str, Any] | None = None
    if task.status == "success" and not task.resource_null:
        ticket = state.noc_tickets.get(task.ticket_id or -1)
        if ticket is not None:
            resource = ticket_resource(ticket)
    return {
        "id": task.id,
        "identity": f"{task.action} ({task.status})",
        "metadata": {"scope": "api-task", "uri": task_uri(task)},
        "status": task.status,
        "action": task.action,
        "api_version": API_VERSION,
        "errors": errors,
        "input": dict(task.input),
        "request_date": int(task.request_date),
        "resolved_date": int(task.resolved_at) if task.resolved_at is not None else None,
        "resource": resource,
        "staff_user": None,
        "user": USER,
        "uuid": task.uuid,
    }


def ticket_json(ticket: NocTicket, *, with_comments: bool) -> dict[str, Any]:
    """ticket:show carries the comments (where our marker lives); list items do not."""
    department_id = DEPARTMENT_IDS.get(ticket.department, 1)
    data: dict[str, Any] = {
        "id": ticket.id,
        "identity": ticket.mask,
        "mask": ticket.mask,
        "metadata": {"scope": "ticket", "uri": f"/v1/ticket/{ticket.id}"},
        "subject": ticket.subject,
        "is_closed": ticket.is_closed,
        "department": {
            "id": department_id,
            "identity": ticket.department.capitalize(),
            "metadata": {"scope": "ticket-department", "uri": f"/v1/ticket-department/{department_id}"},
        },
        "status": {"id": 4, "identity": "Closed"} if ticket.is_closed else {"id": 1, "identity": "Open"},
        "category": ticket.category,
        "recipients": list(ticket.recipients),
        "service": ({"id": ticket.service_id, "metadata": {"scope": "service",
                                                           "uri": f"/v1/service/{ticket.service_id}"}}
                    if ticket.service_id is not None else None),
        "date_created": int(ticket.created_at),
        "date_updated": int(ticket.updated_at),
        "user": USER,
    }
    if with_comments:
        first = ticket.comments[0].body if ticket.comments else ""
        data["comment"] = first
        data["body"] = first
        data["comments"] = [
            {"id": c.id, "body": c.body, "date": int(c.date), "user": USER} for c in ticket.comments
        ]
    return data


# -- helpers --------------------------------------------------------------------------------------


def _page(request: Request, items: list[Any]) -> tuple[list[Any], dict[str, str]] | Response:
    """``page``/``pageSize`` paging with ``Content-Range: items a-b/total``; 416 past the end."""
    params = request.query_params
    errors: list[dict[str, str]] = []
    values: dict[str, int] = {"page": 1, "pageSize": 20}
    for name, low, high in (("page", 1, 1_000_000), ("pageSize", 1, 100)):
        raw = params.get(name)
        if raw is None:
            continue
        if not raw.isdigit() or not low <= int(raw) <= high:
            errors.append(field_error(name, f"This input must be an integer between {low} and {high}"))
        else:
            values[name] = int(raw)
    if errors:
        return unprocessable(errors)
    total = len(items)
    start = (values["page"] - 1) * values["pageSize"]
    if total == 0 and values["page"] == 1:
        return [], {"Content-Range": "items 0-0/0"}
    if start >= total:
        return message("Requested Range Not Satisfiable", 416, {"Content-Range": f"items */{total}"})
    chunk = items[start:start + values["pageSize"]]
    return chunk, {"Content-Range": f"items {start + 1}-{start + len(chunk)}/{total}"}


def _sort(request: Request, items: list[Any], keys: dict[str, Any], default: str) -> list[Any] | Response:
    params = request.query_params
    sort_by = params.get("sortBy", default)
    order = params.get("sortOrder", "ASC").upper()
    errors: list[dict[str, str]] = []
    if sort_by not in keys:
        errors.append(field_error("sortBy", f"This input must be one of: {', '.join(keys)}"))
    if order not in ("ASC", "DESC"):
        errors.append(field_error("sortOrder", "This input must be one of: ASC, DESC"))
    if errors:
        return unprocessable(errors)
    return sorted(items, key=keys[sort_by], reverse=order == "DESC")


def validate_add(data: Any) -> list[dict[str, str]]:
    if not isinstance(data, dict):
        return [field_error("department", "This input is required"),
                field_error("subject", "This input is required")]
    errors: list[dict[str, str]] = []
    department = data.get("department")
    if department is None or department == "":
        errors.append(field_error("department", "This input is required"))
    elif department not in DEPARTMENTS:
        errors.append(field_error("department", f"This input must be one of: {', '.join(DEPARTMENTS)}"))
    category = data.get("category")
    if category is not None and category not in CATEGORIES:
        errors.append(field_error("category", f"This input must be one of: {', '.join(CATEGORIES)}"))
    subject = data.get("subject")
    if subject is None or (isinstance(subject, str) and not subject.strip()):
        errors.append(field_error("subject", "This input is required"))
    elif not isinstance(subject, str):
        errors.append(field_error("subject", "This input must be a string"))
    comment = data.get("comment")
    if comment is not None and not isinstance(comment, str):
        errors.append(field_error("comment", "This input must be a string"))
    service_id = data.get("service_id")
    if service_id is not None and (not isinstance(service_id, int) or isinstance(service_id, bool)):
        errors.append(field_error("service_id", "This input must be an integer"))
    recipients = data.get("recipients")
    if recipients is not None:
        if not isinstance(recipients, list):
            errors.append(field_error("recipients", "This input must be an array"))
        elif not all(isinstance(r, str) and _EMAIL.match(r) for r in recipients):
            errors.append(field_error("recipients", "This input must be a list of valid email addresses"))
    return errors


def accepted(task: Task, state: SimState) -> Response:
    headers = {"Location": f"/v1/task/{task.uuid}"} if state.settings.location_header else None
    return json_response(task_json(task, state), 202, headers)


# -- handlers -------------------------------------------------------------------------------------


async def add_ticket(request: Request, state: SimState) -> Response:
    data, ok = await read_json(request)
    if not ok:
        return message("Bad Request", 400)
    errors = validate_add(data)
    if errors:
        return unprocessable(errors)
    task = state.new_task("ticket:add", data, time.time())
    response = accepted(task, state)
    if state.chance(state.settings.drop_after_create_rate):
        return DroppingResponse(response)
    return response


async def show_task(request: Request, state: SimState) -> Response:
    now = time.time()
    state.settle(now)
    task = state.tasks.get(request.path_params["task_uuid"].lower())
    if task is None or now - task.request_date < state.settings.task_404_window_s:
        return not_found()
    return json_response(task_json(task, state))


async def list_tasks(request: Request, state: SimState) -> Response:
    state.settle(time.time())
    params = request.query_params
    action = params.get("filter[action]")
    status = params.get("filter[status]")
    tasks = [t for t in state.tasks.values()
             if (action is None or t.action == action) and (status is None or t.status == status)]
    ordered = _sort(request, tasks, {"request_date": lambda t: (t.request_date, t.id),
                                     "id": lambda t: t.id}, "id")
    if isinstance(ordered, Response):
        return ordered
    paged = _page(request, ordered)
    if isinstance(paged, Response):
        return paged
    chunk, headers = paged
    return json_response([task_json(t, state) for t in chunk], 200, headers)


def _truthy(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


async def list_tickets(request: Request, state: SimState) -> Response:
    state.settle(time.time())
    params = request.query_params
    subject = params.get("filter[subject]")
    status = params.get("filter[status]")
    closed = params.get("filter[is_closed]")
    department = params.get("filter[department]")

    def keep(ticket: NocTicket) -> bool:
        status_words = ("closed", "4") if ticket.is_closed else ("open", "1")
        return ((subject is None or subject.lower() in ticket.subject.lower())
                and (status is None or status.lower() in status_words)
                and (closed is None or _truthy(closed) == ticket.is_closed)
                and (department is None or department == ticket.department))

    tickets = [t for t in state.noc_tickets.values() if keep(t)]
    ordered = _sort(request, tickets, {"id": lambda t: t.id, "date_created": lambda t: (t.created_at, t.id),
                                       "subject": lambda t: (t.subject, t.id)}, "id")
    if isinstance(ordered, Response):
        return ordered
    paged = _page(request, ordered)
    if isinstance(paged, Response):
        return paged
    chunk, headers = paged
    return json_response([ticket_json(t, with_comments=False) for t in chunk], 200, headers)


def _find(request: Request, state: SimState) -> NocTicket | None:
    raw = request.path_params["ticket_id"]
    return state.noc_tickets.get(int(raw)) if raw.isdigit() else None


async def show_ticket(request: Request, state: SimState) -> Response:
    state.settle(time.time())
    ticket = _find(request, state)
    if ticket is None:
        return not_found()
    return json_response(ticket_json(ticket, with_comments=True))


async def comment(request: Request, state: SimState) -> Response:
    state.settle(time.time())
    ticket = _find(request, state)
    if ticket is None:
        return not_found()
    data, ok = await read_json(request)
    if not ok:
        return message("Bad Request", 400)
    text = data.get("comment") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        return unprocessable([field_error("comment", "This input is required")])
    assert isinstance(data, dict)
    task = state.new_task("ticket:comment", data, time.time(), ticket_id=ticket.id)
    return accepted(task, state)


def _state_change(action: str) -> Handler:
    async def change(request: Request, state: SimState) -> Response:
        state.settle(time.time())
        ticket = _find(request, state)
        if ticket is None:
            return not_found()
        task = state.new_task(action, {}, time.time(), ticket_id=ticket.id)
        return accepted(task, state)

    return change


async def unknown(request: Request, state: SimState) -> Response:
    return not_found()


def routes() -> list[BaseRoute]:
    """Mounted under ``/v1``."""
    dialect = NocWorxDialect()

    def route(path: str, handler: Handler, methods: list[str]) -> Route:
        return Route(path, provider_endpoint(dialect, handler), methods=methods)

    return [
        route("/ticket", add_ticket, ["POST"]),
        route("/ticket", list_tickets, ["GET"]),
        route("/ticket/{ticket_id}", show_ticket, ["GET"]),
        route("/ticket/{ticket_id}/comment", comment, ["POST"]),
        route("/ticket/{ticket_id}/close", _state_change("ticket:close"), ["POST"]),
        route("/ticket/{ticket_id}/open", _state_change("ticket:open"), ["POST"]),
        route("/task", list_tasks, ["GET"]),
        route("/task/{task_uuid}", show_task, ["GET"]),
        route("/task/{task_uuid}/", show_task, ["GET"]),
        route("/{path:path}", unknown, ["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
