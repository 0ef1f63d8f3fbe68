"""Settings (``DISPATCHER_*`` environment variables) and the TOML targets file.

This is the only module that reads the environment. Secrets (provider API keys, intake tokens) are
named by the file (``api_key_env`` / ``api_key_file``) and read from the environment or a file at
start-up; they are held as :class:`pydantic.SecretStr` and print as ``<secret>``.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from dispatcher.backoff import FIRST_POLL_S, PollPolicy, RetryPolicy, parse_rate
from dispatcher.domain import Priority, Provider
from dispatcher.errors import ConfigError
from dispatcher.intake.alerts import (
    DEFAULT_BODY_TEMPLATE,
    DEFAULT_SEVERITY_PRIORITY,
    DEFAULT_SUBJECT_TEMPLATE,
    AlertRoute,
    AlertsConfig,
    check_template,
)
from dispatcher.routing import Route, check_topic, merged_routes

SCOPES = ("intents:write", "intents:read", "alerts:write", "operator")


class Settings(BaseSettings):
    """Process settings from ``DISPATCHER_*``; none is required (embedded default)."""

    model_config = SettingsConfigDict(env_prefix="DISPATCHER_", extra="ignore")

    database_url: str | None = None
    broker_url: str | None = None
    redis_url: str | None = None
    config: Path | None = None
    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    data_dir: Path = Path(".")
    #: the scheduler and each worker serve Prometheus metrics on this port when set (the API: /metrics)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    #: a prefork worker's children count in files here (a fresh temporary directory when unset)
    metrics_dir: Path | None = None
    #: PostgreSQL connections a worker process's hot path opens at most (tasks past them wait for
    #: one); its other work has a pool of a quarter of that, +5 (dispatcher.runtime)
    db_connections: int = Field(default=64, ge=1, le=1000)

    @property
    def embedded(self) -> bool:
        """No broker configured: run on the in-process queue."""
        return not self.broker_url

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'dispatcher.db').resolve()}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteFile(_Strict):
    department: str = Field(min_length=1)
    category: str | None = None


class RetryFile(_Strict):
    max_attempts: int = Field(default=8, ge=1, le=100)
    base_s: float = Field(default=2.0, gt=0)
    cap_s: float = Field(default=300.0, gt=0)
    final_codes: list[str] = Field(default_factory=list)


class PollFile(_Strict):
    """When a pending NocWorx task is looked at again (dispatcher.backoff.poll_wait): ``first_s`` after
    the 202, then every ``interval_s + growth * (seconds since the 202)``, at most ``max_interval_s``,
    until ``deadline_s``. ``growth = 0`` and ``first_s = interval_s`` is a fixed interval."""

    #: the first look; unset: 0.5 s, or interval_s when that is shorter
    first_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    interval_s: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    growth: float = Field(default=0.1, ge=0, allow_inf_nan=False)
    max_interval_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    deadline_s: float = Field(default=900.0, gt=0, allow_inf_nan=False)


class TargetFile(_Strict):
    provider: Provider
    base_url: str = Field(pattern=r"^https?://")
    api_key_env: str | None = None
    api_key_file: Path | None = None
    timeout_s: float = Field(default=10.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    ticket_url_template: str | None = None
    #: the provider's limit, one budget shared by every worker (dispatcher.ratelimit): "N/second|minute|hour|day"
    rate: str = "60/minute"
    #: requests that may go back to back after a quiet spell; 1 never overruns a fixed-window provider
    burst: int = Field(default=5, ge=1)
    departments_ttl_s: float = Field(default=300.0, ge=0)
    critical_policy: Literal["downgrade", "fail"] = "downgrade"
    retry: RetryFile = RetryFile()
    poll: PollFile = PollFile()
    routes: dict[str, RouteFile] = Field(default_factory=dict)

    @field_validator("rate")
    @classmethod
    def _rate_parses(cls, value: str) -> str:
        parse_rate(value)
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> TargetFile:
        if bool(self.api_key_env) == bool(self.api_key_file):
            raise ValueError("give exactly one of api_key_env or api_key_file")
        return self


class TokenFile(_Strict):
    token_env: str | None = None
    token_file: Path | None = None
    scopes: list[Literal["intents:write", "intents:read", "alerts:write", "operator"]] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> TokenFile:
        if bool(self.token_env) == bool(self.token_file):
            raise ValueError("give exactly one of token_env or token_file")
        return self


class ApiFile(_Strict):
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    #: most intents one ``POST /v1/intents/batch`` may carry (more: 413)
    max_batch: int = Field(default=1000, ge=1, le=100_000)
    #: the batch endpoint's body limit; a batch is many intents, so it gets more than one intent's
    max_batch_body_bytes: int = Field(default=16 * 1_048_576, ge=1024)
    tokens: dict[str, TokenFile] = Field(default_factory=dict)


class SchedulerFile(_Strict):
    interval_s: float = Field(default=1.0, gt=0)
    lease_s: float = Field(default=120.0, gt=0)
    requeue_after_s: float = Field(default=60.0, gt=0)
    short_wait_s: float = Field(default=30.0, ge=0)


class AlertRouteFile(_Strict):
    """One ``[[alerts.routes]]`` entry; matchers apply to the group's common labels."""

    match: dict[str, str] = Field(default_factory=dict)
    match_re: dict[str, str] = Field(default_factory=dict)
    receiver: str | None = None
    target: str
    topic: str | None = None
    priority: Priority | None = None
    priority_from_severity: dict[str, Priority] | None = None
    service_label: str | None = None
    service_type: str | None = None
    department: str | None = None
    category: str | None = None


