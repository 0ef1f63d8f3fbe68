"""Benchmark: the dispatcher end to end, against the least a Celery task can do, side by side.

Run (needs PostgreSQL and Redis, the same as the test suite)::

    .venv/bin/python -m bench.e2e                                # 10,000 intents at 0 and 200 ms, 1 run
    .venv/bin/python -m bench.e2e --intents 2000 --latency 0     # a quick run
    .venv/bin/python -m bench.e2e --runs 3                       # medians of 3 runs

Options:
    --intents N        intents per variant and run, half HostUp, half NocWorx (default 10000)
    --latency L,...    the simulator's response latency in ms, each a separate row (default 0,200)
    --pool P           the dispatcher's workers' pool: gevent or threads (default gevent, as
                       ``dispatcher worker``'s)
    --concurrency C    tasks at once per worker process (default: ``dispatcher worker``'s for the
                       pool, 64 threads or 256 greenlets)
    --workers W        worker processes (default 1)
    --db-connections D PostgreSQL connections each worker's hot path may open
                       (``DISPATCHER_DB_CONNECTIONS``; default 64 / W, so that W workers stay
                       under PostgreSQL's default of 100 connections)
    --paced M          intents submitted one by one afterwards, to measure latency (default 400)
    --paced-rate R     ... at R intents per second (default 20: under both variants' capacity on
                       this machine, so latency is the pipeline's own, not a backlog's; keep it
                       below the throughput phase's tickets/s)
    --task-delay S     NocWorx tasks resolve S seconds after the 202 (default 0)
    --runs N           repeat everything N times; the table shows medians (default 1)
    --variants V       comma-separated subset of dispatcher,baseline (default both)
    --out PATH         where the JSON goes (default bench/results/e2e.json)
    --profile DIR      sample the first worker with py-spy during the throughput phase; raw stacks
                       in DIR and the functions with the largest share of CPU printed

Environment: ``DISPATCHER_TEST_PG`` (an admin URL; scratch databases are created and dropped) and
``DISPATCHER_TEST_REDIS`` (a Redis database number is leased like the tests do).

What runs, per latency and run, against one simulator process (HostUp and NocWorx APIs, no rate
limit, every answer delayed by the latency):

dispatcher  W x ``dispatcher worker --pool P --concurrency C`` and ``dispatcher scheduler`` over
            Postgres and Redis, every guarantee on: the shared rate limiter (set far above what is
            reached, so it is consulted and never waits), the department list, an attempt recorded
            before each send and completed after, leases, events, NocWorx tasks polled to the ticket.
baseline    W x ``celery worker --pool threads -c C`` (with ``--pool gevent``: 64 threads over the W)
            running bench/e2e_baseline.py: POST the same create with httpx, INSERT one row, nothing
            else (no polling either).

Two phases, each measured for both variants:

1. Throughput: the workers run and are warm (a few intents went through); N intents are accepted
   in bulk (``accept_many``; the baseline publishes N messages); the clock stops when the last is
   done. tickets/s = intents done between the 5th and 95th percentile finish, over that span.
   CPU seconds per 1,000 tickets: user + system time of the worker and scheduler processes over the
   phase (PostgreSQL's server processes and the simulator beside it, for context). Peak RSS: the
   largest VmHWM of any worker process at the end.
2. Latency: M more intents, submitted one at a time at R per second; accept-to-ticket = from
   before ``accept`` is called (the baseline: before the message is published) to the moment the
   intent is recorded ``succeeded`` (the baseline: its row's insert). p50/p95/p99, all and per
   provider. A NocWorx ticket exists only once its task is polled, so its figure includes the
   first poll's wait (``[targets.X.poll] first_s``) and a second provider round trip.

Database bytes per intent: the dispatcher's tables (intents, attempts, events, tickets, with their
indexes and TOAST) over the intents stored, as they are after the run (no VACUUM: dead row
versions included); the JSON also has the figure per table and after ``VACUUM FULL``
(``compacted_total``, what the rows themselves take once autovacuum has reclaimed the rest).

Goals (issue 9): at 0 ms, >= 300 tickets/s and >= 50 % of the baseline's; at 200 ms, >= 200
tickets/s with one worker process; HostUp accept-to-ticket p95 < 250 ms + latency; worker RSS
< 200 MB; < 4 KB of database per intent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench.ratelimit import Proc, Simulator, base_env, leased_redis_db, scratch_database, start
from dispatcher.cli import WORKER_CONCURRENCY
from dispatcher.config import Settings
from dispatcher.green import DEFAULT_POOL

ROOT = Path(__file__).resolve().parent.parent
HOSTUP_KEY = "bench-hostup-key-0123456789abcdef"
NOCWORX_KEY = "bench-nocworx-key-0123456789abcdef"
VARIANTS = ("dispatcher", "baseline")
#: the baseline's pool, whatever the dispatcher's: Celery's threads, as many as the dispatcher's with
#: ``--pool threads``, else 64 per process split over the workers (with gevent and 256 greenlets the
#: baseline did worse than with threads at 200 ms: its one httpx pool of 256 connections is looked
#: over on every request)
BASELINE_THREADS = 64
DISPATCHER_TABLES = ("intents", "attempts", "events", "tickets")
TICK = os.sysconf("SC_CLK_TCK")


def baseline_threads(args: argparse.Namespace) -> int:
    return int(args.concurrency) if args.pool == "threads" else max(1, BASELINE_THREADS // args.workers)


# -- process accounting ----------------------------------------------------------------------------

def group_pids(pgid: int) -> list[int]:
    """Every live process in a process group (a worker and its children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def named_pids(name: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    pids.append(int(entry))
    return pids


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """user + system CPU seconds of each process (its threads included)."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU spent between two readings (a process that started in between counts from zero)."""
    return sum(after[pid] - before.get(pid, 0.0) for pid in after)


def peak_rss_mb(pids: list[int]) -> float:
    """The largest peak resident set (VmHWM) among the processes, in MB."""
    peak = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
    return peak / 1024


class Meter:
    """CPU of the variant's own processes, PostgreSQL's and the simulator's, between start and stop."""

    def __init__(self, procs: list[Proc], sim: Simulator) -> None:
        self.procs, self.sim = procs, sim

    def _read(self) -> tuple[dict[int, float], dict[int, float], dict[int, float]]:
        own = [pid for proc in self.procs for pid in group_pids(proc.popen.pid)]
        self.names = {pid: proc.name for proc in self.procs for pid in group_pids(proc.popen.pid)}
        return cpu_seconds(own), cpu_seconds(named_pids("postgres")), cpu_seconds(group_pids(self.sim.proc.popen.pid))

    def start(self) -> None:
        self.before = self._read()

    def stop(self) -> tuple[float, float, float]:
        after = self._read()
        own, pg, sim = (cpu_delta(b, a) for b, a in zip(self.before, after, strict=True))
        self.by_process: dict[str, float] = {}
        for pid, seconds in after[0].items():
            name = self.names.get(pid, "?")
            self.by_process[name] = round(self.by_process.get(name, 0.0) + seconds - self.before[0].get(pid, 0.0), 2)
        return own, pg, sim


# -- profiling -------------------------------------------------------------------------------------

def start_profiler(args: argparse.Namespace, proc: Proc, workdir: Path, name: str) -> tuple[Any, Path] | None:
    """With ``--profile DIR``: py-spy samples the worker's thread holding the GIL (the Python CPU
    it spends; waits on sockets hold no GIL) for the throughput phase."""
    if args.profile is None:
        return None
    import shutil
    import subprocess

    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    args.profile.mkdir(parents=True, exist_ok=True)
    out = args.profile / f"{name}.txt"
    pid = max(group_pids(proc.popen.pid))  # the busiest process is the pool's (prefork: one child)
    pid = proc.popen.pid if len(group_pids(proc.popen.pid)) == 1 else pid
    argv = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--nonblocking", "--gil",
            "--output", str(out)]
    popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=(workdir / f"{name}.spy.log").open("wb"))
    time.sleep(0.5)
    return popen, out


