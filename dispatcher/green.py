"""The gevent worker pool: patch the standard library before anything uses it.

``dispatcher worker`` (``--pool gevent``, the default) runs every task in a greenlet of one
thread, so a task waiting on the provider, PostgreSQL or Redis costs a few kilobytes and no thread
switch (README, "The worker's hot path"). That only works if every socket, lock and ``select`` the
process uses is gevent's, which means patching them before the first import that keeps a reference
to the originals: this runs first thing in ``dispatcher/__init__.py`` (``python -m dispatcher``
and the ``dispatcher`` script both import the package first), as Celery's own command line does
(``celery.maybe_patch_concurrency``), and only for that command line. psycopg sees the patching
and waits in gevent's way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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


def patch_for_green_worker(argv: Sequence[str]) -> bool:
    """Monkey-patch the standard library for gevent when ``argv`` runs a gevent worker; True if it did."""
    if pool_asked(argv) != GEVENT:
        return False
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()
        _unpatched_readiness_checks(monkey.get_original("select", "poll"))
    return True


def _unpatched_readiness_checks(poll: Any) -> None:
    """httpcore's check that a kept-alive connection was not closed by the server: the original
    ``select.poll``, not gevent's.

    Before every request and after every response httpcore looks at each connection of the pool
    with a zero-timeout poll (``httpcore._utils.is_socket_readable``). A zero timeout never waits,
    so it needs nothing cooperative, and gevent's ``poll`` (watchers started and stopped on its
    loop for each call) was 4 % of a gevent worker's CPU at 200 ms (bench/e2e.py --profile)."""
    import select

    from httpcore import _utils

    _utils.select = SimpleNamespace(poll=poll, POLLIN=select.POLLIN, select=select.select)  # type: ignore[attr-defined,assignment]
