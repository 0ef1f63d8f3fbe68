"""One target's transport spreads its sending threads over a few small connection pools.

httpcore looks over every connection of a pool on each request and each response's close, work
in proportion to the pool's size (README, Benchmarks: what one pool for 64 threads cost). These
tests pin what the spreading must keep: every thread's request answered on a kept-alive
connection, the threads dealt evenly, a thread on one pool, and every pool closed with the transport.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import httpx

from dispatcher.providers.base import Op, RequestSpec
from dispatcher.providers.http import POOL_SHARDS, HttpTransport
from dispatcher.simulator import RunningSimulator
from tests.conftest import HOSTUP_KEY

THREADS = 64


def test_sending_threads_are_dealt_evenly_over_the_pools_and_each_keeps_its_own(
        simulator: RunningSimulator) -> None:
    transport = HttpTransport(simulator.hostup_url, HOSTUP_KEY)
    used: dict[int, set[int]] = {}  # thread -> the pools its requests went through
    statuses: list[int | None] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def sender() -> None:
        start.wait()
        for _ in range(3):
            answer = transport.send(RequestSpec(Op.departments, "GET", "/support/departments"))
            pool = id(transport._per_thread.pool)
            with lock:
                statuses.append(answer.status)
                used.setdefault(threading.get_ident(), set()).add(pool)

    threads = [threading.Thread(target=sender) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [200] * (THREADS * 3)
    assert all(len(pools) == 1 for pools in used.values())  # a thread keeps its pool
    per_pool = Counter(next(iter(pools)) for pools in used.values())
    assert len(per_pool) == POOL_SHARDS
    assert set(per_pool.values()) == {THREADS // POOL_SHARDS}
    # each pool holds at most the connections its own threads use at once
    for shard in transport._pools:
        pool: Any = shard._pool  # type: ignore[attr-defined]
        assert len(pool.connections) <= THREADS // POOL_SHARDS
    transport.close()
    assert transport.closed
    assert all(not shard._pool.connections for shard in transport._pools)  # type: ignore[attr-defined]


def test_all_pools_share_one_tls_context() -> None:
    transport = HttpTransport("https://cloud.hostup.se/api/v2", "k")
    contexts = {id(shard._pool._ssl_context) for shard in transport._pools}  # type: ignore[attr-defined]
    transport.close()
    assert len(contexts) == 1 and len(transport._pools) == POOL_SHARDS


def test_an_injected_transport_is_one_pool() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json=[])

    with HttpTransport("https://x.example/api", "k", transport=httpx.MockTransport(answer)) as transport:
        assert transport.send(RequestSpec(Op.departments, "GET", "/d")).status == 200
        assert len(transport._pools) == 1
    assert seen == ["/api/d"]
