"""Benchmark: the CPU one intent costs the dispatcher's hot path, against the least that can be done.

Run (needs PostgreSQL and Redis, the same as the test suite)::

    .venv/bin/python -m bench.hotpath                    # 400 intents, 3 rounds
    .venv/bin/python -m bench.hotpath --profile          # ... and where the time goes (pyinstrument)

One process, one thread, no Celery: ``Dispatcher.dispatch`` then ``Dispatcher.poll`` (NocWorx) called
in a loop on stored intents, half HostUp, half NocWorx, against the simulator (its own process, no
latency, NocWorx tasks resolved at once), with every guarantee on (shared rate limiter in Redis,
department list, attempt recorded before the send and completed after, leases, events). Beside it,
in the same process and the same rounds, the baseline: an httpx POST of the same create and one
INSERT of the answer (bench/e2e_baseline.py's task body). Rounds alternate the two, and the figures
are medians over rounds, so a noisy neighbour weighs on both alike.

Reported: CPU milliseconds (user + system, this process) and wall milliseconds per intent, SQL
statements, explicit transactions (BEGIN ... COMMIT; a statement in autocommit is none) and
database round trips (statements + a BEGIN and a COMMIT per transaction) per intent, and the ratio
to the baseline. With ``--profile``, a
pyinstrument profile of one dispatcher round is printed (and saved as HTML under bench/results/).
"""

from __future__ import annotations

import argparse
import inspect
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import event, text

from bench.e2e import HOSTUP_KEY, NOCWORX_KEY, config_text, items_for
from bench.ratelimit import Simulator, leased_redis_db, scratch_database

ROOT = Path(__file__).resolve().parent.parent


class NoQueue:
    """Takes messages and drops them: the loop below calls the service itself."""

    def enqueue(self, task: str, intent_id: uuid.UUID, *, target: str, countdown: float = 0.0) -> None:
        return None

    def enqueue_many(self, task: str, items: list[tuple[uuid.UUID, str]]) -> None:
        return None


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def dispatcher_round(rt: Any, ids: list[uuid.UUID], counter: dict[str, int]) -> tuple[float, float]:
    """Dispatch every intent, then poll the NocWorx ones (their tasks resolved at once)."""
    from dispatcher.domain import Status

    with rt.store.engine.connect() as conn:
        nocworx = {row[0] for row in conn.execute(text("SELECT id FROM intents WHERE target = 'nocworx'"))}
    polled = [intent_id for intent_id in ids if intent_id in nocworx]
    counter.update(statements=0, commits=0)
    began, wall = cpu(), time.perf_counter()
    for intent_id in ids:
        rt.service.dispatch(intent_id)
    with rt.store.engine.begin() as conn:  # due now: the benchmark does not wait for the poll interval
        conn.execute(text("UPDATE intents SET next_attempt_at = now() - interval '1 second' WHERE status = :s"),
                     {"s": Status.polling.value})
    for intent_id in polled:
        rt.service.poll(intent_id)
    return (cpu() - began) / len(ids) * 1000, (time.perf_counter() - wall) / len(ids) * 1000


