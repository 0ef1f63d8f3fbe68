"""The ``[alerts]`` section: parsed with unknown keys refused, checked against the targets, templates
and regexes at start-up (naming the path), and the Grafana secret read from the environment."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from dispatcher.config import Settings, parse_config
from dispatcher.domain import Priority
from dispatcher.errors import ConfigError

TARGETS = {"hostup": {"provider": "hostup", "base_url": "https://h.example/api/v2", "api_key_env": "K"},
           "nocworx": {"provider": "nocworx", "base_url": "https://n.example", "api_key_env": "K"}}
ENV = {"K": "key-value", "GRAFANA_SECRET": "hmac-secret-value"}


def config(alerts: dict[str, Any]) -> Any:
    return parse_config({"targets": TARGETS, "alerts": alerts}, Settings(), env=ENV)


def test_a_full_alerts_section_parses_into_routes_and_policy() -> None:
    text = """
    [alerts]
    default_target = "hostup"
    default_topic = "vps"
    reopen_window_s = 600
    flap_window_s = 30
    close_on_resolve = false
    subject_template = "[$STATUS] $alertnames"
    grafana_secret_env = "GRAFANA_SECRET"
    priority_from_severity = { Critical = "high" }

    [[alerts.routes]]
    match = { team = "shop" }
    match_re = { instance = "db-.*" }
    target = "nocworx"
    topic = "hosting"
    service_label = "service_id"
    service_type = "hosting"
    category = "site_down"
    """
    alerts = parse_config({"targets": TARGETS, **tomllib.loads(text)}, Settings(), env=ENV).alerts
    [route] = alerts.routes
    assert route.target == "nocworx" and route.matches("x", {"team": "shop", "instance": "db-3"})
    assert (alerts.reopen_window_s, alerts.flap_window_s, alerts.close_on_resolve) == (600, 30, False)
    assert alerts.priority_from_severity == {"critical": Priority.high}
    assert alerts.grafana_secret is not None and alerts.grafana_secret.get_secret_value() == "hmac-secret-value"
    assert "hmac-secret-value" not in repr(alerts)


def test_the_defaults_need_no_section() -> None:
    alerts = parse_config({"targets": TARGETS}, Settings(), env=ENV).alerts
    assert (alerts.reopen_window_s, alerts.flap_window_s, alerts.close_on_resolve) == (3600, 60, True)
    assert alerts.routes == () and alerts.default_target is None and alerts.grafana_secret is None


@pytest.mark.parametrize(("alerts", "message"), [
    ({"flap_windows": 3}, "alerts.flap_windows: unknown key"),
    ({"routes": [{"target": "hostup", "matches": {}}]}, "alerts.routes.0.matches: unknown key"),
    ({"routes": [{"match": {"a": "b"}}]}, "alerts.routes.0.target: Field required"),
    ({"routes": [{"target": "zendesk"}]}, "alerts.routes[0].target: unknown target 'zendesk'"),
    ({"routes": [{"target": "hostup", "topic": "weather"}]}, "alerts.routes[0].topic:"),
    ({"routes": [{"target": "hostup", "match_re": {"x": "("}}]}, "alerts.routes[0].match_re.x: not a regular"),
    ({"routes": [{"target": "hostup", "priority": "asap"}]}, "alerts.routes.0.priority"),
    ({"routes": [{"target": "hostup", "service_type": "vps"}]}, "alerts.routes[0].service_type: needs service_label"),
    ({"default_target": "nope"}, "alerts.default_target: unknown target 'nope'"),
    ({"default_topic": "vps"}, "alerts.default_topic: needs alerts.default_target"),
    ({"subject_template": "$nonsense"}, "alerts.subject_template: unknown field(s) $nonsense"),
    ({"body_template": "cost: $"}, "alerts.body_template: invalid placeholder"),
    ({"reopen_window_s": -1}, "alerts.reopen_window_s"),
    ({"grafana_secret_env": "MISSING_VAR"}, "alerts.grafana_secret_env: environment variable MISSING_VAR is not set"),
])
def test_a_bad_alerts_section_fails_at_start_up_naming_the_path(alerts: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(alerts)
    assert message in str(info.value)
