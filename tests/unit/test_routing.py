"""Routing rules: topic → department (and NocWorx category), checked against the live list."""

from __future__ import annotations

import pytest

from dispatcher.domain import KNOWN_TOPICS, NOCWORX_DEPARTMENTS, Provider
from dispatcher.errors import ConfigError, FieldProblem, RoutingError
from dispatcher.routing import (
    DEFAULT_KEY,
    DEFAULT_ROUTES,
    Resolution,
    Route,
    check_topic,
    merged_routes,
    provider_name,
    resolve,
)

HOSTUP = Provider.hostup
NOCWORX = Provider.nocworx
#: the HostUp slugs the public documentation shows
HOSTUP_SLUGS = ("general-web-hosting", "domain-names", "vps", "billing")


def _resolve(
    provider: Provider,
    *,
    topic: str | None = None,
    department: str | None = None,
    category: str | None = None,
    overrides: dict[str, Route] | None = None,
    available: tuple[str, ...] | list[str] | None = None,
) -> Resolution:
    if available is None:
        available = HOSTUP_SLUGS if provider is HOSTUP else NOCWORX_DEPARTMENTS
    return resolve(provider, topic=topic, department=department, category=category,
                   routes=merged_routes(provider, overrides or {}), available=available)


@pytest.mark.parametrize("provider", list(Provider))
def test_default_routes_cover_every_known_topic_and_a_default(provider: Provider) -> None:
    assert set(DEFAULT_ROUTES[provider]) == {*KNOWN_TOPICS, DEFAULT_KEY}


@pytest.mark.parametrize(("provider", "topic", "department", "category"), [
    (HOSTUP, "vps", "vps", None),
    (HOSTUP, "ip", "vps", None),
    (HOSTUP, "network", "vps", None),
    (HOSTUP, "dns", "domain-names", None),
    (HOSTUP, "domain", "domain-names", None),
    (HOSTUP, "hosting", "general-web-hosting", None),
    (HOSTUP, "email", "general-web-hosting", None),
    (HOSTUP, "ssl", "general-web-hosting", None),
    (HOSTUP, "migration", "general-web-hosting", None),
    (HOSTUP, "general", "general-web-hosting", None),
    (HOSTUP, "billing", "billing", None),
    (HOSTUP, "sales", "billing", None),
    (NOCWORX, "vps", "support", None),
    (NOCWORX, "network", "support", None),
    (NOCWORX, "hosting", "support", None),
    (NOCWORX, "general", "support", None),
    (NOCWORX, "ip", "support", None),
    (NOCWORX, "dns", "support", "dns"),
    (NOCWORX, "domain", "support", "dns"),
    (NOCWORX, "email", "support", "email"),
    (NOCWORX, "ssl", "support", "ssl"),
    (NOCWORX, "billing", "billing", None),
    (NOCWORX, "sales", "sales", None),
    (NOCWORX, "migration", "migrations", None),
])
def test_each_default_topic_routes_to_its_department(
        provider: Provider, topic: str, department: str, category: str | None) -> None:
    result = _resolve(provider, topic=topic)
    assert (result.department, result.category) == (department, category)
    assert result.reason.startswith(f"topic '{topic}' → department '{department}'")
    assert result.reason.endswith("(default rule)")


@pytest.mark.parametrize("topic", ["vps", "ip", "network"])
def test_hostup_vps_ip_and_network_topics_use_the_vps_slug_as_the_seed_says(topic: str) -> None:
    assert _resolve(HOSTUP, topic=topic) == Resolution(
        "vps", None, f"topic '{topic}' → department 'vps' (default rule)")


@pytest.mark.parametrize(("provider", "department"), [
    (HOSTUP, "general-web-hosting"),
    (NOCWORX, "support"),
])
def test_intent_without_topic_or_department_uses_the_default_rule(
        provider: Provider, department: str) -> None:
    result = _resolve(provider)
    assert (result.department, result.category) == (department, None)
    assert result.reason == f"no topic or department → department '{department}' (default rule)"


