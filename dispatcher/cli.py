"""The ``dispatcher`` command line (click + rich).

Exit codes: 0 ok, 1 the work did not end as expected, 2 bad usage or input, 3 configuration error,
4 a service (database, broker) is unreachable.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console

from dispatcher.config import AppConfig, Settings, load_config, read_settings
from dispatcher.errors import ConfigError, IntentInvalid, UnknownIntent
from dispatcher.green import DEFAULT_POOL, GEVENT, patched_for_gevent
from dispatcher.heap import settle_heap

EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG, EXIT_UNAVAILABLE = 1, 2, 3, 4
#: a worker's default concurrency per pool: threads cost a thread switch each time one waits, so 64
#: of them; a greenlet costs a few kilobytes, so 256, hundreds of requests in flight (README,
#: "The worker's hot path")
WORKER_CONCURRENCY = {"threads": 64, "gevent": 256, "prefork": os.cpu_count() or 2, "solo": 1}

# a pipe or a log file gets a readable width instead of rich's 80 columns
console = Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=200)
err_console = Console(stderr=True)


def _config() -> AppConfig:
    try:
        return load_config()
    except ConfigError as exc:
        _config_error(exc)


def _settings() -> Settings:
    try:
        return read_settings()
    except ConfigError as exc:
        _config_error(exc)


def _config_error(exc: ConfigError) -> NoReturn:
    err_console.print(f"[bold red]configuration error:[/] {exc}", markup=True, highlight=False)
    sys.exit(EXIT_CONFIG)


def _logging(config: AppConfig | None = None) -> None:
    from dispatcher.logs import setup_logging

    settings = config.settings if config else _settings()
    setup_logging(settings.log_level, settings.log_format, config.secret_values() if config else ())


def _serve_metrics(runtime: Any) -> None:
    """With DISPATCHER_METRICS_PORT: this process's counters and the database gauges over HTTP."""
    settings = runtime.config.settings
    if settings.metrics_port:
        from dispatcher import metrics

        collector = metrics.DatabaseCollector(runtime.store, runtime.config.targets)
        metrics.serve(settings.metrics_port, settings.metrics_host, metrics.registry(collector))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dispatcher")
def main() -> None:
    """File support tickets into HostUp and NocWorx from queued intents."""


# -- database ------------------------------------------------------------------------------------

