"""The port every provider implements, and the plain values that cross it.

A provider adapter is pure: it builds :class:`RequestSpec` values and sorts each
:class:`RawResponse` into an :class:`Outcome` (``classify``, one function per provider).
The HTTP exchange itself happens in :mod:`dispatcher.providers.http`; the service records every
exchange as an attempt before and after it is sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import unquote

from dispatcher.domain import Priority, Provider, ServiceRef
from dispatcher.errors import FieldProblem


class Op(StrEnum):
    """What a request is for; ``classify`` reads answers in the light of it."""

    departments = "departments"
    create = "create"
    poll = "poll"
    ticket = "ticket"          # ticket detail / ticket:show
    find = "find"  # type: ignore[assignment]  # list searches used to reconcile a lost create (shadows str.find)
    reply = "reply"
    reopen = "reopen"
    close = "close"


class Verdict(StrEnum):
    """Where an answer sends the intent next."""

    done = "done"        # the operation succeeded (ticket made, task resolved, list read)
    poll = "poll"        # accepted asynchronously: poll the task later
    retry = "retry"      # try again later (429, 5xx, network); ``retry_after`` if the server said
    final = "final"      # will never succeed as sent (validation, not found, task failed)
    pause = "pause"      # the target's credentials are refused (401/403): stop the whole target


@dataclass(frozen=True)
class RequestSpec:
    """One HTTP request, relative to the target's base URL (``path`` starts with ``/``)."""

    op: Op
    method: str
    path: str
    json: Mapping[str, Any] | None = None
    params: Mapping[str, str | int] | None = None


@dataclass(frozen=True)
class RawResponse:
    """What came back, or why nothing did. Never raises: network failures are values too."""

    status: int | None
    headers: Mapping[str, str]          # lower-cased names
    body: bytes
    duration_ms: float
    network_error: str | None = None    # e.g. "ReadTimeout: ..." when status is None
    maybe_delivered: bool = False       # True when the request may have reached the server

    def json(self) -> Any:
        import json

        return json.loads(self.body.decode("utf-8"))


@dataclass(frozen=True)
class RateLimitInfo:
    """The ``X-RateLimit-*`` headers of one answer, normalised."""

    limit: int | None = None
    remaining: int | None = None
    reset_at: datetime | None = None


@dataclass(frozen=True)
class TicketRef:
    """A ticket as the provider knows it: HostUp ``tkt_...`` + number, NocWorx id + mask."""

    provider_id: str
    number: str | None = None
    url: str | None = None
    department: str | None = None
    subject: str | None = None
    is_closed: bool | None = None


@dataclass(frozen=True)
class Outcome:
    """One answer, sorted."""

    verdict: Verdict
    ticket: TicketRef | None = None
    task_uuid: str | None = None
    poll_path: str | None = None           # where to poll a task (relative path, same host)
    resource_path: str | None = None       # what a resolved task made (relative path), if given
    retry_after: float | None = None       # seconds the server asked for (Retry-After)
    rate_limit: RateLimitInfo | None = None
    error_code: str | None = None          # provider's code (HostUp `code`) or ours (e.g. "network")
    error_message: str | None = None       # the provider's own words
    field_errors: tuple[FieldProblem, ...] = ()
    request_id: str | None = None          # HostUp requestId; support staff ask for it
    data: Any = None                       # parsed payload for list/detail reads
    items: tuple[Any, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class TicketDraft:
    """What we ask a provider to create, already routed (department resolved)."""

    subject: str
    body: str                              # includes the intent marker line
    priority: Priority
    department: str
    category: str | None = None
    service: ServiceRef | None = None
    cc: tuple[str, ...] = ()
    critical_reason: str | None = None


class ProviderAdapter(Protocol):
    """The calls the service makes of a provider, all pure."""

    provider: Provider

    def departments_request(self) -> RequestSpec | None:
        """The request that lists departments, or None when the provider's list is fixed."""

    def department_slugs(self, outcome: Outcome) -> list[str]:
        """The slugs in a classified departments answer."""

    def create_request(self, draft: TicketDraft) -> RequestSpec: ...

    def task_request(self, poll_path: str) -> RequestSpec: ...

    def ticket_request(self, ticket_id: str) -> RequestSpec: ...

    def classify(self, op: Op, response: RawResponse) -> Outcome:
        """Sort any answer into done / poll / retry / final / pause."""

    # -- added: follow-ups on a ticket we made, and reconciling a create whose answer was lost --

    def reply_request(self, ticket_id: str, message: str) -> RequestSpec:
        """Add a message to an existing ticket (group replies, follow-ups)."""

    def reopen_request(self, ticket_id: str) -> RequestSpec:
        """Reopen a closed ticket (HostUp refuses replies to closed tickets)."""

    def close_request(self, ticket_id: str) -> RequestSpec:
        """Close a ticket (e.g. when its alert resolves)."""

    def find_requests_for_marker(self, subject: str) -> list[RequestSpec]:
        """The list reads (``Op.find``) that can show a ticket we may have created with this subject."""

    def next_find_request(self, spec: RequestSpec, outcome: Outcome, since: datetime) -> RequestSpec | None:
        """The next, older page of the list ``spec`` read, while this page may not reach back to ``since``
        (newer lists come first: a ticket made before a burst of others is pages down); None when done."""

    def candidate_ids(self, outcome: Outcome, subject: str) -> list[str]:
        """Ticket ids in a classified find answer whose subject matches; read them to check the marker."""

    def match_marker(self, outcome: Outcome, marker: str) -> Outcome | None:
        """What a classified find/ticket answer says about the create carrying ``marker``, if anything.

        A ticket detail holding the marker gives a ``done`` outcome with its ticket; a NocWorx task list
        gives the matching task sorted as a poll answer (done, poll or final).
        """


_PATH_CHARS = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]*)+$")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def safe_relative_path(path: str) -> str:
    """Return ``path`` if it is a plain path on the target's own host; raise ValueError otherwise.

    Paths sometimes come from provider answers (a NocWorx task URI), so anything that could
    point elsewhere (a scheme, ``//host``, dot segments, a query or odd characters) is refused.
    """
    if not path.startswith("/") or "//" in path or not _PATH_CHARS.match(path) or _BAD_ESCAPE.search(path):
        raise ValueError(f"not a relative path on the target's host: {path[:200]!r}")
    for segment in path.split("/"):
        decoded = unquote(segment)
        if decoded in {".", ".."} or "/" in decoded or "\\" in decoded:
            raise ValueError(f"not a relative path on the target's host: {path[:200]!r}")
    return path
