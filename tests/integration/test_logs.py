"""The log lines of a pipeline: structured, complete for every attempt and transition, and free of secrets.

The capture formats every record as the JSON formatter would, at DEBUG, with masking switched off:
what is checked is that no secret ever reaches a log record, not that the mask hides it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from dispatcher import logs
from dispatcher.intake.api import create_app
from dispatcher.runtime import build_runtime
from dispatcher.simulator import RunningSimulator
from tests.conftest import SECRETS, TOKENS, make_config

#: the messages of log lines that report an attempt or a transition of an intent
TRANSITIONS = {"attempt", "intent succeeded", "intent finished", "intent waiting", "intent polling",
               "target paused: credentials refused"}
REQUIRED = ("intent_id", "target", "attempt", "outcome")


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured() -> Iterator[Capture]:
    root = logging.getLogger()
    handler, level = Capture(), root.level
    logs.set_secrets([])
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    quiet = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    for name in quiet:  # httpx logs each request line at INFO/DEBUG: it must not carry keys either
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)


def test_a_pipeline_logs_every_attempt_and_transition_with_its_fields_and_no_secret(
        database_url: str, simulator: RunningSimulator, captured: Capture) -> None:
    # hostup gets NocWorx's key: a 401 that pauses it, then the right key, so every path is logged
    rt = build_runtime(make_config(simulator, database_url=database_url, hostup={"api_key_env": "NOCWORX_KEY"}))
    try:
        ids = [rt.service.accept({"target": "nocworx", "topic": "dns", "subject": f"Logs {i}",
                                  "body": "Body."}).intent.id for i in range(2)]
        paused = rt.service.accept({"target": "hostup", "topic": "vps", "subject": "Logs paused",
                                    "body": "Body."}).intent.id
        with TestClient(create_app(rt.service)) as client:
            for token in (*TOKENS.values(), "not-a-token"):
                client.get(f"/v1/intents/{paused}", headers={"Authorization": f"Bearer {token}"})
            client.post("/v1/intents", headers={"Authorization": f"Bearer {TOKENS['WRITE_TOKEN']}"},
                        json={"target": "nocworx", "subject": "x", "body": "y", "topic": "nope"})
        deadline = time.monotonic() + 30
        while not all(rt.service.get(i).terminal for i in ids) or "hostup" not in rt.store.paused_targets():
            rt.service.schedule_once()
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        rt.close()

    assert captured.lines
    for line in captured.lines:
        for secret in SECRETS:
            assert secret not in line, f"a secret reached the logs: {line}"
    records = [json.loads(line) for line in captured.lines]  # every line is one JSON object
    transitions = [r for r in records if r["event"] in TRANSITIONS]
    assert {r["event"] for r in transitions} >= {"attempt", "intent succeeded", "intent polling",
                                                 "target paused: credentials refused"}
    for record in transitions:
        missing = [key for key in REQUIRED if record.get(key) is None]
        assert not missing, f"{record['event']!r} lacks {missing}: {record}"
        uuid.UUID(record["intent_id"])
    polls = [r for r in transitions if r["event"] == "attempt" and r.get("op") == "poll"]
    assert polls and all(r["outcome"] in {"poll", "done"} for r in polls)


def test_the_formatters_mask_configured_secrets_whoever_logs_them() -> None:
    secret = 'k3y-with"quote\\and-ünicode'
    logs.set_secrets([secret, "short"])
    try:
        record = logging.LogRecord("celery", logging.WARNING, __file__, 1, "refused key %s", (secret,), None)
        record.header = f"Bearer {secret}"
        for formatter in (logs.JsonFormatter(), logs.TextFormatter()):
            line = formatter.format(record)
            assert "<secret>" in line
            assert "k3y-with" not in line, line
        # values shorter than SECRET_MIN_LENGTH are not masked: they would blot out ordinary words
        plain = logging.LogRecord("x", logging.INFO, __file__, 1, "a short word", (), None)
        assert "short" in logs.JsonFormatter().format(plain)
    finally:
        logs.set_secrets([])
