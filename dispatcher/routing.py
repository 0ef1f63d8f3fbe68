"""Which provider department (and NocWorx category) an intent is filed under. Pure: no I/O.

Producers name a provider-neutral ``topic`` (``dns``, ``vps`` ...) or an explicit ``department``.
The rules here turn that into the provider's own department, and :func:`resolve` checks the
answer against the provider's *current* department list, because HostUp's list is the only
source of truth for its slugs: a slug is never guessed, fuzzy-matched or derived from a name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from dispatcher.domain import NOCWORX_CATEGORIES, NOCWORX_DEPARTMENTS, Provider
from dispatcher.errors import ConfigError, FieldProblem, RoutingError

#: the rule used when an intent has neither a topic nor a department
DEFAULT_KEY = "default"

_PROVIDER_NAMES: Mapping[Provider, str] = MappingProxyType({
    Provider.hostup: "HostUp",
    Provider.nocworx: "NocWorx",
})


@dataclass(frozen=True)
class Route:
    """Where one topic goes on one provider; ``category`` exists on NocWorx only."""

    department: str
    category: str | None = None


@dataclass(frozen=True)
class Resolution:
    """The chosen department plus ``reason``, so the audit trail says why it was chosen."""

    department: str
    category: str | None
    reason: str


def _routes(table: Mapping[str, Route]) -> Mapping[str, Route]:
    return MappingProxyType(dict(table))


_HOSTUP_VPS = Route("vps")  # the seed: "Use `vps` for VPS, IP address, and VPS network requests"
_HOSTUP_DOMAINS = Route("domain-names")
_HOSTUP_GENERAL = Route("general-web-hosting")
_HOSTUP_BILLING = Route("billing")
_NOCWORX_SUPPORT = Route("support")

#: the built-in rules; configuration may override or extend them per target (:func:`merged_routes`)
DEFAULT_ROUTES: Mapping[Provider, Mapping[str, Route]] = MappingProxyType({
    Provider.hostup: _routes({
        "vps": _HOSTUP_VPS,
        "ip": _HOSTUP_VPS,
        "network": _HOSTUP_VPS,
        "dns": _HOSTUP_DOMAINS,
        "domain": _HOSTUP_DOMAINS,
        "hosting": _HOSTUP_GENERAL,
        "email": _HOSTUP_GENERAL,
        "ssl": _HOSTUP_GENERAL,
        "migration": _HOSTUP_GENERAL,
        "general": _HOSTUP_GENERAL,
        "billing": _HOSTUP_BILLING,
        "sales": _HOSTUP_BILLING,
        DEFAULT_KEY: _HOSTUP_GENERAL,
    }),
    Provider.nocworx: _routes({
        "vps": _NOCWORX_SUPPORT,
        "network": _NOCWORX_SUPPORT,
        "hosting": _NOCWORX_SUPPORT,
        "general": _NOCWORX_SUPPORT,
        "ip": _NOCWORX_SUPPORT,
        "dns": Route("support", "dns"),
        "domain": Route("support", "dns"),
        "email": Route("support", "email"),
        "ssl": Route("support", "ssl"),
        "billing": Route("billing"),
        "sales": Route("sales"),
        "migration": Route("migrations"),
        DEFAULT_KEY: _NOCWORX_SUPPORT,
    }),
})


def provider_name(provider: Provider) -> str:
    """The provider as operators know it, for messages."""
    return _PROVIDER_NAMES.get(provider, str(provider))


def _topic_key(topic: str) -> str:
    # the intake model already lower-cases topics; configuration keys get the same treatment
    return topic.strip().lower()


def _check_rule(provider: Provider, topic: str, route: Route) -> None:
    """Refuse a configured rule that could never be sent, so the mistake shows at startup."""
    where = f"route for topic '{topic}' on {provider_name(provider)}"
    if not route.department.strip():
        raise ConfigError(f"{where}: department must not be empty")
    if provider is Provider.hostup:
        if route.category is not None:
            raise ConfigError(f"{where}: HostUp departments take no category")
        return
    if route.department not in NOCWORX_DEPARTMENTS:
        raise ConfigError(f"{where}: department '{route.department}' is not one of "
                          f"{', '.join(NOCWORX_DEPARTMENTS)}")
    if route.category is not None and route.category not in NOCWORX_CATEGORIES:
        raise ConfigError(f"{where}: category '{route.category}' is not one of "
                          f"{', '.join(NOCWORX_CATEGORIES)}")


def merged_routes(provider: Provider, overrides: Mapping[str, Route]) -> dict[str, Route]:
    """The defaults with a target's configured rules on top (a configured rule wins).

    Raises :class:`ConfigError` for a rule the provider could never accept (a NocWorx department
    outside its fixed list, a category on HostUp). HostUp slugs can only be checked against the
    live list, which :func:`resolve` does.
    """
    routes = dict(DEFAULT_ROUTES[provider])
    for raw_topic, route in overrides.items():
        topic = _topic_key(raw_topic)
        if not topic:
            raise ConfigError(f"route on {provider_name(provider)}: topic must not be empty")
        _check_rule(provider, topic, route)
        routes[topic] = route
    return routes


def known_topics(routes: Mapping[str, Route]) -> list[str]:
    """The topics producers may send (the ``default`` rule is not a topic)."""
    return sorted(topic for topic in routes if topic != DEFAULT_KEY)


def _no_rule_message(provider: Provider, topic: str, routes: Mapping[str, Route]) -> str:
    return (f"no department rule for topic '{topic}' on {provider_name(provider)} targets; "
            f"known topics: {', '.join(known_topics(routes)) or '(none)'}")


def check_topic(provider: Provider, topic: str | None, routes: Mapping[str, Route]) -> FieldProblem | None:
    """Intake check: refuse a topic with no rule now, rather than fail the intent in the worker."""
    if topic is None:
        return None
    key = _topic_key(topic)
    if key in routes:
        return None
    return FieldProblem("topic", _no_rule_message(provider, key, routes))


def _rule_kind(provider: Provider, key: str, route: Route) -> str:
    return "default rule" if DEFAULT_ROUTES[provider].get(key) == route else "configured rule"


def _target(department: str, category: str | None) -> str:
    text = f"department '{department}'"
    return f"{text}, category '{category}'" if category is not None else text


def resolve(
    provider: Provider,
    *,
    topic: str | None,
    department: str | None,
    category: str | None,
    routes: Mapping[str, Route],
    available: Sequence[str] | None,
) -> Resolution:
    """Choose the department: an explicit one wins, else the topic's rule, else ``default``.

    The category is the explicit one, else the topic rule's. ``available`` is the provider's
    current department list (HostUp: the slugs from ``GET /support/departments``); ``None``
    skips that check. A department the list does not hold is a :class:`RoutingError` naming
    what was asked for and the departments that exist: the intent fails visibly instead of
    being filed somewhere guessed.
    """
    name = provider_name(provider)
    key = _topic_key(topic) if topic is not None else None
    rule = routes.get(key) if key is not None else None
    if key is not None and rule is None and department is None:
        # intake refused this already (check_topic); the rules changed since
        raise RoutingError(_no_rule_message(provider, key, routes))

    if department is not None:
        chosen_department = department
        chosen_category = category if category is not None else (rule.category if rule else None)
        asked = f"explicit department '{department}'"
        reason = asked
        if category is not None:
            reason += f", explicit category '{category}'"
        elif chosen_category is not None:
            reason += f", category '{chosen_category}' from topic '{key}'"
        if key is not None and rule is None:
            reason += f" (topic '{key}' has no rule; ignored)"
    elif rule is not None and key is not None:
        chosen_department = rule.department
        chosen_category = category if category is not None else rule.category
        asked = f"topic '{key}' routes to department '{chosen_department}'"
        reason = (f"topic '{key}' → {_target(chosen_department, rule.category)} "
                  f"({_rule_kind(provider, key, rule)})")
        if category is not None:
            reason += f"; explicit category '{category}'"
    else:
        fallback = routes.get(DEFAULT_KEY)
        if fallback is None:
            raise RoutingError(f"the intent names no topic or department and {name} targets have "
                               f"no '{DEFAULT_KEY}' rule")
        chosen_department = fallback.department
        chosen_category = category if category is not None else fallback.category
        asked = f"the '{DEFAULT_KEY}' rule routes to department '{chosen_department}'"
        reason = (f"no topic or department → {_target(chosen_department, fallback.category)} "
                  f"({_rule_kind(provider, DEFAULT_KEY, fallback)})")
        if category is not None:
            reason += f"; explicit category '{category}'"

    if provider is Provider.hostup and chosen_category is not None:
        raise RoutingError(f"{asked} with category '{chosen_category}', but HostUp takes no category")
    if provider is Provider.nocworx and chosen_category is not None \
            and chosen_category not in NOCWORX_CATEGORIES:
        raise RoutingError(f"{asked} with category '{chosen_category}', which NocWorx does not take; "
                           f"categories: {', '.join(NOCWORX_CATEGORIES)}")

    if available is not None:
        slugs = sorted(set(available))
        if not slugs:
            raise RoutingError(f"{asked}, but {name} lists no departments")
        if chosen_department not in slugs:  # exact match only: never guess a slug
            raise RoutingError(f"{asked}, which {name} does not list; departments: {', '.join(slugs)}")

    return Resolution(chosen_department, chosen_category, reason)
