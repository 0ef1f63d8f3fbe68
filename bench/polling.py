"""Benchmark: how soon a resolved NocWorx task is seen, and how many polls that costs, per poll schedule.

Run (needs PostgreSQL and Redis, the same as the test suite)::

    .venv/bin/python -m bench.polling                        # 200 tasks of 0.5-120 s, every variant, 1 run
    .venv/bin/python -m bench.polling --runs 2               # the figures in the README
    .venv/bin/python -m bench.polling --tasks 50 --max-delay 20 --variants a,b   # a quick run

Options:
    --tasks N          NocWorx intents per variant and run (default 200)
    --min-delay S      each task resolves a uniform random time after its 202, at least S (default 0.5)
    --max-delay S      ... and at most S seconds (default 120)
    --concurrency T    threads of the one ``dispatcher worker --pool threads`` (default 16)
    --spread S         submit the intents one by one, evenly over S seconds, while the worker runs
                       (default 60); 0: all at once (``accept_many``) before the worker starts, where
                       the first polls wait behind the creates still queued
    --runs N           repeat every variant N times; the table shows medians over runs (default 1)
    --variants V       comma-separated subset of a,b,c,d (default a,b,c,d)
    --seed S           the simulator's seed in run 1 (run k uses S + k - 1); every variant of a run gets
                       the same task delays, in the same order (default 1)
    --timeout S        give a variant this long to finish its intents, then report what finished
                       (default: spread + 1.5 x max delay + 120 s)
    --out PATH         where the JSON goes (default bench/results/polling.json)

Environment: ``DISPATCHER_TEST_PG`` (an admin URL; a scratch database is created and dropped) and
``DISPATCHER_TEST_REDIS`` (a Redis database number is leased like the tests do).

The variants, one after the other against one simulator process (NocWorx API, no rate limit, every
task resolving to success after its delay), each with a fresh database and Redis database, real
processes (``dispatcher worker --pool threads --concurrency T`` and ``dispatcher scheduler``) and the
target's ``rate`` at 1000/second (burst 100) so that no poll ever waits for the budget. The intents
arrive evenly over ``--spread`` seconds (by ``Dispatcher.accept``, one by one). Only the
``[targets.nocworx.poll]`` table differs:

a  the schedule (the defaults): first look 0.5 s after the 202, then every 1 s + 0.1 x the task's
   age, at most 30 s (``first_s = 0.5, interval_s = 1, growth = 0.1, max_interval_s = 30``)
b  fixed 1 s (``first_s = interval_s = 1, growth = 0``)
c  fixed 5 s
d  fixed 2 s (the old default)

Measured per task, from the simulator's record and Postgres: its duration d (202 to resolution, the
simulator's ``resolves_at - request_date``), its lag (``intents.finished_at`` of the intent, i.e. when
it became ``succeeded``, minus ``resolves_at``), its polls (``GET /v1/task/{uuid}`` requests that
reached the simulator) and its bound ``0.1 x d + 1 s``. Reported per variant (medians over runs):

- median and 95th percentile lag; the median over tasks of lag / bound; the share of tasks whose lag
  is within their bound;
- median and mean polls per task, and all polls;
- how late polls came (each poll after a task's first: its arrival minus its previous poll's arrival
  plus the scheduled wait; median and 95th percentile): the worker's and the broker's share of the lag;
- the poll rate the provider saw: the mean from the first poll to the last, and the busiest second.
  A worker that cannot keep up with its schedule shows as late polls and fewer polls than scheduled;
- by duration (under 10 s, 10-60 s, over 60 s): median lag / bound and median polls.

Goal: the median lag under 10 % of the task's duration + 1 s, with few polls per task. Judged two
ways, both printed: the median over tasks of lag_i / (0.1 x d_i + 1 s) is below 1, and the median
lag is below 0.1 x (median duration) + 1 s.
"""

from __future__ import annotations

import argparse
import itertools
import json
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

from bench.ratelimit import ROOT, Proc, Simulator, base_env, leased_redis_db, scratch_database, start
from dispatcher.backoff import PollPolicy
from dispatcher.simulator.audit import arrivals, busiest_window