def baseline_round(sim_url: str, database_url: str, items: list[dict[str, Any]]) -> tuple[float, float]:
    """The least: POST the create, INSERT the answer (autocommit), per intent."""
    clients = {"hostup": httpx.Client(base_url=f"{sim_url}/api/v2", headers={"Authorization": f"Bearer {HOSTUP_KEY}"}),
               "nocworx": httpx.Client(base_url=sim_url, headers={"Authorization": f"Bearer {NOCWORX_KEY}"})}
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_ticket (id bigserial PRIMARY KEY, provider text, "
                     "status integer, answer text, published_at double precision, finished_at double precision)")
        began, wall = cpu(), time.perf_counter()
        for item in items:
            if item["target"] == "hostup":
                response = clients["hostup"].post("/support/tickets", json={
                    "departmentSlug": "vps", "subject": item["subject"], "message": item["body"], "priority": "medium"})
            else:
                response = clients["nocworx"].post("/v1/ticket", json={
                    "department": "support", "subject": item["subject"], "comment": item["body"]})
            response.raise_for_status()
            conn.execute("INSERT INTO bench_ticket (provider, status, answer, published_at, finished_at) "
                         "VALUES (%s, %s, %s, %s, %s)", (item["target"], response.status_code, response.text,
                                                         time.time(), time.time()))
        result = (cpu() - began) / len(items) * 1000, (time.perf_counter() - wall) / len(items) * 1000
    for client in clients.values():
        client.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--intents", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    from dispatcher.config import Settings, load_config
    from dispatcher.runtime import build_runtime

    ours: list[tuple[float, float]] = []
    theirs: list[tuple[float, float]] = []
    counter = {"statements": 0, "commits": 0}
    with tempfile.TemporaryDirectory(prefix="bench-hotpath-") as tmp, leased_redis_db() as redis_url:
        workdir = Path(tmp)
        sim = Simulator(workdir)
        try:
            sim.http.put("/config", json={"hostup_key": HOSTUP_KEY, "nocworx_key": NOCWORX_KEY, "rate_limit": 0,
                                          "task_delay_s": 0, "critical_per_hour": 0}).raise_for_status()
            with scratch_database() as database_url:
                (workdir / "dispatcher.toml").write_text(config_text(sim))
                os.environ.update(BENCH_HOSTUP_KEY=HOSTUP_KEY, BENCH_NOCWORX_KEY=NOCWORX_KEY)
                config = load_config(Settings(database_url=database_url, redis_url=redis_url,
                                              config=workdir / "dispatcher.toml"))
                # ``concurrency`` sizes the worker's pools; builds before it existed run with their defaults
                sized = {"concurrency": 1} if "concurrency" in inspect.signature(build_runtime).parameters else {}
                rt = build_runtime(config, queue=NoQueue(), **sized)

                def count(*_: Any) -> None:
                    counter["statements"] += 1

                def commit(*_: Any) -> None:
                    counter["commits"] += 1

                event.listen(rt.store.engine, "before_cursor_execute", count)
                event.listen(rt.store.engine, "commit", commit)
                if hasattr(rt.store, "driver_hook"):  # statements run on the driver, past SQLAlchemy's events
                    rt.store.driver_hook = count
                try:
                    warm = items_for(20, "warm")
                    rt.service.accept_many(warm, source="bench")
                    with rt.store.engine.connect() as conn:
                        warm_ids = [row[0] for row in conn.execute(text("SELECT id FROM intents"))]
                    dispatcher_round(rt, warm_ids, counter)
                    baseline_round(sim.url, database_url, warm)
                    for n in range(args.rounds):
                        tag = f"round{n}"
                        items = items_for(args.intents, tag)
                        results = rt.service.accept_many(items, source="bench")
                        ids = [r.id for r in results if r.id is not None]
                        assert len(ids) == len(items), "every intent is accepted"
                        profiler = None
                        if args.profile and n == args.rounds - 1:
                            from pyinstrument import Profiler

                            profiler = Profiler(interval=0.0005)
                            profiler.start()
                        ours.append(dispatcher_round(rt, ids, counter))
                        if profiler is not None:
                            profiler.stop()
                        statements, commits = counter["statements"] / len(ids), counter["commits"] / len(ids)
                        theirs.append(baseline_round(sim.url, database_url, items))
                        print(f"round {n + 1}: dispatcher {ours[-1][0]:.2f} ms CPU / {ours[-1][1]:.2f} ms wall, "
                              f"baseline {theirs[-1][0]:.2f} / {theirs[-1][1]:.2f} ms per intent", flush=True)
                    with rt.store.engine.connect() as conn:
                        states: dict[str, int] = dict(
                            conn.execute(text("SELECT status, count(*) FROM intents GROUP BY status")).all())
                    assert set(states) == {"succeeded"}, f"every intent succeeded: {states}"
                finally:
                    rt.close()
        finally:
            sim.close()
    cpu_ours, wall_ours = statistics.median(r[0] for r in ours), statistics.median(r[1] for r in ours)
    cpu_base, wall_base = statistics.median(r[0] for r in theirs), statistics.median(r[1] for r in theirs)
    print()
    print(f"medians of {args.rounds} rounds of {args.intents} intents (half HostUp, half NocWorx), one thread:")
    print(f"{'':12} {'CPU ms/intent':>14} {'wall ms/intent':>15} {'statements':>11} {'transactions':>13} "
          f"{'round trips':>12}")
    print(f"{'dispatcher':12} {cpu_ours:14.2f} {wall_ours:15.2f} {statements:11.1f} {commits:13.1f} "
          f"{statements + 2 * commits:12.1f}")
    print(f"{'baseline':12} {cpu_base:14.2f} {wall_base:15.2f} {1.0:11.1f} {0.0:13.1f} {1.0:12.1f}")
    print(f"dispatcher / baseline: {cpu_ours / cpu_base:.2f}x CPU, {wall_ours / wall_base:.2f}x wall")
    if profiler is not None:
        out = ROOT / "bench" / "results" / "hotpath-profile.html"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(profiler.output_html())
        print(profiler.output_text(unicode=False, color=False))
        print(f"profile saved: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
