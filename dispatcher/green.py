"""The gevent worker pool: patch the standard library before anything uses it.

``dispatcher worker`` (``--pool gevent``, the default) runs every task in a greenlet of one
thread, so a task waiting on the provider, PostgreSQL or Redis costs a few kilobytes and no thread
switch (README, "The worker's hot path"). That only works if every socket, lock and ``select`` the
process uses is gevent's, which means patching them before the first import that keeps a reference
to the originals: this runs first thing in ``dispatcher/__init__.py`` (``python -m dispatcher``
and the ``dispatcher`` script both import the package first), as Celery's own command line does
(``celery.maybe_patch_concurrency``), and only for that command line. psycopg, seeing the
patching, would wait through gevent's ``select.poll``; it is given a wait on one io watcher instead
(:func:`watcher_wait`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

GEVENT = "gevent"
#: ``dispatcher worker``'s pool when none is named (README, "The worker's hot path")
DEFAULT_POOL = GEVENT


def pool_asked(argv: Sequence[str]) -> str | None:
    """The pool a ``dispatcher worker`` command line runs (``--pool X``, ``--pool=X``, else the
    default); None for any other command, and for any other program that imports dispatcher
    (``pytest -k worker`` is not a worker)."""
    program = argv[0] if argv else ""
    if not (os.path.basename(program) in ("dispatcher", "dispatcher.exe") or program == "-m"
            or program.endswith(os.path.join("dispatcher", "__main__.py"))):
        return None
    args = list(argv[1:])
    command = next((arg for arg in args if not arg.startswith("-")), None)
    if command != "worker":
        return None
    after = args[args.index(command) + 1:]
    for i, arg in enumerate(after):
        if arg == "--pool":
            return after[i + 1] if i + 1 < len(after) else None
        if arg.startswith("--pool="):
            return arg.split("=", 1)[1]
    return DEFAULT_POOL


def patched_for_gevent() -> bool:
    """Was this process patched at start-up (:func:`patch_for_green_worker`)?"""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def patch_for_green_worker(argv: Sequence[str]) -> None:
    """Monkey-patch the standard library for gevent when ``argv`` runs a gevent worker (once)."""
    if pool_asked(argv) != GEVENT or patched_for_gevent():
        return
    from gevent import monkey

    monkey.patch_all()
    _unpatched_readiness_checks(monkey.get_original("select", "poll"))
    _psycopg_waits_on_one_watcher()


def _unpatched_readiness_checks(poll: Any) -> None:
    """Checks that never wait (a zero-timeout poll of one socket) on the original ``select.poll``,
    not gevent's.

    gevent's ``poll`` starts and stops watchers on its loop for every call, cooperative work that a
    call which cannot wait does not need (``bench/green.py``: about 13 µs against 1-2 µs a check).
    Two libraries make such a check on every use of a kept-alive connection:

    - httpcore, before every request and after every response, looks at each connection of the
      pool (``httpcore._utils.is_socket_readable``): 4 % of a gevent worker's CPU at 200 ms
      (bench/e2e.py --profile);
    - redis-py, taking a connection from its pool, checks that nothing unread waits on it (the
      hiredis parser's ``_socket_can_read(sock, 0)``): 3 % in the same profile. A check with a
      timeout (a pub/sub wait) still goes through gevent's, which lets the other greenlets run.
    """
    import select

    from httpcore import _utils

    _utils.select = SimpleNamespace(poll=poll, POLLIN=select.POLLIN, select=select.select)  # type: ignore[attr-defined,assignment]

    from redis._parsers import hiredis

    waiting = getattr(hiredis, "_socket_can_read", None)
    if waiting is None:  # another redis-py: its checks stay gevent's
        return

    def socket_can_read(sock: Any, timeout: float | None) -> bool:
        if timeout != 0:
            return bool(waiting(sock, timeout))
        if hasattr(sock, "pending") and sock.pending():  # TLS: bytes decrypted above the socket
            return True
        poller = poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))

    hiredis._socket_can_read = socket_can_read


def _psycopg_waits_on_one_watcher() -> None:
    """psycopg waits for its socket on one gevent watcher per wait, not through gevent's ``select.poll``.

    Seeing the patching, psycopg waits with ``select.poll`` (``psycopg.waiting.wait_poll``), for
    which gevent's makes a poll object, its watchers, an event and a timeout (psycopg asks to wake
    every 0.1 s) on each of the two or three waits of every statement (seen in the raw stacks of
    ``bench/e2e.py --profile``). A wait needs one io watcher on the statement's socket, as gevent's
    own sockets wait (``bench/green.py`` times a ``SELECT 1`` both ways: 54.8 against 46.5 µs of
    CPU). psycopg's wake-ups only let Ctrl-C in between (a statement's generator goes on waiting
    after one), so none is asked for here; a ``timeout`` is kept. Connecting keeps psycopg's own
    wait (``wait_conn``)."""
    import psycopg.waiting

    psycopg.waiting.wait = watcher_wait()


def watcher_wait() -> Callable[..., Any]:
    """A ``psycopg.waiting.wait`` for a gevent worker: it runs psycopg's generator on the socket,
    each wait one io watcher on gevent's loop (:func:`_psycopg_waits_on_one_watcher`)."""
    import time

    from gevent import Timeout, get_hub
    from gevent.hub import Waiter
    from psycopg import errors

    monotonic = time.monotonic

    def wait(gen: Any, fileno: int, interval: float | None = 0.0, timeout: float | None = None) -> Any:
        hub = get_hub()
        deadline = None if timeout is None else monotonic() + timeout
        try:
            wanted = next(gen)
            while True:
                try:
                    watcher = hub.loop.io(fileno, int(wanted))
                except OSError as exc:  # the socket was closed under it
                    raise errors.OperationalError("connection socket closed") from exc
                waiter: Waiter[int] = Waiter(hub)
                watcher.start(waiter.switch, pass_events=True)
                timer = None if deadline is None else Timeout.start_new(max(0.0, deadline - monotonic()))
                try:
                    events = waiter.get()
                except Timeout as exc:
                    if exc is not timer:
                        raise
                    events = 0
                finally:
                    if timer is not None:
                        timer.close()
                    watcher.stop()
                    watcher.close()
                ready = events & 3 if events > 0 else 0  # libev's READ and WRITE are psycopg's R and W
                if events < 0 or (events and not ready):
                    raise errors.OperationalError("connection socket closed")
                wanted = gen.send(ready)
                if deadline is not None and monotonic() >= deadline:
                    raise errors._WaitTimeout("wait timeout expired")
        except StopIteration as done:
            return done.value

    return wait
