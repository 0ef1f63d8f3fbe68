"""The scheduler: re-enqueue what is due (backoff waits, lost messages) and recover lost workers.

Run one. A Postgres advisory lock keeps a second one on standby; even without it, every step is a
conditional update with ``SKIP LOCKED``, so two at once do no harm.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from dispatcher.service import Dispatcher

log = logging.getLogger(__name__)

LOCK_KEY = 0x64697370  # "disp"


def try_lock(conn: Connection | None) -> bool:
    if conn is None:
        return True
    got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar())
    conn.commit()
    return got


def run_scheduler(service: Dispatcher, stop: threading.Event, *, interval_s: float | None = None) -> None:
    """Loop until ``stop`` is set. Survives database outages (logs and tries again)."""
    interval = interval_s or service.config.scheduler.interval_s
    retention = service.config.retention
    next_prune = time.monotonic()
    leader = False
    conn: Connection | None = None
    while not stop.is_set():
        try:
            if conn is None and service.store.engine.dialect.name == "postgresql":
                conn = service.store.engine.connect()
                leader = False
            if not leader:
                leader = try_lock(conn)
                if leader:
                    log.info("scheduler: this process holds the scheduler lock")
            if leader:
                counts = service.schedule_once()
                if any(counts.values()):
                    log.info("scheduler pass", extra=counts)
                if time.monotonic() >= next_prune:
                    from dispatcher.operations import Operations

                    pruned = Operations(service).prune(older_than_days=retention.attempts_days)
                    next_prune = time.monotonic() + retention.prune_interval_s
                    if pruned:
                        log.info("pruned old attempts", extra={"attempts": pruned,
                                                               "older_than_days": retention.attempts_days})
        except DBAPIError as exc:
            log.warning("scheduler: database unreachable (%s); trying again", type(exc.orig).__name__)
            if conn is not None:
                with contextlib.suppress(Exception):  # the connection is already broken
                    conn.close()
            conn, leader = None, False
        except Exception:
            log.exception("scheduler pass failed")
        stop.wait(interval)
    if conn is not None:
        conn.close()


def start_in_thread(service: Dispatcher, *,
                    interval_s: float | None = None) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=run_scheduler, args=(service, stop), kwargs={"interval_s": interval_s},
                              name="dispatcher-scheduler", daemon=True)
    thread.start()
    return thread, stop
