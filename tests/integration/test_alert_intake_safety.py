"""The alert endpoints refuse what can never succeed, with the right status, and store nothing for it;
and concurrent notifications of one new group make exactly one ticket (the database decides)."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from dispatcher.config import Settings, parse_config
from dispatcher.intake.api import create_app
from dispatcher.runtime import Runtime, build_runtime
from dispatcher.simulator import RunningSimulator
from dispatcher.store.tables import IntentGroupRow, IntentRow
from tests.alerting import alert, alertmanager, go_json, grafana, serve_in_thread
from tests.conftest import TOKENS, secrets_env, target_table, tokens_table

SECRET = "grafana-hmac-secret-0123456789"


@pytest.fixture
def rt(database_url: str, simulator: RunningSimulator) -> Iterator[Runtime]:
    config = parse_config({"targets": target_table(simulator), "api": {**tokens_table(), "max_body_bytes": 4096},
                           "alerts": {"default_target": "hostup", "default_topic": "vps", "flap_window_s": 0.2,
                                      "grafana_secret_env": "GRAFANA_SECRET"}},
                          Settings(database_url=database_url), env={**secrets_env(), "GRAFANA_SECRET": SECRET})
    runtime = build_runtime(config)
    yield runtime
    runtime.close()


def stored(rt: Runtime) -> tuple[int, int]:
    with rt.store.session() as s:
        return (int(s.scalar(select(func.count()).select_from(IntentRow)) or 0),
                int(s.scalar(select(func.count()).select_from(IntentGroupRow)) or 0))


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}", "Content-Type": "application/json"}


def signed(body: bytes) -> dict[str, str]:
    return {"X-Grafana-Alerting-Signature": hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()}


GOOD = go_json(alertmanager([alert("HighLatency")]))
GRAFANA = go_json(grafana([alert("HighLatency")]))


@pytest.mark.parametrize(("path", "body", "headers", "status", "field"), [
    ("alertmanager", GOOD, {"Content-Type": "application/json"}, 401, None),
    ("alertmanager", GOOD, {"Authorization": "Bearer not-a-token"}, 401, None),
    ("alertmanager", GOOD, bearer("READ_TOKEN"), 403, None),
    ("alertmanager", GOOD, bearer("WRITE_TOKEN"), 403, None),
    ("grafana", GRAFANA, bearer("ALERTS_TOKEN"), 401, "X-Grafana-Alerting-Signature"),
    ("grafana", GRAFANA, {**bearer("ALERTS_TOKEN"), "X-Grafana-Alerting-Signature": "00" * 32}, 401,
     "X-Grafana-Alerting-Signature"),
    ("grafana", GRAFANA, {**bearer("ALERTS_TOKEN"), **signed(GRAFANA + b" ")}, 401, "X-Grafana-Alerting-Signature"),
    ("alertmanager", go_json(alertmanager([alert("X", summary="y" * 5000)])), bearer("ALERTS_TOKEN"), 413, None),
    ("alertmanager", b'{"version": "4", "alerts": [', bearer("ALERTS_TOKEN"), 400, "body"),
    ("alertmanager", b"[1, 2]", bearer("ALERTS_TOKEN"), 422, "body"),
    ("alertmanager", go_json({**alertmanager([alert("X")]), "version": "3"}), bearer("ALERTS_TOKEN"), 422, "version"),
    ("alertmanager", go_json({**alertmanager([alert("X")]), "receiver": ""}), bearer("ALERTS_TOKEN"), 422,
     "receiver"),
    ("alertmanager", go_json(alertmanager([{**alert("X"), "status": "burning"}])), bearer("ALERTS_TOKEN"), 422,
     "alerts.0.status"),
    ("alertmanager", go_json(alertmanager([{**alert("X"), "labels": {"alertname": 5}}])), bearer("ALERTS_TOKEN"),
     422, "alerts.0.labels.alertname"),
    ("alertmanager", go_json({**alertmanager([alert("X")]), "alerts": []}), bearer("ALERTS_TOKEN"), 422, "alerts"),
    ("alertmanager", go_json({k: v for k, v in alertmanager([alert("X")]).items() if k != "groupKey"}),
     bearer("ALERTS_TOKEN"), 422, "groupKey"),
])
def test_a_refused_notification_gets_its_status_and_stores_nothing(
        rt: Runtime, path: str, body: bytes, headers: dict[str, str], status: int, field: str | None) -> None:
    client = TestClient(create_app(rt.service))
    answer = client.post(f"/v1/alerts/{path}", content=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    problem = answer.json()
    assert problem["status"] == status and problem["title"] and problem["detail"]
    if field is not None:
        assert field in [e["field"] for e in problem["errors"]], problem
    assert stored(rt) == (0, 0)
    assert not any(secret in answer.text for secret in (*TOKENS.values(), SECRET))


def test_an_oversized_body_without_a_declared_length_is_refused_while_read(rt: Runtime) -> None:
    client = TestClient(create_app(rt.service))

    def chunks() -> Iterator[bytes]:
        yield GOOD[:-1]
        yield b" " * 5000 + b"}"

    answer = client.post("/v1/alerts/alertmanager", content=chunks(), headers=bearer("ALERTS_TOKEN"))
    assert answer.status_code == 413 and stored(rt) == (0, 0)


def test_unknown_paths_methods_and_parameters_answer_problem_json(rt: Runtime) -> None:
    client = TestClient(create_app(rt.service))
    for answer, status in ((client.get("/v1/nothing-here"), 404), (client.get("/v1/alerts/alertmanager"), 405),
                           (client.get("/v1/intents?limit=many", headers=bearer("READ_TOKEN")), 400),
                           (client.post("/v1/alerts/alertmanager?dry_run=perhaps", content=GOOD,
                                        headers=bearer("ALERTS_TOKEN")), 400)):
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.json()["status"] == status
    bad = client.get("/v1/intents?limit=many", headers=bearer("READ_TOKEN")).json()
    assert bad["errors"][0]["field"] == "limit"


def test_a_good_grafana_signature_is_accepted(rt: Runtime) -> None:
    client = TestClient(create_app(rt.service))
    answer = client.post("/v1/alerts/grafana", content=GRAFANA, headers={**bearer("ALERTS_TOKEN"), **signed(GRAFANA)})
    assert answer.status_code == 202, answer.text
    assert stored(rt) == (1, 1)


@pytest.fixture
def served(rt: Runtime) -> Iterator[str]:
    """The API on a real uvicorn server on loopback (so concurrent requests really are concurrent)."""
    with serve_in_thread(create_app(rt.service)) as url:
        yield url


def _post_together(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    barrier = threading.Barrier(len(bodies))
    answers: list[Any] = [None] * len(bodies)

    def send(index: int) -> None:
        with httpx.Client(timeout=30) as client:
            barrier.wait()
            answers[index] = client.post(f"{url}/v1/alerts/alertmanager", content=bodies[index],
                                         headers=bearer("ALERTS_TOKEN"))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def _settle(rt: Runtime, timeout: float = 30) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        rt.service.schedule_once()
        views = rt.store.list_intents(limit=500)
        if all(v.terminal for v in views) or time.monotonic() > deadline:
            return views
        time.sleep(0.05)


def test_twenty_concurrent_identical_notifications_of_a_new_group_make_exactly_one_ticket(
        rt: Runtime, served: str, simulator: RunningSimulator) -> None:
    answers = _post_together(served, [GOOD] * 20)
    assert all(a.status_code in (200, 202) for a in answers), [a.text for a in answers if a.status_code >= 300]
    actions = sorted(a.json()["action"] for a in answers)
    assert actions == ["create"] + ["none"] * 19
    _settle(rt)
    tickets = simulator.tickets()
    assert len(tickets) == 1 and simulator.stats()["duplicates"] == {}
    assert len(tickets[0]["messages"]) == 1  # the ticket's own body; no reply for the 19 repeats
    assert stored(rt) == (20, 1)


def test_twenty_concurrent_different_notifications_of_a_new_group_make_one_ticket_and_replies(
        rt: Runtime, served: str, simulator: RunningSimulator) -> None:
    bodies = [go_json(alertmanager([alert("HighLatency"), alert(f"Extra{i}", instance=f"n-{i}")]))
              for i in range(20)]
    answers = _post_together(served, bodies)
    actions = [a.json()["action"] for a in answers]
    assert actions.count("create") == 1 and actions.count("reply") == 19
    views = _settle(rt)
    assert all(v.terminal for v in views)
    tickets = simulator.tickets()
    assert len(tickets) == 1 and simulator.stats()["duplicates"] == {}
    # flap damping coalesced the replies: at most a few went out, and the last state is on the ticket
    replies = [m["body"] for m in tickets[0]["messages"][1:]]
    assert 1 <= len(replies) <= 19
    with rt.store.session() as s:
        group = s.scalars(select(IntentGroupRow)).one()
        last = s.scalars(select(IntentRow).where(IntentRow.group_seq == 20)).one()
    assert group.sent_state is not None and group.sent_state["seq"] == 20 and last.status == "succeeded"


def test_concurrent_notifications_on_the_embedded_sqlite_store_make_one_ticket(
        tmp_path: Any, simulator: RunningSimulator) -> None:
    from dispatcher.intake.alerts import parse_alertmanager

    config = parse_config({"targets": target_table(simulator), "api": tokens_table(),
                           "alerts": {"default_target": "hostup", "default_topic": "vps"}},
                          Settings(database_url=f"sqlite:///{tmp_path / 'embedded.db'}"), env=secrets_env())
    runtime = build_runtime(config)
    try:
        notification = parse_alertmanager(alertmanager([alert("HighLatency")]))
        barrier = threading.Barrier(10)
        actions: list[str] = []

        def send() -> None:
            barrier.wait()
            actions.append(runtime.service.accept_alerts(notification).action.value)

        threads = [threading.Thread(target=send) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(actions) == ["create"] + ["none"] * 9
        _settle(runtime)
        assert len(simulator.tickets()) == 1
    finally:
        runtime.close()
