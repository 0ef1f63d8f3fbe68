"""Intents, their statuses and the rules of their life cycle. Pure: no I/O imports here.

An intent moves through these statuses::

    queued ──► sending ──► succeeded                 (HostUp 201)
       ▲          │ └────► polling ──► succeeded     (NocWorx 202, task resolved to success)
       │          │           └──────► failed        (task failure / rejected / deadline passed)
       │          ├──────► waiting ──► (due) sending (429, 5xx, network: next_attempt_at)
       │          └──────► failed                    (a final answer: 400, 422, 401/403 ...)
       └──── cancelled (only before anything was sent)

``queued`` and ``waiting`` are both "due at ``next_attempt_at``"; ``waiting`` says an earlier
attempt did not go through.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from dispatcher.errors import FieldProblem, IntentInvalid


class Status(StrEnum):
    queued = "queued"
    sending = "sending"
    waiting = "waiting"
    polling = "polling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_STATUSES = frozenset({Status.succeeded, Status.failed, Status.cancelled})
#: statuses whose intent is picked up again when ``next_attempt_at`` comes
DUE_STATUSES = frozenset({Status.queued, Status.waiting})


class Priority(StrEnum):
    low = "low"
    medium = "medium"
    high = "high"
    urgent = "urgent"
    critical = "critical"


class Provider(StrEnum):
    hostup = "hostup"
    nocworx = "nocworx"


class Action(StrEnum):
    """What an intent does to its group's ticket (ungrouped intents always ``create``)."""

    create = "create"
    reply = "reply"
    reopen = "reopen"      # reply to a ticket of a recently resolved group, reopening it if we closed it
    close = "close"        # only as a step of a reply (close_on_resolve); never an intake action
    none = "none"          # nothing to send: recorded as succeeded for the audit trail


#: the provider-neutral topics that have default routing rules
KNOWN_TOPICS = (
    "vps", "network", "ip", "dns", "domain", "hosting", "email", "ssl",
    "billing", "sales", "migration", "general",
)

HOSTUP_SERVICE_TYPES = frozenset({"domain", "hosting", "vps", "other"})
NOCWORX_DEPARTMENTS = ("support", "billing", "sales", "migrations")
NOCWORX_CATEGORIES = (
    "application", "autoscale", "backups", "cdn", "container", "dns", "email", "ip_blacklist",
    "plugin_extension", "provisioning_failure", "resource_usage", "security", "site_down", "ssl",
)

SUBJECT_MAX = 255
BODY_MAX = 60_000
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64,
                                        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class ServiceRef(BaseModel):
    """The customer service a ticket is about (HostUp ``context``, NocWorx ``service_id``)."""

    model_config = ConfigDict(extra="forbid")

    type: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32)]
    id: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    name: Annotated[str, StringConstraints(max_length=200)] | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class IntentInput(BaseModel):
    """What producers send. JSON, the CLI and the Python API all validate through this model."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    target: Name
    subject: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=SUBJECT_MAX)]
    body: Annotated[str, StringConstraints(min_length=1, max_length=BODY_MAX)]
    priority: Priority = Priority.medium
    topic: Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1,
                                            max_length=40, pattern=r"^[a-z0-9_-]+$")] | None = None
    department: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)] | None = None
    category: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40)] | None = None
    service: ServiceRef | None = None
    cc: list[EmailStr] = Field(default_factory=list, max_length=20)
    critical_reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                                      max_length=2000)] | None = None
    idempotency_key: ShortText | None = None
    group_key: ShortText | None = None
    labels: dict[Annotated[str, StringConstraints(min_length=1, max_length=100)],
                 Annotated[str, StringConstraints(max_length=1000)]] = Field(default_factory=dict,
                                                                            max_length=64)

    @field_validator("body")
    @classmethod
    def _body_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @model_validator(mode="after")
    def _critical_needs_reason(self) -> IntentInput:
        if self.priority is Priority.critical and not self.critical_reason:
            raise ValueError("critical_reason: required when priority is critical")
        return self


def problems_from_validation(error: ValidationError, prefix: str = "") -> list[FieldProblem]:
    """Turn pydantic's errors into field-named problems (``service.id: ...``)."""
    problems: list[FieldProblem] = []
    for item in error.errors(include_url=False):
        loc = ".".join(str(part) for part in item["loc"])
        message = str(item["msg"])
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        # model-level validators put the field name in the message: "field: reason"
        if not loc and ": " in message:
            loc, message = message.split(": ", 1)
        field = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "body")
        if item["type"] == "missing":
            message = "required"
        elif item["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(FieldProblem(field, message))
    return problems


def parse_intent(data: Any) -> IntentInput:
    """Validate raw producer data; raise :class:`IntentInvalid` naming every bad field."""
    if isinstance(data, IntentInput):
        return data
    if not isinstance(data, dict):
        raise IntentInvalid([FieldProblem("body", "an intent must be a JSON object")])
    try:
        return IntentInput.model_validate(data)
    except ValidationError as exc:
        raise IntentInvalid(problems_from_validation(exc)) from None


def provider_problems(intent: IntentInput, provider: Provider) -> list[FieldProblem]:
    """Checks that depend on the target's provider (fields it cannot take)."""
    problems: list[FieldProblem] = []
    if provider is Provider.hostup:
        if intent.category is not None:
            problems.append(FieldProblem("category", "only NocWorx targets take a category"))
        if intent.service is not None and intent.service.type not in HOSTUP_SERVICE_TYPES:
            problems.append(FieldProblem(
                "service.type", f"must be one of {', '.join(sorted(HOSTUP_SERVICE_TYPES))} for HostUp"))
    else:
        if intent.category is not None and intent.category not in NOCWORX_CATEGORIES:
            problems.append(FieldProblem("category", f"must be one of {', '.join(NOCWORX_CATEGORIES)}"))
        if intent.department is not None and intent.department not in NOCWORX_DEPARTMENTS:
            problems.append(FieldProblem(
                "department", f"must be one of {', '.join(NOCWORX_DEPARTMENTS)} for NocWorx"))
        if intent.service is not None and not intent.service.id.isdigit():
            problems.append(FieldProblem("service.id", "NocWorx service ids are integers"))
    return problems


def new_intent_id() -> uuid.UUID:
    """A time-ordered UUID (version 7 layout), so ids sort by creation and index well."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (rand >> 68 & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def new_intent_ids(count: int) -> list[uuid.UUID]:
    """``count`` ids of :func:`new_intent_id`'s layout for one batch, sorting in the batch's order.

    One read of the random source for all (a syscall per id is a measurable share of a large
    import), and a counter in the 12 bits after the timestamp, carried into the milliseconds
    every 4096 ids, so the ids keep the order of the rows.
    """
    millis = time.time_ns() // 1_000_000
    pool = os.urandom(8 * count)
    ids: list[uuid.UUID] = []
    for i in range(count):
        rand = int.from_bytes(pool[8 * i:8 * i + 8], "big")
        value = ((millis + (i >> 12)) & ((1 << 48) - 1)) << 80
        value |= 0x7 << 76
        value |= (i & 0xFFF) << 64
        value |= 0b10 << 62
        value |= rand & ((1 << 62) - 1)
        ids.append(uuid.UUID(int=value))
    return ids


MARKER_PREFIX = "dispatcher-ref:"
_MARKER_RE = re.compile(r"dispatcher-ref:\s*([0-9a-fA-F-]{36})")


def marker_for(intent_id: uuid.UUID) -> str:
    """The line put at the end of every ticket we create, so a lost answer can be reconciled."""
    return f"{MARKER_PREFIX} {intent_id}"


def body_with_marker(body: str, intent_id: uuid.UUID) -> str:
    return f"{body.rstrip()}\n\n--\n{marker_for(intent_id)}"


def find_marker(text: str | None) -> str | None:
    """The intent id in a ticket's text, if we created it."""
    if not text:
        return None
    match = _MARKER_RE.search(text)
    return match.group(1).lower() if match else None


# ---------------------------------------------------------------------------------------------
# Views: what rows become at the store's seam. Frozen, so the service cannot mutate state behind
# the database's back.
# ---------------------------------------------------------------------------------------------

from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime  # noqa: E402


@dataclass(frozen=True)
class TicketView:
    provider_id: str
    number: str | None
    url: str | None
    department: str | None
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.provider_id, "number": self.number, "url": self.url, "department": self.department}


