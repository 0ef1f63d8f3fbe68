"""Thin Celery tasks: an intent id in, the service does the rest.

The worker process builds its service once (after fork, so no connection is shared across
processes). A task that cannot reach the database raises, and the message is not acknowledged as
done: it is retried with a short countdown, and the scheduler re-enqueues whatever is still due.

Operations: Celery leaves logging to :func:`dispatcher.logs.setup_logging` (its ``setup_logging``
signal has a receiver, so it configures nothing and redirects nothing); once the worker is ready,
its main process writes a heartbeat (see :mod:`dispatcher.health`) and, with
``DISPATCHER_METRICS_PORT``, serves its metrics (its prefork children's, summed: see
:mod:`dispatcher.metrics`).
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from celery import Celery
from celery import signals as celery_signals
from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy.exc import DBAPIError

from dispatcher.config import AppConfig
from dispatcher.green import GEVENT
from dispatcher.runtime import Runtime, build_runtime
from dispatcher.worker.app import (
    CeleryQueue,
    cold_shutdown_between_events,
    configure_pool,
    free_prefetch_slots_when_acks_fail,
    make_celery,
)

log = logging.getLogger(__name__)

_state: dict[str, Any] = {}


def runtime() -> Runtime:
    if "runtime" not in _state:
        config: AppConfig = _state["config"]
        pool: str = _state["pool"]
        # a threads or gevent pool's tasks share this process; a prefork child runs one
        concurrency = _state["concurrency"] if pool in ("threads", GEVENT) else 1
        _state["runtime"] = build_runtime(config, queue=CeleryQueue(_state["app"]), migrate_sqlite=False,
                                          worker=lease_holder(config), concurrency=concurrency, green=pool == GEVENT)
    rt: Runtime = _state["runtime"]
    return rt


def lease_holder(config: AppConfig) -> str:
    """This process's name on the leases it takes and the attempts it records.

    A prefork child adds its pid to the worker's name: the children of one worker are separate
    processes, and a child must never release (or finish) an intent whose lease another child holds
    now, as it could if they shared one name after its own lease had expired and been taken over.
    """
    name = config.settings.worker_name
    pid = os.getpid()
    return name if pid == _state.get("main_pid", pid) else f"{name}/{pid}"


def _reset_after_fork(**_: Any) -> None:
    _state.pop("runtime", None)


def _close(**_: Any) -> None:
    rt = _state.pop("runtime", None)
    if rt is not None:
        rt.close()


def _own_logging(**_: Any) -> None:
    """Celery's ``setup_logging`` signal: our JSON/text lines for Celery's loggers too."""
    from dispatcher import logs

    config: AppConfig = _state["config"]
    logs.setup_logging(config.settings.log_level, config.settings.log_format, config.secret_values())
    if logs.wants_json(config.settings.log_format):
        import celery.apps.worker

        if hasattr(celery.apps.worker, "safe_say"):  # its shutdown notices, as JSON lines on stderr too
            celery.apps.worker.safe_say = logs.say_json


def _settle(**_: Any) -> None:
    """Before the pool starts (and forks, for prefork): what start-up built out of the collector's
    sight, so a full collection does not stall every thread mid-send (see :mod:`dispatcher.heap`)."""
    from dispatcher.heap import settle_heap

    frozen = settle_heap()
    log.debug("startup heap frozen", extra={"objects": frozen})


def _on_ready(sender: Any = None, **_: Any) -> None:
    """The worker consumes: start its heartbeat and, if asked, its metrics endpoint (main process)."""
    import os
    import socket

    from dispatcher import metrics
    from dispatcher.health import WORKER, Heartbeat
    from dispatcher.store import db
    from dispatcher.store.repo import Store

    config: AppConfig = _state["config"]
    settings = config.settings
    cold_shutdown_between_events(sender)  # prefork: never in the middle of a child's message
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    try:  # what an operator wants to see in `/readyz` and `dispatcher check`; none of it is essential
        controller = sender.controller
        info["pool"] = type(controller.pool).__module__.rsplit(".", 1)[-1]
        info["concurrency"] = controller.concurrency
        info["queues"] = sorted(_state["app"].amqp.queues.consume_from)
    except Exception:  # noqa: S110 - a Celery version with other attribute names: report less
        pass
    # its own engine without a pool: no connection is held open for forked children to inherit
    store = Store(db.make_engine(settings.resolved_database_url(), pooled=False))
    _state["heartbeat"] = Heartbeat(store.beat, store.forget_heartbeat, WORKER, settings.worker_name,
                                    info=info).start()
    _state["heartbeat_engine"] = store.engine
    if settings.metrics_port:
        _state["metrics_server"] = metrics.serve(settings.metrics_port, settings.metrics_host, metrics.registry())
    log.info("worker ready", extra={"worker": settings.worker_name, **info, "metrics_port": settings.metrics_port})


def _on_shutdown(**_: Any) -> None:
    beat = _state.pop("heartbeat", None)
    if beat is not None:
        beat.stop()
    engine = _state.pop("heartbeat_engine", None)
    if engine is not None:
        engine.dispose()
    server = _state.pop("metrics_server", None)
    if server is not None:
        server.shutdown()


def create_worker_app(config: AppConfig, *, pool: str = "threads", concurrency: int = 1) -> Celery:
    """The Celery app with the dispatcher's tasks registered, set up for its pool (``configure_pool``).
    ``concurrency``: tasks at once; those of a threads or gevent pool share this process (and its
    runtime's connections), a prefork child runs one."""
    app = make_celery(config)
    configure_pool(app, pool, concurrency)
    _state["pool"] = pool
    _state["concurrency"] = concurrency
    free_prefetch_slots_when_acks_fail()
    _state["config"] = config
    _state["app"] = app
    _state["main_pid"] = os.getpid()
    worker_process_init.connect(_reset_after_fork, weak=False)
    worker_process_shutdown.connect(_close, weak=False)
    celery_signals.setup_logging.connect(_own_logging, weak=False)
    celery_signals.worker_init.connect(_settle, weak=False)
    celery_signals.worker_ready.connect(_on_ready, weak=False)
    celery_signals.worker_shutdown.connect(_on_shutdown, weak=False)

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
