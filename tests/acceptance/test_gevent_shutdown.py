"""A gevent worker's warm shutdown (SIGTERM) with countdown messages due and waiting for a greenlet:
it starts none of them (a task started then was cut off mid-run as the worker exited) and every one
goes back to Redis (``HandBackWaitingCountdowns`` in dispatcher/worker/app.py). A real Celery worker
process with the dispatcher's gevent settings (tests/acceptance/shutdown_app.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from celery import Celery

from tests.acceptance.procs import subprocess_env
from tests.acceptance.shutdown_app import GREENLETS, QUEUE, TASK
from tests.conftest import REDIS_BASE

ROOT = Path(__file__).resolve().parents[2]
COUNTDOWNS = 40


def test_a_gevent_worker_told_to_stop_starts_no_waiting_countdown_and_hands_every_one_back(
        tmp_path: Path, redis_db: int) -> None:
    url = f"{REDIS_BASE}/{redis_db}"
    db = redis.Redis.from_url(url)
    db.flushdb()
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.acceptance.shutdown_app:app", "worker", "-P", "gevent",
             "-c", str(GREENLETS), "--without-mingle", "--without-gossip", "--without-heartbeat",
             "--loglevel", "WARNING"],
            cwd=ROOT, env=subprocess_env({"SHUTDOWN_TEST_BROKER": url}), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not db.get("test:ready"):
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        producer = Celery("producer", broker=url, set_as_current=False)
        ids = {producer.send_task(TASK, queue=QUEUE, countdown=0.5).id for _ in range(COUNTDOWNS)}
        time.sleep(1.0)  # all due for 0.5 s: two running, the others' timers waiting for a greenlet
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    started = {x.decode() for x in db.smembers("test:started")}
    ran = {x.decode() for x in db.smembers("test:ran")}
    handed_back = {json.loads(raw)["headers"]["id"] for raw in db.lrange(QUEUE, 0, -1)}
    assert started == ran, f"cut off mid-run as the worker exited: {sorted(started - ran)}"
    assert ran and handed_back, (len(ran), len(handed_back))     # the case arose: some ran, some waited
    assert ids == ran | handed_back, f"neither run nor handed back: {sorted(ids - ran - handed_back)}"
    assert not ran & handed_back
