"""dispatcher: file support tickets into hosting providers' APIs from queued intents.

The Python producer API::

    import dispatcher

    intent = dispatcher.submit({"target": "hostup", "topic": "vps", "subject": "VPS down",
                                "body": "Unreachable since 03:10"})
    print(intent.id, intent.status)

``submit`` validates (raising :class:`IntentInvalid` naming every bad field), commits the intent
to the database and hands it to the queue; it returns the stored intent (an idempotent replay
returns the existing one). Configuration comes from ``DISPATCHER_*`` and the targets file.
"""

from __future__ import annotations

import sys

from dispatcher.green import patch_for_green_worker

patch_for_green_worker(sys.argv)  # before anything below imports socket or threading (gevent pool only)

import threading
import uuid
from typing import Any

from dispatcher.domain import IntentInput, IntentView, Priority, Status
from dispatcher.errors import (
    ConfigError,
    DispatcherError,
    FieldProblem,
    IntentInvalid,
    StoreUnavailable,
    UnknownIntent,
)

__all__ = [
    "ConfigError",
    "DispatcherError",
    "FieldProblem",
    "IntentInput",
    "IntentInvalid",
    "IntentView",
    "Priority",
    "Producer",
    "Status",
    "StoreUnavailable",
    "UnknownIntent",
    "get",
    "submit",
]


class Producer:
    """A connection to the dispatcher's database and queue, for submitting and reading intents."""

    def __init__(self, config: Any = None) -> None:
        from dispatcher.config import load_config
        from dispatcher.runtime import build_runtime

        self._runtime = build_runtime(config or load_config())

    def submit(self, intent: dict[str, Any] | IntentInput, *, source: str = "python",
               submitted_by: str | None = None) -> IntentView:
        return self._runtime.service.accept(intent, source=source, submitted_by=submitted_by).intent

    def get(self, intent_id: uuid.UUID | str) -> IntentView:
        return self._runtime.service.get(uuid.UUID(str(intent_id)), with_attempts=True)

    def close(self) -> None:
        self._runtime.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


_default: Producer | None = None
_lock = threading.Lock()


def _producer() -> Producer:
    global _default
    with _lock:
        if _default is None:
            _default = Producer()
        return _default


def submit(intent: dict[str, Any] | IntentInput, *, submitted_by: str | None = None) -> IntentView:
    """Validate, store and enqueue one intent with the process-wide producer."""
    return _producer().submit(intent, submitted_by=submitted_by)


def get(intent_id: uuid.UUID | str) -> IntentView:
    """One intent as stored, with its attempts."""
    return _producer().get(intent_id)
