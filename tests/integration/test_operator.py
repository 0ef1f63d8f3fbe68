"""Operator tools through the CLI (as a subprocess) and the HTTP API, on real Postgres and the simulators.

The CLI runs without a broker here: it hands retried intents to the scheduler through the database
(the outbox path), and this test process plays the worker and the scheduler.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dispatcher.domain import Status
from dispatcher.intake.api import create_app
from dispatcher.operations import Operations
from dispatcher.runtime import Runtime, build_runtime
from dispatcher.simulator import RunningSimulator
from tests.acceptance.procs import dispatcher_command, subprocess_env, to_toml
from tests.conftest import SECRETS, TOKENS, make_config, secrets_env, target_table, tokens_table


class Cli:
    """Runs `dispatcher ...` as a subprocess and keeps every output for the secrets check."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.outputs: list[str] = []

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*dispatcher_command(), *args], env=self.env, capture_output=True, text=True,
                                timeout=60, check=False)
        self.outputs.append(result.stdout + result.stderr)
        if ok:
            assert result.returncode == 0, f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result


@pytest.fixture
def setup(database_url: str, simulator: RunningSimulator, tmp_path: Path) -> Iterator[tuple[Runtime, Cli]]:
    overrides = {"nocworx": {"poll": {"interval_s": 0.2, "deadline_s": 1.0}},
                 "hostup": {"retry": {"max_attempts": 1, "base_s": 0.1, "cap_s": 0.2}}}
    config_path = tmp_path / "dispatcher.toml"
    config_path.write_text(to_toml({"targets": target_table(simulator, **overrides), "api": tokens_table(),
                                    "scheduler": {"interval_s": 0.2, "requeue_after_s": 5}}))
    env = subprocess_env({"DISPATCHER_DATABASE_URL": database_url, "DISPATCHER_CONFIG": str(config_path),
                          "COLUMNS": "200", **secrets_env()})
    runtime = build_runtime(make_config(simulator, database_url=database_url, **overrides))
    yield runtime, Cli(env)
    runtime.close()


