"""The baselines of ``bench/ratelimit.py``: plain Celery tasks that POST a HostUp create with httpx.

Two ways people usually write it, both against the simulator, no Postgres:

- ``bench.create_rate_limited``: Celery's built-in ``rate_limit`` set to the provider's limit. It
  is enforced per worker process, so W workers send W times the limit. A 429 is retried after
  the Retry-After that answer carried (this task only; the others do not know).
- ``bench.create_backoff``: no limit; a 429 is retried with Celery's ``retry_backoff``
  (exponential, full jitter), ignoring Retry-After.

Configured from the environment (set by the benchmark): ``BENCH_BROKER_URL``, ``BENCH_HOSTUP_URL``,
``BENCH_HOSTUP_KEY``, ``BENCH_RATE_LIMIT`` (Celery's syntax, e.g. ``20/s``).
Run: ``celery -A bench.celery_baseline worker --pool threads -c 4 -Q bench``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import httpx
from celery import Celery

app = Celery("bench", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/15"), set_as_current=False)
# Celery's defaults for delivery (early ack, prefetch 4 per thread), as such tasks are usually run
app.conf.update(task_ignore_result=True, task_default_queue="bench", broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False, worker_enable_remote_control=False, worker_send_task_events=False)

_local = threading.local()


class RateLimitedError(Exception):
    """The provider answered 429."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"429, Retry-After {retry_after:g} s")
        self.retry_after = retry_after


def _client() -> httpx.Client:
    client: httpx.Client | None = getattr(_local, "client", None)
    if client is None:
        client = httpx.Client(base_url=os.environ["BENCH_HOSTUP_URL"], timeout=10,
                              headers={"Authorization": f"Bearer {os.environ['BENCH_HOSTUP_KEY']}",
                                       "User-Agent": "dispatcher-bench/1"})
        _local.client = client
    return client


def create(subject: str, body: str) -> None:
    """One HostUp create; raises :class:`RateLimitedError` on a 429."""
    response = _client().post("/support/tickets", json={"departmentSlug": "vps", "subject": subject,
                                                         "message": body, "priority": "medium"})
    if response.status_code == 429:
        try:
            wait = float(response.headers.get("retry-after", "1"))
        except ValueError:
            wait = 1.0
        raise RateLimitedError(wait)
    response.raise_for_status()


@app.task(name="bench.create_rate_limited", bind=True, max_retries=None,  # type: ignore[untyped-decorator]
          rate_limit=os.environ.get("BENCH_RATE_LIMIT", "20/s"))
def create_rate_limited(self: Any, subject: str, body: str) -> None:
    try:
        create(subject, body)
    except RateLimitedError as exc:
        raise self.retry(countdown=exc.retry_after, exc=exc) from exc


@app.task(name="bench.create_backoff", autoretry_for=(RateLimitedError,), retry_backoff=True,  # type: ignore[untyped-decorator]
          retry_backoff_max=60, retry_jitter=True, max_retries=None)
def create_backoff(subject: str, body: str) -> None:
    create(subject, body)
