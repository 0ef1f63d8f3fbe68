"""Intake throughput: intents accepted per second, four ways, against a plain baseline in the same run.

    .venv/bin/python -m bench.intake [--rows 50000] [--single-rows 2000] [--runs 3]
                                     [--modes baseline,python,http,batch,import]
                                     [--pg postgresql://postgres@127.0.0.1:5432/postgres]
                                     [--redis redis://127.0.0.1:6379] [--batch-size 500]

Modes, all on Postgres (a database of its own, created and dropped here) with Redis as the Celery
broker (a database number leased like the test suite's, flushed between runs; no worker runs, the
messages just queue):

- ``baseline``: a plain SQLAlchemy Core insert of the same rows (one executemany, one transaction)
  plus a Celery ``send_task`` per row over one producer connection: what "store, then enqueue"
  costs without validation, idempotency, events or bulk tricks.
- ``python``: ``Dispatcher.accept`` one intent at a time (``--single-rows`` of them).
- ``http``: ``POST /v1/intents`` one at a time to a real ``dispatcher api`` (uvicorn) subprocess,
  from one keep-alive httpx client (``--single-rows``).
- ``batch``: ``POST /v1/intents/batch`` in batches of ``--batch-size`` to the same server (``--rows``).
- ``import``: ``dispatcher import FILE`` of a ``--rows``-row CSV file as a subprocess, timed from
  spawn to exit (start-up included).

Every intent carries an idempotency key, so every mode stores the same rows. Each mode runs
``--runs`` times on emptied tables and a flushed broker; the table shows medians, the ratio to the
baseline's rate, and the CPU seconds of the process doing the intake (this process; the API server
for ``http`` and ``batch``; the ``import`` subprocess), which, unlike wall-clock rates, does not move
with the load of a shared machine. Results go to bench/results/intake.json (gitignored).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

RESULTS = Path(__file__).resolve().parent / "results" / "intake.json"
API_TOKEN = "bench-token-0123456789abcdef"
TOPICS = ("vps", "ip", "network", "dns", "domain", "hosting", "email", "ssl", "billing")
MODES = ("baseline", "python", "http", "batch", "import")


def intents(count: int) -> list[dict[str, Any]]:
    """Deterministic, realistic intents: both providers, a service, a label, a multi-line body."""
    out = []
    for i in range(count):
        hostup = i % 2 == 0
        out.append({
            "target": "hostup" if hostup else "nocworx", "subject": f"Disk usage alert on web-{i}",
            "body": f"The disk on web-{i} is at 9{i % 10}%.\nPlease have a look.",
            "priority": ("low", "medium", "high")[i % 3], "topic": TOPICS[i % len(TOPICS)],
            "service": {"type": "vps" if hostup else "server", "id": str(100_000 + i)},
            "labels": {"host": f"web-{i}"}, "idempotency_key": f"bench-{i}",
        })
    return out


def write_csv(path: Path, items: list[dict[str, Any]]) -> None:
    columns = ["target", "subject", "body", "priority", "topic", "service.type", "service.id", "labels.host",
               "idempotency_key"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for it in items:
            writer.writerow([it["target"], it["subject"], it["body"], it["priority"], it["topic"],
                             it["service"]["type"], it["service"]["id"], it["labels"]["host"],
                             it["idempotency_key"]])


# -- the environment ----------------------------------------------------------------------------------

@dataclass
class Env:
    database_url: str
    broker_url: str
    config_path: Path
    workdir: Path
    vars: dict[str, str] = field(default_factory=dict)

    def reset(self) -> None:
        """Empty tables and broker between runs."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute("TRUNCATE intents CASCADE")
        client = redis.Redis.from_url(self.broker_url)
        client.flushdb()
        client.close()

    def stored(self) -> tuple[int, int]:
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute("SELECT count(*) FROM intents").fetchone()
        client = redis.Redis.from_url(self.broker_url)
        messages = sum(int(client.llen(f"dispatcher.{t}")) for t in ("hostup", "nocworx"))
        client.close()
        return (int(row[0]) if row else 0), messages