def settle(rt: Runtime, ids: list[uuid.UUID], timeout: float = 30.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        rt.service.schedule_once()
        views = [rt.service.get(i) for i in ids]
        if all(v.terminal for v in views) or time.monotonic() > deadline:
            return views
        time.sleep(0.1)


def test_a_failed_intent_is_found_shown_fixed_with_edit_and_retried_to_one_ticket(
        setup: tuple[Runtime, Cli], simulator: RunningSimulator) -> None:
    rt, cli = setup
    intent_id = rt.service.accept({"target": "hostup", "department": "network-operations", "subject": "Uplink down",
                                   "body": "Our uplink is down."}).intent.id
    [view] = settle(rt, [intent_id])
    assert view.status is Status.failed and view.last_error_code == "department_not_found"

    listed = json.loads(cli("intents", "list", "--status", "failed", "--target", "hostup", "--since", "1h",
                            "--error-code", "department_not_found", "--text", "uplink", "--json").stdout)
    assert [i["id"] for i in listed["data"]] == [str(intent_id)]
    shown = cli("intents", "show", str(intent_id)).stdout
    assert "department_not_found" in shown and "network-operations" in shown and "GET /support/departments" in shown

    cli("intents", "retry", str(intent_id), "--edit", "department=vps", "--reason", "wrong department", "--yes")
    [view] = settle(rt, [intent_id])
    assert view.status is Status.succeeded and view.resolved_department == "vps"
    assert simulator.stats()["tickets_by_marker"] == {str(intent_id): 1}
    [action] = Operations(rt.service).audit_log(intent_id=intent_id)
    assert action.action == "retry" and action.actor.startswith("cli:") and action.reason == "wrong department"
    assert action.details == {"edits": {"department": {"from": "network-operations", "to": "vps"}}}
    timeline = cli("intents", "show", str(intent_id)).stdout
    assert "retried by cli:" in timeline and "succeeded" in timeline
    assert not any(secret in out for out in cli.outputs for secret in SECRETS)


def test_an_edit_that_is_still_invalid_is_refused_naming_the_field(setup: tuple[Runtime, Cli]) -> None:
    rt, cli = setup
    intent_id = rt.service.accept({"target": "hostup", "department": "nope", "subject": "x", "body": "y"}).intent.id
    settle(rt, [intent_id])
    result = cli("intents", "retry", str(intent_id), "--edit", "priority=asap", "--yes", ok=False)
    assert result.returncode == 2 and "priority" in result.stderr
    result = cli("intents", "retry", str(intent_id), "--edit", "target=other", "--yes", ok=False)
    assert result.returncode == 2 and "'target' cannot be edited" in result.stderr
    assert rt.service.get(intent_id).status is Status.failed


def test_a_bulk_retry_through_the_api_after_a_provider_outage_makes_one_ticket_each(
        setup: tuple[Runtime, Cli], simulator: RunningSimulator) -> None:
    rt, _ = setup
    simulator.configure(error_rate=1.0)
    ids = [rt.service.accept({"target": "hostup", "topic": "vps", "subject": f"Outage {i}", "body": "b"}).intent.id
           for i in range(200)]
    views = settle(rt, ids, timeout=90)
    assert all(v.status is Status.failed for v in views)
    simulator.configure(error_rate=0.0)
    client = TestClient(create_app(rt.service))
    operator = {"Authorization": f"Bearer {TOKENS['OPERATOR_TOKEN']}"}
    dry = client.post("/v1/intents/retry", headers=operator,
                      json={"filter": {"status": ["failed"], "target": "hostup"}, "dry_run": True}).json()
    assert dry["matched"] == 200 and rt.service.get(ids[0]).status is Status.failed
    done = client.post("/v1/intents/retry", headers=operator,
                       json={"filter": {"status": ["failed"], "target": "hostup"}, "reason": "outage over"}).json()
    assert len(done["ids"]) == 200 and done["refused"] == []
    views = settle(rt, ids, timeout=120)
    assert all(v.status is Status.succeeded for v in views)
    per_marker = simulator.stats()["tickets_by_marker"]
    assert all(per_marker.get(str(i)) == 1 for i in ids) and len(per_marker) == 200
    writer = {"Authorization": f"Bearer {TOKENS['WRITE_TOKEN']}"}
    assert client.post(f"/v1/intents/{ids[0]}/retry", headers=writer).status_code == 403
    assert client.post(f"/v1/intents/{ids[0]}/retry").status_code == 401


def test_cancel_stops_an_intent_before_it_is_sent(setup: tuple[Runtime, Cli], simulator: RunningSimulator) -> None:
    rt, cli = setup
    cli("targets", "pause", "hostup", "--reason", "maintenance window")
    intent_id = rt.service.accept({"target": "hostup", "topic": "vps", "subject": "Later", "body": "b"}).intent.id
    time.sleep(0.5)
    rt.service.schedule_once()
    assert rt.service.get(intent_id).status in (Status.queued, Status.waiting)
    assert "paused" in cli("targets").stdout and "maintenance window" in cli("targets").stdout
    cli("intents", "cancel", str(intent_id), "--reason", "not needed")
    cli("targets", "resume", "hostup")
    time.sleep(0.5)
    rt.service.schedule_once()
    view = rt.service.get(intent_id)
    assert view.status is Status.cancelled and "not needed" in (view.last_error_message or "")
    assert simulator.stats()["hostup"]["tickets"] == 0
    again = cli("intents", "cancel", str(intent_id), ok=False)
    assert again.returncode == 1 and "only queued or waiting" in again.stderr
    actions = [a.action for a in Operations(rt.service).audit_log()]
    assert actions == ["resume", "cancel", "pause"]


def test_repoll_looks_again_at_a_task_whose_deadline_passed_without_resubmitting(
        setup: tuple[Runtime, Cli], simulator: RunningSimulator) -> None:
    rt, cli = setup
    simulator.configure(task_delay_s=2.5)
    intent_id = rt.service.accept({"target": "nocworx", "topic": "dns", "subject": "Slow task", "body": "b"}).intent.id
    [view] = settle(rt, [intent_id])
    assert view.status is Status.failed and view.last_error_code == "task_timeout"
    time.sleep(1.5)
    cli("intents", "repoll", str(intent_id))
    [view] = settle(rt, [intent_id])
    assert view.status is Status.succeeded and view.ticket is not None
    creates = [r for r in simulator.requests("nocworx") if r["method"] == "POST"]
    assert len(creates) == 1


def test_check_reports_each_part_and_never_prints_a_secret(setup: tuple[Runtime, Cli],
                                                            simulator: RunningSimulator) -> None:
    _, cli = setup
    result = cli("check")
    assert "credentials accepted" in result.stdout and "<secret>" in result.stdout
    simulator.configure(nocworx_key="rotated")
    result = cli("check", "--json", ok=False)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [c["ok"] for c in report["checks"]] == [True, True, True, True, False]
    assert not any(secret in out for out in cli.outputs for secret in SECRETS)


def test_retention_prunes_old_attempts_and_keeps_intents_tickets_and_events(setup: tuple[Runtime, Cli]) -> None:
    from datetime import timedelta

    from sqlalchemy import func, select, update

    from dispatcher.store.tables import AttemptRow, EventRow

    rt, _ = setup
    old, new = (rt.service.accept({"target": "hostup", "topic": "vps", "subject": s, "body": "b"}).intent.id
                for s in ("old", "new"))
    settle(rt, [old, new])
    # which of the two read the department list depends on thread timing: count, don't assume
    old_attempts = len(rt.service.get(old, with_attempts=True).attempt_log)
    new_attempts = len(rt.service.get(new, with_attempts=True).attempt_log)
    with rt.store.session() as s, s.begin():
        s.execute(update(AttemptRow).where(AttemptRow.intent_id == old)
                  .values(started_at=rt.service.clock() - timedelta(days=40)))
    pruned = Operations(rt.service).prune(older_than_days=30)
    assert pruned == old_attempts >= 1
    assert rt.service.get(old, with_attempts=True).attempt_log == ()
    assert len(rt.service.get(new, with_attempts=True).attempt_log) == new_attempts >= 1
    assert rt.service.get(old).ticket is not None
    with rt.store.session() as s:
        assert s.scalar(select(func.count()).select_from(EventRow).where(EventRow.intent_id == old)) >= 2
