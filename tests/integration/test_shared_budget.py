"""One budget, many processes: separate OS processes of several threads each take tokens from the
Redis limiter and send HostUp creates to the simulator as fast as it lets them. The simulator's log
(arrival times at the server) is the judge: no window of one period holds more than the budget,
and a simulator whose own limit equals the budget answers no 429."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from typing import Any

import pytest
import redis

from dispatcher.backoff import RetryPolicy, parse_rate
from dispatcher.config import TargetConfig
from dispatcher.domain import Priority, Provider
from dispatcher.heap import settle_heap
from dispatcher.providers.base import TicketDraft
from dispatcher.providers.hostup import HostUpAdapter
from dispatcher.providers.http import HttpTransport
from dispatcher.ratelimit import RedisLimiter
from dispatcher.simulator import RunningSimulator
from dispatcher.simulator.audit import arrivals, busiest_window, throttled
from tests.conftest import HOSTUP_KEY

PROCESSES, THREADS = 3, 4
RATE, BURST = "10/second", 1
RUN_S = 4.0


def hostup_target(base_url: str) -> TargetConfig:
    count, period = parse_rate(RATE)
    return TargetConfig(
        name="hostup", provider=Provider.hostup, base_url=base_url, api_key=HOSTUP_KEY,  # type: ignore[arg-type]
        timeout_s=5, connect_timeout_s=5, ticket_url_template=None, rate_count=count, rate_period_s=period,
        burst=BURST, departments_ttl_s=300, critical_policy="downgrade", retry=RetryPolicy(),
        poll_interval_s=2, poll_deadline_s=900, routes={})


def send_until(redis_url: str, base_url: str, ready: Any) -> None:
    """One worker process: THREADS threads that wait for a token (sleeping as the limiter says, as
    the service does) and send a create, for RUN_S seconds from when every process is ready (the
    ``ready`` barrier: spawning and importing take seconds on a loaded machine); every answer is
    fed back to the limiter. Its start-up heap is frozen as a worker's is (dispatcher.heap): left
    to the collector, a full collection (~80 ms, bench/gc_pause.py) stalled a thread between its
    token and its send, and the provider saw 11 requests in one of its windows."""
    limiter = RedisLimiter(redis.Redis.from_url(redis_url))
    target = hostup_target(base_url)
    adapter = HostUpAdapter()
    transport = HttpTransport(base_url, HOSTUP_KEY)
    settle_heap()

    def loop() -> None:
        while time.time() < stop_at:
            wait = limiter.acquire(target, 0.25)
            if wait > 0:
                time.sleep(min(wait, max(0.0, stop_at - time.time())))
                continue
            spec = adapter.create_request(TicketDraft(subject=f"budget {uuid.uuid4().hex[:8]}", body="b",
                                                      priority=Priority.low, department="vps"))
            outcome = adapter.classify(spec.op, transport.send(spec))
            limiter.observe(target, outcome, adapter._clock())

    threads = [threading.Thread(target=loop) for _ in range(THREADS)]
    ready.wait(timeout=60)                                # every process starts together
    stop_at = time.time() + RUN_S
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    limiter.close()


@pytest.mark.usefixtures("steady_judge")
def test_processes_sharing_a_redis_budget_never_exceed_it_together(
        redis_url: str, simulator: RunningSimulator) -> None:
    simulator.configure(rate_limit=10, rate_window_s=1.0)     # the provider's limit is the budget
    since = time.time()
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(PROCESSES)
    workers = [context.Process(target=send_until, args=(redis_url, simulator.hostup_url, ready))
               for _ in range(PROCESSES)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=90)
    assert [w.exitcode for w in workers] == [0] * PROCESSES

    log = simulator.requests("hostup", since=since)
    times = arrivals(log)
    assert len(times) >= 2 * 10
    assert (len(times) - 1) / (times[-1] - times[0]) >= 9    # the budget was used (90 %), not starved
    assert busiest_window(times, 1.0) <= 10 + BURST          # rate x period + burst, in any window
    assert throttled(log) == []                              # ... so a provider at that limit never refuses
