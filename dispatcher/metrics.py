"""Prometheus metrics: what the service counts as it works, and what the database says at scrape time.

Two kinds, kept apart because they come from different places:

* **process counters** (``dispatcher_*_total``, histograms), incremented by one-line hooks at the
  service's transition points (:func:`exchanged`, :func:`succeeded`, :func:`finished` ...). Each
  process counts its own work; Prometheus sums over instances.
* **database gauges** (:class:`DatabaseCollector`): intents by status, queue depth and age of the
  oldest open intent per target, paused targets, heartbeat ages. Computed at scrape time with a few
  cheap GROUP BY queries and cached for ``ttl_s``, served by the API (``/metrics``) and the
  scheduler. Every instance reports the same values: aggregate them with ``max``, never ``sum``.

Where they are served: the API on ``/metrics``; the scheduler and each worker on
``DISPATCHER_METRICS_PORT`` when set. A prefork worker's tasks run in child processes, each with
its own counters, so there the worker switches prometheus-client to its multiprocess mode (the
children write to files in a directory; the parent serves their sum, see :func:`use_multiprocess`).
A threads or solo worker is one process and serves its own registry.

Every process-local metric has labels, so no value exists before first use: that is what lets the
multiprocess switch happen after this module was imported (values are created in the process that
counts them, by then in multiprocess mode).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from dispatcher.domain import Status
from dispatcher.health import STALE_AFTER_S, Liveness

if TYPE_CHECKING:
    from dispatcher.config import TargetConfig
    from dispatcher.domain import IntentView
    from dispatcher.providers.base import Outcome, RawResponse
    from dispatcher.store.repo import Store

log = logging.getLogger(__name__)

ERROR_CODE_MAX = 64

# -- process counters ------------------------------------------------------------------------------

INTENTS_ACCEPTED = Counter(
    "dispatcher_intents_accepted", "Intents stored at intake (replays not counted), by source.", ["source", "target"])
INTENTS_FINISHED = Counter(
    "dispatcher_intents_finished", "Intents that reached a terminal status, by status and last error code.",
    ["target", "status", "error_code"])
ATTEMPTS = Counter(
    "dispatcher_attempts",
    "HTTP exchanges with a provider, by operation, status class (2xx..5xx, network), verdict and error code.",
    ["target", "op", "status_class", "verdict", "error_code"])
ATTEMPT_SECONDS = Histogram(
    "dispatcher_attempt_duration_seconds", "Duration of one HTTP exchange with a provider.", ["target", "op"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
RATE_LIMITED = Counter("dispatcher_rate_limited", "429 answers from a provider.", ["target"])
RATE_LIMIT_WAIT = Counter(
    "dispatcher_rate_limit_wait_seconds",
    "Seconds intents were told to wait for a rate limit: the shared limiter's budget (source=limiter) or a "
    "429's Retry-After (source=retry_after).", ["target", "source"])
WAITS = Counter(
    "dispatcher_waits", "Times an intent was put back to wait, by reason (rate_limit, retry, paused, other).",
    ["target", "reason"])
ACCEPT_TO_TICKET = Histogram(
    "dispatcher_accept_to_ticket_seconds", "From intake to the provider's ticket existing.", ["target"],
    buckets=(0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0))
POLLS = Counter(
    "dispatcher_polls", "NocWorx task polls, by verdict (poll = still pending, done, final, retry, pause).",
    ["target", "verdict"])
TASK_RESOLUTION = Histogram(
    "dispatcher_task_resolution_seconds", "From a provider task's acceptance (202) to its resolution.",
    ["target", "outcome"], buckets=(1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0))
TARGET_PAUSES = Counter(
    "dispatcher_target_pauses", "Times a target was paused because the provider refused its credentials.",
    ["target", "error_code"])
RECONCILIATIONS = Counter(
    "dispatcher_reconciliations",
    "Look-ups for the ticket of a create whose answer was lost, by result (found, absent, deferred).",
    ["target", "result"])
REDELIVERIES = Counter(
    "dispatcher_redeliveries",
    "Queue messages that found their intent not due or held by another worker (redelivered or duplicate; "
    "nothing was done).", ["task"])
SCHEDULER_ACTIONS = Counter(
    "dispatcher_scheduler_actions",
    "What the scheduler did: recovered (expired leases), enqueued (due intents whose message may be lost), "
    "polls (due task polls).", ["action"])

PROCESS_METRICS = (INTENTS_ACCEPTED, INTENTS_FINISHED, ATTEMPTS, ATTEMPT_SECONDS, RATE_LIMITED, RATE_LIMIT_WAIT,
                   WAITS, ACCEPT_TO_TICKET, POLLS, TASK_RESOLUTION, TARGET_PAUSES, RECONCILIATIONS, REDELIVERIES,
                   SCHEDULER_ACTIONS)


def _code(code: str | None) -> str:
    return (code or "")[:ERROR_CODE_MAX]


def status_class(status: int | None) -> str:
    return "network" if status is None else f"{status // 100}xx"


# -- hooks (one line each in dispatcher.service) ------------------------------------------------------

def accepted(source: str, target: str, count: int = 1) -> None:
    if count:
        INTENTS_ACCEPTED.labels(source, target).inc(count)


def accepted_many(source: str, targets: Iterable[str]) -> None:
    """A batch: ``targets`` holds one name per intent stored."""
    counts: dict[str, int] = {}
    for target in targets:
        counts[target] = counts.get(target, 0) + 1
    for target, count in counts.items():
        accepted(source, target, count)


def exchanged(target: str, op: str, raw: RawResponse, outcome: Outcome) -> None:
    """One HTTP exchange: its outcome, duration, a 429's Retry-After, and polls."""
    ATTEMPTS.labels(target, str(op), status_class(raw.status), outcome.verdict.value, _code(outcome.error_code)).inc()
    ATTEMPT_SECONDS.labels(target, str(op)).observe(max(0.0, raw.duration_ms) / 1000.0)
    if raw.status == 429:
        RATE_LIMITED.labels(target).inc()
        if outcome.retry_after:
            RATE_LIMIT_WAIT.labels(target, "retry_after").inc(outcome.retry_after)
    if str(op) == "poll":
        POLLS.labels(target, outcome.verdict.value).inc()