class AlertsFile(_Strict):
    routes: list[AlertRouteFile] = Field(default_factory=list)
    default_target: str | None = None
    default_topic: str | None = None
    reopen_window_s: float = Field(default=3600.0, ge=0)
    flap_window_s: float = Field(default=60.0, ge=0)
    close_on_resolve: bool = True
    subject_template: str = Field(default=DEFAULT_SUBJECT_TEMPLATE, min_length=1)
    body_template: str = Field(default=DEFAULT_BODY_TEMPLATE, min_length=1)
    severity_label: str = Field(default="severity", min_length=1)
    priority_from_severity: dict[str, Priority] = Field(default_factory=lambda: dict(DEFAULT_SEVERITY_PRIORITY))
    grafana_secret_env: str | None = None
    grafana_secret_file: Path | None = None

    @model_validator(mode="after")
    def _one_secret_source(self) -> AlertsFile:
        if self.grafana_secret_env and self.grafana_secret_file:
            raise ValueError("give at most one of grafana_secret_env or grafana_secret_file")
        return self


class RetentionFile(_Strict):
    """How long attempts (with their request/response excerpts) are kept; intents and tickets stay."""

    attempts_days: float = Field(default=30.0, gt=0)
    prune_interval_s: float = Field(default=3600.0, gt=0)


class ConfigFile(_Strict):
    targets: dict[str, TargetFile] = Field(default_factory=dict)
    alerts: AlertsFile = AlertsFile()
    api: ApiFile = ApiFile()
    scheduler: SchedulerFile = SchedulerFile()
    retention: RetentionFile = RetentionFile()


@dataclass(frozen=True)
class TargetConfig:
    """One named provider account, with its secret resolved."""

    name: str
    provider: Provider
    base_url: str
    api_key: SecretStr
    timeout_s: float
    connect_timeout_s: float
    ticket_url_template: str | None
    rate_count: int
    rate_period_s: float
    burst: int
    departments_ttl_s: float
    critical_policy: str
    retry: RetryPolicy
    poll_interval_s: float
    poll_deadline_s: float
    routes: Mapping[str, Route]
    poll_first_s: float = FIRST_POLL_S
    poll_growth: float = 0.1
    poll_max_interval_s: float = 30.0

    @cached_property
    def poll_policy(self) -> PollPolicy:
        """The poll schedule (dispatcher.backoff.poll_wait) from the ``poll_*`` settings."""
        return PollPolicy(first_s=self.poll_first_s, interval_s=self.poll_interval_s, growth=self.poll_growth,
                          max_interval_s=self.poll_max_interval_s)

    def __repr__(self) -> str:
        return f"TargetConfig(name={self.name!r}, provider={self.provider.value!r}, base_url={self.base_url!r})"


@dataclass(frozen=True)
class ApiToken:
    name: str
    token: SecretStr
    scopes: frozenset[str]