@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations to DISPATCHER_DATABASE_URL (or the embedded SQLite file)."""
    from sqlalchemy.exc import OperationalError

    from dispatcher.store import db as store_db

    settings = _settings()
    url = settings.resolved_database_url()
    try:
        store_db.upgrade(url, revision)
    except OperationalError as exc:
        err_console.print(f"[red]database unreachable:[/] {type(exc.orig).__name__}")
        sys.exit(EXIT_UNAVAILABLE)
    console.print(f"database at revision [bold]{revision}[/]")


# -- processes -----------------------------------------------------------------------------------

def _serve_api(runtime: Any, host: str, port: int, *, in_thread: bool = False) -> Any:
    import uvicorn

    from dispatcher.intake.api import create_app

    app = create_app(runtime.service, readiness=_broker_check(runtime.config))
    # log_config=None: uvicorn's loggers go through ours (JSON lines), not a text handler of its own
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           log_config=None))
    settle_heap()  # once the web app is built too (see dispatcher.heap)
    if in_thread:
        thread = threading.Thread(target=server.run, name="dispatcher-api", daemon=True)
        thread.start()
        return server
    server.run()
    return server


def _broker_check(config: AppConfig) -> Any:
    if not config.settings.broker_url:
        return None
    url = config.settings.broker_url

    def check() -> dict[str, str]:
        import redis

        try:
            redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
            return {"broker": "ok"}
        except Exception as exc:
            return {"broker": f"unreachable: {type(exc).__name__}"}

    return check


@main.command()
@click.option("--host", default=None, help="Listen address (DISPATCHER_API_HOST).")
@click.option("--port", type=int, default=None, help="Listen port (DISPATCHER_API_PORT).")
def api(host: str | None, port: int | None) -> None:
    """Serve the HTTP API."""
    from dispatcher.runtime import build_runtime

    config = _config()
    _logging(config)
    runtime = build_runtime(config)
    try:
        _serve_api(runtime, host or config.settings.api_host, port or config.settings.api_port)
    finally:
        runtime.close()


@main.command()
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=None,
              help="Tasks at once: greenlets (gevent, default 256), threads (default 64) or child "
                   "processes (prefork, default: one per core).")
@click.option("--pool", type=click.Choice(["gevent", "threads", "prefork", "solo"]), default=DEFAULT_POOL,
              show_default=True,
              help="gevent or threads: one process whose waits on HTTP overlap (see README, The worker's hot path).")
@click.option("--queues", "-Q", default=None, help="Comma-separated target names (default: all targets).")
def worker(concurrency: int | None, pool: str, queues: str | None) -> None:
    """Run a Celery worker (needs DISPATCHER_BROKER_URL)."""
    from dispatcher.worker.app import queue_name
    from dispatcher.worker.tasks import create_worker_app

    if pool == GEVENT and not patched_for_gevent():
        # only `dispatcher worker --pool gevent` on the command line patches early enough (dispatcher.green)
        err_console.print("[red]--pool gevent[/] needs the standard library patched at start-up: run it as "
                          "`dispatcher worker` (or `python -m dispatcher worker`) from a shell or a supervisor")
        sys.exit(EXIT_USAGE)
    concurrency = concurrency or WORKER_CONCURRENCY[pool]
    config = _config()
    if not config.settings.broker_url:
        err_console.print("[red]DISPATCHER_BROKER_URL is not set[/]: `dispatcher run` serves the embedded default")
        sys.exit(EXIT_CONFIG)
    _logging(config)
    if config.settings.metrics_port and pool == "prefork":
        from dispatcher.metrics import use_multiprocess

        use_multiprocess(config.settings.metrics_dir)  # children count in files; this process serves the sum
    app = create_worker_app(config, pool=pool, concurrency=concurrency)
    names = [q.strip() for q in queues.split(",")] if queues else sorted(config.targets)
    unknown = [n for n in names if n not in config.targets]
    if unknown:
        err_console.print(f"[red]unknown target(s) in --queues:[/] {', '.join(unknown)}")
        sys.exit(EXIT_USAGE)
    from dispatcher.logs import wants_json

    quiet = ["--quiet"] if wants_json(config.settings.log_format) else []  # Celery's banner is not a JSON line
    app.worker_main([*quiet, "worker", "--loglevel", config.settings.log_level, "--pool", pool,
                     "--concurrency", str(concurrency), "-Q", ",".join(queue_name(n) for n in names) or
                     "dispatcher.default", "--hostname", f"dispatcher@{config.settings.worker_name}",
                     "--without-gossip", "--without-mingle", "--without-heartbeat"])


@main.command()
def scheduler() -> None:
    """Re-enqueue due intents and recover lost workers' intents (run one)."""
    from dispatcher.runtime import build_runtime
    from dispatcher.scheduler import run_scheduler

    config = _config()
    _logging(config)
    runtime = build_runtime(config)
    _serve_metrics(runtime)
    settle_heap()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run_scheduler(runtime.service, stop)
    finally:
        runtime.close()


@main.command()
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
@click.option("--threads", type=int, default=4, show_default=True, help="Embedded worker threads.")
def run(host: str | None, port: int | None, threads: int) -> None:
    """API + worker + scheduler in one process (embedded SQLite and in-process queue by default)."""
    from dispatcher.runtime import build_runtime
    from dispatcher.scheduler import start_in_thread

    config = _config()
    _logging(config)
    if config.settings.broker_url:
        from dispatcher.worker.tasks import create_worker_app
        from dispatcher.worker.tasks import runtime as worker_runtime

        app = create_worker_app(config)
        rt = worker_runtime()
        start_in_thread(rt.service)
        _serve_api(rt, host or config.settings.api_host, port or config.settings.api_port, in_thread=True)
        app.worker_main(["worker", "--pool", "threads", "--concurrency", str(threads), "-Q",
                         ",".join(f"dispatcher.{n}" for n in sorted(config.targets)) or "dispatcher.default",
                         "--without-gossip", "--without-mingle", "--without-heartbeat"])
        return
    from dispatcher.health import WORKER, Heartbeat

    runtime = build_runtime(config, threads=threads)
    _, stop = start_in_thread(runtime.service)
    beat = Heartbeat(runtime.store.beat, runtime.store.forget_heartbeat, WORKER, config.settings.worker_name,
                     info={"pool": "in-process", "concurrency": threads}).start()
    console.print(f"dispatcher running (embedded: {config.settings.resolved_database_url()}, in-process queue)")
    try:
        _serve_api(runtime, host or config.settings.api_host, port or config.settings.api_port)
    finally:
        stop.set()
        beat.stop()
        runtime.close()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8099, show_default=True)
