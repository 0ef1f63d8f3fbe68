"""The gevent worker pool: patch the standard library before anything uses it.

``dispatcher worker --pool gevent`` runs every task in a greenlet of one thread, so a task waiting
on the provider, PostgreSQL or Redis costs a few kilobytes and no thread switch (README, "The
worker's hot path"). That only works if every socket, lock and ``select`` the process uses is
gevent's, which means patching them before the first import that keeps a reference to the
originals: this runs first thing in ``dispatcher/__init__.py``, as Celery's own command line does
(``celery.maybe_patch_concurrency``), and only for that command line. psycopg sees the patching and
waits in gevent's way.
"""

from __future__ import annotations

from collections.abc import Sequence

GEVENT = "gevent"


def pool_asked(argv: Sequence[str]) -> str | None:
    """The ``--pool`` of a ``dispatcher worker`` command line (``--pool X`` or ``--pool=X``), else None."""
    args = list(argv[1:])
    if "worker" not in args:
        return None
    after = args[args.index("worker") + 1:]
    for i, arg in enumerate(after):
        if arg == "--pool" and i + 1 < len(after):
            return after[i + 1]
        if arg.startswith("--pool="):
            return arg.split("=", 1)[1]
    return None


def patch_for_green_worker(argv: Sequence[str]) -> bool:
    """Monkey-patch the standard library for gevent when ``argv`` runs a gevent worker; True if it did."""
    if pool_asked(argv) != GEVENT:
        return False
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()
    return True
