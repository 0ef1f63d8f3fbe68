"""The chaos harness: one scenario = fresh database + private Redis + the simulator + real processes.

A :class:`Scenario` starts ``dispatcher worker --pool prefork`` and ``dispatcher scheduler`` (and
``dispatcher api`` when asked) as subprocesses against the private Postgres and Redis of
:mod:`tests.chaos.services`, submits ``CHAOS_INTENTS`` intents (default 500) through the Python
service in waves while the scenario injects its faults, waits until every intent is terminal (or
the deadline passes), then checks the outcome against the simulator's own record and prints one
row: ``scenario, intents, succeeded, failed, lost, duplicate_tickets, max_recovery_s``. Rows are
appended to ``bench/results/chaos.json`` (``python -m bench.chaos_table`` renders the README table).

Definitions (what the row's numbers mean):

- **lost**: intents not terminal at the deadline, plus succeeded intents without a ticket at the
  simulator, plus simulator tickets whose intent did not succeed (a ticket nobody knows about), plus
  intents the producer was told were stored that the database does not have.
- **duplicate_tickets**: tickets beyond the first that carry the same intent marker
  (``dispatcher-ref: <id>``), counted by the simulator over every ticket it made.
- **max_recovery_s**: the longest time, over the intents a fault hit, from the fault's injection to
  that intent reaching a terminal state. Which intents a fault hits is the scenario's to say:
  the intents leased by the killed or stopped process at that moment (worker faults), every intent
  not yet terminal (Redis, Postgres and scheduler faults: their messages or their progress depended
  on what failed, so this includes draining the backlog left at the fault), or the intents that got
  a faulty answer, from that answer (provider faults). An outage's injection is its start, so
  S6's number includes the outage itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy.exc import DBAPIError

from dispatcher.config import AppConfig, Settings, parse_config
from dispatcher.errors import StoreUnavailable
from dispatcher.runtime import Runtime, build_runtime
from tests.acceptance.procs import Proc, Procs, SimulatorProcess, free_port, subprocess_env, to_toml
from tests.chaos.services import PrivatePostgres, PrivateRedis
from tests.conftest import HOSTUP_KEY, NOCWORX_KEY, secrets_env, target_table, tokens_table

CHAOS_INTENTS = int(os.environ.get("CHAOS_INTENTS", "500"))
#: print each scenario's progress every 5 s (``CHAOS_VERBOSE=1``)
VERBOSE = os.environ.get("CHAOS_VERBOSE", "") not in ("", "0")
RESULTS_FILE = Path(__file__).resolve().parents[2] / "bench" / "results" / "chaos.json"
TERMINAL = ("succeeded", "failed", "cancelled")
#: every simulator knob a scenario may turn, at its healthy value (plus quick NocWorx tasks)
SIM_HEALTHY: dict[str, Any] = {
    "rate_limit": 0, "rate_window_s": 1.0, "retry_after_format": "seconds", "error_rate": 0.0,
    "drop_after_create_rate": 0.0, "task_failure_rate": 0.0, "task_rejected_rate": 0.0, "task_stuck_rate": 0.0,
    "task_404_window_s": 0.0, "latency_ms": [2, 15], "task_delay_s": 0.2, "task_resource_null_rate": 0.0,
}
#: tuned for speed: a lost worker is noticed after 5 s, a lost message re-published after 4 s
SCHEDULER: dict[str, Any] = {"interval_s": 0.2, "lease_s": 5, "requeue_after_s": 4, "short_wait_s": 30}
#: patient retries: the faults here are transient, and each failed reconcile look-up counts too
RETRY: dict[str, Any] = {"max_attempts": 15, "base_s": 0.2, "cap_s": 2.0}
#: our own budget far above the simulator's: only S8's storm is shaped by a limit (the provider's)
TARGET: dict[str, Any] = {"retry": RETRY, "rate": "400/second", "burst": 50, "timeout_s": 3,
                          "connect_timeout_s": 1}
STARTUP_TIMEOUT_S = 40.0


def now() -> float:
    return time.time()


@dataclass
class Fault:
    """One injected fault: what, when (epoch seconds), and the intents it hit."""

    what: str
    at: float
    hit: set[str] = field(default_factory=set)
    hit_at: dict[str, float] = field(default_factory=dict)  # per-intent injection time (provider faults)


@dataclass
class IntentState:
    id: str
    target: str
    status: str
    error_code: str | None
    finished_at: float | None
    ticket: str | None
    attempts: int


@dataclass
class Row:
    scenario: str
    intents: int
    succeeded: int
    failed: int
    lost: int
    duplicate_tickets: int
    max_recovery_s: float
    wall_s: float = 0.0
    notes: str = ""
    at: str = ""
    run: str = ""


class ChaosEnv:
    """The session's private services and the simulator; scenarios borrow them one at a time."""

    def __init__(self, root: Path, pg: PrivatePostgres, redis_server: PrivateRedis, sim: SimulatorProcess,
                 procs: Procs, template: str) -> None:
        self.root = root
        self.pg = pg
        self.redis = redis_server
        self.sim = sim
        self.procs = procs
        self.template = template
        self.run_id = os.environ.get("CHAOS_RUN_ID") or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

    def sim_api(self, provider: str) -> httpx.Client:
        """The simulator as a provider client sees it (bearer key), for reading tasks back."""
        base = self.sim.hostup_url if provider == "hostup" else self.sim.nocworx_url
        key = HOSTUP_KEY if provider == "hostup" else NOCWORX_KEY
        return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)