@dataclass(frozen=True)
class AppConfig:
    """Everything the program was configured with, validated."""

    settings: Settings
    targets: Mapping[str, TargetConfig] = field(default_factory=dict)
    tokens: tuple[ApiToken, ...] = ()
    max_body_bytes: int = 1_048_576
    max_batch: int = 1000
    max_batch_body_bytes: int = 16 * 1_048_576
    scheduler: SchedulerFile = field(default_factory=SchedulerFile)
    retention: RetentionFile = field(default_factory=RetentionFile)
    source: Path | None = None
    alerts: AlertsConfig = field(default_factory=AlertsConfig)

    def target(self, name: str) -> TargetConfig:
        return self.targets[name]

    def secret_values(self) -> list[str]:
        """Every secret this configuration holds, for the log formatter to mask (defence in depth)."""
        found = [t.api_key.get_secret_value() for t in self.targets.values()]
        found += [t.token.get_secret_value() for t in self.tokens]
        return [s for s in found if s]


def _read_secret(path: str, env_name: str | None, file_path: Path | None, env: Mapping[str, str]) -> SecretStr:
    if env_name:
        value = env.get(env_name)
        if not value:
            raise ConfigError(f"{path}_env: environment variable {env_name} is not set")
        return SecretStr(value)
    assert file_path is not None
    try:
        value = file_path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{path}_file: cannot read {file_path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"{path}_file: {file_path} is empty")
    return SecretStr(value)


def _format_validation(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_url=False):
        loc = ".".join(str(part) for part in item["loc"]) or "(top level)"
        msg = "unknown key" if item["type"] == "extra_forbidden" else str(item["msg"])
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def parse_config(data: Mapping[str, Any], settings: Settings, env: Mapping[str, str] | None = None,
                 source: Path | None = None) -> AppConfig:
    """Validate a parsed TOML document and resolve its secrets; :class:`ConfigError` names the path."""
    env = os.environ if env is None else env
    try:
        parsed = ConfigFile.model_validate(data)
    except ValidationError as exc:
        where = f"{source}: " if source else ""
        raise ConfigError(where + _format_validation(exc)) from None
    targets: dict[str, TargetConfig] = {}
    for name, t in parsed.targets.items():
        count, period = parse_rate(t.rate)
        if t.retry.base_s > t.retry.cap_s:
            raise ConfigError(f"targets.{name}.retry.base_s: must not exceed cap_s")
        poll = _poll_policy(f"targets.{name}.poll", t.poll)
        targets[name] = TargetConfig(
            name=name, provider=t.provider, base_url=t.base_url.rstrip("/"),
            api_key=_read_secret(f"targets.{name}.api_key", t.api_key_env, t.api_key_file, env),
            timeout_s=t.timeout_s, connect_timeout_s=t.connect_timeout_s,
            ticket_url_template=t.ticket_url_template, rate_count=count, rate_period_s=period, burst=t.burst,
            departments_ttl_s=t.departments_ttl_s, critical_policy=t.critical_policy,
            retry=RetryPolicy(max_attempts=t.retry.max_attempts, base_s=t.retry.base_s, cap_s=t.retry.cap_s,
                              final_codes=frozenset(t.retry.final_codes)),
            poll_interval_s=poll.interval_s, poll_deadline_s=t.poll.deadline_s,
            routes={topic: Route(r.department, r.category) for topic, r in t.routes.items()},
            poll_first_s=poll.first_s, poll_growth=poll.growth, poll_max_interval_s=poll.max_interval_s,
        )
    tokens = tuple(
        ApiToken(name, _read_secret(f"api.tokens.{name}.token", tok.token_env, tok.token_file, env),
                 frozenset(tok.scopes))
        for name, tok in parsed.api.tokens.items()
    )
    return AppConfig(settings=settings, targets=targets, tokens=tokens, max_body_bytes=parsed.api.max_body_bytes,
                     max_batch=parsed.api.max_batch, max_batch_body_bytes=parsed.api.max_batch_body_bytes,
                     scheduler=parsed.scheduler, retention=parsed.retention, source=source,
                     alerts=_alerts_config(parsed.alerts, targets, env))