@click.option("--config-json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Simulator knobs as JSON (see dispatcher.simulator.SimulatorSettings).")
def simulate(host: str, port: int, config_json: Path | None) -> None:
    """Serve HostUp v2 (/api/v2) and NocWorx v1 (/v1) simulators, with fault knobs under /_sim."""
    from dispatcher.simulator import SimulatorSettings, serve

    knobs = json.loads(config_json.read_text()) if config_json else {}
    settings = SimulatorSettings(**knobs)
    console.print(f"HostUp simulator:  http://{host}:{port}/api/v2\nNocWorx simulator: http://{host}:{port}\n"
                  f"control:           http://{host}:{port}/_sim/stats")
    serve(settings, host, port)


# -- producing -----------------------------------------------------------------------------------

@main.command()
@click.option("--json", "json_input", type=click.File("r"), default=None, help="Intent as JSON ('-' for stdin).")
@click.option("--target")
@click.option("--subject")
@click.option("--body")
@click.option("--priority")
@click.option("--topic")
@click.option("--department")
@click.option("--category")
@click.option("--service-type")
@click.option("--service-id")
@click.option("--service-name")
@click.option("--cc", multiple=True)
@click.option("--critical-reason")
@click.option("--idempotency-key")
@click.option("--group-key")
@click.option("--label", multiple=True, help="key=value (repeatable)")
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--dry-run", is_flag=True, help="Show what would be sent (create / reply / nothing), to which target and "
              "department, with the rendered text; store and send nothing.")
def submit(json_input: Any, output: str, label: tuple[str, ...], cc: tuple[str, ...], dry_run: bool,
           **fields: Any) -> None:
    """Submit one intent from flags or JSON; prints its id and status."""
    from dispatcher.runtime import build_cli_runtime

    data: Any = json.load(json_input) if json_input else {}
    if not isinstance(data, dict):
        err_console.print("[red]--json: an intent must be a JSON object[/]")
        sys.exit(EXIT_USAGE)
    service_fields = {k: fields.pop(f"service_{k}") for k in ("type", "id", "name")}
    if any(service_fields.values()):
        data["service"] = {k: v for k, v in service_fields.items() if v is not None}
    data.update({k: v for k, v in fields.items() if v is not None})
    if cc:
        data["cc"] = list(cc)
    if label:
        bad = [item for item in label if "=" not in item]
        if bad:
            err_console.print(f"[red]--label: expected key=value, got {bad[0]!r}[/]")
            sys.exit(EXIT_USAGE)
        data["labels"] = dict(item.split("=", 1) for item in label)
    config = _config()

    runtime = build_cli_runtime(config)
    try:
        if dry_run:
            _print_plan(runtime.service.preview(data), output)
            return
        accepted = runtime.service.accept(data, source="cli", submitted_by=_whoami())
    except IntentInvalid as exc:
        err_console.print("[bold red]intent refused:[/]")
        for problem in exc.problems:
            err_console.print(f"  [yellow]{problem.field}[/]: {problem.reason}", highlight=False)
        sys.exit(EXIT_USAGE)
    finally:
        runtime.close()
    view = accepted.intent
    if output == "json":
        click.echo(json.dumps(view.as_dict()))
    else:
        word = "already submitted" if accepted.replay else "accepted"
        console.print(f"{word}: [bold]{view.id}[/] ({view.status.value}) → {view.target}", highlight=False)


