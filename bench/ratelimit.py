"""Benchmark: how close to a provider's rate limit each way of sending gets, and at what cost.

Run (needs PostgreSQL and Redis, the same as the test suite)::

    .venv/bin/python -m bench.ratelimit                      # 2000 intents, L = 20/s, 1 run
    .venv/bin/python -m bench.ratelimit --intents 400        # a quick run
    .venv/bin/python -m bench.ratelimit --runs 3 --variants a,b

Options:
    --intents N      tickets to make per variant and run (default 2000)
    --limit L        the simulator's limit: L requests per window (default 20)
    --window S       the simulator's fixed window in seconds (default 1.0)
    --workers W      worker processes per variant (default 4)
    --threads T      threads per worker process (default 4)
    --burst B        the dispatcher's configured burst (default 1: the setting that never overruns a
                     fixed-window provider, see dispatcher/ratelimit.py)
    --short-wait S   the dispatcher's [scheduler] short_wait_s (default 30, the product default):
                     throttled intents whose turn is further away wait in Postgres for the scheduler
    --runs N         repeat every variant N times; the table shows medians (default 1)
    --variants V     comma-separated subset of a,b,c (default a,b,c)
    --timeout S      give a variant this long to make its tickets, then report what it made
                     (default: 5 x the ideal time + 60 s)
    --out PATH       where the JSON goes (default bench/results/ratelimit.json)

Environment: ``DISPATCHER_TEST_PG`` (an admin URL; a scratch database is created and dropped) and
``DISPATCHER_TEST_REDIS`` (a Redis database number is leased like the tests do).

The variants, side by side against one simulator process (`uvicorn`, HostUp API, fixed window of
``--window`` seconds allowing ``--limit`` requests, answering 429 with Retry-After in seconds):

a  this dispatcher: W x ``dispatcher worker --pool threads --concurrency T`` and a scheduler, over
   Postgres and Redis, the target configured with the provider's limit (``rate`` = L per window,
   ``burst`` = B). The intents are stored (``accept_many``) before the workers start.
b  Celery's built-in ``rate_limit`` = L per window on a task that POSTs the create with httpx
   (bench/celery_baseline.py). Celery enforces it per worker: W workers may send W x L. A 429 is
   retried after its Retry-After. (With the Redis broker Celery also releases rate-limited tasks in
   bursts about once a second, celery/celery#5927: its bursts overshoot and its average lags.)
c  the same task with no limit, retrying 429s with Celery's ``retry_backoff``.

Reported per variant (medians over runs): achieved rate as % of L (tickets per second between the
5th and 95th percentile ticket, over L per window), requests and 429s (count, % of requests),
requests that reached the provider before a Retry-After it had sent expired (later than 50 ms after
the 429, so not already on the wire), the busiest window (requests in any ``--window`` seconds), and
total time (first request to last ticket). The table is printed and the JSON saved.

Goal for (a): at least 95 % of L sustained, 429s under 1 % of requests, nothing sent early.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from dispatcher.simulator.audit import arrivals, busiest_window, sent_early, throttled

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("DISPATCHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("DISPATCHER_TEST_REDIS", "redis://127.0.0.1:6379")
HOSTUP_KEY = "bench-hostup-key-0123456789abcdef"
VARIANTS = {
    "a": "a  dispatcher (shared GCRA in Redis)",
    "b": "b  Celery rate_limit (per worker)",
    "c": "c  no limit, Celery retry_backoff",
}


# -- processes -----------------------------------------------------------------------------------

@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left (Celery's children too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


def start(workdir: Path, name: str, argv: list[str], env: dict[str, str]) -> Proc:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=ROOT, start_new_session=True)
    return Proc(name, popen, log)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "BENCH_"))}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


class Simulator:
    """The simulator in its own process (so the benchmark's own work never slows it)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start(workdir, "simulator", [sys.executable, "-m", "uvicorn", "--factory",
                                                 "dispatcher.simulator.app:create_app", "--host", "127.0.0.1",
                                                 "--port", str(self.port), "--no-access-log", "--log-level",
                                                 "warning"], base_env({}))
        self.http = httpx.Client(base_url=f"{self.url}/_sim", timeout=60)
        deadline = time.monotonic() + 30
        while True:
            self.proc.check()
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the simulator did not start")
            time.sleep(0.1)

    def prepare(self, limit: int, window: float) -> None:
        self.http.post("/reset").raise_for_status()
        self.http.put("/config", json={"hostup_key": HOSTUP_KEY, "rate_limit": limit, "rate_window_s": window,
                                       "critical_per_hour": 0, "retry_after_format": "seconds"}).raise_for_status()

    def tickets(self) -> int:
        return int(self.http.get("/stats").json()["hostup"]["tickets"])

    def ticket_times(self) -> list[float]:
        return sorted(float(t["created_at"]) for t in self.http.get("/tickets").json() if t["provider"] == "hostup")

    def requests(self) -> list[dict[str, Any]]:
        log: list[dict[str, Any]] = self.http.get("/requests", params={"provider": "hostup"}).json()
        return log

    def close(self) -> None:
        self.http.close()
        self.proc.stop()


