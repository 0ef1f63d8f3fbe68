"""Wiring: build the service for this process from the configuration (one place, so every entry
point — API, worker, scheduler, run, demo, tests — gets the same assembly)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import httpx

from dispatcher.config import AppConfig, TargetConfig
from dispatcher.domain import Provider
from dispatcher.providers.base import ProviderAdapter
from dispatcher.providers.hostup import HostUpAdapter
from dispatcher.providers.http import HttpTransport
from dispatcher.providers.nocworx import NocWorxAdapter
from dispatcher.queue import InProcessQueue, TaskQueue
from dispatcher.ratelimit import limiter_for
from dispatcher.service import INLINE_POLL_MAX_S, Dispatcher, Limiter
from dispatcher.store import db
from dispatcher.store.driver import driver_connections
from dispatcher.store.repo import Store

log = logging.getLogger(__name__)


#: Database connections of a worker process. The hot path's statements (claim, attempt record,
#: completion) have their own, kept in autocommit and reused last in, first out
#: (``store.driver.DriverConnections``): at most one per task running at once and at most
#: ``DISPATCHER_DB_CONNECTIONS`` (default 64; tasks past them wait for one), in practice those
#: busy at once. The pool is for everything else (a lease renewal, an early message's look-up, a
#: reconcile), which a task needs far less often: a quarter of that (at least 2) and
#: DB_POOL_OVERFLOW more in a burst. So a default worker (256 greenlets, or ``-c 64`` threads)
#: opens at most 64 + 16 + 5 = 85.
DB_POOL_OVERFLOW = 5


def transport_for(target: TargetConfig, connections: int = 100) -> HttpTransport:
    """``connections``: kept-alive connections to the target, one per thread that may send at once."""
    return HttpTransport(target.base_url, target.api_key.get_secret_value(),
                         timeout=httpx.Timeout(target.timeout_s, connect=target.connect_timeout_s),
                         limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


def adapter_for(target: TargetConfig) -> ProviderAdapter:
    if target.provider is Provider.hostup:
        return HostUpAdapter(ticket_url_template=target.ticket_url_template)
    return NocWorxAdapter(ticket_url_template=target.ticket_url_template)


@dataclass
class Runtime:
    """The assembled service and the things that must be closed with it."""

    config: AppConfig
    service: Dispatcher
    store: Store
    queue: Any
    closers: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception:
                log.exception("error while shutting down")


def build_runtime(config: AppConfig, *, queue: TaskQueue | None = None, limiter: Limiter | None = None,
                  worker: str | None = None, migrate_sqlite: bool = True, threads: int = 4,
                  rng: random.Random | None = None, concurrency: int | None = None, green: bool = False) -> Runtime:
    """Assemble a service. Without a broker the in-process queue is used and started here.

    ``concurrency``: the threads of a worker process that will call the service at once; sizes its
    database pool and HTTP connection pools, and drops the pool's pre-ping (see ``db.make_engine``).
    ``green``: they are greenlets, for which a short wait costs nothing: a NocWorx task's first look
    is taken in the task that submitted it (``INLINE_POLL_MAX_S``)."""
    url = config.settings.resolved_database_url()
    if migrate_sqlite and url.startswith("sqlite"):
        db.upgrade(url)
    if concurrency is None:
        engine = db.make_engine(url)
    else:
        # connections beyond the pool's size are closed when given back, and opening one costs more
        # than a whole dispatch; the hot path's statements have connections of their own
        hot_path = config.settings.db_connections
        engine = db.make_engine(url, pool_size=max(2, min(concurrency, hot_path) // 4), max_overflow=DB_POOL_OVERFLOW,
                                pre_ping=False)
        if concurrency > hot_path:  # more tasks than connections: the rest wait for one
            driver_connections(engine).limit(hot_path)
    connections = max(concurrency or 0, 100)
    store = Store(engine)
    holder: dict[str, Dispatcher] = {}
    in_process: InProcessQueue | None = None
    if queue is None:
        if config.settings.broker_url:
            from dispatcher.worker.app import CeleryQueue, make_celery

            queue = CeleryQueue(make_celery(config))
        else:
            in_process = InProcessQueue(lambda task, intent_id: run_task(holder["service"], task, intent_id),
                                        threads=threads)
            queue = in_process
    closers: list[Any] = [engine.dispose, driver_connections(engine).close]  # run last to first
    if limiter is None:  # the shared budget: Redis when there is one, else this process's memory
        shared = limiter_for(config)
        closers.append(shared.close)
        limiter = shared
    service = Dispatcher(config, store, queue, transport_for=lambda target: transport_for(target, connections),
                         adapter_for=adapter_for,
                         limiter=limiter, worker=worker or config.settings.worker_name, rng=rng)
    if green:
        service.inline_poll_max_s = INLINE_POLL_MAX_S
    holder["service"] = service
    runtime = Runtime(config=config, service=service, store=store, queue=queue, closers=closers)
    if in_process is not None:
        in_process.start()
        runtime.closers.append(in_process.stop)
    return runtime


def build_cli_runtime(config: AppConfig) -> Runtime:
    """A runtime for a short-lived command: Celery when a broker is configured, else a hand-over to
    the running scheduler (never in-process workers that would die with the command)."""
    from dispatcher.queue import HandOverQueue

    return build_runtime(config, queue=None if config.settings.broker_url else HandOverQueue())


def run_task(service: Dispatcher, task: str, intent_id: Any) -> None:
    from dispatcher.queue import DISPATCH

    if task == DISPATCH:
        service.dispatch(intent_id)
    else:
        service.poll(intent_id)
