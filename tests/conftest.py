"""Shared fixtures: real Postgres and Redis (never mocked, never skipped), the simulators.

Each test gets a fresh Postgres database cloned from a migrated template (fast: no migration per
test), and each xdist worker its own Redis database number. A service that cannot be reached fails
the run with the command that starts it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from dispatcher.config import AppConfig, Settings, parse_config
from dispatcher.heap import settle_heap
from dispatcher.simulator import RunningSimulator, SimulatorSettings, start_in_thread
from dispatcher.store import db

PG_ADMIN = os.environ.get("DISPATCHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("DISPATCHER_TEST_REDIS", "redis://127.0.0.1:6379")

HOSTUP_KEY = "test-hostup-key-0123456789abcdef"
NOCWORX_KEY = "test-nocworx-key-0123456789abcdef"
TOKENS = {"WRITE_TOKEN": "tok-write-0123456789abcdef", "READ_TOKEN": "tok-read-0123456789abcdef",
          "OPERATOR_TOKEN": "tok-operator-0123456789abcdef", "ALERTS_TOKEN": "tok-alerts-0123456789abcdef"}
SECRETS = (HOSTUP_KEY, NOCWORX_KEY, *TOKENS.values())


def _worker_index(request: pytest.FixtureRequest) -> int:
    worker = getattr(request.config, "workerinput", {}).get("workerid", "gw0")
    return int(worker.removeprefix("gw") or 0)


def _pg_url(dbname: str) -> str:
    base = PG_ADMIN.rsplit("/", 1)[0]
    return f"{base}/{dbname}"


@pytest.fixture(scope="session")
def pg_template(request: pytest.FixtureRequest) -> Iterator[str]:
    try:
        conn = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN} ({exc}). Start it: "
                    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start", pytrace=False)
    name = f"dispatcher_tpl_{os.getpid()}"
    with conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    db.upgrade(_pg_url(name))
    yield name
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def database_from(pg_template: str, prefix: str = "dispatcher_t") -> Iterator[str]:
    """A fresh, migrated Postgres database (a copy of the template), dropped afterwards; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    try:
        yield _pg_url(name)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated Postgres database for this test."""
    with database_from(pg_template) as url:
        yield url


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """A Redis database number leased to this test process alone (db 0 holds the leases), so that
    concurrent test runs on one machine never flush or consume each other's queues."""
    admin = redis.Redis.from_url(f"{REDIS_BASE}/0", socket_connect_timeout=3)
    try:
        admin.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_BASE} ({exc}). Start it: redis-server --daemonize yes "
                    "--bind 127.0.0.1 --port 6379 --save '' --appendonly no", pytrace=False)
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    for number in range(1, 16):
        if admin.set(f"dispatcher-test-lease:{number}", token, nx=True, ex=3600):
            break
    else:
        pytest.fail("all 15 Redis test databases are leased by other test runs", pytrace=False)
    yield number
    if admin.get(f"dispatcher-test-lease:{number}") == token.encode():
        admin.delete(f"dispatcher-test-lease:{number}")
    admin.close()


@pytest.fixture
def redis_url(redis_db: int) -> Iterator[str]:
    """A flushed Redis database of this test process's own."""
    url = f"{REDIS_BASE}/{redis_db}"
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def steady_judge() -> None:
    """For a test whose judge is a simulator in a thread of this process, stamping arrival times to
    the millisecond: the test process's heap (the whole suite's, hundreds of thousands of objects)
    is frozen, as a long-lived dispatcher process freezes its own (dispatcher.heap), so that a full
    collection does not hold the simulator back for tens of milliseconds and bunch the arrivals it
    records."""
    settle_heap()


@pytest.fixture
def simulator() -> Iterator[RunningSimulator]:
    with start_in_thread(SimulatorSettings(hostup_key=HOSTUP_KEY, nocworx_key=NOCWORX_KEY, task_delay_s=0.2,
                                           seed=1)) as sim:
        yield sim


def target_table(sim: RunningSimulator, **overrides: Any) -> dict[str, Any]:
    """The targets section for the two simulated providers, with fast retries and polls, and a rate
    budget (100/s) generous enough that only the tests about rate limits are shaped by it."""
    retry = {"max_attempts": 6, "base_s": 0.2, "cap_s": 2.0}
    budget = {"rate": "100/second", "burst": 20}
    targets: dict[str, Any] = {
        "hostup": {"provider": "hostup", "base_url": sim.hostup_url, "api_key_env": "HOSTUP_KEY", "retry": retry,
                   **budget},
        "nocworx": {"provider": "nocworx", "base_url": sim.nocworx_url, "api_key_env": "NOCWORX_KEY",
                    "retry": retry, "poll": {"interval_s": 0.2, "deadline_s": 20}, **budget},
    }
    for name, changes in overrides.items():
        targets[name] = {**targets[name], **changes}
    return targets


def tokens_table() -> dict[str, Any]:
    return {"tokens": {
        "writer": {"token_env": "WRITE_TOKEN", "scopes": ["intents:write"]},
        "reader": {"token_env": "READ_TOKEN", "scopes": ["intents:read"]},
        "operator": {"token_env": "OPERATOR_TOKEN", "scopes": ["operator"]},
        "alerts": {"token_env": "ALERTS_TOKEN", "scopes": ["alerts:write"]},
    }}


def secrets_env() -> dict[str, str]:
    return {"HOSTUP_KEY": HOSTUP_KEY, "NOCWORX_KEY": NOCWORX_KEY, **TOKENS}


def make_config(sim: RunningSimulator, *, database_url: str | None = None, broker_url: str | None = None,
                scheduler: dict[str, Any] | None = None, **target_overrides: Any) -> AppConfig:
    data = {"targets": target_table(sim, **target_overrides), "api": tokens_table(),
            "scheduler": scheduler or {"interval_s": 0.2, "requeue_after_s": 5}}
    return parse_config(data, Settings(database_url=database_url, broker_url=broker_url), env=secrets_env())


@pytest.fixture
def make_runtime(database_url: str) -> Iterator[Any]:
    """Build services with ``build_runtime(config, **kwargs)``; all are closed after the test."""
    from dispatcher.runtime import Runtime, build_runtime

    runtimes: list[Runtime] = []

    def factory(config: AppConfig, **kwargs: Any) -> Runtime:
        rt = build_runtime(config, **kwargs)
        runtimes.append(rt)
        return rt

    yield factory
    for rt in runtimes:
        rt.close()
