"""A real Prometheus Alertmanager (Debian's ``prometheus-alertmanager``) on loopback, its webhook
receiver pointed at the API with a bearer token: alerts posted to Alertmanager arrive as exactly one
ticket, and their resolution as a resolution reply (and the ticket closed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.config import Settings, parse_config
from dispatcher.intake.api import create_app
from dispatcher.runtime import Runtime, build_runtime
from dispatcher.simulator import RunningSimulator
from tests.alerting import free_port, serve_in_thread
from tests.conftest import TOKENS, secrets_env, target_table, tokens_table

CANDIDATES = ("/usr/bin/prometheus-alertmanager", "prometheus-alertmanager", "alertmanager")


def alertmanager_binary() -> str:
    """The binary; in CI its absence fails the test (``.ci/run`` installs it), elsewhere it skips."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    message = "prometheus-alertmanager is not installed (apt-get install -y prometheus-alertmanager)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def rt(database_url: str, simulator: RunningSimulator) -> Iterator[Runtime]:
    config = parse_config({"targets": target_table(simulator), "api": tokens_table(),
                           "alerts": {"default_target": "hostup", "default_topic": "vps", "flap_window_s": 0.2},
                           "scheduler": {"interval_s": 0.2, "requeue_after_s": 5}},
                          Settings(database_url=database_url), env=secrets_env())
    runtime = build_runtime(config)
    yield runtime
    runtime.close()


@pytest.fixture
def alertmanager(rt: Runtime, tmp_path: Path) -> Iterator[str]:
    binary = alertmanager_binary()
    with serve_in_thread(create_app(rt.service)) as api:
        config = tmp_path / "alertmanager.yml"
        config.write_text(f"""
route:
  receiver: dispatcher
  group_by: [alertname]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: dispatcher
    webhook_configs:
      - url: {api}/v1/alerts/alertmanager
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials: {TOKENS['ALERTS_TOKEN']}
""")
        port = free_port()
        log = (tmp_path / "alertmanager.log").open("w")
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
                                 "--log.level=debug"], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "Alertmanager did not become ready"
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def wait_for(check: Any, rt: Runtime, what: str, timeout: float = 45) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        rt.service.schedule_once()
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_alerts_sent_by_a_real_alertmanager_become_one_ticket_and_a_resolution_reply(
        rt: Runtime, alertmanager: str, simulator: RunningSimulator) -> None:
    now = datetime.now(UTC)
    alerts = [{"labels": {"alertname": "DiskFull", "instance": f"db-{i}", "env": "prod", "severity": "critical"},
               "annotations": {"summary": f"Disk almost full on db-{i}"},
               "generatorURL": "http://prometheus.example/graph?g0.expr=disk&g0.tab=1",
               # starting now: an alert already older than group_wait makes Alertmanager flush its new
               # group at once, racing the second alert of the same POST (CI saw a notification of one)
               "startsAt": now.isoformat()} for i in (1, 2)]
    posted = httpx.post(f"{alertmanager}/api/v2/alerts", json=alerts, timeout=5)
    assert posted.status_code == 200, posted.text
    tickets = wait_for(lambda: simulator.tickets(), rt, "the ticket")
    wait_for(lambda: all(v.terminal for v in rt.store.list_intents()), rt, "the create to finish")
    time.sleep(2.5)  # Alertmanager's next group_interval flushes: nothing new, so nothing may be sent
    [ticket] = simulator.tickets()
    assert ticket["subject"] == "[FIRING:2] DiskFull (prod)" and ticket["priority"] == "urgent"
    assert "Disk almost full on db-1" in ticket["body"] and "&g0.tab=1" in ticket["body"]
    assert ticket["id"] == tickets[0]["id"] and len(ticket["messages"]) == 1

    ended = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()  # in the past: resolved now
    resolved = [{**a, "endsAt": ended} for a in alerts]
    posted = httpx.post(f"{alertmanager}/api/v2/alerts", json=resolved, timeout=5)
    assert posted.status_code == 200, posted.text
    closed = wait_for(lambda: [t for t in simulator.tickets() if t["status"] == "closed"], rt, "the resolution")
    [ticket] = closed
    replies = [m["body"] for m in ticket["messages"][1:]]
    assert len(replies) == 1 and "All alerts of this group have resolved. Closing the ticket." in replies[0]
    assert simulator.stats()["duplicates"] == {} and len(simulator.tickets()) == 1
    sources = {v.source for v in rt.store.list_intents()}
    assert sources == {"alertmanager"}
