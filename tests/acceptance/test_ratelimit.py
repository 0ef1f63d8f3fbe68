"""The shared budget with real worker processes: three `dispatcher worker --pool threads
--concurrency 4` and a scheduler over Postgres and Redis, sending to the simulator. Its request log
(arrival times at the provider) is the judge: the workers together keep to the budget, nobody sends
before a Retry-After has passed, and a paused target picks up again when resumed.

One set of processes serves the module; each test starts from a healthy simulator and looks only
at requests made since it began.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from dispatcher.config import AppConfig, Settings, parse_config
from dispatcher.domain import Status
from dispatcher.heap import settle_heap
from dispatcher.runtime import Runtime, build_runtime
from dispatcher.simulator import RunningSimulator, SimulatorSettings, start_in_thread
from dispatcher.simulator.audit import arrivals, busiest_window, sent_early, throttled
from tests.acceptance.procs import Procs, subprocess_env, to_toml, wait_for_intents, wait_until
from tests.conftest import HOSTUP_KEY, NOCWORX_KEY, REDIS_BASE, database_from, secrets_env, target_table

WORKERS, THREADS = 3, 4
RATE_PER_S, BURST = 10, 1
HEALTHY: dict[str, Any] = {"rate_limit": 0, "rate_window_s": 1.0, "retry_after_format": "seconds",
                           "hostup_key": HOSTUP_KEY}
STARTUP_TIMEOUT_S = 40.0


@dataclass
class Fleet:
    sim: RunningSimulator
    procs: Procs
    producer: Runtime           # accepts intents and publishes them to the workers' queues
    redis_url: str

    def submit(self, count: int, target: str = "hostup", topic: str = "vps") -> list[uuid.UUID]:
        return [self.producer.service.accept({"target": target, "topic": topic, "body": "b",
                                              "subject": f"budget {uuid.uuid4().hex[:8]}"}).intent.id
                for _ in range(count)]

    def wait(self, ids: list[uuid.UUID], timeout: float = 30.0) -> list[Any]:
        return wait_for_intents(self.producer, ids, procs=self.procs, timeout=timeout)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, pg_template: str, redis_db: int) -> Iterator[Fleet]:
    settle_heap()   # the judge stamps arrivals in a thread of this process: see tests/conftest.py steady_judge
    workdir = tmp_path_factory.mktemp("ratelimit")
    with database_from(pg_template, "dispatcher_rl") as database_url:
        redis_url = f"{REDIS_BASE}/{redis_db}"
        redis.Redis.from_url(redis_url).flushdb()
        sim = start_in_thread(SimulatorSettings(hostup_key=HOSTUP_KEY, nocworx_key=NOCWORX_KEY, task_delay_s=0.2))
        budget = {"rate": f"{RATE_PER_S}/second", "burst": BURST}
        data = {"targets": target_table(sim, hostup=budget, nocworx=budget),
                "scheduler": {"interval_s": 0.2, "requeue_after_s": 5}}
        config_file = workdir / "dispatcher.toml"
        config_file.write_text(to_toml(data))
        procs = Procs(workdir, subprocess_env({
            "DISPATCHER_DATABASE_URL": database_url, "DISPATCHER_BROKER_URL": redis_url,
            "DISPATCHER_CONFIG": str(config_file), "DISPATCHER_LOG_FORMAT": "json", **secrets_env()}))
        config: AppConfig = parse_config(data, Settings(database_url=database_url, broker_url=redis_url),
                                         env=secrets_env())
        producer = build_runtime(config)
        try:
            for n in range(WORKERS):
                procs.start(f"worker{n}", "worker", "--pool", "threads", "--concurrency", str(THREADS))
            procs.start("scheduler", "scheduler")
            fleet = Fleet(sim, procs, producer, redis_url)
            [warm] = fleet.wait(fleet.submit(1), timeout=STARTUP_TIMEOUT_S)
            assert warm.status is Status.succeeded, procs.tails()
            yield fleet
        finally:
            producer.close()
            procs.stop_all()
            sim.stop()


@pytest.fixture(autouse=True)
def healthy(fleet: Fleet) -> Iterator[None]:
    """A healthy provider with fresh windows, and no budget or learned limit left by the last test."""
    fleet.sim.configure(**HEALTHY)
    fleet.sim.reset()
    client = redis.Redis.from_url(fleet.redis_url)
    for key in client.scan_iter("dispatcher:rl:*"):
        client.delete(key)
    client.close()
    yield
    fleet.sim.configure(**HEALTHY)


def test_workers_together_keep_to_the_budget_and_draw_no_429(fleet: Fleet) -> None:
    fleet.sim.configure(rate_limit=RATE_PER_S, rate_window_s=1.0)   # the provider's limit is the budget
    since = time.time()
    views = fleet.wait(fleet.submit(50))

    assert [v.status for v in views] == [Status.succeeded] * 50
    assert all(v.attempts == 1 for v in views)                      # waiting for a token is no attempt
    log = fleet.sim.requests("hostup", since=since)
    assert busiest_window(arrivals(log), 1.0) <= RATE_PER_S + BURST
    assert throttled(log) == []


def test_no_worker_sends_before_a_retry_after_has_passed(fleet: Fleet) -> None:
    # the provider allows less than we were told (3 per 2 s window) and says when to come back as a date
    fleet.sim.configure(rate_limit=3, rate_window_s=2.0, retry_after_format="http-date")
    since = time.time()
    views = fleet.wait(fleet.submit(12), timeout=40)

    assert [v.status for v in views] == [Status.succeeded] * 12
    log = fleet.sim.requests("hostup", since=since)
    refused = throttled(log)
    assert refused, "the simulator never answered 429: the test proved nothing"
    early = sent_early(log)
    assert early == [], "\n".join(f"{r['method']} {r['path']} {r['at'] - a['at']:.3f} s after a 429 asking for "
                                  f"{a['retry_after']:.3f} s" for a, r in early)
    assert len(refused) < len(log) // 2                             # it learned the lower limit


def test_a_paused_target_picks_up_again_when_resumed(fleet: Fleet) -> None:
    fleet.sim.configure(hostup_key="rotated-key")
    since = time.time()
    ids = fleet.submit(6)
    wait_until(lambda: "hostup" in fleet.producer.store.paused_targets(), timeout=15,
               what="the refused key to pause the target", procs=fleet.procs)
    wait_until(lambda: all(fleet.producer.service.get(i).status in (Status.queued, Status.waiting) for i in ids),
               timeout=15, what="the intents in flight to be put back", procs=fleet.procs)
    refused = [r for r in fleet.sim.requests("hostup", since=since) if r["status"] == 401]
    assert len(refused) <= WORKERS * THREADS                        # in flight when the pause came, no more

    fleet.sim.configure(hostup_key=HOSTUP_KEY)
    fleet.producer.service.resume_target("hostup", actor="test")
    views = fleet.wait(ids)
    assert [v.status for v in views] == [Status.succeeded] * 6
    tickets = fleet.sim.stats()["tickets_by_marker"]
    assert [tickets.get(str(i)) for i in ids] == [1] * 6
