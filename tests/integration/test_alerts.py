"""Alertmanager and Grafana notifications through the HTTP API (FastAPI app, real service on
Postgres, in-process queue) to the simulators: one ticket per group, kept up to date."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from dispatcher.config import Settings, parse_config
from dispatcher.domain import Action, Status
from dispatcher.intake.api import create_app
from dispatcher.runtime import Runtime, build_runtime
from dispatcher.simulator import RunningSimulator
from dispatcher.store.tables import EventRow, IntentGroupRow, IntentRow
from tests.alerting import alert, alertmanager, go_json, grafana
from tests.conftest import TOKENS, secrets_env, target_table, tokens_table

ALERTS = {"Authorization": f"Bearer {TOKENS['ALERTS_TOKEN']}"}
GRAFANA_SECRET = "grafana-hmac-secret-0123456789"


class Harness:
    """The API over a real service, and ways to look at what happened."""

    def __init__(self, rt: Runtime, sim: RunningSimulator) -> None:
        self.rt, self.sim = rt, sim
        self.client = TestClient(create_app(rt.service))

    def post(self, payload: Any, *, source: str = "alertmanager", headers: dict[str, str] | None = None,
             raw: bytes | None = None, params: str = "") -> Any:
        return self.client.post(f"/v1/alerts/{source}{params}", content=raw if raw is not None else go_json(payload),
                                headers={**ALERTS, "Content-Type": "application/json", **(headers or {})})

    def settle(self, timeout: float = 30.0) -> list[Any]:
        """Wait until every intent is terminal (ticking the scheduler, as `dispatcher run` does)."""
        deadline = time.monotonic() + timeout
        while True:
            self.rt.service.schedule_once()
            views = self.rt.store.list_intents(limit=500)
            if all(v.terminal for v in views) or time.monotonic() > deadline:
                return views
            time.sleep(0.05)

    def tickets(self, provider: str = "hostup") -> list[dict[str, Any]]:
        return [t for t in self.sim.tickets() if t["provider"] == provider]

    def group(self) -> IntentGroupRow:
        with self.rt.store.session() as s:
            [row] = s.scalars(select(IntentGroupRow)).all()
            return row

    def intents(self) -> list[IntentRow]:
        with self.rt.store.session() as s:
            return list(s.scalars(select(IntentRow).order_by(IntentRow.group_seq)).all())


@pytest.fixture
def harness(database_url: str, simulator: RunningSimulator) -> Iterator[Callable[..., Harness]]:
    made: list[Runtime] = []

    def make(**alerts: Any) -> Harness:
        section = {"default_target": "hostup", "default_topic": "vps", "flap_window_s": 0.3, **alerts}
        config = parse_config({"targets": target_table(simulator), "api": tokens_table(), "alerts": section,
                               "scheduler": {"interval_s": 0.2, "requeue_after_s": 5}},
                              Settings(database_url=database_url),
                              env={**secrets_env(), "GRAFANA_SECRET": GRAFANA_SECRET})
        rt = build_runtime(config)
        made.append(rt)
        return Harness(rt, simulator)

    yield make
    for rt in made:
        rt.close()


def messages(ticket: dict[str, Any]) -> list[str]:
    """The ticket's messages after the one it was opened with: our replies."""
    return [m["body"] for m in ticket["messages"]][1:]


def test_a_firing_group_makes_one_ticket_and_a_plain_repeat_sends_nothing(harness: Callable[..., Harness]) -> None:
    h = harness()
    payload = alertmanager([alert("HighLatency"), alert("DiskFull", instance="db-1")])
    first = h.post(payload)
    assert first.status_code == 202, first.text
    assert first.json()["action"] == "create"
    h.settle()
    again = h.post(payload)
    assert again.status_code == 200 and again.json()["action"] == "none"
    h.settle()
    [ticket] = h.tickets()
    assert ticket["subject"] == "[FIRING:2] HighLatency, DiskFull (prod)"
    assert "HighLatency on web-1" in ticket["body"] and "DiskFull on db-1" in ticket["body"]
    assert "http://prometheus.example:9090/graph?g0.expr=" in ticket["body"] and "&g0.tab=1" in ticket["body"]
    assert "Silence: http://alertmanager.example:9093/#/silences/new?filter=" in ticket["body"]
    assert ticket["department"] == "vps" and ticket["priority"] == "medium"
    assert messages(ticket) == []
    assert h.sim.stats()["duplicates"] == {}
    group = h.group()
    assert group.state == "open" and group.ticket_provider_id == ticket["id"]
    assert [(i.action, i.status) for i in h.intents()] == [("create", "succeeded"), ("none", "succeeded")]