NOCWORX_KEY = "bench-nocworx-key-0123456789abcdef"
RATE, BURST = "1000/second", 100
#: name, and the [targets.nocworx.poll] table (deadline_s is added: long enough for every task)
VARIANTS: dict[str, tuple[str, dict[str, float]]] = {
    "a": ("a  schedule 0.5 s, then 1 s + 0.1 x age, <=30", {}),
    "b": ("b  fixed 1 s", {"first_s": 1, "interval_s": 1, "growth": 0}),
    "c": ("c  fixed 5 s", {"first_s": 5, "interval_s": 5, "growth": 0}),
    "d": ("d  fixed 2 s (the old default)", {"first_s": 2, "interval_s": 2, "growth": 0}),
}
BUCKETS = (("under 10 s", 0.0, 10.0), ("10-60 s", 10.0, 60.0), ("over 60 s", 60.0, float("inf")))
TERMINAL = ("succeeded", "failed", "cancelled")


def policy_of(poll: dict[str, float]) -> PollPolicy:
    """The schedule a ``poll`` table means (as dispatcher.config reads it)."""
    interval = float(poll.get("interval_s", PollPolicy.interval_s))
    first = float(poll.get("first_s", min(PollPolicy.first_s, interval)))
    return PollPolicy(first_s=first, interval_s=interval, growth=float(poll.get("growth", PollPolicy.growth)),
                      max_interval_s=float(poll.get("max_interval_s", PollPolicy.max_interval_s)))


# -- measuring -------------------------------------------------------------------------------------

@dataclass
class TaskResult:
    duration_s: float
    lag_s: float
    polls: int

    @property
    def bound_s(self) -> float:
        return 0.1 * self.duration_s + 1.0

    @property
    def ratio(self) -> float:
        return self.lag_s / self.bound_s


@dataclass
class RunResult:
    variant: str
    tasks: int                  # intents submitted
    succeeded: int
    median_duration_s: float
    median_lag_s: float
    p95_lag_s: float
    max_lag_s: float
    median_ratio: float         # median over tasks of lag / (0.1 d + 1)
    within_pct: float           # % of tasks with lag <= 0.1 d + 1
    median_polls: float
    mean_polls: float
    polls: int                  # every GET /v1/task/{uuid}
    overhead_median_s: float    # how much later than scheduled a poll (after a task's first) came
    overhead_p95_s: float
    peak_polls_per_s: int       # the most polls that reached the provider in any 1 s
    polls_per_s: float          # polls over the time from the first to the last
    goal_ratio: bool            # median_ratio < 1
    goal_median: bool           # median_lag_s < 0.1 x median_duration_s + 1
    wall_s: float               # worker start to the last intent terminal
    load: tuple[float, float]   # 1-minute load average at the start and the end
    buckets: dict[str, dict[str, float]] = field(default_factory=dict)
    complete: bool = True
    per_task: list[dict[str, float]] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def poll_overheads(tasks: list[dict[str, Any]], requests: list[dict[str, Any]], policy: PollPolicy) -> list[float]:
    """For every poll after a task's first: its arrival minus when the schedule wanted it (the previous
    look's arrival plus the scheduled wait, the task's age counted from the simulator's
    ``request_date``). What a poll itself costs (claim, request, record, release, publish) and how late
    the broker and the worker deliver its countdown; the first poll is left out, its wait starts when the
    dispatcher has recorded the 202, not at the 202."""
    by_task: dict[str, list[float]] = {}
    for r in requests:
        if r["method"] == "GET" and r["path"].startswith("/v1/task/"):
            by_task.setdefault(r["path"].removeprefix("/v1/task/").rstrip("/").lower(), []).append(float(r["at"]))
    out: list[float] = []
    for task in tasks:
        start_at = float(task["request_date"])
        arrivals = sorted(by_task.get(task["uuid"], []))
        for previous, at in itertools.pairwise(arrivals):
            out.append(at - (previous + policy.wait(previous - start_at)))
    return out


