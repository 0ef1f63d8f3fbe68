"""Batch files of intents: CSV and JSON Lines in, rows of intent fields out. Pure: bytes in, data out.

Everything that decides what a file *means* lives here so it can be tested without a database: the
format (by extension, or ``--format``), the columns (intent fields; ``service.type`` / ``service.id``
/ ``service.name``; ``labels.<key>``; ``cc`` split on ``;``), the defaults given by flags, the
idempotency key of each row, the report file and the send-time estimate of a dry run.

A file that cannot be read as a whole (unknown format, not UTF-8, empty, a header without a
required column) raises :class:`~dispatcher.errors.BatchFileError`; a row that cannot be read
(a JSON Lines row that is not a JSON object) carries its problems and is reported with the rows
that fail validation.

Row numbers are what a person sees: in a CSV file the spreadsheet row (the header is row 1, the
first data row is row 2); in a JSON Lines file the line number.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from dispatcher.domain import BODY_MAX, IntentInput
from dispatcher.errors import BatchFileError, FieldProblem, RoutingError
from dispatcher.routing import merged_routes, resolve

FORMATS = ("csv", "jsonl")
EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: plain intent fields a CSV column may name
SCALAR_COLUMNS = ("target", "subject", "body", "priority", "topic", "department", "category", "cc",
                  "critical_reason", "idempotency_key", "group_key")
SERVICE_COLUMNS = ("service.type", "service.id", "service.name")
LABEL_PREFIX = "labels."
#: the fields every row needs (``target`` may come from ``--target`` instead)
REQUIRED_COLUMNS = ("subject", "body", "target")
#: the flags that fill a field a row leaves empty
DEFAULTABLE = ("target", "topic", "priority")
CC_SEPARATOR = ";"
KEY_PREFIX = "import-"


@dataclass(frozen=True)
class BatchRow:
    """One row of the file, as intent data ready for validation."""

    number: int
    data: dict[str, Any]
    problems: tuple[FieldProblem, ...] = ()


@dataclass(frozen=True)
class Batch:
    name: str
    format: str
    rows: list[BatchRow]


def detect_format(filename: str, override: str | None = None) -> str:
    """The format named by ``--format``, else by the file's extension."""
    if override is not None:
        fmt = override.lower()
        if fmt in ("ndjson", "jsonlines"):
            fmt = "jsonl"
        if fmt not in FORMATS:
            raise BatchFileError(f"unknown format '{override}'; use one of {', '.join(FORMATS)}")
        return fmt
    suffix = PurePath(filename).suffix.lower()
    if suffix not in EXTENSIONS:
        raise BatchFileError(
            f"{PurePath(filename).name}: cannot tell the format from the extension '{suffix or '(none)'}'; "
            f"batch files are CSV (.csv) or JSON Lines (.jsonl, .ndjson) — or say which with --format")
    return EXTENSIONS[suffix]


def decode(data: bytes, name: str) -> str:
    """UTF-8 text (a byte-order mark is allowed); invalid bytes are named by offset and line."""
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        raise BatchFileError(f"{name}: not valid UTF-8 at byte offset {offset} (line {line}, byte {column} of the "
                             f"line: 0x{data[offset]:02x}); save the file as UTF-8") from None


def row_key(name: str, content: Mapping[str, Any]) -> str:
    """The default idempotency key of a row: the file's name and the row as written, hashed.

    The same row of the same file gives the same key on every run, so a re-run is a replay; the
    flags are not part of it (a re-run with other defaults still sends nothing new).
    """
    return _key(PurePath(name).name, content)