def wait_reason(reason: str, counted: bool) -> str:
    """``retry`` (a counted attempt failed), ``rate_limit`` (the shared limiter said wait), ``paused``, or ``other``
    (e.g. a group reply waiting for its ticket), from the reason the service gives."""
    if counted:
        return "retry"
    text = reason.casefold()
    return "rate_limit" if "rate limit" in text else ("paused" if "paused" in text else "other")


def waited(target: str, wait_s: float, reason: str, *, counted: bool) -> None:
    """An intent put back to wait ``wait_s`` seconds."""
    kind = wait_reason(reason, counted)
    WAITS.labels(target, kind).inc()
    if kind == "rate_limit":
        RATE_LIMIT_WAIT.labels(target, "limiter").inc(max(0.0, wait_s))


def _task_started(intent: IntentView, target: TargetConfig | None) -> datetime | None:
    if intent.status is not Status.polling or intent.poll_deadline is None or target is None:
        return None
    return intent.poll_deadline - timedelta(seconds=target.poll_deadline_s)


def succeeded(intent: IntentView, target: TargetConfig | None, now: datetime) -> None:
    INTENTS_FINISHED.labels(intent.target, Status.succeeded.value, "").inc()
    ACCEPT_TO_TICKET.labels(intent.target).observe(max(0.0, (now - intent.created_at).total_seconds()))
    started = _task_started(intent, target)
    if started is not None:
        TASK_RESOLUTION.labels(intent.target, Status.succeeded.value).observe(max(0.0, (now - started).total_seconds()))


def finished(intent: IntentView, status: str, error_code: str | None, now: datetime,
             target: TargetConfig | None = None) -> None:
    """A terminal status other than success (failed, cancelled)."""
    INTENTS_FINISHED.labels(intent.target, str(status), _code(error_code)).inc()
    started = _task_started(intent, target)
    if started is not None:
        TASK_RESOLUTION.labels(intent.target, str(status)).observe(max(0.0, (now - started).total_seconds()))


def paused(target: str, error_code: str | None) -> None:
    TARGET_PAUSES.labels(target, _code(error_code) or "unauthorized").inc()


def reconciled(target: str, found: bool | None) -> None:
    RECONCILIATIONS.labels(target, "found" if found else ("absent" if found is False else "deferred")).inc()


def redelivered(task: str) -> None:
    REDELIVERIES.labels(task).inc()


def scheduled(counts: Mapping[str, int]) -> None:
    for action, count in counts.items():
        if count:
            SCHEDULER_ACTIONS.labels(action).inc(count)


# -- database gauges -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Snapshot:
    up: bool
    statuses: dict[tuple[str, str], int] = field(default_factory=dict)
    queues: dict[str, dict[str, Any]] = field(default_factory=dict)
    paused: frozenset[str] = frozenset()
    liveness: Liveness | None = None


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _families() -> dict[str, GaugeMetricFamily]:
    return {
        "up": _gauge("dispatcher_database_up", "1 when the last metrics query reached the database."),
        "intents": _gauge("dispatcher_intents", "Intents in the database, by target and status.", ["target", "status"]),
        "depth": _gauge("dispatcher_queue_depth", "Intents not yet terminal (queued, sending, waiting, polling).",
                        ["target"]),
        "oldest": _gauge("dispatcher_oldest_intent_age_seconds", "Age of the oldest intent not yet terminal (0: none).",
                         ["target"]),
        "paused": _gauge("dispatcher_target_paused", "1 when the target is paused (credentials refused, or by hand).",
                         ["target"]),
        "worker_age": _gauge("dispatcher_worker_heartbeat_age_seconds",
                             "Age of the freshest worker heartbeat (+Inf: no worker has a heartbeat)."),
        "workers": _gauge("dispatcher_workers_alive", "Workers whose heartbeat is fresh."),
        "scheduler_age": _gauge("dispatcher_scheduler_heartbeat_age_seconds",
                                "Age of the lock-holding scheduler's heartbeat (+Inf: none)."),
    }


