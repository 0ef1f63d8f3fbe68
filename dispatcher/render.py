"""Terminal rendering of intents (rich): tables and the per-intent timeline."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dispatcher.domain import EventView, IntentView, Status

STATUS_STYLE = {
    Status.succeeded: "green", Status.failed: "red", Status.cancelled: "dim",
    Status.waiting: "yellow", Status.polling: "cyan", Status.sending: "cyan", Status.queued: "white",
}


def status_text(status: Status) -> Text:
    return Text(status.value, style=STATUS_STYLE.get(status, ""))


def _t(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if at else "-"


def render_intent(view: IntentView, events: Sequence[EventView]) -> Group:
    """The whole story of one intent: what it is, what happened, in order."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("intent", str(view.id))
    head.add_row("status", status_text(view.status))
    head.add_row("target", f"{view.target} ({view.provider.value})")
    head.add_row("subject", view.subject)
    head.add_row("priority", view.priority.value + (f" — {view.critical_reason}" if view.critical_reason else ""))
    dept = view.resolved_department or view.department or "-"
    if view.resolved_category:
        dept += f" / {view.resolved_category}"
    head.add_row("department", dept + (f" (topic {view.topic})" if view.topic else ""))
    if view.ticket:
        t = view.ticket
        head.add_row("ticket", f"{t.provider_id}" + (f"  number {t.number}" if t.number else "")
                     + (f"  {t.url}" if t.url else ""))
    if view.last_error_code:
        head.add_row("last error", Text(f"{view.last_error_code}: {view.last_error_message}", style="red"))
    head.add_row("attempts", str(view.attempts))
    if view.idempotency_key:
        head.add_row("idempotency key", view.idempotency_key)

    timeline = Table(title="timeline", title_justify="left", expand=True, show_lines=False)
    timeline.add_column("time (UTC)", no_wrap=True)
    timeline.add_column("what", no_wrap=True)
    timeline.add_column("detail")
    rows: list[tuple[datetime, str, Text]] = [
        (e.at, e.kind, Text(e.message + (f" [{e.actor}]" if e.actor and e.actor not in e.message else "")))
        for e in events]
    for a in view.attempt_log:
        status = str(a.status_code) if a.status_code is not None else "no answer"
        detail = Text(f"{a.method} {a.path} → {status}")
        if a.duration_ms is not None:
            detail.append(f" in {a.duration_ms:.0f} ms")
        if a.verdict:
            detail.append(f"  [{a.verdict}]", style="bold")
        if a.provider_request_id:
            detail.append(f"  requestId {a.provider_request_id}")
        if a.task_uuid:
            detail.append(f"  task {a.task_uuid}")
        if a.retry_after_s is not None:
            detail.append(f"  Retry-After {a.retry_after_s:g}s", style="yellow")
        if a.error_code or a.error_message:
            detail.append(f"\n{a.error_code or ''}: {a.error_message or ''}", style="red")
        label = f"attempt {a.number} ({a.op})" if a.number else a.op
        rows.append((a.started_at, label, Text() + detail))
    for at, what, detail in sorted(rows, key=lambda r: r[0]):
        timeline.add_row(_t(at), what, detail)
    return Group(Panel(head, title="intent", title_align="left"), timeline)


def outcome_table(views: Sequence[IntentView], expected: dict[str, str] | None = None, *,
                  title: str = "outcomes") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("target", no_wrap=True)
    table.add_column("subject", max_width=34, overflow="ellipsis", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("department", no_wrap=True)
    table.add_column("ticket", no_wrap=True)
    table.add_column("attempts", justify="right")
    table.add_column("note", min_width=30, max_width=70)
    if expected is not None:
        table.add_column("as expected")
    for v in views:
        ticket = ""
        if v.ticket:
            ticket = (f"{v.ticket.number} ({v.ticket.provider_id})" if v.ticket.number
                      else v.ticket.provider_id)
        dept = (v.resolved_department or v.department or "-") + (f"/{v.resolved_category}"
                                                                if v.resolved_category else "")
        note = f"{v.last_error_code}: {v.last_error_message}" if v.status is Status.failed else ""
        row: list[Text | str] = [v.target, v.subject, status_text(v.status), dept, ticket, str(v.attempts), note]
        if expected is not None:
            ok = expected.get(str(v.id)) == v.status.value
            row.append(Text("yes", style="green") if ok else Text(f"no (wanted {expected.get(str(v.id))})",
                                                                    style="bold red"))
        table.add_row(*row)
    return table