@contextmanager
def environment(pg_admin: str, redis_base: str) -> Iterator[Env]:
    from dispatcher.store import db

    name = f"dispatcher_bench_{os.getpid()}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = f"{pg_admin.rsplit('/', 1)[0]}/{name}"
    db.upgrade(database_url)
    admin = redis.Redis.from_url(f"{redis_base}/0")
    token = f"bench-{os.getpid()}-{uuid.uuid4().hex}"
    number = next((n for n in range(15, 0, -1)
                   if admin.set(f"dispatcher-test-lease:{n}", token, nx=True, ex=3600)), None)
    if number is None:
        raise SystemExit("all 15 Redis test databases are leased; try again later")
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-") as tmp:
        workdir = Path(tmp)
        config_path = workdir / "dispatcher.toml"
        config_path.write_text(
            '[targets.hostup]\nprovider = "hostup"\nbase_url = "http://127.0.0.1:9/api/v2"\n'
            'api_key_env = "BENCH_HOSTUP_KEY"\n\n'
            '[targets.nocworx]\nprovider = "nocworx"\nbase_url = "http://127.0.0.1:9"\n'
            'api_key_env = "BENCH_NOCWORX_KEY"\n\n'
            '[api.tokens.bench]\ntoken_env = "BENCH_API_TOKEN"\nscopes = ["intents:write"]\n')
        env = Env(database_url, f"{redis_base}/{number}", config_path, workdir)
        env.vars = {**{k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")},
                    "DISPATCHER_DATABASE_URL": database_url, "DISPATCHER_BROKER_URL": env.broker_url,
                    "DISPATCHER_CONFIG": str(config_path), "DISPATCHER_LOG_LEVEL": "WARNING",
                    "BENCH_HOSTUP_KEY": "bench-hostup-key-0123456789", "BENCH_NOCWORX_KEY": "bench-nocworx-key-0123",
                    "BENCH_API_TOKEN": API_TOKEN}
        try:
            yield env
        finally:
            redis.Redis.from_url(env.broker_url).flushdb()
            if admin.get(f"dispatcher-test-lease:{number}") == token.encode():
                admin.delete(f"dispatcher-test-lease:{number}")
            admin.close()
            with psycopg.connect(pg_admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def dispatcher_command() -> list[str]:
    script = Path(sys.executable).parent / "dispatcher"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dispatcher.cli"]


def load_app_config(env: Env) -> Any:
    from dispatcher.config import Settings, load_config

    settings = Settings(database_url=env.database_url, broker_url=env.broker_url, config=env.config_path)
    return load_config(settings, env=env.vars)


# -- the modes ------------------------------------------------------------------------------------------

def run_baseline(env: Env, items: list[dict[str, Any]]) -> dict[str, float]:
    """Plain: a Core executemany of the rows, then send_task per row on one producer."""
    from sqlalchemy import Table, create_engine, insert

    from dispatcher.store.db import normalise_url
    from dispatcher.store.tables import IntentRow
    from dispatcher.worker.app import TASK_NAMES, make_celery, queue_name

    config = load_app_config(env)
    engine = create_engine(normalise_url(env.database_url))
    app = make_celery(config)
    table: Table = IntentRow.__table__  # type: ignore[assignment]
    cpu, started = time.process_time(), time.perf_counter()
    now = datetime.now(UTC)
    rows = [{"id": uuid.uuid4(), "target": it["target"], "provider": it["target"], "status": "queued",
             "source": "bench", "subject": it["subject"], "body": it["body"], "priority": it["priority"],
             "topic": it["topic"], "service": it["service"], "cc": [], "labels": it["labels"],
             "idempotency_key": it["idempotency_key"], "attempts": 0, "deliveries": 0, "needs_reconcile": False,
             "next_attempt_at": now, "enqueued_at": now, "created_at": now, "updated_at": now} for it in items]
    with engine.begin() as conn:
        conn.execute(insert(table), rows)
    inserted = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for row in rows:
            app.send_task(TASK_NAMES["dispatch"], args=[str(row["id"])], queue=queue_name(row["target"]),
                          producer=producer)
    finished = time.perf_counter()
    engine.dispose()
    return {"seconds": finished - started, "insert_s": inserted - started, "publish_s": finished - inserted,
            "cpu_s": time.process_time() - cpu}


def run_python(env: Env, items: list[dict[str, Any]]) -> dict[str, float]:
    from dispatcher.runtime import build_runtime

    runtime = build_runtime(load_app_config(env))
    try:
        cpu, started = time.process_time(), time.perf_counter()
        for item in items:
            runtime.service.accept(item, source="bench")
        return {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}
    finally:
        runtime.close()


@contextmanager
def api_server(env: Env) -> Iterator[tuple[str, int]]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    log = (env.workdir / "api.log").open("wb")
    proc = subprocess.Popen([*dispatcher_command(), "api", "--port", str(port)], env=env.vars, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dispatcher api did not start; see {env.workdir / 'api.log'}")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a process has used (Linux /proc), to tell our cost from the machine's load."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_http(url: str, pid: int, items: list[dict[str, Any]]) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        client.get("/healthz")  # the connection is open before the clock starts
        cpu, started = process_cpu_s(pid), time.perf_counter()
        for item in items:
            response = client.post("/v1/intents", json=item)
            if response.status_code != 202:
                raise SystemExit(f"POST /v1/intents answered {response.status_code}: {response.text[:300]}")
        return _with_cpu({"seconds": time.perf_counter() - started}, cpu, process_cpu_s(pid))


def run_batch(url: str, pid: int, items: list[dict[str, Any]], size: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        client.get("/healthz")
        cpu, started = process_cpu_s(pid), time.perf_counter()
        for start in range(0, len(items), size):
            response = client.post("/v1/intents/batch", json={"intents": items[start:start + size]})
            if response.status_code != 200 or response.json()["accepted"] != len(items[start:start + size]):
                raise SystemExit(f"POST /v1/intents/batch answered {response.status_code}: {response.text[:300]}")
        return _with_cpu({"seconds": time.perf_counter() - started}, cpu, process_cpu_s(pid))


def run_import(env: Env, path: Path) -> dict[str, float]:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([*dispatcher_command(), "import", str(path)], env=env.vars, capture_output=True,
                            text=True, check=False)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"dispatcher import exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": seconds, "cpu_s": cpu}


def _with_cpu(run: dict[str, float], before: float | None, after: float | None) -> dict[str, float]:
    if before is not None and after is not None:
        run["cpu_s"] = after - before
    return run


# -- the run --------------------------------------------------------------------------------------------

@dataclass
class Measured:
    mode: str
    rows: int
    runs: list[dict[str, float]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(r["seconds"] for r in self.runs)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds

    @property
    def cpu_s(self) -> float | None:
        """Median CPU seconds of the process doing the intake (not the database's or Redis's)."""
        values = [r["cpu_s"] for r in self.runs if "cpu_s" in r]
        return statistics.median(values) if values else None


def measure(env: Env, mode: str, rows: int, runs: int, once: Callable[[], dict[str, float]]) -> Measured:
    result = Measured(mode, rows)
    for number in range(1, runs + 1):
        env.reset()
        run = once()
        stored, messages = env.stored()
        if (stored, messages) != (rows, rows):
            raise SystemExit(f"{mode}: expected {rows} intents and messages, found {stored} and {messages}")
        result.runs.append(run)
        print(f"  {mode:<9} run {number}/{runs}: {rows} in {run['seconds']:.2f} s = {rows / run['seconds']:,.0f}/s",
              flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=50_000, help="intents for baseline, batch and import")
    parser.add_argument("--single-rows", type=int, default=2_000, help="intents for the one-by-one modes")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (the table shows medians)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--pg", default=os.environ.get("DISPATCHER_TEST_PG",
                                                       "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--redis", default=os.environ.get("DISPATCHER_TEST_REDIS", "redis://127.0.0.1:6379"))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the database and the Redis lease are cleaned up
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(unknown)}")

    bulk, single = intents(args.rows), intents(args.single_rows)
    load_before = os.getloadavg()
    results: list[Measured] = []
    with environment(args.pg, args.redis) as env:
        print(f"database {env.database_url}, broker {env.broker_url}; {args.runs} run(s) per mode", flush=True)
        if "baseline" in modes:
            results.append(measure(env, "baseline", args.rows, args.runs, lambda: run_baseline(env, bulk)))
        if "python" in modes:
            results.append(measure(env, "python", args.single_rows, args.runs, lambda: run_python(env, single)))
        if "http" in modes or "batch" in modes:
            with api_server(env) as (url, pid):
                if "http" in modes:
                    results.append(measure(env, "http", args.single_rows, args.runs,
                                           lambda: run_http(url, pid, single)))
                if "batch" in modes:
                    results.append(measure(env, "batch", args.rows, args.runs,
                                           lambda: run_batch(url, pid, bulk, args.batch_size)))
        if "import" in modes:
            path = env.workdir / "intents.csv"
            write_csv(path, bulk)
            results.append(measure(env, "import", args.rows, args.runs, lambda: run_import(env, path)))
    load_after = os.getloadavg()

    baseline = next((r for r in results if r.mode == "baseline"), None)
    labels = {"baseline": "plain insert + send_task per row", "python": "Dispatcher.accept, one by one",
              "http": "POST /v1/intents, one by one", "batch": f"POST /v1/intents/batch ({args.batch_size}/request)",
              "import": "dispatcher import FILE (subprocess)"}
    print()
    print(f"{'mode':<40} {'rows':>7} {'median s':>9} {'intents/s':>10} {'vs baseline':>12} {'CPU s':>7} "
          f"{'per CPU s':>10}")
    for r in results:
        ratio = f"{r.rate / baseline.rate:.2f}x" if baseline else "-"
        cpu = r.cpu_s
        cpu_text = f"{cpu:>7.2f} {r.rows / cpu:>10,.0f}" if cpu else f"{'-':>7} {'-':>10}"
        print(f"{labels[r.mode]:<40} {r.rows:>7} {r.seconds:>9.2f} {r.rate:>10,.0f} {ratio:>12} {cpu_text}")
    print("(CPU s: the intake process's own CPU (the API server's for http and batch); the machine is shared, "
          "so wall-clock rates move with its load)")
    if baseline:
        parts = {k: statistics.median(run[k] for run in baseline.runs) for k in ("insert_s", "publish_s")}
        print(f"(baseline: insert {parts['insert_s']:.2f} s + send_task {parts['publish_s']:.2f} s)")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "at": datetime.now(UTC).isoformat(), "argv": sys.argv[1:], "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after,
        "results": [{"mode": r.mode, "label": labels[r.mode], "rows": r.rows, "median_s": r.seconds,
                     "per_s": r.rate, "vs_baseline": (r.rate / baseline.rate) if baseline else None,
                     "median_cpu_s": r.cpu_s, "runs": r.runs} for r in results],
    }, indent=2))
    print(f"saved {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
