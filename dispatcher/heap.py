"""Garbage-collector settings for the long-lived processes (worker, scheduler, API, simulator).

A worker process that has imported Celery, SQLAlchemy, pydantic and httpx holds some 130,000
objects it keeps for its whole life. Python's full (generation 2) collection walks every one of
them, and no thread runs meanwhile: about 80 ms on this machine (bench/gc_pause.py). A worker
thread that has just taken a rate-limit token then sends that much late, and a provider that counts
in fixed windows can see one request too many in a window (the limiter's safety margin is 30 ms;
tests/integration/test_shared_budget.py caught it). ``gc.freeze()`` after start-up takes those
objects out of the collector's sight, as the Python documentation suggests for long-lived
processes, and leaves full collections with only what was made since (under 1 ms). Done in a
process that then forks (prefork workers), it also keeps the children off the parent's pages.
"""

from __future__ import annotations

import gc


def settle_heap() -> int:
    """Collect what start-up left as garbage, then freeze the rest. Returns the objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
