"""Operator commands: ``intents list|retry|cancel|repoll``, ``targets``, ``check``, ``audit``.

Registered onto the ``dispatcher`` command group by :mod:`dispatcher.cli`. Output is a table for
people and ``--json`` for scripts; secrets print as ``<secret>``. Exit codes as in cli.py, plus
1 when ``check`` finds a problem.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from dispatcher.cli import (
    EXIT_FAILED,
    EXIT_USAGE,
    _config,
    _whoami,
    console,
    err_console,
    intents,
    main,
)
from dispatcher.errors import IntentInvalid, UnknownIntent
from dispatcher.operations import EDITABLE, IntentFilter, OperationRefused, Operations
from dispatcher.render import status_text

_SINCE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)$")
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``2h``, ``30m``, ``1d`` ago, or an ISO 8601 time."""
    now = now or datetime.now(UTC)
    match = _SINCE.match(value.strip())
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("expected an age like 2h, 30m, 1d, or an ISO 8601 time",
                                 param_hint="--since") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@contextmanager
def operations() -> Iterator[Operations]:
    from dispatcher.runtime import build_cli_runtime

    runtime = build_cli_runtime(_config())
    try:
        yield Operations(runtime.service)
    finally:
        runtime.close()


def _filter_options(func: Any) -> Any:
    for option in reversed([
        click.option("--status", "-s", multiple=True, help="queued, sending, waiting, polling, succeeded, failed, "
                     "cancelled (repeatable)"),
        click.option("--target", "-t"),
        click.option("--provider", type=click.Choice(["hostup", "nocworx"])),
        click.option("--source", help="api, cli, python, import, alertmanager, grafana, demo"),
        click.option("--since", help="created within this age (2h, 1d) or after this ISO time"),
        click.option("--error-code", help="last error code, e.g. upstream_unavailable"),
        click.option("--group-key"),
        click.option("--text", help="text in the subject"),
    ]):
        func = option(func)
    return func


def _build_filter(ids: tuple[str, ...] = (), **opts: Any) -> IntentFilter:
    try:
        parsed_ids = tuple(uuid.UUID(i) for i in ids)
    except ValueError as exc:
        raise click.BadParameter(f"not an intent id: {exc}", param_hint="ID") from None
    return IntentFilter(status=tuple(opts.get("status") or ()), target=opts.get("target"),
                        provider=opts.get("provider"), source=opts.get("source"),
                        since=parse_since(opts["since"]) if opts.get("since") else None,
                        error_code=opts.get("error_code"), group_key=opts.get("group_key"),
                        text=opts.get("text"), ids=parsed_ids)


