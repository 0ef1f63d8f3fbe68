"""Batch intake on real Postgres and Redis: `dispatcher import` as a subprocess (with real worker and
scheduler processes and the simulators when tickets must be made), and `POST /v1/intents/batch`.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from dispatcher.intake.api import create_app
from dispatcher.queue import DISPATCH
from dispatcher.runtime import Runtime, build_runtime
from dispatcher.service import ItemStatus
from dispatcher.simulator import RunningSimulator
from dispatcher.store.tables import IntentRow
from dispatcher.worker.app import PUBLISHED_AT, CeleryQueue, RedisStamper, make_celery
from tests.acceptance.procs import Procs, dispatcher_command, subprocess_env, to_toml
from tests.conftest import TOKENS, make_config, secrets_env, target_table, tokens_table

MIXED_CSV = """\
target,subject,body,priority,topic,service.type,service.id,cc,labels.host
hostup,Disk full on web-1,The disk on web-1 is full.,high,vps,vps,101,ops@example.com;dev@example.com,web-1
nocworx,DNS zone broken,example.com does not resolve.,medium,dns,,,,
hostup,,A row without a subject.,low,vps,,,,
hostup,Disk full on web-1,The disk on web-1 is full.,high,vps,vps,101,ops@example.com;dev@example.com,web-1
nocworx,Bad priority,x,extreme,dns,,,,
hostup,Mail bounces,Outgoing mail bounces.,low,email,,,not-an-email,
nocworx,Site down,The site answers 500.,urgent,hosting,,,,
"""
#: rows of MIXED_CSV (spreadsheet numbering: the header is row 1)
VALID_ROWS, DUPLICATE_ROW, INVALID_ROWS = [2, 3, 8], 5, [4, 6, 7]


# -- helpers ------------------------------------------------------------------------------------------

class Cli:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*dispatcher_command(), *args], env=self.env, cwd=self.cwd, capture_output=True,
                              text=True, timeout=timeout, check=False)


def count(database_url: str, table: str = "intents") -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 - a fixed name
        assert row is not None
        return int(row[0])


def queued_messages(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(int(client.llen(f"dispatcher.{name}")) for name in ("hostup", "nocworx"))
    finally:
        client.close()


def report_rows(path: Path) -> dict[int, dict[str, Any]]:
    import csv

    with path.open(newline="", encoding="utf-8") as handle:
        return {int(r["row"]): r for r in csv.DictReader(handle)}


@pytest.fixture
def config_file(tmp_path: Path, simulator: RunningSimulator) -> Path:
    path = tmp_path / "dispatcher.toml"
    path.write_text(to_toml({"targets": target_table(simulator), "api": tokens_table(),
                             "scheduler": {"interval_s": 0.2, "requeue_after_s": 5}}))
    return path


@pytest.fixture
def env(database_url: str, redis_url: str, config_file: Path) -> dict[str, str]:
    return subprocess_env({"DISPATCHER_DATABASE_URL": database_url, "DISPATCHER_BROKER_URL": redis_url,
                           "DISPATCHER_CONFIG": str(config_file), "COLUMNS": "200", **secrets_env()})


@pytest.fixture
def cli(env: dict[str, str], tmp_path: Path) -> Cli:
    return Cli(env, tmp_path)


@pytest.fixture
def workers(env: dict[str, str], tmp_path: Path) -> Iterator[Procs]:
    """A Celery worker (threads) and the scheduler, as `dispatcher` subprocesses."""
    procs = Procs(tmp_path, env)
    procs.start("worker", "worker", "--pool", "threads", "-c", "4")
    procs.start("scheduler", "scheduler")
    try:
        yield procs
    finally:
        procs.stop_all()


# -- the CLI --------------------------------------------------------------------------------------------

def test_a_file_with_bad_rows_names_each_and_stores_nothing(
        cli: Cli, tmp_path: Path, database_url: str, redis_url: str) -> None:
    (tmp_path / "mixed.csv").write_text(MIXED_CSV)
    result = cli("import", "mixed.csv", "--report", "refused.csv")
    assert result.returncode == 2, result.stdout + result.stderr
    out = " ".join(result.stderr.split())
    assert "3 invalid row(s) in mixed.csv" in out
    for row, field, reason in ((4, "subject", "required"), (6, "priority", "Input should be 'low'"),
                               (7, "cc.0", "value is not a valid email address")):
        assert f"│ {row} │ {field} │ {reason}" in out, result.stderr
    assert "nothing was stored: 3 of 7 row(s) are invalid" in out
    assert count(database_url) == 0 and queued_messages(redis_url) == 0
    report = report_rows(tmp_path / "refused.csv")
    assert {n: r["result"] for n, r in report.items()} == {2: "not_stored", 3: "not_stored", 4: "invalid",
                                                          5: "not_stored", 6: "invalid", 7: "invalid",
                                                          8: "not_stored"}
    assert report[4]["error"] == "subject: required"


def test_skip_invalid_makes_one_ticket_per_valid_row_and_a_second_run_makes_none(
        cli: Cli, workers: Procs, tmp_path: Path, database_url: str, simulator: RunningSimulator) -> None:
    (tmp_path / "mixed.csv").write_text(MIXED_CSV)
    first = cli("import", "mixed.csv", "--skip-invalid", "--wait", "--timeout", "90", "--report", "first.csv")
    assert first.returncode == 0, first.stdout + first.stderr + workers.tails()
    report = report_rows(tmp_path / "first.csv")
    assert [n for n, r in report.items() if r["result"] == "accepted"] == VALID_ROWS
    assert [n for n, r in report.items() if r["result"] == "invalid"] == INVALID_ROWS
    dup = report[DUPLICATE_ROW]
    assert dup["result"] == "duplicate" and dup["duplicate_of"] == "2" and dup["intent_id"] == report[2]["intent_id"]
    ids = [report[n]["intent_id"] for n in VALID_ROWS]
    assert all(report[n]["status"] == "succeeded" and report[n]["ticket_id"] for n in VALID_ROWS)
    markers = simulator.stats()["tickets_by_marker"]
    assert {i: markers.get(i) for i in ids} == {i: 1 for i in ids}
    summary = " ".join(first.stdout.split())
    assert "│ all │ 7 │ 3 │ 0 │ 1 │ 3 │ 3 │ 0 │ 0 │" in summary, first.stdout
    assert count(database_url) == 3

    tickets_before = sum(v for v in markers.values())
    second = cli("import", "mixed.csv", "--skip-invalid", "--wait", "--timeout", "30", "--report", "second.jsonl")
    assert second.returncode == 0, second.stdout + second.stderr
    again = {r["row"]: r for r in map(json.loads, (tmp_path / "second.jsonl").read_text().splitlines())}
    assert [n for n, r in again.items() if r["result"] == "replay"] == VALID_ROWS
    assert [again[n]["intent_id"] for n in VALID_ROWS] == ids
    assert again[DUPLICATE_ROW]["result"] == "duplicate"
    assert all(again[n]["status"] == "succeeded" for n in VALID_ROWS)
    assert sum(simulator.stats()["tickets_by_marker"].values()) == tickets_before
    assert count(database_url) == 3


def test_flags_fill_what_rows_leave_empty_in_a_json_lines_file(
        cli: Cli, tmp_path: Path, database_url: str, redis_url: str) -> None:
    rows = [{"subject": "From flags", "body": "b"},
            {"subject": "Own values", "body": "b", "target": "nocworx", "topic": "dns", "priority": "urgent",
             "service.type": "server", "service.id": "12", "labels.host": "db-1"}]
    (tmp_path / "tickets.ndjson").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = cli("import", "tickets.ndjson", "--target", "hostup", "--topic", "vps", "--priority", "high")
    assert result.returncode == 0, result.stdout + result.stderr
    with psycopg.connect(database_url) as conn:
        stored = conn.execute("SELECT subject, target, topic, priority, service, labels, source, idempotency_key "
                              "FROM intents ORDER BY id").fetchall()
        events = conn.execute("SELECT kind, data FROM events ORDER BY id").fetchall()
    assert [s[:4] for s in stored] == [("From flags", "hostup", "vps", "high"), ("Own values", "nocworx", "dns",
                                                                                   "urgent")]
    assert stored[1][4]["id"] == "12" and stored[1][5] == {"host": "db-1"}
    assert {s[6] for s in stored} == {"import"} and all(s[7].startswith("import-") for s in stored)
    assert events == [("accepted", {"file": "tickets.ndjson", "row": 1}), ("accepted", {"file": "tickets.ndjson",
                                                                                         "row": 2})]
    assert queued_messages(redis_url) == 2


@pytest.mark.parametrize(("name", "content", "message"), [
    ("tickets.xlsx", b"PK\x03\x04binary", "cannot tell the format from the extension '.xlsx'"),
    ("tickets.csv", b"", "tickets.csv is empty"),
    ("tickets.csv", b"target,subject\nhostup,No body column\n", "lacks the required column(s) body"),
    ("tickets.csv", b"subject,body\nA,b\n", "lacks the required column(s) target (or give --target)"),
    ("tickets.csv", b"target,subject,body\nhostup,ok,b\nhostup,Caf\xe9,b\n",
     "not valid UTF-8 at byte offset 42 (line 3"),
    ("tickets.jsonl", b"target,subject,body\nhostup,a,b\n", "not JSON Lines (one JSON object per line)"),
], ids=["not-csv-or-jsonl", "empty", "missing-body-column", "missing-target-column", "invalid-utf8", "csv-as-jsonl"])
def test_a_file_that_cannot_be_read_is_a_clear_error_and_stores_nothing(
        cli: Cli, tmp_path: Path, database_url: str, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    result = cli("import", name)
    assert result.returncode == 2, result.stdout + result.stderr
    text = " ".join(result.stderr.split())
    assert message in text and "nothing was stored" in text, text
    assert count(database_url) == 0


def test_with_the_database_down_import_says_so_and_exits_4(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("target,subject,body,topic\nhostup,A,b,vps\n")
    down = Cli({**env, "DISPATCHER_DATABASE_URL": "postgresql://postgres@127.0.0.1:9/nowhere"}, tmp_path)
    result = down("import", "t.csv")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "the database cannot be reached: OperationalError; nothing was stored" in " ".join(result.stderr.split())


def test_format_flag_reads_a_file_whatever_its_extension(cli: Cli, tmp_path: Path, database_url: str) -> None:
    (tmp_path / "export.txt").write_text("target,subject,body,topic\nhostup,A,b,vps\n")
    assert cli("import", "export.txt").returncode == 2
    result = cli("import", "export.txt", "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert count(database_url) == 1


def test_dry_run_shows_tickets_departments_and_send_time_per_target_and_stores_nothing(
        cli: Cli, tmp_path: Path, database_url: str, redis_url: str, config_file: Path,
        simulator: RunningSimulator) -> None:
    config_file.write_text(to_toml({"targets": target_table(simulator, hostup={"rate": "60/minute", "burst": 5}),
                                    "api": tokens_table()}))
    lines = ["target,subject,body,topic,department"]
    lines += [f"hostup,VPS {i},b,vps," for i in range(120)]
    lines += [f"hostup,DNS {i},b,dns," for i in range(5)]
    lines += ["hostup,Gone,b,,no-such-dept", "nocworx,Mail,b,email,"]
    (tmp_path / "plan.csv").write_text("\n".join(lines) + "\n")
    result = cli("import", "plan.csv", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    assert ("│ hostup (hostup) │ 125 │ 0 │ 0 │ 0 │ vps: 120, domain-names: 5 │ 1 │ 2 min 0 s │ checked against the "
            "live list" in out), out
    assert "row 127 (hostup) would fail: explicit department 'no-such-dept', which HostUp does not list" in out
    assert "│ nocworx (nocworx) │ 1 │ 0 │ 0 │ 0 │ support / email: 1 │ 0 │ under 1 s │ fixed list" in out
    assert "dry run: nothing was stored or sent" in out
    assert count(database_url) == 0 and queued_messages(redis_url) == 0


def test_dry_run_says_when_the_department_list_could_not_be_checked(
        cli: Cli, tmp_path: Path, config_file: Path, simulator: RunningSimulator, database_url: str) -> None:
    unreachable = {"base_url": "http://127.0.0.1:9/api/v2", "connect_timeout_s": 1, "timeout_s": 1}
    config_file.write_text(to_toml({"targets": target_table(simulator, hostup=unreachable), "api": tokens_table()}))
    (tmp_path / "t.csv").write_text("target,subject,body,topic\nhostup,A,b,vps\n")
    result = cli("import", "t.csv", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    assert "│ hostup (hostup) │ 1 │ 0 │ 0 │ 0 │ vps: 1 │ 0 │" in out and "NOT checked: hostup is not reachable" in out
    assert count(database_url) == 0


def test_dry_run_counts_rows_already_submitted_and_duplicates(cli: Cli, tmp_path: Path, database_url: str) -> None:
    (tmp_path / "earlier").mkdir()  # the same file name and row: the same key
    (tmp_path / "earlier" / "t.csv").write_text("target,subject,body,topic\nhostup,A,b,vps\n")
    assert cli("import", "earlier/t.csv").returncode == 0
    (tmp_path / "t.csv").write_text("target,subject,body,topic\nhostup,A,b,vps\nhostup,B,b,dns\nhostup,B,b,dns\n")
    result = cli("import", "t.csv", "--dry-run")
    out = " ".join(result.stdout.split())
    assert "│ hostup (hostup) │ 1 │ 0 │ 1 │ 1 │ domain-names: 1 │" in out, out
    assert count(database_url) == 1


# -- the HTTP API ---------------------------------------------------------------------------------------

WRITE = {"Authorization": f"Bearer {TOKENS['WRITE_TOKEN']}"}


@pytest.fixture
def api(database_url: str, redis_url: str, simulator: RunningSimulator) -> Iterator[tuple[TestClient, Runtime]]:
    config = dataclasses.replace(make_config(simulator, database_url=database_url, broker_url=redis_url),
                                 max_batch=5)
    runtime = build_runtime(config)
    with TestClient(create_app(runtime.service)) as client:
        yield client, runtime
    runtime.close()


def _intent(subject: str, **fields: Any) -> dict[str, Any]:
    return {"target": "hostup", "subject": subject, "body": "b", "topic": "vps", **fields}


def test_batch_endpoint_answers_each_item_accepted_replay_or_invalid(
        api: tuple[TestClient, Runtime], database_url: str, redis_url: str) -> None:
    client, _ = api
    first = client.post("/v1/intents/batch", headers=WRITE, json={"intents": [
        _intent("A", idempotency_key="a"), _intent("B"), {"target": "hostup", "body": "no subject"}]})
    assert first.status_code == 200, first.text
    body = first.json()
    assert [r["status"] for r in body["results"]] == ["accepted", "accepted", "invalid"]
    assert body["results"][2]["errors"] == [{"field": "subject", "reason": "required"}]
    assert "id" not in body["results"][2] and (body["accepted"], body["invalid"]) == (2, 1)
    second = client.post("/v1/intents/batch", headers=WRITE, json={"intents": [
        _intent("A again", idempotency_key="a"), _intent("C", idempotency_key="c"),
        _intent("C twice", idempotency_key="c")]})
    results = second.json()["results"]
    assert [r["status"] for r in results] == ["replay", "accepted", "replay"]
    assert results[0]["id"] == body["results"][0]["id"]
    assert results[2] == {"index": 2, "status": "replay", "id": results[1]["id"], "duplicate_of": 1}
    assert count(database_url) == 3 and count(database_url, "events") == 3
    assert queued_messages(redis_url) == 3


def test_batch_endpoint_refuses_a_batch_of_only_invalid_items_and_one_over_the_maximum(
        api: tuple[TestClient, Runtime], database_url: str) -> None:
    client, _ = api
    bad = client.post("/v1/intents/batch", headers=WRITE, json={"intents": [{"target": "nowhere"}, "text"]})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert [r["status"] for r in bad.json()["results"]] == ["invalid", "invalid"]
    assert {"field": "intents[1].body", "reason": "an intent must be a JSON object"} in bad.json()["errors"]
    big = client.post("/v1/intents/batch", headers=WRITE, json={"intents": [_intent(str(i)) for i in range(6)]})
    assert big.status_code == 413 and "at most 5" in big.json()["detail"]
    bodies: list[Any] = [{"intents": []}, {"items": []}, [_intent("x")]]
    for body in bodies:
        assert client.post("/v1/intents/batch", headers=WRITE, json=body).status_code == 422
    assert client.post("/v1/intents/batch", json={"intents": [_intent("x")]}).status_code == 401
    read = {"Authorization": f"Bearer {TOKENS['READ_TOKEN']}"}
    assert client.post("/v1/intents/batch", headers=read, json={"intents": [_intent("x")]}).status_code == 403
    assert count(database_url) == 0


def test_a_batch_is_one_transaction_a_failure_leaves_nothing_half_written(
        api: tuple[TestClient, Runtime], database_url: str, redis_url: str) -> None:
    client, _ = api
    with psycopg.connect(database_url, autocommit=True) as conn:  # the third event insert fails
        conn.execute("""CREATE FUNCTION fail_third() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF (SELECT count(*) FROM events) >= 2 THEN RAISE EXCEPTION 'injected failure'; END IF;
            RETURN NEW; END $$""")
        conn.execute("CREATE TRIGGER fail_third BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION fail_third()")
    answer = client.post("/v1/intents/batch", headers=WRITE, json={"intents": [_intent(str(i)) for i in range(4)]})
    assert answer.status_code == 503
    assert count(database_url) == 0 and count(database_url, "events") == 0 and queued_messages(redis_url) == 0


def test_concurrent_batches_with_the_same_keys_store_each_intent_once(
        api: tuple[TestClient, Runtime], database_url: str) -> None:
    _, runtime = api
    items = [_intent(f"race {i}", idempotency_key=f"race-{i}") for i in range(400)]
    outcomes: list[Any] = []
    barrier = threading.Barrier(3)

    def submit() -> None:
        barrier.wait()
        outcomes.append(runtime.service.accept_many(items, source="test"))

    threads = [threading.Thread(target=submit) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(outcomes) == 3
    assert count(database_url) == 400
    for index in range(400):
        statuses = sorted(o[index].status.value for o in outcomes)
        assert statuses == ["accepted", "replay", "replay"], (index, statuses)
        assert len({o[index].id for o in outcomes}) == 1


def test_with_the_broker_down_a_batch_is_stored_and_left_to_the_scheduler(
        database_url: str, simulator: RunningSimulator) -> None:
    config = make_config(simulator, database_url=database_url, broker_url="redis://127.0.0.1:9/0")
    runtime = build_runtime(config)
    try:
        results = runtime.service.accept_many([_intent(str(i)) for i in range(3)], source="test")
        assert [r.status for r in results] == [ItemStatus.accepted] * 3
        with psycopg.connect(database_url) as conn:
            rows = conn.execute("SELECT count(*) FROM intents WHERE enqueued_at IS NULL").fetchone()
        assert rows == (3,)
    finally:
        runtime.close()


def _same_message(ours: dict[str, Any], celerys: dict[str, Any], intent_id: uuid.UUID) -> None:
    """``ours`` (stamped) is shaped as ``celerys`` (send_task's), with its own ids and ``intent_id``."""
    import base64

    assert ours.keys() == celerys.keys()
    assert ours["headers"].keys() == celerys["headers"].keys()
    assert ours["properties"].keys() == celerys["properties"].keys()
    assert ours["headers"]["task"] == celerys["headers"]["task"] == "dispatcher.dispatch"
    for key in ("lang", "retries", "timelimit", "kwargsrepr", "origin", "replaced_task_nesting", "stamps", "expires"):
        assert ours["headers"][key] == celerys["headers"][key], key
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
    assert isinstance(ours["headers"][PUBLISHED_AT], float) and isinstance(celerys["headers"][PUBLISHED_AT], float)
    assert abs(ours["headers"][PUBLISHED_AT] - celerys["headers"][PUBLISHED_AT]) < 60
    assert len({ours["headers"]["id"], celerys["headers"]["id"], ours["properties"]["delivery_tag"]}) == 3
    for key in ("delivery_info", "delivery_mode", "priority", "body_encoding"):
        assert ours["properties"][key] == celerys["properties"][key], key
    for key in ("content-type", "content-encoding"):
        assert ours[key] == celerys[key]
    args, kwargs, _ = json.loads(base64.b64decode(ours["body"]))
    assert (args, kwargs) == ([str(intent_id)], {})
    assert ours["headers"]["argsrepr"] == repr([str(intent_id)])


def test_stamped_messages_single_and_bulk_are_the_messages_send_task_publishes(
        simulator: RunningSimulator, redis_url: str) -> None:
    config = make_config(simulator, broker_url=redis_url)
    queue = CeleryQueue(make_celery(config))
    with queue.app.producer_or_acquire() as producer:  # the stamped fast path, not the fallback, is what runs
        assert RedisStamper.probe(queue.app, producer.channel, "dispatcher.dispatch", "dispatcher.hostup")
    queue.app.send_task("dispatcher.dispatch", args=[str(uuid.uuid4())], queue="dispatcher.hostup",
                        headers={PUBLISHED_AT: time.time()})
    single_id, bulk_id = uuid.uuid4(), uuid.uuid4()
    queue.enqueue(DISPATCH, single_id, target="hostup")
    queue.enqueue_many(DISPATCH, [(bulk_id, "hostup")])
    client = redis.Redis.from_url(redis_url)
    bulk, single, celerys = (json.loads(m) for m in client.lrange("dispatcher.hostup", 0, -1))  # newest first
    client.close()
    assert celerys["headers"]["eta"] is None
    _same_message(single, celerys, single_id)
    _same_message(bulk, celerys, bulk_id)


def test_a_stamped_countdown_carries_the_eta_send_task_would_give_it(
        simulator: RunningSimulator, redis_url: str) -> None:
    config = make_config(simulator, broker_url=redis_url)
    queue = CeleryQueue(make_celery(config))
    queue.app.send_task("dispatcher.dispatch", args=[str(uuid.uuid4())], queue="dispatcher.hostup",
                        headers={PUBLISHED_AT: time.time()}, countdown=30)
    intent_id = uuid.uuid4()
    before = datetime.now(UTC)
    queue.enqueue(DISPATCH, intent_id, target="hostup", countdown=30)
    client = redis.Redis.from_url(redis_url)
    ours, celerys = (json.loads(m) for m in client.lrange("dispatcher.hostup", 0, -1))
    client.close()
    _same_message(ours, celerys, intent_id)
    eta = datetime.fromisoformat(ours["headers"]["eta"])
    assert eta.tzinfo is not None
    assert abs(eta - datetime.fromisoformat(celerys["headers"]["eta"])) < timedelta(seconds=5)
    assert timedelta(seconds=29) < eta - before < timedelta(seconds=31)


def test_with_the_broker_down_a_single_publish_fails_fast_as_enqueue_failed(simulator: RunningSimulator) -> None:
    from dispatcher.queue import EnqueueFailed

    queue = CeleryQueue(make_celery(make_config(simulator, broker_url="redis://127.0.0.1:9/0")))
    began = time.monotonic()
    with pytest.raises(EnqueueFailed):
        queue.enqueue(DISPATCH, uuid.uuid4(), target="hostup", countdown=0.5)
    assert time.monotonic() - began < 5


def test_on_the_embedded_sqlite_default_a_batch_keeps_replays_and_duplicates_apart(
        tmp_path: Path, simulator: RunningSimulator) -> None:
    from dispatcher.queue import HandOverQueue

    config = make_config(simulator, database_url=f"sqlite:///{tmp_path / 'embedded.db'}")
    runtime = build_runtime(config, queue=HandOverQueue())
    try:
        first = runtime.service.accept_many([_intent("A", idempotency_key="a"), _intent("A", idempotency_key="a"),
                                             _intent("B"), {"target": "hostup"}], source="test")
        assert [r.status for r in first] == [ItemStatus.accepted, ItemStatus.duplicate, ItemStatus.accepted,
                                             ItemStatus.invalid]
        assert first[1].id == first[0].id and first[1].duplicate_of == 0
        again = runtime.service.accept_many([_intent("A", idempotency_key="a")], source="test")
        assert again[0].status is ItemStatus.replay and again[0].id == first[0].id
        views = runtime.store.list_intents(limit=10)
        assert len(views) == 2 and {len(runtime.store.events(v.id)) for v in views} == {1}
        with runtime.store.engine.connect() as conn:  # handed over: the scheduler of `dispatcher run` sends them
            waiting = conn.execute(select(func.count()).select_from(IntentRow).where(IntentRow.enqueued_at.is_(None)))
            assert waiting.scalar() == 2
    finally:
        runtime.close()


def test_grouped_items_of_a_batch_share_one_ticket_as_single_intake_decides(
        api: tuple[TestClient, Runtime]) -> None:
    _, runtime = api
    items = [_intent(f"grouped {i}", group_key="incident-7") for i in range(3)] + [_intent("alone")]
    results = runtime.service.accept_many(items, source="test")
    assert [r.status for r in results] == [ItemStatus.accepted] * 4
    views = [runtime.service.get(r.id) for r in results if r.id is not None]
    assert [v.action.value for v in views[:3]] == ["create", "reply", "reply"]
    assert len({v.group_id for v in views[:3]}) == 1 and views[3].group_id is None