@contextlib.contextmanager
def leased_redis_db() -> Iterator[str]:
    """A Redis database number of our own, leased as tests/conftest.py does."""
    admin: redis.Redis[Any] = redis.Redis.from_url(f"{REDIS_BASE}/0")
    token = f"bench-{os.getpid()}-{uuid.uuid4().hex}"
    for number in range(15, 0, -1):
        if admin.set(f"dispatcher-test-lease:{number}", token, nx=True, ex=7200):
            break
    else:
        raise RuntimeError("every Redis test database is leased")
    try:
        yield f"{REDIS_BASE}/{number}"
    finally:
        if admin.get(f"dispatcher-test-lease:{number}") == token.encode():
            admin.delete(f"dispatcher-test-lease:{number}")
        admin.close()


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    from dispatcher.store import db

    name = f"dispatcher_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    try:
        db.upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- measuring -------------------------------------------------------------------------------------

@dataclass
class RunResult:
    variant: str
    intents: int
    tickets: int
    rate_per_s: float       # tickets per second, 5th to 95th percentile ticket
    rate_pct: float         # ... as % of the provider's limit
    requests: int
    throttled: int          # 429s
    throttled_pct: float
    early: int              # requests that arrived before a Retry-After had passed
    busiest: int            # most requests in any one window
    total_s: float          # first request to last ticket
    complete: bool


def sustained_rate(times: list[float]) -> float:
    """Tickets per second between the 5th and 95th percentile ticket (start-up and tail left out)."""
    if len(times) < 2:
        return 0.0
    low, high = int(0.05 * len(times)), max(int(0.95 * len(times)) - 1, int(0.05 * len(times)) + 1)
    high = min(high, len(times) - 1)
    span = times[high] - times[low]
    return (high - low) / span if span > 0 else 0.0


def measure(variant: str, sim: Simulator, intents: int, limit: int, window: float, complete: bool) -> RunResult:
    log = sim.requests()
    times = sim.ticket_times()
    refused = throttled(log)
    early = {(r["at"], r["path"], r["marker"]) for _, r in sent_early(log)}
    rate = sustained_rate(times)
    sent = arrivals(log)
    return RunResult(
        variant=variant, intents=intents, tickets=len(times), rate_per_s=round(rate, 3),
        rate_pct=round(100 * rate / (limit / window), 2), requests=len(log), throttled=len(refused),
        throttled_pct=round(100 * len(refused) / max(1, len(log)), 3), early=len(early),
        busiest=busiest_window(sent, window), total_s=round((times[-1] - sent[0]) if times and sent else 0.0, 2),
        complete=complete)


