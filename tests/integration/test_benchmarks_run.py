"""The performance benchmarks still run end to end (small sizes): real processes, real figures.

They are measured by hand (README, Benchmarks), never timed here; these tests only keep them from
rotting: each must finish, make every ticket, and print and save its comparison with the baseline.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(module: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, f"{module} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_hot_path_benchmark_dispatches_every_intent_and_compares_with_the_baseline() -> None:
    out = run_bench("bench.hotpath", "--intents", "20", "--rounds", "1").stdout
    assert "dispatcher / baseline:" in out
    dispatcher_line = next(line for line in out.splitlines() if line.startswith("dispatcher "))
    cpu_ms = float(dispatcher_line.split()[1])
    assert cpu_ms > 0


def test_the_statement_benchmark_compares_sqlalchemy_the_driver_and_bare_psycopg() -> None:
    out = run_bench("bench.statements", "--statements", "50", "--rounds", "1").stdout
    figures = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
               if line.startswith("  ") and "x bare" in line}
    assert set(figures) == {"sqlalchemy", "driver", "bare"}
    assert all(value > 0 for value in figures.values())


def test_the_end_to_end_benchmark_makes_every_ticket_for_both_variants(tmp_path: Path) -> None:
    out_file = tmp_path / "e2e.json"
    out = run_bench("bench.e2e", "--intents", "60", "--latency", "0", "--paced", "10", "--paced-rate", "20",
                    "--concurrency", "8", "--out", str(out_file)).stdout
    assert "goals:" in out
    saved = json.loads(out_file.read_text())
    ours, theirs = saved["median"]["0ms/dispatcher"], saved["median"]["0ms/baseline"]
    assert ours["succeeded"] == 60 and ours["done"] == 60
    assert theirs["done"] == 60
    for figure in ("tickets_per_s", "cpu_per_1000", "peak_rss_mb", "db_bytes_per_intent", "p95_ms"):
        assert ours[figure] > 0, figure
    [run] = saved["runs"]["0ms/dispatcher"]
    assert run["attempts_per_intent"] >= 1.0  # every intent's exchanges are on record


def test_the_gc_pause_benchmark_compares_a_settled_heap_with_the_default() -> None:
    out = run_bench("bench.gc_pause", "--runs", "1").stdout
    assert "settled / as-is:" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("as-is", "settled")) and "/" not in line}
    walked_as_is, walked_settled, frozen = (int(rows["as-is"][1].replace(",", "")),
                                            int(rows["settled"][1].replace(",", "")),
                                            int(rows["settled"][2].replace(",", "")))
    assert frozen > 0 and walked_settled < walked_as_is      # the worker's start-up objects left the collector's sight


def test_a_profile_is_shared_out_by_who_spends_each_sample(tmp_path: Path) -> None:
    from bench.e2e import profile_owners

    raw = tmp_path / "raw.txt"
    raw.write_text("run (celery/app/trace.py:1);_exchange (dispatcher/service.py:2);"
                   "acquire (dispatcher/ratelimit.py:3) 3\n"
                   "run (celery/app/trace.py:1);release (dispatcher/store/repo.py:4);execute (psycopg/cursor.py:5) 6\n"
                   "on_readable (kombu/transport/redis.py:6);append (kombu/transport/redis.py:7) 1\n")
    shares = {line.split("%", 1)[1].strip(): float(line.split("%")[0]) for line in profile_owners(raw).splitlines()}
    assert shares == {"PostgreSQL (SQLAlchemy + psycopg)": 60.0, "rate limiter (its Redis script)": 30.0,
                      "Celery/kombu: consumer loop, task tracing": 10.0}


def test_a_profile_tells_the_consumer_loop_from_the_task_threads(tmp_path: Path) -> None:
    from bench.e2e import profile_outside_tasks

    raw = tmp_path / "raw.txt"
    raw.write_text("_worker (concurrent/futures/thread.py:83);run (celery/app/trace.py:1) 3\n"
                   "asynloop (celery/worker/loops.py:1);on_readable (kombu/transport/redis.py:6) 1\n")
    assert profile_outside_tasks(raw) == 25.0
    green = tmp_path / "green.txt"     # a gevent worker: one thread, the tasks are greenlets
    green.write_text("apply_target (celery/concurrency/gevent.py:24);run (celery/app/trace.py:1) 1\n"
                     "synloop (celery/worker/loops.py:213);drain_events (kombu/connection.py:399) 1\n"
                     "run (gevent/hub.py:647) 2\n")
    assert profile_outside_tasks(green) == 75.0


def test_the_green_benchmark_times_the_checks_psycopgs_wait_and_the_semaphore_both_ways() -> None:
    out = run_bench("bench.green", "--calls", "2000", "--rounds", "1").stdout
    rows = [re.findall(r"([0-9.]+) us per call", line) for line in out.splitlines() if "us per call" in line]
    assert len(rows) == 4 and all(len(row) == 2 and all(float(v) > 0 for v in row) for row in rows)
    assert "psycopg SELECT 1" in out and "driver semaphore" in out
