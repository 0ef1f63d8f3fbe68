"""`/metrics` tells the truth: a known pipeline on Postgres against the simulators, then a scrape.

Process counters are global to the test process, so each test reads them before and after and
compares the difference; database gauges are absolute (every test has its own database). Each
scrape uses a new app, so the database gauges' cache never hides a change.
"""

from __future__ import annotations

import math
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from dispatcher import metrics
from dispatcher.domain import IntentView
from dispatcher.health import SCHEDULER, STALE_AFTER_S, WORKER, Heartbeat
from dispatcher.intake.api import create_app
from dispatcher.runtime import Runtime
from dispatcher.scheduler import start_in_thread
from dispatcher.simulator import RunningSimulator
from dispatcher.store import db
from dispatcher.store.repo import Store
from dispatcher.store.tables import AttemptRow, IntentRow
from tests.conftest import TOKENS, make_config

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
HOSTUP_SUBJECT_MAX = 200  # the simulator refuses longer subjects with a 400, as HostUp does


def scrape(rt: Runtime) -> Samples:
    """Every sample of a fresh API app's /metrics, keyed by name and labels."""
    with TestClient(create_app(rt.service)) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def wait_terminal(rt: Runtime, ids: list[uuid.UUID], timeout: float = 30.0) -> list[IntentView]:
    deadline = time.monotonic() + timeout
    while True:
        rt.service.schedule_once()
        views = [rt.service.get(i) for i in ids]
        if all(v.terminal for v in views):
            return views
        assert time.monotonic() < deadline, [(v.id, v.status, v.last_error_code) for v in views]
        time.sleep(0.1)


def intent(target: str, topic: str, **fields: Any) -> dict[str, Any]:
    return {"target": target, "topic": topic, "subject": f"Metrics {uuid.uuid4().hex[:8]}", "body": "Body.",
            **fields}


def attempts_in_db(rt: Runtime, **where: Any) -> int:
    with rt.store.session() as s:
        query = select(func.count()).select_from(AttemptRow).join(IntentRow, IntentRow.id == AttemptRow.intent_id)
        for column, wanted in where.items():
            query = query.where((IntentRow.target if column == "target" else getattr(AttemptRow, column)) == wanted)
        return int(s.scalar(query) or 0)


def test_metrics_count_a_known_pipeline_exactly(database_url: str, simulator: RunningSimulator,
                                                make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url))
    before = scrape(rt)

    ids = [rt.service.accept(intent("hostup", "vps")).intent.id for _ in range(3)]
    ids += [rt.service.accept(intent("nocworx", "dns")).intent.id for _ in range(2)]
    refused = rt.service.accept(intent("hostup", "vps", subject="x" * (HOSTUP_SUBJECT_MAX + 10))).intent.id
    with TestClient(create_app(rt.service)) as client:
        headers = {"Authorization": f"Bearer {TOKENS['WRITE_TOKEN']}"}
        body = intent("hostup", "dns", idempotency_key="metrics-once")
        first = client.post("/v1/intents", json=body, headers=headers)
        replay = client.post("/v1/intents", json=body, headers=headers)
    assert (first.status_code, replay.status_code) == (202, 200)
    ids += [uuid.UUID(first.json()["id"]), refused]
    views = {v.id: v for v in wait_terminal(rt, ids)}
    assert views[refused].status.value == "failed"
    assert sum(v.status.value == "succeeded" for v in views.values()) == 6

    after = scrape(rt)
    # intake, by source; the idempotent replay is not a new intent
    assert delta(before, after, "dispatcher_intents_accepted_total", source="python", target="hostup") == 4
    assert delta(before, after, "dispatcher_intents_accepted_total", source="python", target="nocworx") == 2
    assert delta(before, after, "dispatcher_intents_accepted_total", source="api", target="hostup") == 1
    # outcomes
    code = views[refused].last_error_code or ""
    assert delta(before, after, "dispatcher_intents_finished_total", target="hostup", status="succeeded") == 4
    assert delta(before, after, "dispatcher_intents_finished_total", target="hostup", status="failed",
                 error_code=code) == 1
    assert delta(before, after, "dispatcher_intents_finished_total", target="nocworx", status="succeeded") == 2
    assert delta(before, after, "dispatcher_accept_to_ticket_seconds_count", target="hostup") == 4
    assert delta(before, after, "dispatcher_accept_to_ticket_seconds_count", target="nocworx") == 2
    assert delta(before, after, "dispatcher_task_resolution_seconds_count", target="nocworx",
                 outcome="succeeded") == 2
    # every exchange in the audit trail is counted once, under its operation and status class
    for target in ("hostup", "nocworx"):
        assert delta(before, after, "dispatcher_attempts_total", target=target) == attempts_in_db(rt, target=target)
        assert delta(before, after, "dispatcher_attempt_duration_seconds_count", target=target) == \
            attempts_in_db(rt, target=target)
    assert delta(before, after, "dispatcher_attempts_total", target="hostup", op="create", status_class="2xx") == 4
    assert delta(before, after, "dispatcher_attempts_total", target="hostup", op="create", status_class="4xx",
                 verdict="final") == 1
    assert delta(before, after, "dispatcher_attempts_total", target="nocworx", op="create", verdict="poll") == 2
    polls = attempts_in_db(rt, target="nocworx", op="poll")
    assert polls >= 2
    assert delta(before, after, "dispatcher_polls_total", target="nocworx") == polls
    assert delta(before, after, "dispatcher_polls_total", target="nocworx", verdict="done") == 2
    assert delta(before, after, "dispatcher_rate_limited_total") == 0
    assert delta(before, after, "dispatcher_target_pauses_total") == 0
    # the database's view, absolute
    assert value(after, "dispatcher_database_up") == 1
    assert value(after, "dispatcher_intents", target="hostup", status="succeeded") == 4
    assert value(after, "dispatcher_intents", target="hostup", status="failed") == 1
    assert value(after, "dispatcher_intents", target="nocworx", status="succeeded") == 2
    assert value(after, "dispatcher_intents", target="nocworx", status="queued") == 0
    for target in ("hostup", "nocworx"):
        assert value(after, "dispatcher_queue_depth", target=target) == 0
        assert value(after, "dispatcher_oldest_intent_age_seconds", target=target) == 0
        assert value(after, "dispatcher_target_paused", target=target) == 0
    # nothing has a heartbeat here: no worker process, no scheduler loop
    assert value(after, "dispatcher_workers_alive") == 0
    assert math.isinf(value(after, "dispatcher_worker_heartbeat_age_seconds"))
    assert math.isinf(value(after, "dispatcher_scheduler_heartbeat_age_seconds"))


