"""What the simulators remember: tickets, tasks, the request log, counters and rate windows.

All mutation happens on the server's event loop without an ``await`` in between, so no lock is
needed; other threads read through the ``/_sim`` endpoints.
"""

from __future__ import annotations

import heapq
import math
import random
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dispatcher.domain import find_marker
from dispatcher.simulator.settings import SimulatorSettings

PROVIDERS = ("hostup", "nocworx")
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
REQUEST_LOG_MAX = 500_000


def _delay_rng(seed: int | None) -> random.Random:
    return random.Random(None if seed is None else f"task-delay:{seed}")


def iso_ms(ts: float) -> str:
    """HostUp's timestamp style: ISO 8601, milliseconds, ``Z``."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass
class HostUpMessage:
    id: str
    ticket_id: str
    sent_at: float
    body: str
    sender: str
    sender_name: str
    encrypted: bool = False


@dataclass
class HostUpTicket:
    id: str
    number: str
    subject: str
    body: str
    status: str
    priority: str
    department_slug: str
    department_name: str | None
    created_at: float
    updated_at: float
    last_message_at: float
    cc_emails: list[str]
    requester_name: str
    linked_services: list[dict[str, Any]]
    messages: list[HostUpMessage]
    marker: str | None
    critical_reason: str | None = None


@dataclass
class NocComment:
    id: int
    body: str
    date: float
    marker: str | None


@dataclass
class NocTicket:
    id: int
    mask: str
    subject: str
    department: str
    category: str | None
    service_id: int | None
    recipients: list[str]
    is_closed: bool
    created_at: float
    updated_at: float
    comments: list[NocComment]
    marker: str | None
    task_uuid: str


@dataclass
class Task:
    """A NocWorx api-task; its fate is drawn when it is created and applied when it is due."""

    id: int
    uuid: str
    action: str
    input: dict[str, Any]
    request_date: float
    due_at: float
    outcome: str                    # success | failure | rejected | stuck
    resource_null: bool
    trailing_slash: bool
    errors_style: str               # "list" | "dict": how an empty ``errors`` is spelled
    ticket_id: int | None = None    # the ticket acted on, or made (ticket:add)
    status: str = "pending"
    resolved_at: float | None = None
    message: str | None = None


@dataclass
class RequestRecord:
    provider: str
    method: str
    path: str
    query: str
    at: float
    marker: str | None
    status: int = 0
    throttled: bool = False
    fault: str | None = None        # "error" | "drop" when the simulator injected one
    retry_after: float | None = None  # seconds the answer's Retry-After asked for (from ``at``)

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider, "method": self.method, "path": self.path, "query": self.query,
            "status": self.status, "at": self.at, "marker": self.marker, "throttled": self.throttled,
            "fault": self.fault, "retry_after": self.retry_after,
        }


@dataclass
class RateLimited:
    """Why a request was refused by a window: what the 429 headers say."""

    limit: int
    reset_at: float
    retry_after_s: int


@dataclass
class _Window:
    start: float = 0.0
    count: int = 0


@dataclass
class SimState:
    settings: SimulatorSettings
    rng: random.Random = field(init=False)
    #: task delays (``task_delay_range_s``) come from their own stream, so they do not depend on timing
    delay_rng: random.Random = field(init=False)
    counters: dict[str, Counter[str]] = field(init=False)
    hostup_tickets: dict[str, HostUpTicket] = field(init=False)
    hostup_by_number: dict[str, HostUpTicket] = field(init=False)
    critical_times: deque[float] = field(init=False)
    noc_tickets: dict[int, NocTicket] = field(init=False)
    tasks: dict[str, Task] = field(init=False)
    request_log: deque[RequestRecord] = field(init=False)
    _due: list[tuple[float, int, str]] = field(init=False)
    _windows: dict[str, _Window] = field(init=False)
    _next_number: int = field(init=False)
    _next_task_id: int = field(init=False)
    _next_noc_ticket: int = field(init=False)
    _next_comment: int = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every ticket, task, request and counter; re-seed so a seeded run repeats."""
        self.rng = random.Random(self.settings.seed)
        self.delay_rng = _delay_rng(self.settings.seed)
        self.counters = {name: Counter() for name in PROVIDERS}
        self.hostup_tickets = {}
        self.hostup_by_number = {}
        self.critical_times = deque()
        self.noc_tickets = {}
        self.tasks = {}
        self.request_log = deque(maxlen=REQUEST_LOG_MAX)
        self._due = []
        self._windows = {name: _Window() for name in PROVIDERS}
        self._next_number = 10001
        self._next_task_id = 1001
        self._next_noc_ticket = 1831
        self._next_comment = 50001

    def apply_settings(self, settings: SimulatorSettings) -> None:
        reseed = settings.seed != self.settings.seed
        self.settings = settings
        if reseed:
            self.rng = random.Random(settings.seed)
            self.delay_rng = _delay_rng(settings.seed)

    # -- randomness ------------------------------------------------------------------------------

    def chance(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def public_id(self, prefix: str) -> str:
        """ULID-like ids (time then randomness, Crockford base32), as HostUp's ``tkt_01hx...``."""
        millis = int(time.time() * 1000)
        value = (millis << 80) | self.rng.getrandbits(80)
        chars = [_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5)]
        return prefix + "".join(chars)

    def new_uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    # -- rate limiting ---------------------------------------------------------------------------

    def take(self, provider: str, now: float) -> RateLimited | None:
        """Count one request in ``provider``'s fixed window; say when it goes over the limit."""
        limit = self.settings.rate_limit
        if limit <= 0:
            return None
        width = self.settings.rate_window_s
        window = self._windows[provider]
        if now >= window.start + width or now < window.start:
            window.start = math.floor(now / width) * width
            window.count = 0
        window.count += 1
        if window.count <= limit:
            return None
        reset_at = window.start + width
        return RateLimited(limit=limit, reset_at=reset_at, retry_after_s=max(1, math.ceil(reset_at - now)))

    def critical_refusal(self, now: float) -> RateLimited | None:
        """HostUp allows ``critical_per_hour`` critical tickets in any rolling hour."""
        allowed = self.settings.critical_per_hour
        if allowed <= 0:
            return None
        while self.critical_times and self.critical_times[0] <= now - 3600:
            self.critical_times.popleft()
        if len(self.critical_times) < allowed:
            return None
        reset_at = self.critical_times[0] + 3600
        return RateLimited(limit=allowed, reset_at=reset_at, retry_after_s=max(1, math.ceil(reset_at - now)))

    # -- HostUp ----------------------------------------------------------------------------------

    def department(self, slug: str) -> dict[str, Any] | None:
        for dept in self.settings.hostup_departments:
            if dept.get("slug") == slug:
                return dept
        return None

    def hostup_create(self, data: dict[str, Any], now: float) -> HostUpTicket:
        dept = self.department(data["departmentSlug"]) or {}
        ticket_id = self.public_id("tkt_")
        number = str(self._next_number)
        self._next_number += 1
        context = data.get("context") or {}
        linked: list[dict[str, Any]] = []
        if context.get("serviceType"):
            linked.append({
                "serviceType": context["serviceType"],
                "serviceId": context.get("serviceId"),
                "serviceName": context.get("serviceName"),
                "details": {"status": "Active"},
            })
        body: str = data["message"]
        first = HostUpMessage(id=self.public_id("tmsg_"), ticket_id=ticket_id, sent_at=now, body=body,
                              sender="customer", sender_name="Sim Customer")
        ticket = HostUpTicket(
            id=ticket_id, number=number, subject=data["subject"], body=body, status="open",
            priority=data.get("priority") or "medium", department_slug=dept.get("slug", ""),
            department_name=dept.get("displayName"), created_at=now, updated_at=now,
            last_message_at=now, cc_emails=list(data.get("ccEmails") or []),
            requester_name="Sim Customer", linked_services=linked, messages=[first],
            marker=find_marker(body), critical_reason=data.get("criticalReason"),
        )
        self.hostup_tickets[ticket_id] = ticket
        self.hostup_by_number[number] = ticket
        if ticket.priority == "critical":
            self.critical_times.append(now)
        self.counters["hostup"]["tickets"] += 1
        return ticket

    def hostup_find(self, ref: str) -> HostUpTicket | None:
        return self.hostup_tickets.get(ref) or self.hostup_by_number.get(ref)

    def hostup_reply(self, ticket: HostUpTicket, body: str, encrypted: bool, now: float) -> HostUpMessage:
        message = HostUpMessage(id=self.public_id("tmsg_"), ticket_id=ticket.id, sent_at=now, body=body,
                                sender="customer", sender_name=ticket.requester_name, encrypted=encrypted)
        ticket.messages.append(message)
        ticket.status = "customer_reply"
        ticket.updated_at = ticket.last_message_at = now
        return message

    # -- NocWorx ---------------------------------------------------------------------------------

    def new_task(self, action: str, submitted: dict[str, Any], now: float,
                 ticket_id: int | None = None) -> Task:
        """Queue a task; its outcome is drawn now so a seeded run is reproducible."""
        s = self.settings
        roll = self.rng.random()
        if roll < s.task_failure_rate:
            outcome = "failure"
        elif roll < s.task_failure_rate + s.task_rejected_rate:
            outcome = "rejected"
        elif roll < s.task_failure_rate + s.task_rejected_rate + s.task_stuck_rate:
            outcome = "stuck"
        else:
            outcome = "success"
        delay = s.task_delay_s if s.task_delay_range_s is None else self.delay_rng.uniform(*s.task_delay_range_s)
        task = Task(
            id=self._next_task_id, uuid=self.new_uuid(), action=action, input=dict(submitted),
            request_date=now, due_at=now + delay, outcome=outcome,
            resource_null=self.chance(s.task_resource_null_rate),
            trailing_slash=self.chance(s.uri_trailing_slash_rate),
            errors_style=self.rng.choice(("list", "dict")), ticket_id=ticket_id,
        )
        self._next_task_id += 1
        self.tasks[task.uuid] = task
        if outcome == "stuck":
            self.counters["nocworx"]["tasks_stuck"] += 1
        else:
            heapq.heappush(self._due, (task.due_at, task.id, task.uuid))
        self.counters["nocworx"]["tasks"] += 1
        return task

    def settle(self, now: float) -> None:
        """Resolve every task that is due, in order; the simulated back office works lazily."""
        while self._due and self._due[0][0] <= now:
            _, _, task_uuid = heapq.heappop(self._due)
            self._resolve(self.tasks[task_uuid])

    def _resolve(self, task: Task) -> None:
        task.resolved_at = task.due_at
        self.counters["nocworx"][f"tasks_{task.outcome}"] += 1
        if task.outcome == "failure":
            task.status = "failure"
            task.message = f"{task.action} failed: the helpdesk backend did not accept the request"
            return
        if task.outcome == "rejected":
            task.status = "rejected"
            task.message = f"{task.action} was rejected by staff review"
            return
        task.status = "success"
        when = task.due_at
        if task.action == "ticket:add":
            task.ticket_id = self._noc_create(task, when).id
            return
        ticket = self.noc_tickets.get(task.ticket_id or -1)
        if ticket is None:  # pragma: no cover - tickets are never deleted
            return
        ticket.updated_at = when
        if task.action == "ticket:comment":
            body = str(task.input.get("comment", ""))
            ticket.comments.append(NocComment(self._next_comment, body, when, find_marker(body)))
            self._next_comment += 1
        elif task.action == "ticket:close":
            ticket.is_closed = True
        elif task.action == "ticket:open":
            ticket.is_closed = False

    def _noc_create(self, task: Task, when: float) -> NocTicket:
        data = task.input
        ticket_id = self._next_noc_ticket
        self._next_noc_ticket += self.rng.randint(1, 3)   # ids are not contiguous on a shared system
        mask = "".join(self.rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(4)) + f"-{ticket_id}"
        comment = data.get("comment")
        comments: list[NocComment] = []
        if isinstance(comment, str) and comment:
            comments.append(NocComment(self._next_comment, comment, when, find_marker(comment)))
            self._next_comment += 1
        subject = str(data.get("subject", ""))
        ticket = NocTicket(
            id=ticket_id, mask=mask, subject=subject, department=str(data.get("department")),
            category=data.get("category"), service_id=data.get("service_id"),
            recipients=list(data.get("recipients") or []), is_closed=False, created_at=when,
            updated_at=when, comments=comments,
            marker=find_marker(comment if isinstance(comment, str) else None) or find_marker(subject),
            task_uuid=task.uuid,
        )
        self.noc_tickets[ticket_id] = ticket
        self.counters["nocworx"]["tickets"] += 1
        return ticket

    # -- the control view ------------------------------------------------------------------------

    def markers(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for hostup in self.hostup_tickets.values():
            if hostup.marker:
                counts[hostup.marker] += 1
        for noc in self.noc_tickets.values():
            if noc.marker:
                counts[noc.marker] += 1
        return counts

    def stats(self) -> dict[str, Any]:
        counts = self.markers()
        pending = sum(1 for task in self.tasks.values() if task.status == "pending")
        hostup = self.counters["hostup"]
        nocworx = self.counters["nocworx"]
        return {
            "hostup": {
                "tickets": hostup["tickets"], "requests": hostup["requests"], "429": hostup["429"],
                "401": hostup["401"], "5xx": hostup["5xx"], "dropped": hostup["dropped"],
                "critical_refused": hostup["critical_refused"], "replies": hostup["replies"],
            },
            "nocworx": {
                "tickets": nocworx["tickets"], "tasks": nocworx["tasks"], "requests": nocworx["requests"],
                "429": nocworx["429"], "401": nocworx["401"], "5xx": nocworx["5xx"],
                "dropped": nocworx["dropped"], "tasks_pending": pending,
                "tasks_success": nocworx["tasks_success"], "tasks_failure": nocworx["tasks_failure"],
                "tasks_rejected": nocworx["tasks_rejected"], "tasks_stuck": nocworx["tasks_stuck"],
            },
            "tickets_by_marker": dict(counts),
            "duplicates": {marker: n for marker, n in counts.items() if n > 1},
        }

    def tickets_json(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for hostup in self.hostup_tickets.values():
            out.append({
                "provider": "hostup", "id": hostup.id, "number": hostup.number, "marker": hostup.marker,
                "department": hostup.department_slug, "subject": hostup.subject,
                "priority": hostup.priority, "status": hostup.status,
                "is_closed": hostup.status == "closed", "created_at": hostup.created_at,
                "body": hostup.body, "cc": hostup.cc_emails, "task_uuid": None,
                "messages": [
                    {"id": m.id, "body": m.body, "marker": find_marker(m.body), "at": m.sent_at}
                    for m in hostup.messages
                ],
            })
        for noc in self.noc_tickets.values():
            out.append({
                "provider": "nocworx", "id": noc.id, "number": noc.mask, "marker": noc.marker,
                "department": noc.department, "category": noc.category, "subject": noc.subject,
                "priority": None, "status": "closed" if noc.is_closed else "open",
                "is_closed": noc.is_closed, "created_at": noc.created_at,
                "body": noc.comments[0].body if noc.comments else None, "cc": noc.recipients,
                "task_uuid": noc.task_uuid,
                "messages": [{"id": c.id, "body": c.body, "marker": c.marker, "at": c.date}
                             for c in noc.comments],
            })
        out.sort(key=lambda item: float(item["created_at"]))
        return out

    def tasks_json(self) -> list[dict[str, Any]]:
        """Every NocWorx task with when it was accepted and resolves (``resolves_at``: null for a stuck
        one; it resolves then whether or not anyone looks), and ``polls``: the task:show requests that
        arrived for it (``GET /v1/task/{uuid}``, any answer, from the request log)."""
        polls: Counter[str] = Counter()
        for record in self.request_log:
            if record.provider == "nocworx" and record.method == "GET" and record.path.startswith("/v1/task/"):
                polls[record.path.removeprefix("/v1/task/").rstrip("/").lower()] += 1
        return [{
            "id": task.id, "uuid": task.uuid, "action": task.action, "outcome": task.outcome,
            "status": task.status, "request_date": task.request_date,
            "resolves_at": None if task.outcome == "stuck" else task.due_at,
            "delay_s": None if task.outcome == "stuck" else task.due_at - task.request_date,
            "resolved_at": task.resolved_at, "ticket_id": task.ticket_id, "polls": polls[task.uuid],
        } for task in sorted(self.tasks.values(), key=lambda t: t.id)]

    def requests_json(self, provider: str | None, since: float | None) -> list[dict[str, Any]]:
        return [
            record.to_json() for record in self.request_log
            if (provider is None or record.provider == provider) and (since is None or record.at >= since)
        ]
