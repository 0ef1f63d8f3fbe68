"""The baseline of ``bench/e2e.py``: the least a Celery task can do to file a ticket.

``bench.e2e_create`` POSTs the same create the dispatcher sends (HostUp ``POST /support/tickets``,
NocWorx ``POST /v1/ticket``) with httpx and writes one row with the answer to PostgreSQL. No
routing, no department list, no rate limiter, no attempt record, no lease, no polling of the
NocWorx task, Celery's default early acknowledgement: what a first version usually looks like.
It is a floor, not a competitor: the dispatcher does more per ticket, and the ratio says how much
that costs.

Configured from the environment (set by the benchmark): ``BENCH_BROKER_URL``,
``BENCH_DATABASE_URL``, ``BENCH_SIM_URL`` (the simulator's root), ``BENCH_HOSTUP_KEY``,
``BENCH_NOCWORX_KEY``, ``BENCH_CONNECTIONS`` (httpx pool size; the worker's concurrency).
Run: ``celery -A bench.e2e_baseline worker --pool threads -c 64 -Q bench``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
from celery import Celery

app = Celery("bench", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/15"), set_as_current=False)
app.conf.update(task_ignore_result=True, task_default_queue="bench", broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False, worker_enable_remote_control=False, worker_send_task_events=False)

TABLE = """CREATE TABLE IF NOT EXISTS bench_ticket (
    id bigserial PRIMARY KEY, provider text NOT NULL, status integer NOT NULL, answer text NOT NULL,
    published_at double precision NOT NULL, finished_at double precision NOT NULL)"""

_local = threading.local()
_clients: dict[str, httpx.Client] = {}
_clients_lock = threading.Lock()


def _client(provider: str) -> httpx.Client:
    """One client per provider shared by all threads (httpx clients are thread-safe), as ours are."""
    with _clients_lock:
        if provider not in _clients:
            size = int(os.environ.get("BENCH_CONNECTIONS", "100"))
            base = os.environ["BENCH_SIM_URL"] + ("/api/v2" if provider == "hostup" else "")
            key = os.environ["BENCH_HOSTUP_KEY" if provider == "hostup" else "BENCH_NOCWORX_KEY"]
            _clients[provider] = httpx.Client(
                base_url=base, timeout=10, limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
                headers={"Authorization": f"Bearer {key}", "User-Agent": "dispatcher-bench/1"})
        return _clients[provider]


_idle: list[psycopg.Connection[Any]] = []  # last in, first out; append and pop are atomic


@contextlib.contextmanager
def _connection() -> Iterator[psycopg.Connection[Any]]:
    """A connection of the process's own, in autocommit: one per task running at once (a thread or
    a greenlet: Celery's gevent pool runs each task in a new one, so not one per greenlet)."""
    try:
        conn = _idle.pop()
    except IndexError:
        conn = psycopg.connect(os.environ["BENCH_DATABASE_URL"], autocommit=True)
    try:
        yield conn
    finally:
        _idle.append(conn)


@app.task(name="bench.e2e_create")  # type: ignore[untyped-decorator]
def e2e_create(provider: str, subject: str, body: str, published_at: float) -> None:
    if provider == "hostup":
        response = _client(provider).post("/support/tickets", json={
            "departmentSlug": "vps", "subject": subject, "message": body, "priority": "medium"})
    else:
        response = _client(provider).post("/v1/ticket", json={
            "department": "support", "subject": subject, "comment": body})
    response.raise_for_status()
    with _connection() as conn:
        conn.execute("INSERT INTO bench_ticket (provider, status, answer, published_at, finished_at) "
                     "VALUES (%s, %s, %s, %s, %s)",
                     (provider, response.status_code, response.text, published_at, time.time()))