def measure(variant: str, sim: Simulator, database_url: str, count: int, policy: PollPolicy, wall_s: float,
            load: tuple[float, float], complete: bool) -> RunResult:
    tasks: list[dict[str, Any]] = sim.http.get("/tasks").json()
    requests: list[dict[str, Any]] = sim.http.get("/requests", params={"provider": "nocworx"}).json()
    by_uuid = {t["uuid"].lower(): t for t in tasks}
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT status, task_uuid, finished_at FROM intents").fetchall()
    results: list[TaskResult] = []
    for status, task_uuid, finished_at in rows:
        task = by_uuid.get((task_uuid or "").lower())
        if status != "succeeded" or task is None or finished_at is None or task["resolves_at"] is None:
            continue
        results.append(TaskResult(duration_s=float(task["delay_s"]),
                                  lag_s=finished_at.timestamp() - float(task["resolves_at"]), polls=int(task["polls"])))
    lags = [r.lag_s for r in results]
    durations = [r.duration_s for r in results]
    polls = [r.polls for r in results]
    ratios = [r.ratio for r in results]
    overhead = poll_overheads(tasks, requests, policy)
    poll_times = arrivals(r for r in requests if r["method"] == "GET" and r["path"].startswith("/v1/task/"))
    span = poll_times[-1] - poll_times[0] if len(poll_times) > 1 else 0.0
    median_lag = statistics.median(lags) if lags else float("nan")
    median_duration = statistics.median(durations) if durations else float("nan")
    median_ratio = statistics.median(ratios) if ratios else float("nan")
    buckets: dict[str, dict[str, float]] = {}
    for name, low, high in BUCKETS:
        inside = [r for r in results if low <= r.duration_s < high]
        if inside:
            buckets[name] = {"tasks": len(inside), "median_lag_s": round(statistics.median(r.lag_s for r in inside), 3),
                             "median_ratio": round(statistics.median(r.ratio for r in inside), 3),
                             "median_polls": statistics.median(r.polls for r in inside)}
    return RunResult(
        variant=variant, tasks=count, succeeded=len(results), median_duration_s=round(median_duration, 3),
        median_lag_s=round(median_lag, 3), p95_lag_s=round(percentile(lags, 95), 3),
        max_lag_s=round(max(lags, default=0.0), 3), median_ratio=round(median_ratio, 3),
        within_pct=round(100 * sum(1 for r in results if r.lag_s <= r.bound_s) / max(1, len(results)), 1),
        median_polls=statistics.median(polls) if polls else 0,
        mean_polls=round(statistics.fmean(polls), 2) if polls else 0,
        polls=sum(int(t["polls"]) for t in tasks),
        overhead_median_s=round(statistics.median(overhead), 3) if overhead else 0.0,
        overhead_p95_s=round(percentile(overhead, 95), 3),
        peak_polls_per_s=busiest_window(poll_times, 1.0) if poll_times else 0,
        polls_per_s=round(len(poll_times) / span, 1) if span > 0 else 0.0,
        goal_ratio=median_ratio < 1, goal_median=median_lag < 0.1 * median_duration + 1,
        wall_s=round(wall_s, 1), load=load, buckets=buckets, complete=complete,
        per_task=[{"duration_s": round(r.duration_s, 3), "lag_s": round(r.lag_s, 3), "polls": r.polls}
                  for r in results])


# -- one variant -------------------------------------------------------------------------------------

def prepare_simulator(sim: Simulator, args: argparse.Namespace, seed: int) -> None:
    sim.http.post("/reset").raise_for_status()
    sim.http.put("/config", json={"nocworx_key": NOCWORX_KEY, "rate_limit": 0, "seed": seed,
                                  "task_delay_range_s": [args.min_delay, args.max_delay], "task_failure_rate": 0,
                                  "task_rejected_rate": 0, "task_stuck_rate": 0, "task_404_window_s": 0,
                                  "error_rate": 0, "drop_after_create_rate": 0}).raise_for_status()
    sim.http.post("/reset").raise_for_status()   # re-seeded: the n-th task's delay is the same in every variant


