"""The task queue port: Celery over Redis in production, an in-process twin for the embedded default.

A message carries only a task name and an intent id; Postgres holds everything else, so a lost
message costs only time (the scheduler re-enqueues what is due).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

DISPATCH = "dispatch"
POLL = "poll"


class EnqueueFailed(Exception):
    """The broker did not take the message; the scheduler will re-enqueue from the database."""

    def __init__(self, message: str, *, expected: bool = False) -> None:
        super().__init__(message)
        self.expected = expected  # a deliberate hand-over to the scheduler, not a fault


class TaskQueue(Protocol):
    def enqueue(self, task: str, intent_id: uuid.UUID, *, target: str, countdown: float = 0.0) -> None:
        """Publish ``task(intent_id)`` on the target's queue; raise :class:`EnqueueFailed` if it could not."""

    def enqueue_many(self, task: str, items: list[tuple[uuid.UUID, str]]) -> None:
        """Publish many at once (batch intake)."""


class HandOverQueue:
    """No broker, and no in-process workers here (the CLI, a producer): stored intents are left to
    the scheduler of a running ``dispatcher run``, which publishes what was never enqueued."""

    def enqueue(self, *_: object, **__: object) -> None:
        raise EnqueueFailed("no broker: the scheduler of `dispatcher run` picks it up", expected=True)

    def enqueue_many(self, *_: object, **__: object) -> None:
        raise EnqueueFailed("no broker: the scheduler of `dispatcher run` picks them up", expected=True)


class InProcessQueue:
    """Threads and a timer heap: the embedded default's broker. Lost on exit, like a flushed Redis."""

    def __init__(self, handler: Callable[[str, uuid.UUID], None], *, threads: int = 4) -> None:
        self._handler = handler
        self._heap: list[tuple[float, int, str, uuid.UUID]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = 0
        self._threads = [threading.Thread(target=self._run, name=f"dispatcher-worker-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def enqueue(self, task: str, intent_id: uuid.UUID, *, target: str, countdown: float = 0.0) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, countdown), next(self._seq), task, intent_id))
            self._cond.notify()

    def enqueue_many(self, task: str, items: list[tuple[uuid.UUID, str]]) -> None:
        for intent_id, target in items:
            self.enqueue(task, intent_id, target=target)

    def idle(self) -> bool:
        """Nothing queued that is due and nothing running (used by the demo to know when to look)."""
        with self._cond:
            return self._busy == 0 and (not self._heap or self._heap[0][0] > time.monotonic())

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._heap or self._heap[0][0] > time.monotonic()):
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout=wait)
                if self._stopping:
                    return
                _, _, task, intent_id = heapq.heappop(self._heap)
                self._busy += 1
            try:
                self._handler(task, intent_id)
            except Exception:
                log.exception("task %s(%s) failed; the scheduler will pick it up again", task, intent_id)
            finally:
                with self._cond:
                    self._busy -= 1