def test_changes_become_replies_and_resolution_replies_then_closes(harness: Callable[..., Harness]) -> None:
    h = harness()
    assert h.post(alertmanager([alert("HighLatency"), alert("DiskFull", instance="db-1")])).status_code == 202
    h.settle()
    changed = alertmanager([alert("HighLatency", "resolved"), alert("DiskFull", instance="db-1"),
                            alert("CPUHigh", instance="web-2", severity="critical")])
    assert h.post(changed).json()["action"] == "reply"
    h.settle()
    [ticket] = h.tickets()
    [update] = messages(ticket)
    assert "Alert update: 1 newly firing, 1 resolved, 1 still firing." in update
    assert "Newly firing:\n  - CPUHigh" in update and "Resolved:\n  - HighLatency" in update
    assert "Still firing:\n  - DiskFull" in update
    assert f"dispatcher-ref: {h.intents()[1].id}" in update
    resolved = alertmanager([alert("HighLatency", "resolved"), alert("DiskFull", "resolved", instance="db-1"),
                             alert("CPUHigh", "resolved", instance="web-2", severity="critical")])
    assert h.post(resolved).json()["action"] == "reply"
    views = h.settle()
    assert all(v.status is Status.succeeded for v in views)
    [ticket] = h.tickets()
    assert len(messages(ticket)) == 2 and "All alerts of this group have resolved. Closing the ticket." in \
        messages(ticket)[1]
    assert ticket["status"] == "closed"
    group = h.group()
    assert group.state == "resolved" and group.ticket_closed and group.resolved_at is not None
    ops = [a.op for a in h.rt.service.get(h.intents()[2].id, with_attempts=True).attempt_log]
    assert ops == ["reply", "close"]


def test_firing_again_inside_the_reopen_window_reopens_the_ticket(harness: Callable[..., Harness]) -> None:
    h = harness(reopen_window_s=3600)
    h.post(alertmanager([alert("HighLatency")]))
    h.settle()
    h.post(alertmanager([alert("HighLatency", "resolved")]))
    h.settle()
    assert h.tickets()[0]["status"] == "closed"
    again = h.post(alertmanager([alert("HighLatency", starts_at="2024-05-01T11:00:00Z")]))
    assert again.json()["action"] == "reopen"
    h.settle()
    [ticket] = h.tickets()
    assert ticket["status"] != "closed"
    assert "firing again: reopening this ticket" in messages(ticket)[-1]
    ops = [a.op for a in h.rt.service.get(h.intents()[-1].id, with_attempts=True).attempt_log]
    assert ops == ["reopen", "reply"]
    assert h.group().state == "open" and not h.group().ticket_closed


def test_firing_after_the_reopen_window_makes_a_new_ticket(harness: Callable[..., Harness]) -> None:
    h = harness(reopen_window_s=0.2)
    h.post(alertmanager([alert("HighLatency")]))
    h.settle()
    h.post(alertmanager([alert("HighLatency", "resolved")]))
    h.settle()
    time.sleep(0.3)
    again = h.post(alertmanager([alert("HighLatency")]))
    assert again.json()["action"] == "create"
    h.settle()
    tickets = h.tickets()
    assert len(tickets) == 2 and tickets[0]["status"] == "closed" and tickets[1]["status"] == "open"
    assert h.group().generation == 2 and h.group().ticket_provider_id == tickets[1]["id"]


