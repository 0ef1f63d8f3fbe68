"""The Celery app a worker of tests/acceptance/test_gevent_shutdown.py runs: the dispatcher's settings
for the gevent pool (``configure_pool``) and one task that records in Redis when it starts and when
it ends, ending on 100 ms boundaries (as greenlets woken by one event end together)."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready

from dispatcher.green import GEVENT
from dispatcher.worker.app import configure_pool

BROKER = os.environ.get("SHUTDOWN_TEST_BROKER", "redis://127.0.0.1:6379/15")
QUEUE = "shutdown.q"
TASK = "shutdown.work"
GREENLETS = 2

app = Celery("shutdown", broker=BROKER, set_as_current=False)
app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True, task_ignore_result=True,
                task_default_queue=QUEUE, worker_hijack_root_logger=False, worker_enable_remote_control=False,
                worker_send_task_events=False, broker_connection_retry_on_startup=True,
                broker_transport_options={"visibility_timeout": 3600})
configure_pool(app, GEVENT, GREENLETS)
_redis = redis.Redis.from_url(BROKER)


def _next_boundary() -> float:
    return 0.1 - time.time() % 0.1


@app.task(name=TASK, bind=True, acks_late=True)  # type: ignore[untyped-decorator]
def work(self: Any) -> None:
    import gevent

    _redis.sadd("test:started", self.request.id)
    gevent.sleep(_next_boundary())
    gevent.sleep(_next_boundary() + 0.1)
    _redis.sadd("test:ran", self.request.id)


@worker_ready.connect
def _ready(**_: Any) -> None:
    _redis.set("test:ready", "1")
