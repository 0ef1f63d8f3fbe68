"""Alert payload parsing, routing, templates and the reply diff: pure functions, no I/O."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from dispatcher.domain import Priority
from dispatcher.errors import IntentInvalid
from dispatcher.intake.alerts import (
    AlertRoute,
    AlertsConfig,
    check_template,
    diff_states,
    group_key_for,
    intent_fields,
    parse_alertmanager,
    parse_grafana,
    render,
    reply_text,
    route_notification,
    signature_ok,
    state_of,
    template_fields,
    title_of,
)
from tests.alerting import alert, alertmanager, go_json, grafana


def problems(data: Any, parser: Any = parse_alertmanager) -> dict[str, str]:
    with pytest.raises(IntentInvalid) as info:
        parser(data)
    return {p.field: p.reason for p in info.value.problems}


# -- parsing -----------------------------------------------------------------------------------

def test_an_alertmanager_payload_parses_with_zero_end_times_as_no_time() -> None:
    n = parse_alertmanager(json.loads(go_json(alertmanager([alert("A"), alert("B", "resolved")], truncated=3))))
    assert n.source == "alertmanager" and n.status == "firing" and n.truncated == 3
    assert [a.status for a in n.alerts] == ["firing", "resolved"]
    assert n.alerts[0].ends_at is None and n.alerts[1].ends_at is not None
    assert n.alerts[0].starts_at is not None and n.alerts[0].starts_at.tzinfo is not None
    assert "&g0.tab=1" in n.alerts[0].generator_url  # \\u0026 in the JSON
    assert not n.resolved and len(n.firing) == 1


def test_a_grafana_payload_parses_and_ignores_fields_it_does_not_know() -> None:
    n = parse_grafana(grafana([alert("High memory usage")]))
    assert n.source == "grafana" and n.title.startswith("[FIRING:1]") and n.message.startswith("**Firing**")
    assert n.alerts[0].silence_url and n.alerts[0].value_string and n.alerts[0].dashboard_url


@pytest.mark.parametrize(("change", "field", "reason"), [
    ({"version": "3"}, "version", "'4'"),
    ({"status": "exploded"}, "status", "'firing' or 'resolved'"),
    ({"receiver": None}, "receiver", "required"),
    ({"alerts": []}, "alerts", "at least 1"),
    ({"alerts": [{"status": "firing"}]}, "alerts.0.labels", "required"),
    ({"alerts": [{"status": "firing", "labels": {"a": 1}}]}, "alerts.0.labels.a", "string"),
    ({"alerts": [{"status": "firing", "labels": {}, "startsAt": "yesterday"}]}, "alerts.0.startsAt", "datetime"),
    ({"truncatedAlerts": -1}, "truncatedAlerts", "greater than or equal to 0"),
])
def test_a_bad_payload_is_refused_naming_the_field(change: dict[str, Any], field: str, reason: str) -> None:
    data = {**alertmanager([alert("A")]), **change}
    data = {k: v for k, v in data.items() if v is not None}
    found = problems(data)
    assert field in found, found
    assert reason in found[field]


def test_a_payload_that_is_not_an_object_is_refused() -> None:
    assert problems([1, 2]) == {"body": "a webhook payload must be a JSON object"}


def test_an_alert_without_a_fingerprint_gets_one_from_its_labels() -> None:
    raw = alertmanager([{**alert("A"), "fingerprint": ""}])
    first, second = parse_alertmanager(raw), parse_alertmanager(json.loads(json.dumps(raw)))
    assert first.alerts[0].fingerprint and first.alerts[0].fingerprint == second.alerts[0].fingerprint


def test_missing_common_labels_are_computed_from_the_alerts() -> None:
    raw = alertmanager([alert("A", instance="x"), alert("B", instance="y")])
    del raw["commonLabels"]
    n = parse_alertmanager(raw)
    assert dict(n.common_labels) == {"env": "prod", "severity": "warning"}


def test_the_group_key_is_readable_bounded_and_unique_per_receiver_and_group() -> None:
    n = parse_alertmanager(alertmanager([alert("A")], group_key='{}/{team="db"}:{alertname="A"}'))
    key = group_key_for(n)
    assert key.startswith("alertmanager:dispatcher:/team=db:alertname=A#") and len(key) <= 200
    long = parse_alertmanager(alertmanager([alert("A")], group_key="{}:{" + "x" * 5000 + "}"))
    other = parse_alertmanager(alertmanager([alert("A")], group_key="{}:{" + "x" * 5000 + "y}"))
    assert len(group_key_for(long)) == 200 and group_key_for(long) != group_key_for(other)
    assert group_key_for(parse_alertmanager(alertmanager([alert("A")], receiver="other"))) != key


def test_a_grafana_signature_is_the_hex_hmac_of_the_raw_body() -> None:
    import hashlib
    import hmac

    body = b'{"a": 1}'
    good = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert signature_ok(body, "s3cret", good) and signature_ok(body, "s3cret", good.upper())
    assert not signature_ok(body + b" ", "s3cret", good)
    assert not signature_ok(body, "other", good) and not signature_ok(body, "s3cret", None)


# -- routing -----------------------------------------------------------------------------------

def route(target: str = "hostup", **kwargs: Any) -> AlertRoute:
    if "match_re" in kwargs:
        kwargs["match_re"] = {k: re.compile(v) for k, v in kwargs["match_re"].items()}
    return AlertRoute(target=target, **kwargs)


def test_the_first_matching_route_wins() -> None:
    config = AlertsConfig(routes=(route("nocworx", match={"team": "db"}), route("hostup", match={"env": "prod"})))
    n = parse_alertmanager(alertmanager([alert("A", team="db")]))
    routed = route_notification(n, config)
    assert routed.target == "nocworx" and routed.route == 0
    assert route_notification(parse_alertmanager(alertmanager([alert("A", team="web")])), config).route == 1


def test_regex_matchers_are_anchored_like_alertmanagers() -> None:
    r = route(match_re={"instance": "db-[0-9]+"})
    assert r.matches("x", {"instance": "db-12"})
    assert not r.matches("x", {"instance": "old-db-12"}) and not r.matches("x", {"instance": "db-12a"})
    assert not r.matches("x", {})


def test_a_route_can_require_the_receiver() -> None:
    r = route(receiver="pager", match={"env": "prod"})
    assert r.matches("pager", {"env": "prod"}) and not r.matches("email", {"env": "prod"})


def test_no_route_and_no_default_is_refused_naming_the_receiver_and_labels() -> None:
    n = parse_alertmanager(alertmanager([alert("A")], receiver="ops"))
    with pytest.raises(IntentInvalid) as info:
        route_notification(n, AlertsConfig(routes=(route(match={"team": "db"}),)))
    [receiver, labels] = info.value.problems
    assert receiver.field == "receiver" and "'ops'" in receiver.reason and "alertname=A" in receiver.reason
    assert labels.field == "commonLabels"


def test_the_default_target_takes_what_no_route_matches() -> None:
    n = parse_alertmanager(alertmanager([alert("A")]))
    routed = route_notification(n, AlertsConfig(default_target="hostup", default_topic="vps"))
    assert (routed.target, routed.route, routed.topic) == ("hostup", None, "vps")


@pytest.mark.parametrize(("severities", "expected"), [
    (["critical"], Priority.urgent), (["warning"], Priority.medium), (["info"], Priority.low),
    (["unknown"], Priority.medium), (["info", "critical"], Priority.urgent), (["error", "warning"], Priority.high),
])
def test_priority_follows_the_highest_severity_by_default(severities: list[str], expected: Priority) -> None:
    alerts = [alert("A", instance=f"i{i}", severity=s) for i, s in enumerate(severities)]
    n = parse_alertmanager(alertmanager(alerts))
    assert route_notification(n, AlertsConfig(default_target="hostup")).priority is expected


def test_a_route_sets_priority_or_its_own_severity_map_and_the_service_from_a_label() -> None:
    n = parse_alertmanager(alertmanager([alert("A", severity="critical", service_id="77")]))
    fixed = AlertsConfig(routes=(route(priority=Priority.low),))
    mapped = AlertsConfig(routes=(route(priority_from_severity={"critical": Priority.high}, service_label="service_id",
                                        service_type="vps"),))
    assert route_notification(n, fixed).priority is Priority.low
    routed = route_notification(n, mapped)
    assert routed.priority is Priority.high and routed.service is not None
    assert (routed.service.type, routed.service.id) == ("vps", "77")


def test_a_critical_priority_gets_a_critical_reason_from_the_summary() -> None:
    n = parse_alertmanager(alertmanager([alert("A", summary="Everything is on fire")]))
    routed = route_notification(n, AlertsConfig(routes=(route(priority=Priority.critical),)))
    fields = intent_fields(n, routed, AlertsConfig())
    assert fields["priority"] == "critical" and fields["critical_reason"] == "Everything is on fire"


# -- templates ---------------------------------------------------------------------------------

def test_the_default_subject_reads_like_alertmanagers_title() -> None:
    n = parse_alertmanager(alertmanager([alert("HighLatency", instance="a"), alert("DiskFull", instance="b")]))
    assert title_of(n) == "[FIRING:2] HighLatency, DiskFull (prod)"
    resolved = parse_alertmanager(alertmanager([alert("HighLatency", "resolved", instance="a")]))
    assert title_of(resolved) == "[RESOLVED] HighLatency (prod a)"  # common label values in key order


def test_the_default_body_has_summaries_labels_times_links_and_the_source() -> None:
    n = parse_alertmanager(alertmanager([alert("HighLatency", summary="p99 over 2s")], truncated=2))
    body = intent_fields(n, route_notification(n, AlertsConfig(default_target="hostup")), AlertsConfig())["body"]
    assert body.startswith("p99 over 2s\nHighLatency has been firing on web-1.\n1 firing, 0 resolved (2 more")
    assert "[FIRING] HighLatency\n  Labels: alertname=HighLatency, env=prod, instance=web-1, severity=warning" in body
    assert "  Started: 2024-05-01T10:00:00.123000+00:00" in body
    assert "  Source: http://prometheus.example:9090/graph?g0.expr=" in body
    assert "Alertmanager: http://alertmanager.example:9093" in body
    assert "Silence: http://alertmanager.example:9093/#/silences/new?filter=%7B" in body
    assert "... and 2 more alert(s) that Alertmanager truncated" in body
    assert body.rstrip().endswith(
        'Filed by dispatcher from Alertmanager (receiver "dispatcher", group {}:{env="prod"}).')


def test_templates_substitute_fields_and_labels_and_nothing_else() -> None:
    n = parse_alertmanager(alertmanager([alert("A", team="db")]))
    fields = template_fields(n)
    rendered = render("$STATUS $alertnames for ${label_team}/$label_nope costs $$5", fields)
    assert rendered == "FIRING:1 A for db/ costs $5"
    assert render("{0.__class__} ${alertnames}", fields) == "{0.__class__} A"


@pytest.mark.parametrize(("template", "problem"), [
    ("$alertnames", None), ("${label_team} $annotation_runbook_url", None),
    ("$bogus", "unknown field(s) $bogus"), ("${alertnames", "invalid placeholder"), ("cost: $", "invalid placeholder"),
])
def test_a_template_naming_unknown_fields_is_refused(template: str, problem: str | None) -> None:
    found = check_template(template)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_a_rendered_subject_is_one_line_and_bounded() -> None:
    n = parse_alertmanager(alertmanager([alert("A" * 300)]))
    config = AlertsConfig(subject_template="$title\nsecond line")
    fields = intent_fields(n, route_notification(n, AlertsConfig(default_target="hostup")), config)
    assert "\n" not in fields["subject"] and len(fields["subject"]) <= 255 and fields["subject"].endswith("…")


# -- what changed ------------------------------------------------------------------------------

def state(*alerts: dict[str, Any], truncated: int = 0) -> dict[str, Any]:
    return state_of(parse_alertmanager(alertmanager(list(alerts), truncated=truncated)))


def test_the_diff_sorts_alerts_into_newly_firing_resolved_and_still_firing() -> None:
    before = state(alert("A"), alert("B", instance="b"))
    after = state(alert("A", "resolved"), alert("B", instance="b"), alert("C", instance="c"))
    diff = diff_states(before, after)
    assert [x.name for x in diff.newly_firing] == ["C"]
    assert [x.name for x in diff.resolved] == ["A"]
    assert [x.name for x in diff.still_firing] == ["B"]
    assert diff.changed and not diff.all_resolved


def test_an_alert_that_disappears_counts_as_resolved_unless_the_list_was_truncated() -> None:
    before = state(alert("A"), alert("B", instance="b"))
    assert [x.name for x in diff_states(before, state(alert("B", instance="b"))).resolved] == ["A"]
    truncated = diff_states(before, state(alert("B", instance="b"), truncated=1))
    assert truncated.resolved == () and {x.name for x in truncated.still_firing} == {"A", "B"}


def test_everything_resolved_is_a_resolution() -> None:
    diff = diff_states(state(alert("A")), state(alert("A", "resolved")))
    assert diff.all_resolved and [x.name for x in diff.resolved] == ["A"]
    text = reply_text(diff, closing=True)
    assert text is not None and text.startswith("All alerts of this group have resolved. Closing the ticket.")


def test_no_change_and_no_flap_says_nothing_and_a_flap_says_so_once() -> None:
    same = diff_states(state(alert("A")), state(alert("A")))
    assert not same.changed and reply_text(same) is None
    flap = reply_text(same, flapped=2)
    assert flap is not None and "flapped: 2 notification(s)" in flap and "net state is unchanged" in flap
    assert "Still firing:\n  - A" in flap


def test_a_reply_names_alerts_by_what_sets_them_apart() -> None:
    diff = diff_states(state(alert("Disk", instance="a")),
                       state(alert("Disk", instance="a"), alert("Disk", instance="b", summary="b is full")))
    text = reply_text(diff)
    assert text is not None and text.startswith("Alert update: 1 newly firing, 1 still firing.")
    assert "Newly firing:\n  - Disk (instance=b): b is full (since 2024-05-01T10:00:00.123000+00:00)" in text
    assert "Still firing:\n  - Disk (instance=a)" in text
    reopened = reply_text(diff, reopened=True, source="grafana")
    assert reopened is not None and reopened.startswith("The alerts are firing again") and "from Grafana" in reopened
