"""A real `dispatcher worker --pool gevent` (and a scheduler) over Postgres and Redis, sending to the
simulator: it files tickets for both providers (taking the first look at a NocWorx task in the task
that submitted it, then polling by message), keeps taking messages
while every greenlet is busy, and says which pool it runs in its heartbeat.

The simulator answers after 300 ms, so that with 4 greenlets the worker is full most of the time:
the case where Celery's consumer, with a prefetch of one message per greenlet, stopped asking
Redis for messages and slept out its 2 s poll each time (dispatcher.worker.app.configure_pool).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from dispatcher.config import Settings, parse_config
from dispatcher.domain import Status
from dispatcher.runtime import Runtime, build_runtime
from dispatcher.simulator import RunningSimulator, SimulatorSettings, start_in_thread
from tests.acceptance.procs import Procs, subprocess_env, to_toml, wait_for_intents
from tests.conftest import HOSTUP_KEY, NOCWORX_KEY, REDIS_BASE, database_from, secrets_env, target_table

GREENLETS = 4
LATENCY_S = 0.3
STARTUP_TIMEOUT_S = 40.0


@dataclass
class Green:
    sim: RunningSimulator
    procs: Procs
    producer: Runtime

    def submit(self, count: int, target: str) -> list[uuid.UUID]:
        return [self.producer.service.accept({"target": target, "topic": "vps", "body": "b",
                                              "subject": f"green {uuid.uuid4().hex[:8]}"}).intent.id
                for _ in range(count)]

    def wait(self, ids: list[uuid.UUID], timeout: float) -> list[Any]:
        return wait_for_intents(self.producer, ids, procs=self.procs, timeout=timeout)


@pytest.fixture(scope="module")
def green(tmp_path_factory: pytest.TempPathFactory, pg_template: str, redis_db: int) -> Iterator[Green]:
    workdir = tmp_path_factory.mktemp("gevent")
    with database_from(pg_template, "dispatcher_green") as database_url:
        redis_url = f"{REDIS_BASE}/{redis_db}"
        redis.Redis.from_url(redis_url).flushdb()
        latency = int(LATENCY_S * 1000)
        sim = start_in_thread(SimulatorSettings(hostup_key=HOSTUP_KEY, nocworx_key=NOCWORX_KEY, task_delay_s=0.2,
                                                latency_ms=(latency, latency)))
        data = {"targets": target_table(sim), "scheduler": {"interval_s": 0.2, "requeue_after_s": 30}}
        config_file = workdir / "dispatcher.toml"
        config_file.write_text(to_toml(data))
        procs = Procs(workdir, subprocess_env({
            "DISPATCHER_DATABASE_URL": database_url, "DISPATCHER_BROKER_URL": redis_url,
            "DISPATCHER_CONFIG": str(config_file), "DISPATCHER_LOG_FORMAT": "json", **secrets_env()}))
        producer = build_runtime(parse_config(data, Settings(database_url=database_url, broker_url=redis_url),
                                              env=secrets_env()))
        try:
            procs.start("worker", "worker", "--pool", "gevent", "--concurrency", str(GREENLETS))
            procs.start("scheduler", "scheduler")
            env = Green(sim, procs, producer)
            [warm] = env.wait(env.submit(1, "hostup"), timeout=STARTUP_TIMEOUT_S)
            assert warm.status is Status.succeeded, procs.tails()
            yield env
        finally:
            producer.close()
            procs.stop_all()
            sim.stop()


def test_a_gevent_worker_files_tickets_for_both_providers_once_each(green: Green) -> None:
    ids = green.submit(6, "hostup") + green.submit(6, "nocworx")
    views = green.wait(ids, timeout=60)

    assert [v.status for v in views] == [Status.succeeded] * 12, green.procs.tails()
    assert all(v.ticket is not None for v in views)
    made = green.sim.stats()["tickets_by_marker"]
    assert [made.get(str(i), 0) for i in ids] == [1] * 12   # one ticket each at the provider
    for view in views[6:]:  # the first look at a NocWorx task is the submitting greenlet's: no claim of its own
        full = green.producer.service.get(view.id, with_attempts=True)
        looks = [a for a in full.attempt_log if a.path.startswith("/v1/task/")]
        assert looks and full.deliveries == len(looks), full.attempt_log


def test_a_gevent_worker_keeps_taking_messages_while_every_greenlet_is_busy(green: Green) -> None:
    # 40 sends of 300 ms over 4 greenlets: 10 rounds, about 3 s. With the consumer sleeping out its
    # 2 s poll whenever its prefetch slots were all taken (one per greenlet), each round took 2 s
    # more: over 20 s. The bound is far from both.
    started = time.monotonic()
    views = green.wait(green.submit(40, "hostup"), timeout=60)
    took = time.monotonic() - started

    assert [v.status for v in views] == [Status.succeeded] * 40
    assert took < 12.0, f"40 intents took {took:.1f} s: the consumer stalls while the pool is full"


def test_a_gevent_worker_says_so_in_its_heartbeat(green: Green) -> None:
    [beat] = [b for b in green.producer.store.heartbeats() if b.component == "worker"]
    assert beat.info["pool"] == "gevent"
    assert beat.info["concurrency"] == GREENLETS