@dataclass(frozen=True)
class AttemptView:
    id: int
    number: int | None
    op: str
    method: str
    path: str
    request: dict[str, Any] | None
    status_code: int | None
    duration_ms: float | None
    response_excerpt: str | None
    provider_request_id: str | None
    task_uuid: str | None
    verdict: str | None
    error_code: str | None
    error_message: str | None
    retry_after_s: float | None
    worker: str | None
    started_at: datetime
    finished_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "number": self.number, "op": self.op, "method": self.method, "path": self.path,
            "request": self.request, "status_code": self.status_code, "duration_ms": self.duration_ms,
            "response_excerpt": self.response_excerpt, "provider_request_id": self.provider_request_id,
            "task_uuid": self.task_uuid, "verdict": self.verdict, "error_code": self.error_code,
            "error_message": self.error_message, "retry_after_s": self.retry_after_s, "worker": self.worker,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


@dataclass(frozen=True)
class EventView:
    at: datetime
    kind: str
    message: str
    actor: str | None
    data: dict[str, Any] | None


@dataclass(frozen=True)
class IntentView:
    """An intent as stored (and as returned by the API)."""

    id: uuid.UUID
    target: str
    provider: Provider
    status: Status
    source: str
    submitted_by: str | None
    subject: str
    body: str
    priority: Priority
    topic: str | None
    department: str | None
    category: str | None
    service: ServiceRef | None
    cc: tuple[str, ...]
    critical_reason: str | None
    idempotency_key: str | None
    group_key: str | None
    labels: dict[str, str]
    resolved_department: str | None
    resolved_category: str | None
    attempts: int
    last_error_code: str | None
    last_error_message: str | None
    next_attempt_at: datetime | None
    needs_reconcile: bool
    deliveries: int
    task_uuid: str | None
    poll_path: str | None
    poll_deadline: datetime | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    ticket: TicketView | None = None
    attempt_log: tuple[AttemptView, ...] = field(default_factory=tuple)
    action: Action = Action.create
    group_id: int | None = None
    group_seq: int | None = None
    payload: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def as_dict(self, *, with_attempts: bool = False) -> dict[str, Any]:
        """The public JSON shape (design.md §2)."""
        out: dict[str, Any] = {
            "id": str(self.id), "status": self.status.value, "target": self.target,
            "provider": self.provider.value, "source": self.source, "subject": self.subject,
            "priority": self.priority.value, "topic": self.topic,
            "department": self.resolved_department or self.department, "category": self.resolved_category
            or self.category, "idempotency_key": self.idempotency_key, "group_key": self.group_key,
            "ticket": self.ticket.as_dict() if self.ticket else None, "attempts": self.attempts,
            "last_error": ({"code": self.last_error_code, "message": self.last_error_message}
                           if self.last_error_code else None),
            "task_uuid": self.task_uuid,
            "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat(),
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "action": self.action.value, "group_id": self.group_id,
        }
        if with_attempts:
            out["attempt_log"] = [a.as_dict() for a in self.attempt_log]
        return out
