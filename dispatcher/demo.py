"""``dispatcher demo``: the whole pipeline on the embedded default, against the simulators.

Starts the HostUp and NocWorx simulators (with rate limits and 5xx faults switched on), the
in-process queue and the scheduler over a throw-away SQLite file, submits a mixed set of intents
to both providers, shows progress, and ends with a table. Exit 0 only if every intent ended as it
should: the ones that must fail (a department HostUp does not list, a subject HostUp refuses) fail
with the provider's words, all others have exactly one ticket.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dispatcher.config import Settings, parse_config
from dispatcher.render import outcome_table

DEADLINE_S = 90.0


def showcase(extra: int) -> list[tuple[dict[str, Any], str]]:
    """(intent, expected final status) pairs covering routing, priorities and provider errors."""
    items: list[tuple[dict[str, Any], str]] = [
        ({"target": "hostup", "topic": "vps", "subject": "VPS unreachable since 03:10",
          "body": "Ping and SSH time out from two networks.", "priority": "high",
          "service": {"type": "vps", "id": "vps_01hxa3b4c5d6e7f8g9h0j1k2m3"}}, "succeeded"),
        ({"target": "hostup", "topic": "ip", "subject": "Manual IPv4 replacement requested",
          "body": "Please replace the IPv4 address on my VPS.", "cc": ["ops@example.com"]}, "succeeded"),
        ({"target": "hostup", "topic": "dns", "subject": "DNS zone not updating",
          "body": "Changes to example.com are not served."}, "succeeded"),
        ({"target": "hostup", "topic": "billing", "subject": "Invoice question", "body": "Invoice 1234 twice?",
          "priority": "low"}, "succeeded"),
        ({"target": "hostup", "topic": "hosting", "subject": "Site down: 502 on every page",
          "body": "All customers affected.", "priority": "critical",
          "critical_reason": "Checkout is down for every customer."}, "succeeded"),
        ({"target": "hostup", "department": "network-operations", "subject": "Department HostUp does not list",
          "body": "An explicit department is checked against HostUp's list, never guessed."}, "failed"),
        ({"target": "hostup", "topic": "general", "subject": "S" * 230,
          "body": "HostUp refuses subjects over 200 characters: a 400 with the field named."}, "failed"),
        ({"target": "nocworx", "topic": "dns", "subject": "It can't be DNS", "body": "It was DNS."}, "succeeded"),
        ({"target": "nocworx", "topic": "billing", "subject": "Card update", "body": "New card on file."},
         "succeeded"),
        ({"target": "nocworx", "topic": "migration", "subject": "Migrate example.org",
          "body": "Please migrate from the old plan.", "service": {"type": "hosting", "id": "4242"}}, "succeeded"),
        ({"target": "nocworx", "topic": "ssl", "subject": "Certificate expiring", "body": "Renewal failed.",
          "priority": "urgent"}, "succeeded"),
    ]
    for i in range(extra):
        items.append(({"target": "hostup", "topic": "vps", "subject": f"Batch VPS check {i}",
                       "body": "Routine check."}, "succeeded"))
        items.append(({"target": "nocworx", "topic": "email", "subject": f"Batch mail check {i}",
                       "body": "Routine check."}, "succeeded"))
    return items


def run_demo(console: Console, *, extra: int = 0, keep: bool = False) -> int:
    from dispatcher.runtime import build_runtime
    from dispatcher.scheduler import start_in_thread as start_scheduler
    from dispatcher.simulator import SimulatorSettings, start_in_thread

    workdir = Path(tempfile.mkdtemp(prefix="dispatcher-demo-"))
    keys = {"HOSTUP_KEY": secrets.token_urlsafe(24), "NOCWORX_KEY": secrets.token_urlsafe(24)}
    sim_settings = SimulatorSettings(hostup_key=keys["HOSTUP_KEY"], nocworx_key=keys["NOCWORX_KEY"],
                                     rate_limit=8, rate_window_s=1.0, error_rate=0.1, latency_ms=(5, 40),
                                     task_delay_s=0.5, seed=7)
    with start_in_thread(sim_settings) as sim:
        console.print(f"simulators up at {sim.url} (HostUp /api/v2, NocWorx /v1): "
                      "rate limit 8 req/s, 10% 5xx faults")
        retry = {"max_attempts": 10, "base_s": 0.3, "cap_s": 3.0}
        config = parse_config({
            "targets": {
                "hostup": {"provider": "hostup", "base_url": sim.hostup_url, "api_key_env": "HOSTUP_KEY",
                           "retry": retry, "rate": "8/second"},
                "nocworx": {"provider": "nocworx", "base_url": sim.nocworx_url, "api_key_env": "NOCWORX_KEY",
                            "retry": retry, "rate": "8/second", "poll": {"interval_s": 0.3, "deadline_s": 30}},
            },
            "scheduler": {"interval_s": 0.5, "short_wait_s": 30},
        }, Settings(database_url=f"sqlite:///{workdir / 'demo.db'}", broker_url=None), env=keys)
        runtime = build_runtime(config, threads=4)
        _, stop = start_scheduler(runtime.service)
        try:
            return _submit_and_watch(console, runtime, showcase(extra), sim)
        finally:
            stop.set()
            runtime.close()
            if keep:
                console.print(f"demo database kept at {workdir / 'demo.db'}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def _submit_and_watch(console: Console, runtime: Any, items: list[tuple[dict[str, Any], str]], sim: Any) -> int:
    service = runtime.service
    expected: dict[str, str] = {}
    ids = []
    for data, want in items:
        accepted = service.accept(data, source="demo", submitted_by="demo")
        expected[str(accepted.intent.id)] = want
        ids.append(accepted.intent.id)
    console.print(f"submitted {len(ids)} intents to hostup and nocworx")
    started = time.monotonic()
    with Progress(TextColumn("[bold]filing tickets"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[detail]}"), console=console, transient=False) as progress:
        bar = progress.add_task("tickets", total=len(ids), detail="")
        while True:
            views = [service.get(i) for i in ids]
            done = [v for v in views if v.terminal]
            waiting = sum(1 for v in views if v.status.value == "waiting")
            polling = sum(1 for v in views if v.status.value == "polling")
            progress.update(bar, completed=len(done), detail=f"waiting {waiting}, polling {polling}")
            if len(done) == len(ids) or time.monotonic() - started > DEADLINE_S:
                break
            time.sleep(0.2)
    views = [service.get(i) for i in ids]
    console.print(outcome_table(views, expected, title="demo outcomes"))
    stats = sim.stats()
    per_marker = stats.get("tickets_by_marker", {})
    duplicates = {k: v for k, v in per_marker.items() if v > 1}
    wrong = [v for v in views if expected[str(v.id)] != v.status.value]
    missing = [v for v in views if v.status.value == "succeeded" and per_marker.get(str(v.id), 0) != 1]
    throttled = stats.get("hostup", {}).get("429", 0) + stats.get("nocworx", {}).get("429", 0)
    console.print(f"simulator: {sum(per_marker.values())} tickets for {len(per_marker)} intents, "
                  f"{len(duplicates)} duplicated; {throttled} answers were 429; "
                  f"{time.monotonic() - started:.1f} s")
    if wrong or duplicates or missing:
        console.print(f"[bold red]demo failed[/]: {len(wrong)} unexpected outcome(s), "
                      f"{len(duplicates)} duplicate ticket(s), {len(missing)} succeeded without exactly one ticket")
        return 1
    console.print("[bold green]every intent ended as expected, one ticket each[/]")
    return 0