def _age(at: datetime) -> str:
    seconds = (datetime.now(UTC) - at).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _intents_table(views: list[Any], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name, kwargs in (("id", {"no_wrap": True}), ("age", {"justify": "right"}), ("status", {}),
                         ("target", {}), ("subject", {"max_width": 40, "no_wrap": True, "overflow": "ellipsis"}),
                         ("department", {}), ("ticket", {"no_wrap": True}), ("tries", {"justify": "right"}),
                         ("last error", {"max_width": 60})):
        table.add_column(name, **kwargs)
    for v in views:
        ticket = (v.ticket.number or v.ticket.provider_id) if v.ticket else ""
        error = f"{v.last_error_code}: {v.last_error_message}" if v.last_error_code else ""
        table.add_row(str(v.id), _age(v.created_at), status_text(v.status), v.target, v.subject,
                      v.resolved_department or v.department or "", ticket, str(v.attempts),
                      Text(error, style="red") if error else "")
    return table


@intents.command("list")
@_filter_options
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor", help="continue after this id (printed at the end of a full page)")
@click.option("--json", "as_json", is_flag=True, help="one JSON document: {data, next_cursor}")
def intents_list(limit: int, cursor: str | None, as_json: bool, **opts: Any) -> None:
    """Intents, newest first, filtered."""
    flt = _build_filter(**opts)
    before = _build_filter((cursor,)).ids[0] if cursor else None
    with operations() as ops:
        try:
            views = ops.find(flt, limit=limit, before=before)
        except IntentInvalid as exc:
            _refuse(exc)
    next_cursor = str(views[-1].id) if len(views) == limit else None
    if as_json:
        click.echo(json.dumps({"data": [v.as_dict() for v in views], "next_cursor": next_cursor}))
        return
    console.print(_intents_table(views, f"{len(views)} intent(s), newest first"))
    if next_cursor:
        console.print(f"more: --cursor {next_cursor}", highlight=False)


def _refuse(exc: IntentInvalid) -> None:
    err_console.print("[bold red]refused:[/]")
    for problem in exc.problems:
        err_console.print(f"  [yellow]{problem.field}[/]: {problem.reason}", highlight=False)
    sys.exit(EXIT_USAGE)


def _parse_edits(edit: tuple[str, ...]) -> dict[str, Any]:
    edits: dict[str, Any] = {}
    for item in edit:
        if "=" not in item:
            raise click.BadParameter(f"expected field=value, got {item!r}", param_hint="--edit")
        key, value = item.split("=", 1)
        key = key.strip()
        if key.startswith("service."):
            edits.setdefault("service", {})[key.split(".", 1)[1]] = value
        elif key == "cc":
            edits["cc"] = [v.strip() for v in value.split(";") if v.strip()]
        else:
            edits[key] = value
    bad = [k for k in edits if k not in EDITABLE]
    if bad:
        raise click.BadParameter(f"{bad[0]!r} cannot be edited; editable: {', '.join(EDITABLE)} "
                                 "(service.type, service.id, service.name)", param_hint="--edit")
    return edits


@intents.command("retry")
@click.argument("ids", nargs=-1)
@_filter_options
@click.option("--edit", multiple=True, help="field=value to fix before retrying (department, subject, "
              "service.id, ...); only with one ID")
@click.option("--reason", help="why, for the audit trail")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
def intents_retry(ids: tuple[str, ...], edit: tuple[str, ...], reason: str | None, yes: bool, **opts: Any) -> None:
    """Retry failed intents by id or by filter (shows what will be retried and asks first)."""
    edits = _parse_edits(edit)
    if edits and len(ids) != 1:
        raise click.UsageError("--edit applies to exactly one intent id")
    if not ids and not any(opts.values()):
        raise click.UsageError("name intent ids or a filter (e.g. --status failed --target hostup --since 1d)")
    if not ids and not opts.get("status"):
        opts["status"] = ("failed",)
    flt = _build_filter(ids, **opts)
    actor = _whoami()
    with operations() as ops:
        try:
            chosen = ops.find_all(flt)
        except IntentInvalid as exc:
            _refuse(exc)
        if not chosen:
            console.print("nothing matches")
            return
        console.print(_intents_table(chosen, f"{len(chosen)} intent(s) to retry"))
        if edits:
            console.print("edits: " + ", ".join(f"{k} → {v!r}" for k, v in edits.items()), highlight=False)
        if not yes and not click.confirm(f"Retry {len(chosen)} intent(s)?", default=False):
            console.print("nothing retried")
            sys.exit(EXIT_FAILED)
        done, refused = 0, []
        for view in chosen:
            try:
                ops.retry(view.id, actor=actor, edits=edits or None, reason=reason)
                done += 1
            except (OperationRefused, UnknownIntent) as exc:
                refused.append(f"{view.id}: {exc}")
            except IntentInvalid as exc:
                _refuse(exc)
    console.print(f"retried {done} intent(s)" + (f"; {len(refused)} refused:" if refused else ""))
    for line in refused:
        console.print(f"  {line}", highlight=False)
    if refused:
        sys.exit(EXIT_FAILED)


def _single(action: str, intent_id: str, reason: str | None) -> None:
    actor = _whoami()
    with operations() as ops:
        try:
            parsed = uuid.UUID(intent_id)
            view = getattr(ops, action)(parsed, actor=actor, reason=reason)
        except ValueError:
            err_console.print(f"[red]not an intent id: {intent_id}[/]")
            sys.exit(EXIT_USAGE)
        except (OperationRefused, UnknownIntent) as exc:
            err_console.print(f"[red]{action} refused:[/] {exc}", highlight=False)
            sys.exit(EXIT_FAILED)
    console.print(f"{action}: {view.id} is now ", status_text(view.status), highlight=False)


@intents.command("cancel")
@click.argument("intent_id")
@click.option("--reason")
def intents_cancel(intent_id: str, reason: str | None) -> None:
    """Stop an intent that has not been sent."""
    _single("cancel", intent_id, reason)


@intents.command("repoll")
@click.argument("intent_id")
@click.option("--reason")
def intents_repoll(intent_id: str, reason: str | None) -> None:
    """Poll a NocWorx task again after its deadline passed (never re-submits it)."""
    _single("repoll", intent_id, reason)


# -- targets -------------------------------------------------------------------------------------

@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def targets(ctx: click.Context, as_json: bool) -> None:
    """Each target's state, budget, queue depth, oldest waiting intent and last error."""
    if ctx.invoked_subcommand is not None:
        return
    with operations() as ops:
        config = ops.service.config
        now = ops.service.clock()
        states = ops.store.target_states()
        queues = ops.store.queue_stats(now)
    rows = []
    for name, target in sorted(config.targets.items()):
        state = states.get(name)
        queue = queues.get(name, {})
        rows.append({
            "target": name, "provider": target.provider.value,
            "state": "paused" if state and state.paused else "active",
            "paused_reason": state.paused_reason if state and state.paused else None,
            "paused_by": state.paused_by if state and state.paused else None,
            "budget": f"{target.rate_count}/{target.rate_period_s:g}s burst {target.burst}",
            "open_intents": queue.get("open", 0), "oldest_open_age_s": queue.get("oldest_age_s"),
            "last_error": (f"{state.last_error_code}: {state.last_error_message}"
                           if state and state.last_error_code else None),
            "last_error_at": state.last_error_at.isoformat() if state and state.last_error_at else None,
        })
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = Table(title="targets", title_justify="left")
    for column in ("target", "provider", "state", "budget", "open", "oldest open", "last error"):
        table.add_column(column)
    for r in rows:
        shown = Text("paused", style="bold red") if r["state"] == "paused" else Text("active", style="green")
        if r["paused_reason"]:
            shown.append(f"\n{r['paused_reason']} (by {r['paused_by']})", style="red")
        oldest = r["oldest_open_age_s"]
        table.add_row(r["target"], r["provider"], shown, r["budget"], str(r["open_intents"]),
                      f"{oldest:.0f}s" if oldest is not None else "-", r["last_error"] or "")
    console.print(table)


@targets.command("pause")
@click.argument("name")
@click.option("--reason", required=True, help="why, shown in `dispatcher targets` and the audit trail")
def targets_pause(name: str, reason: str) -> None:
    """Stop sending to a target; its intents wait."""
    with operations() as ops:
        try:
            ops.pause(name, actor=_whoami(), reason=reason)
        except IntentInvalid as exc:
            _refuse(exc)
    console.print(f"{name} paused")


@targets.command("resume")
@click.argument("name")
def targets_resume(name: str) -> None:
    """Start sending to a target again; its waiting intents become due at once."""
    with operations() as ops:
        try:
            count = ops.resume(name, actor=_whoami())
        except IntentInvalid as exc:
            _refuse(exc)
    console.print(f"{name} resumed; {count} intent(s) due now")


@main.command()
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--intent", "intent_id", help="only actions on this intent")
def audit(limit: int, intent_id: str | None) -> None:
    """Operator actions, newest first: who did what, when."""
    with operations() as ops:
        rows = ops.audit_log(intent_id=uuid.UUID(intent_id) if intent_id else None, limit=limit)
    table = Table(title="operator actions", title_justify="left")
    for column in ("when (UTC)", "who", "action", "intent / target", "reason", "details"):
        table.add_column(column)
    for r in rows:
        table.add_row(r.at.strftime("%Y-%m-%d %H:%M:%S"), r.actor, r.action, str(r.intent_id or r.target or ""),
                      r.reason or "", json.dumps(r.details) if r.details else "")
    console.print(table)