def _key(base: str, content: Mapping[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return KEY_PREFIX + hashlib.sha256(f"{base}\n{canonical}".encode()).hexdigest()[:40]


def parse_batch(data: bytes, *, name: str, fmt: str, defaults: Mapping[str, str | None] | None = None) -> Batch:
    """Read a whole file into rows of intent data, with defaults and idempotency keys applied."""
    base = PurePath(name).name
    text = decode(data, base)
    if not text.strip():
        raise BatchFileError(f"{base} is empty: no rows to import")
    if "\x00" in text:  # valid UTF-8 is no proof of text: NUL bytes mean a binary file
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise BatchFileError(f"{base}: a NUL byte on line {line}: this is a binary file, not CSV or JSON Lines")
    given = {k: v for k, v in (defaults or {}).items() if v not in (None, "")}
    unknown_defaults = sorted(set(given) - set(DEFAULTABLE))
    if unknown_defaults:
        raise ValueError(f"not a defaultable field: {', '.join(unknown_defaults)}")
    raw_rows = _read_csv(text, base, has_target="target" in given) if fmt == "csv" else _read_jsonl(text, base)
    rows = [_finish_row(number, content, problems, base, given) for number, content, problems in raw_rows]
    if not rows:
        raise BatchFileError(f"{base} has a header but no rows to import")
    return Batch(base, fmt, rows)


def _finish_row(number: int, content: dict[str, Any], problems: tuple[FieldProblem, ...], name: str,
                defaults: Mapping[str, Any]) -> BatchRow:
    if problems:
        return BatchRow(number, content, problems)
    data = dict(content)
    for key, value in defaults.items():
        if data.get(key) in (None, ""):
            data[key] = value
    if data.get("idempotency_key") in (None, ""):
        data["idempotency_key"] = _key(name, content)
    return BatchRow(number, data)


# -- CSV ----------------------------------------------------------------------------------------------

def _column_name(cell: str) -> str:
    """Header names are trimmed and case-insensitive; a label's key keeps its case."""
    name = cell.strip()
    if name.lower().startswith(LABEL_PREFIX):
        return LABEL_PREFIX + name[len(LABEL_PREFIX):]
    return name.lower()


def _csv_columns(header: list[str], name: str, has_target: bool) -> list[str]:
    columns = [_column_name(cell) for cell in header]
    problems: list[str] = []
    for position, column in enumerate(columns, start=1):
        if not column:
            problems.append(f"column {position} has no name")
    duplicates = sorted(c for c, n in Counter(columns).items() if n > 1 and c)
    if duplicates:
        problems.append(f"column(s) named twice: {', '.join(duplicates)}")
    known = set(SCALAR_COLUMNS) | set(SERVICE_COLUMNS)
    unknown = [c for c in columns if c and c not in known and not (c.startswith(LABEL_PREFIX)
                                                                     and len(c) > len(LABEL_PREFIX))]
    if unknown:
        problems.append(f"unknown column(s): {', '.join(unknown)} (columns are {', '.join(SCALAR_COLUMNS)}, "
                        f"{', '.join(SERVICE_COLUMNS)} and labels.<key>)")
    required = [c for c in REQUIRED_COLUMNS if not (c == "target" and has_target)]
    missing = [c for c in required if c not in columns]
    if missing:
        hint = " (or give --target)" if "target" in missing else ""
        problems.append(f"the header lacks the required column(s) {', '.join(missing)}{hint}")
    if problems:
        raise BatchFileError(f"{name}: bad header (row 1): " + "; ".join(problems))
    return columns


def _read_csv(text: str, name: str, *, has_target: bool) -> list[tuple[int, dict[str, Any], tuple[FieldProblem, ...]]]:
    limit = max(csv.field_size_limit(), 4 * BODY_MAX)
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # a stray quote is an error, not data
    out: list[tuple[int, dict[str, Any], tuple[FieldProblem, ...]]] = []
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise BatchFileError(f"{name}: the first row must be a header naming the columns "
                                 f"(at least {', '.join(REQUIRED_COLUMNS)})")
        columns = _csv_columns(header, name, has_target)
        for number, record in enumerate(reader, start=2):
            if not any(cell.strip() for cell in record):
                continue  # a blank line or an empty spreadsheet row
            if len(record) > len(columns):
                extra = len(record) - len(columns)
                out.append((number, {}, (FieldProblem("row", f"has {len(record)} cells but the header names "
                                                              f"{len(columns)} columns ({extra} too many)"),)))
                continue
            out.append((number, _csv_row(columns, record), ()))
    except csv.Error as exc:
        raise BatchFileError(f"{name}: not valid CSV near line {reader.line_num}: {exc}") from None
    return out


def _csv_row(columns: Sequence[str], record: Sequence[str]) -> dict[str, Any]:
    """Cells to intent data: empty cells are absent, dotted columns nest, ``cc`` splits on ``;``."""
    data: dict[str, Any] = {}
    service: dict[str, str] = {}
    labels: dict[str, str] = {}
    for column, cell in zip(columns, record, strict=False):
        if not cell.strip():
            continue
        if column.startswith(LABEL_PREFIX):
            labels[column[len(LABEL_PREFIX):]] = cell
        elif column.startswith("service."):
            service[column[len("service."):]] = cell
        elif column == "cc":
            data["cc"] = [part.strip() for part in cell.split(CC_SEPARATOR) if part.strip()]
        else:
            data[column] = cell
    if service:
        data["service"] = service
    if labels:
        data["labels"] = labels
    return data


# -- JSON Lines ---------------------------------------------------------------------------------------

def _read_jsonl(text: str, name: str) -> list[tuple[int, dict[str, Any], tuple[FieldProblem, ...]]]:
    out: list[tuple[int, dict[str, Any], tuple[FieldProblem, ...]]] = []
    objects = 0
    first_problem: str | None = None
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"not valid JSON: {exc.msg} at character {exc.pos + 1}"
        else:
            if isinstance(value, dict):
                objects += 1
                nested, problems = _nest(value)
                out.append((number, nested, problems))
                continue
            problem = f"a row must be a JSON object, not {_json_kind(value)}"
        first_problem = first_problem or f"line {number}: {problem}"
        out.append((number, {}, (FieldProblem("row", problem),)))
    if out and objects == 0:
        raise BatchFileError(f"{name}: not JSON Lines (one JSON object per line): {first_problem}")
    return out


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return "a boolean" if isinstance(value, bool) else "a number"


def _nest(obj: dict[str, Any]) -> tuple[dict[str, Any], tuple[FieldProblem, ...]]:
    """Accept the CSV spellings (``service.id``, ``labels.host``) in JSON rows too."""

    def dotted(key: str) -> bool:
        head, dot, rest = key.partition(".")
        return bool(dot and rest) and head in ("service", "labels")

    if not any(dotted(key) for key in obj):
        return obj, ()
    data = {key: value for key, value in obj.items() if not dotted(key)}
    problems: list[FieldProblem] = []
    for key, value in obj.items():
        if not dotted(key):
            continue
        head, _, rest = key.partition(".")
        parent = data.get(head, {})
        if not isinstance(parent, dict):
            problems.append(FieldProblem(key, f"cannot be given with a '{head}' that is not an object"))
            continue
        if rest in parent:
            problems.append(FieldProblem(key, f"given twice (also in '{head}')"))
            continue
        data[head] = {**parent, rest: value}
    return data, tuple(problems)


# -- the report file ----------------------------------------------------------------------------------

REPORT_FIELDS = ("row", "result", "intent_id", "target", "status", "ticket_id", "duplicate_of", "error")


@dataclass(frozen=True)
class ReportLine:
    """One row's fate: ``result`` is what intake did (accepted, replay, duplicate, invalid, not_stored);
    ``status`` the intent's status when the report was written."""

    row: int
    result: str
    intent_id: str | None = None
    target: str | None = None
    status: str | None = None
    ticket_id: str | None = None
    duplicate_of: int | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in REPORT_FIELDS}


def report_format(filename: str) -> str:
    suffix = PurePath(filename).suffix.lower()
    if suffix not in EXTENSIONS:
        raise BatchFileError(f"--report {filename}: the report is written as CSV (.csv) or JSON Lines "
                             "(.jsonl, .ndjson); name the file with one of those extensions")
    return EXTENSIONS[suffix]


def render_report(lines: Iterable[ReportLine], fmt: str) -> str:
    """The report file's text: one line per row of the input, in input order."""
    buffer = io.StringIO(newline="")
    if fmt == "csv":
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(REPORT_FIELDS)
        for line in lines:
            writer.writerow(["" if v is None else v for v in (getattr(line, f) for f in REPORT_FIELDS)])
    else:
        for line in lines:
            buffer.write(json.dumps(line.as_dict(), ensure_ascii=False) + "\n")
    return buffer.getvalue()


def problems_text(problems: Iterable[FieldProblem]) -> str:
    return "; ".join(f"{p.field}: {p.reason}" for p in problems)


# -- the cost of a batch (dry run) --------------------------------------------------------------------

def send_duration_s(count: int, *, rate_count: int, rate_period_s: float, burst: int) -> float:
    """How long the target's limiter needs to let ``count`` creates through.

    The limiter is a token bucket: ``burst`` requests may go at once, then ``rate_count`` per
    ``rate_period_s``. Provider latency, retries and NocWorx polling come on top.
    """
    if count <= burst or rate_count <= 0:
        return 0.0
    return (count - burst) * rate_period_s / rate_count


def human_duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    seconds = math.ceil(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


@dataclass
class TargetPlan:
    """What a batch would do to one target."""

    target: str
    provider: str
    tickets: int = 0
    replies: int = 0  # grouped rows after their group's first: replies on its ticket, not tickets
    replays: int = 0
    duplicates: int = 0
    departments: Counter[str] = field(default_factory=Counter)
    unroutable: list[tuple[int, str]] = field(default_factory=list)
    departments_checked: str = ""
    duration_s: float = 0.0


def plan_target(target: Any, rows: Sequence[tuple[int, IntentInput]], *, available: Sequence[str] | None,
                replays: int = 0, duplicates: int = 0, checked: str = "") -> TargetPlan:
    """Route each new row as the worker will (``routing.resolve``) and count tickets per department.

    ``target`` is a :class:`~dispatcher.config.TargetConfig`; ``available`` the provider's live
    department list (None: not checked). A row that cannot be routed would fail in the worker. Rows
    of one ``group_key`` make one ticket and replies (fewer, if the group already has a ticket open).
    """
    plan = TargetPlan(target.name, target.provider.value, replays=replays, duplicates=duplicates,
                      departments_checked=checked)
    routes = merged_routes(target.provider, target.routes)
    groups: set[str] = set()
    for number, intent in rows:
        if intent.group_key is not None:
            if intent.group_key in groups:
                plan.replies += 1
                continue
            groups.add(intent.group_key)
        try:
            res = resolve(target.provider, topic=intent.topic, department=intent.department,
                          category=intent.category, routes=routes, available=available)
        except RoutingError as exc:
            plan.unroutable.append((number, str(exc)))
            continue
        plan.tickets += 1
        plan.departments[res.department + (f" / {res.category}" if res.category else "")] += 1
    plan.duration_s = send_duration_s(plan.tickets + plan.replies, rate_count=target.rate_count,
                                      rate_period_s=target.rate_period_s, burst=target.burst)
    return plan


__all__ = [
    "DEFAULTABLE", "FORMATS", "REPORT_FIELDS", "Batch", "BatchRow", "ReportLine", "TargetPlan", "decode",
    "detect_format", "human_duration", "parse_batch", "plan_target", "problems_text", "render_report",
    "report_format", "row_key", "send_duration_s",
]