def stop_profiler(profiler: tuple[Any, Path] | None) -> None:
    import signal

    if profiler is None:
        return
    popen, out = profiler
    popen.send_signal(signal.SIGINT)
    popen.wait(timeout=60)
    print(f"   profile: {out}")
    print(profile_summary(out))
    print("   by owner:")
    print(profile_owners(out))
    print(f"   {profile_outside_tasks(out):5.1f}%  of all samples outside the tasks (Celery's consumer "
          "loop: reading, storing and acking every message)", flush=True)


def _stacks(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw format: one stack per line (frames joined by ';'), its sample count last."""
    out = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def profile_summary(path: Path, top: int = 25) -> str:
    """Inclusive share of samples per function."""
    inclusive: dict[str, int] = {}
    stacks = _stacks(path)
    total = sum(count for _, count in stacks)
    for frames, count in stacks:
        seen = set()
        for frame in frames:
            name = frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")" \
                if " (" in frame else frame
            if name not in seen:
                seen.add(name)
                inclusive[name] = inclusive.get(name, 0) + count
    rows = sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]
    return "\n".join(f"   {100 * n / max(1, total):5.1f}%  {name}" for name, n in rows)


#: who spends a sample: the first rule whose marks appear anywhere in its stack (order matters: the
#: limiter's and the store's Redis / SQL calls count as theirs, not as the libraries')
OWNERS = (
    ("rate limiter (its Redis script)", ("ratelimit.py",)),
    ("PostgreSQL (SQLAlchemy + psycopg)", ("store/repo.py", "psycopg/", "sqlalchemy/")),
    ("httpx", ("providers/http.py",)),
    ("Celery: publishing the poll", ("CeleryQueue", "send_task")),
    ("own code (service, routing, adapters, metrics, logs)", ("service.py",)),
    ("Celery/kombu: storing a delivered message as unacked", ("QoS.append",)),
    ("Celery/kombu: acks", ("QoS.ack", "basic_ack", "Message.ack")),
    ("Celery/kombu: consumer loop, task tracing", ("kombu", "celery")),
)


def profile_owners(path: Path) -> str:
    """Share of samples by who spends them (:data:`OWNERS`); the README's "where a worker's time goes"."""
    shares: dict[str, int] = {}
    stacks = _stacks(path)
    total = sum(count for _, count in stacks)
    for frames, count in stacks:
        joined = ";".join(frames)
        owner = next((name for name, marks in OWNERS if any(mark in joined for mark in marks)), "other")
        shares[owner] = shares.get(owner, 0) + count
    rows = sorted(shares.items(), key=lambda kv: -kv[1])
    return "\n".join(f"   {100 * n / max(1, total):5.1f}%  {name}" for name, n in rows)


#: a frame of these runs a task: a thread of the threads pool, a greenlet of the gevent pool
TASK_FRAMES = ("concurrent/futures/thread.py", "celery/concurrency/gevent.py")


def profile_outside_tasks(path: Path) -> float:
    """Percent of samples not in a task (a thread of the threads pool, run in ``concurrent.futures``,
    or a greenlet of the gevent pool): Celery's consumer, and with gevent its event loop."""
    stacks = _stacks(path)
    total = sum(count for _, count in stacks)
    outside = sum(count for frames, count in stacks if not any(mark in f for f in frames for mark in TASK_FRAMES))
    return 100 * outside / max(1, total)


# -- results ---------------------------------------------------------------------------------------

@dataclass
class RunResult:
    variant: str
    latency_ms: int
    intents: int
    done: int
    succeeded: int
    tickets_per_s: float        # sustained: 5th to 95th percentile finish
    phase_s: float              # accept of the first to the last done
    cpu_per_1000: float         # worker(s) + scheduler
    pg_cpu_per_1000: float
    sim_cpu_per_1000: float
    peak_rss_mb: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    hostup_p95_ms: float
    nocworx_p95_ms: float
    db_bytes_per_intent: float
    attempts_per_intent: float
    extra: dict[str, Any] = field(default_factory=dict)


def sustained_rate(times: list[float]) -> float:
    times = sorted(times)
    if len(times) < 20:
        return len(times) / max(1e-9, (times[-1] - times[0])) if len(times) > 1 else 0.0
    low, high = int(0.05 * len(times)), int(0.95 * len(times)) - 1
    span = times[high] - times[low]
    return (high - low) / span if span > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def pace(count: int, rate: float, submit: Any) -> None:
    """Call ``submit(n)`` ``count`` times at ``rate`` per second (open loop: late calls catch up)."""
    began = time.monotonic()
    for n in range(count):
        delay = began + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        submit(n)


def wait_until(done: Any, count: int, timeout: float, procs: list[Proc], what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        have = done()
        if have >= count:
            return
        for proc in procs:
            proc.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: only {have} of {count} done after {timeout:.0f} s")
        time.sleep(0.2)


def items_for(count: int, tag: str) -> list[dict[str, Any]]:
    return [{"target": "hostup" if n % 2 == 0 else "nocworx", "topic": "vps", "subject": f"{tag} {n}",
             "body": f"Benchmark ticket {n} ({tag}): the disk on vps-{n % 97} is full."} for n in range(count)]


# -- the throughput phase, for either variant ----------------------------------------------------------

@dataclass
class Phase:
    began: float
    cpu: float                  # the variant's own processes
    pg_cpu: float
    sim_cpu: float
    rss_mb: float               # the largest peak RSS among the workers
    by_process: dict[str, float]


def throughput_phase(args: argparse.Namespace, procs: list[Proc], workers: list[Proc], sim: Simulator,
                     workdir: Path, name: str, submit: Any, done: Any) -> Phase:
    """Submit ``args.intents`` (``submit(items)``) to warm workers, wait until ``done()`` counts them
    all; CPU over exactly that span, peak RSS at its end."""
    meter = Meter(procs, sim)
    meter.start()
    profiler = start_profiler(args, workers[0], workdir, name)
    began = time.time()
    submit(items_for(args.intents, "bulk"))
    wait_until(done, args.intents, args.timeout, procs, "throughput phase")
    own, pg, simcpu = meter.stop()
    stop_profiler(profiler)
    rss = peak_rss_mb([pid for proc in workers for pid in group_pids(proc.popen.pid)])
    return Phase(began, own, pg, simcpu, rss, meter.by_process)


# -- the dispatcher ----------------------------------------------------------------------------------

def config_text(sim: Simulator) -> str:
    targets = {"hostup": ("hostup", f"{sim.url}/api/v2", "BENCH_HOSTUP_KEY"),
               "nocworx": ("nocworx", sim.url, "BENCH_NOCWORX_KEY")}
    out = []
    for name, (provider, url, env) in targets.items():
        # the limiter is consulted for every request; this budget is far above what is reached
        out.append(f'[targets.{name}]\nprovider = "{provider}"\nbase_url = "{url}"\napi_key_env = "{env}"\n'
                   'rate = "100000/second"\nburst = 10000\n')
    return "\n".join(out)


def run_dispatcher(args: argparse.Namespace, latency: int, sim: Simulator, redis_url: str,
                   workdir: Path) -> RunResult:
    from dispatcher.config import load_config
    from dispatcher.runtime import build_runtime

    redis.Redis.from_url(redis_url).flushdb()
    with scratch_database() as database_url:
        config_file = workdir / "dispatcher.toml"
        config_file.write_text(config_text(sim))
        env = {"BENCH_HOSTUP_KEY": HOSTUP_KEY, "BENCH_NOCWORX_KEY": NOCWORX_KEY}
        os.environ.update(env)
        config = load_config(Settings(database_url=database_url, broker_url=redis_url, config=config_file))
        proc_env = base_env({"DISPATCHER_DATABASE_URL": database_url, "DISPATCHER_BROKER_URL": redis_url,
                             "DISPATCHER_CONFIG": str(config_file), "DISPATCHER_LOG_LEVEL": "WARNING",
                             "DISPATCHER_LOG_FORMAT": "json", "DISPATCHER_DB_CONNECTIONS": str(args.db_connections),
                             **env})
        dispatcher_bin = str(Path(sys.executable).parent / "dispatcher")
        argv = [dispatcher_bin, "worker", "--pool", args.pool, "--concurrency", str(args.concurrency)]
        workers = [start(workdir, f"worker{n}", argv, {**proc_env, "DISPATCHER_WORKER_NAME": f"w{n}"})
                   for n in range(args.workers)]
        procs = [*workers, start(workdir, "scheduler", [dispatcher_bin, "scheduler"], proc_env)]
        producer = build_runtime(config)
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                def finished(tag: str) -> int:
                    row = conn.execute("SELECT count(*) FROM intents WHERE finished_at IS NOT NULL "
                                       "AND subject LIKE %s", (f"{tag} %",)).fetchone()
                    return int(row[0]) if row else 0

                warm = items_for(20 * args.workers, "warm")
                producer.service.accept_many(warm, source="bench")
                wait_until(lambda: finished("warm"), len(warm), 120, procs, "warm-up")

                def accept_bulk(items: list[dict[str, Any]]) -> None:
                    for at in range(0, len(items), 1000):
                        producer.service.accept_many(items[at:at + 1000], source="bench")

                phase = throughput_phase(args, procs, workers, sim, workdir, f"dispatcher-{latency}ms", accept_bulk,
                                         lambda: finished("bulk"))
                times = [float(r[0]) for r in conn.execute(
                    "SELECT extract(epoch FROM finished_at) FROM intents WHERE subject LIKE 'bulk %'")]

                sent_at: dict[str, float] = {}
                paced = items_for(args.paced, "paced")

                def submit(n: int) -> None:
                    t0 = time.time()
                    accepted = producer.service.accept(paced[n], source="bench")
                    sent_at[str(accepted.intent.id)] = t0

                pace(args.paced, args.paced_rate, submit)
                wait_until(lambda: finished("paced"), args.paced, args.timeout, procs, "latency phase")
                rows = conn.execute("SELECT id::text, target, status, extract(epoch FROM finished_at) FROM intents "
                                    "WHERE subject LIKE 'paced %'").fetchall()
                latencies = {row[0]: (row[1], (float(row[3]) - sent_at[row[0]]) * 1000) for row in rows}
                succeeded = conn.execute("SELECT count(*) FROM intents WHERE subject LIKE 'bulk %' "
                                         "AND status = 'succeeded'").fetchone()
                stored = conn.execute("SELECT count(*), (SELECT count(*) FROM attempts) FROM intents").fetchone()
                size = conn.execute("SELECT sum(pg_total_relation_size(t::regclass)) FROM unnest(%s::text[]) t",
                                    (list(DISPATCHER_TABLES),)).fetchone()
                assert stored is not None and size is not None and succeeded is not None
                by_status: dict[str, int] = dict(
                    conn.execute("SELECT status, count(*) FROM intents GROUP BY status").fetchall())
                sizes = conn.execute("SELECT t, pg_total_relation_size(t::regclass) FROM unnest(%s::text[]) t",
                                     (list(DISPATCHER_TABLES),)).fetchall()
                by_table = {t: round(int(n) / int(stored[0])) for t, n in sizes}
                # as autovacuum would leave it: dead row versions (each intent is updated a few times) reclaimed
                for table in DISPATCHER_TABLES:
                    conn.execute(f"VACUUM FULL {table}")
                compacted = conn.execute("SELECT sum(pg_total_relation_size(t::regclass)) FROM unnest(%s::text[]) t",
                                         (list(DISPATCHER_TABLES),)).fetchone()
                assert compacted is not None
                by_table["compacted_total"] = round(int(compacted[0]) / int(stored[0]))
        finally:
            producer.close()
            for proc in procs:
                proc.stop()
    return result("dispatcher", latency, args, times, phase, int(succeeded[0]), latencies,
                  float(size[0]) / int(stored[0]), int(stored[1]) / int(stored[0]),
                  {"statuses": by_status, "cpu_s": phase.by_process, "bytes_per_intent": by_table})


# -- the baseline ------------------------------------------------------------------------------------

def run_baseline(args: argparse.Namespace, latency: int, sim: Simulator, redis_url: str,
                 workdir: Path) -> RunResult:
    redis.Redis.from_url(redis_url).flushdb()
    with scratch_database() as database_url:
        from bench import e2e_baseline

        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(e2e_baseline.TABLE)
        env = base_env({"BENCH_BROKER_URL": redis_url, "BENCH_DATABASE_URL": database_url, "BENCH_SIM_URL": sim.url,
                        "BENCH_HOSTUP_KEY": HOSTUP_KEY, "BENCH_NOCWORX_KEY": NOCWORX_KEY,
                        "BENCH_CONNECTIONS": str(baseline_threads(args))})
        app = e2e_baseline.app
        app.conf.broker_url = redis_url
        procs = [start(workdir, f"baseline{n}", [sys.executable, "-m", "celery", "-A", "bench.e2e_baseline", "worker",
                                                 "--pool", "threads", "-c", str(baseline_threads(args)), "-Q", "bench",
                                                 "-l", "warning", "-n", f"bench{n}@%h", "--without-gossip",
                                                 "--without-mingle", "--without-heartbeat"], env)
                 for n in range(args.workers)]
        try:
            with psycopg.connect(database_url, autocommit=True) as conn, app.producer_or_acquire() as producer:
                def finished(tag: str) -> int:
                    row = conn.execute("SELECT count(*) FROM bench_ticket WHERE answer LIKE %s",
                                       (f"%{tag} %",)).fetchone()
                    return int(row[0]) if row else 0

                def send(items: list[dict[str, Any]]) -> None:
                    for item in items:
                        app.send_task("bench.e2e_create", args=[item["target"], item["subject"], item["body"],
                                                                time.time()], queue="bench", producer=producer)

                warm = items_for(20 * args.workers, "warm")
                send(warm)
                wait_until(lambda: finished("warm"), len(warm), 120, procs, "warm-up")

                phase = throughput_phase(args, procs, procs, sim, workdir, f"baseline-{latency}ms", send,
                                         lambda: finished("bulk"))
                times = [float(r[0]) for r in conn.execute(
                    "SELECT finished_at FROM bench_ticket WHERE answer LIKE '%bulk %'")]
                paced = items_for(args.paced, "paced")
                pace(args.paced, args.paced_rate, lambda n: send([paced[n]]))
                wait_until(lambda: finished("paced"), args.paced, args.timeout, procs, "latency phase")
                rows = conn.execute("SELECT id::text, provider, finished_at - published_at FROM bench_ticket "
                                    "WHERE answer LIKE '%paced %'").fetchall()
                latencies = {row[0]: (row[1], float(row[2]) * 1000) for row in rows}
                stored = conn.execute("SELECT count(*) FROM bench_ticket").fetchone()
                size = conn.execute("SELECT pg_total_relation_size('bench_ticket')").fetchone()
                assert stored is not None and size is not None
        finally:
            for proc in procs:
                proc.stop()
    return result("baseline", latency, args, times, phase, len(times), latencies, float(size[0]) / int(stored[0]),
                  0.0, {"cpu_s": phase.by_process})


def result(variant: str, latency: int, args: argparse.Namespace, times: list[float], phase: Phase, succeeded: int,
           latencies: dict[str, tuple[str, float]], db_bytes: float, attempts: float,
           extra: dict[str, Any]) -> RunResult:
    every = [ms for _, ms in latencies.values()]
    hostup = [ms for target, ms in latencies.values() if target == "hostup"]
    nocworx = [ms for target, ms in latencies.values() if target == "nocworx"]
    per_1000 = 1000 / max(1, len(times))
    return RunResult(
        variant=variant, latency_ms=latency, intents=args.intents, done=len(times), succeeded=succeeded,
        tickets_per_s=round(sustained_rate(times), 1), phase_s=round(max(times) - phase.began, 2),
        cpu_per_1000=round(phase.cpu * per_1000, 2), pg_cpu_per_1000=round(phase.pg_cpu * per_1000, 2),
        sim_cpu_per_1000=round(phase.sim_cpu * per_1000, 2), peak_rss_mb=round(phase.rss_mb, 1),
        p50_ms=round(percentile(every, 50), 1), p95_ms=round(percentile(every, 95), 1),
        p99_ms=round(percentile(every, 99), 1), hostup_p95_ms=round(percentile(hostup, 95), 1),
        nocworx_p95_ms=round(percentile(nocworx, 95), 1), db_bytes_per_intent=round(db_bytes),
        attempts_per_intent=round(attempts, 2), extra=extra)


# -- report ------------------------------------------------------------------------------------------

def medians(results: list[RunResult]) -> dict[str, Any]:
    numeric = [k for k, v in asdict(results[0]).items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return {k: round(statistics.median(getattr(r, k) for r in results), 2) for k in numeric}


def table(summary: dict[tuple[int, str], dict[str, Any]]) -> str:
    head = (f"{'latency':>7} {'variant':10} {'tickets/s':>9} {'vs base':>7} {'p50 ms':>7} {'p95 ms':>7} "
            f"{'p99 ms':>7} {'HostUp p95':>10} {'NocWorx p95':>11} {'CPU s/1k':>8} {'PG s/1k':>7} "
            f"{'sim s/1k':>8} {'RSS MB':>7} {'DB B/int':>8} {'att/int':>7}")
    lines = [head, "-" * len(head)]
    for (latency, variant), m in sorted(summary.items()):
        base = summary.get((latency, "baseline"))
        ratio = f"{100 * m['tickets_per_s'] / base['tickets_per_s']:6.0f}%" if base and base["tickets_per_s"] else ""
        lines.append(f"{latency:5d}ms {variant:10} {m['tickets_per_s']:9.1f} {ratio:>7} {m['p50_ms']:7.0f} "
                     f"{m['p95_ms']:7.0f} {m['p99_ms']:7.0f} {m['hostup_p95_ms']:10.0f} {m['nocworx_p95_ms']:11.0f} "
                     f"{m['cpu_per_1000']:8.2f} {m['pg_cpu_per_1000']:7.2f} {m['sim_cpu_per_1000']:8.2f} "
                     f"{m['peak_rss_mb']:7.1f} {m['db_bytes_per_intent']:8.0f} {m['attempts_per_intent']:7.2f}")
    return "\n".join(lines)


def verdicts(summary: dict[tuple[int, str], dict[str, Any]], workers: int) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for (latency, variant), m in sorted(summary.items()):
        if variant != "dispatcher":
            continue
        base = summary.get((latency, "baseline"))
        if latency == 0:
            out.append(("0 ms: >= 300 tickets/s", m["tickets_per_s"] >= 300))
            if base:
                out.append(("0 ms: >= 50 % of the baseline", m["tickets_per_s"] >= 0.5 * base["tickets_per_s"]))
        if latency == 200 and workers == 1:
            out.append(("200 ms: >= 200 tickets/s with one worker process", m["tickets_per_s"] >= 200))
        if not math.isnan(m["hostup_p95_ms"]):  # no latency phase (--paced 0): nothing to judge
            out.append((f"{latency} ms: HostUp p95 < 250 ms + latency", m["hostup_p95_ms"] < 250 + latency))
        out.append((f"{latency} ms: worker RSS < 200 MB", m["peak_rss_mb"] < 200))
        out.append((f"{latency} ms: < 4 KB of database per intent", m["db_bytes_per_intent"] < 4096))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--intents", type=int, default=10_000)
    parser.add_argument("--latency", default="0,200")
    parser.add_argument("--pool", choices=["gevent", "threads"], default=DEFAULT_POOL)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--db-connections", type=int, default=None)
    parser.add_argument("--paced", type=int, default=400)
    parser.add_argument("--paced-rate", type=float, default=20.0)
    parser.add_argument("--task-delay", type=float, default=0.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "e2e.json")
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or WORKER_CONCURRENCY[args.pool]
    args.db_connections = args.db_connections or max(4, Settings.model_fields["db_connections"].default // args.workers)
    latencies = [int(x) for x in args.latency.split(",") if x.strip()]
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in chosen if v not in VARIANTS]:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    runs: dict[tuple[int, str], list[RunResult]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp, leased_redis_db() as redis_url:
        workdir = Path(tmp)
        sim = Simulator(workdir)
        try:
            for run in range(args.runs):
                for latency in latencies:
                    for variant in chosen:  # side by side: each run has both, one after the other
                        print(f"run {run + 1}/{args.runs}: {latency} ms, {variant} ...", flush=True)
                        sim.http.post("/reset").raise_for_status()
                        sim.http.put("/config", json={
                            "hostup_key": HOSTUP_KEY, "nocworx_key": NOCWORX_KEY, "rate_limit": 0,
                            "latency_ms": [latency, latency], "task_delay_s": args.task_delay,
                            "critical_per_hour": 0}).raise_for_status()
                        runner = run_dispatcher if variant == "dispatcher" else run_baseline
                        res = runner(args, latency, sim, redis_url, workdir)
                        runs.setdefault((latency, variant), []).append(res)
                        print(f"   {res.tickets_per_s:.1f} tickets/s, p95 {res.p95_ms:.0f} ms "
                              f"(HostUp {res.hostup_p95_ms:.0f}, NocWorx {res.nocworx_p95_ms:.0f}), "
                              f"CPU {res.cpu_per_1000:.2f} s/1k, RSS {res.peak_rss_mb:.0f} MB, "
                              f"{res.db_bytes_per_intent:.0f} B/intent, {res.succeeded}/{res.intents} succeeded"
                              + (f" {res.extra}" if res.extra else ""), flush=True)
        finally:
            sim.close()
    summary = {key: medians(results) for key, results in runs.items()}
    print()
    print(f"medians of {args.runs} run(s); {args.intents} intents (half HostUp, half NocWorx), "
          f"{args.workers} worker process(es), pool {args.pool} x {args.concurrency}; latency: {args.paced} intents "
          f"at {args.paced_rate:g}/s; {os.cpu_count()} cores")
    print(table(summary))
    checks = verdicts(summary, args.workers)
    if checks:
        print("goals: " + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "median": {f"{lat}ms/{var}": m for (lat, var), m in summary.items()},
        "runs": {f"{lat}ms/{var}": [asdict(r) for r in rs] for (lat, var), rs in runs.items()},
    }, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