class DatabaseCollector:
    """Gauges read from the database at scrape time, cached for ``ttl_s`` (a scrape costs four queries).

    A database that cannot be reached gives ``dispatcher_database_up 0`` and none of the other
    gauges: the scrape itself still succeeds.
    """

    def __init__(self, store: Store, targets: Iterable[str], *, ttl_s: float = 5.0,
                 clock: Callable[[], datetime] | None = None, stale_after_s: float = STALE_AFTER_S) -> None:
        self.store = store
        self.targets = sorted(targets)
        self.ttl_s = ttl_s
        self.clock = clock or (lambda: datetime.now(UTC))
        self.stale_after_s = stale_after_s
        self._lock = threading.Lock()
        self._cached: tuple[float, _Snapshot] | None = None

    def describe(self) -> list[Metric]:
        return list(_families().values())

    def snapshot(self) -> _Snapshot:
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self.ttl_s:
                return self._cached[1]
            now = self.clock()
            try:
                snap = _Snapshot(up=True, statuses=self.store.status_counts(), queues=self.store.queue_stats(now),
                                 paused=frozenset(self.store.paused_targets()),
                                 liveness=self.store.liveness(now, stale_after_s=self.stale_after_s))
            except Exception as exc:
                log.warning("metrics: database unreachable (%s)", type(exc).__name__)
                snap = _Snapshot(up=False)
            self._cached = (time.monotonic(), snap)
            return snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        fams = _families()
        fams["up"].add_metric([], 1.0 if snap.up else 0.0)
        if not snap.up:
            yield fams["up"]
            return
        targets = sorted({*self.targets, *(t for t, _ in snap.statuses), *snap.queues, *snap.paused})
        for target in targets:
            for status in Status:
                fams["intents"].add_metric([target, status.value], float(snap.statuses.get((target, status.value), 0)))
            queue = snap.queues.get(target, {})
            fams["depth"].add_metric([target], float(queue.get("open", 0)))
            fams["oldest"].add_metric([target], float(queue.get("oldest_age_s") or 0.0))
            fams["paused"].add_metric([target], 1.0 if target in snap.paused else 0.0)
        live = snap.liveness
        assert live is not None
        worker_age, scheduler_age = live.worker_age_s, live.scheduler_age_s
        fams["worker_age"].add_metric([], math.inf if worker_age is None else worker_age)
        fams["workers"].add_metric([], float(len(live.fresh_workers)))
        fams["scheduler_age"].add_metric([], math.inf if scheduler_age is None else scheduler_age)
        yield from fams.values()


# -- serving ---------------------------------------------------------------------------------------

class _Forward:
    """Another registry's metrics, inside a registry of our own (no describe: no name clashes)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return self.source.collect()  # type: ignore[no-any-return]


def registry(database: DatabaseCollector | None = None) -> CollectorRegistry:
    """What this process serves: its counters (or, in multiprocess mode, its children's), and the gauges."""
    reg = CollectorRegistry()
    if multiprocess_dir() is not None:
        MultiProcessCollector(reg, path=str(multiprocess_dir()))  # type: ignore[no-untyped-call]
    else:
        reg.register(_Forward(REGISTRY))
    if database is not None:
        reg.register(database)
    return reg


def serve(port: int, host: str, reg: CollectorRegistry) -> Any:
    """Serve ``reg`` on http://host:port/ from a daemon thread; returns the server (``shutdown()``)."""
    server, _thread = start_http_server(port, addr=host, registry=reg)
    log.info("metrics served", extra={"url": f"http://{host}:{port}/metrics"})
    return server


_multiprocess: dict[str, Path] = {}


def multiprocess_dir() -> Path | None:
    return _multiprocess.get("dir")


def use_multiprocess(directory: Path | None = None) -> Path:
    """Count in files under ``directory`` (a fresh temporary one by default) so that a parent can
    serve what its forked children counted. Call in the parent before it forks.

    prometheus-client reads ``PROMETHEUS_MULTIPROC_DIR`` when a value is created, and chooses its
    value class when first imported; both are set here, so the order of imports does not matter.
    Files left by an earlier run of the same directory are removed: counters restart with the process.
    """
    path = directory or Path(tempfile.mkdtemp(prefix="dispatcher-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _multiprocess["dir"] = path
    return path


def exported_names() -> set[str]:
    """Every sample name this service can export (for checking dashboards and alert rules)."""
    names: set[str] = set()
    families: list[Metric] = [f for m in PROCESS_METRICS for f in m.describe()]
    families += list(_families().values())
    for fam in families:
        if fam.type == "counter":
            names |= {fam.name + "_total", fam.name + "_created"}
        elif fam.type == "histogram":
            names |= {fam.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(fam.name)
    return names


__all__ = ["DatabaseCollector", "exported_names", "registry", "serve", "use_multiprocess"]
