"""Alertmanager and Grafana webhooks: parse, route, render, and say what changed. Pure: no I/O.

One webhook call is one *notification* about one alert group (Alertmanager's ``groupKey`` on one
``receiver``). This module turns it into the fields of an intent (target, subject, body, priority...)
by the ``[alerts]`` routes, into the group's *state* (``{status, alerts: {fingerprint: ...}}``), and,
given the state a ticket last described, into the text of a reply (what fired, what resolved).

Templates are :class:`string.Template` over a fixed set of fields (``$alertnames``, ``$summary`` ...):
substitution only, no expressions, so a configuration file cannot run code.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from string import Template
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from dispatcher.domain import BODY_MAX, SUBJECT_MAX, Priority, ServiceRef, problems_from_validation
from dispatcher.errors import FieldProblem, IntentInvalid

MAX_ALERTS = 1000
GROUP_KEY_MAX = 200
LABEL_MAX = 64
Source = Literal["alertmanager", "grafana"]
SOURCE_NAMES: Mapping[str, str] = MappingProxyType({"alertmanager": "Alertmanager", "grafana": "Grafana"})

# ---------------------------------------------------------------------------------------------
# Payloads (the published formats; unknown extra fields are ignored, as senders add them over time)
# ---------------------------------------------------------------------------------------------

Labels = dict[str, str]


class WebhookAlert(BaseModel):
    """One alert of a webhook payload (Alertmanager's fields; Grafana adds the URLs and values)."""

    model_config = ConfigDict(extra="ignore")

    status: Literal["firing", "resolved"]
    labels: Labels
    annotations: Labels = Field(default_factory=dict)
    startsAt: datetime | None = None
    endsAt: datetime | None = None
    generatorURL: str = Field(default="", max_length=10_000)
    fingerprint: str = Field(default="", max_length=200)
    silenceURL: str | None = None
    dashboardURL: str | None = None
    panelURL: str | None = None
    valueString: str | None = None


class _WebhookBase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    receiver: str = Field(min_length=1, max_length=500)
    status: Literal["firing", "resolved"]
    groupKey: str = Field(min_length=1, max_length=10_000)
    truncatedAlerts: int = Field(default=0, ge=0)
    groupLabels: Labels = Field(default_factory=dict)
    commonLabels: Labels | None = None
    commonAnnotations: Labels = Field(default_factory=dict)
    externalURL: str = Field(default="", max_length=10_000)
    alerts: list[WebhookAlert] = Field(min_length=1, max_length=MAX_ALERTS)


class AlertmanagerWebhook(_WebhookBase):
    """Alertmanager's webhook receiver payload, version 4."""

    version: Literal["4"]


class GrafanaWebhook(_WebhookBase):
    """Grafana's webhook contact point payload: Alertmanager's shape plus ``orgId, title, state, message``."""

    version: str = "1"
    orgId: int | None = None
    title: str = Field(default="", max_length=10_000)
    state: str = Field(default="", max_length=100)
    message: str = Field(default="", max_length=100_000)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


@dataclass(frozen=True)
class Alert:
    status: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: datetime | None
    ends_at: datetime | None
    generator_url: str
    fingerprint: str
    silence_url: str | None = None
    dashboard_url: str | None = None
    panel_url: str | None = None
    value_string: str | None = None

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "") or "(unnamed alert)"


@dataclass(frozen=True)
class Notification:
    """One webhook call, normalised: the same shape for Alertmanager and Grafana."""

    source: Source
    receiver: str
    group_key: str
    status: str
    alerts: tuple[Alert, ...]
    group_labels: Mapping[str, str]
    common_labels: Mapping[str, str]
    common_annotations: Mapping[str, str]
    external_url: str
    truncated: int = 0
    title: str = ""
    message: str = ""

    @property
    def firing(self) -> tuple[Alert, ...]:
        return tuple(a for a in self.alerts if a.status == "firing")

    @property
    def resolved(self) -> bool:
        """Everything in the group resolved (Alertmanager says ``resolved`` only then)."""
        return self.status == "resolved" or not self.firing