def terminal_count(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM intents WHERE status = ANY(%s)", (list(TERMINAL),)).fetchone()
    return int(row[0]) if row else 0


def wait_terminal(database_url: str, count: int, timeout: float, procs: list[Proc]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if terminal_count(database_url) >= count:
            return True
        for proc in procs:
            proc.check()
        time.sleep(0.5)
    return terminal_count(database_url) >= count


def run_variant(variant: str, args: argparse.Namespace, sim: Simulator, redis_url: str, workdir: Path,
                seed: int) -> RunResult:
    from dispatcher.config import Settings, parse_config
    from dispatcher.runtime import build_runtime

    poll = {**VARIANTS[variant][1], "deadline_s": max(900.0, 2 * args.max_delay)}
    prepare_simulator(sim, args, seed)
    redis.Redis.from_url(redis_url).flushdb()
    with scratch_database() as database_url:
        target = {"provider": "nocworx", "base_url": sim.url, "api_key_env": "BENCH_NOCWORX_KEY", "rate": RATE,
                  "burst": BURST}
        config_file = workdir / "dispatcher.toml"
        config_file.write_text(
            "[targets.nocworx]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in target.items())
            + "poll = { " + ", ".join(f"{k} = {v!r}" for k, v in poll.items()) + " }\n"
            + "[scheduler]\nshort_wait_s = 30.0\n")
        env = {"BENCH_NOCWORX_KEY": NOCWORX_KEY}
        config = parse_config({"targets": {"nocworx": {**target, "poll": poll}}},
                              Settings(database_url=database_url, broker_url=redis_url), env=env)
        policy = config.target("nocworx").poll_policy
        items = [{"target": "nocworx", "topic": "dns", "subject": f"bench polling {n}",
                  "body": "Benchmark ticket."} for n in range(args.tasks)]
        producer = build_runtime(config)
        if args.spread <= 0:  # all at once, before the worker starts
            for start_at in range(0, len(items), 1000):
                producer.service.accept_many(items[start_at:start_at + 1000], source="bench")
        proc_env = base_env({"DISPATCHER_DATABASE_URL": database_url, "DISPATCHER_BROKER_URL": redis_url,
                             "DISPATCHER_CONFIG": str(config_file), "DISPATCHER_LOG_LEVEL": "WARNING",
                             "DISPATCHER_LOG_FORMAT": "json", **env})
        dispatcher_bin = str(Path(sys.executable).parent / "dispatcher")
        load_start = os.getloadavg()[0]
        began = time.monotonic()
        worker = [dispatcher_bin, "worker", "--pool", "threads", "--concurrency", str(args.concurrency)]
        procs = [start(workdir, f"{variant}-worker", worker, {**proc_env, "DISPATCHER_WORKER_NAME": "w1"}),
                 start(workdir, f"{variant}-scheduler", [dispatcher_bin, "scheduler"], proc_env)]
        try:
            if args.spread > 0:  # one by one, evenly over --spread seconds, while the worker runs
                for n, item in enumerate(items):
                    pause = began + n * args.spread / len(items) - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    producer.service.accept(item, source="bench")
                    if n % 20 == 0:
                        for proc in procs:
                            proc.check()
            complete = wait_terminal(database_url, args.tasks, args.timeout, procs)
            wall = time.monotonic() - began
        finally:
            for proc in procs:
                proc.stop()
            producer.close()
        load = (round(load_start, 2), round(os.getloadavg()[0], 2))
        return measure(variant, sim, database_url, args.tasks, policy, wall, load, complete)


# -- report ------------------------------------------------------------------------------------------

def medians(results: list[RunResult]) -> dict[str, Any]:
    numeric = [k for k, v in asdict(results[0]).items() if isinstance(v, int | float) and not isinstance(v, bool)]
    out: dict[str, Any] = {k: round(statistics.median(getattr(r, k) for r in results), 3) for k in numeric}
    out["goal_ratio"] = out["median_ratio"] < 1
    out["goal_median"] = out["median_lag_s"] < 0.1 * out["median_duration_s"] + 1
    out["complete"] = all(r.complete for r in results)
    out["buckets"] = {
        name: {key: round(statistics.median(r.buckets[name][key] for r in results if name in r.buckets), 3)
               for key in ("tasks", "median_lag_s", "median_ratio", "median_polls")}
        for name, _, _ in BUCKETS if any(name in r.buckets for r in results)}
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    head = (f"{'variant':44} {'lag med':>8} {'lag p95':>8} {'lag/bound':>9} {'within':>7} {'polls med':>9} "
            f"{'polls mean':>10} {'polls all':>9} {'late med':>8} {'late p95':>8} {'polls/s':>7} {'peak':>5} "
            f"{'goal':>5}")
    lines = [head, "-" * len(head)]
    for key, m in summary.items():
        done = "" if m["complete"] else f"  (only {m['succeeded']:g} of {m['tasks']:g} succeeded)"
        goal = "yes" if m["goal_ratio"] and m["goal_median"] else "NO"
        lines.append(f"{VARIANTS[key][0]:44} {m['median_lag_s']:7.2f}s {m['p95_lag_s']:7.2f}s {m['median_ratio']:9.2f} "
                     f"{m['within_pct']:6.1f}% {m['median_polls']:9.1f} {m['mean_polls']:10.1f} {m['polls']:9.0f} "
                     f"{m['overhead_median_s']:7.3f}s {m['overhead_p95_s']:7.3f}s {m['polls_per_s']:7.1f} "
                     f"{m['peak_polls_per_s']:5.0f} {goal:>5}{done}")
    lines.append("lag: resolution to `succeeded`; bound: 0.1 x duration + 1 s; within: lag <= bound; "
                 "late: a poll's arrival minus when its schedule wanted it (each task's first poll left out)")
    lines.append("")
    head2 = f"{'variant':44} " + " ".join(f"{name + ' lag/bound':>20} {'polls':>6}" for name, _, _ in BUCKETS)
    lines += [head2, "-" * len(head2)]
    for key, m in summary.items():
        cells = []
        for name, _, _ in BUCKETS:
            b = m["buckets"].get(name)
            cells.append(f"{b['median_ratio']:20.2f} {b['median_polls']:6.1f}" if b else f"{'-':>20} {'-':>6}")
        lines.append(f"{VARIANTS[key][0]:44} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.polling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--min-delay", type=float, default=0.5)
    parser.add_argument("--max-delay", type=float, default=120.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--spread", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--variants", default="a,b,c,d")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "polling.json")
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    if not 0 <= args.min_delay <= args.max_delay:
        parser.error("need 0 <= --min-delay <= --max-delay")
    args.timeout = args.timeout or args.spread + 1.5 * args.max_delay + 120
    runs: dict[str, list[RunResult]] = {v: [] for v in chosen}
    with tempfile.TemporaryDirectory(prefix="bench-polling-") as tmp, leased_redis_db() as redis_url:
        workdir = Path(tmp)
        sim = Simulator(workdir)
        try:
            for run in range(args.runs):
                for variant in chosen:
                    print(f"run {run + 1}/{args.runs}: {VARIANTS[variant][0].strip()} ...", flush=True)
                    result = run_variant(variant, args, sim, redis_url, workdir, seed=args.seed + run)
                    runs[variant].append(result)
                    print(f"   median lag {result.median_lag_s:.2f} s (lag/bound {result.median_ratio:.2f}), "
                          f"{result.within_pct:.0f} % within bound, {result.mean_polls:.1f} polls per task, "
                          f"{result.wall_s:.0f} s, load {result.load[0]:.1f}->{result.load[1]:.1f}", flush=True)
        finally:
            sim.close()
    summary = {v: medians(results) for v, results in runs.items()}
    print()
    print(table(summary))
    print()
    for key, m in summary.items():
        print(f"goal for {key} (median lag < 10 % of duration + 1 s): median of lag/bound {m['median_ratio']:.2f} < 1: "
              f"{'yes' if m['goal_ratio'] else 'NO'}; median lag {m['median_lag_s']:.2f} s < 0.1 x median duration "
              f"{m['median_duration_s']:.1f} s + 1 = {0.1 * m['median_duration_s'] + 1:.2f} s: "
              f"{'yes' if m['goal_median'] else 'NO'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count()},
        "variants": {k: {"name": VARIANTS[k][0], "poll": VARIANTS[k][1]} for k in chosen},
        "median": summary, "runs": {v: [asdict(r) for r in results] for v, results in runs.items()},
    }, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
