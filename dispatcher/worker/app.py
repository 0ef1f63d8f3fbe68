"""The Celery app (Redis broker) and the queue adapter that publishes to it.

Settings follow design.md §4: late acks and reject-on-worker-lost so a killed worker's message is
delivered again; prefetch 1 so a busy worker hoards nothing; countdowns kept far below the
visibility timeout (long waits live in Postgres). One queue per target, so a throttled target does
not hold back the others.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

from dispatcher.config import AppConfig
from dispatcher.queue import EnqueueFailed

log = logging.getLogger(__name__)

TASK_NAMES = {"dispatch": "dispatcher.dispatch", "poll": "dispatcher.poll"}
VISIBILITY_TIMEOUT_S = 3600


def queue_name(target: str) -> str:
    return f"dispatcher.{target}"


def _queues(config: AppConfig) -> list[Any]:
    names = [queue_name(name) for name in sorted(config.targets)] or ["dispatcher.default"]
    return [Queue(name) for name in names]  # type: ignore[no-untyped-call]


def make_celery(config: AppConfig) -> Celery:
    broker = config.settings.broker_url
    app = Celery("dispatcher", broker=broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                   "interval_max": 0.5},
        task_queues=_queues(config),
        task_default_queue="dispatcher.default",
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )
    return app


class CeleryQueue:
    """Publishes ``dispatcher.dispatch`` / ``dispatcher.poll`` with an intent id on the target's queue."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def enqueue(self, task: str, intent_id: uuid.UUID, *, target: str, countdown: float = 0.0) -> None:
        options: dict[str, Any] = {"queue": queue_name(target)}
        if countdown > 0:
            options["countdown"] = countdown
        try:
            self.app.send_task(TASK_NAMES[task], args=[str(intent_id)], **options)
        except Exception as exc:  # kombu raises OperationalError and friends when Redis is down
            raise EnqueueFailed(f"{type(exc).__name__}: {exc}") from exc

    def enqueue_many(self, task: str, items: list[tuple[uuid.UUID, str]]) -> None:
        failed: Exception | None = None
        with self.app.producer_or_acquire() as producer:
            for intent_id, target in items:
                try:
                    self.app.send_task(TASK_NAMES[task], args=[str(intent_id)], queue=queue_name(target),
                                       producer=producer)
                except Exception as exc:
                    failed = exc
                    break
        if failed is not None:
            raise EnqueueFailed(f"{type(failed).__name__}: {failed}") from failed
