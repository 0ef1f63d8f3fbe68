"""Benchmark: httpcore's look at a kept-alive connection in a gevent worker, gevent's poll against
the original, side by side.

Run: ``.venv/bin/python -m bench.green [--calls 20000] [--rounds 5]``

Before every request and after every response, httpcore checks each connection of its pool with
``httpcore._utils.is_socket_readable`` (a zero-timeout ``select.poll``). In a process patched for
gevent (``dispatcher worker``, see dispatcher/green.py) that ``poll`` is gevent's, which starts and
stops watchers on its loop for a call that never waits; dispatcher.green gives httpcore the
original instead. This prints the CPU microseconds per check both ways (medians of the rounds, the
two alternated), on an idle connected socket as in a pool between requests.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import select  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from httpcore import _utils  # noqa: E402


def per_call_us(calls: int, sock: socket.socket) -> float:
    started = time.process_time()
    for _ in range(calls):
        _utils.is_socket_readable(sock)
    return (time.process_time() - started) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.green", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    ours, _peer = socket.socketpair()
    patched = _utils.select
    original = SimpleNamespace(poll=monkey.get_original("select", "poll"), POLLIN=select.POLLIN,
                               select=select.select)
    results: dict[str, list[float]] = {"gevent's poll (baseline)": [], "the original poll (dispatcher.green)": []}
    for _ in range(args.rounds):
        for name, module in zip(results, (patched, original), strict=True):
            _utils.select = module  # type: ignore[attr-defined]
            results[name].append(per_call_us(args.calls, ours))
    _utils.select = patched  # type: ignore[attr-defined]
    base = statistics.median(results["gevent's poll (baseline)"])
    print(f"httpcore.is_socket_readable on an idle socket, gevent-patched process; {args.calls} calls x "
          f"{args.rounds} rounds, medians")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"  {name:40s} {median:7.2f} us per check  ({base / median:4.1f}x faster than gevent's)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
