"""Thin Celery tasks: an intent id in, the service does the rest.

The worker process builds its service once (after fork, so no connection is shared across
processes). A task that cannot reach the database raises, and the message is not acknowledged as
done: it is retried with a short countdown, and the scheduler re-enqueues whatever is still due.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy.exc import DBAPIError

from dispatcher.config import AppConfig
from dispatcher.runtime import Runtime, build_runtime
from dispatcher.worker.app import CeleryQueue, make_celery

log = logging.getLogger(__name__)

_state: dict[str, Any] = {}


def runtime() -> Runtime:
    if "runtime" not in _state:
        config: AppConfig = _state["config"]
        _state["runtime"] = build_runtime(config, queue=CeleryQueue(_state["app"]), migrate_sqlite=False)
    rt: Runtime = _state["runtime"]
    return rt


def _reset_after_fork(**_: Any) -> None:
    _state.pop("runtime", None)


def _close(**_: Any) -> None:
    rt = _state.pop("runtime", None)
    if rt is not None:
        rt.close()


def create_worker_app(config: AppConfig) -> Celery:
    """The Celery app with the dispatcher's tasks registered."""
    app = make_celery(config)
    _state["config"] = config
    _state["app"] = app
    worker_process_init.connect(_reset_after_fork, weak=False)
    worker_process_shutdown.connect(_close, weak=False)

    @app.task(name="dispatcher.dispatch", bind=True, acks_late=True, reject_on_worker_lost=True,  # type: ignore[untyped-decorator]
              max_retries=None)
    def dispatch(self: Any, intent_id: str) -> None:
        try:
            runtime().service.dispatch(uuid.UUID(intent_id))
        except DBAPIError as exc:
            log.warning("database unreachable while dispatching %s; retrying in 5 s", intent_id)
            raise self.retry(countdown=5, exc=exc) from exc

    @app.task(name="dispatcher.poll", bind=True, acks_late=True,  # type: ignore[untyped-decorator]
              reject_on_worker_lost=True, max_retries=None)
    def poll(self: Any, intent_id: str) -> None:
        try:
            runtime().service.poll(uuid.UUID(intent_id))
        except DBAPIError as exc:
            log.warning("database unreachable while polling %s; retrying in 5 s", intent_id)
            raise self.retry(countdown=5, exc=exc) from exc

    return app