class Scenario:
    """One scenario's database, configuration, processes, submissions, faults and verdict."""

    def __init__(self, env: ChaosEnv, name: str, *, intents: int = CHAOS_INTENTS,
                 scheduler: dict[str, Any] | None = None, hostup: dict[str, Any] | None = None,
                 nocworx: dict[str, Any] | None = None, sim: dict[str, Any] | None = None,
                 nocworx_share: float = 0.4, deadline_s: float = 120.0) -> None:
        self.env = env
        self.name = name
        self.count = intents
        self.deadline_s = deadline_s
        self.nocworx_share = nocworx_share
        self.tag = uuid.uuid4().hex[:6]
        self.dbname = f"chaos_{name.split()[0].lower()}_{self.tag}"
        self.workdir = env.root / f"{name.split()[0].lower()}-{self.tag}"
        self.workdir.mkdir(parents=True)
        self.scheduler_table = {**SCHEDULER, **(scheduler or {})}
        self.sim_knobs = {**SIM_HEALTHY, **(sim or {})}
        self.targets = target_table(env.sim, hostup={**TARGET, **(hostup or {})},  # type: ignore[arg-type]
                                    nocworx={**TARGET, "poll": {"interval_s": 0.25, "deadline_s": 30},
                                             **(nocworx or {})})
        self.procs = Procs(self.workdir, {})
        self.faults: list[Fault] = []
        self.ids: list[str] = []
        self.submitted = threading.Event()
        self.submit_errors: list[str] = []
        self.notes: list[str] = []
        self.started = 0.0
        self.runtime: Runtime | None = None
        self._submitter: threading.Thread | None = None
        self._ids_lock = threading.Lock()

    # -- set-up and tear-down ----------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        return self.env.pg.url(self.dbname)

    def config_data(self) -> dict[str, Any]:
        return {"targets": self.targets, "api": tokens_table(), "scheduler": self.scheduler_table}

    def config(self) -> AppConfig:
        return parse_config(self.config_data(), Settings(database_url=self.database_url,
                                                         broker_url=self.env.redis.url), env=secrets_env())

    def __enter__(self) -> Scenario:
        with psycopg.connect(self.env.pg.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.dbname}" TEMPLATE "{self.env.template}"')
        self.env.redis.flushall()
        self.env.sim.configure(**self.sim_knobs)
        self.env.sim._call("POST", "/reset")
        config_file = self.workdir / "dispatcher.toml"
        config_file.write_text(to_toml(self.config_data()))
        self.procs.env = subprocess_env({
            "DISPATCHER_DATABASE_URL": self.database_url, "DISPATCHER_BROKER_URL": self.env.redis.url,
            "DISPATCHER_CONFIG": str(config_file), "DISPATCHER_LOG_FORMAT": "json", **secrets_env()})
        self.runtime = build_runtime(self.config(), worker=f"chaos-producer-{self.tag}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.submitted.set()
        if self._submitter is not None:
            self._submitter.join(timeout=30)
        self.procs.stop_all()
        if self.runtime is not None:
            with contextlib.suppress(Exception):
                self.runtime.close()
        if not self.env.pg.running():  # a scenario that failed mid-outage must not leave it down
            self.env.pg.start()
        if self.env.redis.proc is None:
            self.env.redis.start()
        with contextlib.suppress(Exception), psycopg.connect(self.env.pg.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')

    # -- processes ---------------------------------------------------------------------------------

    def start_worker(self, name: str, concurrency: int = 3, *, wait: bool = True, pool: str = "prefork") -> Proc:
        """``dispatcher worker --pool prefork`` (its children lease as ``<name>/<pid>``), or ``--pool
        gevent`` (one process, leasing as ``<name>``)."""
        self.procs.env["DISPATCHER_WORKER_NAME"] = name
        try:
            proc = self.procs.start(name, "worker", "--pool", pool, "--concurrency", str(concurrency))
        finally:
            self.procs.env.pop("DISPATCHER_WORKER_NAME", None)
        if wait:
            children_wanted = concurrency if pool == "prefork" else 0
            self.wait_for(lambda: self._heartbeat("worker", name) and len(children(proc)) >= children_wanted,
                          STARTUP_TIMEOUT_S, f"worker {name} ready", proc)
        return proc

    def start_scheduler(self, name: str = "scheduler") -> Proc:
        self.procs.env["DISPATCHER_WORKER_NAME"] = name
        try:
            proc = self.procs.start(name, "scheduler")
        finally:
            self.procs.env.pop("DISPATCHER_WORKER_NAME", None)
        self.wait_for(lambda: self._heartbeat("scheduler", name), STARTUP_TIMEOUT_S, f"scheduler {name} ready",
                      proc)
        return proc

    def start_api(self) -> str:
        port = free_port()
        proc = self.procs.start("api", "api", "--host", "127.0.0.1", "--port", str(port))
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_for(up, STARTUP_TIMEOUT_S, "the API", proc)
        return url

    def _heartbeat(self, component: str, name: str) -> bool:
        return bool(self.query("SELECT 1 FROM heartbeats WHERE component = %s AND name = %s", (component, name)))

    def wait_for(self, check: Callable[[], Any], timeout: float, what: str, proc: Proc | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(psycopg.OperationalError):
                if check():
                    return
            if proc is not None and not proc.alive:
                raise AssertionError(f"{proc.name} exited while waiting for {what}\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{self.procs.tails()}")
            time.sleep(0.1)

    # -- the database, read directly ----------------------------------------------------------------

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, connect_timeout=3) as conn:
            return list(conn.execute(sql, tuple(params)).fetchall())  # type: ignore[arg-type]

    def counts(self) -> dict[str, int]:
        return {status: n for status, n in self.query("SELECT status, count(*) FROM intents GROUP BY status")}

    def terminal_fraction(self) -> float:
        counts = self.counts()
        done = sum(counts.get(s, 0) for s in TERMINAL)
        return done / self.count

    def wait_fraction(self, fraction: float, timeout: float = 90.0) -> None:
        """Until this share of all the scenario's intents is terminal (faults strike mid-run)."""
        self.wait_for(lambda: self.terminal_fraction() >= fraction, timeout, f"{fraction:.0%} of the intents done")

    def leased_by(self, prefix: str) -> set[str]:
        """Intents whose lease names a process of ``prefix`` (a worker name, or ``name/pid``)."""
        rows = self.query("SELECT id::text FROM intents WHERE leased_by = %s OR leased_by LIKE %s",
                          (prefix, prefix + "/%"))
        return {r[0] for r in rows}

    def not_terminal(self) -> set[str]:
        rows = self.query("SELECT id::text FROM intents WHERE status NOT IN ('succeeded', 'failed', 'cancelled')")
        return {r[0] for r in rows}

    def fault(self, what: str, hit: set[str] | None = None, at: float | None = None) -> Fault:
        fault = Fault(what, at if at is not None else now(), set(hit or ()))
        self.faults.append(fault)
        print(f"  [{self.name}] t+{fault.at - self.started:5.1f}s {what} (hit {len(fault.hit)} intents)", flush=True)
        return fault

    # -- intake ------------------------------------------------------------------------------------

    def intent_data(self, index: int) -> dict[str, Any]:
        nocworx = index % 20 < round(20 * self.nocworx_share)
        topics = ("dns", "email", "migration", "vps") if nocworx else ("vps", "dns", "general", "billing")
        return {
            "target": "nocworx" if nocworx else "hostup", "topic": topics[index % len(topics)],
            "subject": f"chaos {self.name.split()[0]} {index:05d} {self.tag}",
            "body": f"Chaos scenario {self.name}, intent {index}.\nPlease look into it.",
            "idempotency_key": f"chaos-{self.tag}-{index}",
        }

    def submit(self, *, waves: int = 5, gap_s: float = 1.0) -> None:
        """Submit every intent from a thread, in ``waves`` spaced ``gap_s`` apart, as a producer would:
        a wave refused because the database is down is sent again (its idempotency keys make that safe)."""
        assert self.runtime is not None
        service = self.runtime.service
        items = [self.intent_data(i) for i in range(self.count)]
        size = max(1, -(-len(items) // waves))

        def run() -> None:
            for start in range(0, len(items), size):
                wave = items[start:start + size]
                while True:
                    try:
                        results = service.accept_many(wave, source="chaos")
                        break
                    except (DBAPIError, StoreUnavailable) as exc:  # 503 to an HTTP producer: it retries
                        self.submit_errors.append(type(exc).__name__)
                        time.sleep(0.5)
                bad = [r for r in results if r.id is None]
                if bad:
                    raise AssertionError(f"intake refused chaos intents: {bad[:3]}")
                with self._ids_lock:
                    self.ids.extend(str(r.id) for r in results)
                time.sleep(gap_s)
            self.submitted.set()

        self.started = now()
        self._submitter = threading.Thread(target=run, name=f"chaos-submit-{self.name}", daemon=True)
        self._submitter.start()

    # -- the end -----------------------------------------------------------------------------------

    def wait_done(self) -> bool:
        """Until every intent is stored and terminal, or the deadline (from the first submission)."""
        deadline = self.started + self.deadline_s
        shown = 0.0
        while now() < deadline:
            try:
                if self.submitted.is_set() and len(self.ids) >= self.count and not self.not_terminal():
                    return True
                if VERBOSE and now() - shown >= 5:
                    shown = now()
                    print(f"  [{self.name}] t+{shown - self.started:5.1f}s {self.counts()}", flush=True)
            except psycopg.OperationalError:
                pass
            time.sleep(0.25)
        return False

    def states(self) -> dict[str, IntentState]:
        rows = self.query(
            "SELECT i.id::text, i.target, i.status, i.last_error_code, extract(epoch from i.finished_at), "
            "t.provider_ticket_id, i.attempts FROM intents i LEFT JOIN tickets t ON t.intent_id = i.id")
        return {r[0]: IntentState(r[0], r[1], r[2], r[3], float(r[4]) if r[4] is not None else None, r[5], r[6])
                for r in rows}

    def verdict(self, expected: Callable[[IntentState], tuple[str, str | None]] | None = None,
                extra_problems: Iterable[str] = ()) -> tuple[Row, list[str]]:
        """Compare the database with the simulator; return the row and every problem found.

        ``expected`` gives each intent's expected (status, error code); the default is succeeded.
        """
        done = self.wait_done()
        wall = now() - self.started
        states = self.states()
        stats = self.env.sim.stats()
        markers: dict[str, int] = stats["tickets_by_marker"]
        sim_ids = {t["marker"]: str(t["id"]) for t in self.env.sim.tickets() if t.get("marker")}
        problems: list[str] = list(extra_problems)
        if not done:
            problems.append(f"not everything terminal within {self.deadline_s:g} s")
        if self.submit_errors:
            self.notes.append(f"{len(self.submit_errors)} producer retries")

        stored_ids = set(self.ids)
        missing = sorted(stored_ids - set(states))
        open_ = sorted(i for i, s in states.items() if s.status not in TERMINAL)
        no_ticket = sorted(i for i, s in states.items() if s.status == "succeeded" and markers.get(i, 0) == 0)
        orphans = sorted(m for m in markers if m not in states or states[m].status != "succeeded")
        lost = len(missing) + len(open_) + len(no_ticket) + len(orphans)
        duplicates = sum(n - 1 for n in markers.values() if n > 1)
        for label, ids in (("stored but missing from the database", missing), ("not terminal", open_),
                           ("succeeded without a simulator ticket", no_ticket),
                           ("simulator ticket without a succeeded intent", orphans)):
            if ids:
                problems.append(f"{len(ids)} {label}: " + "; ".join(self.story(i) for i in ids[:5]))
        dup_ids = sorted(m for m, n in markers.items() if n > 1)
        if dup_ids:
            problems.append(f"{duplicates} duplicate ticket(s): " + "; ".join(self.story(i) for i in dup_ids[:5]))
        wrong_ticket = sorted(i for i, s in states.items()
                              if s.status == "succeeded" and i in sim_ids and s.ticket != sim_ids[i])
        if wrong_ticket:
            problems.append(f"{len(wrong_ticket)} intents recorded another ticket than the simulator made")
        if len(states) != self.count:
            problems.append(f"{len(states)} intents stored, {self.count} submitted")

        want = expected or (lambda s: ("succeeded", None))
        mismatched = []
        for state in states.values():
            status, code = want(state)
            if state.status != status or (code is not None and state.error_code != code):
                mismatched.append(f"{state.id} {state.target} is {state.status}/{state.error_code}, "
                                  f"expected {status}/{code or '-'}")
        if mismatched:
            problems.append(f"{len(mismatched)} intents ended in the wrong state: " + "; ".join(mismatched[:5]))

        recovery = 0.0
        for fault in self.faults:
            for intent_id in fault.hit:
                state = states.get(intent_id)
                if state is None or state.finished_at is None:
                    continue
                recovery = max(recovery, state.finished_at - fault.hit_at.get(intent_id, fault.at))
        counts: dict[str, int] = {}
        for state in states.values():
            counts[state.status] = counts.get(state.status, 0) + 1
        row = Row(scenario=self.name, intents=len(states), succeeded=counts.get("succeeded", 0),
                  failed=counts.get("failed", 0), lost=lost, duplicate_tickets=duplicates,
                  max_recovery_s=round(recovery, 1), wall_s=round(wall, 1), notes="; ".join(self.notes),
                  at=datetime.now(UTC).isoformat(timespec="seconds"), run=self.env.run_id)
        return row, problems

    def story(self, intent_id: str) -> str:
        """One intent's attempts and events, short, for a failure message."""
        try:
            attempts = self.query(
                "SELECT op, status_code, verdict, error_code, worker, to_char(started_at, 'MI:SS.MS') FROM attempts "
                "WHERE intent_id = %s ORDER BY id", (intent_id,))
            events = self.query("SELECT kind, left(message, 90), to_char(at, 'MI:SS.MS') FROM events "
                                "WHERE intent_id = %s ORDER BY id", (intent_id,))
        except psycopg.Error as exc:
            return f"{intent_id} ({exc})"
        parts = [f"{op}:{code}:{verdict}:{err or ''}@{at} by {worker}"
                 for op, code, verdict, err, worker, at in attempts]
        told = [f"{kind}@{at}: {message}" for kind, message, at in events]
        return f"\n    {intent_id}: attempts [{', '.join(parts)}]\n      events [{' | '.join(told)}]"


def children(proc: Proc) -> list[int]:
    """The pids of a process's children (a prefork worker's pool processes)."""
    pid = proc.popen.pid
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def report(row: Row, problems: list[str]) -> None:
    """Print the row, append it to the results file, and fail with every problem found."""
    line = (f"CHAOS {row.scenario:<34} intents={row.intents:<5} succeeded={row.succeeded:<5} failed={row.failed:<4} "
            f"lost={row.lost:<3} duplicate_tickets={row.duplicate_tickets:<3} max_recovery_s={row.max_recovery_s:<6} "
            f"wall_s={row.wall_s}" + (f"  ({row.notes})" if row.notes else ""))
    print(line, flush=True)
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    try:
        history = json.loads(RESULTS_FILE.read_text())
        if not isinstance(history, list):
            history = []
    except (OSError, ValueError):
        history = []
    history.append({**asdict(row), "passed": not problems})
    RESULTS_FILE.write_text(json.dumps(history, indent=1) + "\n")
    assert not problems, f"{row.scenario}:\n- " + "\n- ".join(problems)
    assert row.lost == 0 and row.duplicate_tickets == 0


__all__ = ["CHAOS_INTENTS", "ChaosEnv", "Fault", "IntentState", "Row", "Scenario", "children", "kill", "report"]