def wait_for_tickets(sim: Simulator, count: int, timeout: float, procs: list[Proc]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sim.tickets() >= count:
            return True
        for proc in procs:
            proc.check()
        time.sleep(0.5)
    return sim.tickets() >= count


# -- the variants ----------------------------------------------------------------------------------

def rate_setting(limit: int, window: float) -> str:
    """The dispatcher's ``rate`` for L per window (the grammar has whole periods only)."""
    for unit, seconds in (("second", 1.0), ("minute", 60.0), ("hour", 3600.0)):
        count = limit * seconds / window
        if abs(count - round(count)) < 1e-9 and round(count) >= 1:
            return f"{round(count)}/{unit}"
    raise SystemExit(f"--limit {limit} per --window {window} s is not a whole number per second/minute/hour")


def run_dispatcher(args: argparse.Namespace, sim: Simulator, redis_url: str, workdir: Path, timeout: float) -> bool:
    from dispatcher.config import Settings, parse_config
    from dispatcher.runtime import build_runtime

    redis.Redis.from_url(redis_url).flushdb()
    with scratch_database() as database_url:
        data = {"targets": {"hostup": {"provider": "hostup", "base_url": f"{sim.url}/api/v2",
                                       "api_key_env": "BENCH_HOSTUP_KEY", "rate": rate_setting(args.limit, args.window),
                                       "burst": args.burst, "critical_policy": "downgrade"}},
                "scheduler": {"short_wait_s": args.short_wait}}
        config_file = workdir / "dispatcher.toml"
        config_file.write_text(
            "[targets.hostup]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in data["targets"]["hostup"].items())
            + f"[scheduler]\nshort_wait_s = {args.short_wait!r}\n")
        env = {"BENCH_HOSTUP_KEY": HOSTUP_KEY}
        config = parse_config(data, Settings(database_url=database_url, broker_url=redis_url), env=env)
        producer = build_runtime(config)
        try:
            items = [{"target": "hostup", "topic": "vps", "subject": f"bench {n}", "body": "Benchmark ticket."}
                     for n in range(args.intents)]
            for start_at in range(0, len(items), 1000):
                producer.service.accept_many(items[start_at:start_at + 1000], source="bench")
        finally:
            producer.close()
        proc_env = base_env({"DISPATCHER_DATABASE_URL": database_url, "DISPATCHER_BROKER_URL": redis_url,
                             "DISPATCHER_CONFIG": str(config_file), "DISPATCHER_LOG_LEVEL": "WARNING",
                             "DISPATCHER_LOG_FORMAT": "json", **env})
        dispatcher_bin = str(Path(sys.executable).parent / "dispatcher")
        procs = [start(workdir, f"a-worker{n}", [dispatcher_bin, "worker", "--pool", "threads", "--concurrency",
                                                 str(args.threads)], {**proc_env, "DISPATCHER_WORKER_NAME": f"w{n}"})
                 for n in range(args.workers)]
        procs.append(start(workdir, "a-scheduler", [dispatcher_bin, "scheduler"], proc_env))
        try:
            return wait_for_tickets(sim, args.intents, timeout, procs)
        finally:
            for proc in procs:
                proc.stop()


def run_celery(args: argparse.Namespace, sim: Simulator, redis_url: str, workdir: Path, timeout: float,
               task: str) -> bool:
    redis.Redis.from_url(redis_url).flushdb()
    per_second = args.limit / args.window
    env = base_env({"BENCH_BROKER_URL": redis_url, "BENCH_HOSTUP_URL": f"{sim.url}/api/v2",
                    "BENCH_HOSTUP_KEY": HOSTUP_KEY, "BENCH_RATE_LIMIT": f"{per_second:g}/s"})
    os.environ.update({k: env[k] for k in ("BENCH_BROKER_URL", "BENCH_RATE_LIMIT")})
    from bench.celery_baseline import app

    app.conf.broker_url = redis_url
    with app.producer_or_acquire() as producer:
        for n in range(args.intents):
            app.send_task(task, args=[f"bench {n}", "Benchmark ticket."], queue="bench", producer=producer)
    procs = [start(workdir, f"{task}-{n}", [sys.executable, "-m", "celery", "-A", "bench.celery_baseline", "worker",
                                            "--pool", "threads", "-c", str(args.threads), "-Q", "bench",
                                            "-l", "warning", "-n", f"bench{n}@%h", "--without-gossip",
                                            "--without-mingle", "--without-heartbeat"], env)
             for n in range(args.workers)]
    try:
        return wait_for_tickets(sim, args.intents, timeout, procs)
    finally:
        for proc in procs:
            proc.stop()


# -- report ------------------------------------------------------------------------------------------

def medians(results: list[RunResult]) -> dict[str, Any]:
    numeric = [k for k, v in asdict(results[0]).items() if isinstance(v, int | float) and not isinstance(v, bool)]
    out: dict[str, Any] = {k: round(statistics.median(getattr(r, k) for r in results), 3) for k in numeric}
    out["complete"] = all(r.complete for r in results)
    return out


def table(summary: dict[str, dict[str, Any]], limit: int, window: float) -> str:
    head = (f"{'variant':38} {'rate %L':>8} {'tickets/s':>9} {'requests':>8} {'429s':>7} {'429 %':>7} "
            f"{'early':>6} {'busiest':>8} {'total s':>8}")
    lines = [head, "-" * len(head)]
    for key, m in summary.items():
        done = "" if m["complete"] else f"  (only {m['tickets']:g} of {m['intents']:g} made)"
        lines.append(f"{VARIANTS[key]:38} {m['rate_pct']:8.1f} {m['rate_per_s']:9.2f} {m['requests']:8.0f} "
                     f"{m['throttled']:7.0f} {m['throttled_pct']:7.2f} {m['early']:6.0f} "
                     f"{m['busiest']:4.0f}/{limit:<3d} {m['total_s']:8.1f}{done}")
    lines.append(f"(provider limit L = {limit} per {window:g} s; busiest = most requests in any {window:g} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--intents", type=int, default=2000)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--window", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--burst", type=int, default=1)
    parser.add_argument("--short-wait", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--variants", default="a,b,c")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ratelimit.json")
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from a, b, c")
    ideal = args.intents / (args.limit / args.window)
    timeout = args.timeout or 5 * ideal + 60
    runs: dict[str, list[RunResult]] = {v: [] for v in chosen}
    with tempfile.TemporaryDirectory(prefix="bench-ratelimit-") as tmp, leased_redis_db() as redis_url:
        workdir = Path(tmp)
        sim = Simulator(workdir)
        try:
            for run in range(args.runs):
                for variant in chosen:
                    print(f"run {run + 1}/{args.runs}: {VARIANTS[variant].strip()} ...", flush=True)
                    sim.prepare(args.limit, args.window)
                    if variant == "a":
                        complete = run_dispatcher(args, sim, redis_url, workdir, timeout)
                    else:
                        task = "bench.create_rate_limited" if variant == "b" else "bench.create_backoff"
                        complete = run_celery(args, sim, redis_url, workdir, timeout, task)
                    result = measure(variant, sim, args.intents, args.limit, args.window, complete)
                    runs[variant].append(result)
                    print(f"   {result.rate_pct:.1f} % of L, {result.throttled} 429s, {result.early} early, "
                          f"{result.total_s:.1f} s", flush=True)
        finally:
            sim.close()
    summary = {v: medians(results) for v, results in runs.items()}
    print()
    print(table(summary, args.limit, args.window))
    if "a" in summary:
        a = summary["a"]
        verdicts = [("rate >= 95 % of L", a["rate_pct"] >= 95), ("429s < 1 % of requests", a["throttled_pct"] < 1),
                    ("nothing sent early", a["early"] == 0)]
        print("goal for (a): " + ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in verdicts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "median": summary, "runs": {v: [asdict(r) for r in results] for v, results in runs.items()},
    }, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