def _when(value: datetime | None) -> datetime | None:
    """``0001-01-01T00:00:00Z`` is Go's zero time: no time at all."""
    if value is None or value.year <= 1:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _fingerprint(labels: Mapping[str, str]) -> str:
    """Alertmanager sends one; older senders do not: the same labels give the same id."""
    text = "\x00".join(f"{k}\x01{v}" for k, v in sorted(labels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _common(alerts: Sequence[Alert]) -> dict[str, str]:
    if not alerts:
        return {}
    first = dict(alerts[0].labels)
    return {k: v for k, v in first.items() if all(a.labels.get(k) == v for a in alerts[1:])}


def _notification(source: Source, payload: _WebhookBase, *, title: str = "", message: str = "") -> Notification:
    alerts = tuple(
        Alert(status=a.status, labels=MappingProxyType(dict(a.labels)),
              annotations=MappingProxyType(dict(a.annotations)), starts_at=_when(a.startsAt),
              ends_at=_when(a.endsAt), generator_url=a.generatorURL,
              fingerprint=a.fingerprint or _fingerprint(a.labels),
              silence_url=a.silenceURL, dashboard_url=a.dashboardURL, panel_url=a.panelURL,
              value_string=a.valueString)
        for a in payload.alerts)
    common = payload.commonLabels if payload.commonLabels is not None else _common(alerts)
    return Notification(
        source=source, receiver=payload.receiver, group_key=payload.groupKey, status=payload.status, alerts=alerts,
        group_labels=MappingProxyType(dict(payload.groupLabels)), common_labels=MappingProxyType(dict(common)),
        common_annotations=MappingProxyType(dict(payload.commonAnnotations)), external_url=payload.externalURL,
        truncated=payload.truncatedAlerts, title=title, message=message)


def _validate(model: type[_WebhookBase], data: Any) -> _WebhookBase:
    if not isinstance(data, dict):
        raise IntentInvalid([FieldProblem("body", "a webhook payload must be a JSON object")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise IntentInvalid(problems_from_validation(exc)) from None


def parse_alertmanager(data: Any) -> Notification:
    """Validate an Alertmanager v4 webhook body; :class:`IntentInvalid` names each bad field."""
    return _notification("alertmanager", _validate(AlertmanagerWebhook, data))


def parse_grafana(data: Any) -> Notification:
    """Validate a Grafana webhook contact point body; :class:`IntentInvalid` names each bad field."""
    payload = _validate(GrafanaWebhook, data)
    assert isinstance(payload, GrafanaWebhook)
    return _notification("grafana", payload, title=payload.title, message=payload.message)


def signature_ok(body: bytes, secret: str, given: str | None) -> bool:
    """Grafana's ``X-Grafana-Alerting-Signature``: hex HMAC-SHA256 of the raw body, compared in constant time."""
    if not given:
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given.strip().lower())


def group_key_for(n: Notification) -> str:
    """The group's key: readable (source, receiver, groupKey) and a hash of all three, at most 200 characters.

    The hash makes it unique however long the groupKey is; the readable part is for operators.
    """
    digest = hashlib.sha256(f"{n.source}\x00{n.receiver}\x00{n.group_key}".encode()).hexdigest()[:20]
    readable = re.sub(r"[^A-Za-z0-9_.:=,/-]+", "", f"{n.source}:{n.receiver}:{n.group_key}")
    return f"{readable[:GROUP_KEY_MAX - len(digest) - 1]}#{digest}"


# ---------------------------------------------------------------------------------------------
# State and what changed
# ---------------------------------------------------------------------------------------------

def state_of(n: Notification) -> dict[str, Any]:
    """The alert set as stored on the group and the intent (JSON): what a ticket can be brought up to."""
    return {
        "status": "resolved" if n.resolved else "firing",
        "truncated": n.truncated,
        "alerts": {a.fingerprint: {"status": a.status, "labels": dict(a.labels), "annotations": dict(a.annotations),
                                   "startsAt": a.starts_at.isoformat() if a.starts_at else None}
                   for a in n.alerts},
    }


@dataclass(frozen=True)
class AlertLine:
    """One alert as a reply mentions it."""

    fingerprint: str
    name: str
    labels: Mapping[str, str]
    summary: str
    starts_at: str | None


@dataclass(frozen=True)
class AlertDiff:
    """From the state a ticket last described to a newer one."""

    newly_firing: tuple[AlertLine, ...] = ()
    resolved: tuple[AlertLine, ...] = ()
    still_firing: tuple[AlertLine, ...] = ()
    all_resolved: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.newly_firing or self.resolved)


def _line(fingerprint: str, alert: Mapping[str, Any]) -> AlertLine:
    labels = alert.get("labels") or {}
    annotations = alert.get("annotations") or {}
    return AlertLine(fingerprint, str(labels.get("alertname") or "(unnamed alert)"), dict(labels),
                     str(annotations.get("summary") or ""), alert.get("startsAt"))


def diff_states(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> AlertDiff:
    """What changed between two alert sets.

    An alert firing before and missing now counts as resolved (Alertmanager drops resolved alerts),
    unless the sender truncated the list, when its fate is unknown and it still counts as firing.
    """
    old: Mapping[str, Any] = (before or {}).get("alerts") or {}
    new: Mapping[str, Any] = after.get("alerts") or {}
    truncated = bool(after.get("truncated"))
    newly: list[AlertLine] = []
    resolved: list[AlertLine] = []
    still: list[AlertLine] = []
    for fp, alert in new.items():
        was_firing = (old.get(fp) or {}).get("status") == "firing"
        if alert.get("status") == "firing":
            (still if was_firing else newly).append(_line(fp, alert))
        elif was_firing:
            resolved.append(_line(fp, alert))
    for fp, alert in old.items():
        if fp not in new and alert.get("status") == "firing":
            (still if truncated else resolved).append(_line(fp, alert))
    return AlertDiff(tuple(newly), tuple(resolved), tuple(still),
                     all_resolved=after.get("status") == "resolved" and not any(
                         a.get("status") == "firing" for a in new.values()))


def _describe(line: AlertLine, common: Mapping[str, str]) -> str:
    own = {k: v for k, v in sorted(line.labels.items()) if k != "alertname" and common.get(k) != v}
    text = line.name + (" (" + ", ".join(f"{k}={v}" for k, v in own.items()) + ")" if own else "")
    if line.summary:
        text += f": {line.summary}"
    return text


def reply_text(diff: AlertDiff, *, flapped: int = 0, reopened: bool = False, closing: bool = False,
               source: str = "alertmanager") -> str | None:
    """The reply that brings a ticket up to date, or None when there is nothing to say."""
    if not diff.changed and not flapped:
        return None
    every = diff.newly_firing + diff.resolved + diff.still_firing
    common = _common_of([line.labels for line in every])
    lines: list[str] = []
    if diff.all_resolved:
        lines.append("All alerts of this group have resolved." + (" Closing the ticket." if closing else ""))
    elif reopened:
        lines.append("The alerts are firing again: reopening this ticket.")
    else:
        counts = [f"{len(diff.newly_firing)} newly firing" if diff.newly_firing else "",
                  f"{len(diff.resolved)} resolved" if diff.resolved else "",
                  f"{len(diff.still_firing)} still firing" if diff.still_firing else ""]
        lines.append("Alert update: " + ", ".join(c for c in counts if c) + ".")
    if flapped and not diff.changed:
        lines.append(f"The alerts flapped: {flapped} notification(s) since the last update changed their state "
                     "and it changed back; the net state is unchanged.")
    elif flapped:
        lines.append(f"({flapped} intermediate notification(s) were coalesced into this update.)")
    for title, items in (("Newly firing", diff.newly_firing), ("Resolved", diff.resolved),
                         ("Still firing", diff.still_firing)):
        if items:
            lines.append("")
            lines.append(f"{title}:")
            lines.extend(f"  - {_describe(item, common)}"
                         + (f" (since {item.starts_at})" if item.starts_at and title != "Resolved" else "")
                         for item in items)
    lines.append("")
    lines.append(f"(update from {SOURCE_NAMES.get(source, source)})")
    return "\n".join(lines)


def _common_of(label_sets: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not label_sets:
        return {}
    first = dict(label_sets[0])
    return {k: v for k, v in first.items() if all(s.get(k) == v for s in label_sets[1:])}


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------

DEFAULT_SUBJECT_TEMPLATE = "$title"
DEFAULT_BODY_TEMPLATE = "$overview\n\n$alerts\n\n$links\n$source_line"

#: the fields a template may name; plus ``$label_<name>`` / ``$annotation_<name>`` of the common ones
TEMPLATE_FIELDS = frozenset({
    "title", "status", "STATUS", "firing_count", "resolved_count", "alert_count", "alertnames", "summary",
    "description", "receiver", "groupKey", "groupLabels", "commonLabels", "commonAnnotations", "externalURL",
    "alerts", "overview", "links", "source", "source_line", "source_title", "message", "context",
    "truncated", "silence_url",
})
_FIELD_PREFIXES = ("label_", "annotation_")


def check_template(text: str) -> str | None:
    """Why a template is unusable (a bad ``$`` or an unknown field), or None."""
    template = Template(text)
    if not template.is_valid():
        return "invalid placeholder (use $name or ${name}; $$ for a literal $)"
    unknown = sorted(name for name in template.get_identifiers()
                     if name not in TEMPLATE_FIELDS and not name.startswith(_FIELD_PREFIXES))
    if unknown:
        return f"unknown field(s) {', '.join('$' + u for u in unknown)}; known: " + ", ".join(
            sorted(TEMPLATE_FIELDS)) + ", $label_<name>, $annotation_<name>"
    return None


class _Fields(dict[str, str]):
    """Missing ``label_x`` / ``annotation_x`` render as nothing (not every group has every label)."""

    def __missing__(self, key: str) -> str:
        if key.startswith(_FIELD_PREFIXES):
            return ""
        raise KeyError(key)


def _pairs(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def title_of(n: Notification, severity_label: str = "severity") -> str:
    """Alertmanager's default title style: ``[FIRING:2] HighLatency, DiskFull (prod)``."""
    status = f"FIRING:{len(n.firing)}" if not n.resolved else "RESOLVED"
    names = list(dict.fromkeys(a.name for a in n.alerts)) or ["alerts"]
    context = " ".join(v for k, v in sorted(n.common_labels.items())
                       if k not in ("alertname", severity_label) and not k.startswith("__") and v)
    if len(context) > 80:
        context = context[:79] + "…"
    title = f"[{status}] {', '.join(names)}"
    return title + (f" ({context})" if context else "")


def silence_url(n: Notification) -> str:
    """Where a person silences this group: Grafana gives one per alert; Alertmanager's UI takes a filter."""
    for alert in n.alerts:
        if alert.silence_url:
            return alert.silence_url
    if not n.external_url or n.source != "alertmanager":
        return ""
    matchers = ",".join(f'{k}="{v}"' for k, v in sorted(n.common_labels.items()))
    return f"{n.external_url.rstrip('/')}/#/silences/new?filter={quote('{' + matchers + '}', safe='')}"


def _alert_block(alert: Alert) -> str:
    lines = [f"[{alert.status.upper()}] {alert.name}", f"  Labels: {_pairs(alert.labels)}"]
    for key in ("summary", "description"):
        if alert.annotations.get(key):
            lines.append(f"  {key.capitalize()}: {alert.annotations[key]}")
    others = {k: v for k, v in alert.annotations.items() if k not in ("summary", "description")}
    if others:
        lines.append(f"  Annotations: {_pairs(others)}")
    if alert.value_string:
        lines.append(f"  Values: {alert.value_string}")
    if alert.starts_at:
        lines.append(f"  Started: {alert.starts_at.isoformat()}")
    if alert.ends_at and alert.status == "resolved":
        lines.append(f"  Ended: {alert.ends_at.isoformat()}")
    for label, url in (("Source", alert.generator_url), ("Dashboard", alert.dashboard_url),
                       ("Panel", alert.panel_url)):
        if url:
            lines.append(f"  {label}: {url}")
    return "\n".join(lines)


def template_fields(n: Notification, severity_label: str = "severity") -> dict[str, str]:
    """Every value a template can name, as plain text."""
    firing, resolved = len(n.firing), len(n.alerts) - len(n.firing)
    name = SOURCE_NAMES[n.source]
    summary = n.common_annotations.get("summary") or next(
        (a.annotations["summary"] for a in n.alerts if a.annotations.get("summary")), "")
    description = n.common_annotations.get("description", "")
    overview = [summary] if summary else []
    if description:
        overview.append(description)
    if n.message and n.source == "grafana" and not overview:
        overview.append(n.message.strip())
    overview.append(f"{firing} firing, {resolved} resolved" + (
        f" ({n.truncated} more alert(s) left out by {name})" if n.truncated else "") + ".")
    blocks = [_alert_block(a) for a in n.alerts]
    if n.truncated:
        blocks.append(f"... and {n.truncated} more alert(s) that {name} truncated from this notification.")
    silence = silence_url(n)
    links = [f"{name}: {n.external_url}"] if n.external_url else []
    if silence:
        links.append(f"Silence: {silence}")
    fields: dict[str, str] = {
        "title": title_of(n, severity_label), "status": "resolved" if n.resolved else "firing",
        "STATUS": f"FIRING:{firing}" if not n.resolved else "RESOLVED", "firing_count": str(firing),
        "resolved_count": str(resolved), "alert_count": str(len(n.alerts)),
        "alertnames": ", ".join(dict.fromkeys(a.name for a in n.alerts)), "summary": summary,
        "description": description, "receiver": n.receiver, "groupKey": n.group_key,
        "groupLabels": _pairs(n.group_labels), "commonLabels": _pairs(n.common_labels),
        "commonAnnotations": _pairs(n.common_annotations), "externalURL": n.external_url,
        "alerts": "\n\n".join(blocks), "overview": "\n".join(overview), "links": "\n".join(links),
        "source": name, "source_title": n.title, "message": n.message,
        "source_line": f"Filed by dispatcher from {name} (receiver \"{n.receiver}\", group {n.group_key}).",
        "context": " ".join(v for k, v in sorted(n.common_labels.items())
                            if k != "alertname" and not k.startswith("__")),
        "truncated": str(n.truncated), "silence_url": silence,
    }
    for key, value in n.common_labels.items():
        fields[f"label_{_safe_name(key)}"] = value
    for key, value in n.common_annotations.items():
        fields[f"annotation_{_safe_name(key)}"] = value
    return fields


def render(template: str, fields: Mapping[str, str]) -> str:
    """Substitute the fields; nothing else (no expressions, no attribute access)."""
    return Template(template).substitute(_Fields(fields))


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 60] + f"\n... [{len(text) - limit + 60} characters cut]"


# ---------------------------------------------------------------------------------------------
# Routing (the [alerts] section)
# ---------------------------------------------------------------------------------------------

#: severity label value → priority, when a route says nothing (unknown severities are ``medium``)
DEFAULT_SEVERITY_PRIORITY: Mapping[str, Priority] = MappingProxyType({
    "critical": Priority.urgent, "page": Priority.urgent, "error": Priority.high, "high": Priority.high,
    "warning": Priority.medium, "warn": Priority.medium, "medium": Priority.medium, "info": Priority.low,
    "low": Priority.low, "none": Priority.low,
})
_PRIORITY_ORDER = list(Priority)


@dataclass(frozen=True)
class AlertRoute:
    """One ``[[alerts.routes]]`` entry: which groups (all matchers must hold) and what their tickets get."""

    target: str
    match: Mapping[str, str] = field(default_factory=dict)
    match_re: Mapping[str, re.Pattern[str]] = field(default_factory=dict)
    receiver: str | None = None
    topic: str | None = None
    priority: Priority | None = None
    priority_from_severity: Mapping[str, Priority] | None = None
    service_label: str | None = None
    service_type: str | None = None
    department: str | None = None
    category: str | None = None

    def matches(self, receiver: str, labels: Mapping[str, str]) -> bool:
        """Equality and anchored regular expressions (as Alertmanager's own matchers) on the common labels."""
        if self.receiver is not None and receiver != self.receiver:
            return False
        if any(labels.get(k) != v for k, v in self.match.items()):
            return False
        return all(pattern.fullmatch(labels.get(k, "")) for k, pattern in self.match_re.items())


@dataclass(frozen=True)
class AlertsConfig:
    """The ``[alerts]`` section, validated (see :mod:`dispatcher.config`)."""

    routes: tuple[AlertRoute, ...] = ()
    default_target: str | None = None
    default_topic: str | None = None
    reopen_window_s: float = 3600.0
    flap_window_s: float = 60.0
    close_on_resolve: bool = True
    subject_template: str = DEFAULT_SUBJECT_TEMPLATE
    body_template: str = DEFAULT_BODY_TEMPLATE
    severity_label: str = "severity"
    priority_from_severity: Mapping[str, Priority] = field(default_factory=lambda: DEFAULT_SEVERITY_PRIORITY)
    grafana_secret: SecretStr | None = None


@dataclass(frozen=True)
class Routed:
    """Where a notification goes and with what ticket fields."""

    target: str
    route: int | None               # the index of the matching route; None for default_target
    topic: str | None
    priority: Priority
    department: str | None
    category: str | None
    service: ServiceRef | None


def _priority(n: Notification, route: AlertRoute | None, config: AlertsConfig) -> Priority:
    if route is not None and route.priority is not None:
        return route.priority
    mapping = (route.priority_from_severity if route is not None and route.priority_from_severity is not None
               else config.priority_from_severity)
    alerts = n.firing or n.alerts
    severities = {a.labels.get(config.severity_label, "").strip().lower() for a in alerts}
    chosen = [mapping.get(s) or DEFAULT_SEVERITY_PRIORITY.get(s) or Priority.medium for s in severities]
    return max(chosen, key=_PRIORITY_ORDER.index) if chosen else Priority.medium


def route_notification(n: Notification, config: AlertsConfig) -> Routed:
    """The first matching route wins, else ``default_target``; neither is a 422 (it can never succeed)."""
    labels = n.common_labels
    for index, route in enumerate(config.routes):
        if route.matches(n.receiver, labels):
            service = None
            if route.service_label and labels.get(route.service_label):
                service = ServiceRef(type=route.service_type or "other", id=labels[route.service_label])
            return Routed(route.target, index, route.topic, _priority(n, route, config), route.department,
                          route.category, service)
    if config.default_target:
        return Routed(config.default_target, None, config.default_topic, _priority(n, None, config), None, None, None)
    raise IntentInvalid([
        FieldProblem("receiver", f"no [[alerts.routes]] entry matches receiver '{n.receiver}' with common labels "
                     f"{{{_pairs(labels)}}}, and no alerts.default_target is configured"),
        FieldProblem("commonLabels", "matched by no route"),
    ])


def intent_fields(n: Notification, routed: Routed, config: AlertsConfig) -> dict[str, Any]:
    """The intent (as a producer would send it) that files this notification's ticket."""
    fields = template_fields(n, config.severity_label)
    subject = _one_line(render(config.subject_template, fields), SUBJECT_MAX) or _one_line(fields["title"],
                                                                                           SUBJECT_MAX)
    body = render(config.body_template, fields).strip() or fields["overview"]
    data: dict[str, Any] = {
        "target": routed.target, "subject": subject, "body": _bounded(body, BODY_MAX - 200),
        "priority": routed.priority.value, "group_key": group_key_for(n),
        "labels": {k[:100]: v[:1000] for k, v in sorted(n.common_labels.items())[:LABEL_MAX] if k},
    }
    if routed.topic:
        data["topic"] = routed.topic
    if routed.department:
        data["department"] = routed.department
    if routed.category:
        data["category"] = routed.category
    if routed.service is not None:
        data["service"] = routed.service.model_dump(exclude_none=True)
    if routed.priority is Priority.critical:
        data["critical_reason"] = _one_line(fields["summary"] or fields["title"], 2000)
    return data


__all__ = [
    "DEFAULT_BODY_TEMPLATE", "DEFAULT_SEVERITY_PRIORITY", "DEFAULT_SUBJECT_TEMPLATE", "Alert", "AlertDiff",
    "AlertRoute", "AlertmanagerWebhook", "AlertsConfig", "GrafanaWebhook", "Notification", "Routed",
    "check_template", "diff_states", "group_key_for", "intent_fields", "parse_alertmanager", "parse_grafana",
    "render", "reply_text", "route_notification", "signature_ok", "state_of", "template_fields", "title_of",
]