def _print_plan(plan: dict[str, Any], output: str) -> None:
    """A dry run's answer: the action, where it would go, and exactly what would be sent."""
    if output == "json":
        click.echo(json.dumps(plan, indent=2))
        return
    where = f"{plan['target']} ({plan['provider']})"
    if plan.get("department"):
        where += f", department {plan['department']}" + (f" / {plan['category']}" if plan.get("category") else "")
    console.print(f"[bold]dry run[/]: would [bold]{plan['action']}[/] on {where} — {plan['reason']}",
                  highlight=False)
    if plan.get("department_error"):
        console.print(f"[red]would fail:[/] {plan['department_error']}", highlight=False)
    for request in plan.get("requests", []):
        console.print(f"\n[cyan]{request['method']} {request['path']}[/]", highlight=False)
        if request.get("json") is not None:
            click.echo(json.dumps(request["json"], indent=2, ensure_ascii=False))
    console.print("\n(nothing was stored or sent)", style="dim")


def _whoami() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


@main.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "ndjson"]), default=None,
              help="Override the format the extension implies (.csv; .jsonl/.ndjson).")
@click.option("--target", default=None, help="Target for rows that leave it empty.")
@click.option("--topic", default=None, help="Topic for rows that leave it empty.")
@click.option("--priority", default=None, help="Priority for rows that leave it empty.")
@click.option("--skip-invalid", is_flag=True, help="Import the valid rows even when some are invalid.")
@click.option("--dry-run", is_flag=True,
              help="Validate and show per target the tickets, departments and time it would take; store nothing.")
@click.option("--wait", is_flag=True, help="After enqueueing, wait until every intent has ended (needs workers).")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True, help="--wait at most this long.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one line per row (row, result, intent id, status, ticket id, error); .csv or .jsonl.")
def import_file(file: Path, fmt: str | None, target: str | None, topic: str | None, priority: str | None,
                skip_invalid: bool, dry_run: bool, wait: bool, timeout_s: float, report: Path | None) -> None:
    """Import a CSV or JSON Lines file of intents, one per row.

    Columns are the intent fields, with service.type / service.id / service.name, labels.<key>, and cc
    separated by ';'. Every row is validated first: a file with an invalid row stores nothing (unless
    --skip-invalid). Each row's idempotency key is a hash of the file's name and the row (or its
    idempotency_key column), so importing the same file again sends nothing twice.
    """
    from dispatcher.importer import ImportOptions, run_import

    config = _config()
    options = ImportOptions(path=file, fmt=fmt, target=target, topic=topic, priority=priority,
                            skip_invalid=skip_invalid, dry_run=dry_run, wait=wait, timeout_s=timeout_s,
                            report=report, submitted_by=_whoami())
    sys.exit(run_import(config, options, console, err_console))


@main.command()
@click.option("--count", type=int, default=0, help="Extra intents per provider on top of the showcase set.")
@click.option("--keep", is_flag=True, help="Keep the demo database and print its path.")
def demo(count: int, keep: bool) -> None:
    """Start the simulators and the embedded pipeline, file a mixed set of tickets, show the outcome."""
    from dispatcher.demo import run_demo

    sys.exit(run_demo(console, extra=count, keep=keep))


@main.group()
def intents() -> None:
    """Look at intents."""


@intents.command("show")
@click.argument("intent_id")
@click.option("--json", "as_json", is_flag=True)
def intents_show(intent_id: str, as_json: bool) -> None:
    """One intent with its attempts."""
    from dispatcher.runtime import build_cli_runtime

    config = _config()
    runtime = build_cli_runtime(config)
    try:
        view = runtime.service.get(uuid.UUID(intent_id), with_attempts=True)
        events = runtime.store.events(view.id)
    except (ValueError, UnknownIntent):
        err_console.print(f"[red]no intent {intent_id}[/]")
        sys.exit(EXIT_USAGE)
    finally:
        runtime.close()
    if as_json:
        click.echo(json.dumps(view.as_dict(with_attempts=True), indent=2))
        return
    from dispatcher.render import render_intent

    console.print(render_intent(view, events))




# operator commands live in their own module and register onto the groups above
from dispatcher import cli_check, cli_ops  # noqa: E402,F401

if __name__ == "__main__":
    # run the imported module's group: the operator commands registered onto it, not onto __main__
    from dispatcher.cli import main as registered_main

    registered_main()
