"""Benchmark: what a gevent worker's waits and checks cost, gevent's generic way against the one
dispatcher.green and the driver pick, side by side.

Run: ``.venv/bin/python -m bench.green [--calls 20000] [--rounds 5]`` (PostgreSQL at
``DISPATCHER_TEST_PG``, default ``postgresql://postgres@127.0.0.1:5432/postgres``)

Two libraries look at a kept-alive connection with a zero-timeout ``select.poll`` on every use:
httpcore before every request and after every response (``httpcore._utils.is_socket_readable``, for
each connection of the pool), redis-py when it takes a connection from its pool (the hiredis
parser's ``_socket_can_read(sock, 0)``). In a process patched for gevent (``dispatcher worker``,
see dispatcher/green.py) that ``poll`` is gevent's, which starts and stops watchers on its loop for
a call that never waits; dispatcher.green gives both checks the original instead (timed on an idle
connected socket, as in a pool between requests).

Two more are on every statement: psycopg's wait for its socket, which in a patched process goes
through gevent's ``select.poll`` and which dispatcher.green replaces with one io watcher per wait
(timed as a ``SELECT 1`` round trip, wait included), and the driver's semaphore that bounds the
worker's PostgreSQL connections, the standard library's (patched) or gevent's (timed as an
acquire and release). This prints the CPU microseconds per call both ways (medians of the rounds,
the two alternated).
"""

from __future__ import annotations

import sys

_ARGV, sys.argv = sys.argv, ["dispatcher", "worker", "--pool", "gevent"]  # patched as a gevent worker is
import dispatcher  # noqa: E402, F401

sys.argv = _ARGV

import argparse  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import psycopg  # noqa: E402
import psycopg.waiting  # noqa: E402
from gevent import monkey  # noqa: E402
from httpcore import _utils  # noqa: E402
from redis._parsers import hiredis  # noqa: E402

from dispatcher.store.driver import bounded_semaphore  # noqa: E402


def per_call_us(calls: int, check: Callable[[], object]) -> float:
    started = time.process_time()
    for _ in range(calls):
        check()
    return (time.process_time() - started) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.green", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    ours, _peer = socket.socketpair()
    ours_http = _utils.select
    gevents_http = SimpleNamespace(poll=select.poll, POLLIN=select.POLLIN, select=select.select)
    ours_redis = hiredis._socket_can_read
    original = monkey.get_original("select", "poll")
    assert ours_http.poll is original, "dispatcher.green did not give httpcore the original poll"

    def gevents_redis(sock: socket.socket, timeout: float) -> bool:   # redis-py's own check, as shipped
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(None if timeout is None else timeout * 1000))

    def with_http(module: object) -> Callable[[], object]:
        def check() -> object:
            _utils.select = module  # type: ignore[attr-defined]
            return _utils.is_socket_readable(ours)
        return check

    ours_wait = psycopg.waiting.wait
    assert ours_wait is not psycopg.waiting.wait_poll, "dispatcher.green did not give psycopg its wait"
    database = psycopg.connect(os.environ.get("DISPATCHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
                               autocommit=True)
    cursor = database.cursor()

    def with_wait(wait: Callable[..., object]) -> Callable[[], object]:
        def statement() -> object:
            psycopg.waiting.wait = wait  # type: ignore[assignment]
            return cursor.execute("SELECT 1").fetchone()
        return statement

    def acquire_release(slots: threading.BoundedSemaphore) -> Callable[[], object]:
        def use() -> object:
            with slots:
                return None
        return use

    variants: dict[str, tuple[str, Callable[[], object], str, Callable[[], object]]] = {
        "httpcore is_socket_readable": ("gevent's poll", with_http(gevents_http), "the original poll",
                                        with_http(ours_http)),
        "redis-py _socket_can_read(sock, 0)": ("gevent's poll", lambda: gevents_redis(ours, 0), "the original poll",
                                               lambda: ours_redis(ours, 0)),
        "psycopg SELECT 1, its waits": ("psycopg's wait_poll", with_wait(psycopg.waiting.wait_poll),
                                        "one io watcher", with_wait(ours_wait)),
        "driver semaphore acquire+release": ("threading's", acquire_release(threading.BoundedSemaphore(8)),
                                             "gevent's", acquire_release(bounded_semaphore(8))),
    }
    print(f"in a gevent-patched process; {args.calls} calls x {args.rounds} rounds, medians (us of CPU per call)")
    for name, (base_name, baseline, mine_name, mine) in variants.items():
        base: list[float] = []
        after: list[float] = []
        for _ in range(args.rounds):
            base.append(per_call_us(args.calls, baseline))
            after.append(per_call_us(args.calls, mine))
        b, a = statistics.median(base), statistics.median(after)
        print(f"  {name:36s} {base_name} (baseline) {b:7.2f} us per call;  {mine_name} (dispatcher) "
              f"{a:6.2f} us per call  ({b / a:4.1f}x)")
    psycopg.waiting.wait = ours_wait
    database.close()
    _utils.select = ours_http  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