def _poll_policy(path: str, poll: PollFile) -> PollPolicy:
    """``[targets.X.poll]`` as a schedule; a cap below the interval or the first look fails naming the key."""
    first = poll.first_s if poll.first_s is not None else min(FIRST_POLL_S, poll.interval_s)
    for name, value in (("interval_s", poll.interval_s), ("first_s", first)):
        if poll.max_interval_s < value:
            raise ConfigError(f"{path}.max_interval_s: must not be less than {name} ({value:g})")
    return PollPolicy(first_s=first, interval_s=poll.interval_s, growth=poll.growth,
                      max_interval_s=poll.max_interval_s)


def _alerts_config(alerts: AlertsFile, targets: Mapping[str, TargetConfig], env: Mapping[str, str]) -> AlertsConfig:
    """Check the ``[alerts]`` section against the targets (names, topics), regexes and templates."""
    import re

    def target_of(path: str, name: str) -> TargetConfig:
        if name not in targets:
            raise ConfigError(f"{path}: unknown target '{name}'; configured: {', '.join(sorted(targets)) or '(none)'}")
        return targets[name]

    def check_route_topic(path: str, target: TargetConfig, topic: str | None) -> None:
        problem = check_topic(target.provider, topic, merged_routes(target.provider, target.routes))
        if topic is not None and problem is not None:
            raise ConfigError(f"{path}: {problem.reason}")

    routes: list[AlertRoute] = []
    for index, r in enumerate(alerts.routes):
        path = f"alerts.routes[{index}]"
        target = target_of(f"{path}.target", r.target)
        if r.department is None:
            check_route_topic(f"{path}.topic", target, r.topic)
        patterns: dict[str, re.Pattern[str]] = {}
        for label, pattern in r.match_re.items():
            try:
                patterns[label] = re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{path}.match_re.{label}: not a regular expression: {exc}") from None
        if r.service_type is not None and r.service_label is None:
            raise ConfigError(f"{path}.service_type: needs service_label (the label whose value is the service id)")
        routes.append(AlertRoute(
            target=r.target, match=dict(r.match), match_re=patterns, receiver=r.receiver, topic=r.topic,
            priority=r.priority, priority_from_severity=r.priority_from_severity, service_label=r.service_label,
            service_type=r.service_type, department=r.department, category=r.category))
    if alerts.default_target is not None:
        check_route_topic("alerts.default_topic", target_of("alerts.default_target", alerts.default_target),
                          alerts.default_topic)
    elif alerts.default_topic is not None:
        raise ConfigError("alerts.default_topic: needs alerts.default_target")
    for name in ("subject_template", "body_template"):
        problem = check_template(getattr(alerts, name))
        if problem:
            raise ConfigError(f"alerts.{name}: {problem}")
    secret = None
    if alerts.grafana_secret_env or alerts.grafana_secret_file:
        secret = _read_secret("alerts.grafana_secret", alerts.grafana_secret_env, alerts.grafana_secret_file, env)
    return AlertsConfig(
        routes=tuple(routes), default_target=alerts.default_target, default_topic=alerts.default_topic,
        reopen_window_s=alerts.reopen_window_s, flap_window_s=alerts.flap_window_s,
        close_on_resolve=alerts.close_on_resolve, subject_template=alerts.subject_template,
        body_template=alerts.body_template, severity_label=alerts.severity_label,
        priority_from_severity={k.strip().lower(): v for k, v in alerts.priority_from_severity.items()},
        grafana_secret=secret)


def read_settings() -> Settings:
    """``DISPATCHER_*`` from the environment; a bad value is a :class:`ConfigError` naming the
    variable and the reason (a URL's value is never repeated: it may hold a password)."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = "DISPATCHER_" + "_".join(str(part) for part in error["loc"]).upper()
            shown = "" if name.endswith("_URL") else f" (got {error.get('input')!r})"
            problems.append(f"{name}: {error['msg']}{shown}")
        raise ConfigError("; ".join(problems)) from None


def load_config(settings: Settings | None = None, env: Mapping[str, str] | None = None) -> AppConfig:
    """Read the settings and the targets file (``DISPATCHER_CONFIG``, else ``./dispatcher.toml``)."""
    settings = settings or read_settings()
    path = settings.config
    if path is None and Path("dispatcher.toml").is_file():
        path = Path("dispatcher.toml")
    if path is None:
        return AppConfig(settings=settings)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"DISPATCHER_CONFIG: {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, settings, env, source=path)
