"""``dispatcher check``: is this installation able to work? For people and for scripts.

Checks, in order: the configuration (valid, secrets present), the database (reachable and at the
latest migration), the broker (reachable, when one is configured), and each target's credentials
(a cheap authenticated read: HostUp's department list, NocWorx's ticket list page 1). Secrets print
as ``<secret>``. Exit code 0 when everything passes, 1 when a check fails, 3 for an invalid
configuration.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from dispatcher.cli import EXIT_CONFIG, EXIT_FAILED, console, main
from dispatcher.config import AppConfig, TargetConfig, load_config
from dispatcher.domain import Provider
from dispatcher.errors import ConfigError
from dispatcher.providers.base import Op, RequestSpec, Verdict


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_database(config: AppConfig) -> Check:
    from sqlalchemy.engine import make_url

    from dispatcher.store import db

    url = config.settings.resolved_database_url()
    shown = make_url(db.normalise_url(url)).render_as_string(hide_password=True).replace("***", "<secret>")
    try:
        engine = db.make_engine(url)
        try:
            current = db.current_revision(engine)
        finally:
            engine.dispose()
    except Exception as exc:
        return Check("database", False, f"{shown}: unreachable ({type(exc).__name__})")
    head = db.head_revision()
    if current != head:
        return Check("database", False, f"{shown}: at migration {current or 'none'}, latest is {head}: run "
                     "`dispatcher db upgrade`")
    return Check("database", True, f"{shown}: reachable, migrated ({head})")


def check_broker(config: AppConfig) -> Check:
    url = config.settings.broker_url
    if not url:
        return Check("broker", True, "none configured: the embedded in-process queue (`dispatcher run`)")
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    shown = url.replace(f":{parts.password}@", ":<secret>@", 1) if parts.password else url
    try:
        import redis

        redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3).ping()
    except Exception as exc:
        return Check("broker", False, f"{shown}: unreachable ({type(exc).__name__})")
    return Check("broker", True, f"{shown}: reachable")


def credentials_request(target: TargetConfig) -> RequestSpec:
    if target.provider is Provider.hostup:
        return RequestSpec(Op.departments, "GET", "/support/departments")
    return RequestSpec(Op.find, "GET", "/v1/ticket", params={"page": 1, "pageSize": 1})


def check_target(target: TargetConfig) -> Check:
    from dispatcher.runtime import adapter_for, transport_for

    spec = credentials_request(target)
    transport = transport_for(target)
    try:
        raw = transport.send(spec)
    finally:
        transport.close()
    outcome = adapter_for(target).classify(spec.op, raw)
    where = f"{target.base_url} ({spec.method} {spec.path})"
    if outcome.verdict is Verdict.done:
        return Check(f"target {target.name}", True, f"{where}: credentials accepted, key <secret>")
    if outcome.verdict is Verdict.pause:
        return Check(f"target {target.name}", False, f"{where}: credentials refused ({raw.status} "
                     f"{outcome.error_code or ''}: {outcome.error_message or ''})")
    return Check(f"target {target.name}", False, f"{where}: {outcome.error_code or raw.status}: "
                 f"{outcome.error_message or 'unexpected answer'}")


def run_checks(config: AppConfig, *, with_targets: bool = True) -> list[Check]:
    checks = [Check("configuration", True, f"{config.source or 'no targets file'}: valid, "
                    f"{len(config.targets)} target(s), {len(config.tokens)} API token(s)"),
              check_database(config), check_broker(config)]
    if with_targets:
        checks.extend(check_target(t) for _, t in sorted(config.targets.items()))
    return checks


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-targets", is_flag=True, help="skip the providers' credential checks")
def check(as_json: bool, no_targets: bool) -> None:
    """Check configuration, database, broker and each target's credentials (exit 0 when all pass)."""
    try:
        config = load_config()
    except ConfigError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "checks": [{"name": "configuration", "ok": False,
                                                             "detail": str(exc)}]}))
        else:
            console.print(Text("✗ configuration: ", style="bold red") + Text(str(exc)))
        sys.exit(EXIT_CONFIG)
    checks = run_checks(config, with_targets=not no_targets)
    ok = all(c.ok for c in checks)
    if as_json:
        out: dict[str, Any] = {"ok": ok, "checks": [c.__dict__ for c in checks]}
        click.echo(json.dumps(out))
    else:
        table = Table(title="dispatcher check", title_justify="left", show_header=False)
        table.add_column()
        table.add_column()
        table.add_column()
        for c in checks:
            table.add_row(Text("✓", style="green") if c.ok else Text("✗", style="bold red"), c.name, c.detail)
        console.print(table)
    sys.exit(0 if ok else EXIT_FAILED)
