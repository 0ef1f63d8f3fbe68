"""Heartbeats: is each worker and the scheduler alive? Postgres is where the answer lives.

Every worker process (its Celery main process) and the scheduler write a row in ``heartbeats``
every :data:`HEARTBEAT_INTERVAL_S`; a row not refreshed for :data:`STALE_AFTER_S` is stale. A
clean shutdown deletes its row, so a stale row means a process that died (or lost the database).
Postgres rather than Redis keys with a TTL because it is the source of truth the API, the CLI and
``/readyz`` already read, and a worker that cannot reach the database cannot work either.

This module is pure apart from :class:`Heartbeat`, which writes through a callable it is given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

#: how often a process writes its heartbeat
HEARTBEAT_INTERVAL_S = 5.0
#: a heartbeat older than this is stale: its process is presumed dead or cut off
STALE_AFTER_S = 30.0
#: rows this old are deleted by the scheduler (crashed processes never delete their own)
FORGET_AFTER_S = 86_400.0

WORKER = "worker"
SCHEDULER = "scheduler"


@dataclass(frozen=True)
class HeartbeatView:
    """One process's last sign of life."""

    component: str
    name: str
    started_at: datetime
    seen_at: datetime
    info: Mapping[str, Any] = field(default_factory=dict)

    def age_s(self, now: datetime) -> float:
        return max(0.0, (now - self.seen_at).total_seconds())

    @property
    def leader(self) -> bool:
        """For a scheduler: whether it held the scheduler lock (a standby one does no work)."""
        return bool(self.info.get("leader", True))


@dataclass(frozen=True)
class Liveness:
    """The heartbeats summed up: what ``/readyz``, the metrics and ``dispatcher check`` report."""

    now: datetime
    stale_after_s: float
    schedulers: tuple[HeartbeatView, ...]
    workers: tuple[HeartbeatView, ...]

    @property
    def scheduler(self) -> HeartbeatView | None:
        """The freshest heartbeat of a scheduler that holds the lock (standbys do not count)."""
        leaders = [b for b in self.schedulers if b.leader]
        return max(leaders, key=lambda b: b.seen_at, default=None)

    @property
    def scheduler_age_s(self) -> float | None:
        beat = self.scheduler
        return None if beat is None else beat.age_s(self.now)

    @property
    def scheduler_ok(self) -> bool:
        age = self.scheduler_age_s
        return age is not None and age <= self.stale_after_s

    @property
    def fresh_workers(self) -> tuple[HeartbeatView, ...]:
        return tuple(b for b in self.workers if b.age_s(self.now) <= self.stale_after_s)

    @property
    def worker_age_s(self) -> float | None:
        """Age of the freshest worker heartbeat: large means no worker is alive."""
        freshest = max(self.workers, key=lambda b: b.seen_at, default=None)
        return None if freshest is None else freshest.age_s(self.now)

    @property
    def workers_ok(self) -> bool:
        return bool(self.fresh_workers)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (``/readyz``'s ``components``, ``dispatcher check --json``)."""

        def state(ok: bool, age: float | None) -> str:
            return "ok" if ok else ("missing" if age is None else "stale")

        sched = self.scheduler
        return {
            "scheduler": {"status": state(self.scheduler_ok, self.scheduler_age_s),
                          "name": sched.name if sched else None,
                          "age_s": _round(self.scheduler_age_s),
                          "standby": sum(1 for b in self.schedulers if not b.leader)},
            "workers": {"status": state(self.workers_ok, self.worker_age_s),
                        "alive": len(self.fresh_workers), "stale": len(self.workers) - len(self.fresh_workers),
                        "freshest_age_s": _round(self.worker_age_s),
                        "names": sorted(b.name for b in self.fresh_workers)},
            "stale_after_s": self.stale_after_s,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def liveness(beats: Iterable[HeartbeatView], now: datetime, *, stale_after_s: float = STALE_AFTER_S) -> Liveness:
    beats = list(beats)
    return Liveness(now=now, stale_after_s=stale_after_s,
                    schedulers=tuple(b for b in beats if b.component == SCHEDULER),
                    workers=tuple(b for b in beats if b.component == WORKER))


def utcnow() -> datetime:
    return datetime.now(UTC)


#: ``beat(component, name, now, info)`` writes one heartbeat; ``forget(component, name)`` deletes it
Beat = Callable[[str, str, datetime, Mapping[str, Any]], None]
Forget = Callable[[str, str], None]


class Heartbeat:
    """Writes one process's heartbeat every ``interval_s`` from a daemon thread; ``stop`` deletes it.

    A failed write (database down) is logged and tried again next time: the heartbeat then goes
    stale, which is the truth — this process cannot work without the database either.
    """

    def __init__(self, beat: Beat, forget: Forget, component: str, name: str, *,
                 info: Mapping[str, Any] | None = None, interval_s: float = HEARTBEAT_INTERVAL_S,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._beat, self._forget = beat, forget
        self.component, self.name = component, name
        self.info = dict(info or {})
        self.interval_s = interval_s
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def beat_once(self) -> bool:
        try:
            self._beat(self.component, self.name, self.clock(), self.info)
        except Exception as exc:
            if not self._failing:  # say it once per outage, not every interval
                log.warning("heartbeat not written: %s", type(exc).__name__,
                            extra={"component": self.component, "worker": self.name})
            self._failing = True
            return False
        if self._failing:
            log.info("heartbeat written again", extra={"component": self.component, "worker": self.name})
        self._failing = False
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat_once()
            self._stop.wait(self.interval_s)

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name=f"dispatcher-heartbeat-{self.component}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and delete the row: a clean stop is not a dead process."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
        try:
            self._forget(self.component, self.name)
        except Exception as exc:
            log.warning("heartbeat not removed: %s", type(exc).__name__,
                        extra={"component": self.component, "worker": self.name})


__all__ = ["FORGET_AFTER_S", "HEARTBEAT_INTERVAL_S", "SCHEDULER", "STALE_AFTER_S", "WORKER", "Heartbeat",
           "HeartbeatView", "Liveness", "liveness"]