@pytest.mark.parametrize(("provider", "department", "topic", "category", "expected"), [
    (HOSTUP, "billing", None, None, Resolution("billing", None, "explicit department 'billing'")),
    (HOSTUP, "billing", "vps", None, Resolution("billing", None, "explicit department 'billing'")),
    (NOCWORX, "sales", None, None, Resolution("sales", None, "explicit department 'sales'")),
    (NOCWORX, "billing", "dns", None,
     Resolution("billing", "dns", "explicit department 'billing', category 'dns' from topic 'dns'")),
    (NOCWORX, "support", "dns", "security",
     Resolution("support", "security", "explicit department 'support', explicit category 'security'")),
    (NOCWORX, "support", None, "cdn",
     Resolution("support", "cdn", "explicit department 'support', explicit category 'cdn'")),
])
def test_explicit_department_wins_over_topic_rule(
        provider: Provider, department: str, topic: str | None, category: str | None,
        expected: Resolution) -> None:
    assert _resolve(provider, department=department, topic=topic, category=category) == expected


@pytest.mark.parametrize(("topic", "category", "expected"), [
    ("dns", None, "dns"),
    ("email", None, "email"),
    ("vps", None, None),
    ("dns", "site_down", "site_down"),
    ("vps", "backups", "backups"),
])
def test_nocworx_category_comes_from_explicit_value_else_topic_rule(
        topic: str, category: str | None, expected: str | None) -> None:
    result = _resolve(NOCWORX, topic=topic, category=category)
    assert result.department == "support"
    assert result.category == expected
    if category is not None:
        assert f"explicit category '{category}'" in result.reason


@pytest.mark.parametrize(("provider", "department", "available", "message"), [
    (HOSTUP, "technical", HOSTUP_SLUGS,
     "explicit department 'technical', which HostUp does not list; "
     "departments: billing, domain-names, general-web-hosting, vps"),
    (HOSTUP, "Billing", HOSTUP_SLUGS,
     "explicit department 'Billing', which HostUp does not list; "
     "departments: billing, domain-names, general-web-hosting, vps"),
    (NOCWORX, "migration", NOCWORX_DEPARTMENTS,
     "explicit department 'migration', which NocWorx does not list; "
     "departments: billing, migrations, sales, support"),
])
def test_explicit_department_missing_from_list_fails_listing_the_departments(
        provider: Provider, department: str, available: tuple[str, ...], message: str) -> None:
    with pytest.raises(RoutingError) as caught:
        _resolve(provider, department=department, available=available)
    assert caught.value.message == message


def test_topic_whose_slug_is_missing_from_live_list_fails_naming_topic_and_slugs() -> None:
    with pytest.raises(RoutingError) as caught:
        _resolve(HOSTUP, topic="dns", available=["vps", "general-web-hosting", "billing"])
    assert caught.value.message == (
        "topic 'dns' routes to department 'domain-names', which HostUp does not list; "
        "departments: billing, general-web-hosting, vps")


@pytest.mark.parametrize("available", [
    ["Domain-Names", "vps"],
    ["domain_names", "vps"],
    ["domain-names-se", "vps"],
    ["domains", "vps"],
    [" domain-names", "vps"],
])
def test_slug_is_matched_exactly_never_guessed(available: list[str]) -> None:
    with pytest.raises(RoutingError, match="topic 'domain' routes to department 'domain-names'"):
        _resolve(HOSTUP, topic="domain", available=available)


@pytest.mark.parametrize(("topic", "department"), [("dns", None), (None, "billing"), (None, None)])
def test_empty_department_list_is_an_error(topic: str | None, department: str | None) -> None:
    with pytest.raises(RoutingError, match="HostUp lists no departments"):
        _resolve(HOSTUP, topic=topic, department=department, available=[])


def test_no_available_list_skips_the_live_check() -> None:
    routes = merged_routes(NOCWORX, {})
    result = resolve(NOCWORX, topic="migration", department=None, category=None, routes=routes,
                     available=None)
    assert result.department == "migrations"


@pytest.mark.parametrize(("provider", "topic"), [
    (HOSTUP, "wordpress"),
    (NOCWORX, "wordpress"),
    (HOSTUP, "default-ish"),
])
def test_unknown_topic_is_a_field_problem_at_intake(provider: Provider, topic: str) -> None:
    routes = merged_routes(provider, {})
    known = ", ".join(sorted(KNOWN_TOPICS))
    assert check_topic(provider, topic, routes) == FieldProblem(
        "topic", f"no department rule for topic '{topic}' on {provider_name(provider)} targets; "
                 f"known topics: {known}")


@pytest.mark.parametrize(("provider", "topic"), [
    (HOSTUP, None), (HOSTUP, "dns"), (HOSTUP, "ip"), (NOCWORX, "migration"), (NOCWORX, None),
])
def test_known_or_absent_topic_passes_intake(provider: Provider, topic: str | None) -> None:
    assert check_topic(provider, topic, merged_routes(provider, {})) is None