def test_429s_and_their_retry_after_are_counted_as_the_audit_trail_records_them(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    simulator.configure(rate_limit=2, rate_window_s=1.0)
    # our budget matches the simulator's limit, but its burst of 5 draws some 429s at the start
    rt = make_runtime(make_config(simulator, database_url=database_url,
                                  hostup={"rate": "2/second", "burst": 5,
                                          "retry": {"max_attempts": 20, "base_s": 0.2, "cap_s": 2.0}}))
    before = scrape(rt)
    ids = [rt.service.accept(intent("hostup", "vps")).intent.id for _ in range(6)]
    assert all(v.status.value == "succeeded" for v in wait_terminal(rt, ids, timeout=60))
    after = scrape(rt)

    limited = attempts_in_db(rt, target="hostup", status_code=429)
    assert limited > 0, "the simulator's limit of 2 a second should have answered some requests 429"
    assert delta(before, after, "dispatcher_rate_limited_total", target="hostup") == limited
    assert delta(before, after, "dispatcher_attempts_total", target="hostup", status_class="4xx",
                 verdict="retry") == limited
    with rt.store.session() as s:
        asked = s.scalar(select(func.coalesce(func.sum(AttemptRow.retry_after_s), 0.0))
                         .where(AttemptRow.status_code == 429)) or 0.0
    assert delta(before, after, "dispatcher_rate_limit_wait_seconds_total", target="hostup",
                 source="retry_after") == pytest.approx(asked)
    assert delta(before, after, "dispatcher_waits_total", target="hostup", reason="retry") >= limited
    # 12 requests at 2 a second: the shared limiter held intents back too, and that time is counted
    assert delta(before, after, "dispatcher_waits_total", target="hostup", reason="rate_limit") > 0
    assert delta(before, after, "dispatcher_rate_limit_wait_seconds_total", target="hostup", source="limiter") > 0


def test_a_target_whose_key_is_refused_shows_as_paused(database_url: str, simulator: RunningSimulator,
                                                       make_runtime: Any) -> None:
    # the NocWorx key sent to HostUp: a 401, which pauses the whole target
    rt = make_runtime(make_config(simulator, database_url=database_url, hostup={"api_key_env": "NOCWORX_KEY"}))
    before = scrape(rt)
    intent_id = rt.service.accept(intent("hostup", "vps")).intent.id
    deadline = time.monotonic() + 20
    while "hostup" not in rt.store.paused_targets():
        assert time.monotonic() < deadline, rt.service.get(intent_id)
        time.sleep(0.05)
    after = scrape(rt)
    assert value(after, "dispatcher_target_paused", target="hostup") == 1
    assert value(after, "dispatcher_target_paused", target="nocworx") == 0
    assert delta(before, after, "dispatcher_target_pauses_total", target="hostup") == 1
    assert delta(before, after, "dispatcher_waits_total", target="hostup", reason="paused") >= 1
    assert delta(before, after, "dispatcher_attempts_total", target="hostup", verdict="pause") >= 1
    assert value(after, "dispatcher_queue_depth", target="hostup") == 1
    assert value(after, "dispatcher_oldest_intent_age_seconds", target="hostup") > 0


def test_heartbeats_show_in_readyz_and_metrics_and_vanish_on_a_clean_stop(
        database_url: str, simulator: RunningSimulator, make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url))
    thread, stop = start_in_thread(rt.service, interval_s=0.05)
    worker = Heartbeat(rt.store.beat, rt.store.forget_heartbeat, WORKER, "test-worker", interval_s=0.2).start()
    try:
        deadline = time.monotonic() + 10
        while not (rt.store.liveness(rt.service.clock()).scheduler_ok and rt.store.liveness(
                rt.service.clock()).workers_ok):
            assert time.monotonic() < deadline, rt.store.heartbeats()
            time.sleep(0.05)
        with TestClient(create_app(rt.service)) as client:
            ready = client.get("/readyz")
        assert ready.status_code == 200
        components = ready.json()["components"]
        assert components["scheduler"]["status"] == "ok"
        assert components["workers"]["status"] == "ok"
        assert components["workers"]["names"] == ["test-worker"]
        samples = scrape(rt)
        assert value(samples, "dispatcher_workers_alive") == 1
        assert 0 <= value(samples, "dispatcher_worker_heartbeat_age_seconds") < STALE_AFTER_S
        assert 0 <= value(samples, "dispatcher_scheduler_heartbeat_age_seconds") < STALE_AFTER_S
    finally:
        stop.set()
        thread.join(5)
        worker.stop()
    assert rt.store.heartbeats() == []
    with TestClient(create_app(rt.service)) as client:
        ready = client.get("/readyz")
    # missing workers and scheduler are reported, but readiness (can intake work?) does not fail on them
    assert ready.status_code == 200
    assert ready.json()["components"]["workers"]["status"] == "missing"
    assert ready.json()["components"]["scheduler"]["status"] == "missing"