def test_a_flap_inside_the_flap_window_is_coalesced_into_one_reply(harness: Callable[..., Harness]) -> None:
    h = harness(flap_window_s=1.5)
    h.post(alertmanager([alert("HighLatency")]))
    h.settle()
    resolve = h.post(alertmanager([alert("HighLatency", "resolved")]))
    fire = h.post(alertmanager([alert("HighLatency")]))
    assert resolve.json()["action"] == "reply" and fire.json()["action"] == "reply"
    h.settle()
    [ticket] = h.tickets()
    [note] = messages(ticket)
    assert "flapped" in note and "net state is unchanged" in note
    assert ticket["status"] != "closed"
    statuses = [(i.action, i.status, i.last_error_code) for i in h.intents()]
    assert statuses[1] == ("reply", "cancelled", "superseded")
    assert statuses[2][:2] == ("reply", "succeeded")
    assert f"superseded by {h.intents()[2].id} (flap damping)" in (h.intents()[1].last_error_message or "")


def test_nocworx_follow_ups_are_comment_and_close_tasks_polled_in_turn(harness: Callable[..., Harness]) -> None:
    h = harness(default_target="nocworx", default_topic="hosting")
    h.post(alertmanager([alert("SiteDown", instance="shop")]))
    h.settle()
    h.post(alertmanager([alert("SiteDown", instance="shop"), alert("SlowCheckout", instance="shop")]))
    h.settle()
    h.post(alertmanager([alert("SiteDown", "resolved", instance="shop"),
                         alert("SlowCheckout", "resolved", instance="shop")]))
    views = h.settle()
    assert all(v.status is Status.succeeded for v in views), [(v.status, v.last_error_message) for v in views]
    [ticket] = h.tickets("nocworx")
    bodies = messages(ticket)
    assert len(bodies) == 2 and "Newly firing:\n  - SlowCheckout" in bodies[0] and "resolved" in bodies[1]
    assert ticket["is_closed"]
    ops = [a.op for a in h.rt.service.get(h.intents()[2].id, with_attempts=True).attempt_log]
    assert ops[0] == "reply" and "close" in ops and ops.count("poll") >= 2


def test_grafana_notifications_with_a_good_signature_make_one_ticket(harness: Callable[..., Harness]) -> None:
    h = harness(grafana_secret_env="GRAFANA_SECRET")
    body = go_json(grafana([alert("High memory usage", instance="web-1")]))
    signature = hmac.new(GRAFANA_SECRET.encode(), body, hashlib.sha256).hexdigest()
    answer = h.post(None, source="grafana", raw=body, headers={"X-Grafana-Alerting-Signature": signature})
    assert answer.status_code == 202, answer.text
    h.settle()
    [ticket] = h.tickets()
    assert ticket["subject"].startswith("[FIRING:1] High memory usage")
    assert "Silence: https://grafana.example/alerting/silence/new?alertmanager=grafana&matchers=" in ticket["body"]
    assert "Values: [ var='B'" in ticket["body"] and "Dashboard: https://grafana.example/d/abc" in ticket["body"]
    resolved = go_json(grafana([alert("High memory usage", "resolved", instance="web-1")]))
    signature = hmac.new(GRAFANA_SECRET.encode(), resolved, hashlib.sha256).hexdigest()
    h.post(None, source="grafana", raw=resolved, headers={"X-Grafana-Alerting-Signature": signature})
    h.settle()
    [ticket] = h.tickets()
    assert ticket["status"] == "closed" and "(update from Grafana)" in messages(ticket)[0]


def test_truncated_alerts_zero_end_times_and_escaped_ampersands_are_read(harness: Callable[..., Harness]) -> None:
    h = harness()
    raw = go_json(alertmanager([alert("HighLatency")], truncated=7))
    assert b"\\u0026g0.tab=1" in raw and b'"endsAt":"0001-01-01T00:00:00Z"' in raw
    assert h.post(None, raw=raw).status_code == 202
    h.settle()
    [ticket] = h.tickets()
    assert "7 more alert(s) left out by Alertmanager" in ticket["body"]
    assert "&g0.tab=1" in ticket["body"] and "Ended:" not in ticket["body"]


