"""The scheduler: re-enqueue what is due (backoff waits, lost messages) and recover lost workers.

Run one. A Postgres advisory lock keeps a second one on standby; even without it, every step is a
conditional update with ``SKIP LOCKED``, so two at once do no harm.

The loop writes the scheduler's heartbeat (``leader`` tells whether it holds the lock) every
:data:`~dispatcher.health.HEARTBEAT_INTERVAL_S`, from the loop itself so that a stuck loop goes
stale, and the leader deletes heartbeats of processes gone for a day.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from datetime import timedelta

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from dispatcher import metrics
from dispatcher.health import FORGET_AFTER_S, HEARTBEAT_INTERVAL_S, SCHEDULER
from dispatcher.service import Dispatcher

log = logging.getLogger(__name__)

LOCK_KEY = 0x64697370  # "disp"


def try_lock(conn: Connection | None) -> bool:
    if conn is None:
        return True
    got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar())
    conn.commit()
    return got


def _beat(service: Dispatcher, name: str, leader: bool) -> None:
    now = service.clock()
    service.store.beat(SCHEDULER, name, now, {"leader": leader, "host": socket.gethostname(), "pid": os.getpid()})
    if leader:
        service.store.prune_heartbeats(now - timedelta(seconds=FORGET_AFTER_S))


def run_scheduler(service: Dispatcher, stop: threading.Event, *, interval_s: float | None = None) -> None:
    """Loop until ``stop`` is set. Survives database outages (logs and tries again)."""
    interval = interval_s or service.config.scheduler.interval_s
    retention = service.config.retention
    next_prune = time.monotonic()
    leader = False
    conn: Connection | None = None
    name, last_beat = service.config.settings.worker_name, -HEARTBEAT_INTERVAL_S
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
                metrics.scheduled(counts)
                if any(counts.values()):
                    log.info("scheduler pass", extra=counts)
                if time.monotonic() >= next_prune:
                    from dispatcher.operations import Operations

                    pruned = Operations(service).prune(older_than_days=retention.attempts_days)
                    next_prune = time.monotonic() + retention.prune_interval_s
                    if pruned:
                        log.info("pruned old attempts", extra={"attempts": pruned,
                                                               "older_than_days": retention.attempts_days})
            if time.monotonic() - last_beat >= HEARTBEAT_INTERVAL_S:
                _beat(service, name, leader)
                last_beat = time.monotonic()
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
    with contextlib.suppress(Exception):  # a clean stop is not a dead scheduler
        service.store.forget_heartbeat(SCHEDULER, name)


def start_in_thread(service: Dispatcher, *,
                    interval_s: float | None = None) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=run_scheduler, args=(service, stop), kwargs={"interval_s": interval_s},
                              name="dispatcher-scheduler", daemon=True)
    thread.start()
    return thread, stop