def test_configured_topic_passes_intake_and_is_listed() -> None:
    routes = merged_routes(NOCWORX, {"wordpress": Route("support", "plugin_extension")})
    assert check_topic(NOCWORX, "wordpress", routes) is None
    problem = check_topic(NOCWORX, "joomla", routes)
    assert problem is not None and "wordpress" in problem.reason


def test_unknown_topic_at_send_time_is_a_routing_error() -> None:
    with pytest.raises(RoutingError, match="no department rule for topic 'wordpress' on HostUp targets"):
        _resolve(HOSTUP, topic="wordpress")


def test_unknown_topic_with_explicit_department_uses_the_department() -> None:
    result = _resolve(HOSTUP, topic="wordpress", department="general-web-hosting")
    assert result.department == "general-web-hosting"
    assert "topic 'wordpress' has no rule" in result.reason


@pytest.mark.parametrize(("provider", "overrides", "topic", "expected", "reason"), [
    (HOSTUP, {"ssl": Route("vps")}, "ssl", Route("vps"),
     "topic 'ssl' → department 'vps' (configured rule)"),
    (HOSTUP, {"wordpress": Route("general-web-hosting")}, "wordpress", Route("general-web-hosting"),
     "topic 'wordpress' → department 'general-web-hosting' (configured rule)"),
    (HOSTUP, {"default": Route("vps")}, None, Route("vps"),
     "no topic or department → department 'vps' (configured rule)"),
    (NOCWORX, {"ip": Route("support", "ip_blacklist")}, "ip", Route("support", "ip_blacklist"),
     "topic 'ip' → department 'support', category 'ip_blacklist' (configured rule)"),
    (NOCWORX, {"Backups": Route("support", "backups")}, "backups", Route("support", "backups"),
     "topic 'backups' → department 'support', category 'backups' (configured rule)"),
    (NOCWORX, {"dns": Route("support", "dns")}, "dns", Route("support", "dns"),
     "topic 'dns' → department 'support', category 'dns' (default rule)"),
])
def test_configured_rules_override_and_extend_defaults(
        provider: Provider, overrides: dict[str, Route], topic: str | None, expected: Route,
        reason: str) -> None:
    result = _resolve(provider, topic=topic, overrides=overrides)
    assert Route(result.department, result.category) == expected
    assert result.reason == reason


def test_overrides_leave_the_defaults_and_other_topics_alone() -> None:
    routes = merged_routes(HOSTUP, {"ssl": Route("vps")})
    assert routes["dns"] == Route("domain-names")
    assert DEFAULT_ROUTES[HOSTUP]["ssl"] == Route("general-web-hosting")
    assert merged_routes(HOSTUP, {})["ssl"] == Route("general-web-hosting")


@pytest.mark.parametrize(("provider", "overrides", "message"), [
    (HOSTUP, {"dns": Route("domain-names", "dns")}, "HostUp departments take no category"),
    (HOSTUP, {"dns": Route("  ")}, "department must not be empty"),
    (NOCWORX, {"dns": Route("technical")}, "department 'technical' is not one of"),
    (NOCWORX, {"dns": Route("support", "domains")}, "category 'domains' is not one of"),
    (NOCWORX, {" ": Route("support")}, "topic must not be empty"),
])
def test_impossible_configured_rule_is_a_config_error(
        provider: Provider, overrides: dict[str, Route], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        merged_routes(provider, overrides)


def test_hostup_intent_with_category_is_refused() -> None:
    with pytest.raises(RoutingError, match="HostUp takes no category"):
        _resolve(HOSTUP, topic="dns", category="dns")


def test_nocworx_unknown_category_is_refused() -> None:
    with pytest.raises(RoutingError, match="category 'domains', which NocWorx does not take"):
        _resolve(NOCWORX, topic="dns", category="domains")


def test_missing_default_rule_fails_when_intent_names_nothing() -> None:
    routes = {k: v for k, v in merged_routes(HOSTUP, {}).items() if k != DEFAULT_KEY}
    with pytest.raises(RoutingError, match="no 'default' rule"):
        resolve(HOSTUP, topic=None, department=None, category=None, routes=routes, available=HOSTUP_SLUGS)


def test_default_routes_cannot_be_mutated() -> None:
    with pytest.raises(TypeError):
        DEFAULT_ROUTES[HOSTUP]["dns"] = Route("vps")  # type: ignore[index]
