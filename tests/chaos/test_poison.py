"""An intent that kills its worker process every time it is handled is given up, not looped on.

The path under test is the real one: the prefork child holding the intent is SIGKILLed, Celery
redelivers the message (``reject_on_worker_lost``) but the claim refuses it while the dead child's
lease runs, the lease expires, the scheduler recovers the intent and publishes it again, another
child claims it (``deliveries`` + 1)... until ``MAX_DELIVERIES`` is passed and the claim that follows
fails it as ``poison`` with the reason kept. Nothing was ever sent: each child dies while it still
reads HostUp's department list.
"""

from __future__ import annotations

import time

import pytest

from dispatcher.domain import Status
from dispatcher.service import MAX_DELIVERIES
from tests.chaos.harness import ChaosEnv, Scenario, children, kill

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(300)]


def test_an_intent_that_kills_its_worker_process_every_time_is_failed_as_poison_with_the_reason_kept(
        chaos_env: ChaosEnv) -> None:
    with Scenario(chaos_env, "poison", intents=1, sim={"latency_ms": [1500, 1500]},
                  scheduler={"interval_s": 0.1, "lease_s": 1, "requeue_after_s": 1}) as s:
        s.start_scheduler()
        worker = s.start_worker("w1", concurrency=1)
        assert s.runtime is not None
        accepted = s.runtime.service.accept({"target": "hostup", "topic": "vps", "subject": "poison pill",
                                             "body": "Every worker that picks this up dies."})
        intent_id = str(accepted.intent.id)
        killed: set[int] = set()
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            [(status, holder, deliveries)] = s.query("SELECT status, leased_by, deliveries FROM intents WHERE id = %s",
                                                     (intent_id,))
            if status in ("succeeded", "failed", "cancelled"):
                break
            # every claim dies, except the one past MAX_DELIVERIES: that one does no work, it gives up
            if status == "sending" and holder and holder.startswith("w1/") and deliveries <= MAX_DELIVERIES:
                pid = int(holder.rsplit("/", 1)[1])
                if pid not in killed and pid in children(worker) and kill(pid):
                    killed.add(pid)
            time.sleep(0.02)

        view = s.runtime.service.get(accepted.intent.id)
        assert view.status is Status.failed, f"{view.status} after {len(killed)} kills\n{s.story(intent_id)}"
        assert view.last_error_code == "poison"
        assert view.last_error_message is not None
        assert f"handed to a worker {MAX_DELIVERIES + 1} times" in view.last_error_message
        assert "worker_lost" in view.last_error_message  # the reason it kept failing is kept
        assert view.deliveries == MAX_DELIVERIES + 1
        assert len(killed) == MAX_DELIVERIES  # every delivery but the last died, and each one counted
        recovered = s.query("SELECT count(*) FROM events WHERE intent_id = %s AND kind = 'recovered'", (intent_id,))
        assert recovered[0][0] == MAX_DELIVERIES
        assert s.env.sim.stats()["tickets_by_marker"].get(intent_id, 0) == 0
