"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from dispatcher.store import db


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A small pool on the test's own PostgreSQL database, without pre-ping (as a worker's)."""
    engine = db.make_engine(database_url, pool_size=2, max_overflow=0, pre_ping=False)
    yield engine
    engine.dispose()
