"""SIGQUIT and a prefork worker's event loop: Celery's cold shutdown never runs in the middle of a
loop turn (where a child's message may be half handled), and still at once otherwise
(dispatcher.worker.app.cold_shutdown_between_events; chaos S3b once waited 30 s on it)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from kombu.asynchronous.hub import Hub

from dispatcher.worker.app import cold_shutdown_between_events


def new_hub() -> Any:
    return Hub()  # type: ignore[no-untyped-call]


@pytest.fixture
def celery_handler() -> Iterator[list[str]]:
    """Stands in for Celery's SIGQUIT handler (installed before the worker is ready): records its calls."""
    calls: list[str] = []
    previous = signal.signal(signal.SIGQUIT, lambda *_: calls.append("cold shutdown"))
    try:
        yield calls
    finally:
        signal.signal(signal.SIGQUIT, previous)


def test_a_sigquit_during_a_loop_turn_waits_for_the_next_turn(celery_handler: list[str]) -> None:
    hub = new_hub()
    try:
        assert cold_shutdown_between_events(SimpleNamespace(hub=hub))
        events = celery_handler
        r, w = os.pipe()

        def on_child_message() -> None:  # the loop has read a child's READY and handles it
            os.read(r, 1)
            os.kill(os.getpid(), signal.SIGQUIT)
            events.append("message handled")

        hub.add_reader(r, on_child_message)
        os.write(w, b"x")
        loop = hub.create_loop()
        for _ in range(3):
            next(loop)
        assert events == ["message handled", "cold shutdown"]
    finally:
        hub.close()


def test_a_sigquit_outside_the_loop_runs_the_cold_shutdown_at_once(celery_handler: list[str]) -> None:
    hub = new_hub()
    try:
        assert cold_shutdown_between_events(SimpleNamespace(hub=hub))
        os.kill(os.getpid(), signal.SIGQUIT)  # a reconnect or a warm shutdown: no loop turn will come
        assert celery_handler == ["cold shutdown"]
    finally:
        hub.close()


def test_no_event_loop_no_change(celery_handler: list[str]) -> None:
    before: Any = signal.getsignal(signal.SIGQUIT)
    assert not cold_shutdown_between_events(SimpleNamespace(hub=None))  # gevent: no hub
    assert signal.getsignal(signal.SIGQUIT) is before
    result: list[bool] = []
    consumer = SimpleNamespace(hub=new_hub())
    thread = threading.Thread(target=lambda: result.append(cold_shutdown_between_events(consumer)))
    thread.start()
    thread.join()
    assert result == [False]
