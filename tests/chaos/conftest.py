"""Session fixtures of the chaos suite: a private Postgres cluster, a private Redis and the simulator.

Nothing here touches the machine's shared Postgres or Redis: the scenarios stop, restart and flush
these private ones. A service that cannot be brought up fails the run (never skips it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dispatcher.store import db
from tests.acceptance.procs import Procs, SimulatorProcess, free_port, subprocess_env, wait_until
from tests.chaos.harness import SIM_HEALTHY, ChaosEnv
from tests.chaos.services import PrivatePostgres, PrivateRedis
from tests.conftest import HOSTUP_KEY, NOCWORX_KEY

TEMPLATE = "chaos_template"


@pytest.fixture(scope="session")
def chaos_root() -> Iterator[Path]:
    """Scratch space: the private clusters and every process's logs (kept with ``CHAOS_KEEP=1``)."""
    root = Path(tempfile.mkdtemp(prefix="dispatcher-chaos-"))
    root.chmod(0o755)
    yield root
    if os.environ.get("CHAOS_KEEP", "") in ("", "0"):
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"\nchaos logs kept in {root}")


@pytest.fixture(scope="session")
def private_postgres(chaos_root: Path) -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres(chaos_root / "pg")
    try:
        pg.init()
    except Exception as exc:
        pg.destroy()
        pytest.fail(f"cannot start a private PostgreSQL cluster for the chaos suite ({exc}); it needs "
                    "PostgreSQL's initdb (apt-get install postgresql) and, as root, the postgres user", pytrace=False)
    try:
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
        db.upgrade(pg.url(TEMPLATE))
        yield pg
    finally:
        pg.destroy()


@pytest.fixture(scope="session")
def private_redis(chaos_root: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(chaos_root / "redis")
    try:
        server.start()
    except Exception as exc:
        server.stop()
        pytest.fail(f"cannot start a private redis-server for the chaos suite ({exc})", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def chaos_env(chaos_root: Path, private_postgres: PrivatePostgres,
              private_redis: PrivateRedis) -> Iterator[ChaosEnv]:
    """The simulator as its own process (as users run it), shared by the scenarios; each resets it."""
    workdir = chaos_root / "simulator"
    workdir.mkdir()
    knobs = workdir / "simulator.json"
    knobs.write_text(json.dumps({"hostup_key": HOSTUP_KEY, "nocworx_key": NOCWORX_KEY, "seed": 7,
                                 **SIM_HEALTHY}))
    procs = Procs(workdir, subprocess_env({}))
    port = free_port()
    proc = procs.start("simulator", "simulate", "--host", "127.0.0.1", "--port", str(port), "--config-json",
                       str(knobs))
    sim = SimulatorProcess(proc, "127.0.0.1", port)
    try:
        wait_until(sim.healthy, timeout=30, what="the simulator", procs=procs)
        yield ChaosEnv(chaos_root, private_postgres, private_redis, sim, procs, TEMPLATE)
    finally:
        sim.close()
        procs.stop_all()