def test_a_heartbeat_older_than_the_limit_is_stale_and_a_standby_scheduler_does_not_count(
        database_url: str) -> None:
    store = Store(db.make_engine(database_url))
    try:
        now = datetime.now(UTC)
        store.beat(WORKER, "old-worker", now - timedelta(seconds=STALE_AFTER_S + 5), {"pool": "prefork"})
        store.beat(SCHEDULER, "standby", now, {"leader": False})
        live = store.liveness(now)
        assert not live.workers_ok and live.worker_age_s == pytest.approx(STALE_AFTER_S + 5, abs=1)
        assert not live.scheduler_ok and live.scheduler_age_s is None
        report = live.as_dict()
        assert report["workers"]["status"] == "stale" and report["workers"]["stale"] == 1
        assert report["scheduler"] == {"status": "missing", "name": None, "age_s": None, "standby": 1}
        store.beat(WORKER, "old-worker", now, {"pool": "prefork"})  # refreshed, not duplicated
        assert [b.name for b in store.heartbeats() if b.component == WORKER] == ["old-worker"]
        assert store.liveness(now).workers_ok
        assert store.prune_heartbeats(now + timedelta(seconds=1)) == 2
    finally:
        store.engine.dispose()


def test_an_unreachable_database_gives_database_up_0_and_the_scrape_still_answers() -> None:
    store = Store(db.make_engine("postgresql://nobody@127.0.0.1:9/nowhere"))
    try:
        collector = metrics.DatabaseCollector(store, ["hostup"], ttl_s=0)
        families = {f.name: f for f in collector.collect()}
        assert list(families) == ["dispatcher_database_up"]
        assert families["dispatcher_database_up"].samples[0].value == 0
    finally:
        store.engine.dispose()


def test_database_gauges_are_cached_for_the_ttl(database_url: str, simulator: RunningSimulator,
                                                make_runtime: Any) -> None:
    rt = make_runtime(make_config(simulator, database_url=database_url))
    rt.store.set_target_state("hostup", now=datetime.now(UTC), paused=True)
    cached = metrics.DatabaseCollector(rt.store, ["hostup"], ttl_s=60)
    fresh = metrics.DatabaseCollector(rt.store, ["hostup"], ttl_s=0)

    def paused(collector: metrics.DatabaseCollector) -> float:
        family = next(f for f in collector.collect() if f.name == "dispatcher_target_paused")
        return family.samples[0].value

    assert paused(cached) == paused(fresh) == 1
    rt.store.set_target_state("hostup", now=datetime.now(UTC), paused=False)
    assert paused(cached) == 1
    assert paused(fresh) == 0