def test_routes_pick_target_priority_and_service_from_labels(harness: Callable[..., Harness]) -> None:
    routes = [{"match": {"team": "shop"}, "match_re": {"instance": "db-.*"}, "target": "nocworx",
               "topic": "hosting", "service_label": "service_id", "service_type": "hosting"},
              {"match": {"team": "infra"}, "target": "hostup", "topic": "vps",
               "priority_from_severity": {"critical": "high"}}]
    h = harness(routes=routes)
    h.post(alertmanager([alert("DBDown", instance="db-1", team="shop", service_id="4242")]))
    h.post(alertmanager([alert("NodeDown", severity="critical", team="infra")], group_key="{}:{team=\"infra\"}"))
    h.settle()
    [noc] = h.tickets("nocworx")
    [hostup] = h.tickets("hostup")
    assert noc["department"] == "support" and hostup["priority"] == "high"
    [creator] = [i for i in h.intents() if i.target == "nocworx"]
    create = h.rt.service.get(creator.id, with_attempts=True).attempt_log[0]
    assert create.op == "create" and create.request is not None
    assert create.request["json"]["service_id"] == 4242 and creator.priority == "medium"


def test_a_notification_no_route_takes_is_refused_naming_the_receiver(harness: Callable[..., Harness]) -> None:
    h = harness(default_target=None, default_topic=None,
                routes=[{"match": {"team": "shop"}, "target": "hostup", "topic": "hosting"}])
    answer = h.post(alertmanager([alert("HighLatency", team="infra")], receiver="ops-pager"))
    assert answer.status_code == 422
    problem = answer.json()
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert problem["errors"][0]["field"] == "receiver" and "ops-pager" in problem["errors"][0]["reason"]
    assert h.intents() == []


def test_a_dry_run_shows_what_would_be_sent_and_stores_nothing(harness: Callable[..., Harness]) -> None:
    h = harness()
    payload = alertmanager([alert("HighLatency")])
    plan = h.post(payload, params="?dry_run=true")
    assert plan.status_code == 200
    body = plan.json()
    assert body["dry_run"] and body["action"] == "create" and body["target"] == "hostup"
    assert body["department"] == "vps" and body["subject"] == "[FIRING:1] HighLatency (prod web-1)"
    [request] = body["requests"]
    assert request["method"] == "POST" and request["path"] == "/support/tickets"
    assert request["json"]["departmentSlug"] == "vps" and "HighLatency on web-1" in request["json"]["message"]
    assert h.intents() == [] and h.sim.requests("hostup") == []
    h.post(payload)
    h.settle()
    resolved = h.post(alertmanager([alert("HighLatency", "resolved")]), params="?dry_run=true").json()
    assert resolved["action"] == "reply" and resolved["steps"] == ["reply", "close"]
    assert [r["op"] for r in resolved["requests"]] == ["reply", "close"]
    assert "All alerts of this group have resolved" in resolved["message"]
    assert len(h.intents()) == 1 and h.group().state == "open"
    same = h.post(payload, params="?dry_run=true").json()
    assert same["action"] == "none" and same["requests"] == []


def test_producer_intents_sharing_a_group_key_make_one_ticket_and_replies(harness: Callable[..., Harness]) -> None:
    h = harness()
    write = {"Authorization": f"Bearer {TOKENS['WRITE_TOKEN']}"}
    intent = {"target": "hostup", "topic": "vps", "subject": "Backup job failing", "group_key": "backup-nightly"}
    first = h.client.post("/v1/intents", json={**intent, "body": "Night 1: failed."}, headers=write)
    assert first.status_code == 202 and first.json()["action"] == "create"
    h.settle()
    plan = h.client.post("/v1/intents?dry_run=true", json={**intent, "body": "Night 2: failed."}, headers=write)
    assert plan.json()["action"] == "reply" and plan.json()["requests"][0]["op"] == "reply"
    second = h.client.post("/v1/intents", json={**intent, "body": "Night 2: failed."}, headers=write)
    assert second.json()["action"] == "reply"
    h.settle()
    [ticket] = h.tickets()
    [message] = messages(ticket)
    assert message.startswith("Night 2: failed.") and f"dispatcher-ref: {second.json()['id']}" in message
    view = h.client.get(f"/v1/intents/{second.json()['id']}", headers={
        "Authorization": f"Bearer {TOKENS['READ_TOKEN']}"}).json()
    assert view["ticket"]["id"] == ticket["id"] and view["action"] == "reply"


