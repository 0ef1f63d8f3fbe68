"""Running it for real: `dispatcher worker` (prefork), `scheduler` and `api` as separate processes.

What an operator relies on, checked on the real processes: every line they log is one JSON object
and none carries a secret; each worker and the scheduler announce themselves with a heartbeat that
`/readyz` reports (and that a clean stop removes); and each serves Prometheus metrics whose counts
agree with the audit trail (a prefork worker's children are summed by its parent).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from dispatcher.simulator import RunningSimulator
from dispatcher.store import db
from dispatcher.store.repo import Store
from dispatcher.store.tables import AttemptRow, IntentRow
from tests.acceptance.procs import ApiClient, Procs, free_port, subprocess_env, to_toml, wait_until
from tests.conftest import SECRETS, TOKENS, secrets_env, target_table, tokens_table

STARTUP_TIMEOUT_S = 40.0


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(url, timeout=5)
    response.raise_for_status()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_worker_and_scheduler_log_json_heartbeat_and_serve_metrics_that_match_the_audit_trail(
        tmp_path: Path, database_url: str, redis_url: str, simulator: RunningSimulator) -> None:
    config = tmp_path / "dispatcher.toml"
    config.write_text(to_toml({"targets": target_table(simulator), "api": tokens_table(),
                               "scheduler": {"interval_s": 0.2, "requeue_after_s": 5}}))
    base = subprocess_env({"DISPATCHER_DATABASE_URL": database_url, "DISPATCHER_BROKER_URL": redis_url,
                           "DISPATCHER_CONFIG": str(config), "DISPATCHER_LOG_FORMAT": "json",
                           "DISPATCHER_LOG_LEVEL": "DEBUG", **secrets_env()})
    worker_port, scheduler_port, api_port = free_port(), free_port(), free_port()
    procs = Procs(tmp_path, base)
    api = ApiClient(f"http://127.0.0.1:{api_port}", TOKENS["WRITE_TOKEN"], TOKENS["READ_TOKEN"])
    try:
        procs.env = {**base, "DISPATCHER_METRICS_PORT": str(worker_port), "DISPATCHER_WORKER_NAME": "w1",
                     "DISPATCHER_METRICS_DIR": str(tmp_path / "worker-metrics")}
        procs.start("worker", "worker", "--pool", "prefork", "--concurrency", "2")
        procs.env = {**base, "DISPATCHER_METRICS_PORT": str(scheduler_port), "DISPATCHER_WORKER_NAME": "s1"}
        procs.start("scheduler", "scheduler")
        procs.env = base
        procs.start("api", "api", "--port", str(api_port))

        def components() -> Any:
            body = api.http.get("/readyz").json()
            parts = body.get("components", {})
            both_ok = parts.get("workers", {}).get("status") == "ok" and parts.get("scheduler", {}).get("status")
            return body if both_ok == "ok" else None

        ready = wait_until(components, timeout=STARTUP_TIMEOUT_S, what="worker and scheduler heartbeats", procs=procs)
        assert ready["components"]["workers"]["names"] == ["w1"]
        assert ready["components"]["scheduler"]["name"] == "s1"

        ids = [api.submit_ok({"target": "hostup", "topic": "vps", "subject": f"Ops {uuid.uuid4().hex[:6]}",
                              "body": "Body."})["id"] for _ in range(3)]
        ids += [api.submit_ok({"target": "nocworx", "topic": "dns", "subject": f"Ops {uuid.uuid4().hex[:6]}",
                               "body": "Body."})["id"] for _ in range(2)]
        views = api.wait_terminal(ids, timeout=60, procs=procs)
        assert {v["status"] for v in views.values()} == {"succeeded"}

        store = Store(db.make_engine(database_url))
        try:
            with store.session() as s:
                by_target = dict(s.execute(select(IntentRow.target, func.count()).select_from(AttemptRow)
                                           .join(IntentRow, IntentRow.id == AttemptRow.intent_id)
                                           .group_by(IntentRow.target)).all())
        finally:
            store.engine.dispose()
        worker = scrape(f"http://127.0.0.1:{worker_port}/metrics")
        for target, count in by_target.items():  # counted in two child processes, served summed by the parent
            assert total(worker, "dispatcher_attempts_total", target=target) == count
        assert total(worker, "dispatcher_intents_finished_total", status="succeeded") == 5

        def settled() -> Any:  # the scheduler's gauges are cached for a few seconds
            samples = scrape(f"http://127.0.0.1:{scheduler_port}/metrics")
            return samples if total(samples, "dispatcher_intents", status="succeeded") == 5 else None

        scheduler = wait_until(settled, timeout=15, what="the scheduler's database gauges", procs=procs)
        assert total(scheduler, "dispatcher_workers_alive") == 1
        assert total(scheduler, "dispatcher_scheduler_heartbeat_age_seconds") < 30
        assert total(scrape(f"{api.url}/metrics"), "dispatcher_intents_accepted_total", source="api") == 5
    finally:
        api.close()
        procs.stop_all()

    # a clean stop removes its heartbeat: what is left in the table is a process that died
    store = Store(db.make_engine(database_url))
    try:
        assert store.heartbeats() == []
    finally:
        store.engine.dispose()
    for proc in procs.items:
        stdout = proc.stdout.read_text(encoding="utf-8", errors="replace")
        stderr = proc.stderr.read_text(encoding="utf-8", errors="replace")
        for secret in SECRETS:
            assert secret not in stdout + stderr, f"a secret in {proc.name}'s output"
        if proc.name in ("worker", "scheduler"):
            assert stdout.strip() == "", f"{proc.name} wrote to stdout (not a log line): {stdout[:500]}"
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines, f"{proc.name} logged nothing"
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"{proc.name} logged a line that is not JSON: {line[:300]}")
            assert {"ts", "level", "logger", "event"} <= set(record)
    worker_log = [json.loads(line) for line in procs.items[0].stderr.read_text().splitlines() if line.strip()]
    assert any(r["logger"].startswith("celery") for r in worker_log), "Celery's own lines should be JSON too"
    attempts = [r for r in worker_log if r["event"] == "attempt"]
    assert attempts and all(r.get(k) is not None for r in attempts for k in ("intent_id", "target", "attempt",
                                                                            "outcome"))
