"""Batch files, unit level: what a CSV or JSON Lines file means (dispatcher.intake.batch, pure)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from dispatcher.config import Settings, parse_config
from dispatcher.domain import IntentInput
from dispatcher.errors import BatchFileError
from dispatcher.intake.batch import (
    ReportLine,
    detect_format,
    human_duration,
    parse_batch,
    plan_target,
    render_report,
    report_format,
    row_key,
    send_duration_s,
)


def csv_rows(text: str, name: str = "tickets.csv", **defaults: str) -> list[Any]:
    return parse_batch(text.encode(), name=name, fmt="csv", defaults=defaults).rows


def jsonl_rows(lines: list[Any], name: str = "tickets.jsonl", **defaults: str) -> list[Any]:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    return parse_batch(text.encode(), name=name, fmt="jsonl", defaults=defaults).rows


# -- format -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "fmt"), [("a.csv", "csv"), ("A.CSV", "csv"), ("a.jsonl", "jsonl"),
                                           ("dir/a.ndjson", "jsonl")])
def test_the_format_follows_the_extension(name: str, fmt: str) -> None:
    assert detect_format(name) == fmt


def test_format_flag_overrides_the_extension() -> None:
    assert detect_format("export.txt", "csv") == "csv"
    assert detect_format("export.csv", "ndjson") == "jsonl"


@pytest.mark.parametrize("name", ["tickets.xlsx", "tickets.json", "tickets"])
def test_an_unknown_extension_is_a_clear_error_naming_the_formats(name: str) -> None:
    with pytest.raises(BatchFileError, match=r"CSV \(\.csv\) or JSON Lines \(\.jsonl, \.ndjson\).*--format"):
        detect_format(name)


# -- CSV ----------------------------------------------------------------------------------------------

def test_csv_columns_become_intent_fields_with_nested_service_labels_and_cc() -> None:
    [row] = csv_rows("target,subject,body,priority,topic,service.type,service.id,service.name,cc,labels.host,"
                     "labels.team\n"
                     "hostup,Disk full,The disk.,high,vps,vps,101,web-1,a@example.com; b@example.com,web-1,ops\n")
    assert row.number == 2
    assert row.problems == ()
    data = dict(row.data)
    assert data.pop("idempotency_key").startswith("import-")
    assert data == {"target": "hostup", "subject": "Disk full", "body": "The disk.", "priority": "high",
                    "topic": "vps", "service": {"type": "vps", "id": "101", "name": "web-1"},
                    "cc": ["a@example.com", "b@example.com"], "labels": {"host": "web-1", "team": "ops"}}
    IntentInput.model_validate(row.data)  # the shape is what intake takes


def test_empty_cells_are_absent_fields_and_flags_fill_them() -> None:
    rows = csv_rows("target,subject,body,topic,priority\n"
                    ",First,b,,\n"
                    "nocworx,Second,b,dns,urgent\n", target="hostup", topic="vps", priority="low")
    assert [(r.data["target"], r.data["topic"], r.data["priority"]) for r in rows] == [
        ("hostup", "vps", "low"), ("nocworx", "dns", "urgent")]
    assert "service" not in rows[0].data and "cc" not in rows[0].data


def test_a_quoted_multi_line_body_is_one_row_and_rows_number_as_a_spreadsheet_shows_them() -> None:
    rows = csv_rows('subject,body,target\nA,"line one\nline two",hostup\n\nB,b,hostup\n')
    assert [r.number for r in rows] == [2, 4]
    assert rows[0].data["body"] == "line one\nline two"


def test_header_names_are_trimmed_and_case_insensitive_and_a_bom_is_ignored() -> None:
    [row] = parse_batch("\ufeff Subject ,BODY,Target,Labels.Team\nA,b,hostup,ops\n".encode(), name="x.csv",
                        fmt="csv").rows
    assert row.data["subject"] == "A" and row.data["target"] == "hostup"
    assert row.data["labels"] == {"Team": "ops"}  # a label's key keeps its case


@pytest.mark.parametrize(("header", "message"), [
    ("subject,target", "lacks the required column(s) body"),
    ("subject,body", "lacks the required column(s) target (or give --target)"),
    ("subject,body,target,colour", "unknown column(s): colour"),
    ("subject,body,target,subject", "named twice: subject"),
    ("subject,body,target,,topic", "column 4 has no name"),
    ("subject,body,target,labels.", "unknown column(s): labels."),
])
def test_a_bad_header_is_a_file_error_naming_the_problem(header: str, message: str) -> None:
    with pytest.raises(BatchFileError, match=re.escape(message)):
        csv_rows(f"{header}\nA,b,hostup\n")


def test_target_column_may_be_left_out_when_the_flag_gives_it() -> None:
    [row] = csv_rows("subject,body\nA,b\n", target="nocworx")
    assert row.data["target"] == "nocworx"


def test_a_row_with_more_cells_than_the_header_is_an_invalid_row_not_a_file_error() -> None:
    rows = csv_rows("subject,body,target\nA,b,hostup,extra\nB,b,hostup\n")
    assert rows[0].problems and "4 cells" in rows[0].problems[0].reason
    assert rows[1].problems == ()


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"subject,body,target\n", "has a header but no rows"),
    (b"subject,body,target\n\n,,\n", "has a header but no rows"),
    (b"subject,body,target\nA,b\x00c,hostup\n", "a NUL byte on line 2: this is a binary file"),
    (b'subject,body,target\nA,"unterminated\n', "not valid CSV"),
])
def test_an_empty_or_unreadable_csv_is_a_file_error(content: bytes, message: str) -> None:
    with pytest.raises(BatchFileError, match=message):
        parse_batch(content, name="t.csv", fmt="csv")


def test_invalid_utf8_names_the_byte_offset_and_the_line() -> None:
    content = b"subject,body,target\nA,b,hostup\nCaf\xe9,b,hostup\n"
    with pytest.raises(BatchFileError) as info:
        parse_batch(content, name="latin1.csv", fmt="csv")
    assert "not valid UTF-8 at byte offset 34 (line 3" in str(info.value)
    assert content[34] == 0xE9


# -- JSON Lines ---------------------------------------------------------------------------------------

def test_jsonl_rows_are_intents_and_blank_lines_are_skipped() -> None:
    rows = jsonl_rows([{"target": "hostup", "subject": "A", "body": "b", "service": {"type": "vps", "id": 7}},
                       "", {"target": "nocworx", "subject": "B", "body": "b", "cc": ["x@example.com"]}])
    assert [r.number for r in rows] == [1, 3]
    assert rows[0].data["service"] == {"type": "vps", "id": 7}
    assert rows[1].data["cc"] == ["x@example.com"]


def test_jsonl_accepts_the_dotted_csv_spellings_too() -> None:
    [row] = jsonl_rows([{"target": "hostup", "subject": "A", "body": "b", "service.type": "vps",
                         "service.id": "1", "labels.host": "web-1", "labels": {"team": "ops"}}])
    assert row.data["service"] == {"type": "vps", "id": "1"}
    assert row.data["labels"] == {"team": "ops", "host": "web-1"}


def test_a_jsonl_line_that_is_not_an_object_is_an_invalid_row() -> None:
    rows = jsonl_rows([{"target": "hostup", "subject": "A", "body": "b"}, "[1, 2]", "{broken"])
    assert rows[0].problems == ()
    assert rows[1].problems[0].reason == "a row must be a JSON object, not an array"
    assert rows[2].problems[0].reason.startswith("not valid JSON")


def test_a_file_with_no_json_object_at_all_is_not_json_lines() -> None:
    with pytest.raises(BatchFileError, match=r"not JSON Lines .*line 1: not valid JSON"):
        parse_batch(b"subject,body,target\nA,b,hostup\n", name="really.csv.jsonl", fmt="jsonl")


# -- idempotency keys ---------------------------------------------------------------------------------

def test_the_same_row_of_the_same_file_gets_the_same_key_on_every_run() -> None:
    text = "subject,body,target\nA,b,hostup\nB,b,hostup\n"
    first, second = csv_rows(text), csv_rows(text)
    assert [r.data["idempotency_key"] for r in first] == [r.data["idempotency_key"] for r in second]
    assert first[0].data["idempotency_key"] != first[1].data["idempotency_key"]


def test_the_key_depends_on_the_file_name_and_the_row_not_on_the_flags() -> None:
    text = "subject,body\nA,b\n"
    base = csv_rows(text, name="/tmp/one/tickets.csv", target="hostup")[0].data["idempotency_key"]
    assert csv_rows(text, name="/elsewhere/tickets.csv", target="nocworx")[0].data["idempotency_key"] == base
    assert csv_rows(text, name="other.csv", target="hostup")[0].data["idempotency_key"] != base
    assert csv_rows("subject,body\nA,c\n", name="tickets.csv", target="hostup")[0].data["idempotency_key"] != base


def test_identical_rows_share_a_key_so_the_second_is_a_duplicate() -> None:
    rows = csv_rows("subject,body,target\nA,b,hostup\nA,b,hostup\n")
    assert rows[0].data["idempotency_key"] == rows[1].data["idempotency_key"]


def test_an_idempotency_key_column_wins_over_the_hash() -> None:
    rows = csv_rows("subject,body,target,idempotency_key\nA,b,hostup,ext-1\nB,b,hostup,\n")
    assert rows[0].data["idempotency_key"] == "ext-1"
    assert rows[1].data["idempotency_key"].startswith("import-")


def test_row_key_is_short_enough_for_the_key_column() -> None:
    assert len(row_key("x" * 500 + ".csv", {"subject": "s" * 10_000})) <= 200


# -- report -------------------------------------------------------------------------------------------

def test_the_report_is_csv_or_json_lines_by_extension() -> None:
    assert report_format("out.csv") == "csv" and report_format("out.ndjson") == "jsonl"
    with pytest.raises(BatchFileError, match=re.escape("--report out.txt")):
        report_format("out.txt")


def test_the_report_has_one_line_per_row_with_its_fate() -> None:
    lines = [ReportLine(2, "accepted", "id-1", "hostup", "queued"),
             ReportLine(3, "invalid", target="hostup", error="subject: required"),
             ReportLine(4, "duplicate", "id-1", "hostup", "queued", duplicate_of=2)]
    csv_text = render_report(lines, "csv").splitlines()
    assert csv_text[0] == "row,result,intent_id,target,status,ticket_id,duplicate_of,error"
    assert csv_text[2] == "3,invalid,,hostup,,,,subject: required"
    parsed = [json.loads(line) for line in render_report(lines, "jsonl").splitlines()]
    assert parsed[2]["duplicate_of"] == 2 and parsed[0]["ticket_id"] is None


# -- dry-run arithmetic -------------------------------------------------------------------------------

def test_send_time_is_the_token_bucket_after_the_burst() -> None:
    assert send_duration_s(5, rate_count=60, rate_period_s=60, burst=5) == 0
    assert send_duration_s(125, rate_count=60, rate_period_s=60, burst=5) == 120
    assert send_duration_s(1005, rate_count=10, rate_period_s=1, burst=5) == 100


@pytest.mark.parametrize(("seconds", "text"), [(0.2, "under 1 s"), (42, "42 s"), (200, "3 min 20 s"),
                                               (7500, "2 h 5 min")])
def test_durations_read_as_people_say_them(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_the_plan_counts_tickets_per_resolved_department_and_flags_slugs_the_provider_lacks() -> None:
    config = parse_config({"targets": {"hostup": {"provider": "hostup", "base_url": "http://h", "api_key_env": "K",
                                                  "rate": "30/minute", "burst": 2}}},
                          Settings(), env={"K": "k"})
    target = config.targets["hostup"]
    intents = [(2, IntentInput(target="hostup", subject="a", body="b", topic="vps")),
               (3, IntentInput(target="hostup", subject="a", body="b", topic="ip")),
               (4, IntentInput(target="hostup", subject="a", body="b", topic="dns")),
               (5, IntentInput(target="hostup", subject="a", body="b", department="gone"))]
    plan = plan_target(target, intents, available=["vps", "domain-names", "billing"])
    assert plan.tickets == 3
    assert plan.departments == {"vps": 2, "domain-names": 1}
    assert [n for n, _ in plan.unroutable] == [5] and "does not list" in plan.unroutable[0][1]
    assert plan.duration_s == pytest.approx(2.0)  # (3 - burst 2) at 30/min


def test_grouped_rows_plan_one_ticket_per_group_and_replies_for_the_rest() -> None:
    config = parse_config({"targets": {"hostup": {"provider": "hostup", "base_url": "http://h", "api_key_env": "K",
                                                  "rate": "60/minute", "burst": 1}}},
                          Settings(), env={"K": "k"})
    intents = [(n, IntentInput(target="hostup", subject="a", body="b", topic="vps", group_key=g))
               for n, g in ((2, "g1"), (3, "g1"), (4, "g2"), (5, "g1"))]
    plan = plan_target(config.targets["hostup"], intents, available=None)
    assert (plan.tickets, plan.replies) == (2, 2)
    assert plan.duration_s == pytest.approx(3.0)  # 4 requests, 1 at once, then 1 a second