def test_a_reply_to_a_ticket_someone_closed_reopens_it_first(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.post(alertmanager([alert("HighLatency")]))
    h.settle()
    ticket_id = h.tickets()[0]["id"]
    import httpx

    closed = httpx.post(f"{h.sim.hostup_url}/support/tickets/{ticket_id}/actions/close",
                        headers={"Authorization": "Bearer test-hostup-key-0123456789abcdef"})
    assert closed.status_code == 200
    h.post(alertmanager([alert("HighLatency"), alert("DiskFull", instance="db-1")]))
    views = h.settle()
    assert all(v.status is Status.succeeded for v in views)
    ops = [a.op for a in h.rt.service.get(h.intents()[-1].id, with_attempts=True).attempt_log]
    assert ops == ["reply", "reopen", "reply"]
    [ticket] = h.tickets()
    assert ticket["status"] != "closed" and "Newly firing:\n  - DiskFull" in messages(ticket)[0]


def test_the_openapi_document_describes_the_alert_endpoints(harness: Callable[..., Harness]) -> None:
    doc = harness().client.get("/openapi.json").json()
    for path, model in (("/v1/alerts/alertmanager", "AlertmanagerWebhook"), ("/v1/alerts/grafana", "GrafanaWebhook")):
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["title"] == model and "alerts" in schema["required"]
        assert schema["properties"]["alerts"]["items"]["$ref"] == "#/components/schemas/WebhookAlert"
    assert "WebhookAlert" in doc["components"]["schemas"]
    assert any(p["name"] == "dry_run" for p in doc["paths"]["/v1/intents"]["post"]["parameters"])


def test_events_say_why_each_notification_did_what_it_did(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.post(alertmanager([alert("HighLatency")]))
    h.post(alertmanager([alert("HighLatency")]))
    h.settle()
    with h.rt.store.session() as s:
        grouped = [e.message for e in s.scalars(select(EventRow).where(EventRow.kind == "grouped")
                                                .order_by(EventRow.id))]
        total = s.scalar(select(func.count()).select_from(IntentRow))
    assert total == 2
    assert grouped[0].startswith("create: a new group") and grouped[1].startswith("none: nothing new")
    assert h.rt.service.get(h.intents()[1].id).action is Action.none


def test_an_unreachable_database_answers_503_and_no_2xx(simulator: RunningSimulator) -> None:
    config = parse_config({"targets": target_table(simulator), "api": tokens_table(),
                           "alerts": {"default_target": "hostup", "default_topic": "vps"}},
                          Settings(database_url=f"postgresql://postgres@127.0.0.1:1/nope_{uuid.uuid4().hex[:6]}"),
                          env=secrets_env())
    rt = build_runtime(config, migrate_sqlite=False)
    try:
        client = TestClient(create_app(rt.service))
        answer = client.post("/v1/alerts/alertmanager", content=go_json(alertmanager([alert("X")])), headers=ALERTS)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
        assert answer.headers["content-type"].startswith("application/problem+json")
    finally:
        rt.close()


def test_submit_dry_run_prints_what_would_be_sent_and_stores_nothing(
        database_url: str, simulator: RunningSimulator, tmp_path: Any) -> None:
    from click.testing import CliRunner

    from dispatcher.cli import main
    from tests.acceptance.procs import to_toml

    path = tmp_path / "dispatcher.toml"
    path.write_text(to_toml({"targets": target_table(simulator), "api": tokens_table()}))
    env = {"DISPATCHER_DATABASE_URL": database_url, "DISPATCHER_CONFIG": str(path), **secrets_env()}
    args = ["submit", "--dry-run", "--target", "nocworx", "--topic", "dns", "--subject", "It is DNS",
            "--body", "It was DNS."]
    result = CliRunner().invoke(main, [*args, "--output", "json"], env=env)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["action"] == "create" and (plan["department"], plan["category"]) == ("support", "dns")
    assert plan["requests"][0]["path"] == "/v1/ticket" and plan["requests"][0]["json"]["subject"] == "It is DNS"
    text = CliRunner().invoke(main, args, env=env)
    assert text.exit_code == 0 and "would create on nocworx (nocworx), department support / dns" in text.output
    assert "POST /v1/ticket" in text.output and "nothing was stored or sent" in text.output
    engine_rt = build_runtime(parse_config({"targets": target_table(simulator)}, Settings(database_url=database_url),
                                           env=secrets_env()))
    try:
        assert engine_rt.store.list_intents() == [] and simulator.requests() == []
    finally:
        engine_rt.close()
