"""Every knob of the simulators, with defaults that behave like a healthy provider."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

RETRY_AFTER_FORMATS = ("seconds", "http-date")


def default_hostup_departments() -> list[dict[str, Any]]:
    """The slugs HostUp is known to return; descriptions hold HTML and may be null, as documented."""
    return [
        {
            "slug": "general-web-hosting",
            "displayName": "Web hosting",
            "description": "<p>Shared hosting, e-mail and <strong>WordPress</strong> questions.</p>",
            "email": "support@hostup.se",
        },
        {
            "slug": "domain-names",
            "displayName": "Domain names",
            "description": "<p>Registrations, transfers and DNS.</p>",
            "email": None,
        },
        {
            "slug": "vps",
            "displayName": "VPS",
            "description": None,
            "email": "vps@hostup.se",
        },
        {
            "slug": "billing",
            "displayName": "Billing",
            "description": "<p>Invoices, payments and refunds.</p>",
            "email": "billing@hostup.se",
        },
    ]


@dataclass
class SimulatorSettings:
    """All knobs; ``PUT /_sim/config`` changes any subset of them while the simulator runs."""

    hostup_key: str = "sim-hostup-key"
    nocworx_key: str = "sim-nocworx-key"
    hostup_departments: list[dict[str, Any]] = field(default_factory=default_hostup_departments)
    #: requests allowed per window per provider; 0 = unlimited
    rate_limit: int = 0
    rate_window_s: float = 1.0
    #: "seconds" | "http-date"
    retry_after_format: str = "seconds"
    #: fraction of requests answered 500/502/503 before anything else happens
    error_rate: float = 0.0
    #: random latency range (milliseconds) added to every provider request
    latency_ms: tuple[int, int] = (0, 0)
    #: fraction of creates where the ticket (HostUp) / task (NocWorx) is made, then the connection drops
    drop_after_create_rate: float = 0.0
    #: NocWorx tasks resolve this long after the 202
    task_delay_s: float = 0.2
    #: when set, [low, high]: each task resolves a uniform random time in this range after its 202
    #: instead (drawn from a stream of its own, seeded by ``seed``: the n-th task gets the same delay
    #: in every run with that seed, whatever else happened); ``GET /_sim/tasks`` shows each one's
    task_delay_range_s: tuple[float, float] | None = None
    task_failure_rate: float = 0.0
    task_rejected_rate: float = 0.0
    #: fraction of tasks that stay "pending" forever
    task_stuck_rate: float = 0.0
    #: task:show answers 404 for this long after the 202 (documented quirk)
    task_404_window_s: float = 0.0
    #: fraction of successful tasks whose ``resource`` is null
    task_resource_null_rate: float = 0.0
    #: whether the NocWorx 202 carries a Location header
    location_header: bool = True
    #: fraction of tasks whose ``metadata.uri`` ends in "/"
    uri_trailing_slash_rate: float = 0.0
    #: HostUp: critical tickets allowed per rolling hour; 0 disables the check
    critical_per_hour: int = 1
    #: seeds every random decision (ids, faults) for reproducible runs
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["latency_ms"] = list(self.latency_ms)
        data["task_delay_range_s"] = list(self.task_delay_range_s) if self.task_delay_range_s is not None else None
        return data


_ADAPTER: TypeAdapter[SimulatorSettings] = TypeAdapter(SimulatorSettings)
_FIELDS = frozenset(SimulatorSettings.__dataclass_fields__)
_RATES = (
    "error_rate", "drop_after_create_rate", "task_failure_rate", "task_rejected_rate",
    "task_stuck_rate", "task_resource_null_rate", "uri_trailing_slash_rate",
)


class SettingsError(ValueError):
    """A settings change that cannot be applied; ``problems`` name the fields."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def check_settings(settings: SimulatorSettings) -> None:
    """Refuse values that would make the simulator misbehave instead of the provider."""
    problems: list[str] = []
    for name in _RATES:
        value = getattr(settings, name)
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name}: must be between 0 and 1")
    task_outcomes = settings.task_failure_rate + settings.task_rejected_rate + settings.task_stuck_rate
    if task_outcomes > 1.0 + 1e-9:
        problems.append("task_failure_rate + task_rejected_rate + task_stuck_rate: must not exceed 1")
    if settings.rate_limit < 0:
        problems.append("rate_limit: must be >= 0")
    if settings.rate_window_s <= 0:
        problems.append("rate_window_s: must be > 0")
    if settings.retry_after_format not in RETRY_AFTER_FORMATS:
        problems.append(f"retry_after_format: must be one of {', '.join(RETRY_AFTER_FORMATS)}")
    low, high = settings.latency_ms
    if low < 0 or high < low:
        problems.append("latency_ms: must be [low, high] with 0 <= low <= high")
    for name in ("task_delay_s", "task_404_window_s"):
        if getattr(settings, name) < 0:
            problems.append(f"{name}: must be >= 0")
    if settings.task_delay_range_s is not None:
        low_s, high_s = settings.task_delay_range_s
        if not (math.isfinite(low_s) and math.isfinite(high_s) and 0 <= low_s <= high_s):
            problems.append("task_delay_range_s: must be [low, high] with 0 <= low <= high (seconds), or null")
    if settings.critical_per_hour < 0:
        problems.append("critical_per_hour: must be >= 0")
    if not settings.hostup_key or not settings.nocworx_key:
        problems.append("hostup_key/nocworx_key: must not be empty")
    slugs: set[str] = set()
    for index, dept in enumerate(settings.hostup_departments):
        slug = dept.get("slug")
        if not isinstance(slug, str) or not slug:
            problems.append(f"hostup_departments[{index}].slug: required")
        elif slug in slugs:
            problems.append(f"hostup_departments[{index}].slug: duplicate {slug!r}")
        else:
            slugs.add(slug)
        if not isinstance(dept.get("displayName"), str):
            problems.append(f"hostup_departments[{index}].displayName: required")
        for key in ("description", "email"):
            if dept.get(key) is not None and not isinstance(dept.get(key), str):
                problems.append(f"hostup_departments[{index}].{key}: must be a string or null")
    if problems:
        raise SettingsError(problems)


def merge_settings(current: SimulatorSettings, patch: Any) -> SimulatorSettings:
    """Apply a partial JSON object to ``current``; the result is validated as a whole."""
    if not isinstance(patch, dict):
        raise SettingsError(["body: must be a JSON object"])
    unknown = sorted(set(patch) - _FIELDS)
    if unknown:
        raise SettingsError([f"{name}: unknown setting" for name in unknown])
    merged = current.to_json()
    merged.update(patch)
    try:
        settings = _ADAPTER.validate_python(merged)
    except ValidationError as exc:
        raise SettingsError([
            f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}"
            for err in exc.errors(include_url=False)
        ]) from None
    for dept in settings.hostup_departments:
        dept.setdefault("description", None)
        dept.setdefault("email", None)
    check_settings(settings)
    return settings
