"""The long-lived processes take their start-up heap out of the garbage collector's sight, so a full
collection does not stall every thread for tens of milliseconds (dispatcher.heap)."""

from __future__ import annotations

import gc

from celery import signals

from dispatcher.config import Settings, parse_config
from dispatcher.heap import settle_heap
from dispatcher.worker.tasks import create_worker_app


def test_settling_freezes_what_exists_and_leaves_later_objects_to_the_collector() -> None:
    kept = [[n] for n in range(1000)]                         # lists: always tracked by the collector
    frozen = settle_heap()
    assert frozen == gc.get_freeze_count() >= len(kept)
    walked = {id(o) for o in gc.get_objects()}                # what a full collection now looks at
    later = [[n] for n in range(1000)]
    after = {id(o) for o in gc.get_objects()}
    assert not any(id(k) in walked for k in kept)
    assert all(id(item) in after for item in later)


def test_a_worker_settles_its_heap_before_its_pool_starts() -> None:
    config = parse_config({"targets": {}}, Settings(broker_url="redis://127.0.0.1:6379/15"), env={})
    create_worker_app(config)
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    signals.worker_init.send(sender=None)                     # what Celery sends before it starts the pool
    assert gc.get_freeze_count() > 0
