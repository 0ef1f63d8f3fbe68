"""``dispatcher import FILE``: a batch file through validation and intake, and (``--wait``) to tickets.

What a file means is decided in :mod:`dispatcher.intake.batch` (pure) and what storing it means in
:meth:`Dispatcher.accept_many`; this module is the terminal around them: progress bars, the list of
bad rows, the dry-run plan, the summary table, the report file and the exit code.

Every row is validated before any is stored. A file with a bad row stores nothing (exit 2) unless
``--skip-invalid``; the valid rows are then stored in one transaction and enqueued.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.exc import DBAPIError

from dispatcher.config import AppConfig, TargetConfig
from dispatcher.domain import TERMINAL_STATUSES, IntentInput, Status
from dispatcher.errors import BatchFileError, FieldProblem, IntentInvalid, StoreUnavailable
from dispatcher.intake.batch import (
    Batch,
    BatchRow,
    ReportLine,
    TargetPlan,
    detect_format,
    human_duration,
    parse_batch,
    plan_target,
    problems_text,
    render_report,
    report_format,
)
from dispatcher.service import Dispatcher, ItemResult, ItemStatus, Valid

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 4
#: bad rows listed on the terminal (all of them go to --report)
SHOWN_PROBLEMS = 50
VALIDATE_STEP = 2000
WAIT_POLL_S = 0.5


@dataclass(frozen=True)
class ImportOptions:
    path: Path
    fmt: str | None = None
    target: str | None = None
    topic: str | None = None
    priority: str | None = None
    skip_invalid: bool = False
    dry_run: bool = False
    wait: bool = False
    timeout_s: float = 600.0
    report: Path | None = None
    submitted_by: str | None = None


@dataclass
class Checked:
    """A row after validation: its intent, or why it was refused."""

    row: BatchRow
    valid: Valid | None = None
    problems: tuple[FieldProblem, ...] = ()

    @property
    def intent(self) -> IntentInput | None:
        return self.valid.intent if self.valid is not None else None

    @property
    def target(self) -> TargetConfig | None:
        return self.valid.target if self.valid is not None else None


def run_import(config: AppConfig, opts: ImportOptions, console: Console, err: Console) -> int:
    """Import one file; returns the exit code (0 ok, 1 tickets failed or pending, 2 bad input, 4 down)."""
    try:
        fmt = detect_format(opts.path.name, opts.fmt)
        report_fmt = report_format(str(opts.report)) if opts.report is not None else None
        data = opts.path.read_bytes()
        batch = parse_batch(data, name=opts.path.name, fmt=fmt,
                            defaults={"target": opts.target, "topic": opts.topic, "priority": opts.priority})
    except BatchFileError as exc:
        err.print(f"[bold red]cannot import:[/] {exc}\nnothing was stored", highlight=False)
        return EXIT_USAGE
    except OSError as exc:
        err.print(f"[bold red]cannot read {opts.path}:[/] {exc.strerror or exc}\nnothing was stored", highlight=False)
        return EXIT_USAGE

    from dispatcher.runtime import build_cli_runtime

    runtime = build_cli_runtime(config)
    try:
        return _import(runtime.service, batch, opts, report_fmt, console, err)
    except (DBAPIError, StoreUnavailable) as exc:  # after the batch was stored (its failure is caught below)
        err.print(f"[bold red]the database cannot be reached:[/] {_reason(exc)}", highlight=False)
        return EXIT_UNAVAILABLE
    finally:
        runtime.close()


def _reason(exc: Exception) -> str:
    return type(exc.orig).__name__ if isinstance(exc, DBAPIError) else str(exc)


def _import(service: Dispatcher, batch: Batch, opts: ImportOptions, report_fmt: str | None,
            console: Console, err: Console) -> int:
    with _progress(err) as progress:
        checked = _validate(service, batch.rows, progress)
    bad = [c for c in checked if c.problems]
    if bad:
        _show_problems(err, batch, bad)
    if opts.dry_run:
        _show_plan(service, [c for c in checked if not c.problems], console)
        if bad and not opts.skip_invalid:
            err.print(f"[yellow]a real run would store nothing: {len(bad)} invalid row(s)[/] (or use --skip-invalid)")
            return EXIT_USAGE
        console.print("dry run: nothing was stored or sent")
        return EXIT_OK
    if bad and not opts.skip_invalid:
        if opts.report is not None and report_fmt is not None:
            _write_report(opts.report, report_fmt, [_report_line(c, None, {}, {}) for c in checked], err)
        err.print(f"[bold red]nothing was stored:[/] {len(bad)} of {len(checked)} row(s) are invalid; "
                  "fix them, or import the others with --skip-invalid", highlight=False)
        return EXIT_USAGE

    good = [c for c in checked if not c.problems]
    if not good:
        err.print(f"[bold red]nothing was stored:[/] none of the {len(checked)} row(s) is valid", highlight=False)
        return EXIT_USAGE
    try:
        with _progress(err) as progress:
            results = _accept(service, batch, good, opts, progress)
    except (DBAPIError, StoreUnavailable) as exc:  # one transaction: it all went, or none of it
        err.print(f"[bold red]the database cannot be reached:[/] {_reason(exc)}; nothing was stored",
                  highlight=False)
        return EXIT_UNAVAILABLE
    by_row = {c.row.number: r for c, r in zip(good, results, strict=True)}
    index_to_row = {i: c.row.number for i, c in enumerate(good)}
    ids = list(dict.fromkeys(r.id for r in results if r.id is not None))
    if opts.wait:
        outcomes = _wait(service, ids, opts.timeout_s, err)
    else:  # what was stored now is queued; only replays have a story worth a query
        outcomes = {r.id: (Status.queued, None) for r in results if r.status is ItemStatus.accepted and r.id}
        outcomes.update(service.store.outcomes([r.id for r in results if r.status is ItemStatus.replay and r.id]))

    lines = [_report_line(c, by_row.get(c.row.number), outcomes, index_to_row) for c in checked]
    console.print(_summary(lines))
    if bad:
        err.print(f"[yellow]skipped {len(bad)} invalid row(s)[/] (--skip-invalid)")
    if opts.report is not None and report_fmt is not None and not _write_report(opts.report, report_fmt, lines, err):
        return EXIT_FAILED
    if opts.wait:
        unfinished = sum(1 for s, _ in outcomes.values() if s is not Status.succeeded)
        if unfinished:
            err.print(f"[bold red]{unfinished} intent(s) did not end in a ticket[/] (see the table"
                      + (" and the report)" if opts.report else ")"), highlight=False)
            return EXIT_FAILED
    return EXIT_OK


# -- steps ----------------------------------------------------------------------------------------

def _validate(service: Dispatcher, rows: Sequence[BatchRow], progress: Progress) -> list[Checked]:
    task = progress.add_task("validating", total=len(rows))
    out: list[Checked] = []
    for start in range(0, len(rows), VALIDATE_STEP):
        chunk = rows[start:start + VALIDATE_STEP]
        readable = [r for r in chunk if not r.problems]
        verdicts = iter(service.validate_many([r.data for r in readable]))
        for row in chunk:
            if row.problems:
                out.append(Checked(row, problems=row.problems))
                continue
            verdict = next(verdicts)
            if isinstance(verdict, IntentInvalid):
                out.append(Checked(row, problems=tuple(verdict.problems)))
            else:
                out.append(Checked(row, valid=verdict))
        progress.update(task, advance=len(chunk))
    return out


def _accept(service: Dispatcher, batch: Batch, good: Sequence[Checked], opts: ImportOptions,
            progress: Progress) -> list[ItemResult]:
    store_task = progress.add_task("storing (one transaction)", total=None)
    send_task = progress.add_task("enqueueing", total=None)

    def report(phase: str, done: int, total: int) -> None:
        if phase == "store":
            progress.update(store_task, total=max(total, 1), completed=max(done, 1))
        elif phase == "enqueue":
            progress.update(send_task, total=total, completed=done)

    results = service.accept_many(
        [c.valid for c in good], source="import", submitted_by=opts.submitted_by,
        submitted_from=batch.name[:100], event_data=[{"file": batch.name, "row": c.row.number} for c in good],
        progress=report)
    progress.update(store_task, total=1, completed=1)
    if progress.tasks[send_task].total is None:
        progress.update(send_task, total=1, completed=1)
    return results


def _wait(service: Dispatcher, ids: list[uuid.UUID], timeout_s: float,
          err: Console) -> dict[uuid.UUID, tuple[Status, str | None]]:
    """Watch the intents until each is terminal or the time is up."""
    deadline = time.monotonic() + timeout_s
    with _progress(err) as progress:
        task = progress.add_task("making tickets", total=len(ids))
        while True:
            outcomes = service.store.outcomes(ids)
            done = sum(1 for s, _ in outcomes.values() if s in TERMINAL_STATUSES)
            progress.update(task, completed=done)
            if done == len(ids) or time.monotonic() >= deadline:
                break
            time.sleep(WAIT_POLL_S)
    if done < len(ids):
        err.print(f"[yellow]gave up waiting after {timeout_s:g} s: {len(ids) - done} intent(s) still pending[/]")
    return outcomes


# -- output ---------------------------------------------------------------------------------------

@contextmanager
def _progress(err: Console) -> Iterator[Progress]:
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        yield progress


def _show_problems(err: Console, batch: Batch, bad: Sequence[Checked]) -> None:
    table = Table(title=f"{len(bad)} invalid row(s) in {batch.name}", title_justify="left")
    table.add_column("row", justify="right")
    table.add_column("field")
    table.add_column("reason", overflow="fold")
    for c in bad[:SHOWN_PROBLEMS]:
        for p in c.problems:
            table.add_row(str(c.row.number), p.field, p.reason)
    err.print(table)
    if len(bad) > SHOWN_PROBLEMS:
        err.print(f"... and {len(bad) - SHOWN_PROBLEMS} more invalid row(s); --report FILE lists every row")


def _report_line(c: Checked, result: ItemResult | None, outcomes: dict[uuid.UUID, tuple[Status, str | None]],
                 index_to_row: dict[int, int]) -> ReportLine:
    target = c.target.name if c.target is not None else _text(c.row.data.get("target"))
    if c.problems:
        return ReportLine(c.row.number, ItemStatus.invalid.value, target=target, error=problems_text(c.problems))
    if result is None or result.id is None:
        return ReportLine(c.row.number, "not_stored", target=target)
    status, ticket = outcomes.get(result.id, (None, None))
    return ReportLine(c.row.number, result.status.value, str(result.id), target,
                      status.value if status is not None else None, ticket,
                      index_to_row.get(result.duplicate_of) if result.duplicate_of is not None else None)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _summary(lines: Sequence[ReportLine]) -> Table:
    """Rows per intake result, and intents per status, by target."""
    rows: dict[str, Counter[str]] = defaultdict(Counter)
    intents: dict[str, dict[str, str | None]] = defaultdict(dict)
    for line in lines:
        target = line.target or "-"
        rows[target][line.result] += 1
        if line.intent_id is not None:
            intents[target][line.intent_id] = line.status
    table = Table(title="import summary", title_justify="left")
    for name in ("target", "rows", "new", "replay", "duplicate", "invalid", "succeeded", "failed", "pending"):
        table.add_column(name, justify="left" if name == "target" else "right")
    totals: Counter[str] = Counter()
    for target in sorted(rows):
        statuses = Counter(intents[target].values())
        counts = {"rows": sum(rows[target].values()), "new": rows[target]["accepted"],
                  "replay": rows[target]["replay"], "duplicate": rows[target]["duplicate"],
                  "invalid": rows[target]["invalid"], "succeeded": statuses["succeeded"],
                  "failed": statuses["failed"] + statuses["cancelled"],
                  "pending": sum(n for s, n in statuses.items() if s not in ("succeeded", "failed", "cancelled"))}
        totals.update(counts)
        table.add_row(target, *(str(counts[k]) for k in counts))
    if len(rows) > 1:
        keys = ("rows", "new", "replay", "duplicate", "invalid", "succeeded", "failed", "pending")
        table.add_row("[bold]all[/]", *(f"[bold]{totals[k]}[/]" for k in keys))
    return table


def _write_report(path: Path, fmt: str, lines: Sequence[ReportLine], err: Console) -> bool:
    try:
        path.write_text(render_report(lines, fmt), encoding="utf-8", newline="")
    except OSError as exc:
        err.print(f"[bold red]cannot write the report {path}:[/] {exc.strerror or exc}", highlight=False)
        return False
    err.print(f"report: {path} ({len(lines)} rows)", highlight=False)
    return True


# -- the dry run ----------------------------------------------------------------------------------

def _show_plan(service: Dispatcher, good: Sequence[Checked], console: Console) -> None:
    """Per target: tickets that would be made, their departments, and the time the rate limit needs."""
    by_target: dict[str, list[Checked]] = defaultdict(list)
    for c in good:
        assert c.target is not None
        by_target[c.target.name].append(c)
    keys = {(c.target.name, c.intent.idempotency_key) for c in good
            if c.target is not None and c.intent is not None and c.intent.idempotency_key}
    stored, stored_note = _stored_keys(service, keys)
    plans: list[TargetPlan] = []
    for name in sorted(by_target):
        target = service.config.targets[name]
        seen: set[str] = set()
        new: list[tuple[int, IntentInput]] = []
        replays = duplicates = 0
        for c in by_target[name]:
            assert c.intent is not None
            key = c.intent.idempotency_key
            if key is not None and key in seen:
                duplicates += 1
                continue
            if key is not None:
                seen.add(key)
                if (name, key) in stored:
                    replays += 1
                    continue
            new.append((c.row.number, c.intent))
        available, checked = _live_departments(service, target) if new else (None, "-")
        plans.append(plan_target(target, new, available=available, replays=replays, duplicates=duplicates,
                                 checked=checked))
    console.print(_plan_table(plans))
    for plan in plans:
        for number, reason in plan.unroutable[:20]:
            console.print(f"  [red]row {number}[/] ({plan.target}) would fail: {reason}", highlight=False)
        if len(plan.unroutable) > 20:
            console.print(f"  ... and {len(plan.unroutable) - 20} more rows for {plan.target} would fail")
    if stored_note:
        console.print(f"[yellow]{stored_note}[/]", highlight=False)
    if plans:
        longest = max(p.duration_s for p in plans)
        console.print(f"all targets (sent to in parallel): {human_duration(longest)} at the configured rate limits, "
                      "plus provider latency, retries and NocWorx polling", highlight=False)


def _stored_keys(service: Dispatcher, keys: set[tuple[str, str]]) -> tuple[set[tuple[str, str]], str | None]:
    try:
        return set(service.store.find_by_keys(keys)), None
    except Exception as exc:  # a dry run works without the database; it just cannot see replays
        return set(), f"could not look for rows already submitted ({type(exc).__name__}): replays count as new"


def _live_departments(service: Dispatcher, target: TargetConfig) -> tuple[list[str] | None, str]:
    """The provider's department list now (HostUp), or why it could not be checked."""
    adapter = service.adapter(target)
    request = adapter.departments_request()
    if request is None:
        return None, "fixed list (checked at intake)"
    raw = service.transport(target).send(request)
    outcome = adapter.classify(request.op, raw)
    if raw.status is not None and 200 <= raw.status < 300:
        slugs = adapter.department_slugs(outcome)
        return slugs, f"checked against the live list ({len(slugs)} departments)"
    why = raw.network_error or f"HTTP {raw.status}"
    return None, f"NOT checked: {target.name} is not reachable ({why})"


def _plan_table(plans: Sequence[TargetPlan]) -> Table:
    table = Table(title="dry run: what this file would do", title_justify="left")
    for name, justify in (("target", "left"), ("tickets", "right"), ("group replies", "right"),
                          ("already submitted", "right"),
                          ("duplicates", "right"), ("departments", "left"), ("would fail", "right"),
                          ("time at rate limit", "right"), ("department check", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for p in plans:
        departments = ", ".join(f"{d}: {n}" for d, n in p.departments.most_common()) or "-"
        table.add_row(f"{p.target} ({p.provider})", str(p.tickets), str(p.replies), str(p.replays),
                      str(p.duplicates), departments, str(len(p.unroutable)), human_duration(p.duration_s),
                      p.departments_checked)
    return table


__all__ = ["ImportOptions", "run_import"]
